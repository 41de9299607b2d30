"""``atomic_write`` leaves no temporary file behind, whenever an interrupt arrives."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlake_core import files


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def test_an_interrupt_in_the_write_leaves_nothing(tmp_path: Path) -> None:
    def write(tmp: Path) -> None:
        tmp.write_text("half", encoding="utf-8")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "a.json", write)
    assert not _leftovers(tmp_path) and not (tmp_path / "a.json").exists()


def test_an_interrupt_right_after_the_file_is_created_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The window the signal test once hit: the temporary file exists, the write has not
    begun (with ``mkstemp`` its name was not known yet, so nothing removed it)."""
    real_close = os.close

    def close_then_interrupt(fd: int) -> None:
        real_close(fd)
        raise KeyboardInterrupt

    monkeypatch.setattr(files.os, "close", close_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        files.atomic_write(tmp_path / "b.json", lambda tmp: tmp.write_text("x", encoding="utf-8"))
    monkeypatch.undo()
    assert not _leftovers(tmp_path) and not (tmp_path / "b.json").exists()


def test_the_file_lands_with_the_umask_mode(tmp_path: Path) -> None:
    files.atomic_write(tmp_path / "c.json", lambda tmp: tmp.write_text("ok", encoding="utf-8"))
    assert (tmp_path / "c.json").read_text(encoding="utf-8") == "ok"
    assert (tmp_path / "c.json").stat().st_mode & 0o777 == files.file_mode()
    assert not _leftovers(tmp_path)
