"""Which dataset a run reads: MLaKE or another multilingual knowledge-editing dataset.

The registry (:data:`DATASETS`, :func:`get_source`, :func:`load_dataset`) names every dataset
mlake reads; ``--dataset NAME`` picks one (default ``mlake``):

========================  =================================================================
``mlake``                 MLaKE (:func:`~mlake_core.data.dataset.load_mlake`)
``mzsre``                 MzsRE of ReMaKE (:mod:`mlake_core.data.mzsre`), 12 languages
``bmike53-zsre``          BMIKE-53's zsRE task (:mod:`mlake_core.data.bmike`), 53 languages
``bmike53-counterfact``   BMIKE-53's CounterFact task
``bmike53-wfd``           BMIKE-53's WikiFactDiff task
========================  =================================================================

Every reader returns the same objects as MLaKE's (:class:`~mlake_core.data.dataset.Fact`
with one :class:`~mlake_core.data.dataset.FactView` per language), so the analyses take them
unchanged; what the other datasets map, and lack, is in :mod:`mlake_core.data.external`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake_core.data.bmike import BMIKE_LANGUAGES, TASKS
from mlake_core.data.dataset import MlakeDataset
from mlake_core.data.mzsre import MZSRE_LANGUAGES
from mlake_core.errors import ConfigError

DEFAULT_DATASET = "mlake"


# --- the registry --------------------------------------------------------------------------


@dataclass(frozen=True)
class DatasetSource:
    """One dataset mlake reads.

    Attributes:
        name: the registry name (``--dataset``).
        title: what messages call it.
        load: ``load(data_dir, version, langs) -> MlakeDataset``.
        languages: the languages it has (``()`` for MLaKE: those of the data folder).
        fetch: ``fetch(dest, base_url=None) -> Path`` downloads its public files (``None``:
            MLaKE's own ``mlake data fetch --version``).
    """

    name: str
    title: str
    load: Callable[[Any, str, Any], MlakeDataset]
    languages: tuple[str, ...] = ()
    fetch: Callable[..., Path] | None = None


def _load_mlake(data_dir: Any, version: str, langs: Any) -> MlakeDataset:
    from mlake_core.data.dataset import load_mlake

    return load_mlake(data_dir, version, langs)


def _mzsre(data_dir: Any, version: str, langs: Any) -> MlakeDataset:
    from mlake_core.data.mzsre import load_mzsre

    return load_mzsre(data_dir, langs)


def _bmike(task: str) -> Callable[[Any, str, Any], MlakeDataset]:
    def load(data_dir: Any, version: str, langs: Any) -> MlakeDataset:
        from mlake_core.data.bmike import load_bmike

        return load_bmike(data_dir, task, langs)

    return load


def _fetch(name: str) -> Callable[..., Path]:
    def fetch(dest: Path, base_url: str | None = None, **kw: Any) -> Path:
        from mlake_core.data.fetch import fetch_dataset

        return fetch_dataset(name, dest, base_url=base_url, **kw)

    return fetch


def _sources() -> dict[str, DatasetSource]:
    out = {
        "mlake": DatasetSource("mlake", "MLaKE", _load_mlake),
        "mzsre": DatasetSource("mzsre", "MzsRE", _mzsre, MZSRE_LANGUAGES, _fetch("mzsre")),
    }
    for task in TASKS.values():
        out[task.name] = DatasetSource(
            task.name, task.title, _bmike(task.key), BMIKE_LANGUAGES, _fetch(task.name)
        )
    return out


#: Registry names, in the order help lists them.
DATASETS: tuple[str, ...] = (
    "mlake",
    "mzsre",
    "bmike53-zsre",
    "bmike53-counterfact",
    "bmike53-wfd",
)


def get_source(name: str) -> DatasetSource:
    """The registered dataset ``name``.

    Raises:
        ConfigError: for an unknown name (listing the known ones; ``bmike53`` alone asks
            for one of its three tasks).
    """
    sources = _sources()
    if name in sources:
        return sources[name]
    if name == "bmike53":
        raise ConfigError(
            "--dataset bmike53: BMIKE-53 has three tasks; choose bmike53-zsre, "
            "bmike53-counterfact or bmike53-wfd"
        )
    raise ConfigError(f"unknown dataset {name!r}; choose {', '.join(DATASETS)}")


def load_dataset(
    name: str,
    data_dir: str | os.PathLike[str] | None,
    version: str,
    langs: str | Iterable[str] | None,
) -> MlakeDataset:
    """Load dataset ``name`` (``version`` is MLaKE's release; the others have one).

    Raises:
        ConfigError, DataError: an unknown name or language, a missing or malformed file
            (naming the file and record).
    """
    return get_source(name).load(data_dir, version, langs)
