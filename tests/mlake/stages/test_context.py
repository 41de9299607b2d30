"""The model's identity in result keys (:func:`mlake.stages.context.model_identity`)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from mlake.stages.context import model_identity


def _adapter(**info):
    base = {"model_id": "m", "backend": "tlens", "dtype": "float32", "revision": None}
    return SimpleNamespace(info=SimpleNamespace(**{"commit_hash": None, **base, **info}))


def test_a_gguf_model_is_identified_by_its_content(tmp_path: Path) -> None:
    file = tmp_path / "model.gguf"
    file.write_bytes(b"GGUF")
    a = model_identity(_adapter(gguf_sha256="a" * 64, quantization="Q4_K_M"), file)
    b = model_identity(_adapter(gguf_sha256="b" * 64, quantization="Q4_K_M"), file)
    assert a["gguf_sha256"] == "a" * 64 and a["quantization"] == "Q4_K_M"
    assert a != b  # the same path with other content: other keys


def test_other_models_keep_their_identity(tmp_path: Path) -> None:
    ident = model_identity(_adapter(gguf_sha256=None, quantization=None), "org/name")
    assert ident == {
        "model_id": "m",
        "backend": "tlens",
        "dtype": "float32",
        "revision": None,
        "commit_hash": None,
    }
