"""Shared fixtures: the real MLaKE data (loaded once per session).

Torch runs on one CPU thread in the tests (``OMP_NUM_THREADS``, default 1 here, inherited by
the subprocesses tests start): with torch's default of one thread per core, the suite took
96 minutes instead of about 6 on a 2-core machine busy with another job.  Set
``OMP_NUM_THREADS=N`` to use N.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlake_core.data.paths import default_candidates

#: Torch's CPU threads in the tests when ``OMP_NUM_THREADS`` is unset.
TEST_THREADS = 1


def pytest_configure(config: pytest.Config) -> None:
    """Pin torch's threads before any test imports it."""
    threads = int(os.environ.setdefault("OMP_NUM_THREADS", str(TEST_THREADS)))
    import torch

    torch.set_num_threads(threads)


def real_data_dir() -> Path | None:
    env = os.environ.get("MLAKE_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    return next((p for p in default_candidates() if p.is_dir()), None)


@pytest.fixture(scope="session")
def mlake_v2411():
    """The full v2024-11 release in all five languages (about 8 s to load)."""
    from mlake_core.data import load_mlake

    root = real_data_dir()
    if root is None:
        pytest.fail("MLaKE data not found: set MLAKE_DATA or put it at ../shared/mlake")
    return load_mlake(root, "v2024-11")


#: A micro mlake-tiny: 6 facts in five languages, 2 layers of width 64; trains in seconds.
MICRO_TINY = {
    "facts": 6,
    "vocab_size": 1024,
    "d_model": 64,
    "n_layers": 2,
    "n_heads": 2,
    "d_mlp": 128,
    "batch_size": 16,
    "lr": 5e-3,
    "warmup_steps": 5,
    "max_epochs": 40,
    "eval_every": 2,
}


@pytest.fixture(scope="session")
def micro_tiny(mlake_v2411, tmp_path_factory):
    """Folder of a micro mlake-tiny trained on the real data (session-cached)."""
    from mlake_core.models.mlake_tiny import TinyTrainConfig, train_tiny

    out = tmp_path_factory.mktemp("micro_tiny") / "model"
    return train_tiny(TinyTrainConfig(**MICRO_TINY), mlake_v2411, out, show_bar=False)
