"""``mlake figures RUN_DIR``: every paper figure of a pipeline run folder, as PDF and PNG.

Reads the run folder's ``manifest.json`` and each stage's saved result (nothing is
recomputed), and writes into ``RUN_DIR/figures``: the edit-transfer matrices per method, the
causal-tracing maps per language and the tracing profiles, the latent-language lens curves
per prompt language (at the last position and at the subject's last token), the neuron
overlap matrices, the specific/shared units per layer, the ablation matrices, sharing against
transfer, restricted editing, probe accuracy by layer, and (with ``--sweep``) a sharing
sweep's dose-response.
Stages that did not run are skipped with a note; ``figures/index.json`` lists both.  The
report (``report.md``) is rewritten to link the figures.
"""

from __future__ import annotations

import argparse
from typing import Any

from mlake.commands.common import log


def register(subparsers: Any) -> None:
    """Add the ``figures`` command."""
    parser = subparsers.add_parser(
        "figures",
        help="every paper figure of a pipeline run folder (PDF and PNG)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a run folder of `mlake pipeline`")
    parser.add_argument(
        "--sweep",
        default=None,
        metavar="DIR",
        help="a sharing-sweep run folder (or its summary.json) for the dose-response figure",
    )
    parser.add_argument("--no-report", action="store_true", help="do not rewrite report.md")
    parser.set_defaults(func=run_figures)


def run_figures(args: argparse.Namespace) -> int:
    """Entry point of ``mlake figures``."""
    from mlake.pipeline.figures import write_figures
    from mlake.pipeline.report import write_report

    written = write_figures(args.run_dir, sweep=args.sweep, log=log)
    for path in written:
        print(path)
    if not args.no_report:
        log(f"report: {write_report(args.run_dir)}")
    return 0
