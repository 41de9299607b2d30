"""Where trained mlake-tiny models live (the cache folder) and training one when it is missing."""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock, Timeout

from mlake_core.files import CACHE_ENV as CACHE_ENV  # re-exported
from mlake_core.files import cache_dir
from mlake_core.models.mlake_tiny.config import TINY_NAME, TinyTrainConfig, describe_config
from mlake_core.models.mlake_tiny.train import train_tiny
from mlake_core.models.mlake_tiny_metadata import METADATA_FILE

if TYPE_CHECKING:
    from mlake_core.data.dataset import MlakeDataset


def reads_subjects(config: TinyTrainConfig) -> bool:
    """Whether training with ``config`` reads the located subject spans (so a model trained
    on other spans is another model): subject-only prompts (``subject_prompts``), entity
    documents (``entity_text``), the logit-lens loss at the subject's last token
    (``enrichment_layer >= 0`` with a positive ``enrichment_weight``), subject-route masking
    (``route_masking``), interchange training at the subject (``interchange``), and context
    dropout, which replaces the question tokens outside the subject (``context_dropout``).
    ``name_entities`` alone does not: its entities' routes are their own synthetic names.
    (Which facts are trained is drawn among those with a located subject in every language
    for every config, so every folder names its trained facts: :func:`trained_facts_sha256`.)"""
    return bool(
        config.subject_prompts
        or config.entity_text
        or (config.enrichment_layer >= 0 and config.enrichment_weight > 0)
        or config.route_masking > 0
        or config.interchange > 0
        or config.context_dropout > 0
    )


def trained_facts_sha256(dataset: MlakeDataset, config: TinyTrainConfig) -> str:
    """SHA-256 over the ids of the facts ``config`` trains on in ``dataset``
    (:func:`~mlake_core.models.mlake_tiny.corpus.select_facts`).  The draw is among the facts
    whose subject is located in every language, so a better subject locator changes which
    facts are drawn: a folder names them, and a model trained on other facts is never
    reused (before this, a cache trained before the subject locator changed was)."""
    from mlake_core.models.mlake_tiny.corpus import select_facts

    ids = select_facts(dataset, config)
    return hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()


def model_dir(
    config: TinyTrainConfig,
    root: Path | None = None,
    data: str = "",
    subjects: str = "",
    facts: str = "",
) -> Path:
    """Folder of the mlake-tiny trained with ``config`` (on data other than the published
    release: ``data``, :func:`~mlake_core.data.paths.data_suffix`).  ``facts``
    (:func:`trained_facts_sha256`) names the trained facts (``-facts`` and its first 8 hex
    digits; :func:`tiny_dir` always passes it).  A config that reads subject spans
    (:func:`reads_subjects`) names the dataset's ``subjects_sha256`` too (``-subj`` and its
    first 8 hex digits), so a model trained on other spans is never reused.

    Raises:
        ValueError: a config that reads subject spans without ``subjects``.
    """
    tag = f"-facts{facts[:8]}" if facts else ""
    if reads_subjects(config):
        if not subjects:
            raise ValueError("model_dir: this config reads subject spans; pass subjects")
        tag += f"-subj{subjects[:8]}"
    return (root or cache_dir()) / "models" / f"{TINY_NAME}-{config.key()}{data}{tag}"


def tiny_dir(
    config: TinyTrainConfig,
    data_dir: str | os.PathLike[str] | None = None,
    root: Path | None = None,
    dataset: MlakeDataset | None = None,
) -> Path:
    """:func:`model_dir` of ``config`` for the data under ``data_dir``: its content tag, the
    trained facts, and for a config that reads subject spans the located subjects of the
    training languages (``dataset``, else loaded: from the located-dataset cache, under a
    second)."""
    from mlake_core.data.dataset import load_mlake
    from mlake_core.data.paths import data_suffix

    if dataset is None:
        dataset = load_mlake(data_dir, version=config.data_version, langs=config.langs)
    subjects = dataset.subjects_sha256 if reads_subjects(config) else ""
    return model_dir(
        config,
        root,
        data_suffix(data_dir, config.data_version),
        subjects,
        trained_facts_sha256(dataset, config),
    )


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

    config = config or TinyTrainConfig()
    # Its folder names the trained facts (and the located subjects where training reads them).
    dataset = load_mlake(data_dir, version=config.data_version, langs=config.langs)
    path = tiny_dir(config, data_dir, root, dataset)
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
        return train_tiny(config, dataset, path, progress=progress, show_bar=show_bar)
    finally:
        lock.release()
