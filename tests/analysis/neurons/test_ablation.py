"""Ablation checks and the ablation matrix on the micro mlake-tiny, against the same
interventions done by hand: zeroing input columns of the MLP down-projection (neurons) or of
the attention output projection (heads), or a per-call patch (mean ablation)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from analysis.neurons.ablation import (
    ablated_probability,
    ablation_check,
    ablation_matrix,
    random_like,
    unit_patches,
)
from analysis.neurons.attribution import (
    AttributionConfig,
    AttributionContext,
    answer_probability,
    important_units,
    integrated_gradients,
)
from mlake_core.metrics.knowledge import KnowledgeConfig, measure_knowledge
from mlake_core.models import Patch
from mlake_core.models.prompting import get_template

pytestmark = pytest.mark.slow  # trains the micro model (session-cached)

D_MLP = 128
QA = get_template("qa")


def _seq(prompt) -> list[int]:
    return [*prompt.prompt_ids, *prompt.answer_ids[:-1]]


@contextmanager
def _zeroed(adapter, units: np.ndarray, unit: str = "neuron") -> Iterator[None]:
    """The units' input columns of the projection after them set to zero (Llama: ``Linear``,
    ``[out, in]``); restored afterwards."""
    n = D_MLP if unit == "neuron" else adapter.info.n_heads
    saved = []
    with torch.no_grad():
        for layer in np.unique(np.asarray(units, dtype=np.int64) // n):
            idx = np.asarray(units)[np.asarray(units) // n == layer] % n
            if unit == "neuron":
                weight = adapter.mlp_down(int(layer))[0]
                cols = idx.tolist()
            else:
                path = adapter.spec.sites["attn_z"].path(int(layer))
                weight = adapter.hf_module(path).weight
                d = adapter.info.d_head
                cols = [h * d + i for h in idx.tolist() for i in range(d)]
            saved.append((weight, weight.detach().clone()))
            weight[:, cols] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, value in saved:
                weight.copy_(value)


def _p(adapter, prompt) -> float:
    logits = adapter.forward(adapter.batch([_seq(prompt)]))
    return float(answer_probability(logits, prompt)[0])


@pytest.fixture(scope="module")
def adapter(micro_adapters):
    return micro_adapters["tlens"]


@pytest.fixture(scope="module")
def prompt(micro_prompts):
    return micro_prompts[min(micro_prompts)]


@pytest.fixture(scope="module")
def top_units(adapter, prompt) -> np.ndarray:
    """The prompt's 6 best neurons by integrated gradients."""
    context = AttributionContext(torch.Generator().manual_seed(0))
    scores = integrated_gradients(adapter, prompt, AttributionConfig(steps=8), context).scores
    units = important_units(scores["neuron"], AttributionConfig(rule="topk", top_k=6))
    assert len(units) == 6
    return units


def test_ablation_check_equals_zeroed_weights(adapter, prompt, top_units):
    p_clean = _p(adapter, prompt)
    check = ablation_check(
        adapter, prompt, top_units, "neuron", n_random=3, generator=np.random.default_rng(4)
    )
    assert check["n_units"] == 6
    # Two float32 paths to one probability (the check's pass, a plain forward): they agree to
    # float rounding, which differs by CPU (6e-7 on an AVX2-only EPYC), so 1e-6 as below.
    assert check["p_clean"] == pytest.approx(p_clean, abs=1e-6)
    with _zeroed(adapter, top_units):
        want = _p(adapter, prompt)
    assert check["p_ablated"] == pytest.approx(want, abs=1e-6)
    # The random sets: the same draws, ablated by hand.
    rng = np.random.default_rng(4)
    randoms = []
    for _ in range(3):
        other = random_like(top_units, D_MLP, rng, adapter.n_layers)
        with _zeroed(adapter, other):
            randoms.append(_p(adapter, prompt))
    assert check["p_random"] == pytest.approx(np.mean(randoms), abs=1e-6)
    # The attributed neurons carry the answer; random ones of the same layers barely do.
    assert p_clean - check["p_ablated"] > 0.05
    assert p_clean - check["p_ablated"] > 3 * abs(p_clean - check["p_random"])
    assert _p(adapter, prompt) == p_clean  # nothing stays ablated


def test_ablation_check_without_units(adapter, prompt):
    check = ablation_check(adapter, prompt, np.zeros(0, dtype=np.int64), "neuron", n_random=3,
                           generator=np.random.default_rng(0))  # fmt: skip
    assert check["n_units"] == 0 and check["p_ablated"] == check["p_clean"]
    assert math.isnan(check["p_random"])
    assert check["p_clean"] == pytest.approx(_p(adapter, prompt), abs=1e-6)  # as above


def test_mean_ablation_equals_a_patch(adapter, prompt):
    units = np.array([D_MLP + 3, D_MLP + 40, D_MLP + 77])  # layer 1 (the last)
    mean = np.random.default_rng(0).normal(size=(2, D_MLP))
    got = ablated_probability(
        adapter, prompt, unit_patches(adapter, units, "neuron", mode="mean", mean=mean)
    )
    batch = adapter.batch([_seq(prompt)])
    _, cache = adapter.run_with_cache(batch, ["mlp_post.1"])
    values = cache["mlp_post.1"][0].clone()
    values[:, [3, 40, 77]] = torch.as_tensor(mean[1, [3, 40, 77]], dtype=values.dtype)
    n = values.shape[0]
    patch = Patch("mlp_post.1", torch.zeros(n, dtype=torch.long), torch.arange(n), values)
    want = float(answer_probability(adapter.run_with_patches(batch, [patch]), prompt)[0])
    assert got == pytest.approx(want, abs=1e-6)
    assert abs(got - _p(adapter, prompt)) > 1e-4


