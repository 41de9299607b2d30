"""The results store: one folder per run, tables as parquet, arrays as npz, a ``meta.json``.

A *run* is identified by its kind (``knowledge``, ``tracing``, ...) and a hash of everything
that determines its result (model identity, data version, facts, method config); computing
the same thing twice finds the same folder.  Inside it, a run saves named pieces (a table per
language, an array per fact, ...) as they finish, so an interrupted run resumes where it
stopped and a new figure never means recomputing what is on disk (:meth:`Run.load_or_compute`).
Every write is atomic (temporary file in the same folder, then rename).

Layout::

    <results root>/<kind>/<key>/
        key.json        what the key hashes (checked on reopen: a hash collision is an error)
        meta.json       provenance (package versions, git commit, model info, configs) and
                        status ("running" / "complete")
        tables/*.parquet
        arrays/*.npz
        *.json          small named JSON documents (summaries, counts)
        claims/*.lock   the claims on pieces being computed (:meth:`Run.claim`; empty files)

The results root is ``--results-dir``, else ``$MLAKE_RESULTS``, else ``./runs``.
"""

from __future__ import annotations

import errno
import json
import os
import zipfile
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake_core.errors import ConfigError, DataError
from mlake_core.files import atomic_write
from mlake_core.provenance import provenance, stable_hash

#: Environment variable naming the results root.
RESULTS_ENV = "MLAKE_RESULTS"


def results_root(explicit: str | os.PathLike[str] | None = None) -> Path:
    """``explicit``, else ``$MLAKE_RESULTS``, else ``./runs``."""
    if explicit is not None:
        return Path(explicit).expanduser()
    env = os.environ.get(RESULTS_ENV)
    return Path(env).expanduser() if env else Path("runs")


