"""Catalog rows up to about 1.5B parameters with random weights at their *real widths* on
CPU -- depth truncated to 2 layers to keep the suite fast (``benchmarks/gpu_check.py --shapes
NAME`` runs full depth) -- through one tracing pass, one ROME edit and one
integrated-gradients attribution on an MLaKE fact; and the planner's memory against what a
pass measurably adds."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch

from mlake_core.models.catalog import CATALOG, REAL_WIDTH_MAX_PARAMS

ROOT = Path(__file__).resolve().parents[3]
REAL_WIDTH = [
    e for e in CATALOG if not e.unsupported and e.published_params <= REAL_WIDTH_MAX_PARAMS
]

#: Run by default: one row per mechanism (grouped-query attention and tied embeddings; ALiBi,
#: fused QKV and the embedding norm; sliding windows, post-norms, scaled embeddings and a head
#: wider than d_model / heads).  The others cost 30-90 s each on a shared 2-core machine (a
#: real vocabulary's logits, ROME's d_mlp x d_mlp solve): MLAKE_TEST_ALL_REAL_WIDTH=1 runs them.
DEFAULT_ROWS = ("qwen2.5-0.5b", "bloom-560m", "gemma-3-270m")
ALL_ROWS = os.environ.get("MLAKE_TEST_ALL_REAL_WIDTH", "") == "1"
PARAMS = [
    pytest.param(
        e,
        id=e.name,
        marks=()
        if e.name in DEFAULT_ROWS or ALL_ROWS
        else pytest.mark.skip(reason="set MLAKE_TEST_ALL_REAL_WIDTH=1 to run every row"),
    )
    for e in REAL_WIDTH
]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "benchmarks" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def gpu_check():
    return _gpu_check()


def test_the_real_width_rows_are_the_small_supported_ones() -> None:
    names = {e.name for e in REAL_WIDTH}
    assert names == {
        "qwen2.5-0.5b",
        "qwen2.5-1.5b",
        "llama-3.2-1b",
        "bloom-560m",
        "mgpt",
        "gemma-3-270m",
        "gemma-3-1b",
    }
    assert all(e.checks == "meta + real-width" for e in REAL_WIDTH)


@pytest.mark.slow
@pytest.mark.parametrize("entry", PARAMS)
def test_tracing_rome_and_ig_run_at_real_width(entry, gpu_check, mlake_v2411) -> None:
    config = entry.hf_config()
    report = gpu_check.check_shape(
        entry.name,
        device="cpu",
        dtype="float32",
        n_facts=1,
        lang="en",
        n_layers=2,
        key_tokens=300,
        trace_kinds=("resid",),
        trace_samples=2,
        ig_steps=2,
        rome_steps=3,
        rome_contexts="",
        dataset=mlake_v2411,
        init="fast",
    )
    assert report["n_layers"] == 2
    assert report["d_model"] == config.hidden_size
    assert report["d_vocab"] == config.vocab_size
    # The plan's weights are the model's: parameters x 4 bytes, tied embeddings once.
    assert report["weights_bytes_model"] == report["weights_bytes_planned"]
    # TransformerLens keeps split Q/K/V copies of a fused projection (BLOOM's
    # query_key_value, GPT-2's c_attn) beside it: 3 d^2 + 3 d numbers per layer.
    extra = report["weights_bytes_measured"] - report["weights_bytes_model"]
    qkv = 2 * 4 * (3 * config.hidden_size * config.hidden_size + 3 * config.hidden_size)
    assert extra == (qkv if entry.model_type in ("bloom", "gpt2") else 0)
    n_tokens = report["trace_tokens"][0]
    assert report["trace_cells"] == [n_tokens * 2]  # resid restorations: tokens x layers
    assert report["ig_units"][0] >= 2 * report["d_mlp"]
    # ROME's update (3 optimisation steps here) changes the new target's log-probability.
    gain = report["rome_target_logprob_gain"][0]
    assert gain == gain and gain != 0.0
    for stage in ("causal tracing", "ROME edit", "integrated gradients"):
        assert report["stages"][stage]["facts"] == 1


@pytest.mark.slow
def test_tiny_shape_runs_from_the_command_line(gpu_check, capsys) -> None:
    code = gpu_check.main(
        [
            "--device",
            "cpu",
            "--dtype",
            "float32",
            "--shape",
            "tiny",
            "--facts",
            "1",
            "--key-tokens",
            "500",
            "--json",
        ]
    )
    assert code == 0
    (report,) = json.loads(capsys.readouterr().out)
    assert report["shape"] == "tiny" and report["device"] == "cpu"
    stages = report["stages"]
    assert set(stages) == {
        "causal tracing",
        "ROME key statistics (once per layer)",
        "ROME edit",
        "integrated gradients",
    }
    for stage in ("causal tracing", "ROME edit", "integrated gradients"):
        assert stages[stage]["facts_per_minute"] > 0
    assert stages["causal tracing"]["planned_rows"] >= 1
    # Tracing's defaults: three kinds of restoration, every token x layer.
    assert report["trace_cells"] == [3 * report["trace_tokens"][0] * report["n_layers"]]


#: How far over ``pass_bytes`` the measured resident memory of a pass may be (see below).
RSS_SLACK = 2.0


@pytest.mark.slow
def test_a_pass_adds_no_more_memory_than_planned(gpu_check) -> None:
    """One forward pass at real width (Qwen2.5-0.5B, 2 layers, 8 rows of 128 tokens) reading
    the last position's logits, as the measuring stages do: the resident memory it adds is
    of the order of the plan's ``pass_bytes`` for those rows, and not negligible against it.

    ``pass_bytes`` is not an upper bound of resident memory here: run alone, this pass added
    126-160 MiB against 111 MiB planned (four runs; inside the whole suite, where freed
    memory is reused, 114 MiB once and within the plan once).  What it leaves out (the gated
    MLP's fourth ``d_mlp`` buffer, the allocator's slack) is open (issue 23 §2); the bound
    here catches a model that is off by more than ``RSS_SLACK``."""
    from mlake_core.models.adapter import pass_bytes

    config, _arch, tokenizer = gpu_check.shape_config("qwen2.5-0.5b", 2)
    adapter, _hf, _own = gpu_check.random_adapter(
        "qwen2.5-0.5b", config, tokenizer, "cpu", "float32", init="fast"
    )
    rows, n = 8, 128
    batch = adapter.batch([list(range(10, 10 + n))] * rows)
    planned = pass_bytes(adapter.info, n, rows=rows)
    with torch.no_grad(), gpu_check.StagePeak(torch.device("cpu")) as peak:
        adapter.run_with_cache(batch, ["resid_post.1"], last_only=True)
    assert peak.added <= RSS_SLACK * planned
    assert peak.added >= 0.05 * planned
