"""Soak test of the results store: N ``mlake`` commands run at once on one store give the
same results as the same commands run one after another.

Starts ``--n`` small ``mlake`` processes together, all with the same ``--results-dir``
(cycling through :data:`COMMANDS`): identical commands that race on the same run folder and
its pieces (``eval knowledge --facts 3`` twice, ``trace --facts 2`` twice), a command on
other languages (a different run of the same kind), and a trace with the other backend (a
different model identity: a second entry in the shared ``tracing/recommended_layers.json``,
which every trace rewrites under a file lock at its end).  Then the same commands run
serially into a second store, and the two stores are compared:

* every process exited 0, in both phases;
* both stores hold the same run folders, and every one is complete (``meta.json`` status);
* each run folder holds the same files, and each is equal: parquet tables
  (``pandas.testing.assert_frame_equal``), npz arrays (``numpy`` equality, NaN equal to NaN)
  and JSON documents (``meta.json`` without ``git_commit``, which moves when someone commits
  between the phases; absolute paths of the store replaced by a placeholder), so also the
  shared ``recommended_layers.json``, entry by entry;
* each command's printed JSON report equals its serial counterpart's (without its
  ``seconds``; store paths replaced);
* no temporary file is left anywhere in the store, and the lock files are those the serial
  run leaves (``tracing/recommended_layers.json.lock``).

Prints N, the commands, the wall time of the concurrent and the serial phase, the runs and
files compared, the mismatches and the outcome (PASS or FAIL); exits 1 on FAIL.  The stores
are kept on FAIL (or with ``--keep``) and their folder is printed.  On a 2-core CPU machine
shared with another job (one torch thread per process, the cached mlake-tiny), ``--n 4`` took
3.4 minutes and the default (N = 6) 6.6 (3.7 of them the concurrent phase: identical commands
racing compute the same pieces twice).  An uncached mlake-tiny is trained first by the first
command (about 5 minutes; the others wait on its lock).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/soak.py [--n 6] [--model mlake-tiny]
        [--keep DIR] [--timeout 1800]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

#: The commands cycled through (``--model``, ``--results-dir`` and ``--json`` are added):
#: the first four are distinct, the last two repeat the first two so that N >= 5 races
#: identical commands on the same runs, and the sixth adds a second model identity.
COMMANDS: tuple[tuple[str, ...], ...] = (
    ("eval", "knowledge", "--facts", "3"),
    ("trace", "--facts", "2"),
    ("eval", "knowledge", "--facts", "3"),
    ("eval", "knowledge", "--facts", "3", "--langs", "zh,ja"),
    ("trace", "--facts", "2"),
    ("trace", "--facts", "2", "--backend", "nnsight"),
)
#: Report fields that say how long a command took, not what it computed.
TIMING_FIELDS = frozenset({"seconds"})
#: ``meta.json`` fields that may differ between two runs of the same code.
VOLATILE_META = frozenset({"git_commit"})
#: Placeholder for a store's own path in JSON documents and reports.
STORE = "<store>"


@dataclass
class Outcome:
    """One process: its command, exit status, wall seconds and printed report."""

    args: tuple[str, ...]
    status: int | None = None
    seconds: float = 0.0
    report: Any = None
    stderr_tail: str = ""


@dataclass
class Comparison:
    """What the comparison of the two stores found."""

    runs: int = 0
    files: int = 0
    mismatches: list[str] = field(default_factory=list)


def mlake_command() -> list[str]:
    """The ``mlake`` console script beside the running interpreter, else ``python -m
    mlake.cli`` (the same ``main``)."""
    script = Path(sys.executable).with_name("mlake")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "mlake.cli"]


def full_command(args: tuple[str, ...], model: str, store: Path) -> list[str]:
    """The command line of ``args`` on ``model`` and ``store``, printing JSON."""
    return [*mlake_command(), *args, "--model", model, "--results-dir", str(store), "--json"]


def child_env() -> dict[str, str]:
    """The processes' environment: one torch thread each unless ``OMP_NUM_THREADS`` says."""
    return {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}


def start(args: tuple[str, ...], model: str, store: Path, logs: Path) -> subprocess.Popen:
    """Start one command with its output going to files under ``logs`` (a full pipe would
    stall it)."""
    logs.mkdir(parents=True, exist_ok=True)
    with (logs / "stdout").open("w") as out, (logs / "stderr").open("w") as err:
        return subprocess.Popen(
            full_command(args, model, store), env=child_env(), stdout=out, stderr=err
        )


def finish(proc: subprocess.Popen, outcome: Outcome, logs: Path, store: Path) -> None:
    """Read a finished process's exit status, report (store path replaced) and stderr."""
    outcome.status = proc.returncode
    outcome.stderr_tail = (logs / "stderr").read_text(encoding="utf-8")[-2000:]
    text = (logs / "stdout").read_text(encoding="utf-8")
    try:
        report = json.loads(text.replace(str(store), STORE))
    except json.JSONDecodeError:
        report = None
    if isinstance(report, dict):
        report = {k: v for k, v in report.items() if k not in TIMING_FIELDS}
    outcome.report = report


