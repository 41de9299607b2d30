"""The located dataset, cached: loading MLaKE is nearly all subject location (7-8 s for the
five languages), and its result depends only on the data files and the code.

A cached :class:`~mlake_core.data.dataset.MlakeDataset` is one pickle file in
``<cache>/data/``, named after everything the located dataset depends on
(:func:`cache_key`):

- the SHA-256 of the release's files (:func:`~mlake_core.data.paths.content_sha256`, the
  hash that run keys name for edited data);
- the code version: a SHA-256 over the source of every module of :mod:`mlake_core.data`
  and of :mod:`mlake_core.languages`, the versions of the analyzers (jieba, fugashi,
  unidic-lite) and of Python, and :data:`CACHE_FORMAT`;
- the version, the languages asked for, and the languages present in the data folder.

A file is written atomically (:func:`mlake_core.files.atomic_write`), so concurrent loads
never read a partial one; writing one removes the same data's entries of other code
versions left unwritten for a day.  A cache file that cannot be read back (truncated, corrupt,
another key inside) is rebuilt with a warning; a cache folder that cannot be written
(read-only) is used for reading only, and the dataset is built in memory.  The cache
folder is ``$MLAKE_CACHE``, else ``$XDG_CACHE_HOME/mlake``, else ``~/.cache/mlake``, as
for models.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.metadata
import pickle
import sys
import time
import warnings
from functools import cache
from pathlib import Path
from typing import Any

from mlake_core.files import CACHE_ENV as CACHE_ENV  # re-exported
from mlake_core.files import atomic_write, cache_dir
from mlake_core.languages import LANGUAGES

#: Bumped when the cache file's layout changes.
CACHE_FORMAT = 1
#: Entries of the same data for another code version are removed after this long unwritten.
PRUNE_AFTER_S = 24 * 3600
#: Distributions whose versions change located subjects.
ANALYZERS = ("jieba", "fugashi", "unidic-lite")


class CacheWarning(UserWarning):
    """A cached dataset could not be read back or written; the load goes on without it."""


@cache
def code_version() -> str:
    """SHA-256 over what the located dataset is computed by: the source of every module of
    ``mlake_core.data`` and of ``mlake_core.languages``, the analyzers' and Python's
    versions, and :data:`CACHE_FORMAT`."""
    digest = hashlib.sha256(f"format {CACHE_FORMAT}\0python {sys.version_info[:2]}\0".encode())
    here = Path(__file__).resolve().parent
    for path in [*sorted(here.glob("*.py")), here.parent / "languages.py"]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    for name in ANALYZERS:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "absent"
        digest.update(f"{name} {version}\0".encode())
    return digest.hexdigest()


def cache_key(
    version: str,
    langs: tuple[str, ...],
    content_sha256: str,
    present: tuple[str, ...] = LANGUAGES,
) -> str:
    """The file name stem of a located dataset: the languages asked for and, when the data
    folder holds other languages than MLaKE's five, the languages present (``-of-...``:
    subjects are located with all of them)."""
    of = "" if present == LANGUAGES else f"-of-{'-'.join(present)}"
    return f"{version}-{'-'.join(langs)}{of}-{content_sha256[:16]}-{code_version()[:16]}"


def cache_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_dir()) / "data" / f"located-{key}.pkl"


def read_cached(path: Path, key: str) -> Any | None:
    """The dataset cached at ``path`` under ``key``, or ``None`` when there is none; a file
    that cannot be read back is reported (:class:`CacheWarning`) and ``None`` returned, so
    the caller builds the dataset again."""
    collecting = gc.isenabled()
    gc.disable()  # many small objects: unpickling took twice as long with collections on
    try:
        with path.open("rb") as fh:
            stored_key, dataset = pickle.load(fh)
    except FileNotFoundError:
        return None
    except Exception as err:  # any unreadable cache is rebuilt (unpickling raises anything)
        warnings.warn(
            f"{path}: cached dataset unreadable ({type(err).__name__}: {err}); rebuilding it",
            CacheWarning,
            stacklevel=3,
        )
        return None
    finally:
        if collecting:
            gc.enable()
    if stored_key != key:
        warnings.warn(
            f"{path}: cached dataset is for another key ({stored_key!r}); rebuilding it",
            CacheWarning,
            stacklevel=3,
        )
        return None
    return dataset


def _prune(path: Path) -> None:
    """Remove the same data's entries of other code versions that were not written for
    :data:`PRUNE_AFTER_S` (each edit of the data layer would otherwise leave one behind);
    a recent one may belong to another checkout sharing the cache folder."""
    stem = path.name.rsplit("-", 1)[0]
    now = time.time()
    for old in path.parent.glob(f"{stem}-*.pkl"):
        try:
            if old != path and now - old.stat().st_mtime > PRUNE_AFTER_S:
                old.unlink()
        except OSError:
            continue  # gone already, or not ours to remove


def write_cached(path: Path, key: str, dataset: Any) -> bool:
    """Cache ``dataset`` at ``path`` (atomically); ``False`` with a warning when the folder
    cannot be written (read-only, full)."""

    def dump(tmp: Path) -> None:
        with tmp.open("wb") as fh:
            pickle.dump((key, dataset), fh, protocol=pickle.HIGHEST_PROTOCOL)

    try:
        atomic_write(path, dump)
        _prune(path)
    except OSError as err:
        warnings.warn(
            f"{path}: cannot cache the located dataset ({err.strerror or err}); "
            "it is located again on the next load",
            CacheWarning,
            stacklevel=3,
        )
        return False
    return True