def test_head_ablation_check_equals_zeroed_output_projection(adapter, prompt):
    heads = np.array([1, 2])  # layer 0 head 1, layer 1 head 0 (2 heads a layer)
    check = ablation_check(adapter, prompt, heads, "head", n_random=2,
                           generator=np.random.default_rng(0))  # fmt: skip
    with _zeroed(adapter, heads, "head"):
        want = _p(adapter, prompt)
    assert check["p_ablated"] == pytest.approx(want, abs=1e-6)
    assert abs(check["p_ablated"] - check["p_clean"]) > 1e-3
    # The only other heads: layer 0 head 0, layer 1 head 1.
    with _zeroed(adapter, np.array([0, 3]), "head"):
        assert check["p_random"] == pytest.approx(_p(adapter, prompt), abs=1e-6)


def _accuracy(adapter, views) -> dict[str, float]:
    result = measure_knowledge(adapter, views, QA, KnowledgeConfig(forms=("question",), mcqa=False))
    t = result.table
    return {
        str(lang): float((g["greedy_match"] == "original").mean()) for lang, g in t.groupby("lang")
    }


@pytest.fixture(scope="module")
def matrix_views(micro_tiny, mlake_v2411, adapter):
    from mlake_core.models.mlake_tiny import read_metadata

    facts = read_metadata(micro_tiny)["fact_ids"][:3]
    views = {lang: [mlake_v2411.fact(f).views[lang] for f in facts] for lang in ("en", "zh")}
    assert _accuracy(adapter, _flat(views)) == {"en": 1.0, "zh": 1.0}  # known before
    return views


def _flat(views):
    return [v for vs in views.values() for v in vs]


def test_ablation_matrix_of_heads_by_hand(adapter, matrix_views):
    # en: nothing specific; zh: both heads of layer 0; fr: head 0 of layer 1.
    specific = {"en": np.zeros(0, dtype=np.int64), "zh": np.array([0, 1]), "fr": np.array([2])}
    rows = ablation_matrix(
        adapter, matrix_views, QA, specific, "head", generator=np.random.default_rng(9)
    )
    assert [(r["ablated_lang"], r["measured_lang"]) for r in rows] == [
        ("en", "en"), ("en", "zh"), ("zh", "en"), ("zh", "zh"), ("fr", "en"), ("fr", "zh"),
    ]  # fmt: skip
    assert [r["n_units"] for r in rows] == [0, 0, 2, 2, 1, 1]
    assert all(r["n_facts"] == 3 for r in rows)
    for r in rows[:2]:  # no units: nothing is lost
        assert (r["accuracy_after"], r["drop"], r["drop_random"]) == (1.0, 0.0, 0.0)
    # zh's random control is empty (layer 0 has no other heads); fr's is the other head of
    # layer 1.  By hand: zero the heads' columns of the output projection.
    with _zeroed(adapter, specific["zh"], "head"):
        zh = _accuracy(adapter, _flat(matrix_views))
    with _zeroed(adapter, specific["fr"], "head"):
        fr = _accuracy(adapter, _flat(matrix_views))
    with _zeroed(adapter, np.array([3]), "head"):
        fr_random = _accuracy(adapter, _flat(matrix_views))
    assert zh == {"en": 0.0, "zh": 0.0}  # the micro model needs its first layer's attention
    for r in rows[2:]:
        lang = r["measured_lang"]
        want, want_random = (
            (zh[lang], 1.0) if r["ablated_lang"] == "zh" else (fr[lang], fr_random[lang])
        )
        assert r["accuracy_after"] == pytest.approx(want)
        assert r["drop"] == pytest.approx(1.0 - want)
        assert r["accuracy_after_random"] == pytest.approx(want_random)
        assert r["drop_random"] == pytest.approx(1.0 - want_random)


def test_ablation_matrix_of_neurons_by_hand(adapter, matrix_views, top_units):
    everything = np.arange(D_MLP, 2 * D_MLP)  # every neuron of layer 1
    specific = {"zh": everything, "de": top_units}
    rows = ablation_matrix(
        adapter, matrix_views, QA, specific, "neuron", generator=np.random.default_rng(2)
    )
    rng = np.random.default_rng(2)
    assert random_like(everything, D_MLP, rng, 2).size == 0  # no other neuron in layer 1
    control = random_like(top_units, D_MLP, rng, 2)
    by_hand = {}
    for name, units in (("zh", everything), ("de", top_units), ("random", control)):
        with _zeroed(adapter, units):
            by_hand[name] = _accuracy(adapter, _flat(matrix_views))
    for r in rows:
        lang = r["measured_lang"]
        want = by_hand[r["ablated_lang"]][lang]
        want_random = 1.0 if r["ablated_lang"] == "zh" else by_hand["random"][lang]
        assert r["n_units"] == len(specific[r["ablated_lang"]])
        assert r["accuracy_after"] == pytest.approx(want)
        assert r["accuracy_after_random"] == pytest.approx(want_random)
        assert r["drop"] == pytest.approx(1.0 - want)
    # The matrix leaves the model as it was.
    assert _accuracy(adapter, _flat(matrix_views)) == {"en": 1.0, "zh": 1.0}