def run_concurrently(
    commands: list[tuple[str, ...]], model: str, store: Path, logs: Path, timeout: float
) -> tuple[list[Outcome], float]:
    """All ``commands`` at once on ``store``; their outcomes and the wall seconds."""
    started = time.perf_counter()
    procs = [
        (start(args, model, store, logs / f"{i}"), time.perf_counter())
        for i, args in enumerate(commands)
    ]
    outcomes = [Outcome(args) for args in commands]
    deadline = started + timeout
    pending = set(range(len(procs)))
    while pending:
        for i in sorted(pending):
            proc, t0 = procs[i]
            if proc.poll() is not None:
                outcomes[i].seconds = time.perf_counter() - t0
                finish(proc, outcomes[i], logs / f"{i}", store)
                pending.discard(i)
        if pending and time.perf_counter() > deadline:
            for i in pending:
                procs[i][0].kill()
                procs[i][0].wait()
                finish(procs[i][0], outcomes[i], logs / f"{i}", store)
                outcomes[i].stderr_tail += "\n(killed: past --timeout)"
            break
        time.sleep(0.2)
    return outcomes, time.perf_counter() - started


def run_serially(
    commands: list[tuple[str, ...]], model: str, store: Path, logs: Path, timeout: float
) -> tuple[list[Outcome], float]:
    """The ``commands`` one after another on ``store``; their outcomes and the wall
    seconds."""
    started = time.perf_counter()
    outcomes = []
    for i, args in enumerate(commands):
        outcome, t0 = Outcome(args), time.perf_counter()
        proc = start(args, model, store, logs / f"{i}")
        try:
            proc.wait(timeout=max(1.0, started + timeout - t0))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            outcome.stderr_tail = "(killed: past --timeout)"
        outcome.seconds = time.perf_counter() - t0
        finish(proc, outcome, logs / f"{i}", store)
        outcomes.append(outcome)
    return outcomes, time.perf_counter() - started


def run_folders(store: Path) -> list[str]:
    """The run folders of ``store`` (``<kind>/<key>``, each with a ``key.json``)."""
    return sorted(str(p.parent.relative_to(store)) for p in store.glob("*/*/key.json"))


def result_files(folder: Path) -> dict[str, Path]:
    """The result files under ``folder`` by relative path: not hidden, not lock files."""
    return {
        str(p.relative_to(folder)): p
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.name.startswith(".") and p.suffix != ".lock"
    }


def read_json(path: Path, store: Path) -> Any:
    """A JSON document of ``store``, its path replaced, ``meta.json``'s volatile fields out."""
    data = json.loads(path.read_text(encoding="utf-8").replace(str(store), STORE))
    if path.name == "meta.json" and isinstance(data, dict):
        data = {k: v for k, v in data.items() if k not in VOLATILE_META}
    return data


def same_file(a: Path, a_store: Path, b: Path, b_store: Path) -> str | None:
    """``None`` when the two result files hold the same content, else what differs."""
    try:
        if a.suffix == ".parquet":
            pd.testing.assert_frame_equal(pd.read_parquet(a), pd.read_parquet(b))
        elif a.suffix == ".npz":
            with np.load(a) as x, np.load(b) as y:
                if sorted(x.files) != sorted(y.files):
                    return f"arrays {sorted(x.files)} != {sorted(y.files)}"
                for key in x.files:
                    np.testing.assert_array_equal(x[key], y[key], err_msg=key)
        elif a.suffix == ".json":
            if read_json(a, a_store) != read_json(b, b_store):
                return "JSON differs"
        elif a.read_bytes() != b.read_bytes():
            return "bytes differ"
    except AssertionError as err:
        return " ".join(str(err).split())[:300]
    except Exception as err:  # an unreadable (corrupted) file is a finding, not a crash
        return f"unreadable: {type(err).__name__}: {err}"
    return None


def compare_stores(got: Path, expected: Path) -> Comparison:
    """Compare the concurrent store ``got`` with the serial store ``expected``."""
    out = Comparison()
    bad = out.mismatches
    runs_got, runs_expected = run_folders(got), run_folders(expected)
    for run in sorted(set(runs_got) ^ set(runs_expected)):
        where = "concurrent" if run in runs_got else "serial"
        bad.append(f"{run}: run folder only in the {where} store")
    for run in sorted(set(runs_got) & set(runs_expected)):
        out.runs += 1
        for store in (got, expected):
            meta = store / run / "meta.json"
            status = read_json(meta, store).get("status") if meta.is_file() else None
            if status != "complete":
                bad.append(f"{store / run}: status {status!r}, not complete")
    files_got, files_expected = result_files(got), result_files(expected)
    for rel in sorted(set(files_got) ^ set(files_expected)):
        where = "concurrent" if rel in files_got else "serial"
        bad.append(f"{rel}: only in the {where} store")
    for rel in sorted(set(files_got) & set(files_expected)):
        out.files += 1
        problem = same_file(files_got[rel], got, files_expected[rel], expected)
        if problem:
            bad.append(f"{rel}: {problem}")
    for store in (got, expected):
        for p in sorted(store.rglob(".*")):
            bad.append(f"{p}: a temporary file left behind")
    locks = {str(p.relative_to(got)) for p in got.rglob("*.lock")}
    serial_locks = {str(p.relative_to(expected)) for p in expected.rglob("*.lock")}
    for rel in sorted(locks ^ serial_locks):
        where = "concurrent" if rel in locks else "serial"
        bad.append(f"{rel}: a lock file only in the {where} store")
    return out


