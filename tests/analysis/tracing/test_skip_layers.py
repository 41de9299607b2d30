"""Issue 25: tracing rows that start at their lowest restored block (from the corrupted run's
residual stream) and read only the answer's log-probability equal the whole-stack path, on
every architecture and both backends."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.tracing.causal import TraceConfig, plan_passes, trace_prompt
from mlake_core.models import BACKENDS, load_adapter
from mlake_core.models.tiny import TINY_ARCHITECTURES, TinySize, build_tiny_model

#: Four blocks, so that rows start at blocks 1 to 3 (the shared tiny models have two).
SIZE = TinySize(n_layers=4)


@pytest.fixture(scope="module")
def deep_tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("deep_tiny")
    return {
        arch: build_tiny_model(arch, root / arch, seed=2, size=SIZE) for arch in TINY_ARCHITECTURES
    }


def _trace(adapter, ids, subject, **kwargs):
    config = TraceConfig(n_samples=3, window=2, max_rows=kwargs.pop("max_rows", None))
    return trace_prompt(
        adapter,
        ids,
        subject,
        answer_id=7,
        config=config,
        generator=torch.Generator().manual_seed(11),
        noise_std=0.5,
        **kwargs,
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_rows_starting_mid_stack_equal_the_whole_stack(deep_tiny, arch, backend) -> None:
    adapter = load_adapter(str(deep_tiny[arch]), backend, device="cpu")
    ids = adapter.encode("The capital of France is the city of")
    subject = [2, 3]
    whole = _trace(adapter, ids, subject, prefix_cache=False, skip_layers=False)
    fast = _trace(adapter, ids, subject)
    small = _trace(adapter, ids, subject, max_rows=4)  # passes split, other start layers
    assert fast.p_clean == pytest.approx(whole.p_clean, abs=1e-6)
    for other in (fast, small):
        assert other.p_corrupt == pytest.approx(whole.p_corrupt, abs=1e-6)
        for kind in whole.scores:
            np.testing.assert_allclose(other.scores[kind], whole.scores[kind], atol=1e-6)
    # The effects are not all zero (the comparison could fail).
    assert np.abs(whole.effects("resid")).max() > 1e-4


def test_skipped_blocks_do_not_run(deep_tiny) -> None:
    """A row restoring at block 2 or above runs neither block 0 nor block 1."""
    adapter = load_adapter(str(deep_tiny["llama"]), "tlens", device="cpu")
    ids = adapter.encode("The capital of France is the city of")
    adapter._block_returns_tuple()  # its one-token probe pass, before counting
    calls = {0: 0, 3: 0}
    blocks = {i: adapter.hf_module(adapter.spec.sites["resid_pre"].path(i)) for i in calls}
    inner = {i: b.forward for i, b in blocks.items()}

    def counting(i):
        def fn(*args, **kwargs):
            calls[i] += 1
            return inner[i](*args, **kwargs)

        return fn

    for i, block in blocks.items():
        block.forward = counting(i)
    try:
        trace = _trace(adapter, ids, [2, 3], max_rows=3)  # one cell per pass
    finally:
        for block in blocks.values():
            del block.forward
    # Every pass runs block 3; block 0 runs only in the clean and corrupted runs and in the
    # passes of cells restoring block 0: at each token from the subject on, resid at layer 0
    # and the windows of layers 0 ([0]) and 1 ([0, 1]) of attn and mlp.
    n_tokens = len(ids) - 2
    assert calls[3] == trace.forward_passes
    assert calls[0] == 2 + 5 * n_tokens < trace.forward_passes


def test_plan_passes_cuts_by_start_layer() -> None:
    items = [(1, 0), (2, 3), (3, 3), (4, 1), (5, 0)]
    # No pass overhead: one pass per start layer.
    assert plan_passes(items, 10, 4, 0.0) == [[1, 5], [4], [2, 3]]
    # A large overhead: one pass (from block 0).
    assert plan_passes(items, 10, 4, 100.0) == [[1, 5, 4, 2, 3]]
    # Never more cells than fit.
    assert all(len(p) <= 2 for p in plan_passes(items, 2, 4, 100.0))
