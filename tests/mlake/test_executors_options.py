"""The executor options and the per-piece claims of the results store (fast: no model)."""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sys
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from mlake.commands.common import add_executor_args, executor_settings
from mlake.executors import make_executor
from mlake.pipeline.config import PipelineRun
from mlake.settings import DataSettings, ModelSettings, RunSettings
from mlake_core.errors import ConfigError
from mlake_core.results.store import Run, open_run


def test_executor_options_override_the_run_settings() -> None:
    parser = argparse.ArgumentParser()
    add_executor_args(parser)
    args = parser.parse_args(["--executor", "ray", "--gpus-per-worker", "0", "--workers", "2"])
    base = PipelineRun(seed=3, shard_facts=8)
    run = executor_settings(args, base)
    assert isinstance(run, PipelineRun)
    assert (run.executor, run.gpus_per_worker, run.workers) == ("ray", 0.0, 2)
    assert (run.seed, run.shard_facts, run.address) == (3, 8, None)  # the rest kept
    assert executor_settings(parser.parse_args([]), base) == base


def test_model_commands_take_the_executor_options() -> None:
    from mlake.cli import build_parser
    from mlake.commands.common import run_settings

    args = build_parser().parse_args(["trace", "--executor", "ray", "--shard-facts", "4"])
    run = run_settings(args)
    assert (run.executor, run.shard_facts, run.gpus_per_worker) == ("ray", 4, 1.0)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("executor", "slurm", "executor 'slurm': choose local, ray"),
        ("gpus_per_worker", -1, "must be at least 0"),
        ("workers", 0, "workers 0: must be at least 1"),
        ("shard_facts", 0, "shard_facts 0: must be at least 1"),
    ],
)
def test_bad_executor_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RunSettings(**{field: value})  # type: ignore[arg-type]


def test_the_local_executor_shards_nothing() -> None:
    assert make_executor(RunSettings(), ModelSettings(), DataSettings()) is None


def test_ray_without_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    with pytest.raises(ConfigError, match=r"pip install 'mlake\[ray\]'"):
        make_executor(RunSettings(executor="ray"), ModelSettings(), DataSettings())


# -- claims ---------------------------------------------------------------------------------


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return open_run("knowledge", {"a": 1}, tmp_path)


def _hold(path: str, name: str, ready: object) -> None:
    """In another process: take the claim on ``name`` and keep it until killed."""
    held = Run(path=Path(path), kind="knowledge", key=Path(path).name)
    with held.claim(name):
        ready.set()  # type: ignore[attr-defined]
        time.sleep(60)


def test_a_claim_waits_for_its_holder_and_outlives_no_killed_one(run: Run) -> None:
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(run.path), "edit_en_3", ready))
    holder.start()
    try:
        assert ready.wait(20)
        entered = threading.Event()

        def take() -> None:
            with run.claim("edit_en_3"):
                entered.set()

        thread = threading.Thread(target=take, daemon=True)
        thread.start()
        assert not entered.wait(0.5)  # held by the other process: waits
        with run.claim("edit_en_4"):  # another piece's claim is free
            pass
        assert holder.pid is not None
        os.kill(holder.pid, signal.SIGKILL)  # a worker killed mid-piece
        assert entered.wait(10)  # its claim is taken over, no timeout to wait out
    finally:
        holder.kill()
        holder.join()


def test_a_saved_piece_takes_no_claim(run: Run) -> None:
    run.save_table("knowledge_en", pd.DataFrame({"fact_id": [1]}))
    table, computed = run.load_or_compute_table("knowledge_en", lambda: None)
    assert not computed and table["fact_id"].tolist() == [1]
    assert not (run.path / "claims").exists()  # nothing written: a read-only store is read
    table, computed = run.load_or_compute_table("knowledge_zh", lambda: pd.DataFrame({"x": [2]}))
    assert computed and run.claim_path("knowledge_zh").is_file()


def test_arrays_are_computed_once_under_a_claim_and_a_skip_saves_nothing(run: Run) -> None:
    import numpy as np

    calls: list[str] = []

    def compute() -> dict[str, object]:
        calls.append("x")
        return {"x": np.arange(3)}

    arrays, computed = run.load_or_compute_arrays("lens_en_3", compute, keys=("x",))
    assert computed and arrays is not None and arrays["x"].tolist() == [0, 1, 2]
    assert run.claim_path("lens_en_3").is_file()  # computed under its claim
    arrays, computed = run.load_or_compute_arrays("lens_en_3", compute, keys=("x",))
    assert not computed and arrays is not None and arrays["x"].tolist() == [0, 1, 2]
    assert calls == ["x"]  # read back, not recomputed
    arrays, computed = run.load_or_compute_arrays("edit_en_4", lambda: None)
    assert arrays is None and computed and not run.has_arrays("edit_en_4")  # a skipped piece
