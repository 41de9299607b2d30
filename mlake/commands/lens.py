"""``mlake lens``: the latent-language lens of MLaKE facts in each prompt language.

For each fact the model answers correctly in a prompt language (question form, greedy alias
match; measured first and cached), the residual stream leaving every layer is decoded through
the model's final norm and unembedding (the logit lens) at the subject's last token and at
the prompt's last position, and the fact's answer written in every language of the run is
read there: the probability and rank of its first token with content (Wendler et al. 2024,
arXiv 2402.10588).  Definitions (analysis/lens.py): an answer is decodable at a layer when
its first token ranks among the --top-k most likely; the emergence layer is the first layer
where the prompt language's answer is decodable at the last position; the first language is
the answer language decodable there earliest (languages whose first token is the prompt
language's are left out); the latent English curve is the English answer's mean probability
by layer at the last position, over the facts whose English first token differs from the
prompt language's.

Prints, per prompt language, the facts looked at, the median emergence layer (and how many
facts never emerge), how often each answer language is the first decodable one, and the
latent English curve's peak (layer, mean probability) with the number of facts it is over;
then the run folder.  Per-fact lenses go to the results store (resumable).  The figures
(the answer in each language by layer, one panel per prompt language) are drawn by the
pipeline's ``lens`` stage and ``mlake figures``.

--lens tuned decodes through a tuned lens (Belrose et al. 2023, analysis/tuned_lens.py): one
affine translator per layer, fitted by KL to the last layer on the question and cloze texts
of the facts not selected (--facts), in every language, 20% of them held out; cached in
mlake's cache folder and reused.  It prints the held-out KL to the last layer per layer,
tuned against the logit lens.  Settings: --tuned-steps, --tuned-tokens-per-step, ...

Before and after an edit (--method ft|rome|memit, --edits N per edit language; settings
resolved as `mlake edit transfer` resolves them, --layer and --set METHOD.FIELD=VALUE): the
first N facts known in each edit language are edited there, and each edit is read in every
test language, before and inside the edit: per layer and position, the probability and rank
of the new and the old answer, each written in every language (saved per edit, a run of
kind lens_edits; analysis/lens.py EditLens).  Prints per edit and test language the edits,
how many succeed in the test language, the new answer's median emergence layer after the
edit (the same rule), how often it never emerges, and how often another language's form of
the new answer is decodable first.  --failures adds, per edit and test language, where each
failed transfer is lost (analysis/failures.py: not enriched at the subject, not extracted at
the last position in the latent layers, or lost at the output), read from the saved edit
lenses; --json carries it as "failures".  --patching-run DIR adds, per failure category,
how many failed edits a patching run of the same edits finds carried across languages.

With --executor ray the lens runs as shards on Ray workers: chunks of whole batches of one
prompt language (--batch-size facts per pass, so every fact is read in the same pass as in
one process), and the edits as chunks of edits in one edit language; the tables are the
local run's (README: Running on a cluster).
"""

from __future__ import annotations

import argparse
import json
import math
import textwrap
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
    """Add the ``lens`` command."""
    from analysis.lens import LENSES, LensConfig
    from analysis.tuned_lens import TunedLensConfig

    parser = subparsers.add_parser(
        "lens",
        help="latent-language lens per prompt language (emergence, first language, latent English)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    group = parser.add_argument_group("lens")
    add_settings_args(
        group,
        LensConfig,
        choices={"form": ("question", "cloze"), "lens": LENSES},
        helps={
            "method": "the editing method of the lens before and after an edit (ft, rome, "
            "memit), or none (default): the fact lens alone",
            "seed": "the seed of the edits' random draws",
        },
    )
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
        help="an editing method's setting, e.g. ft.steps=20 (repeatable)",
    )
    group.add_argument(
        "--failures",
        action="store_true",
        help="with --method: classify where each edit fails to transfer to each test language "
        "(not enriched, not extracted, lost at the output; analysis/failures.py), read from "
        "the saved edit lenses",
    )
    group.add_argument(
        "--patching-run",
        default=None,
        metavar="DIR",
        help="with --failures: a patching run (mlake patch) of the same method and model; "
        "each failure then records whether its edit is carried across languages",
    )
    add_settings_args(
        parser.add_argument_group("tuned lens (with --lens tuned)"),
        TunedLensConfig,
        prefix="tuned-",
    )
    add_data_args(parser, facts_default="20", facts_help="N (the first N) or all (default: 20)")
    add_run_args(parser)
    parser.set_defaults(func=run_lens)


