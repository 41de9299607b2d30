"""Files mlake writes for others to read: atomic writes, the modes the umask gives, and where
mlake's cache folder is.

Results, shared registries and cached models are written through temporary files or folders
(:func:`atomic_write` creates its temporary files 0600, :func:`tempfile.mkdtemp` folders
0700, and the safetensors writer creates 0600 files).  Left so, a results folder or a model cache shared
by a group could be read by its writer alone; the functions here give them the modes the
process's umask gives to any new file or folder.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

#: Environment variable naming mlake's cache folder (models, located datasets, tuned lenses).
CACHE_ENV = "MLAKE_CACHE"


def cache_dir() -> Path:
    """mlake's cache folder: ``$MLAKE_CACHE``, else ``$XDG_CACHE_HOME/mlake``, else
    ``~/.cache/mlake`` (an empty variable counts as unset)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "mlake"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the process's umask (``0o666 & ~umask``)."""
    return 0o666 & ~_umask()


def folder_mode() -> int:
    """The mode a new folder gets under the process's umask (``0o777 & ~umask``)."""
    return 0o777 & ~_umask()


def follow_umask(folder: Path) -> None:
    """Give ``folder`` and everything in it the modes the umask gives new folders and files
    (for a folder written under a temporary name and renamed into place)."""
    files, folders = file_mode(), folder_mode()
    os.chmod(folder, folders)
    for root, dirs, names in os.walk(folder):
        for name in dirs:
            os.chmod(Path(root) / name, folders)
        for name in names:
            os.chmod(Path(root) / name, files)


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write ``path`` through a temporary file in its folder, renamed into place when
    complete; the file gets the mode the umask gives (a temporary file is created 0600).

    Raises:
        OSError: the write failed (a full disk, a read-only folder), naming ``path``: one
            that names no file (what pyarrow, numpy and ``write_text`` raise on a full disk)
            or the temporary file (a read-only folder) is raised again naming ``path``.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # The name is chosen before the file exists, so that an interrupt (SIGINT, SIGTERM) at any
    # point after its creation finds it in ``finally`` and removes it (with mkstemp, one
    # between the file's creation and the name's return left it behind).
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    try:
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except OSError as err:
            raise OSError(err.errno, err.strerror, str(path)) from err
        write(tmp)
        os.chmod(tmp, file_mode())
        tmp.replace(path)
    except OSError as err:
        if err.filename is None and err.errno:
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
        raise
    finally:
        tmp.unlink(missing_ok=True)
