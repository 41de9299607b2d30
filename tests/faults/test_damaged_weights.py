"""Damaged weight files are refused with one error naming the file: truncated, empty, a bad
header, or weights that are not finite (which would otherwise run and report nothing known)."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.tiny import build_tiny_model


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    return build_tiny_model("llama", tmp_path_factory.mktemp("good"), seed=0)


def _copy(good: Path, tmp_path: Path) -> tuple[Path, Path]:
    folder = tmp_path / "model"
    shutil.copytree(good, folder)
    (weights,) = sorted(folder.glob("*.safetensors"))
    return folder, weights


def test_the_good_model_loads(good: Path) -> None:
    assert load_adapter(str(good), "tlens", device="cpu").n_layers >= 1


@pytest.mark.parametrize("damage", ["truncated", "empty", "bad header"])
def test_unreadable_weight_files_name_the_file(good: Path, tmp_path: Path, damage: str) -> None:
    folder, weights = _copy(good, tmp_path)
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        header = b"{not json"
        weights.write_bytes(struct.pack("<Q", len(header)) + header + data[8:])
    with pytest.raises(ConfigError) as err:
        load_adapter(str(folder), "tlens", device="cpu")
    message = str(err.value)
    assert str(weights) in message and "truncated or damaged" in message, message


def test_non_finite_weights_are_refused(good: Path, tmp_path: Path) -> None:
    folder, weights = _copy(good, tmp_path)
    tensors = load_file(weights)
    name = next(n for n in tensors if "mlp" in n and n.endswith("weight"))
    tensors[name][0, 0] = float("nan")
    metadata = json.loads(
        weights.read_bytes()[8 : 8 + struct.unpack("<Q", weights.read_bytes()[:8])[0]]
    ).get("__metadata__")
    save_file(tensors, weights, metadata=metadata)
    with pytest.raises(ConfigError) as err:
        load_adapter(str(folder), "nnsight", device="cpu")
    message = str(err.value)
    assert str(weights) in message and "non-finite" in message and name in message, message
    assert torch.isnan(tensors[name]).any()
