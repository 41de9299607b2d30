"""A real ``mlake trace`` process stopped by a real signal in the middle of its stage (Ctrl-C,
i.e. SIGINT, and SIGKILL), then the same command run again: the resumed run reads back the
pieces saved before the signal without recomputing them, computes the rest, and its saved
results and its report are identical to those of an uninterrupted run.

``mlake trace`` saves one array file per fact and language as it finishes
(``tracing/<key>/arrays/trace_<lang>_<fact>.npz``); on the micro mlake-tiny's facts that is
about 30 pieces, a few seconds of tracing after about 15 s of start-up (loading the data and
measuring knowledge, saved per language first).  Each signal is sent as soon as the first
trace piece is on disk.  A piece saved before the signal is recognised after the resume by
its inode and modification time: the store writes every file through a temporary file renamed
into place, so a recomputed piece would be a new file.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

pytestmark = pytest.mark.slow

#: The command under test (model, data and results store are added per run).
TRACE_ARGS = ("trace", "--facts", "trained", "--json")
#: What Ctrl-C prints (mlake/cli.py): what finished is saved, the same command resumes.
INTERRUPTED = re.compile(
    r"^mlake: interrupted\..*saved.*run the same command again to resume", re.IGNORECASE
)
#: Report fields that say how long a run took, not what it computed.
TIMING_FIELDS = frozenset({"seconds"})
#: ``meta.json`` fields that may legitimately differ between two runs of the same code (the
#: checkout's commit moves when someone commits between the runs).
VOLATILE_META = frozenset({"git_commit"})
#: Seconds to wait for the first trace piece, and for any one run to finish.
FIRST_PIECE_DEADLINE = 120.0
RUN_TIMEOUT = 180.0


def mlake_command() -> list[str]:
    """The ``mlake`` console script of the running interpreter's environment (the command a
    user types), else the same ``main`` through ``python -m mlake.cli``."""
    script = Path(sys.executable).with_name("mlake")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlake.cli"]


def trace_command(model: Path, data_root: Path, store: Path) -> list[str]:
    """The full ``mlake trace`` command line on ``store``."""
    return [
        *mlake_command(),
        *TRACE_ARGS,
        "--model",
        str(model),
        "--data-dir",
        str(data_root),
        "--results-dir",
        str(store),
    ]


def child_env() -> dict[str, str]:
    """The environment of the ``mlake`` processes: one torch thread each."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def default_sigint() -> None:
    """Run in the child before ``exec``: Ctrl-C with its default disposition, as from a
    terminal (a test runner started in the background inherits SIGINT ignored, and Python
    then installs no KeyboardInterrupt handler)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_to_end(command: list[str], out: Path) -> dict[str, Any]:
    """Run ``command`` to completion (exit status 0 asserted); its JSON report."""
    done = subprocess.run(
        command,
        env=child_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        preexec_fn=default_sigint,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (out / "stderr.txt").write_text(done.stderr, encoding="utf-8")
    return json.loads(done.stdout)


def trace_pieces(store: Path) -> list[Path]:
    """The per-fact trace files saved so far in ``store``."""
    return sorted(store.glob("tracing/*/arrays/trace_*.npz"))


def saved_files(store: Path) -> dict[str, Path]:
    """Every result file of ``store`` by its path relative to it: tables, arrays and JSON
    documents; not the lock files, nor hidden (temporary) files."""
    return {
        str(p.relative_to(store)): p
        for p in sorted(store.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".lock"
    }


def identities(store: Path) -> dict[str, tuple[int, int]]:
    """Each saved file's inode and modification time (ns): a file rewritten (through a
    temporary file renamed into place) gets a new inode."""
    out = {}
    for rel, path in saved_files(store).items():
        st = path.stat()
        out[rel] = (st.st_ino, st.st_mtime_ns)
    return out


def normalised_json(path: Path, store: Path) -> Any:
    """A JSON file of the store with the store's own path replaced (run paths are absolute),
    and for ``meta.json`` without :data:`VOLATILE_META`."""
    data = json.loads(path.read_text(encoding="utf-8").replace(str(store), "<store>"))
    if path.name == "meta.json":
        data = {k: v for k, v in data.items() if k not in VOLATILE_META}
    return data


def normalised_report(report: dict[str, Any], store: Path) -> Any:
    """A printed report without its timings, with the store's path replaced."""
    text = json.dumps({k: v for k, v in report.items() if k not in TIMING_FIELDS})
    return json.loads(text.replace(str(store), "<store>"))


