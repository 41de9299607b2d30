"""``mlake models check`` on the tiny checkpoints."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from mlake.commands import models as models_command
from mlake_core.errors import ConfigError
from mlake_core.models.tiny import build_tiny_model

pytestmark = pytest.mark.slow  # builds and runs the tiny models


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny checkpoints these tests load, as ``tests/mlake_core/models``' fixture builds
    them (whose conftest this folder does not see)."""
    root = tmp_path_factory.mktemp("tiny_models")
    return {arch: build_tiny_model(arch, root / arch, seed=0) for arch in ("bloom", "qwen2")}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mlake")
    sub = parser.add_subparsers(dest="command")
    models_command.register(sub)
    return parser


def _run(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    return args.func(args)


@pytest.mark.parametrize("backend", ["tlens", "nnsight"])
def test_check_prints_architecture_layers_sites_bos_device_dtype(
    backend, tiny_models, capsys
) -> None:
    status = _run(["models", "check", "--model", str(tiny_models["bloom"]), "--backend", backend])
    out = capsys.readouterr().out
    assert status == 0
    assert "architecture  bloom (alibi positions, sequential blocks)" in out
    assert "layers        2 (d_model 32, d_mlp 128, vocab 512)" in out
    assert "BOS policy    BOS '<s>' (id 1) exists but the tokenizer does not add it" in out
    assert "device        cpu" in out and "dtype         float32" in out
    assert "transformer.h.{L}.self_attention.dense (output)" in out
    assert "mlp_post.{L}" in out and "transformer.h.{L}.mlp.dense_4h_to_h (input)" in out
    assert "forward       ok" in out


def test_check_json(tiny_models, capsys) -> None:
    _run(
        ["models", "check", "--model", str(tiny_models["qwen2"]), "--backend", "nnsight", "--json"]
    )
    report = json.loads(capsys.readouterr().out)
    assert report["info"]["architecture"] == "qwen2"
    assert report["info"]["bos"]["bos_token"] is None
    assert report["bos_policy"].startswith("no BOS token")
    assert [s["site"] for s in report["sites"]][:2] == ["embed", "resid_pre.{L}"]
    assert report["forward"]["finite"] is True


def test_check_reports_config_errors(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        _run(["models", "check", "--model", str(tmp_path / "missing")])
