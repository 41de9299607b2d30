"""The lens before and after an edit (:mod:`analysis.lens`): an identity edit changes
nothing, a hand-built edit whose new answer is known appears at the layer it writes, the
per-edit definitions on built cases, and the stage saves, resumes and reads back."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.lens import (
    EDIT_KINDS,
    PHASES,
    POSITIONS,
    EditLens,
    EditLensResult,
    LensConfig,
    edit_lens_arrays,
    lens_edit,
    summarize_edit_lens,
)
from mlake_core.editing.base import EditResult, down_proj_name, edited_parameter
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.adapter import OutputDelta
from mlake_core.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("lens_edits") / "llama")


def _items(adapter) -> list[tuple[list[int], int, list[int]]]:
    texts = ["The capital of France is", "法国的首都是巴黎", "Hi there, you"]
    return [(adapter.encode(t), 1, [5, 17, 42, 7]) for t in texts]


def test_an_identity_edit_leaves_the_lens_as_it_was(tiny: Path) -> None:
    adapter = load_adapter(str(tiny), "tlens", device="cpu")
    name = down_proj_name(adapter, 1)
    param = edited_parameter(adapter, name, "test")
    zero = EditResult("identity", (), {name: torch.zeros_like(param)})
    before, after = lens_edit(adapter, partial(zero.applied, adapter), _items(adapter), 2)
    for (pb, rb), (pa, ra) in zip(before, after, strict=True):
        np.testing.assert_array_equal(pb, pa)
        np.testing.assert_array_equal(rb, ra)
    # A real change does change it (the comparison can fail).
    bump = EditResult("bump", (), {name: torch.randn_like(param)})
    _, changed = lens_edit(
        adapter, partial(bump.applied, adapter), _items(adapter), 2, before=before
    )
    assert not np.allclose(changed[0][0], before[0][0])


@pytest.mark.parametrize("layer", [0, 1])
def test_a_hand_built_edit_appears_at_the_layer_it_writes(tiny: Path, layer: int) -> None:
    """A constant vector that the lens reads as token t, added at layer L's MLP output: the
    new answer t is the top token from layer L on at every position, and the layers before
    are untouched."""
    adapter = load_adapter(str(tiny), "tlens", device="cpu")
    items = _items(adapter)
    head = adapter.hf_module(adapter.spec.unembed)
    unembed = torch.as_tensor(head.weight).detach().float()  # [vocab, d]
    # A token the unedited model does not rank near the top anywhere, whose direction the lens
    # reads as itself.
    before = lens_edit(adapter, nullcontext, [(ids, s, list(range(64))) for ids, s, _ in items])[0]
    token = None
    for t in range(64):
        v = 1e4 * unembed[t]
        if int(adapter.logit_lens(v).argmax()) != t:
            continue
        if min(int(r[..., t].min()) for _, r in before) >= 10:
            token = t
            break
    assert token is not None
    path = adapter.spec.sites["mlp_post"].path(layer)
    delta = OutputDelta(path, bias=1e4 * unembed[token])
    items = [(ids, s, [token]) for ids, s, _ in items]
    prior, after = lens_edit(adapter, lambda: adapter.adding([delta]), items)
    for (pb, rb), (pa, ra) in zip(prior, after, strict=True):
        assert (rb >= 10).all()  # never decodable before the edit
        assert (ra[:, layer:, 0] == 0).all()  # the top token from layer L on
        np.testing.assert_allclose(pa[:, :layer], pb[:, :layer], rtol=1e-5, atol=1e-8)
    # Through EditLens: the new answer emerges at L after the edit, never before it.
    prob, rank = edit_lens_arrays(
        [(p.repeat(6, -1), r.repeat(6, -1)) for p, r in prior],
        [(p.repeat(6, -1), r.repeat(6, -1)) for p, r in after],
        n_langs=3,
    )
    lens = EditLens(
        prob,
        rank,
        np.array([[[token] * 3, [token + 1] * 3]] * 3),
        ["en", "zh", "fr"],
        ["en", "zh", "fr"],
        np.array([[1, len(ids) - 1] for ids, _, _ in items]),
        [True, False, True],
        "en",
        7,
    )
    for test in ("en", "zh", "fr"):
        assert lens.emergence_layer(test, 10) == layer
        assert lens.emergence_layer(test, 10, phase="before") is None
        assert lens.success(test)


def _edit_lens(new_ranks: dict[str, list[int]], test: str = "zh", ids: dict | None = None):
    """A built edit lens read in one test language: the new answer's rank per layer in each
    language's form after the edit (before: never decodable; the old answer: rank 0)."""
    langs = list(new_ranks)
    layers = len(next(iter(new_ranks.values())))
    shape = (1, len(PHASES), len(POSITIONS), layers, len(EDIT_KINDS), len(langs))
    rank = np.full(shape, 100)
    rank[:, :, :, :, 1, :] = 0
    for j, lang in enumerate(langs):
        rank[0, 1, 1, :, 0, j] = new_ranks[lang]
    prob = 1.0 / (1.0 + rank)
    ids = ids or {lang: 10 + j for j, lang in enumerate(langs)}
    answer_ids = np.array([[[ids[x] for x in langs], [50 + j for j in range(len(langs))]]])
    return EditLens(prob, rank, answer_ids, langs, [test], np.array([[2, 5]]), [True], "en", 1)


