"""``mlake pipeline``: every stage on one model, one run folder.

Data checks, knowledge, causal tracing, the latent-language lens, edit transfer (FT by
default), neuron attribution, restricted editing, probes and the relation between sharing and
transfer; then
every figure and ``report.md``.  The defaults (``mlake pipeline --print-config`` prints them as
YAML, with the documented copy in ``mlake/pipeline/pipeline_default.yaml``) run mlake-tiny on 12
facts in five languages, within 15 minutes on two CPU cores.  ``--config FILE`` reads a YAML
file of the same shape (any subset of the keys; unknown keys are errors).

Each stage is cached in the results store (``<out>/store`` unless ``run.results_dir`` or
``--results-dir`` says otherwise) keyed by everything that determines it, and saves each fact
as it finishes: a stopped pipeline run again with the same settings resumes where it stopped.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from typing import Any

from mlake.commands.common import add_executor_args, executor_settings, log


def register(subparsers: Any) -> None:
    """Add the ``pipeline`` command."""
    parser = subparsers.add_parser(
        "pipeline",
        help="run every stage on one model into one run folder (report and figures)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", default=None, metavar="FILE", help="YAML config file")
    parser.add_argument("--model", default=None, help="overrides model.name (default: mlake-tiny)")
    parser.add_argument(
        "--facts",
        default=None,
        help="overrides data.facts: N (the first N of the default selection), trained "
        "(mlake-tiny's training facts) or all (every fact)",
    )
    parser.add_argument(
        "--out", default=None, metavar="DIR", help="run folder (default: runs/pipeline/<name>)"
    )
    parser.add_argument("--results-dir", default=None, help="results store (default: <out>/store)")
    parser.add_argument(
        "--stages", default=None, help="comma-separated subset of the stages (default: all)"
    )
    parser.add_argument(
        "--print-config", action="store_true", help="print the resolved config as YAML and exit"
    )
    parser.add_argument(
        "--no-bars", action="store_true", help="progress as log lines (every 10%%) instead of bars"
    )
    add_executor_args(parser)  # overrides run.executor etc.
    parser.set_defaults(func=run_pipeline_command)


def default_out(config: Any) -> str:
    """``runs/pipeline/<model>-<facts>facts`` (the model's folder or hub name, sanitised)."""
    import re
    from pathlib import Path

    name = Path(str(config.model.name).rstrip("/")).name or "model"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name)
    return str(Path("runs") / "pipeline" / f"{name}-{config.data.facts}facts")


def run_pipeline_command(args: argparse.Namespace) -> int:
    """Entry point of ``mlake pipeline``."""
    from mlake.pipeline import dump_config, load_config, run_pipeline, with_overrides
    from mlake_core.data.selection import parse_facts

    config = load_config(args.config)
    config = with_overrides(
        config,
        model=args.model,
        facts=parse_facts(args.facts) if args.facts is not None else None,
        results_dir=args.results_dir,
        stages=[s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None,
    )
    config = dataclasses.replace(config, run=executor_settings(args, config.run))
    if args.print_config:
        print(dump_config(config), end="")
        return 0
    out = args.out or default_out(config)
    log(f"pipeline: run folder {out}")
    result = run_pipeline(
        config,
        out,
        log=log,
        bars=False if args.no_bars else None,
        argv=["mlake", *sys.argv[1:]] if sys.argv else None,
    )
    print(result.summary())
    report = result.out / "report.md"
    written = result.stages.get("report")
    if written is not None and written.status == "complete" and report.is_file():
        print(f"report: {report}")
    elif report.is_file():
        print(
            f"report: {report} (written by an earlier run of this config; `--stages report` "
            "writes it again)"
        )
    return 0
