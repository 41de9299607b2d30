"""Torch's CPU threads are pinned (issue 24, item 8): one thread unless ``OMP_NUM_THREADS``
says otherwise, in the tests and in the ``mlake`` command, so that jobs sharing a machine do
not spin against each other."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from mlake import cli


def test_the_tests_run_on_the_pinned_threads() -> None:
    assert torch.get_num_threads() == int(os.environ["OMP_NUM_THREADS"])


@pytest.mark.parametrize(("given", "expected"), [(None, 1), ("", 1), ("3", 3), ("2,1", 2)])
def test_the_cli_pins_torch_threads(
    monkeypatch: pytest.MonkeyPatch, given: str | None, expected: int
) -> None:
    before = torch.get_num_threads()
    if given is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", given)
    try:
        assert cli.pin_threads() == expected
        assert torch.get_num_threads() == expected
        assert os.environ["OMP_NUM_THREADS"] == (given or str(expected))
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("given", ["0", "two", "-1"])
def test_a_bad_thread_count_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], given: str
) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", given)
    assert cli.main(["data", "stats"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"mlake: error: OMP_NUM_THREADS={given!r} must be a positive integer"


def test_a_fresh_cli_process_uses_one_thread_by_default() -> None:
    """Without ``OMP_NUM_THREADS``, torch in a new ``mlake`` process (which imports torch
    after pinning) runs on one thread, not one per core."""
    env = {k: v for k, v in os.environ.items() if k not in {"OMP_NUM_THREADS", "MKL_NUM_THREADS"}}
    code = (
        "import sys, torch\n"
        "from mlake import cli\n"
        "cli.pin_threads()\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "1"
