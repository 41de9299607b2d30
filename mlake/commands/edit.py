"""``mlake edit transfer``: edit each fact in each language, measure it in every language.

For every fact and every edit language A, the method edits the unedited model (question
form by default) and the edit is measured in every language B: efficacy (B = A), transfer
(B != A), generalization (A's other form), locality (unrelated facts keep their answers) and
portability (multi-hop questions).  Prints the language x language matrix (rows: edit language, columns: test
language) of each metric over the facts known before the edit in the test language; per-fact,
per-pair rows go to the results store, one table per method and edit language (resumable).
Methods: ft, rome, memit, ike (see ``mlake_core/editing/``, one module per method).

``--protocol mlake`` adds the MLaKE paper's protocols (arXiv 2404.04990; needs ``--version
v2024-04``, the release with the multiple-choice files): after every edit, in every test
language, multiple choice read two ways (``mcqa-loglik``: the option whose text is the most
probable answer; ``mcqa-letter``: the letter the model gives with the options in the prompt),
single-hop and multi-hop, beside the free-form measures, with the unedited model's answers
to the same questions (measured once per run).  It then prints, for each method, six tables
in the paper's layout (single-hop and multi-hop; free-form, mcqa-loglik and mcqa-letter; rows:
edit language, columns: test language): the % of questions answered with the edit, the
unedited model's % in brackets, and each cell's counts (questions n, facts measured, facts
missing: no record there, an unusable one, a no-op edit, or no linked multi-hop question;
the reasons are listed).  Free-form
cells count every edited fact, as the paper does.  The same tables are written as CSV, one
row per cell (method, hop, format, edit_lang, test_lang, pct, before_pct, original_pct, n,
chose_edit, facts, missing, edits), to ``--csv`` (default
``runs/edit_transfer/protocol_mlake_<model>_<N>facts.csv``); ``--json`` prints them as JSON
(``protocol_mlake`` per method).

On another dataset (``--dataset mzsre``, ``bmike53-*``: README, Other datasets) the edits
are measured as its papers measure them (reliability, generalization by the record's
``rephrase``, locality by its ``loc`` question, portability) and the command prints, for
each method and measure, the same edit language x test language tables: the % passed by
greedy alias match with the unedited model's % in brackets and each cell's counts (n/facts/
missing), then the same questions scored by the dataset's paper's own scorer (ReMaKE's,
BMIKE-53's: teacher-forced token F1, exact match and EasyEdit's token accuracy, and on
BMIKE-53's CounterFact and WikiFactDiff its perplexity comparison,
``mlake_core/metrics/paper_scores.py``; the scorer is named in each table's title, with the
questions it scored per cell).  The tables are written as CSV, one row per measure and cell
(method, measure, edit_lang, test_lang, pct, before_pct, n, hits, missing, edits, then
``paper_<f1|em|acc|ppl>_pct``, ``paper_<f1|em|acc|ppl>_before_pct``, ``paper_n``,
``paper_ppl_n``), to ``--csv``
(default ``runs/edit_transfer/own_<dataset>_<model>_<N>facts.csv``); ``--json`` gives them
as ``own_measures`` per method, with ``paper_scorer``.

Each method's settings are resolved once (:func:`mlake.method_settings.resolve_method`), in
rising precedence: the method's defaults; for ``--layer auto``, the layer causal tracing
recommended for this model (``mlake trace``), else the documented default per model size; the
settings the model was trained for, when it brings its own (mlake-tiny: FT at layer 0 with
``lr`` 0.01, ``steps`` 100, ``max_rel_norm`` 0.3; mlake-tiny-editable: its edit layer, and
ROME's and MEMIT's ``δ`` optimisation: ``clamp_norm`` 100, ``steps`` 200, ``lr`` 2, ``init``
subject-mean, ``restarts`` 3; see ``mlake_core/models/mlake_tiny/variants.py``); then an
explicit ``--layer`` and ``--set METHOD.FIELD=VALUE``.  What the model brought is logged, and
the JSON report says where the layers came from (``layer_source``: explicit, model, tracing,
default).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import time
from pathlib import Path
from typing import Any

from mlake.commands.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_settings_args,
    data_settings,
    log,
    open_session,
    parse_set,
    run_settings,
    settings_from_args,
)
from mlake.pipeline.config import TransferSettings
from mlake_core.errors import ConfigError

#: The :class:`~analysis.transfer.TransferConfig` fields that are options.
TRANSFER_FIELDS: tuple[str, ...] = ("edit_form", "n_locality", "stop_when_decided", "protocol")


def register(subparsers: Any) -> None:
    """Add the ``edit`` command and its ``transfer`` sub-command."""
    from analysis.transfer import PROTOCOLS, TransferConfig

    parser = subparsers.add_parser("edit", help="knowledge editing and cross-lingual transfer")
    sub = parser.add_subparsers(dest="edit_command", metavar="SUBCOMMAND")
    sub.required = True
    tr = sub.add_parser(
        "transfer",
        help="language x language edit-transfer matrices of one or more editing methods",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(tr)
    group = tr.add_argument_group("editing")
    group.add_argument("--method", default=None, help="one method (ft, rome, memit, ike)")
    group.add_argument("--methods", default=None, help="several, comma-separated")
    group.add_argument(
        "--layer",
        default="auto",
        help="edit layer (ft, rome), layers for memit (a range such as 0-1 or a list "
        "such as 0,1), or auto (default): the layers the model was trained for when it "
        "brings its own (mlake-tiny: FT at layer 0; mlake-tiny-editable: its subject "
        "layer), else the layer causal tracing recommends for this model when `mlake trace` "
        "has been run on it (memit: a run of layers ending there), else the documented "
        "default per model size",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a field of a method's config, e.g. ft.lr=0.01 or rome.clamp_norm=4 "
        "(repeatable; the fields are the config dataclasses' in mlake_core/editing; they "
        "win over the settings the model brings)",
    )
    group.add_argument(
        "--corpus",
        default=None,
        help="text file or folder for key statistics (default: MLaKE text)",
    )
    group.add_argument(
        "--units-from",
        default=None,
        metavar="RUN_DIR",
        help="a neuron-attribution run (mlake neurons) whose shared and language-specific MLP "
        "neurons restricted editing uses (--set ft.units=shared|specific|random)",
    )
    add_settings_args(
        group,
        TransferSettings,
        fields=["units_method"],
        helps={"units_method": "which attribution method's classes to take from --units-from"},
    )
    evaluation = tr.add_argument_group("evaluation")
    add_settings_args(
        evaluation,
        TransferConfig,
        fields=TRANSFER_FIELDS,
        choices={"edit_form": ("question", "cloze"), "protocol": PROTOCOLS},
        helps={
            "protocol": "free-form (default) or mlake: also multiple choice (option "
            "log-likelihood and letter), single-hop and multi-hop, with the unedited model's "
            "answers; prints the paper's tables and writes them as CSV (see --csv); needs "
            "--version v2024-04"
        },
    )
    evaluation.add_argument(
        "--csv",
        default=None,
        metavar="PATH",
        help="with --protocol mlake, or another --dataset: where the tables go as CSV "
        "(default runs/edit_transfer/protocol_mlake_<model>_<N>facts.csv or "
        "own_<dataset>_<model>_<N>facts.csv, under the current folder)",
    )
    add_data_args(tr, facts_default="20", facts_help="N (the first N), trained or all")
    add_run_args(tr, seed=True)
    tr.set_defaults(func=run_transfer)
    rp = sub.add_parser(
        "report",
        help="the tables of saved transfer runs, complete or as far as they got",
        description=REPORT_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    rp.add_argument(
        "run_dirs",
        nargs="+",
        metavar="RUN_DIR",
        help="transfer run folders (runs/transfer/<key>, one per method, as `mlake edit "
        "transfer` prints them), of the same model, facts and languages",
    )
    rp.add_argument(
        "--same-facts",
        action="store_true",
        help="keep only the facts edited in every edit language (and every run) so far, so "
        "that the rows of a partial run compare the same facts (a language with no edit yet "
        "is left out of that)",
    )
    rp.add_argument("--csv", default=None, metavar="PATH", help="also write the tables as CSV")
    rp.add_argument("--json", action="store_true", help="print the report as JSON")
    rp.set_defaults(func=run_report)


REPORT_DOC = """\
``mlake edit report RUN_DIR [RUN_DIR ...]``: the tables of saved transfer runs, without a model.