def run_lens(args: argparse.Namespace) -> int:
    """Entry point of ``mlake lens``."""
    from analysis.lens import LensConfig
    from analysis.tuned_lens import TunedLensConfig
    from mlake.commands.edit import given_method_fields
    from mlake.method_settings import resolve_method
    from mlake.progress import progress_bar
    from mlake.stages.lens import lens_edits_stage, lens_edits_total, lens_stage, tuned_lens_for
    from mlake_core.editing import get_method
    from mlake_core.editing.covariance import mlake_corpus

    config = settings_from_args(args, LensConfig)
    tuned_settings = settings_from_args(args, TunedLensConfig, prefix="tuned-")
    entry = None
    if args.failures and not config.measures_edits:
        from mlake_core.errors import ConfigError

        raise ConfigError("lens --failures: needs --method ft|rome|memit and --edits above 0")
    if args.patching_run and not args.failures:
        from mlake_core.errors import ConfigError

        raise ConfigError("lens --patching-run: only with --failures")
    if config.measures_edits:
        entry = get_method(config.method)
        overrides = parse_set(
            args.overrides, {entry.name: entry.config_cls}, kind="METHOD", among="--method"
        )
        given = given_method_fields(entry, args.layer, overrides)
        entry.config_cls(**given)  # bad values fail before the model loads
    session = open_session(args)
    ctx, knowledge = session.ctx, session.measure_knowledge()
    tuned = tuned_lens_for(ctx, tuned_settings, log) if config.lens == "tuned" else None
    wanted = set(ctx.fact_ids)
    total = sum(len(knowledge.known(lang) & wanted) for lang in ctx.langs)
    bar = progress_bar("lens", total, "fact", log)

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(info["lang"], refresh=False)
        bar.update(1)

    started = time.perf_counter()
    try:
        result, _ = lens_stage(ctx, config, knowledge=knowledge, on_fact=on_fact, tuned=tuned)
    finally:
        bar.close()
    edited = None
    if entry is not None:
        method_config = resolve_method(
            entry.name,
            ctx.adapter,
            session.loaded.path,
            given=given,
            results_dir=ctx.results_dir,
            log=log,
        ).config
        bar = progress_bar("lens edits", lens_edits_total(ctx, config, knowledge), "edit", log)

        def on_item(info: dict[str, Any]) -> None:
            bar.set_postfix_str(info["lang"], refresh=False)
            bar.update(1)

        try:
            edited, _ = lens_edits_stage(
                ctx,
                config,
                knowledge=knowledge,
                method_config=method_config,
                corpus=mlake_corpus(ctx.dataset),
                on_item=on_item,
                tuned=tuned,
            )
        finally:
            bar.close()
    name, n_facts = session.loaded.name, len(ctx.fact_ids)
    failures = None
    if edited is not None and args.failures:
        from mlake.stages.lens import edit_failures

        failures = edit_failures(edited, args.patching_run)
    if args.json:
        report = json_report(result, name, n_facts, config)
        if edited is not None:
            report["edits"] = edited.to_dict()
        if failures is not None:
            report["failures"] = failures.to_dict()
        report["seconds"] = round(time.perf_counter() - started, 1)
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(result, name, n_facts, config))
        if edited is not None:
            from mlake.stages.lens import edit_lens_lines

            print(f"\nbefore and after {edited.method} edits:")
            print("\n".join(edit_lens_lines(edited)))
            print(f"run: {edited.run_path}")
        if failures is not None:
            from mlake.stages.lens import failure_lines

            print("\nwhere transfer fails:")
            print("\n".join(failure_lines(failures)))
    return 0


def json_report(result: Any, model: str, n_facts: int, config: Any) -> dict[str, Any]:
    """What ``mlake lens --json`` prints: the :class:`~analysis.lens.LensResult` (as it is
    saved), the model, the facts asked for and the config, and per prompt language the
    numbers of the human report (``median_emergence``: ``None`` when no fact emerges;
    ``latent_english_peak``: ``{"layer", "prob"}``, ``None`` without a curve)."""
    from mlake.pipeline.report import latent_english_peak

    peaks = {s.lang: latent_english_peak(s) for s in result.summaries}
    return {
        "model": model,
        "n_facts": n_facts,
        "config": config.to_dict(),
        **result.to_dict(),
        "median_emergence": {
            s.lang: None if math.isnan(s.median_emergence) else s.median_emergence
            for s in result.summaries
        },
        "latent_english_peak": {
            lang: None if peak is None else {"layer": peak[0], "prob": peak[1]}
            for lang, peak in peaks.items()
        },
    }


def format_report(result: Any, model: str, n_facts: int, config: Any) -> str:
    """The human-readable summary ``mlake lens`` prints: one row per prompt language
    (:data:`~mlake.pipeline.report.LENS_COLUMNS`), what the columns mean, what was skipped,
    and the run folder."""
    from mlake.pipeline.report import LENS_COLUMNS, lens_cells, lens_notes

    rows = [list(LENS_COLUMNS), *(lens_cells(s, missing="-") for s in result.summaries)]
    widths = [max(len(row[i]) for row in rows) for i in range(len(LENS_COLUMNS))]
    from mlake.stages.lens import tuned_lines

    lines = [
        f"model {model}; {n_facts} facts; {result.lens} lens at {result.n_layers} layers, "
        f"{config.form} form, top {result.top_k}",
        "",
    ]
    if result.tuned:
        lines += [*tuned_lines(result.tuned), ""]
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [
            cell.rjust(w) if i < 4 else cell.ljust(w)
            for i, (cell, w) in enumerate(zip(row[1:], widths[1:], strict=True), start=1)
        ]
        lines.append(("  " + "  ".join(cells)).rstrip())
    notes = textwrap.wrap(
        lens_notes(result.top_k), width=96, initial_indent="  ", subsequent_indent="  "
    )
    lines += ["", *notes]
    if result.skipped:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    lines.append(f"run: {result.run_path}")
    return "\n".join(lines)
