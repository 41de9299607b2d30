"""Downloading another dataset's files: through a temporary name, checked, never partial."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mlake_core.data import fetch
from mlake_core.data.fetch import FILE_SETS, FileSet, fetch_dataset, sha256_file
from mlake_core.errors import ConfigError, DataError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "mzsre"
NAMES = sorted(p.name for p in FIXTURE.glob("*.json"))


@pytest.fixture
def local_set(monkeypatch: pytest.MonkeyPatch) -> FileSet:
    """The MzsRE entry pointed at the fixture's files and their checksums."""
    files = FileSet(FIXTURE.as_uri(), "MzsRE", {n: sha256_file(FIXTURE / n) for n in NAMES})
    monkeypatch.setitem(fetch.FILE_SETS, "mzsre", files)
    return files


def test_published_file_sets() -> None:
    assert len(FILE_SETS["mzsre"].sha256) == 11
    for name in ("bmike53-zsre", "bmike53-counterfact", "bmike53-wfd"):
        assert len(FILE_SETS[name].sha256) == 52
        assert not any(k.endswith("_test_en.json") for k in FILE_SETS[name].sha256)
    assert all(len(v) == 64 for v in FILE_SETS["mzsre"].sha256.values())
    assert FILE_SETS["mzsre"].base_url.startswith("https://raw.githubusercontent.com/")
    with pytest.raises(ConfigError, match="--dataset 'mlake'"):
        fetch_dataset("mlake", "x")


def test_fetch_from_file_url(local_set: FileSet, tmp_path: Path) -> None:
    lines: list[str] = []
    folder = fetch_dataset("mzsre", tmp_path, progress=lines.append)
    assert folder == tmp_path / "MzsRE"
    assert sorted(p.name for p in folder.iterdir()) == NAMES  # no temporary file left
    for n in NAMES:
        assert (folder / n).read_bytes() == (FIXTURE / n).read_bytes()
    assert len(lines) == 3
    # Present with the right checksum: kept, not downloaded again.
    lines.clear()
    fetch_dataset("mzsre", tmp_path, progress=lines.append)
    assert lines == []


@pytest.fixture
def server() -> Iterator[str]:
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(FIXTURE))
    handler.log_message = lambda *a, **k: None  # type: ignore[attr-defined]
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_fetch_over_http_and_checksum_mismatch(
    local_set: FileSet, server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = fetch_dataset("mzsre", tmp_path / "ok", base_url=server)
    assert sorted(p.name for p in folder.iterdir()) == NAMES
    wrong = FileSet(server, "MzsRE", {NAMES[0]: "0" * 64})
    monkeypatch.setitem(fetch.FILE_SETS, "mzsre", wrong)
    with pytest.raises(DataError, match="not the published 0000"):
        fetch_dataset("mzsre", tmp_path / "bad")
    assert list((tmp_path / "bad" / "MzsRE").iterdir()) == []  # nothing partial


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_unreachable_fails_clearly_and_leaves_nothing(local_set: FileSet, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(DataError) as err:
        fetch_dataset("mzsre", tmp_path, base_url=url, timeout=5)
    message = str(err.value)
    assert f"cannot reach {url}/{NAMES[0]}" in message
    assert f"download it yourself from {url}/{NAMES[0]} into {tmp_path / 'MzsRE'}" in message
    assert list((tmp_path / "MzsRE").iterdir()) == []