Reads each run folder of ``mlake edit transfer`` (one per method) and prints what that command
prints for it: with ``--protocol mlake`` the paper's tables, on another dataset its papers'
measures, else the free-form matrices.  A run that is still going, or was stopped before
every edit language finished, is read as far as it got: the edits saved one by one so far
(what a resumed run starts from), with the edits saved per edit language stated above the
tables (``saved``/``asked``; the seconds after a method's edit count are its edits' own
editing and evaluation time, summed, not the run's wall time).  Such tables are partial: the rows of edit languages that got
further count more facts; ``--same-facts`` keeps only the facts edited in every edit
language of every run given, so that every cell is over the same facts (say so when you
report them; an edit language with no edit saved yet is left out of that, its row empty).
``--json`` prints the report as JSON (``partial``, ``saved`` per run), and
``--csv PATH`` writes the tables as ``mlake edit transfer --csv`` does.  Resume a stopped
run by running its ``mlake edit transfer`` command again.
"""


def run_report(args: argparse.Namespace) -> int:
    """Entry point of ``mlake edit report``."""
    from analysis.transfer import TransferRun
    from mlake_core.data.sources import get_source
    from mlake_core.metrics.paper_scores import SCORERS

    runs = [TransferRun.load(p, partial=True) for p in args.run_dirs]
    first = runs[0]
    # What may differ between the runs of one report: the method and its settings.
    own_parts = ("method", "method_config", "unit_sets")
    labels: dict[str, Any] = {first.label: first.path}
    for run in runs[1:]:
        for part in sorted(set(run.key) | set(first.key)):
            if part not in own_parts and run.key.get(part) != first.key.get(part):
                raise ConfigError(
                    f"{run.path}: its {part} differs from {first.path}'s; give runs of one "
                    "model, data, facts, languages, prompts and evaluation"
                )
        if run.label in labels:
            raise ConfigError(
                f"{run.path} and {labels[run.label]} are both {run.label} runs (other "
                "settings); report them one at a time"
            )
        labels[run.label] = run.path
    if args.same_facts:
        runs = _same_facts(runs)
    langs = first.langs
    protocol = str((first.key.get("config") or {}).get("protocol", "free-form"))
    own = "own_measures" in first.key
    if args.csv and protocol != "mlake" and not own:
        raise ConfigError(
            "--csv: the tables written as CSV are those of --protocol mlake runs, or of "
            "another dataset's; these runs are of the free-form protocol"
        )
    model = first.key.get("model") or {}
    report: dict[str, Any] = {
        "model": str(model.get("model_id") or model),
        "n_facts": first.n_facts,
        "partial": not all(r.is_complete for r in runs),
        "same_facts": bool(args.same_facts),
        "methods": {},
    }
    for run in runs:
        per_edit = run.rows.drop_duplicates(["fact_id", "edit_lang"])
        timed = [c for c in ("edit_seconds", "eval_seconds") if c in per_edit]
        report["methods"][run.label] = {
            "results": str(run.path),
            "config": run.meta.get("method_config") or run.key.get("method_config"),
            "seconds": round(float(per_edit[timed].sum().sum()), 1) if timed else None,
            "saved": dict(run.saved),
            "complete": list(run.complete),
            "is_complete": run.is_complete,
            **method_summary(run.rows, langs, protocol=protocol, own=own),
        }
    if own:
        name = str(first.key.get("data_version"))
        scorer = SCORERS.get(name)
        report["dataset"] = get_source(name).title
        report["paper_scorer"] = dataclasses.asdict(scorer) if scorer else None
    if args.csv:
        path = Path(args.csv)
        write_csv(own_table(report) if own else protocol_table(report), path)
        report["own_csv" if own else "protocol_csv"] = str(path)
        log(f"tables: {path}")
    if not args.json:
        print(progress_lines(report, langs))
    print_report(report, langs, as_json=args.json, protocol=protocol, own=own)
    return 0


def _same_facts(runs: list[Any]) -> list[Any]:
    """``runs`` restricted to the facts edited in every edit language of every run."""
    common: set[int] | None = None
    for run in runs:
        for _, facts in run.rows.groupby("edit_lang")["fact_id"]:
            common = set(facts) if common is None else common & set(facts)
    kept = []
    for run in runs:
        rows = run.rows[run.rows["fact_id"].isin(common or set())].reset_index(drop=True)
        per_lang = rows.groupby("edit_lang")["fact_id"].nunique()
        saved = {a: int(per_lang.get(a, 0)) for a in run.saved}
        kept.append(dataclasses.replace(run, rows=rows, saved=saved))
    return kept


def progress_lines(report: dict[str, Any], langs: Any) -> str:
    """The line(s) saying how far each run got: ``complete``, or the edits saved per edit
    language out of those asked for (``partial``)."""
    lines = []
    for name, m in report["methods"].items():
        asked = report["n_facts"]
        counts = ", ".join(f"{a} {m['saved'].get(a, 0)}/{asked}" for a in langs)
        if m["is_complete"]:
            state = "complete"
        else:
            state = "PARTIAL (rerun its mlake edit transfer command to resume)"
        facts = " (only the facts edited in every edit language)" if report["same_facts"] else ""
        lines.append(f"{name}: {state}; edits saved per edit language{facts}: {counts}")
    return "\n".join(lines)


def given_method_fields(
    entry: Any, layer: str, overrides: dict[str, dict[str, str]]
) -> dict[str, str]:
    """The fields of method ``entry``'s config the user set: ``--layer`` (unless ``auto``) as
    its ``layer`` or ``layers``, then its ``--set`` items."""
    names = {f.name for f in dataclasses.fields(entry.config_cls)}
    given: dict[str, str] = {
        n: layer for n in ("layer", "layers") if n in names and layer != "auto"
    }
    given.update(overrides.get(entry.name, {}))
    return given


def run_transfer(args: argparse.Namespace) -> int:
    """Entry point of ``mlake edit transfer``."""
    from analysis.transfer import TransferConfig, locality_facts
    from mlake.method_settings import resolve_method
    from mlake.progress import progress_bar
    from mlake.stages.transfer import read_unit_sets, transfer_stage
    from mlake_core.data.external import dataset_title, has_own_measures
    from mlake_core.editing import get_method
    from mlake_core.editing.covariance import mlake_corpus, read_corpus
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from mlake_core.metrics.paper_scores import paper_scorer

    names = [m.strip() for m in (args.methods or args.method or "").split(",") if m.strip()]
    if not names:
        raise ConfigError("give --method NAME or --methods a,b")
    entries = [get_method(n) for n in names]
    overrides = parse_set(
        args.overrides,
        {e.name: e.config_cls for e in entries},
        kind="METHOD",
        among="--methods",
    )
    config = settings_from_args(args, TransferConfig, fields=TRANSFER_FIELDS)
    own_data = data_settings(args).dataset != "mlake"  # measured as its papers measure
    if args.csv and config.protocol != "mlake" and not own_data:
        raise ConfigError(
            "--csv: the tables written as CSV are --protocol mlake's, or another dataset's "
            "(--dataset); add one"
        )
    if config.protocol == "mlake":  # before the model loads
        check_protocol_data(data_settings(args).version)
    given = {e.name: given_method_fields(e, args.layer, overrides) for e in entries}
    for entry in entries:  # bad --layer and --set values fail before the model loads
        entry.config_cls(**given[entry.name])
    seed = run_settings(args).seed
    unit_sets, unit_source = None, None
    if args.units_from:
        units_method = args.units_method or TransferSettings().units_method
        unit_sets = read_unit_sets(args.units_from, units_method, seed=seed)
        unit_source = f"{args.units_from} ({units_method})"
    elif any(v != "all" for o in overrides.values() for k, v in o.items() if k == "units"):
        raise ConfigError("restricted editing (--set ft.units=...) needs --units-from RUN_DIR")
    session = open_session(args)
    ctx, loaded = session.ctx, session.loaded
    own = has_own_measures(ctx.dataset)
    # The edited facts and the locality sample the transfer stage draws from the pool.
    knowledge = session.measure_knowledge(
        KnowledgeConfig(mcqa=False, max_new_tokens=config.max_new_tokens),
        extra=locality_facts(ctx.dataset, ctx.fact_ids, config, session.pool),
    )
    corpus = read_corpus(args.corpus) if args.corpus else mlake_corpus(ctx.dataset)
    langs, fact_ids = ctx.langs, ctx.fact_ids
    report: dict[str, Any] = {"model": loaded.name, "n_facts": len(fact_ids), "methods": {}}
    resolved = {
        e.name: resolve_method(
            e.name,
            loaded.adapter,
            loaded.path,
            given=given[e.name],
            results_dir=ctx.results_dir,
            log=log,
        )
        for e in entries
    }
    sources = [r.layer_source for r in resolved.values() if r.layer_source is not None]
    report["layer_source"] = sources[0] if sources else None
    report["model_settings"] = {n: r.model_fields for n, r in resolved.items() if r.model_fields}
    for entry in entries:
        method = resolved[entry.name]
        method_config = method.config
        bar = progress_bar(entry.name, len(fact_ids) * len(langs), "edit", log)

        def on_edit(info: dict[str, Any], bar: Any = bar) -> None:
            bar.set_postfix_str(f"{info['lang']} loss {info['loss']:.3f}", refresh=False)
            bar.update(1)

        started = time.perf_counter()
        rows, run = transfer_stage(
            ctx,
            entry.name,
            method_config,
            config,
            knowledge=knowledge,
            locality_pool=session.pool,
            corpus=corpus,
            on_edit=on_edit,
            unit_sets=unit_sets,
            unit_source=unit_source,
            knowledge_run=session.knowledge_run,
        )
        bar.close()
        seconds = time.perf_counter() - started
        report["methods"][entry.name] = {
            "results": str(run.path),
            "config": {k: str(v) for k, v in dataclasses.asdict(method_config).items()},
            "layer_source": method.layer_source,
            "model_settings": method.model_fields,
            "tracing_run": method.tracing_run,
            "seconds": round(seconds, 1),
            **method_summary(rows, langs, protocol=config.protocol, own=own),
        }
    if own:
        scorer = paper_scorer(ctx.dataset)
        report["dataset"] = dataset_title(ctx.dataset)
        report["paper_scorer"] = dataclasses.asdict(scorer) if scorer else None
        path = (
            Path(args.csv)
            if args.csv
            else default_csv(loaded.name, len(fact_ids), f"own_{ctx.dataset.version}")
        )
        write_csv(own_table(report), path)
        report["own_csv"] = str(path)
        log(f"the {report['dataset']} tables: {path}")
    if config.protocol == "mlake":
        path = Path(args.csv) if args.csv else default_csv(loaded.name, len(fact_ids))
        write_csv(protocol_table(report), path)
        report["protocol_csv"] = str(path)
        log(f"the MLaKE protocol's tables: {path}")
    print_report(report, langs, as_json=args.json, protocol=config.protocol, own=own)
    return 0


def method_summary(rows: Any, langs: Any, *, protocol: str, own: bool) -> dict[str, Any]:
    """What the report says of one method's rows (:func:`analysis.transfer.evaluate_edit`'s,
    of a whole run or, ``mlake edit report``, of the edits saved so far): the edits, their
    timing, the question-form matrices over facts known before, greedy success by kind, the
    mean edit loss, and with ``protocol`` ``mlake`` the paper's tables (cells and missing
    reasons), with ``own`` another dataset's."""
    from analysis.transfer import (
        KINDS,
        missing_reasons,
        own_cells,
        protocol_cells,
        transfer_matrix,
    )

    out: dict[str, Any] = {
        "edits": int(rows[rows["kind"] == "efficacy"].shape[0]),
        **_timing(rows),
        "matrices_question_form_known_before": {
            metric: _matrix_json(transfer_matrix(rows, metric, "question"), langs)
            for metric in ("success_greedy", "success_prob", "p_new")
        },
        "by_kind_greedy": {kind: _by_lang(rows[rows["kind"] == kind], langs) for kind in KINDS},
        "mean_edit_loss": _finite(
            float(rows.drop_duplicates(["fact_id", "edit_lang"])["edit_loss"].mean())
        ),
    }
    if protocol == "mlake":
        out["protocol_mlake"] = {
            "cells": _records(protocol_cells(rows, langs)),
            "missing": _records(missing_reasons(rows)),
        }
    if own:
        out["own_measures"] = {"cells": _records(own_cells(rows, langs))}
    return out


