"""Fixtures of the editing tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlake_core.models import load_adapter


@pytest.fixture(scope="module")
def adapter(micro_tiny: Path):
    """The micro mlake-tiny on the TransformerLens backend, one per test module (edits are
    applied and restored inside tests; a module's tests share it)."""
    return load_adapter(str(micro_tiny), "tlens", device="cpu")
