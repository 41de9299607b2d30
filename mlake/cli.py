"""The ``mlake`` console script.

Expected errors (:class:`~mlake_core.errors.MlakeError`: bad input files, unknown options)
are printed as one line naming the problem, and the process exits with status 2.  Errors of
the operating system (a full disk, a results folder that cannot be written, a path that
already exists) are one line naming the file and what to do, status 1; Ctrl-C says that what
finished is saved and how to resume, status 130.  Anything else is a bug and keeps its
traceback.

Torch's CPU threads: one unless ``OMP_NUM_THREADS`` says otherwise (:func:`pin_threads`).
Torch's own default, one thread per core, made small passes 10 to 70 times slower on a
machine shared with other jobs (measured); set ``OMP_NUM_THREADS=N`` to use N.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import os
import sys
from collections.abc import Sequence

from mlake.commands import COMMAND_MODULES
from mlake_core import __version__
from mlake_core.errors import ConfigError, MlakeError


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser with every registered sub-command."""
    parser = argparse.ArgumentParser(
        prog="mlake",
        description="Mechanistic interpretability of multilingual knowledge editing (MLaKE).",
    )
    parser.add_argument("--version", action="version", version=f"mlake {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


#: Torch's CPU threads when ``OMP_NUM_THREADS`` is not set.
DEFAULT_THREADS = 1


def pin_threads() -> int:
    """Set torch's intra-op CPU threads from ``OMP_NUM_THREADS`` (its first level in the
    nested form ``4,1``), or to :data:`DEFAULT_THREADS` when it is unset or empty (it is then
    set, so that child processes inherit it).  Returns the number of threads.

    Raises:
        ConfigError: ``OMP_NUM_THREADS`` is not a positive integer.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if not value:  # unset, or exported empty (some schedulers do)
        value = os.environ["OMP_NUM_THREADS"] = str(DEFAULT_THREADS)
    try:
        threads = int(value.split(",")[0])  # OpenMP's nested form "4,1": the outer level
    except ValueError:
        threads = 0
    if threads < 1:
        raise ConfigError(f"OMP_NUM_THREADS={value!r} must be a positive integer")
    if "torch" in sys.modules:  # imported already: the variable alone would come too late
        import torch

        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    try:
        pin_threads()
    except MlakeError as err:
        print(f"mlake: error: {err}", file=sys.stderr)
        return 2
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except MlakeError as err:
        print(f"mlake: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mlake data stats | head`
        return 0
    except KeyboardInterrupt:
        print(
            "mlake: interrupted. Every piece finished so far is saved in the results store; "
            "run the same command again to resume from there.",
            file=sys.stderr,
        )
        return 130
    except OSError as err:  # full disk, read-only results folder, an existing path
        print(f"mlake: error: {describe_os_error(err)}", file=sys.stderr)
        return 1
    return int(result or 0)


#: What to do about an operating-system error, by its errno.
_OS_ADVICE = {
    errno.ENOSPC: "free disk space and run the same command again (finished pieces are kept)",
    errno.EDQUOT: "free disk space and run the same command again (finished pieces are kept)",
    errno.EACCES: "it cannot be written here: choose another place (--results-dir, "
    "$MLAKE_RESULTS, $MLAKE_CACHE, --out) or fix its permissions",
    errno.EPERM: "it cannot be written here: choose another place (--results-dir, "
    "$MLAKE_RESULTS, $MLAKE_CACHE, --out) or fix its permissions",
    errno.EROFS: "the file system is read-only: choose another place (--results-dir, "
    "$MLAKE_RESULTS, $MLAKE_CACHE, --out)",
    errno.EEXIST: "it already exists: choose another path or remove it",
    errno.ENOTDIR: "part of the path is a file, not a folder: choose another path",
}


def describe_os_error(err: OSError) -> str:
    """One line for an operating-system error: the file, what happened, what to do."""
    what = err.strerror or str(err)
    where = f"{err.filename}: " if err.filename else ""
    advice = _OS_ADVICE.get(err.errno or -1)
    return f"{where}{what}" + (f"; {advice}" if advice else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