def _finite(value: float) -> float | None:
    """``value``, or ``None`` where it is NaN (JSON has no NaN)."""
    return None if math.isnan(value) else value


def print_report(
    report: dict[str, Any], langs: Any, *, as_json: bool, protocol: str, own: bool
) -> None:
    """Print ``report`` as JSON, or as the tables of its protocol (the paper's layout for
    ``mlake``, another dataset's own tables, else the free-form matrices)."""
    if as_json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    elif protocol == "mlake":
        print(format_protocol(report, langs))
    elif own:
        print(format_own(report, langs))
    else:
        print(_format(report, langs))


def check_protocol_data(version: str) -> None:
    """Refuse ``--protocol mlake`` on a release without multiple-choice files.

    Raises:
        ConfigError: naming the release that has them.
    """
    from mlake_core.data.paths import get_release

    if get_release(version).single_hop_mcqa is None:
        raise ConfigError(
            f"--protocol mlake: MLaKE {version} has no multiple-choice files; use --version "
            "v2024-04 (the same single-hop and multi-hop questions, with their multiple-choice "
            "versions)"
        )


def default_csv(model: str, n_facts: int, what: str = "protocol_mlake") -> Path:
    """Where ``--protocol mlake`` (``what``; another dataset's tables: ``own_<dataset>``)
    writes its CSV without ``--csv``."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "_", model).strip("_") or "model"
    return Path("runs") / "edit_transfer" / f"{what}_{slug}_{n_facts}facts.csv"


def _records(frame: Any) -> list[dict[str, Any]]:
    """A DataFrame as JSON-ready records (NaN as None, numpy scalars as Python's)."""
    out = []
    for rec in frame.to_dict(orient="records"):
        out.append(
            {
                k: None
                if isinstance(v, float) and math.isnan(v)
                else (v.item() if hasattr(v, "item") else v)
                for k, v in rec.items()
            }
        )
    return out


def protocol_table(report: dict[str, Any]) -> Any:
    """Every method's protocol cells as one table (a pandas DataFrame: ``method`` then
    :data:`analysis.transfer.CELL_COLUMNS`), in print order: what the CSV holds."""
    import pandas as pd

    from analysis.transfer import CELL_COLUMNS

    frames = [
        pd.DataFrame.from_records(m["protocol_mlake"]["cells"], columns=list(CELL_COLUMNS)).assign(
            method=name
        )
        for name, m in report["methods"].items()
        if "protocol_mlake" in m
    ]
    table = pd.concat(frames, ignore_index=True)
    return table[["method", *CELL_COLUMNS]]


def own_table(report: dict[str, Any]) -> Any:
    """Every method's cells of another dataset's measures as one table (a pandas DataFrame:
    ``method`` then :data:`analysis.transfer.OWN_CELL_COLUMNS`), in print order: what the
    CSV holds."""
    import pandas as pd

    from analysis.transfer import OWN_CELL_COLUMNS

    frames = [
        pd.DataFrame.from_records(
            m["own_measures"]["cells"], columns=list(OWN_CELL_COLUMNS)
        ).assign(method=name)
        for name, m in report["methods"].items()
        if "own_measures" in m
    ]
    table = pd.concat(frames, ignore_index=True)
    return table[["method", *OWN_CELL_COLUMNS]]


def write_csv(table: Any, path: Path) -> None:
    """Write ``table`` (:func:`protocol_table`, :func:`own_table`) to ``path`` (its folder
    made if needed), atomically."""
    import os
    import tempfile

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        table.to_csv(tmp, index=False)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def write_protocol_csv(report: dict[str, Any], path: Path) -> None:
    """Write :func:`protocol_table` to ``path`` (:func:`write_csv`)."""
    write_csv(protocol_table(report), path)


def _cell(value: Any, before: Any) -> str:
    """A printed cell: ``after (before)`` in %, ``-`` where there is none."""

    def pct(v: Any) -> str:
        return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.1f}"

    return f"{pct(value)} ({pct(before)})"


