"""Each editing method on the micro mlake-tiny: the edit does what its algebra says, raises
the new answer, leaves the model unchanged until applied, and restores exactly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlake_core.editing import EditContext, get_method, make_request
from mlake_core.editing.covariance import key_second_moment, mlake_corpus
from mlake_core.editing.delta import teacher_forced
from mlake_core.editing.layers import default_layers, resolve_layers
from mlake_core.editing.memit import MemitConfig
from mlake_core.errors import ConfigError
from mlake_core.metrics.knowledge import score_sequences
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template

pytestmark = pytest.mark.slow
QA = get_template("qa")


@pytest.fixture(scope="module")
def requests_(adapter, micro_tiny: Path, mlake_v2411):
    meta = read_metadata(micro_tiny)
    assert meta is not None
    return [
        make_request(adapter, mlake_v2411.fact(i).views["en"], QA) for i in meta["fact_ids"][:3]
    ]


@pytest.fixture(scope="module")
def context(adapter, mlake_v2411):
    docs = mlake_corpus(mlake_v2411)[:400]
    moments: dict[int, torch.Tensor] = {}

    def second_moment(layer: int) -> torch.Tensor:
        if layer not in moments:
            moments[layer] = key_second_moment(adapter, layer, docs, n_tokens=4000)[0]
        return moments[layer]

    return EditContext(torch.Generator().manual_seed(0), second_moment, {})


def _weights(adapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter.hf_module("model").named_parameters()}


def _same(adapter, saved) -> bool:
    return all(torch.equal(saved[n], p) for n, p in adapter.hf_module("model").named_parameters())


def _logp_new(adapter, requests) -> list[float]:
    pairs = [(list(r.prompt_ids), list(r.target_new_ids)) for r in requests]
    return [s.logp for s in score_sequences(adapter, pairs)]


def _at_subject(adapter, requests, site: str) -> torch.Tensor:
    batch, _ = teacher_forced(adapter, requests)
    _, cache = adapter.run_with_cache(batch, [site])
    rows = torch.arange(len(requests))
    return cache[site][rows, torch.tensor([r.subject_last for r in requests])].double()


def test_rome_writes_v_star_at_k_star(adapter, requests_, context) -> None:
    """ROME's rank-one update maps the subject key to the optimised value exactly, and the
    optimised value makes the new answer more likely."""
    entry = get_method("rome")
    req = requests_[0]
    saved = _weights(adapter)
    before = _at_subject(adapter, [req], "mlp_out.0")
    p0 = _logp_new(adapter, [req])[0]
    result = entry.fn(adapter, [req], entry.config_cls(layer=0, steps=20), context)
    assert _same(adapter, saved)
    assert list(result.deltas) == ["model.layers.0.mlp.down_proj.weight"]
    assert torch.linalg.matrix_rank(result.deltas["model.layers.0.mlp.down_proj.weight"]) == 1
    with result.applied(adapter):
        after = _at_subject(adapter, [req], "mlp_out.0")
        p1 = _logp_new(adapter, [req])[0]
    assert _same(adapter, saved)
    # mlp_out changed by exactly the optimised delta (float32 weights: relative 1e-4).
    moved = float((after - before).norm())
    expected = result.info["delta_norm_ratio"] * float(before.norm())
    assert moved == pytest.approx(expected, rel=1e-3)
    assert p1 > p0 + 1.0


def test_memit_edits_a_batch(adapter, requests_, context) -> None:
    entry = get_method("memit")
    assert entry.batched
    saved = _weights(adapter)
    p0 = _logp_new(adapter, requests_)
    result = entry.fn(adapter, requests_, MemitConfig(layers="auto", steps=20), context)
    assert _same(adapter, saved)
    assert sorted(result.deltas) == ["model.layers.0.mlp.down_proj.weight"]
    # Rank at most the number of requests.
    assert all(torch.linalg.matrix_rank(d.double(), rtol=1e-4) <= 3 for d in result.deltas.values())
    norms = result.info["residual_norms"]
    assert len(norms) == 2 and norms[-1] < 0.75 * norms[0]
    with result.applied(adapter):
        p1 = _logp_new(adapter, requests_)
    assert _same(adapter, saved)
    assert sum(p1) / 3 > sum(p0) / 3 + 1.0


def test_memit_single_layer_with_light_statistics_hits_the_target(
    adapter, requests_, context
) -> None:
    """With one layer, a small statistics weight and the edit prompt's own key, the
    least-squares update reaches the target residual almost exactly (hand-checkable limit of
    MEMIT's normal equations; with context-averaged keys it maps the average instead)."""
    config = MemitConfig(layers="0", steps=10, mom2_weight=1e-6, contexts="none")
    result = get_method("memit").fn(adapter, requests_[:1], config, context)
    before, after = result.info["residual_norms"]
    assert after < 1e-3 * max(before, 1e-6)


def test_ft_and_ike(adapter, requests_, context) -> None:
    ft = get_method("ft")
    saved = _weights(adapter)
    p0 = _logp_new(adapter, requests_[:1])[0]
    result = ft.fn(adapter, requests_[:1], ft.config_cls(layer=1), context)  # last layer: fine
    rel = float(result.deltas["model.layers.1.mlp.down_proj.weight"].norm())
    w = adapter.mlp_down(1)[0]
    assert rel <= ft.config_cls().max_rel_norm * float(w.detach().norm()) * (
        1 + 1e-4
    )  # the norm bound
    with result.applied(adapter):
        assert _logp_new(adapter, requests_[:1])[0] > p0 + 1.0
    assert _same(adapter, saved)
    ike = get_method("ike")
    demos = EditContext(torch.Generator().manual_seed(0), None, {"en": [("A is B.", "A?", "B")]})
    res = ike.fn(adapter, requests_[:1], ike.config_cls(n_demonstrations=1), demos)
    assert not res.deltas and requests_[0].statement_new in res.prefix and "A is B." in res.prefix


def test_layer_specs(adapter, requests_, context) -> None:
    assert adapter.n_layers == 2
    assert default_layers(adapter) == (0,)  # the last layer is never a subject-token edit
    assert resolve_layers(adapter, "0") == (0,)
    assert resolve_layers(adapter, [-2]) == (0,)
    with pytest.raises(ConfigError, match="--layer 1: memit writes at the subject token"):
        resolve_layers(adapter, "0-1")
    with pytest.raises(ConfigError, match="--layer 1: rome"):
        get_method("rome").fn(
            adapter, requests_[:1], get_method("rome").config_cls(layer=1), context
        )
    with pytest.raises(ConfigError, match="--layer 2: the model has 2 layers"):
        resolve_layers(adapter, "0-7")
    with pytest.raises(ConfigError, match="increasing"):
        resolve_layers(adapter, "0,0")
    with pytest.raises(ConfigError, match="expected 'auto'"):
        resolve_layers(adapter, "middle")
    with pytest.raises(ConfigError, match="statistics"):
        get_method("memit").fn(
            adapter, requests_[:1], MemitConfig(), EditContext(torch.Generator(), None, {})
        )


@pytest.mark.parametrize("method", ["rome", "memit"])
def test_locality_on_untouched_facts(
    adapter, requests_, context, micro_tiny, mlake_v2411, method
) -> None:
    """Facts the edit does not touch keep their answers (greedy, question form)."""
    from mlake_core.metrics.knowledge import KnowledgeConfig, measure_knowledge

    meta = read_metadata(micro_tiny)
    assert meta is not None
    others = [
        mlake_v2411.fact(i).views[lang] for i in meta["fact_ids"][1:] for lang in ("en", "zh")
    ]
    cfg = KnowledgeConfig(forms=("question",), mcqa=False)
    before = measure_knowledge(adapter, others, QA, cfg).table["greedy_text"].tolist()
    entry = get_method(method)
    result = entry.fn(adapter, requests_[:1], entry.config_cls(), context)
    with result.applied(adapter):
        after = measure_knowledge(adapter, others, QA, cfg).table["greedy_text"].tolist()
    kept = sum(a == b for a, b in zip(before, after, strict=True)) / len(before)
    assert kept >= 0.9
