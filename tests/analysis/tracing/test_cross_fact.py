"""Issue 25 item 3: restorations of several facts share forward passes
(:func:`~analysis.tracing.causal.trace_prompts`), with each fact's numbers equal to tracing it
alone, on every architecture and both backends; rows of prompts of different lengths and
cached prefixes meet in one pass (the shorter prefixes left-padded, a row without one beside
rows with one)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.tracing.causal import PromptToTrace, TraceConfig, trace_prompt, trace_prompts
from mlake_core.models import BACKENDS, load_adapter
from mlake_core.models.tiny import TINY_ARCHITECTURES, TinySize, build_tiny_model

SIZE = TinySize(n_layers=3)

#: (prompt, subject positions): A and C have 9 tokens' worth of text, B is longer; A's
#: subject starts the prompt (its first rows continue no cache), B's and C's do not.
TEXTS = (
    ("Paris is the capital of the country", [0, 1]),
    ("The old capital of France is the city of", [3, 4]),
    ("The city of Paris is in France and", [2, 3]),
)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("cross_fact")
    return {
        arch: build_tiny_model(arch, root / arch, seed=3, size=SIZE) for arch in TINY_ARCHITECTURES
    }


def _prompts(adapter) -> list[PromptToTrace]:
    out = []
    for i, (text, subject) in enumerate(TEXTS):
        ids = adapter.encode(text)
        out.append(PromptToTrace(ids, subject, 7 + i, torch.Generator().manual_seed(100 + i)))
    return out


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["prefix", "whole"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_facts_sharing_passes_equal_each_fact_alone(models, arch, backend, prefix_cache) -> None:
    adapter = load_adapter(str(models[arch]), backend, device="cpu")
    config = TraceConfig(n_samples=2, window=2)
    prompts = _prompts(adapter)
    together = trace_prompts(adapter, prompts, config, noise_std=0.5, prefix_cache=prefix_cache)
    alone = [
        trace_prompt(
            adapter,
            p.prompt_ids,
            p.subject_positions,
            p.answer_id,
            config,
            torch.Generator().manual_seed(100 + i),
            noise_std=0.5,
            prefix_cache=prefix_cache,
        )
        for i, p in enumerate(prompts)
    ]
    for one, both in zip(alone, together, strict=True):
        assert both.p_clean == pytest.approx(one.p_clean, abs=1e-6)
        assert both.p_corrupt == pytest.approx(one.p_corrupt, abs=1e-6)
        for kind in one.scores:
            np.testing.assert_allclose(both.scores[kind], one.scores[kind], atol=1e-6)
        assert both.rows == one.rows
    # Passes were shared: fewer in all than the facts alone ran, each fact counting its share.
    assert sum(t.forward_passes for t in together) < sum(t.forward_passes for t in alone)
    # The comparison could fail: restorations move the probability.
    assert max(np.abs(t.effects("resid")).max() for t in alone) > 1e-4


def test_small_passes_still_equal(models) -> None:
    """A row budget that splits every width group (max_rows) keeps the numbers."""
    adapter = load_adapter(str(models["llama"]), "tlens", device="cpu")
    config = TraceConfig(n_samples=2, window=2)
    wide = trace_prompts(adapter, _prompts(adapter), config, noise_std=0.5)
    narrow = trace_prompts(  # fresh generators: the same noise
        adapter, _prompts(adapter), TraceConfig(n_samples=2, window=2, max_rows=6), noise_std=0.5
    )
    for a, b in zip(wide, narrow, strict=True):
        for kind in a.scores:
            np.testing.assert_allclose(a.scores[kind], b.scores[kind], atol=1e-6)
    assert sum(t.forward_passes for t in narrow) > sum(t.forward_passes for t in wide)