def lang_table(
    title: str,
    cells: Any,
    langs: Any,
    value: str = "pct",
    before: str = "before_pct",
    counts: tuple[str, Any] | None = None,
    width: int = 14,
) -> list[str]:
    """One edit language x test language table as text lines: ``title``, then per edit
    language (rows) and test language (columns) ``value`` with ``before`` in brackets (%),
    then, with ``counts`` (``(label, cell -> text)``), each cell's counts under ``label``.
    ``cells`` maps ``(edit_lang, test_lang)`` to a cell (a dict).  The layout of every
    ``mlake edit transfer`` table."""
    lines = ["", title, "      " + "".join(f"{b:>{width}}" for b in langs)]
    for a in langs:
        row = "".join(f"{_cell(cells[a, b][value], cells[a, b][before]):>{width}}" for b in langs)
        lines.append(f"  {a:<4}{row}")
    if counts is not None:
        label, text = counts
        lines.append(f"  {label}")
        for a in langs:
            lines.append(f"  {a:<4}" + "".join(f"{text(cells[a, b]):>{width}}" for b in langs))
    return lines


def _n_facts_missing(cell: dict[str, Any]) -> str:
    return "{n}/{facts}/{missing}".format(**cell)


def format_protocol(report: dict[str, Any], langs: Any) -> str:
    """The ``--protocol mlake`` tables as text: per method, each of
    :data:`analysis.transfer.PROTOCOL_TABLES` (rows: edit language; columns: test language;
    cells: % answered with the edit, the unedited model's % in brackets), each followed by
    its counts per cell (questions n / facts measured / facts missing), then why facts are
    missing."""
    from analysis.transfer import PROTOCOL_TABLES

    lines = [
        f"model {report['model']}; {report['n_facts']} facts per edit language; the MLaKE "
        "protocol (rows: edit language, columns: test language; % of questions answered with "
        "the edit, the unedited model's % in brackets; n/facts/missing: questions, edited "
        "facts measured, edited facts with no question there)"
    ]
    for name, m in report["methods"].items():
        lines += ["", f"== {name}: {m['edits']} edits, {m['seconds']} s; {m['results']}"]
        cells = m["protocol_mlake"]["cells"]
        for hop, fmt, what in PROTOCOL_TABLES:
            table = {
                (c["edit_lang"], c["test_lang"]): c
                for c in cells
                if (c["hop"], c["format"]) == (hop, fmt)
            }
            lines += lang_table(
                f"{name} | {hop} | {fmt}: {what}",
                table,
                langs,
                counts=("n/facts/missing", _n_facts_missing),
            )
        missing = m["protocol_mlake"]["missing"]
        if missing:
            lines += ["", f"{name}: facts with no question in a test language, by reason:"]
            lines += [
                f"  {r['hop']} [{r['test_lang']}] {r['missing']}: {r['facts']}" for r in missing
            ]
    if report.get("protocol_csv"):
        lines += ["", f"tables as CSV: {report['protocol_csv']}"]
    return "\n".join(lines)


