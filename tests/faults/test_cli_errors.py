"""Operating-system errors and Ctrl-C end the command with one line, not a traceback: the
file, what happened and what to do; an interruption says that finished pieces are saved and
how to resume."""

from __future__ import annotations

import argparse
import errno
import os

import pytest

from mlake import cli


def _parser_raising(error: BaseException):
    def build() -> argparse.ArgumentParser:
        parser = argparse.ArgumentParser(prog="mlake")
        sub = parser.add_subparsers(dest="command")
        cmd = sub.add_parser("work")

        def fail(args: argparse.Namespace) -> int:
            raise error

        cmd.set_defaults(func=fail)
        return parser

    return build


@pytest.mark.parametrize(
    ("error", "status", "expected"),
    [
        (
            OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "runs/tables/x.parquet"),
            1,
            "runs/tables/x.parquet: No space left on device; free disk space",
        ),
        (
            PermissionError(errno.EACCES, os.strerror(errno.EACCES), "/ro/runs"),
            1,
            "/ro/runs: Permission denied; it cannot be written here: choose another place",
        ),
        (
            OSError(errno.EROFS, os.strerror(errno.EROFS), "/mnt/ro"),
            1,
            "/mnt/ro: Read-only file system; the file system is read-only",
        ),
        (
            FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), "out"),
            1,
            "out: File exists; it already exists: choose another path",
        ),
        (OSError("something odd"), 1, "mlake: error: something odd"),
        (KeyboardInterrupt(), 130, "interrupted. Every piece finished so far is saved"),
    ],
)
def test_os_errors_and_interrupts_are_one_line(
    monkeypatch, capsys, error: BaseException, status: int, expected: str
) -> None:
    monkeypatch.setattr(cli, "build_parser", _parser_raising(error))
    assert cli.main(["work"]) == status
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err and err.count("\n") == 1


def test_a_broken_pipe_is_quiet(monkeypatch, capsys) -> None:
    monkeypatch.setattr(cli, "build_parser", _parser_raising(BrokenPipeError()))
    assert cli.main(["work"]) == 0
    assert capsys.readouterr().err == ""
