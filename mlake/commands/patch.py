"""``mlake patch``: cross-lingual activation patching of MLaKE facts (Dumas et al., ACL 2025;
Fierro et al., Findings ACL 2025).

The residual stream leaving block L (resid_post.L) of a prompt in language B is replaced,
at one position and one layer at a time, by the state of a prompt in language A at the
matching position: the subject's last token, or the prompt's last token (where the answer is
read, after any bare space the answer begins with).  B's output is read at its last
position, on answers written in B's language (analysis/patching.py).

Counterfactual matrix (the unedited model): for every ordered pair (A, B), each fact known in
B is paired (seeded, --seed) with another fact known in A, asking the same question about
another subject where there is one; B follows A when the source fact's answer in B becomes
more likely than the target fact's.  The best layer of a position has the highest mean follow
rate off the diagonal.

Edit carried (unless --method none or --edits 0): the first --edits facts known in each
language A are edited there (--method, ROME by default; settings resolved as `mlake edit
transfer` resolves them, --layer and --set METHOD.FIELD=VALUE); the edited model's state on
A's prompt is patched into the unedited model's run on B's prompt of the same fact, and the
edit is carried when B's top token is the new answer's (in B).  The reverse patches the
unedited state into the edited model's run.  Only edits that succeed in A are counted.

Prints, per position, the language x language follow matrix at the best layer, the unpatched baseline, and
the edit-carried matrices; then the run folder.  Each pair and edit goes to the results store
as it finishes (resumable).  The figures (the matrices at the best layer, and the per-layer
curves) are drawn by the pipeline's ``patching`` stage and ``mlake figures``.

With --executor ray the pairs and edits are computed as shards on Ray workers, chunks of
facts in one language: the counterfactual targets in it (with every source language) and the
edits made in it; the matrices are the local run's (README: Running on a cluster).
"""

from __future__ import annotations

import argparse
import json
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
    settings_from_args,
)


def register(subparsers: Any) -> None:
    """Add the ``patch`` command."""
    from analysis.patching import PatchConfig

    parser = subparsers.add_parser(
        "patch",
        help="cross-lingual activation patching (language x language follow matrices, edit carried)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    group = parser.add_argument_group("patching")
    add_settings_args(group, PatchConfig, choices={"form": ("question", "cloze")})
    group.add_argument(
        "--layer",
        default="auto",
        help="the edit layer (as `mlake edit transfer --layer`; default auto)",
    )
    group.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="METHOD.FIELD=VALUE",
        help="an editing method's setting, e.g. rome.steps=20 (repeatable)",
    )
    add_data_args(parser, facts_default="20", facts_help="N (the first N) or all (default: 20)")
    add_run_args(parser)
    parser.set_defaults(func=run_patch)


def run_patch(args: argparse.Namespace) -> int:
    """Entry point of ``mlake patch``."""
    from analysis.patching import PatchConfig
    from mlake.commands.edit import given_method_fields
    from mlake.method_settings import resolve_method
    from mlake.progress import progress_bar
    from mlake.stages.patching import patching_stage, patching_total
    from mlake_core.editing import get_method
    from mlake_core.editing.covariance import mlake_corpus

    config = settings_from_args(args, PatchConfig)
    method_config, corpus = None, []
    entry = None
    if config.measures_edits:
        entry = get_method(config.method)
        overrides = parse_set(
            args.overrides, {entry.name: entry.config_cls}, kind="METHOD", among="--method"
        )
        given = given_method_fields(entry, args.layer, overrides)
        entry.config_cls(**given)  # bad values fail before the model loads
    session = open_session(args)
    ctx, knowledge = session.ctx, session.measure_knowledge()
    if entry is not None:
        method_config = resolve_method(
            entry.name,
            ctx.adapter,
            session.loaded.path,
            given=given,
            results_dir=ctx.results_dir,
            log=log,
        ).config
        corpus = mlake_corpus(ctx.dataset)
    bar = progress_bar("patch", patching_total(ctx, config, knowledge), "item", log)

    def on_item(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['kind']} {info['lang']}", refresh=False)
        bar.update(1)

    started = time.perf_counter()
    try:
        result, _ = patching_stage(
            ctx,
            config,
            knowledge=knowledge,
            method_config=method_config,
            corpus=corpus,
            on_item=on_item,
        )
    finally:
        bar.close()
    name, n_facts = session.loaded.name, len(ctx.fact_ids)
    if args.json:
        report = json_report(result, name, n_facts, method_config)
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(result, name, n_facts))
    return 0


def json_report(result: Any, model: str, n_facts: int, method_config: Any) -> dict[str, Any]:
    """What ``mlake patch --json`` prints: the :class:`~analysis.patching.PatchingResult` (as
    it is saved), the model, the facts asked for, the editing method's resolved config, and
    per position the language x language matrices at the best layer (``null`` where a cell is empty):
    ``follows`` (counterfactual) and ``carried`` (forward edit carried)."""
    import math

    from analysis.patching import POSITIONS

    def plain(m: Any) -> list[list[float | None]]:
        return [[None if math.isnan(v) else float(v) for v in row] for row in m]

    best: dict[str, Any] = {}
    for pos in POSITIONS:
        best[pos] = {
            "layer": result.counterfactual[pos]["best_layer"],
            "follows": plain(result.matrix("follows", pos)),
        }
        if result.edits:
            best[pos]["carried_layer"] = result.edits["edited_to_unedited"][pos]["best_layer"]
            best[pos]["carried"] = plain(result.matrix("carried", pos))
    return {
        "model": model,
        "n_facts": n_facts,
        "method_config": None
        if method_config is None
        else {k: str(v) for k, v in vars(method_config).items()},
        **result.to_dict(),
        "best": best,
    }


def format_report(result: Any, model: str, n_facts: int) -> str:
    """The human-readable summary ``mlake patch`` prints
    (:func:`~mlake.stages.patching.report_lines`) and the run folder."""
    from mlake.stages.patching import report_lines

    cfg = result.config
    head = (
        f"model {model}; {n_facts} facts; resid_post patched at {result.n_layers} layers, "
        f"{cfg['form']} form, seed {cfg['seed']}; edits: "
        + (f"{cfg['method']}, {cfg['edits']} per language" if result.edits else "none")
    )
    return "\n".join([head, "", *report_lines(result), f"run: {result.run_path}"])