def format_own(report: dict[str, Any], langs: Any) -> str:
    """Another dataset's tables as text (:func:`analysis.transfer.own_cells`), in the layout
    of :func:`format_protocol` (:func:`lang_table`): per method and measure of
    :data:`analysis.transfer.OWN_TABLES`, the % passed by greedy alias match with the
    unedited model's % in brackets and the counts per cell (questions n / facts measured /
    facts missing), then the same questions by the dataset's paper's scorer
    (:mod:`mlake_core.metrics.paper_scores`: F1, exact match, token accuracy, and the
    perplexity comparison of the measures the paper scores so, each named in its table's
    title, with the questions it scored per cell)."""
    from analysis.transfer import OWN_TABLES
    from mlake_core.metrics.paper_scores import PAPER_METRICS, PaperScorer

    given = report.get("paper_scorer")
    scorer = PaperScorer(**given) if given else None
    lines = [
        f"model {report['model']}; {report['dataset']}; {report['n_facts']} facts per edit "
        "language; its papers' measures (rows: edit language, columns: test language; % "
        "passed, the unedited model's % in brackets; n/facts/missing: questions, edited facts "
        "measured, edited facts with no question there)"
    ]
    if scorer is not None:
        lines.append(
            f"beside greedy alias match: {scorer.title} scorer ({scorer.source}); mean % per "
            "cell of the questions it scored (n)"
            + (f"; {scorer.locality_note}" if scorer.locality_note else "")
        )
    for name, m in report["methods"].items():
        lines += ["", f"== {name}: {m['edits']} edits, {m['seconds']} s; {m['results']}"]
        cells = m["own_measures"]["cells"]
        for measure, _, _, what in OWN_TABLES:
            table = {
                (c["edit_lang"], c["test_lang"]): {**c, "facts": c["edits"] - c["missing"]}
                for c in cells
                if c["measure"] == measure
            }
            lines += lang_table(
                f"{name} | {measure} | greedy alias match: {what}",
                table,
                langs,
                counts=("n/facts/missing", _n_facts_missing),
            )
            if scorer is None:
                continue
            for k, metric in enumerate(PAPER_METRICS):
                if metric == "ppl" and measure not in scorer.ppl:
                    continue  # the paper has no perplexity comparison of this measure
                lines += lang_table(
                    f"{name} | {measure} | {scorer.metric_title(metric)}",
                    table,
                    langs,
                    value=f"paper_{metric}_pct",
                    before=f"paper_{metric}_before_pct",
                    counts=("n", lambda c: str(c["paper_n"]))
                    if k == 0
                    else ("n", lambda c: str(c["paper_ppl_n"]))
                    if metric == "ppl"
                    else None,
                )
    csv = report.get("own_csv")
    if csv:
        lines += ["", f"tables as CSV: {csv}"]
    return "\n".join(lines)


