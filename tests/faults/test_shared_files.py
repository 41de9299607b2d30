"""Files several processes share are written under a lock: tracing's recommendations file
keeps every process's entries, and a second training of the same mlake-tiny waits for the
first and uses its model."""

from __future__ import annotations

import json
import multiprocessing
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlake.stages.tracing import RECOMMENDED_FILE, _read_recommended, register_recommended_layer
from mlake_core.errors import ConfigError


def _result(i: int) -> SimpleNamespace:
    return SimpleNamespace(
        recommended_layer=i % 5,
        recommended_by_lang={"en": i % 5},
        summaries=[SimpleNamespace(lang="en", n_facts=1, signal=True)],
        run_path=f"runs/tracing/{i}",
    )


def _register_many(root: str, start: int) -> None:
    for i in range(start, start + 25):
        register_recommended_layer({"model": f"m{i}"}, _result(i), root)


def test_concurrent_registrations_keep_every_entry(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_register_many, args=(str(tmp_path), k * 100)) for k in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    path = tmp_path / "tracing" / RECOMMENDED_FILE
    assert len(json.loads(path.read_text())) == 75  # none lost, the file valid JSON
    assert not list(path.parent.glob("*.tmp"))


def test_a_damaged_recommendations_file_names_itself_and_the_recovery(tmp_path: Path) -> None:
    path = tmp_path / "tracing" / RECOMMENDED_FILE
    path.parent.mkdir(parents=True)
    for text in ("{broken", "[1, 2]"):
        path.write_text(text)
        with pytest.raises(
            ConfigError, match=rf"{path}: not a valid recommendations file.*delete it"
        ):
            _read_recommended(path)
        with pytest.raises(ConfigError, match="delete it"):
            register_recommended_layer({"model": "m"}, _result(1), tmp_path)


def test_a_second_training_waits_and_uses_the_first(tmp_path: Path, monkeypatch) -> None:
    from mlake_core.models.mlake_tiny import cache
    from mlake_core.models.mlake_tiny.config import TinyTrainConfig

    trainings: list[Path] = []

    def fake_train(config, dataset, path, progress=None, show_bar=True):
        trainings.append(path)
        time.sleep(1.0)
        path.mkdir(parents=True)
        for name in ("config.json", "model.safetensors", "tokenizer.json", cache.METADATA_FILE):
            (path / name).write_text("{}")
        return path

    monkeypatch.setattr(cache, "train_tiny", fake_train)
    monkeypatch.setattr("mlake_core.data.dataset.load_mlake", lambda *a, **k: None)
    monkeypatch.setattr(cache, "trained_facts_sha256", lambda dataset, config: "f" * 64)
    logs: dict[int, list[str]] = {0: [], 1: []}
    out: dict[int, Path] = {}

    def ask(k: int) -> None:
        out[k] = cache.ensure_tiny(
            TinyTrainConfig(), root=tmp_path, progress=logs[k].append, show_bar=False
        )

    first = threading.Thread(target=ask, args=(0,))
    first.start()
    time.sleep(0.3)
    second = threading.Thread(target=ask, args=(1,))
    second.start()
    first.join(30)
    second.join(30)
    assert len(trainings) == 1 and out[0] == out[1] == trainings[0]
    assert any("waiting for another process training" in line for line in logs[1])
