"""Where trained mlake-tiny models live (the cache folder) and training one when it is missing."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

from filelock import FileLock, Timeout

from mlake_core.files import CACHE_ENV as CACHE_ENV  # re-exported
from mlake_core.files import cache_dir
from mlake_core.models.mlake_tiny.config import TINY_NAME, TinyTrainConfig, describe_config
from mlake_core.models.mlake_tiny.train import train_tiny
from mlake_core.models.mlake_tiny_metadata import METADATA_FILE


def model_dir(config: TinyTrainConfig, root: Path | None = None, data: str = "") -> Path:
    """Folder of the mlake-tiny trained with ``config`` (on data other than the published
    release: ``data``, :func:`~mlake_core.data.paths.data_suffix`)."""
    return (root or cache_dir()) / "models" / f"{TINY_NAME}-{config.key()}{data}"


def is_trained(path: Path) -> bool:
    """Whether ``path`` holds a complete mlake-tiny (weights, tokenizer and metadata)."""
    return all(
        (path / name).is_file()
        for name in ("config.json", "model.safetensors", "tokenizer.json", METADATA_FILE)
    )


def ensure_tiny(
    config: TinyTrainConfig | None = None,
    *,
    data_dir: str | os.PathLike[str] | None = None,
    root: Path | None = None,
    progress: Callable[[str], None] | None = None,
    show_bar: bool = True,
    retrain: bool = False,
) -> Path:
    """The folder of mlake-tiny for ``config`` (default config when ``None``), training it
    first when it is not in the cache.  Training holds a file lock next to the folder: a
    second process asking for the same model says it waits, then uses the first's.

    Args:
        config: training config.
        data_dir: MLaKE data directory (see :func:`mlake_core.data.paths.resolve_data_dir`).
        root: cache folder (default :func:`cache_dir`).
        progress: receives log lines.
        show_bar: show the training progress bar.
        retrain: train again even if cached.
    """
    from mlake_core.data.dataset import load_mlake
    from mlake_core.data.paths import data_suffix

    config = config or TinyTrainConfig()
    path = model_dir(config, root, data_suffix(data_dir, config.data_version))
    if is_trained(path) and not retrain:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # One training per folder: a second process waits for the first, then uses its model.
    lock = FileLock(f"{path}.lock")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        if progress:
            progress(f"waiting for another process training {TINY_NAME} into {path}")
        lock.acquire()
    try:
        if is_trained(path) and not retrain:
            return path
        if retrain and path.exists():
            shutil.rmtree(path)
        if progress:
            progress(f"training {TINY_NAME} ({describe_config(config)}) into {path}")
        dataset = load_mlake(data_dir, version=config.data_version, langs=config.langs)
        return train_tiny(config, dataset, path, progress=progress, show_bar=show_bar)
    finally:
        lock.release()
