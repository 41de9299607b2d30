"""``mlake relate``: does the overlap of the parameters two languages use for a fact predict
whether an edit made in one reaches the other?

RUN_DIR is a transfer run folder (``mlake edit transfer`` prints it).  The other runs it
needs are looked up in the same results root by model (the newest complete one covering the
facts) unless given: ``--neurons`` (required: ``mlake neurons``), ``--knowledge`` (recorded by
the transfer run), ``--tracing`` and ``--probes`` (optional pair-level views), ``--lens-run``
(``mlake lens --method M --edits N`` with the transfer run's method) and ``--patching-run``
(``mlake patch``; its edits, if any, with the transfer run's method).

Prints:

* pair level: each languages x languages predictor matrix (same-fact neuron overlap per
  attribution method, tracing-profile similarity, probe transfer, representation similarity)
  against the edit-transfer matrix and the mean log-probability gain matrix: Spearman rho over
  the off-diagonal cells with a Mantel permutation p-value, exact when every label
  permutation is enumerated (five languages: 5! = 120, so p >= 1/120);
* lens and patching predictors (with ``--lens-run`` / ``--patching-run``, or found): per
  pair and per fact, ``patch_follow_subject`` and ``patch_follow_last`` (B's run on the fact
  follows another fact's state from A, patched at the subject's last token or the last
  position, at the patching run's best layer of that position: the highest mean off-diagonal
  follow rate, chosen without the transfer outcome), ``patch_carried`` (the edit's subject
  state from A, patched into B's unedited run at some layer, makes the new answer B's top
  token), ``lens_new_at_subject`` and ``lens_new_at_last_latent`` (after the edit in A, the
  new answer in any form is decodable at B's subject position at some layer, or at B's last
  position in the latent layers: the failure rules' measures).  Each enters the pair-level
  table as a matrix and gets its own fact-level models on the rows its run measures (the
  others are counted as missing);
* fact level: transfer success (logistic) and the gain (linear) on the fact's overlap with
  controls (same subject / answer string, subject / answer token Jaccard, known before, the
  language pair): coefficients per standard deviation with cluster-bootstrap intervals over
  facts, a within-pair permutation p-value for the overlap, and the out-of-fold AUC with and
  without the overlap;
* interventions: for each ``--restricted`` transfer run (e.g. FT restricted to shared or
  random neurons: ``mlake edit transfer --set ft.units=shared --units-from NEURONS_RUN``), the
  change in efficacy, transfer, gain and locality against RUN_DIR's edits, with paired
  bootstrap intervals over facts.

Rows left out (fact unknown in the test language, no overlap because a set was empty, ...)
are counted by reason.  The result is saved in the results store (``relate/<key>``) and reused
when nothing it depends on changed.
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

from mlake.commands.common import add_settings_args, log, settings_from_args
from mlake.pipeline.config import RelateSettings

#: The :class:`~analysis.relate.RelateConfig` fields that are options (``known_only`` is
#: ``--all-rows``).
RELATE_FIELDS: tuple[str, ...] = ("outcome", "form", "overlap", "n_boot", "n_perm", "seed")


def register(subparsers: Any) -> None:
    """Add the ``relate`` command."""
    from analysis.relate import RelateConfig
    from mlake.settings import DataSettings

    parser = subparsers.add_parser(
        "relate",
        help="relate neuron overlap (and probes, tracing) to measured edit transfer",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a transfer run folder")
    group = parser.add_argument_group("inputs")
    group.add_argument("--neurons", default=None, metavar="RUN_DIR", help="neuron run")
    group.add_argument("--knowledge", default=None, metavar="RUN_DIR", help="knowledge run")
    group.add_argument("--tracing", default=None, metavar="RUN_DIR", help="tracing run")
    group.add_argument("--probes", default=None, metavar="RUN_DIR", help="probe run")
    group.add_argument(
        "--lens-run",
        default=None,
        metavar="RUN_DIR",
        help="lens run before and after edits (mlake lens --method M --edits N; the transfer "
        "run's method): the lens predictors",
    )
    group.add_argument(
        "--patching-run",
        default=None,
        metavar="RUN_DIR",
        help="patching run (mlake patch): the follow and edit-carried predictors",
    )
    group.add_argument(
        "--restricted",
        action="append",
        default=[],
        metavar="RUN_DIR",
        help="a transfer run of a restricted edit to compare with RUN_DIR (repeatable)",
    )
    add_settings_args(group, RelateSettings, fields=["unit"])
    stats = parser.add_argument_group("statistics")
    add_settings_args(
        stats,
        RelateConfig,
        fields=RELATE_FIELDS,
        choices={
            "outcome": ("success_greedy", "success_prob"),
            "form": ("question", "cloze"),
            "overlap": ("jaccard", "overlap"),
        },
    )
    # ``known_only`` defaults to true: the option turns it off.
    stats.add_argument(
        "--all-rows",
        dest="known_only",
        action="store_const",
        const=False,
        default=None,
        help="fact level: also the rows of facts unknown in B before the edit (default: only "
        "the known ones)",
    )
    add_settings_args(parser.add_argument_group("data"), DataSettings, fields=("data_dir",))
    parser.add_argument("--results-dir", default=None, help="results root (default: RUN_DIR's)")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.set_defaults(func=run_relate)


def run_relate(args: argparse.Namespace) -> int:
    """Entry point of ``mlake relate``."""
    from analysis.relate import RelateConfig
    from mlake.stages.relate import load_transfer, relate_stage
    from mlake_core.data.dataset import load_mlake
    from mlake_core.data.paths import DEFAULT_VERSION

    config = settings_from_args(args, RelateConfig, fields=(*RELATE_FIELDS, "known_only"))
    main = load_transfer(args.run_dir)  # checks the folder before MLaKE loads
    version = str(main.key.get("data_version") or DEFAULT_VERSION)
    dataset = load_mlake(args.data_dir, version=version, langs=main.meta.get("langs"))
    result, run = relate_stage(
        args.run_dir,
        dataset,
        config,
        knowledge_dir=args.knowledge,
        neurons_dir=args.neurons,
        tracing_dir=args.tracing,
        probes_dir=args.probes,
        restricted=args.restricted,
        unit=args.unit or RelateSettings().unit,
        results_dir=args.results_dir,
        log=log,
        lens_dir=args.lens_run,
        patching_dir=args.patching_run,
    )
    if args.json:
        report = _json_safe({**result.to_dict(), "run": str(run.path)})
        print(json.dumps(report, ensure_ascii=False, indent=2, allow_nan=False))
    else:
        print(format_result(result, str(run.path)))
    return 0


def _json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as None: standard JSON has no NaN (the saved
    summary may hold NaN, which Python reads back, but jq and JSON.parse do not)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _f(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _coef(fit: Any, name: str) -> str:
    """``estimate [low, high] p=..`` of ``name`` in ``fit``, or why it was not estimated."""
    if fit.note:
        return "not estimated"
    try:
        rec = fit.term(name)
    except KeyError:
        return "-"
    return f"{_f(rec['estimate'], 2)} [{_f(rec['ci_low'], 2)}, {_f(rec['ci_high'], 2)}] p={_f(rec.get('p'), 3)}"


def format_result(result: Any, path: str) -> str:
    """The printed report of :func:`run_relate`."""
    lines = [
        f"mlake relate: {result.method} edits, overlap {result.unit}; {result.n_rows} fact-level "
        f"rows from {result.n_facts} facts; {path}"
    ]
    for note in result.notes:
        lines.append(f"note: {note}")
    if result.dropped:
        lines.append("rows left out: " + ", ".join(f"{k}: {v}" for k, v in result.dropped.items()))
    for role in ("lens_edits", "patching"):
        if result.inputs.get(role):
            read = result.inputs.get(f"{role}_read") or {}
            lines.append(
                f"{role} run: {result.inputs[role]}"
                + (f" ({', '.join(f'{k} {v}' for k, v in read.items())})" if read else "")
            )
    lines += [
        "",
        "pair level (off-diagonal cells; Spearman rho, Mantel p one-sided, exact to 7 languages)",
    ]
    lines.append(f"  {'predictor':<34}{'outcome':<10}{'rho':>7}{'p':>8}{'cells':>7}")
    for rec in result.pair_level.to_dict(orient="records"):
        lines.append(
            f"  {rec['predictor']:<34}{rec['outcome']:<10}{_f(rec['rho'], 2):>7}"
            f"{_f(rec['p'], 3):>8}{rec['n_cells']:>7}"
        )
    lines += ["", "transfer matrix (rows: edit language; facts known in the test language)"]
    m = result.outcomes["transfer"]
    lines.append("      " + "".join(f"{b:>7}" for b in result.langs))
    for a in result.langs:
        lines.append(f"  {a:<4}" + "".join(f"{_f(100 * m.loc[a, b], 1):>7}" for b in result.langs))
    for kind, fit in result.fits.items():
        what = (
            "transfer success, logistic (log-odds per SD)"
            if kind == "logistic"
            else ("log-probability gain of the new answer, linear (nats per SD)")
        )
        lines += [
            "",
            f"fact level: {what}; {fit.n_rows} rows, {fit.n_facts} facts"
            + (f", {fit.n_events} successes" if kind == "logistic" else ""),
        ]
        if fit.note:
            lines.append(f"  not estimated: {fit.note}")
            continue
        for rec in fit.terms.to_dict(orient="records"):
            if str(rec["term"]).startswith("pair["):
                continue
            p = rec.get("p")
            lines.append(
                f"  {rec['term']:<24}{_f(rec['estimate']):>8}  [{_f(rec['ci_low'])}, "
                f"{_f(rec['ci_high'])}]"
                + (
                    f"  p={_f(p)}"
                    if p is not None and not (isinstance(p, float) and math.isnan(p))
                    else ""
                )
            )
        lines.append("  (+ language-pair indicators)")
        if kind == "logistic":
            lines.append(
                f"  AUC (out of fold, by fact): {_f(fit.auc)} with overlap, "
                f"{_f(fit.auc_controls)} controls only; gain {_f(fit.auc_gain)} "
                f"[{_f(fit.auc_gain_ci[0])}, {_f(fit.auc_gain_ci[1])}]"
            )
    if result.predictor_fits:
        lines += [
            "",
            "fact level, lens and patching predictors beside the overlap (each its own models, "
            "same controls; per SD; p: within-pair permutation)",
            f"  {'predictor':<26}{'rows':>6}{'facts':>6}{'missing':>8}  "
            f"{'logistic':<30}{'linear':<30}AUC gain",
        ]
        every = {"overlap": result.fits, **result.predictor_fits}
        for name, fits in every.items():
            lines.append(
                f"  {name:<26}{fits['logistic'].n_rows:>6}{fits['logistic'].n_facts:>6}"
                f"{result.missing.get(name, 0):>8}  {_coef(fits['logistic'], name):<30}"
                f"{_coef(fits['linear'], name):<30}{_f(fits['logistic'].auc_gain)}"
            )
        for name, fits in every.items():
            for kind, fit in fits.items():
                if fit.note:
                    lines.append(f"  {name}, {kind}: not estimated: {fit.note}")
    for item in result.interventions:
        lines += [
            "",
            f"intervention: {item['label']} against {item['against']} "
            f"(units: {item['units'] or '-'})",
        ]
        for metric, d in item["differences"].items():
            lines.append(
                f"  {metric:<14}{_f(d['a'])} -> {_f(d['b'])}: {_f(d['diff'])} "
                f"[{_f(d['ci_low'])}, {_f(d['ci_high'])}], {d['n_facts']} facts"
            )
    return "\n".join(lines)
