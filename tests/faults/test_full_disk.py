"""A results store whose disk fills up in the middle of a stage: the command (``mlake eval
knowledge``, whose pieces are parquet tables, and ``mlake trace``, whose pieces are npz
arrays) ends with status 1 and one line on stderr, no traceback, naming the file it could not
write and saying the disk is full; the pieces saved before are intact (each equal to the same
piece of an uninterrupted run), no temporary file is left and the run is not marked
complete; once there is space again, the same command resumes (the saved pieces are kept,
not recomputed) and prints what the uninterrupted run printed.

The disk fills for real on a tmpfs sized, from an uninterrupted run's files, to hold about
half of the stage's pieces (where the test may mount one: as root; skipped, with the reason,
elsewhere), then remounted bigger.  And always: once half of the pieces are saved, the next
piece's write fails with ``ENOSPC`` as pyarrow or numpy raise it (an errno and no file name),
until the test frees the space.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from mlake import cli
from mlake_core.results import store
from mlake_core.results.store import read_arrays

pytestmark = pytest.mark.slow

#: What a file system's block is on a tmpfs (a file takes whole pages).
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Case:
    """A command and the pieces its stage saves one by one (a glob under the store)."""

    argv: tuple[str, ...]
    pieces: str


CASES = {
    "knowledge": Case(
        ("eval", "knowledge", "--langs", "en,zh,ja"), "knowledge/*/tables/knowledge_*.parquet"
    ),
    "trace": Case(
        ("trace", "--langs", "en,zh", "--facts", "6", "--samples", "2"),
        "tracing/*/arrays/trace_*.npz",
    ),
}

#: The one line a full disk ends a command with (:func:`mlake.cli.describe_os_error`).
FULL = re.compile(
    r"mlake: error: (?P<file>/.+): No space left on device; free disk space and run the same "
    r"command again \(finished pieces are kept\)"
)


@dataclass(frozen=True)
class Done:
    """A finished command: its status, stdout (the store's path replaced by ``STORE``,
    without the timing) and stderr."""

    code: int
    out: str
    err: str


def _done(code: int, out: str, err: str, root: Path) -> Done:
    if out:
        report = json.loads(out.replace(str(root), "STORE"))
        report.pop("seconds")
        out = json.dumps(report, sort_keys=True)
    return Done(code, out, err)


def _argv(case: str, model: Path, root: Path) -> list[str]:
    model_args = ("--model", str(model), "--device", "cpu")
    return [*CASES[case].argv, *model_args, "--results-dir", str(root), "--json"]


def _subprocess(case: str, model: Path, root: Path) -> Done:
    """The command run as ``mlake`` runs it: a process of its own."""
    done = subprocess.run(
        [sys.executable, "-m", "mlake.cli", *_argv(case, model, root)],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    return _done(done.returncode, done.stdout, done.stderr, root)


def _in_process(case: str, model: Path, root: Path, capsys: pytest.CaptureFixture[str]) -> Done:
    """The command run through :func:`mlake.cli.main` here (where a write can be made to
    fail)."""
    code = cli.main(_argv(case, model, root))
    out, err = capsys.readouterr()
    return _done(code, out, err, root)


@dataclass(frozen=True)
class Reference:
    """An uninterrupted run: its store, what it printed, its pieces in the order written."""

    root: Path
    done: Done
    pieces: list[Path]


@pytest.fixture(scope="module")
def reference(
    micro_tiny: Path, tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], Reference]:
    """The uninterrupted run of a case (run once per module)."""
    runs: dict[str, Reference] = {}

    def get(case: str) -> Reference:
        if case not in runs:
            root = tmp_path_factory.mktemp(f"reference_{case}")
            done = _subprocess(case, micro_tiny, root)
            assert done.code == 0, done.err
            pieces = sorted(root.glob(CASES[case].pieces), key=lambda p: p.stat().st_mtime_ns)
            assert len(pieces) >= 3
            runs[case] = Reference(root, done, [p.relative_to(root) for p in pieces])
        return runs[case]

    return get


def _pages_until(ref: Reference, last: Path) -> int:
    """The pages the reference store held when the piece ``last`` was saved: the files
    written by then, and the ``meta.json`` of every run opened by then (rewritten later)."""
    until = (ref.root / last).stat().st_mtime_ns
    pages = 0
    for path in ref.root.rglob("*"):
        if not path.is_file():
            continue
        written = path.stat().st_mtime_ns
        if path.name == "meta.json":  # first written when its run was opened
            written = min(written, (path.parent / "key.json").stat().st_mtime_ns)
        if written <= until:
            pages += -(-path.stat().st_size // PAGE)
    return pages


def _piece(path: Path) -> Any:
    if path.suffix == ".parquet":
        return pd.read_parquet(path)
    return read_arrays(path)


def _assert_same_piece(saved: Path, reference: Path) -> None:
    a, b = _piece(saved), _piece(reference)
    if isinstance(a, pd.DataFrame):
        pd.testing.assert_frame_equal(a, b)
    else:
        assert isinstance(a, dict) and isinstance(b, dict) and a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])


def _check_stopped(
    done: Done, root: Path, case: str, ref: Reference
) -> dict[Path, tuple[int, int]]:
    """What a command stopped by a full disk must leave; returns the pieces saved (relative
    path -> inode and modification time)."""
    assert done.code == 1, done.err
    assert done.out == ""
    assert "Traceback" not in done.err
    lines = done.err.strip().splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:]
    match = FULL.fullmatch(lines[-1])
    assert match, lines[-1]
    failed = Path(match["file"])
    assert failed.is_relative_to(root) and not failed.name.startswith(".")
    assert not failed.exists()  # nothing half-written
    assert list(root.rglob(".*")) == []  # no temporary file left
    saved = sorted(p.relative_to(root) for p in root.glob(CASES[case].pieces))
    assert 1 <= len(saved) < len(ref.pieces)
    for piece in saved:
        _assert_same_piece(root / piece, ref.root / piece)
    meta = root / saved[0].parent.parent / "meta.json"
    assert json.loads(meta.read_text(encoding="utf-8"))["status"] == "running"
    return {p: ((root / p).stat().st_ino, (root / p).stat().st_mtime_ns) for p in saved}


def _files(root: Path) -> list[Path]:
    return sorted(p.relative_to(root) for p in root.rglob("*") if p.is_file())


def _check_resumed(
    done: Done, root: Path, ref: Reference, saved: dict[Path, tuple[int, int]]
) -> None:
    """The same command, with space again, completes: it prints what the uninterrupted run
    printed, keeping the pieces saved before (not recomputed)."""
    assert done.code == 0, done.err
    assert done.out == ref.done.out
    for piece, stamp in saved.items():
        assert ((root / piece).stat().st_ino, (root / piece).stat().st_mtime_ns) == stamp
    assert _files(root) == _files(ref.root)


@pytest.mark.parametrize("case", list(CASES))
def test_a_tmpfs_fills_up_mid_stage(
    case: str,
    micro_tiny: Path,
    reference: Callable[[str], Reference],
    tmpfs: Callable[[int | str], Any],
) -> None:
    ref = reference(case)
    half = ref.pieces[len(ref.pieces) // 2 - 1]
    # A page more than half of the pieces took: room for a small JSON file, not for a
    # knowledge table (pyarrow then fails), or for one trace more (then numpy fails).
    fs = tmpfs((_pages_until(ref, half) + 1) * PAGE)
    root: Path = fs.path
    saved = _check_stopped(_subprocess(case, micro_tiny, root), root, case, ref)
    fs.remount("size=64m")
    _check_resumed(_subprocess(case, micro_tiny, root), root, ref, saved)


#: What each writer raises on a full disk (measured on a tmpfs: pyarrow 26, numpy 2.4): an
#: errno and no file name.
RAISED = {
    ".parquet": "Error writing bytes to file. Detail: [errno 28] No space left on device",
    ".npz": os.strerror(errno.ENOSPC),
    ".json": os.strerror(errno.ENOSPC),
}


@pytest.mark.parametrize("case", list(CASES))
def test_an_injected_full_disk_mid_stage(
    case: str,
    micro_tiny: Path,
    reference: Callable[[str], Reference],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ref = reference(case)
    root = tmp_path / "store"
    disk = {"pieces": 0, "full": False}
    real = store._atomic_write

    def fill(path: Path, write: Callable[[Path], None]) -> None:
        """Once half of the pieces are saved, no piece fits (a small JSON file still does),
        until the test frees the space."""
        if disk["full"] and path.match(CASES[case].pieces):

            def fail(tmp: Path) -> None:
                raise OSError(errno.ENOSPC, RAISED[path.suffix])

            write = fail
        real(path, write)
        if path.match(CASES[case].pieces):
            disk["pieces"] += 1
            if disk["pieces"] == len(ref.pieces) // 2:
                disk["full"] = True

    monkeypatch.setattr(store, "_atomic_write", fill)
    saved = _check_stopped(_in_process(case, micro_tiny, root, capsys), root, case, ref)
    monkeypatch.undo()  # space again
    _check_resumed(_in_process(case, micro_tiny, root, capsys), root, ref, saved)