def assert_same_results(got: Path, expected: Path) -> int:
    """Every table, array and JSON document of store ``got`` equals that of ``expected``
    (the same files, parquet frames equal, every npz array equal, JSON equal up to the
    stores' paths); returns how many files were compared."""
    a, b = saved_files(got), saved_files(expected)
    assert sorted(a) == sorted(b), (
        f"files only in the resumed store: {sorted(set(a) - set(b))}; "
        f"only in the uninterrupted one: {sorted(set(b) - set(a))}"
    )
    for rel in a:
        if rel.endswith(".parquet"):
            pd.testing.assert_frame_equal(pd.read_parquet(a[rel]), pd.read_parquet(b[rel]))
        elif rel.endswith(".npz"):
            with np.load(a[rel]) as x, np.load(b[rel]) as y:
                assert sorted(x.files) == sorted(y.files), rel
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=f"{rel}: {key}")
        elif rel.endswith(".json"):
            assert normalised_json(a[rel], got) == normalised_json(b[rel], expected), rel
        else:
            raise AssertionError(f"{rel}: a file of an unexpected kind in the results store")
    return len(a)


@pytest.fixture(scope="module")
def uninterrupted(micro_tiny: Path, mlake_v2411, tmp_path_factory) -> tuple[Path, dict]:
    """The same command run once without interruption: its store and its report."""
    out = tmp_path_factory.mktemp("uninterrupted")
    store = out / "store"
    report = run_to_end(trace_command(micro_tiny, mlake_v2411.root, store), out)
    return store, report


@pytest.fixture
def started(micro_tiny: Path, mlake_v2411, tmp_path: Path) -> Iterator[subprocess.Popen]:
    """``mlake trace`` started on ``tmp_path/store`` (output to files, so a full pipe never
    stalls it); killed at teardown if a failed test left it running."""
    command = trace_command(micro_tiny, mlake_v2411.root, tmp_path / "store")
    with (tmp_path / "first.out").open("w") as out, (tmp_path / "first.err").open("w") as err:
        proc = subprocess.Popen(
            command, env=child_env(), stdout=out, stderr=err, preexec_fn=default_sigint
        )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def wait_for_first_piece(proc: subprocess.Popen, store: Path) -> None:
    """Return as soon as one trace piece is saved while ``proc`` still runs."""
    deadline = time.monotonic() + FIRST_PIECE_DEADLINE
    while not trace_pieces(store):
        assert proc.poll() is None, f"mlake trace exited ({proc.returncode}) before any piece"
        assert time.monotonic() < deadline, "no trace piece saved within the deadline"
        time.sleep(0.02)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["SIGINT", "SIGKILL"])
def test_a_signal_mid_stage_then_the_same_command_resumes_to_identical_results(
    sig: signal.Signals,
    started: subprocess.Popen,
    uninterrupted: tuple[Path, dict],
    micro_tiny: Path,
    mlake_v2411,
    tmp_path: Path,
) -> None:
    store = tmp_path / "store"
    expected_store, expected_report = uninterrupted
    n_pieces = len(trace_pieces(expected_store))
    assert n_pieces >= 10, "too few facts traced for a stop in the middle"

    wait_for_first_piece(started, store)
    started.send_signal(sig)
    status = started.wait(timeout=60)
    stderr = (tmp_path / "first.err").read_text(encoding="utf-8")
    if sig == signal.SIGINT:
        assert status == 130, stderr[-3000:]
        assert INTERRUPTED.search(stderr.strip().splitlines()[-1]), stderr[-3000:]
        assert (tmp_path / "first.out").read_text(encoding="utf-8") == ""  # no report
        # Ctrl-C leaves no temporary file behind (SIGKILL may, mid-write: hidden, unread).
        assert not [p for p in store.rglob(".*") if p.is_file()]
    else:
        assert status == -signal.SIGKILL

    # Stopped in the middle of the stage: some pieces saved, not all, the run not complete.
    before = identities(store)
    saved_before = trace_pieces(store)
    assert 0 < len(saved_before) < n_pieces, (len(saved_before), n_pieces)
    (tracing_run,) = store.glob("tracing/*/meta.json")
    assert json.loads(tracing_run.read_text())["status"] == "running"

    report = run_to_end(trace_command(micro_tiny, mlake_v2411.root, store), tmp_path)

    # The pieces saved before the signal were read back, not recomputed: the same files.
    rewritten = str(tracing_run.relative_to(store))  # its status becomes "complete"
    after = identities(store)
    changed = sorted(
        rel for rel, ident in before.items() if rel != rewritten and after.get(rel) != ident
    )
    assert changed == [], f"recomputed after the resume: {changed}"
    assert json.loads(tracing_run.read_text())["status"] == "complete"
    assert len(trace_pieces(store)) == n_pieces

    # ... and everything is as if the run had never stopped.
    assert assert_same_results(store, expected_store) > n_pieces
    assert normalised_report(report, store) == normalised_report(expected_report, expected_store)