def test_the_new_answer_in_another_form_first() -> None:
    # Edited in en, read in zh: the English form of the new answer is decodable at layer 1,
    # the Chinese one only at 3 (and is then the top token: the edit succeeds in zh).
    lens = _edit_lens({"en": [50, 4, 0, 3], "zh": [99, 60, 20, 0]})
    assert lens.emergence_layer("zh", 10) == 3
    assert lens.first_language("zh", 10) == "en"
    assert lens.success("zh")
    assert lens.emergence_layer("zh", 10, kind="old", phase="before") == 0
    lost = _edit_lens({"en": [50, 4, 0, 3], "zh": [99, 60, 20, 12]})
    assert lost.emergence_layer("zh", 10) is None and not lost.success("zh")
    # The same first token as zh's form cannot be told apart: left out.
    same = _edit_lens({"en": [0, 0, 0, 0], "zh": [99, 60, 5, 0]}, ids={"en": 10, "zh": 10})
    assert same.first_language("zh", 10) == "zh"
    summary = summarize_edit_lens("en", "zh", [lens, lost, same], top_k=10)
    assert (summary.n_edits, summary.n_success, summary.n_known_before) == (3, 2, 3)
    assert summary.emergence == [3, 2] and summary.never == 1
    assert summary.first_language == {"en": 2, "zh": 1} and summary.other_form_first == 2
    assert summary.emerged_before == 0  # the built lenses: never decodable before the edit
    lost.rank[0, 0, 1, 2, 0, 1] = 3  # decodable at layer 2 before the edit
    assert summarize_edit_lens("en", "zh", [lens, lost], top_k=10).emerged_before == 1
    assert summary.decodable["last"]["new_after"] == pytest.approx([0, 0, 1 / 3, 2 / 3])
    assert summary.decodable["last"]["old_before"] == [1, 1, 1, 1]
    assert np.array(summary.new_forms_after).shape == (4, 2)
    assert summarize_edit_lens("en", "ja", [lens], 10).n_edits == 0


def test_edit_settings() -> None:
    assert not LensConfig().measures_edits and LensConfig(method="ft", edits=2).measures_edits
    assert LensConfig(method="ft", edits=0).measures_edits is False
    assert LensConfig().fact_key() == {"form": "question", "top_k": 10}  # the old run key
    assert LensConfig(lens="tuned").fact_key()["lens"] == "tuned"
    for bad in ({"lens": "magic"}, {"edits": -1}):
        with pytest.raises(ConfigError):
            LensConfig(**bad)


@pytest.mark.slow
def test_the_edit_stage_saves_resumes_and_reads_back(
    micro_tiny: Path, mlake_v2411, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.lens import lens_edits_stage
    from mlake_core.editing.ft import FtConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from mlake_core.models.mlake_tiny import read_metadata
    from mlake_core.models.prompting import get_template
    from mlake_core.results import store

    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    ctx = StageContext(
        adapter,
        str(micro_tiny),
        mlake_v2411,
        tuple(meta["fact_ids"]),
        ("en", "zh", "fr"),
        get_template(meta["config"]["template"]),
        results_dir=tmp_path,
    )
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    config = LensConfig(method="ft", edits=2)
    method_config = FtConfig(layer="0", lr=0.01, steps=100, max_rel_norm=0.3)  # as patching's
    seen: list = []
    result, run = lens_edits_stage(
        ctx, config, knowledge=knowledge, method_config=method_config, on_item=seen.append
    )
    assert len(seen) == sum(len(v) for v in result.edits.values()) > 0
    for a in ctx.langs:
        for lens in result.lenses(a):
            assert lens.edit_lang == a and set(lens.test_langs) <= set(ctx.langs)
            # Before the edit the old answer is the model's own (known in A): rank 0 in A at
            # the last layer; the edit makes the new answer A's top token (FT on a known fact).
            if a in lens.test_langs:
                assert lens.curve(a, "old", "before", what="rank")[-1] == 0
                assert lens.known_before[lens.test_langs.index(a)]
                # The edit was applied while the lens read: the new answer gained in A.
                assert lens.curve(a)[-1] > 2 * lens.curve(a, phase="before")[-1]
        own = result.pair(a, a)
        assert own.n_edits == len(result.edits[a])
    assert result.pair("en", "en").n_success >= 1  # FT succeeds in English on this model
    # Resumed after losing the summary: nothing recomputed; read back: nothing written.
    run.json_path("summary").unlink()
    again: list = []
    resumed, _ = lens_edits_stage(
        ctx, config, knowledge=knowledge, method_config=method_config, on_item=again.append
    )
    assert again == [] and resumed.to_dict() == result.to_dict()
    writes: list[Path] = []
    real = store._atomic_write

    def counted(path: Path, write: Callable[[Path], None]) -> None:
        writes.append(path)
        real(path, write)

    monkeypatch.setattr(store, "_atomic_write", counted)
    lens_edits_stage(ctx, config, knowledge=knowledge, method_config=method_config)
    assert writes == []
    assert EditLensResult.load(run.path).to_dict() == result.to_dict()
    with pytest.raises(ConfigError):
        lens_edits_stage(ctx, LensConfig(), knowledge=knowledge)
