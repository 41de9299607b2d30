"""``mlake edit transfer``: edit each fact in each language, measure it in every language.

For every fact and every edit language A, the method edits the unedited model (question
form by default) and the edit is measured in every language B: efficacy (B = A), transfer
(B != A), generalization (A's other form), locality (unrelated facts keep their answers) and
portability (multi-hop questions).  Prints the 5x5 matrix (rows: edit language, columns: test
language) of each metric over the facts known before the edit in the test language; per-fact,
per-pair rows go to the results store, one table per method and edit language (resumable).
Methods: ft, rome, memit, ike (see ``mlake_core/editing/``, one module per method).

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
import time
from typing import Any

from mlake.commands.common import (
    add_data_args,
    add_model_args,
    add_run_args,
    add_settings_args,
    log,
    open_session,
    parse_set,
    run_settings,
    settings_from_args,
)
from mlake.pipeline.config import TransferSettings
from mlake_core.errors import ConfigError

#: The :class:`~analysis.transfer.TransferConfig` fields that are options.
TRANSFER_FIELDS: tuple[str, ...] = ("edit_form", "n_locality", "stop_when_decided")


def register(subparsers: Any) -> None:
    """Add the ``edit`` command and its ``transfer`` sub-command."""
    from analysis.transfer import TransferConfig

    parser = subparsers.add_parser("edit", help="knowledge editing and cross-lingual transfer")
    sub = parser.add_subparsers(dest="edit_command", metavar="SUBCOMMAND")
    sub.required = True
    tr = sub.add_parser(
        "transfer",
        help="5x5 edit-transfer matrices of one or more editing methods",
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
    add_settings_args(
        tr.add_argument_group("evaluation"),
        TransferConfig,
        fields=TRANSFER_FIELDS,
        choices={"edit_form": ("question", "cloze")},
    )
    add_data_args(tr, facts_default="20", facts_help="N (the first N), trained or all")
    add_run_args(tr, seed=True)
    tr.set_defaults(func=run_transfer)


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
    from analysis.transfer import KINDS, TransferConfig, locality_facts, transfer_matrix
    from mlake.method_settings import resolve_method
    from mlake.progress import progress_bar
    from mlake.stages.transfer import read_unit_sets, transfer_stage
    from mlake_core.editing import get_method
    from mlake_core.editing.covariance import mlake_corpus, read_corpus
    from mlake_core.metrics.knowledge import KnowledgeConfig

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
        matrices = {
            metric: _matrix_json(transfer_matrix(rows, metric, "question"), langs)
            for metric in ("success_greedy", "success_prob", "p_new")
        }
        by_kind = {kind: _by_lang(rows[rows["kind"] == kind], langs) for kind in KINDS}
        report["methods"][entry.name] = {
            "results": str(run.path),
            "config": {k: str(v) for k, v in dataclasses.asdict(method_config).items()},
            "layer_source": method.layer_source,
            "model_settings": method.model_fields,
            "tracing_run": method.tracing_run,
            "seconds": round(seconds, 1),
            "edits": int(rows[rows["kind"] == "efficacy"].shape[0]),
            **_timing(rows),
            "matrices_question_form_known_before": matrices,
            "by_kind_greedy": by_kind,
            "mean_edit_loss": float(
                rows.drop_duplicates(["fact_id", "edit_lang"])["edit_loss"].mean()
            ),
        }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(_format(report, langs))
    return 0


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
            f"{m['mean_edit_loss']:.3f}; {m['results']}",
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
