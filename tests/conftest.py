"""Shared fixtures: the real MLaKE data (loaded once per session)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mlake_core.data.paths import default_candidates


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