#: Every piece is written through :func:`mlake_core.files.atomic_write` (a name of this module,
#: so that tests can watch the store's writes).
_atomic_write = atomic_write


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write a text file shared by the runs of a results root (UTF-8, atomically, with the
    mode the umask gives), as every piece of a run is written."""

    def write(tmp: Path) -> None:
        tmp.write_text(text, encoding="utf-8")

    _atomic_write(Path(path), write)


def _holds(path: Path, text: str) -> bool:
    """Whether the file ``path`` exists and holds exactly ``text`` (UTF-8)."""
    try:
        return path.read_bytes() == text.encode("utf-8")
    except OSError:  # no such file (or none readable): it is written
        return False


def _check_name(name: str) -> None:
    if not name or "/" in name or "\\" in name or name.startswith("."):
        raise ValueError(f"bad result name {name!r}: use a plain file name without folders")


@dataclass(frozen=True)
class Run:
    """One run folder (see the module docstring)."""

    path: Path
    kind: str
    key: str

    # -- meta ----------------------------------------------------------------------------

    @property
    def meta(self) -> dict[str, Any]:
        """The contents of ``meta.json`` (empty before :meth:`write_meta`)."""
        return self.load_json("meta") if self.has_json("meta") else {}

    def write_meta(self, **fields: Any) -> None:
        """Merge ``fields`` into ``meta.json`` (provenance is added on first write).  Nothing
        is written when that changes nothing, so reading back a complete run never writes
        (a read-only results folder can be read)."""
        current = self.meta
        meta = dict(current) or {"kind": self.kind, "key": self.key, **provenance()}
        meta.update(fields)
        if current and json.loads(json.dumps(meta, default=str)) == current:
            return
        self.save_json("meta", meta)

    @property
    def complete(self) -> bool:
        """Whether the run was marked complete."""
        return self.meta.get("status") == "complete"

    # -- tables --------------------------------------------------------------------------

    def table_path(self, name: str) -> Path:
        _check_name(name)
        return self.path / "tables" / f"{name}.parquet"

    def has_table(self, name: str) -> bool:
        return self.table_path(name).is_file()

    def save_table(self, name: str, table: Any) -> Path:
        """Save a pandas DataFrame as ``tables/<name>.parquet`` (atomically)."""
        path = self.table_path(name)
        _atomic_write(path, lambda tmp: table.to_parquet(tmp, index=False))
        return path

    def load_table(self, name: str, *, columns: Sequence[str] = (), what: str = "") -> Any:
        """Load ``tables/<name>.parquet`` as a pandas DataFrame.

        Args:
            name: the table.
            columns: columns it must have (a table of another schema is refused, not read).
            what: what the caller reads, for the error (``"a knowledge table"``).

        Raises:
            DataError: no such file, an unreadable one, or one without ``columns`` (naming
                the file and the missing columns).
        """
        import pandas as pd

        path = self.table_path(name)
        if not path.is_file():
            raise DataError(f"{path}: no such result table")
        try:
            table = pd.read_parquet(path)
        except (OSError, ValueError) as err:
            raise DataError(
                f"{path}: unreadable result table ({err}); delete it to recompute"
            ) from None
        missing = [c for c in columns if c not in table.columns]
        if missing:
            raise DataError(
                f"{path}: not {what or 'the expected table'} (no column {', '.join(missing)}); "
                "delete it to recompute"
            )
        return table

    # -- arrays --------------------------------------------------------------------------

    def arrays_path(self, name: str) -> Path:
        _check_name(name)
        return self.path / "arrays" / f"{name}.npz"

    def has_arrays(self, name: str) -> bool:
        return self.arrays_path(name).is_file()

    def save_arrays(self, name: str, arrays: Mapping[str, Any]) -> Path:
        """Save numpy arrays (or tensors) as ``arrays/<name>.npz`` (atomically)."""
        import numpy as np

        plain = {
            k: np.asarray(v.detach().cpu() if hasattr(v, "detach") else v)
            for k, v in arrays.items()
        }
        path = self.arrays_path(name)

        def write(tmp: Path) -> None:
            with tmp.open("wb") as fh:
                np.savez_compressed(fh, allow_pickle=False, **plain)

        _atomic_write(path, write)
        return path

    def load_arrays(
        self,
        name: str,
        *,
        keys: Sequence[str] = (),
        what: str = "result arrays",
        finite: Sequence[str] = (),
    ) -> dict[str, Any]:
        """Load ``arrays/<name>.npz`` as a dict of numpy arrays (:func:`read_arrays`, with
        the arrays it must hold and those that must be finite)."""
        return read_arrays(self.arrays_path(name), keys=keys, what=what, finite=finite)

    # -- json ----------------------------------------------------------------------------

    def json_path(self, name: str) -> Path:
        _check_name(name)
        return self.path / f"{name}.json"

    def has_json(self, name: str) -> bool:
        return self.json_path(name).is_file()

    def save_json(self, name: str, obj: Any) -> Path:
        """Save a JSON document as ``<name>.json`` (atomically).  Nothing is written when
        the file already holds exactly this document, so a stage reading back a complete run
        rewrites none of its summaries (a read-only results folder can be read)."""
        path = self.json_path(name)
        text = json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n"
        if _holds(path, text):
            return path

        def write(tmp: Path) -> None:
            tmp.write_text(text, encoding="utf-8")

        _atomic_write(path, write)
        return path

    def load_summary(self, what: str) -> Any:
        """The run's ``summary.json``, which a stage writes when it finishes.

        Raises:
            DataError: the run did not finish (no summary), naming the file and ``what``.
        """
        if not self.has_json("summary"):
            raise DataError(f"{self.json_path('summary')}: no {what} (the run did not finish)")
        return self.load_json("summary")

    def load_json(self, name: str) -> Any:
        path = self.json_path(name)
        try:
            with path.open(encoding="utf-8") as fh:
                return json.load(fh)
        except FileNotFoundError:
            raise DataError(f"{path}: no such result file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: malformed JSON ({err}); delete it to recompute") from None

    # -- resumable pieces ----------------------------------------------------------------

    def claim_path(self, name: str) -> Path:
        """The lock file of the claim on piece ``name`` (``claims/<name>.lock``)."""
        _check_name(name)
        return self.path / "claims" / f"{name}.lock"

    @contextmanager
    def claim(self, name: str) -> Iterator[None]:
        """Hold the claim on the piece ``name`` while computing it, so that two processes
        (two workers of a sharded run, or two identical commands started together) never
        compute the same piece: the second waits, then finds the piece saved.

        Take it only when the piece is missing, and check again once it is held (the holder
        before may have saved it); a piece already saved needs no claim, so a read-only
        results folder can be read.  The claim is an OS file lock (``flock``) on
        ``claims/<name>.lock``: the kernel releases it when its process dies, so the claim of
        a killed worker is taken over by the next one that asks, with no timeout to guess.
        The empty lock file stays after release (removing it would let two waiters lock
        different files).

        Raises:
            DataError: the results folder's filesystem has no working file locks (naming the
                lock file).
        """
        from filelock import FileLock

        path = self.claim_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(path, fallback_to_soft=False)
        try:
            lock.acquire()
        except OSError as err:
            if err.errno != errno.ENOSYS:
                raise
            # A filesystem without flock (Lustre mounted without -o flock): a soft lock would
            # outlive a killed worker, so none is taken.
            raise DataError(
                f"{path}: no file locks on this filesystem ({err}); put the results store "
                "on one with working locks (local disk, NFSv4, Lustre mounted with -o flock)"
            ) from None
        try:
            yield
        finally:
            lock.release()

    def load_or_compute_table(
        self, name: str, compute: Callable[[], Any], *, columns: Sequence[str] = ()
    ) -> tuple[Any, bool]:
        """The table ``name``: loaded if saved (and it has ``columns``), else computed and
        saved, under the piece's claim (:meth:`claim`: another process computing it is waited
        for, and its table read).

        Returns:
            ``(table, computed)`` where ``computed`` says whether ``compute`` ran.
        """
        if self.has_table(name):
            return self.load_table(name, columns=columns), False
        with self.claim(name):
            if self.has_table(name):  # saved by the claim's holder before
                return self.load_table(name, columns=columns), False
            table = compute()
            self.save_table(name, table)
        return table, True

    def load_or_compute_arrays(
        self,
        name: str,
        compute: Callable[[], Mapping[str, Any] | None],
        *,
        keys: Sequence[str] = (),
        what: str = "result arrays",
        finite: Sequence[str] = (),
    ) -> tuple[dict[str, Any] | None, bool]:
        """The arrays ``name``: loaded if saved (:meth:`load_arrays` with ``keys``, ``what``
        and ``finite``), else computed and saved, under the piece's claim (:meth:`claim`:
        another process computing it is waited for, and its arrays read).  ``compute`` may
        return ``None`` (nothing to save: a piece that cannot be computed, such as a skipped
        edit); then nothing is saved and ``(None, True)`` is returned.

        Returns:
            ``(arrays, computed)`` where ``computed`` says whether ``compute`` ran.
        """
        if self.has_arrays(name):
            return self.load_arrays(name, keys=keys, what=what, finite=finite), False
        with self.claim(name):
            if self.has_arrays(name):  # saved by the claim's holder before
                return self.load_arrays(name, keys=keys, what=what, finite=finite), False
            arrays = compute()
            if arrays is None:
                return None, True
            self.save_arrays(name, arrays)
        return dict(arrays), True


def read_arrays(
    path: str | os.PathLike[str],
    *,
    keys: Sequence[str] = (),
    what: str = "result arrays",
    finite: Sequence[str] = (),
) -> dict[str, Any]:
    """Load one saved ``.npz`` file of a run (``arrays/<name>.npz``) as a dict of numpy arrays.

    Args:
        path: the file.
        keys: arrays the file must hold ...
        what: ... to be what the caller reads (named in the error), e.g. ``"a fact trace"``.
        finite: arrays that must hold no NaN or infinity (a damaged result would otherwise
            change every average printed from it).

    Raises:
        DataError: no such file, an unreadable one, one without ``keys``, or one with
            non-finite values in ``finite`` (the message names it and the array).
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such result arrays")
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(
            f"{path}: unreadable result arrays ({err}); delete it to recompute"
        ) from None
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise DataError(f"{path}: not {what} (no {', '.join(missing)} array)")
    bad = [
        k
        for k in finite
        if k in arrays
        and np.issubdtype(arrays[k].dtype, np.number)
        and not bool(np.isfinite(arrays[k]).all())
    ]
    if bad:
        raise DataError(
            f"{path}: {what} with NaN or infinite values in {', '.join(bad)}; "
            "delete it to recompute"
        )
    return arrays


