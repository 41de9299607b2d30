"""The tracing benchmark's work model (``benchmarks/tracing_speed.py``): the ideal speed-up
and the readout's size in token-blocks, checked against hand counts."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

from analysis.tracing.causal import TraceConfig
from mlake_core.models.tiny import TinySize, build_tiny_model

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "tracing_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("tracing_speed", _PATH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_ideal_speedup_by_hand(bench):
    # 3 tokens, 2 blocks, subject at token 1, one noise sample, resid only.  The tracer's
    # cells: (t=1, l=0), (t=2, l=0), (t=2, l=1) (t=1 at the last block has no effect).
    # Loop: clean + corrupted runs 2 x 3 x 2 = 12, every cell (6) one row of 3 tokens x 2
    # blocks = 36: 48.  Floor: the same runs 12, rows (3-1)x2 + (3-2)x2 + (3-2)x1 = 7: 19.
    config = TraceConfig(n_samples=1, kinds=("resid",))
    assert bench.ideal_speedup(3, 2, [1], config, 0.0) == pytest.approx(48 / 19)
    # A readout of 1 token-block: the loop reads every position of every row (+ 2x3 + 6x3),
    # the floor one position per row (clean, corrupted and the 3 cells' rows: + 5).
    assert bench.ideal_speedup(3, 2, [1], config, 1.0) == pytest.approx(72 / 24)


def test_ideal_speedup_grows_as_the_subject_moves_to_the_end(bench):
    config = TraceConfig(n_samples=10)
    start = bench.ideal_speedup(40, 12, [2, 3, 4], config, 5.0)
    end = bench.ideal_speedup(40, 12, [35, 36, 37], config, 5.0)
    assert 1.0 < start < end


def test_tokens_after_subject(bench):
    assert bench.tokens_after_subject((0, "en", [5, 6, 7, 8, 9], [1, 2], 3)) == 2
    assert bench.tokens_after_subject((0, "en", [5, 6, 7], [2], 3)) == 0


def test_readout_blocks_from_the_first_block_weights(bench, tmp_path):
    size = TinySize(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_mlp=64, n_ctx=64)
    path = build_tiny_model("gpt2", tmp_path / "gpt2", size=size)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    block = model.transformer.h[0]
    weights = sum(p.numel() for p in block.parameters() if p.ndim == 2)
    # GPT-2's block: c_attn d x 3d, c_proj d x d, c_fc d x d_mlp, mlp c_proj d_mlp x d.
    assert weights == 32 * 96 + 32 * 32 + 32 * 64 + 64 * 32
    vocab = model.config.vocab_size
    assert bench.readout_blocks(path, 32, vocab) == pytest.approx(vocab * 32 / weights)