def _timing(rows: Any) -> dict[str, Any]:
    """Mean seconds per edit of the edits timed when computed (rows saved by an older mlake
    have no timing): the method's own work and the evaluation in every language (the run's
    shared statistics, ``setup_seconds``, are in neither)."""
    per_edit = rows.drop_duplicates(["fact_id", "edit_lang"])
    timed = per_edit.dropna(subset=["edit_seconds"]) if "edit_seconds" in per_edit else per_edit[:0]
    if timed.empty:
        return {"timed_edits": 0, "edit_seconds_mean": None, "eval_seconds_mean": None}
    return {
        "timed_edits": len(timed),
        "edit_seconds_mean": round(float(timed["edit_seconds"].mean()), 3),
        "eval_seconds_mean": round(float(timed["eval_seconds"].mean()), 3),
    }


def _matrix_json(matrix: Any, langs: Any) -> dict[str, dict[str, float | None]]:
    out: dict[str, dict[str, float | None]] = {}
    for a in langs:
        out[a] = {}
        for b in langs:
            try:
                v = float(matrix.loc[a, b])
            except KeyError:
                v = math.nan
            out[a][b] = None if math.isnan(v) else round(v, 4)
    return out


def _by_lang(rows: Any, langs: Any) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for b in langs:
        sel = rows[rows["test_lang"] == b]["success_greedy"]
        out[b] = None if sel.empty or sel.isna().all() else round(float(sel.mean()), 4)
    return out