def read_run(path: str | os.PathLike[str], kind: str) -> Run:
    """An existing run folder of ``kind``, to read its results back (the ``load`` methods of
    the result classes start here).

    Args:
        path: the run folder (``<results root>/<kind>/<key>``; it may have been moved).
        kind: the kind of run expected, e.g. ``"knowledge"``.

    Raises:
        DataError: no such folder, a folder that is not a run of the store (no
            ``meta.json``), or a run of another kind; the message names the folder.
    """
    path = Path(path)
    if not path.is_dir():
        raise DataError(f"{path}: no such run folder (no meta.json; expected a {kind} run)")
    run = Run(path=path, kind=kind, key=path.name)
    if not run.has_json("meta"):
        raise DataError(f"{path}: not a run folder of the results store (no meta.json)")
    found = str(run.meta.get("kind") or "")
    if found != kind:
        raise DataError(f"{path}: a {found or 'unknown'} run, expected a {kind} run")
    return run


def open_run(
    kind: str, key_parts: Mapping[str, Any], root: str | os.PathLike[str] | None = None
) -> Run:
    """Open (creating if needed) the run of ``kind`` determined by ``key_parts``.

    Args:
        kind: what the run computes, e.g. ``"knowledge"``; a folder name.
        key_parts: everything that determines the result (JSON-serialisable); hashed into the
            folder name and saved as ``key.json``.
        root: results root (see :func:`results_root`).

    Raises:
        ConfigError: if the folder exists with a different ``key.json`` (hash collision or a
            hand-edited folder).
    """
    _check_name(kind)
    key = stable_hash(dict(key_parts), length=16)
    path = results_root(root) / kind / key
    run = Run(path=path, kind=kind, key=key)
    parts = json.loads(json.dumps(dict(key_parts), default=str))
    if run.has_json("key"):
        existing = run.load_json("key")
        if existing != parts:
            raise ConfigError(
                f"{run.json_path('key')}: this run folder holds a different computation; "
                "move it away or pass another --results-dir"
            )
    else:
        run.save_json("key", parts)
    return run
