"""The ``mlake`` console script.

Expected errors (:class:`~mlake_core.errors.MlakeError`: bad input files, unknown options)
are printed as one line naming the problem, and the process exits with status 2; anything
else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from mlake.commands import COMMAND_MODULES
from mlake_core import __version__
from mlake_core.errors import MlakeError


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


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the process exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except MlakeError as err:
        print(f"mlake: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `mlake data stats | head`
        return 0
    return int(result or 0)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