def _format(report: dict[str, Any], langs: Any) -> str:
    lines = [f"model {report['model']}; {report['n_facts']} facts per edit language"]
    for name, m in report["methods"].items():
        lines += [
            "",
            f"== {name}: {m['edits']} edits, {m['seconds']} s, mean edit loss "
            f"{'-' if m['mean_edit_loss'] is None else format(m['mean_edit_loss'], '.3f')}; "
            f"{m['results']}",
        ]
        if m["timed_edits"]:
            lines.append(
                f"per edit: {m['edit_seconds_mean']:.2f} s editing + "
                f"{m['eval_seconds_mean']:.2f} s evaluating in {len(langs)} languages "
                f"(mean of {m['timed_edits']} edits, timed as they were computed)"
            )
        for metric, matrix in m["matrices_question_form_known_before"].items():
            lines.append(
                f"{metric} (rows: edit language, columns: test language; question form, "
                "facts known before the edit)"
            )
            lines.append("      " + "".join(f"{b:>8}" for b in langs))
            for a in langs:
                cells = "".join(
                    f"{'-' if matrix[a][b] is None else f'{100 * matrix[a][b]:.1f}':>8}"
                    for b in langs
                )
                lines.append(f"  {a:<4}{cells}")
        lines.append("greedy success by kind and test language:")
        for kind, vals in m["by_kind_greedy"].items():
            cells = "".join(f"{'-' if v is None else f'{100 * v:.1f}':>8}" for v in vals.values())
            lines.append(f"  {kind:<15}{cells}")
    return "\n".join(lines)
