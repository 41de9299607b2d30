"""``mlake sharing-sweep``: mlake-tiny trained with more and more bilingual documents; at each
fraction, the measured neuron overlap and the measured edit transfer (a dose-response curve).

For each ``--fractions`` value, mlake-tiny is trained with that bilingual fraction (cached;
0 is the default model), then on the same ``--facts``: knowledge, neuron attribution
(integrated gradients), edits in every language (``--method``, FT by default, with the
settings the model brings: mlake-tiny's FT at layer 0 with ``lr`` 0.01, ``steps`` 100,
``max_rel_norm`` 0.3; change them with ``--set ft.FIELD=VALUE``), and the relation analysis
(``mlake relate``).  Prints per fraction the mean same-fact overlap, transfer, gain, efficacy
and locality with bootstrap intervals over facts (overall, within and across language
families), and the rank correlations across fractions.  Every step is a cached
stage: an interrupted sweep resumes.  See :mod:`mlake.sweep`.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from mlake.commands.common import (
    add_settings_args,
    log,
    parse_set,
    settings_from_args,
)

#: The :class:`~mlake.sweep.SweepConfig` fields that are options (``--set`` gives
#: ``method_config``).
SWEEP_FIELDS: tuple[str, ...] = (
    "fractions",
    "facts",
    "train_facts",
    "method",
    "n_locality",
    "ablation_facts",
    "n_boot",
    "seed",
)


def register(subparsers: Any) -> None:
    """Add the ``sharing-sweep`` command."""
    from mlake.settings import DataSettings, ModelSettings, RunSettings
    from mlake.sweep import SweepConfig
    from mlake_core.models.loading import BACKENDS

    parser = subparsers.add_parser(
        "sharing-sweep",
        help="overlap and transfer against the fraction of bilingual training documents",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sweep = parser.add_argument_group("sweep")
    add_settings_args(
        sweep,
        SweepConfig,
        fields=SWEEP_FIELDS,
        helps={
            "fractions": "bilingual fractions, comma-separated, one mlake-tiny each",
            "method": "editing method (ft, rome, memit, ike)",
        },
    )
    sweep.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a field of the method's config (repeatable); the others are the settings the "
        "model brings (mlake-tiny: ft layer=0 lr=0.01 steps=100 max_rel_norm=0.3), else the "
        "method's defaults",
    )
    add_settings_args(
        parser.add_argument_group("data"),
        DataSettings,
        fields=("langs", "data_dir"),
        helps={"langs": "comma-separated languages"},
    )
    add_settings_args(
        parser.add_argument_group("model"),
        ModelSettings,
        fields=("backend", "device"),
        choices={"backend": BACKENDS},
    )
    run = parser.add_argument_group("run")
    add_settings_args(run, RunSettings, fields=("batch_size", "results_dir"))
    run.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.set_defaults(func=run_sweep_command)


def run_sweep_command(args: argparse.Namespace) -> int:
    """Entry point of ``mlake sharing-sweep``."""
    from mlake.settings import DataSettings, ModelSettings, RunSettings
    from mlake.sweep import SweepConfig, run_sweep
    from mlake_core.editing import get_method

    method = settings_from_args(args, SweepConfig, fields=("method",)).method
    entry = get_method(method)
    fields = parse_set(args.overrides, {entry.name: entry.config_cls}).get(entry.name, {})
    entry.config_cls(**fields)  # validate before any training
    config = settings_from_args(
        args, SweepConfig, fields=SWEEP_FIELDS, defaults={"method_config": fields}
    )
    data = settings_from_args(args, DataSettings, fields=("langs", "data_dir"))
    model = settings_from_args(args, ModelSettings, fields=("backend", "device"))
    run = settings_from_args(args, RunSettings, fields=("batch_size", "results_dir"))
    summary, folder = run_sweep(
        config,
        langs=data.langs,
        data_dir=data.data_dir,
        results_dir=run.results_dir,
        backend=model.backend,
        device=model.device,
        batch_size=run.batch_size,
        log=log,
    )
    if args.json:
        print(json.dumps({**summary, "run": str(folder.path)}, ensure_ascii=False, indent=2))
    else:
        print(format_sweep(summary, str(folder.path)))
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
