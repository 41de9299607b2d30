"""A complete results store that cannot be written is read back through the command line:
``mlake eval knowledge`` and ``mlake trace`` (which reads the knowledge run too, and the shared
file of recommended layers) print what they printed when they computed the results, and exit
0.

The store is made read-only in two ways.  For real: a small tmpfs holds it, filled by the
first runs and then remounted read-only (where the test may mount one: as root; skipped,
with the reason, elsewhere).  And always: every write under it fails with ``EROFS`` as on a
read-only file system (the store's own writes, and opening for writing, creating, renaming,
removing or changing a file or folder there through Python).  Either way a write is first
checked to fail, and a command that wrote would end with status 1 naming the file.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mlake import cli
from mlake_core.results import store

pytestmark = pytest.mark.slow

#: The commands read back, without the model and run options (:func:`_run` adds them).
COMMANDS: dict[str, tuple[str, ...]] = {
    "knowledge": ("eval", "knowledge", "--langs", "en,zh"),
    "trace": ("trace", "--langs", "en,zh", "--facts", "6", "--samples", "2"),
}


@dataclass(frozen=True)
class Store:
    """A results root and how to make it read-only."""

    root: Path
    make_read_only: Callable[[], None]


def _refuse(path: Any) -> None:
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))


def _fail_writes_under(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every write under ``root`` fails with ``EROFS`` from now on (reads go through)."""
    top = os.path.realpath(root)
    writing = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def inside(path: Any) -> bool:
        if not isinstance(path, str | bytes | os.PathLike):  # a file descriptor
            return False
        where = os.path.realpath(os.fsdecode(path))
        return where == top or where.startswith(top + os.sep)

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if inside(file) and any(c in mode for c in "wax+"):
            _refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def os_open(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if flags & writing and inside(path):
            _refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def mkdir(path: Any, *args: Any, **kwargs: Any) -> None:
        if inside(path) and not os.path.lexists(path):  # an existing one: EEXIST, as there
            _refuse(path)
        real_mkdir(path, *args, **kwargs)

    def guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, **kwargs: Any) -> Any:
            for path in args[:2]:
                if inside(path):
                    _refuse(path)
            return fn(*args, **kwargs)

        return call

    def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
        _refuse(path)

    monkeypatch.setattr(store, "_atomic_write", atomic_write)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(os, "mkdir", mkdir)
    for name in ("replace", "rename", "unlink", "remove", "rmdir", "chmod", "utime", "truncate"):
        monkeypatch.setattr(os, name, guarded(getattr(os, name)))


@pytest.fixture(params=["remounted", "injected"])
def read_only(
    request: pytest.FixtureRequest,
    tmpfs: Callable[[int | str], Any],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Store:
    """A store on a tmpfs remounted read-only, or one whose writes fail (module docstring)."""
    if request.param == "remounted":
        fs = tmpfs("64m")
        return Store(fs.path, lambda: fs.remount("ro"))
    root = tmp_path / "store"
    return Store(root, lambda: _fail_writes_under(root, monkeypatch))


def _run(
    capsys: pytest.CaptureFixture[str], model: Path, root: Path, command: str
) -> tuple[int, str, str]:
    """Run ``command`` on the micro mlake-tiny with ``--json``: the exit status, the report
    (as sorted JSON text, without its timing) and stderr."""
    argv = [*COMMANDS[command], "--model", str(model), "--device", "cpu"]
    code = cli.main([*argv, "--results-dir", str(root), "--json"])
    out, err = capsys.readouterr()
    if code != 0:
        return code, out, err
    report = json.loads(out)
    report.pop("seconds")
    return code, json.dumps(report, sort_keys=True), err


def test_a_read_only_store_is_read_back(
    read_only: Store, micro_tiny: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    first = {}
    for command in COMMANDS:
        code, first[command], err = _run(capsys, micro_tiny, read_only.root, command)
        assert code == 0, err
    read_only.make_read_only()
    with pytest.raises(OSError) as refused:
        (read_only.root / "written.json").write_text("{}")
    assert refused.value.errno == errno.EROFS
    for command in COMMANDS:
        code, report, err = _run(capsys, micro_tiny, read_only.root, command)
        assert code == 0 and "error" not in err, err
        assert report == first[command]
