"""The planner: shapes from configs, the stages' own batch-size functions run for a device that
is not here, and ``mlake models list`` / ``mlake models plan`` offline."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from analysis.neurons.attribution import grad_rows_per_pass
from analysis.tracing.causal import rows_per_pass
from mlake.commands import models as models_command
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import assume_free_bytes, free_bytes, pass_bytes
from mlake_core.models.catalog import get_entry
from mlake_core.models.planner import (
    GIB,
    PlannedModel,
    parse_memory,
    plan_model,
    row_bytes,
    shape_from_config,
)

BATCHERS = {"causal tracing": rows_per_pass, "attribution (IG)": grad_rows_per_pass}
KEYS = models_command.key_statistics_batch()


def test_the_commands_use_the_stages_own_functions() -> None:
    assert models_command.stage_batchers() == BATCHERS
    assert KEYS == (32, 128)  # key_second_moment(batch_size=32, max_len=128)


@pytest.fixture(scope="module")
def qwen7b():
    return shape_from_config(get_entry("qwen2.5-7b").hf_config(), "qwen2.5-7b")


def test_assumed_free_memory_is_what_free_bytes_answers() -> None:
    measured = free_bytes(torch.device("cpu"))
    with assume_free_bytes(123 * GIB):
        assert free_bytes(torch.device("cpu")) == 123 * GIB
        assert free_bytes(torch.device("cuda")) == 123 * GIB  # no CUDA needed
        with assume_free_bytes(5):
            assert free_bytes(torch.device("cpu")) == 5
        assert free_bytes(torch.device("cpu")) == 123 * GIB
    assert free_bytes(torch.device("cpu")) is not None and measured is not None


def test_the_plan_is_what_the_stages_choose(qwen7b) -> None:
    plan = plan_model(qwen7b, batchers=BATCHERS, key_statistics=KEYS, device_memory=80 * GIB)
    assert plan.weights_bytes == qwen7b.n_params * 2  # bfloat16
    assert not plan.several_devices and plan.devices_needed == 1
    assert plan.free_bytes == 80 * GIB - plan.weights_bytes
    model = PlannedModel(qwen7b, "bfloat16", "cuda")
    stages = {s.stage: s for s in plan.stages}
    with assume_free_bytes(plan.free_bytes):
        assert stages["causal tracing"].rows == rows_per_pass(model, 32)
        assert stages["attribution (IG)"].rows == grad_rows_per_pass(model, 32)
        # ... which is IG as it runs at positions="last": one token after a cache of 31.
        assert stages["attribution (IG)"].rows == grad_rows_per_pass(model, 32, past_tokens=31)
        assert stages["attribution (IG)"].rows > grad_rows_per_pass(model, 32, past_tokens=0)
    # The charge per row is the function's own: rows = fraction x free // row.
    ig = stages["attribution (IG)"]
    assert ig.rows == int(0.25 * plan.free_bytes // ig.row_bytes)
    assert stages["forward (knowledge, evaluation)"].row_bytes == pass_bytes(model.info, 32)
    keys = stages["ROME/MEMIT key statistics"]
    assert (keys.rows, keys.tokens) == (32, 128)
    assert keys.host_bytes == 2 * 18944 * 18944 * 8


@pytest.mark.parametrize("fn", [rows_per_pass, grad_rows_per_pass], ids=lambda f: f.__name__)
def test_row_bytes_is_the_functions_own_charge(fn, qwen7b) -> None:
    """Whatever a batch-size function charges per row, the charge read off at a huge budget
    predicts its answer at every budget (so a change to the function changes the plan)."""
    model = PlannedModel(qwen7b, "bfloat16", "cuda")
    per_row = row_bytes(fn, model, 32)
    for budget in (1 * GIB, 3 * GIB, 10 * GIB, 77 * GIB):
        with assume_free_bytes(budget):
            assert fn(model, 32) == max(1, int(0.25 * budget // per_row))
    assert row_bytes(fn, model, 64) > per_row  # longer prompts cost more per row


def test_big_models_need_several_devices() -> None:
    shape = shape_from_config(get_entry("llama-3.1-70b").hf_config(), "llama-3.1-70b")
    plan = plan_model(shape, batchers=BATCHERS, key_statistics=KEYS, device_memory=80 * GIB)
    assert plan.several_devices and plan.devices_needed == 2
    assert plan.free_bytes == 80 * GIB - -(-plan.weights_bytes // 2)
    fp32 = plan_model(
        shape, batchers=BATCHERS, key_statistics=KEYS, dtype="float32", device_memory=80 * GIB
    )
    assert fp32.devices_needed == 4  # 282 GB of float32 weights
    small = plan_model(shape, batchers=BATCHERS, key_statistics=KEYS, device_memory=24 * GIB)
    assert small.devices_needed == 6


def test_cpu_plans_use_the_cpu_branch(qwen7b) -> None:
    cuda = plan_model(
        qwen7b, batchers=BATCHERS, key_statistics=KEYS, device="cuda", device_memory=64 * GIB
    )
    cpu = plan_model(
        qwen7b, batchers=BATCHERS, key_statistics=KEYS, device="cpu", device_memory=64 * GIB
    )
    rows = {p.device: {s.stage: s.rows for s in p.stages} for p in (cuda, cpu)}
    # On CPU, rows_per_pass caps a pass's activations at 96 MiB and IG budgets 256 MiB.
    assert rows["cpu"]["causal tracing"] < rows["cuda"]["causal tracing"]
    assert rows["cpu"]["attribution (IG)"] == max(1, (256 << 20) // cpu.stages[2].row_bytes)


@pytest.mark.parametrize(
    ("text", "value"),
    [("80GiB", 80 * GIB), ("80G", 80 * GIB), ("24gb", 24 * GIB), ("512MiB", 512 << 20)],
)
def test_memory_sizes_parse(text, value) -> None:
    assert parse_memory(text) == value


@pytest.mark.parametrize("text", ["", "eighty", "-4GiB", "0GiB"])
def test_bad_memory_sizes_are_refused(text) -> None:
    with pytest.raises(ConfigError, match="--gpu-memory"):
        parse_memory(text)


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mlake")
    models_command.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_models_list_json(capsys) -> None:
    assert _run(["models", "list", "--json"]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["qwen2.5-7b"]["checks"] == "meta"
    assert rows["qwen2.5-0.5b"]["checks"] == "meta + real-width"
    # Every row has a site table (Gemma 2 and Aya 23's Cohere included).
    assert rows["aya-23-8b"]["checks"] == rows["gemma-2-9b"]["checks"] == "meta"
    assert not any(r["unsupported"] for r in rows.values())
    assert rows["llama-3.1-70b"]["n_layers"] == 80


def test_models_plan_json_by_hub_id(capsys) -> None:
    argv = ["models", "plan", "Qwen/Qwen2.5-7B", "--gpu-memory", "80GiB", "--json"]
    assert _run(argv) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["model"] == "qwen2.5-7b (Qwen/Qwen2.5-7B)"
    assert plan["weights_bytes"] == 7_615_616_512 * 2
    assert plan["several_devices"] is False
    stages = [s["stage"] for s in plan["stages"]]
    assert stages == [
        "forward (knowledge, evaluation)",
        "causal tracing",
        "attribution (IG)",
        "ROME/MEMIT key statistics",
    ]
    assert all(s["rows"] >= 1 and s["row_bytes"] > 0 for s in plan["stages"])


def test_models_plan_text_and_refusals(capsys) -> None:
    assert _run(["models", "plan", "llama-3.1-70b"]) == 0
    out = capsys.readouterr().out
    assert "needs several devices: at least 2" in out
    assert _run(["models", "plan", "aya-23-8b"]) == 0
    out = capsys.readouterr().out
    assert "aya-23-8b (CohereForAI/aya-23-8B): cohere" in out and "fits one device" in out
    with pytest.raises(ConfigError, match="not in the catalog"):
        _run(["models", "plan", "nobody/no-such-model-here"])
