"""The tracing stage traces facts in groups whose restorations share passes (issue 25 item 3):
the same run key and the same saved numbers as one fact at a time, and an interrupted run
keeps every group it finished."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import analysis.tracing.causal as causal
import mlake.stages.tracing as stage
from mlake.cli import main

pytestmark = pytest.mark.slow


def _trace(micro_tiny: Path, root: Path, capsys) -> dict:
    args = ["trace", "--model", str(micro_tiny), "--langs", "en", "--facts", "5"]
    args += ["--samples", "2", "--results-dir", str(root), "--device", "cpu", "--json"]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out)


def _arrays(run: Path) -> dict[str, dict[str, np.ndarray]]:
    return {
        f.stem: dict(np.load(f, allow_pickle=False))
        for f in sorted((run / "arrays").glob("trace_*.npz"))
    }


def test_groups_give_the_same_run_and_numbers(micro_tiny, tmp_path, capsys, monkeypatch) -> None:
    grouped = _trace(micro_tiny, tmp_path / "grouped", capsys)
    monkeypatch.setattr(stage, "FACTS_PER_GROUP", 1)
    single = _trace(micro_tiny, tmp_path / "single", capsys)
    # The same key: the run folders have the same name under their roots.
    assert Path(grouped["run"]).name == Path(single["run"]).name
    a, b = _arrays(Path(grouped["run"])), _arrays(Path(single["run"]))
    assert a.keys() == b.keys() and len(a) >= 3
    for name in a:
        for key in a[name]:
            if key.startswith("scores_") or key in ("p_clean", "p_corrupt"):
                np.testing.assert_allclose(a[name][key], b[name][key], atol=1e-6)
            elif key != "forward_passes":  # a shared pass counts as a share
                np.testing.assert_array_equal(a[name][key], b[name][key])
    # Grouped, the facts shared passes: fewer per fact.
    assert (
        grouped["counts"]["en"]["forward_passes_per_fact"]
        < single["counts"]["en"]["forward_passes_per_fact"]
    )


def test_an_interrupted_run_keeps_its_finished_groups(
    micro_tiny, tmp_path, capsys, monkeypatch
) -> None:
    monkeypatch.setattr(stage, "FACTS_PER_GROUP", 2)
    real = causal.trace_prompts
    calls: list[int] = []

    def dies_on_second_group(adapter, prompts, *args, **kwargs):
        calls.append(len(prompts))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(adapter, prompts, *args, **kwargs)

    monkeypatch.setattr(causal, "trace_prompts", dies_on_second_group)
    args = ["trace", "--model", str(micro_tiny), "--langs", "en", "--facts", "5"]
    code = main([*args, "--samples", "2", "--results-dir", str(tmp_path), "--device", "cpu"])
    assert code != 0  # the command reports the interruption
    capsys.readouterr()
    saved = sorted(tmp_path.rglob("arrays/trace_*.npz"))
    assert len(saved) == 2  # the first group
    before = {f.name: f.stat().st_mtime_ns for f in saved}
    calls.clear()
    monkeypatch.setattr(
        causal, "trace_prompts", lambda *a, **k: calls.append(len(a[1])) or real(*a, **k)
    )
    report = _trace(micro_tiny, tmp_path, capsys)
    # The saved group was read, not traced again; the rest were traced.
    assert {f.name: f.stat().st_mtime_ns for f in saved} == before
    assert sum(calls) == report["counts"]["en"]["traced"] - 2
