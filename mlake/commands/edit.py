"""``mlake edit transfer``: edit each fact in each language, measure it in every language.

For every fact and every edit language A, the method edits the unedited model (question
form by default) and the edit is measured in every language B: efficacy (B = A), transfer
(B != A), generalization (A's other form), locality (unrelated facts keep their answers) and
portability (multi-hop questions).  Prints the 5x5 matrix (rows: edit language, columns: test
language) of each metric over the facts known before the edit in the test language; per-fact,
per-pair rows go to the results store, one table per method and edit language (resumable).
Methods: ft, rome, memit, ike (see ``mlake_core/editing/methods.py`` and ``memit.py``).

A model trained for weight edits (``--model mlake-tiny-editable``) brings the settings it was
trained for (edit layer, and ROME's and MEMIT's ``δ`` optimisation: ``clamp_norm`` 100,
``steps`` 200, ``lr`` 2, ``init`` subject-mean, ``restarts`` 3; see
``recommended_edit_settings`` in ``mlake_core/models/mlake_tiny.py``); they are logged, an
explicit ``--layer`` replaces the layer and ``--set`` any field.
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
    check_run_args,
    facts_and_knowledge,
    load_model,
    log,
    parse_facts,
)
from mlake_core.errors import ConfigError


def register(subparsers: Any) -> None:
    """Add the ``edit`` command and its ``transfer`` sub-command."""
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
    tr.add_argument("--method", default=None, help="one method (ft, rome, memit, ike)")
    tr.add_argument("--methods", default=None, help="several, comma-separated")
    tr.add_argument(
        "--layer",
        default="auto",
        help="edit layer (ft, rome), layers for memit (a range such as 0-1 or a list "
        "such as 0,1), or auto (default): the layer causal tracing recommends for this model "
        "when `mlake trace` has been run on it (memit: a run of layers ending there), else "
        "the documented default per model size; a model trained for edits "
        "(mlake-tiny-editable) brings its own",
    )
    tr.add_argument("--edit-form", default="question", choices=("question", "cloze"))
    tr.add_argument("--n-locality", type=int, default=10, help="locality facts per language")
    tr.add_argument(
        "--corpus",
        default=None,
        help="text file or folder for key statistics (default: MLaKE text)",
    )
    tr.add_argument("--seed", type=int, default=0, help="seed of the edit methods")
    tr.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="a field of a method's config, e.g. ft.lr=0.01 or rome.clamp_norm=4 "
        "(repeatable; the fields are the config dataclasses' in mlake_core/editing)",
    )
    tr.add_argument(
        "--units-from",
        default=None,
        metavar="RUN_DIR",
        help="a neuron-attribution run (mlake neurons) whose shared and language-specific MLP "
        "neurons restricted editing uses (--set ft.units=shared|specific|random)",
    )
    tr.add_argument(
        "--units-method",
        default="ig",
        help="which attribution method's classes to take from --units-from (default: ig)",
    )
    add_data_args(tr, facts_default="20", facts_help="N (the first N) or all (default: 20)")
    add_run_args(tr)
    tr.set_defaults(func=run_transfer)


def parse_overrides(items: list[str], entries: list[Any]) -> dict[str, dict[str, str]]:
    """``--set METHOD.FIELD=VALUE`` options as ``{method: {field: value}}``; values stay
    strings (the config dataclasses coerce them).

    Raises:
        ConfigError: a malformed item, a method not asked for, or a field the method's
            config does not have (naming the fields it has).
    """
    by_name = {e.name: e for e in entries}
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        method, dot, field = key.strip().partition(".")
        if not sep or not dot or not method or not field:
            raise ConfigError(f"--set {item!r}: expected METHOD.FIELD=VALUE, e.g. ft.lr=0.01")
        if method not in by_name:
            raise ConfigError(
                f"--set {item!r}: method {method!r} is not among --methods ({', '.join(by_name)})"
            )
        names = [f.name for f in dataclasses.fields(by_name[method].config_cls)]
        if field not in names:
            raise ConfigError(
                f"--set {item!r}: {method} has no field {field!r} (fields: {', '.join(names)})"
            )
        out.setdefault(method, {})[field] = value.strip()
    return out


def read_unit_sets(run_dir: str, method: str, *, seed: int = 0) -> dict[str, list[int]]:
    """The neuron classes of a neuron-attribution run (``specific_<method>_neuron.json``:
    one set per language and ``shared``) plus ``random``: as many neurons per layer as the
    shared set has, drawn (seeded) from the neurons in no class, the control of restricted
    editing.

    Raises:
        DataError: the folder is not a neuron run, or lacks ``method``'s classes.
    """
    import json
    from pathlib import Path

    import numpy as np

    from mlake_core.errors import DataError

    folder = Path(run_dir)
    path = folder / f"specific_{method}_neuron.json"
    summary = folder / "summary.json"
    if not path.is_file() or not summary.is_file():
        raise DataError(
            f"--units-from {run_dir}: no {path.name} and summary.json there; give a run folder "
            "of `mlake neurons` (it prints it)"
        )
    sets = {k: [int(u) for u in v] for k, v in json.loads(path.read_text()).items()}
    meta = json.loads(summary.read_text())
    n_layers = int(meta["n_layers"])
    width = int(meta.get("d_mlp") or 0) or _width_from(folder)
    taken = {u for v in sets.values() for u in v}
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for layer in range(n_layers):
        need = sum(1 for u in sets.get("shared", []) if u // width == layer)
        pool = [layer * width + i for i in range(width) if layer * width + i not in taken]
        chosen += [int(u) for u in rng.choice(pool, size=min(need, len(pool)), replace=False)]
    sets["random"] = sorted(chosen)
    return sets


def _width_from(folder: Any) -> int:
    """MLP width of the model a neuron run was made on (from its meta)."""
    import json

    from mlake_core.errors import DataError

    meta = json.loads((folder / "meta.json").read_text())
    model = meta.get("model") or {}
    width = model.get("d_mlp")
    if not width:
        raise DataError(f"{folder}: the run's meta does not give the model's d_mlp")
    return int(width)


def method_config_for(
    entry: Any,
    layer_for: dict[str, str],
    recommended: dict[str, dict[str, str]],
    overrides: dict[str, dict[str, str]],
    *,
    explicit_layer: bool,
) -> Any:
    """A method's config from, in rising precedence: its defaults, ``layer_for`` (the
    ``--layer`` value, or tracing's recommendation), the settings the model was trained for
    (``recommended``, :func:`~mlake_core.models.mlake_tiny.recommended_edit_settings`; their
    layer only when ``--layer`` was not given), and ``--set`` (``overrides``).  The model's
    settings are logged."""
    names_of = {f.name for f in dataclasses.fields(entry.config_cls)}
    fields: dict[str, str] = {
        name: layer_for[name] for name in ("layer", "layers") if name in names_of
    }
    model_fields = dict(recommended.get(entry.name, {}))
    if explicit_layer:
        model_fields = {k: v for k, v in model_fields.items() if k not in ("layer", "layers")}
    if model_fields:
        log(
            f"{entry.name}: settings this model was trained for: "
            + ", ".join(f"{k}={v}" for k, v in model_fields.items())
            + " (--set overrides)"
        )
    fields.update(model_fields)
    fields.update(overrides.get(entry.name, {}))
    return entry.config_cls(**fields)


def run_transfer(args: argparse.Namespace) -> int:
    """Entry point of ``mlake edit transfer``."""
    from analysis.transfer import KINDS, TransferConfig, transfer_matrix
    from mlake.progress import progress_bar
    from mlake.stages.tracing import lookup_recommended_layer
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.base import get_method
    from mlake_core.editing.covariance import mlake_corpus, read_corpus
    from mlake_core.editing.memit import default_layers
    from mlake_core.languages import parse_langs
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from mlake_core.models.mlake_tiny import recommended_edit_settings

    names = [m.strip() for m in (args.methods or args.method or "").split(",") if m.strip()]
    if not names:
        raise ConfigError("give --method NAME or --methods a,b")
    entries = [get_method(n) for n in names]
    overrides = parse_overrides(args.overrides, entries)
    langs = parse_langs(args.langs)
    facts_option = parse_facts(args.facts)
    check_run_args(args)
    config = TransferConfig(edit_form=args.edit_form, n_locality=args.n_locality)
    for entry in entries:  # bad --set values fail before the model loads
        fields = {k: v for k, v in overrides.get(entry.name, {}).items()}
        entry.config_cls(**fields)
    unit_sets, unit_source = None, None
    if args.units_from:
        unit_sets = read_unit_sets(args.units_from, args.units_method, seed=args.seed)
        unit_source = f"{args.units_from} ({args.units_method})"
    elif any(v != "all" for o in overrides.values() for k, v in o.items() if k == "units"):
        raise ConfigError("restricted editing (--set ft.units=...) needs --units-from RUN_DIR")
    loaded = load_model(args)
    data = facts_and_knowledge(
        args,
        loaded,
        langs,
        facts_option,
        KnowledgeConfig(mcqa=False, max_new_tokens=config.max_new_tokens),
    )
    dataset, pool, fact_ids, knowledge = data.dataset, data.pool, data.fact_ids, data.knowledge
    corpus = read_corpus(args.corpus) if args.corpus else mlake_corpus(dataset)
    report: dict[str, Any] = {"model": loaded.name, "n_facts": len(fact_ids), "methods": {}}
    recommended = recommended_edit_settings(loaded.path)
    model_layers = any(k in ("layer", "layers") for v in recommended.values() for k in v)
    layer_for = {"layer": args.layer, "layers": args.layer}
    layer_source = "explicit"
    if args.layer == "auto":
        layer_source = "default"
        traced = lookup_recommended_layer(loaded.adapter, loaded.path, args.results_dir)
        if traced is not None and traced.get("layer") is not None:
            layer = int(traced["layer"])
            memit_layers = default_layers(loaded.adapter, end=layer)
            layer_for = {
                "layer": str(layer),
                "layers": ",".join(str(x) for x in memit_layers),
            }
            layer_source = "tracing"
            log(
                f"--layer auto: layer {layer} (MEMIT: {layer_for['layers']}) recommended by "
                f"causal tracing, {traced.get('run')}"
                + (
                    "; the layers this model was trained for take precedence"
                    if model_layers
                    else ""
                )
            )
        else:
            log(
                "--layer auto: this model was not traced (mlake trace); "
                + ("the layers it was trained for" if recommended else "documented defaults")
            )
    if model_layers and args.layer == "auto":
        layer_source = "model"
    report["layer_source"] = layer_source
    report["model_settings"] = recommended
    for entry in entries:
        method_config = method_config_for(
            entry, layer_for, recommended, overrides, explicit_layer=args.layer != "auto"
        )
        bar = progress_bar(entry.name, len(fact_ids) * len(langs), "edit", log)

        def on_edit(info: dict[str, Any], bar: Any = bar) -> None:
            bar.set_postfix_str(f"{info['lang']} loss {info['loss']:.3f}", refresh=False)
            bar.update(1)

        started = time.perf_counter()
        rows, run = transfer_stage(
            loaded.adapter,
            loaded.path,
            dataset,
            fact_ids,
            langs,
            loaded.template,
            entry.name,
            method_config,
            config,
            knowledge=knowledge,
            locality_pool=pool,
            corpus=corpus,
            seed=args.seed,
            batch_size=args.batch_size,
            results_dir=args.results_dir,
            log=log,
            on_edit=on_edit,
            unit_sets=unit_sets,
            unit_source=unit_source,
            knowledge_run=data.knowledge_run,
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
