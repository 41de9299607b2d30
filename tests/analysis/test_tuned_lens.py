"""The tuned lens (:mod:`analysis.tuned_lens`): identity translators are the logit lens,
fitted translators lower the held-out KL to the final layer below the logit lens's, the
cache is keyed and reused, and the lens reads through it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.lens import lens_prompts
from analysis.tuned_lens import (
    TunedLens,
    TunedLensConfig,
    cache_path,
    collect_states,
    fit_texts,
    layer_kl,
    load_or_fit,
)
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.tiny import build_tiny_model

_TEXTS = [
    "The capital of France is Paris.",
    "Berlin is the capital of Germany.",
    "法国的首都是巴黎。",
    "フランスの首都はパリです。",
    "La capitale de la France est Paris.",
    "Die Hauptstadt von Deutschland ist Berlin.",
    "Who wrote Hamlet? Shakespeare.",
    "Wer schrieb Hamlet? Shakespeare.",
]


@pytest.fixture(scope="module")
def adapter(tmp_path_factory: pytest.TempPathFactory):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("tuned") / "llama")
    return load_adapter(str(path), "tlens", device="cpu")


def test_identity_translators_are_the_logit_lens(adapter) -> None:
    items = [(adapter.encode(t), 1, [3, 9, 27]) for t in _TEXTS[:3]]
    identity = TunedLens.identity(adapter.n_layers, adapter.d_model)
    logit = lens_prompts(adapter, items, 2)
    tuned = lens_prompts(adapter, items, 2, identity.decoder(adapter))
    for (pl, rl), (pt, rt) in zip(logit, tuned, strict=True):
        np.testing.assert_allclose(pl, pt, rtol=1e-5, atol=1e-9)
        np.testing.assert_array_equal(rl, rt)
    # A translator that is not the identity reads something else (the check can fail).
    moved = TunedLens.identity(adapter.n_layers, adapter.d_model)
    moved.bias[0] = torch.randn(adapter.d_model) * 10
    other = lens_prompts(adapter, items, 2, moved.decoder(adapter))
    assert not np.allclose(other[0][0][:, 0], logit[0][0][:, 0])
    np.testing.assert_allclose(other[0][0][:, -1], logit[0][0][:, -1], rtol=1e-5)  # last layer


def test_the_logit_lens_kl_is_zero_at_the_last_layer(adapter) -> None:
    states = collect_states(adapter, _TEXTS[:2])
    assert states.shape[1:] == (adapter.n_layers, adapter.d_model)
    assert states.shape[0] == sum(len(adapter.encode(t)) for t in _TEXTS[:2])
    kl = layer_kl(adapter, TunedLens.identity(adapter.n_layers, adapter.d_model), states)
    assert float(kl[-1]) == pytest.approx(0.0, abs=1e-5)
    assert (kl[:-1] > 1e-4).all()


def test_fitted_translators_lower_the_held_out_kl(
    micro_tiny: Path, mlake_v2411, tmp_path: Path
) -> None:
    """On a model trained on MLaKE (micro mlake-tiny), fitted on the text of facts it was not
    trained on, validated on held-out facts: every layer but the last gets closer to the
    final distribution than the logit lens gets."""
    from mlake_core.models.mlake_tiny import read_metadata

    model = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    trained = set(meta["fact_ids"])
    others = [f.fact_id for f in mlake_v2411.facts if f.fact_id not in trained]
    config = TunedLensConfig(steps=60, tokens_per_step=256, max_facts=60)
    fit, held = fit_texts(mlake_v2411, others, ("en", "zh", "ja", "fr", "de"), config)
    lens = load_or_fit(model, {"m": "micro"}, fit, held, config, data_key="d", root=tmp_path)
    v = lens.validation
    assert len(v["tuned"]) == len(v["logit"]) == model.n_layers
    assert all(t < 0.9 * lg for t, lg in zip(v["tuned"][:-1], v["logit"][:-1], strict=True)), v
    assert v["tuned"][-1] == pytest.approx(v["logit"][-1], abs=1e-5) == 0.0  # the last: identity
    assert float(lens.weight[-1].abs().max()) == 0.0 and float(lens.bias[-1].abs().max()) == 0.0
    assert lens.info["fit_facts"] == 48 and lens.info["held_facts"] == 12


def test_the_cache_is_keyed_and_reused(adapter, tmp_path: Path) -> None:
    config = TunedLensConfig(steps=3, tokens_per_step=16)
    fit = {i: [t] for i, t in enumerate(_TEXTS[:6])}
    held = {6: [_TEXTS[6]], 7: [_TEXTS[7]]}
    logs: list[str] = []
    lens = load_or_fit(
        adapter, {"m": "tiny"}, fit, held, config, data_key="d", root=tmp_path, log=logs.append
    )
    assert any("fitting on 6 facts" in line for line in logs)
    assert lens.info["cached"] is False and Path(lens.info["path"]).is_file()
    # Reused: the same key reads the same translators back, without fitting.
    again = load_or_fit(adapter, {"m": "tiny"}, fit, held, config, data_key="d", root=tmp_path)
    assert again.info["cached"] is True and again.key == lens.key
    torch.testing.assert_close(again.weight, lens.weight)
    assert again.report() == lens.report()
    # Keyed: other settings, data or model give another entry.
    assert cache_path(lens.key, tmp_path) == Path(lens.info["path"])
    other = load_or_fit(
        adapter, {"m": "tiny"}, fit, held, TunedLensConfig(steps=1), data_key="d", root=tmp_path
    )
    assert other.key != lens.key and other.info["cached"] is False
    elsewhere = load_or_fit(
        adapter, {"m": "tiny"}, fit, held, TunedLensConfig(steps=1), data_key="e", root=tmp_path
    )
    assert elsewhere.key != other.key
    model = load_or_fit(
        adapter, {"m": "other"}, fit, held, TunedLensConfig(steps=1), data_key="d", root=tmp_path
    )
    assert model.key not in (other.key, elsewhere.key)
    # A corrupt entry is fitted again, not read.
    Path(lens.info["path"]).write_bytes(b"not a lens")
    redone = load_or_fit(adapter, {"m": "tiny"}, fit, held, config, data_key="d", root=tmp_path)
    assert redone.info["cached"] is False


def test_the_split_is_by_fact_seeded_and_disjoint(mlake_v2411) -> None:
    ids = [f.fact_id for f in mlake_v2411.facts][:50]
    config = TunedLensConfig(max_facts=40, holdout=0.25)
    fit, held = fit_texts(mlake_v2411, ids, ("en", "zh"), config)
    assert len(fit) == 30 and len(held) == 10 and not set(fit) & set(held)
    assert set(fit) | set(held) <= set(ids)
    assert all(1 <= len(v) <= 4 for v in fit.values())  # question and cloze, two languages
    assert fit_texts(mlake_v2411, ids, ("en", "zh"), config) == (fit, held)
    with pytest.raises(ConfigError):
        fit_texts(mlake_v2411, ids[:1], ("en",), config)
    with pytest.raises(ConfigError):
        TunedLensConfig(holdout=1.0)