def compare_outcomes(concurrent: list[Outcome], serial: list[Outcome]) -> list[str]:
    """Exit statuses and printed reports: every command exited 0 and printed the report its
    serial counterpart printed."""
    bad = []
    for i, (c, s) in enumerate(zip(concurrent, serial, strict=True)):
        name = f"[{i}] mlake {' '.join(c.args)}"
        for phase, o in (("concurrent", c), ("serial", s)):
            if o.status != 0:
                bad.append(f"{name} ({phase}): exit status {o.status}: {o.stderr_tail[-800:]}")
            elif o.report is None:
                bad.append(f"{name} ({phase}): no JSON report on stdout")
        if c.status == 0 == s.status and c.report != s.report:
            bad.append(f"{name}: the concurrent report differs from the serial one")
    return bad


def print_table(
    n: int,
    model: str,
    concurrent: list[Outcome],
    serial: list[Outcome],
    walls: tuple[float, float],
    comparison: Comparison,
    problems: list[str],
) -> None:
    """The per-command lines and the summary table."""
    print(f"soak: {n} concurrent mlake commands on one results store, model {model}")
    print()
    print(f"{'#':>2}  {'command':<52}{'exit':>5}{'s':>7}{'serial exit':>13}{'s':>7}  report")
    for i, (c, s) in enumerate(zip(concurrent, serial, strict=True)):
        same = "same" if c.report is not None and c.report == s.report else "DIFFERS"
        print(
            f"{i:>2}  {' '.join(c.args):<52}{c.status!s:>5}{c.seconds:>7.1f}"
            f"{s.status!s:>13}{s.seconds:>7.1f}  {same}"
        )
    concurrent_s, serial_s = walls
    rows = [
        ("N (concurrent processes)", str(n)),
        ("distinct commands", str(len(set(o.args for o in concurrent)))),
        ("wall time, concurrent", f"{concurrent_s:.1f} s"),
        ("wall time, serial", f"{serial_s:.1f} s"),
        ("run folders compared", str(comparison.runs)),
        ("files compared", str(comparison.files)),
        ("mismatches", str(len(problems))),
        ("outcome", "PASS" if not problems else "FAIL"),
    ]
    print()
    print("| what | value |")
    print("|---|---|")
    for what, value in rows:
        print(f"| {what} | {value} |")
    for problem in problems[:40]:
        print(f"  - {problem}")
    if len(problems) > 40:
        print(f"  ... and {len(problems) - 40} more")


def main() -> int:
    """Run both phases, compare, print; exit status 1 on any failure."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--n", type=int, default=6, help="concurrent processes (default: 6)")
    parser.add_argument("--model", default="mlake-tiny", help="default: mlake-tiny (cached)")
    parser.add_argument(
        "--keep", default=None, help="folder for the two stores and the logs (kept)"
    )
    parser.add_argument(
        "--timeout", type=float, default=1800.0, help="seconds per phase (default: 1800)"
    )
    args = parser.parse_args()
    if args.n < 1:
        parser.error("--n: at least 1")

    commands = [COMMANDS[i % len(COMMANDS)] for i in range(args.n)]
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="mlake-soak-"))
    work.mkdir(parents=True, exist_ok=True)
    concurrent_store, serial_store = work / "concurrent", work / "serial"
    for store in (concurrent_store, serial_store):
        if store.exists():
            parser.error(f"{store} exists: --keep needs a new or empty folder")

    print(f"soak: {args.n} commands at once on {concurrent_store} ...", file=sys.stderr)
    concurrent, concurrent_s = run_concurrently(
        commands, args.model, concurrent_store, work / "logs" / "concurrent", args.timeout
    )
    print(f"soak: the same commands one by one on {serial_store} ...", file=sys.stderr)
    serial, serial_s = run_serially(
        commands, args.model, serial_store, work / "logs" / "serial", args.timeout
    )
    comparison = compare_stores(concurrent_store, serial_store)
    problems = compare_outcomes(concurrent, serial) + comparison.mismatches
    print_table(
        args.n, args.model, concurrent, serial, (concurrent_s, serial_s), comparison, problems
    )
    if problems or args.keep:
        print(f"\nstores and logs: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
