"""Cross-lingual patching (:mod:`analysis.patching`): built cases with known answers (a state
copied from an identical prompt at the last layer carries the edit with rate 1; a patch after
the answer was read out changes nothing), batched equals unbatched, the backends agree, the
pairing and the summaries on built cases."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.patching import (
    DIRECTIONS,
    POSITIONS,
    CounterfactualPatch,
    EditPatch,
    PatchConfig,
    best_layer,
    pair_facts,
    patch_all_layers,
    patch_edit,
    patch_rows,
    patch_sources,
    prompt_past,
    relation_key,
    source_states,
    summarize_counterfactual,
    summarize_edits,
)
from mlake_core.editing.base import EditResult, down_proj_name
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("patching") / "llama")


@pytest.fixture(scope="module")
def tlens(tiny: Path):
    return load_adapter(str(tiny), "tlens", device="cpu")


def _prompts(adapter) -> tuple[list[int], list[int]]:
    return adapter.encode("The capital of France is"), adapter.encode("法国的首都是什么呢")


def test_a_copied_last_state_makes_the_output_the_sources(tlens) -> None:
    a, b = _prompts(tlens)
    source = source_states(tlens, a, [1, len(a) - 1])
    tokens = [5, 17, 42]
    prob, rank, clean_prob, clean_rank = patch_all_layers(tlens, source, b, [2, len(b) - 1], tokens)
    assert prob.shape == rank.shape == (2, tlens.n_layers, 3)
    own_a = tlens.forward(tlens.batch([a]))[0, -1].float().softmax(-1)
    own_b = tlens.forward(tlens.batch([b]))[0, -1].float().softmax(-1)
    # The last position's state at the last layer is the output: B's output becomes A's.
    np.testing.assert_allclose(prob[1, -1], own_a[tokens].numpy(), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(clean_prob, own_b[tokens].numpy(), rtol=1e-4, atol=1e-7)
    # resid_post of the last layer at the subject's token: no later block reads it.
    np.testing.assert_allclose(prob[0, -1], clean_prob, rtol=1e-5, atol=1e-8)
    assert (rank[0, -1] == clean_rank).all()
    # An earlier layer at the subject does change B's output (the patch is live).
    assert not np.allclose(prob[0, 0], clean_prob, rtol=1e-4, atol=1e-7)


def test_batched_equals_unbatched_and_the_backends_agree(tiny: Path, tlens) -> None:
    a, b = _prompts(tlens)
    tokens = [3, 9, 77]
    nn = load_adapter(str(tiny), "nnsight", device="cpu")
    src_t = source_states(tlens, a, [1, len(a) - 1])
    src_n = source_states(nn, a, [1, len(a) - 1])
    torch.testing.assert_close(src_t, src_n, rtol=1e-4, atol=1e-5)
    together = patch_all_layers(tlens, src_t, b, [2, len(b) - 1], tokens)
    one_by_one = patch_all_layers(tlens, src_t, b, [2, len(b) - 1], tokens, max_rows=1)
    by_three = patch_all_layers(tlens, src_t, b, [2, len(b) - 1], tokens, max_rows=3)
    other = patch_all_layers(nn, src_n, b, [2, len(b) - 1], tokens)
    whole = patch_all_layers(tlens, src_t, b, [2, len(b) - 1], tokens, prefix_cache=False)
    whole_nn = patch_all_layers(nn, src_n, b, [2, len(b) - 1], tokens, prefix_cache=False)
    given = patch_all_layers(tlens, src_t, b, [2, len(b) - 1], tokens, prefix=prompt_past(tlens, b))
    for got in (one_by_one, by_three, other, whole, whole_nn, given):
        np.testing.assert_allclose(got[0], together[0], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(got[2], together[2], rtol=1e-4, atol=1e-7)
        assert np.abs(got[1] - together[1]).max() <= 1  # float ties


def test_several_sources_in_one_pass_equal_each_alone(tlens) -> None:
    a, b = _prompts(tlens)
    c = tlens.encode("Berlin is the capital of")
    first = source_states(tlens, a, [1, len(a) - 1])
    second = source_states(tlens, c, [0, len(c) - 1])
    where = [2, len(b) - 1]
    together = patch_sources(tlens, [(first, [5, 9]), (second, [9, 40, 5])], b, where)
    alone = [
        patch_all_layers(tlens, first, b, where, [5, 9]),
        patch_all_layers(tlens, second, b, where, [9, 40, 5]),
    ]
    for got, want in zip(together, alone, strict=True):
        assert got[0].shape == want[0].shape
        for x, y in zip(got, want, strict=True):
            np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-7)


def test_each_row_patches_only_its_own_layer(tlens) -> None:
    a, b = _prompts(tlens)
    source = source_states(tlens, a, [len(a) - 1])
    layer = 1
    rows = [None, (layer, len(b) - 1, source[0, layer])]
    prob, _ = patch_rows(tlens, b, rows, [5])
    alone, _ = patch_rows(tlens, b, [rows[1]], [5])
    clean, _ = patch_rows(tlens, b, [None], [5])
    np.testing.assert_allclose(prob[1], alone[0], rtol=1e-5)
    np.testing.assert_allclose(prob[0], clean[0], rtol=1e-5)
    assert not np.allclose(prob[1], clean[0])


def _edit(adapter) -> EditResult:
    layer = adapter.n_layers - 1
    name = down_proj_name(adapter, layer)
    weight = adapter.editable_parameter(name)
    generator = torch.Generator().manual_seed(0)
    delta = torch.randn(weight.shape, generator=generator) * 3.0
    return EditResult(method="built", requests=(), deltas={name: delta})


def test_an_exact_copy_carries_the_edit(tlens) -> None:
    a, b = _prompts(tlens)
    edit = _edit(tlens)
    before = tlens.forward(tlens.batch([a]))[0, -1].argmax().item()
    with edit.applied(tlens):
        after = tlens.forward(tlens.batch([a]))[0, -1].argmax().item()
    assert before != after  # the built edit changes A's answer
    pos_a = (1, len(a) - 1)
    same = ("en", a, pos_a, (after, before))  # the target prompt is the source prompt
    other = ("zh", b, (2, len(b) - 1), (after, before))
    result = patch_edit(tlens, lambda: edit.applied(tlens), (a, pos_a), [same, other], after)
    assert result.source_success
    carried, restored = result.carried(), result.restored()
    last = POSITIONS.index("last")
    forward, reverse = (
        DIRECTIONS.index("edited_to_unedited"),
        DIRECTIONS.index("unedited_to_edited"),
    )
    # Copied exactly (the same prompt, last layer, last position): carried with rate 1; the
    # reverse restores the old answer.
    assert carried[0, forward, last, -1] and restored[0, reverse, last, -1]
    # The state at the last layer is the output: any target follows it.
    assert carried[1, forward, last, -1]
    # The unpatched runs: the unedited B does not give the new answer.
    assert result.clean_rank[0, forward, 0] > 0 and result.clean_rank[0, reverse, 0] == 0
    # The weights are restored.
    assert tlens.forward(tlens.batch([a]))[0, -1].argmax().item() == before
    summary = summarize_edits(["en"], {"en": [result]}, tlens.n_layers)
    assert summary["n"] == {"en": 1} and summary["n_failed"] == {"en": 0}
    assert summary["edited_to_unedited"]["last"]["carried"][-1][0][0] == 1.0
    assert summary["unedited_to_edited"]["last"]["restored"][-1][0][0] == 1.0
    # Saved and loaded.
    back = EditPatch.from_arrays(result.to_arrays())
    assert back.target_langs == ["en", "zh"] and back.source_success
    np.testing.assert_array_equal(back.rank, result.rank)


def _cf(follow: list[list[bool]], facts=(1, 2)) -> CounterfactualPatch:
    f = np.array(follow, dtype=bool)
    prob = np.stack([np.where(f, 0.6, 0.1), np.where(f, 0.2, 0.5)], axis=-1)
    return CounterfactualPatch(
        prob, np.zeros_like(prob, dtype=int), np.array([0.05, 0.9]), np.array([9, 0]), facts, (7, 8)
    )


def test_the_counterfactual_summary_and_the_best_layer() -> None:
    # Three layers; off the diagonal layer 1 is followed most at the last position.
    pairs = {
        ("en", "zh"): [_cf([[0, 1, 0], [0, 1, 1]]), _cf([[0, 0, 0], [0, 1, 0]])],
        ("zh", "en"): [_cf([[0, 0, 0], [1, 1, 0]])],
        ("en", "en"): [_cf([[1, 1, 1], [1, 1, 1]])],
    }
    s = summarize_counterfactual(["en", "zh"], pairs, 3)
    assert s["n"] == [[1, 2], [1, 0]]
    assert s["last"]["follows"][1] == [[1.0, 1.0], [1.0, None]]
    assert s["last"]["follows"][2][0][1] == 0.5
    assert s["last"]["best_layer"] == 1
    assert s["subject_last"]["best_layer"] == 1  # 0.5 at layer 1; ties go to the earliest
    assert s["last"]["shift"][1][0][1] == pytest.approx(0.6 - 0.05)
    assert s["clean_follows"] == [[0.0, 0.0], [0.0, None]]
    assert best_layer([[[0.9, None], [None, 0.9]]]) is None  # only the diagonal
    back = CounterfactualPatch.from_arrays(pairs[("en", "zh")][0].to_arrays())
    assert back.facts == (1, 2) and back.tokens == (7, 8)


def test_pairing_is_seeded_prefers_the_relation_and_skips_unusable() -> None:
    relation = {1: "r", 2: "r", 3: "s", 4: "s", 5: "r"}.__getitem__
    usable = lambda s, t: (s, t) != (5, 1)  # noqa: E731
    kw = dict(seed=0, key="en:zh", relation=relation, usable=usable)
    pairs = pair_facts([1, 2, 3], [1, 2, 3, 4, 5], **kw)
    assert pairs[1] == 2  # the same relation, other than itself, usable
    assert pairs[2] in (1, 5) and pairs[3] == 4
    assert pair_facts([1, 2, 3], [5, 4, 3, 2, 1], **kw) == pairs  # order does not matter
    assert pair_facts([1], [1], **kw) == {}  # no other fact
    drawn = {
        pair_facts([9], list(range(9)), seed=s, key="k", relation=str, usable=usable)[9]
        for s in range(20)
    }
    assert len(drawn) > 1  # the seed draws
    assert relation_key("Where is Paris located?", (9, 14)) == "where is {} located?"
    # Only as many sources are checked as it takes to find a usable one.
    asked: list[int] = []
    counted = lambda s, t: asked.append(s) or True  # noqa: E731
    pair_facts(list(range(50)), list(range(1000)), seed=0, key="k", relation=str, usable=counted)
    assert len(asked) == 50


@pytest.mark.parametrize("bad", [{"form": "essay"}, {"edits": -1}, {"max_rows": 0}])
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(ConfigError):
        PatchConfig(**bad)


@pytest.mark.slow
def test_the_stage_saves_resumes_and_reads_back(
    micro_tiny: Path, mlake_v2411, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from analysis.patching import PatchingResult
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.patching import patching_stage
    from mlake_core.editing.ft import FtConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from mlake_core.models.mlake_tiny import read_metadata
    from mlake_core.models.prompting import get_template
    from mlake_core.results import store

    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    langs = ("en", "zh", "fr")
    ctx = StageContext(
        adapter,
        str(micro_tiny),
        mlake_v2411,
        tuple(meta["fact_ids"]),
        langs,
        get_template(meta["config"]["template"]),
        results_dir=tmp_path,
    )
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    config = PatchConfig(method="ft", edits=2)
    ft = FtConfig(layer="0", lr=0.01, steps=100, max_rel_norm=0.3)
    seen: list[dict] = []
    result, run = patching_stage(
        ctx, config, knowledge=knowledge, method_config=ft, on_item=seen.append
    )
    n = np.array(result.counterfactual["n"])
    for ib, b in enumerate(langs):
        assert (n[:, ib] <= len(knowledge.known(b) & set(ctx.fact_ids))).all()
    assert n.sum() == sum(1 for i in seen if i["kind"] == "counterfactual") > 0
    layers = adapter.n_layers
    follows = np.array(result.counterfactual["last"]["follows"], dtype=float)
    assert follows.shape == (layers, 3, 3)
    # A saved pair re-measured by hand: the source fact's state patched at the last layer and
    # position makes B's output the source prompt's own output.
    item = next(i for i in seen if i["kind"] == "counterfactual")
    a, b = item["lang"].split("-")
    saved = CounterfactualPatch.load(run.arrays_path(f"cf_{a}_{b}_{item['fact_id']}"))
    assert saved.facts[1] == item["fact_id"] and saved.facts[0] != saved.facts[1]
    from analysis.lens import reading_tokens
    from mlake_core.editing.base import locate_prompt

    view = mlake_v2411.fact(saved.facts[0]).views[a]
    loc = locate_prompt(adapter, view, ctx.template, "question")
    lead, _ = reading_tokens(adapter, loc, view.question.target.text, [])
    own = adapter.forward(adapter.batch([[*loc.prompt_ids, *lead]]))[0, -1].float().softmax(-1)
    np.testing.assert_allclose(
        saved.prob[1, -1], own[list(saved.tokens)].numpy(), rtol=1e-3, atol=1e-6
    )
    edits = [i for i in seen if i["kind"] == "edit"]
    assert 0 < len(edits) <= 2 * len(langs)
    assert sum(result.edits["n"].values()) + sum(result.edits["n_failed"].values()) == len(edits)
    # Resumed after losing the summary: nothing recomputed, the same result.
    run.json_path("summary").unlink()
    again: list = []
    resumed, _ = patching_stage(
        ctx, config, knowledge=knowledge, method_config=ft, on_item=again.append
    )
    assert again == [] and resumed.to_dict() == result.to_dict()
    # Read back: nothing written, and PatchingResult.load gives the same.
    writes: list[Path] = []
    real = store._atomic_write
    monkeypatch.setattr(store, "_atomic_write", lambda p, w: (writes.append(p), real(p, w)))
    patching_stage(ctx, config, knowledge=knowledge, method_config=ft)
    assert writes == []
    assert PatchingResult.load(run.path).to_dict() == result.to_dict()
