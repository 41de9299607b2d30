"""An unknown or uncached hub id fails fast when the hub cannot be reached (issue 24, item 7):
one short connection attempt, then the local cache only, instead of about 30 s of HTTP
retries before the error."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from mlake_core.errors import ConfigError
from mlake_core.models import loading


@pytest.fixture
def listening() -> Iterator[int]:
    """A local TCP port that accepts connections."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    try:
        yield server.getsockname()[1]
    finally:
        server.close()


def _closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    return port


def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


def test_a_reachable_hub_is_reachable(monkeypatch: pytest.MonkeyPatch, listening: int) -> None:
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{listening}")
    assert loading.hub_unreachable() is None


def test_an_unreachable_hub_says_where_and_why(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    port = _closed_port()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{port}")
    why = loading.hub_unreachable()
    assert why is not None and why.startswith(f"127.0.0.1:{port}: ")


def test_the_proxy_is_what_must_be_reachable(
    monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("HTTPS_PROXY", f"http://127.0.0.1:{listening}")
    assert loading.hub_unreachable() is None


@pytest.mark.parametrize(
    ("unreachable", "local_only", "says"),
    [
        # Unreachable: the local cache only (no download, no retries), and the error says so.
        (
            "huggingface.co:443: no route",
            True,
            "the hub is unreachable (huggingface.co:443: no route)",
        ),
        (None, False, "could not download it from the hub"),
    ],
)
def test_the_hub_is_asked_only_when_reachable(
    monkeypatch: pytest.MonkeyPatch, unreachable: str | None, local_only: bool, says: str
) -> None:
    from transformers import AutoConfig

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "hub_unreachable", lambda: unreachable)
    asked: list[bool] = []

    def from_pretrained(source: str, **kwargs: object) -> object:
        asked.append(bool(kwargs["local_files_only"]))
        raise OSError("not found")

    monkeypatch.setattr(AutoConfig, "from_pretrained", from_pretrained)
    with pytest.raises(ConfigError) as err:
        loading.load_adapter("nosuchorg/nosuchmodel", "tlens", device="cpu")
    assert asked == [local_only]
    assert "'nosuchorg/nosuchmodel' is not a local folder" in str(err.value)
    assert says in str(err.value)


def test_an_all_proxy_is_used_and_a_bad_one_is_not_a_traceback(
    monkeypatch: pytest.MonkeyPatch, listening: int
) -> None:
    from huggingface_hub import constants

    _no_proxy(monkeypatch)
    monkeypatch.setattr(constants, "ENDPOINT", f"https://127.0.0.1:{_closed_port()}")
    monkeypatch.setenv("NO_PROXY", "")
    monkeypatch.setenv("ALL_PROXY", f"http://127.0.0.1:{listening}")
    assert loading.hub_unreachable() is None
    monkeypatch.setenv("ALL_PROXY", "http://127.0.0.1:notaport")
    assert loading.hub_unreachable() is None  # not judged here: the download reports it
