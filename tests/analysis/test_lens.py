"""The latent-language lens (:mod:`analysis.lens`): at the last layer it reads the model's own
probabilities, batched equals unbatched, the backends agree, the per-fact definitions on
built cases, and the stage saves, resumes and reads back without writing."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from analysis.lens import POSITIONS, FactLens, LensConfig, LensResult, lens_prompts, summarize_lens
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("lens") / "llama")


def _items(adapter) -> list[tuple[list[int], int, list[int]]]:
    texts = ["The capital of France is", "法国的首都是巴黎", "Hi there, you", "フランスの首都は"]
    return [(adapter.encode(t), 1, [5, 17, 42]) for t in texts]


def test_the_last_layer_reads_the_model_output(tiny: Path) -> None:
    adapter = load_adapter(str(tiny), "tlens", device="cpu")
    items = _items(adapter)
    lensed = lens_prompts(adapter, items, batch_size=4)
    for (ids, subject_last, answers), (prob, rank) in zip(items, lensed, strict=True):
        assert prob.shape == rank.shape == (len(POSITIONS), adapter.n_layers, len(answers))
        logits = adapter.forward(adapter.batch([ids]))[0].float()
        for i, pos in enumerate((subject_last, len(ids) - 1)):
            p = logits[pos].softmax(-1)
            np.testing.assert_allclose(prob[i, -1], p[answers].numpy(), rtol=1e-4, atol=1e-6)
            expected = [(p > p[a]).sum().item() for a in answers]
            assert rank[i, -1].tolist() == expected


def test_batched_equals_unbatched_and_backends_agree(tiny: Path) -> None:
    tlens = load_adapter(str(tiny), "tlens", device="cpu")
    items = _items(tlens)
    batched = lens_prompts(tlens, items, batch_size=4)
    single = lens_prompts(tlens, items, batch_size=1)
    other = lens_prompts(load_adapter(str(tiny), "nnsight", device="cpu"), items, batch_size=3)
    for (pb, rb), (ps, rs), (po, ro) in zip(batched, single, other, strict=True):
        np.testing.assert_allclose(pb, ps, rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(pb, po, rtol=1e-4, atol=1e-7)
        assert np.abs(rb - rs).max() <= 1 and np.abs(rb - ro).max() <= 1  # float ties


def _built(ranks_last: dict[str, list[int]], ids: dict[str, int], layers: int = 4) -> FactLens:
    langs = list(ranks_last)
    rank = np.full((2, layers, len(langs)), 100)
    prob = np.zeros((2, layers, len(langs)))
    for j, lang in enumerate(langs):
        rank[1, :, j] = ranks_last[lang]
        prob[1, :, j] = [1.0 / (1 + r) for r in ranks_last[lang]]
    return FactLens(prob, rank, [ids[k] for k in langs], langs, [3, 9])


def test_emergence_and_the_first_language() -> None:
    # Prompt in zh: the English answer is decodable from layer 1, the Chinese one from 2.
    lens = _built(
        {"en": [50, 3, 0, 5], "zh": [90, 40, 2, 0], "fr": [99, 99, 99, 99]},
        {"en": 10, "zh": 20, "fr": 30},
    )
    assert lens.emergence_layer("zh", 10) == 2
    assert lens.first_language("zh", 10) == "en"
    assert lens.emergence_layer("zh", 1) == 3  # top-1: only the last layer
    assert lens.first_language("fr", 10) == "en"
    # English written with the prompt language's token cannot be told apart: left out.
    same = _built({"en": [0, 0, 0, 0], "fr": [40, 5, 0, 0]}, {"en": 7, "fr": 7})
    assert same.distinct("fr") == [False, True]
    assert same.first_language("fr", 10) == "fr"
    never = _built({"en": [50, 50, 50, 50], "zh": [99, 99, 99, 99]}, {"en": 1, "zh": 2})
    assert never.emergence_layer("zh", 10) is None and never.first_language("zh", 10) is None


def test_a_tie_goes_to_the_higher_probability() -> None:
    lens = _built({"en": [5, 0], "de": [2, 0]}, {"en": 1, "de": 2}, layers=2)
    assert lens.first_language("de", 10) == "de"  # both at layer 0; de ranks higher
    lens.prob[1, 0, 0] = 0.9
    assert lens.first_language("de", 10) == "en"


def test_the_summary_counts_latent_english_on_distinct_tokens_only() -> None:
    distinct = _built({"en": [1, 0, 0, 0], "zh": [99, 20, 5, 0]}, {"en": 1, "zh": 2})
    shared = _built({"en": [0, 0, 0, 0], "zh": [0, 0, 0, 0]}, {"en": 3, "zh": 3})
    summary = summarize_lens("zh", [distinct, shared], ["en", "zh"], top_k=10)
    assert summary.n_facts == 2 and summary.n_english_distinct == 1
    assert summary.latent_english == pytest.approx(distinct.prob[1, :, 0].tolist())
    assert summary.emergence == [2, 0] and summary.never == 0
    assert summary.first_language == {"en": 1, "zh": 1}
    assert summary.median_emergence == 1.0
    assert np.array(summary.decodable["last"]).shape == (4, 2)
    assert summarize_lens("en", [distinct], ["en", "zh"], 10).latent_english == []


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"form": "essay"}])
def test_bad_settings(bad: dict) -> None:
    with pytest.raises(ConfigError):
        LensConfig(**bad)


@pytest.mark.slow
def test_the_stage_saves_resumes_and_reads_back(
    micro_tiny: Path, mlake_v2411, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.lens import lens_stage
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
    seen: list[tuple[str, int]] = []
    result, run = lens_stage(
        ctx,
        LensConfig(),
        knowledge=knowledge,
        on_fact=lambda i: seen.append((i["lang"], i["fact_id"])),
    )
    for s in result.summaries:
        known = len(knowledge.known(s.lang) & set(ctx.fact_ids))
        skipped = sum(v for k, v in result.skipped.items() if k.startswith(f"{s.lang}:"))
        assert s.n_facts + skipped == len(ctx.fact_ids) and s.n_facts == known
        assert np.array(s.mean_prob["last"]).shape == (adapter.n_layers, 3)
    assert len(seen) == sum(s.n_facts for s in result.summaries)
    # The model answers these facts: read where the answer starts (after a bare space in zh),
    # each own-language answer is decodable by the last layer.  Read before the space, the
    # Chinese answers were never decodable.
    assert all(s.never == 0 for s in result.summaries), [
        (s.lang, s.never) for s in result.summaries
    ]
    # Every saved lens reads the model's own answer probability at its last layer.
    lang, fact_id = seen[0]
    saved = FactLens.load(run.arrays_path(f"lens_{lang}_{fact_id}"))
    assert saved.answer_langs == ["en", "zh", "fr"]
    for answer in saved.answer_ids:
        assert adapter.tokenizer.decode([answer]).strip()  # a token with content
    # Resumed after losing the summary: nothing recomputed, the same result.
    run.json_path("summary").unlink()
    again: list = []
    resumed, _ = lens_stage(ctx, LensConfig(), knowledge=knowledge, on_fact=again.append)
    assert again == [] and resumed.to_dict() == result.to_dict()
    # Read back: nothing written, and LensResult.load gives the same.
    writes: list[Path] = []
    real = store._atomic_write
    monkeypatch.setattr(store, "_atomic_write", lambda p, w: (writes.append(p), real(p, w)))
    lens_stage(ctx, LensConfig(), knowledge=knowledge)
    assert writes == []
    assert LensResult.load(run.path).to_dict() == result.to_dict()


_VOCAB = {0: " ", 1: "康", 2: "奈尔", 3: " Cornell", 4: "Cornell", 5: " University"}
_ENCODE = {
    " 康奈尔": [0, 1, 2],
    "康奈尔": [1, 2],
    " Cornell University": [3, 5],
    "Cornell University": [4, 5],
}


class _Tokenizer:
    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": _ENCODE[text]}

    def decode(self, ids: list[int]) -> str:
        return "".join(_VOCAB[i] for i in ids)


@pytest.mark.parametrize(
    ("own", "lead", "tokens"),
    [
        ("康奈尔", (0,), [1, 4]),  # zh prompt: read after the space; English without one
        ("Cornell University", (), [1, 3]),  # en prompt: read after "A:"; " Cornell"
    ],
)
def test_where_the_lens_reads(own: str, lead: tuple, tokens: list) -> None:
    from types import SimpleNamespace

    from analysis.lens import reading_tokens
    from mlake_core.editing.base import LocatedPrompt

    adapter = SimpleNamespace(tokenizer=_Tokenizer())
    located = LocatedPrompt("fact 0 [zh] question form", "Q: ?\nA:", " ", (9,), "s", (0,))
    got = reading_tokens(adapter, located, own, ["康奈尔", "Cornell University"])  # type: ignore[arg-type]
    assert got == (lead, tokens)
