"""``mlake sharing-sweep``: mlake-tiny trained with more and more bilingual documents; at each
fraction, the measured neuron overlap and the measured edit transfer (a dose-response curve).

For each ``--fractions`` value, mlake-tiny is trained with that bilingual fraction (cached;
0 is the default model), then on the same ``--facts``: knowledge, neuron attribution
(integrated gradients), edits in every language (``--method``, FT at layer 0 by default with
settings that edit mlake-tiny; change them with ``--set ft.FIELD=VALUE``), and the relation
analysis (``mlake relate``).  Prints per fraction the mean same-fact overlap, transfer,
gain, efficacy and locality with bootstrap intervals over facts (overall, within and across
language families), and the rank correlations across fractions.  Every step is a cached
stage: an interrupted sweep resumes.  See :mod:`mlake.sweep`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from mlake.commands.common import log


def register(subparsers: Any) -> None:
    """Add the ``sharing-sweep`` command."""
    parser = subparsers.add_parser(
        "sharing-sweep",
        help="overlap and transfer against the fraction of bilingual training documents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--fractions", default="0,0.25,0.5", help="default: 0,0.25,0.5")
    parser.add_argument("--facts", type=int, default=60, help="facts per point (default: 60)")
    parser.add_argument(
        "--train-facts",
        type=int,
        default=300,
        help="facts each mlake-tiny is trained on (default: 300, the default model's)",
    )
    parser.add_argument("--method", default="ft", help="editing method (default: ft)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a field of the method's config (default for ft: layer=0 lr=0.01 steps=100 "
        "max_rel_norm=0.3)",
    )
    parser.add_argument("--n-locality", type=int, default=10, help="locality facts per language")
    parser.add_argument("--ablation-facts", type=int, default=10)
    parser.add_argument("--n-boot", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--langs", default="en,zh,ja,fr,de", help="comma-separated languages")
    parser.add_argument("--data-dir", default=None, help="MLaKE data directory")
    parser.add_argument("--backend", default="tlens", choices=("tlens", "nnsight"))
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--results-dir", default=None, help="results root (default: ./runs)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    """Entry point of ``mlake sharing-sweep``."""
    from mlake.commands.edit import parse_overrides
    from mlake.sweep import TINY_FT, SweepConfig, run_sweep
    from mlake_core.editing.base import get_method
    from mlake_core.errors import ConfigError
    from mlake_core.languages import parse_langs

    entry = get_method(args.method)
    try:
        fractions = tuple(float(f) for f in args.fractions.split(",") if f.strip())
    except ValueError:
        raise ConfigError(
            f"--fractions {args.fractions!r}: expected numbers, e.g. 0,0.25,0.5"
        ) from None
    fields = dict(TINY_FT) if entry.name == "ft" else {}
    fields.update(parse_overrides(args.overrides, [entry]).get(entry.name, {}))
    entry.config_cls(**fields)  # validate before any training
    config = SweepConfig(
        fractions=fractions,
        facts=args.facts,
        train_facts=args.train_facts,
        method=entry.name,
        method_config=fields,
        n_locality=args.n_locality,
        ablation_facts=args.ablation_facts,
        n_boot=args.n_boot,
        seed=args.seed,
    )
    summary, run = run_sweep(
        config,
        langs=parse_langs(args.langs),
        data_dir=args.data_dir,
        results_dir=args.results_dir,
        backend=args.backend,
        device=args.device,
        batch_size=args.batch_size,
        log=log,
    )
    if args.json:
        print(json.dumps({**summary, "run": str(run.path)}, ensure_ascii=False, indent=2))
    else:
        print(format_sweep(summary, str(run.path)))
    return 0


def _ci(point: dict[str, Any], name: str, pct: bool = True) -> str:
    v = point.get(name)
    lo, hi = point.get(f"{name}_ci", [math.nan, math.nan])
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    k = 100 if pct else 1
    return f"{k * v:.1f} [{k * lo:.1f}, {k * hi:.1f}]" if pct else f"{v:.3f} [{lo:.3f}, {hi:.3f}]"


def format_sweep(summary: dict[str, Any], path: str) -> str:
    """The printed table of the sweep."""
    lines = [f"mlake sharing-sweep: {path}", ""]
    lines.append(
        "fraction | overlap (Jaccard) within / across | transfer % within / across | "
        "efficacy % | locality %"
    )
    for p in summary["points"]:
        lines.append(
            f"{p['fraction']:.2f} | {_ci(p, 'overlap', False)}  {_ci(p, 'overlap_within', False)} / "
            f"{_ci(p, 'overlap_across', False)} | {_ci(p, 'transfer')}  "
            f"{_ci(p, 'transfer_within')} / {_ci(p, 'transfer_across')} | "
            f"{_ci(p, 'efficacy')} | {_ci(p, 'locality')}"
        )
    dr = summary.get("dose_response") or {}
    for name, val in dr.items():
        if isinstance(val, dict):
            lines.append(f"spearman {name}: rho {val['rho']:.2f}, p {val['p']:.3f}")
    return "\n".join(lines)
