"""ROME's and MEMIT's key statistics are computed once, whoever asks for them at the same time:
two processes (the workers of a sharded run) that need the same second moment at once, one
computes and saves it and the other waits and reads it (fast: no model, the measurement
replaced by a recorded one in both processes)."""

from __future__ import annotations

import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import mlake_core.editing.covariance as covariance

DOCS = ["one document", "another document"]
IDENT = {"model_id": "a model", "backend": "hf", "dtype": "float32"}


def _measured(log: Path) -> object:
    """A key_second_moment that records its process in ``log`` and takes a while (so that
    the other process asks while it measures)."""

    def measure(adapter, layer, docs, *, n_tokens, run, **_kw):  # type: ignore[no-untyped-def]
        with log.open("a") as fh:
            fh.write(f"{os.getpid()}\n")
        time.sleep(1.0)
        return torch.eye(3, dtype=torch.float64) * (layer + 1), 7

    return measure


def _worker(root: str, log: str, start: object, out: object) -> None:
    """In another process: wait for the start, then ask for layer 2's second moment."""
    covariance.key_second_moment = _measured(Path(log))  # type: ignore[assignment]
    start.wait()  # type: ignore[attr-defined]
    moment = covariance.cached_second_moment(None, IDENT, 2, DOCS, results_dir=root)
    out.put(moment.numpy().tolist())  # type: ignore[attr-defined]


def test_two_workers_compute_the_second_moment_once(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    log = tmp_path / "measured.txt"
    start, out = ctx.Event(), ctx.Queue()
    workers = [
        ctx.Process(target=_worker, args=(str(tmp_path / "store"), str(log), start, out))
        for _ in range(2)
    ]
    for w in workers:
        w.start()
    start.set()
    got = [out.get(timeout=60) for _ in workers]
    for w in workers:
        w.join(timeout=30)
        assert w.exitcode == 0
    assert len(log.read_text().split()) == 1  # measured by one worker only
    expected = (np.eye(3) * 3).tolist()
    assert got == [expected, expected]  # the other read what it saved
    # Saved once, read back afterwards without measuring or taking the claim again.
    runs = list((tmp_path / "store" / "covariance").iterdir())
    assert len(runs) == 1 and (runs[0] / "arrays" / "moment.npz").is_file()


def test_a_saved_second_moment_is_read_without_a_claim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(covariance, "key_second_moment", _measured(tmp_path / "measured.txt"))
    first = covariance.cached_second_moment(None, IDENT, 0, DOCS, results_dir=tmp_path)
    (run,) = list((tmp_path / "covariance").iterdir())
    claim = run / "claims" / "moment.lock"
    claim.unlink()
    again = covariance.cached_second_moment(None, IDENT, 0, DOCS, results_dir=tmp_path)
    assert torch.equal(first, again)
    assert not claim.exists()  # a saved moment is read, no claim taken
    assert len((tmp_path / "measured.txt").read_text().split()) == 1
