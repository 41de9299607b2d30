"""``mlake trace``: causal tracing of MLaKE facts in each language.

The subject's token embeddings are corrupted with Gaussian noise (``--noise-scale`` times the
standard deviation of subject-token embeddings, measured on this model and recorded;
``--samples`` seeded samples), or with other subjects (``--corruption subject``); then clean
states are restored one cell at a time and the recovered probability of the answer's first
token is measured: indirect effect = p(restored) - p(corrupted).  Kinds: ``resid`` (the
residual stream at each token and layer), ``mlp`` and ``attn`` (MLP / attention outputs of a
window of layers around each layer, at each token).

Only facts the model knows in a language (question form, greedy alias match; measured first
and cached) are traced; the others are counted as skipped.  Prints, per language, the facts
traced, the clean and corrupted probabilities, the drop (total effect, as a fraction of the
clean probability) and whether tracing has signal there, the layer of peak MLP effect at the
last subject token, the MLP effect at the last subject token and the attention effect at the
last token by layer, the language x language similarity of the languages' effect profiles (Pearson correlation
of the average maps by position class and layer), and the recommended edit layer, which
``mlake edit transfer --layer auto`` then uses for this model.  Per-fact traces go to the
results store (resumable).

Signal: a language has signal when the corruption lowers the mean answer probability by at
least --min-total-effect (default 0.1) of its clean value.  Without it (a model that answers
from the question's wording, not from the subject), the corrupted run is the clean run, the
maps hold noise, and the report says so instead of reading peaks from them; the recommended
edit layer comes from the languages with signal only, and with none there is no
recommendation (``--layer auto`` then takes the documented default).
"""

from __future__ import annotations

import argparse
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
    settings_from_args,
)

#: Option names that differ from the TraceConfig field names.
TRACE_RENAME = {"n_samples": "samples"}


def register(subparsers: Any) -> None:
    """Add the ``trace`` command."""
    from analysis.tracing.causal import CORRUPTIONS, TraceConfig

    parser = subparsers.add_parser(
        "trace",
        help="causal tracing per language (peak layers, profile similarity)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    add_settings_args(
        parser.add_argument_group("tracing"),
        TraceConfig,
        rename=TRACE_RENAME,
        choices={"form": ("question", "cloze"), "corruption": CORRUPTIONS},
    )
    add_data_args(parser, facts_default="20", facts_help="N (the first N) or all (default: 20)")
    add_run_args(parser)
    parser.set_defaults(func=run_trace)


def run_trace(args: argparse.Namespace) -> int:
    """Entry point of ``mlake trace``."""
    from analysis.tracing.causal import TraceConfig
    from mlake.progress import progress_bar
    from mlake.stages.tracing import tracing_stage

    config = settings_from_args(args, TraceConfig, rename=TRACE_RENAME)
    session = open_session(args)
    ctx, knowledge = session.ctx, session.measure_knowledge()
    wanted = set(ctx.fact_ids)
    total = sum(len(knowledge.known(lang) & wanted) for lang in ctx.langs)
    bar = progress_bar("trace", total, "fact", log)

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['lang']} p_clean {info['p_clean']:.2f}", refresh=False)
        bar.update(1)

    started = time.perf_counter()
    result, _ = tracing_stage(ctx, config, knowledge=knowledge, on_fact=on_fact)
    bar.close()
    name, n_facts = session.loaded.name, len(ctx.fact_ids)
    report = {"model": name, "n_facts": n_facts, **result.to_dict()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(result, name, n_facts))
    return 0


def _cell(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def _share(s: Any) -> str:
    """A language's peak MLP effect as a percentage of its total effect."""
    if not s.total_effect > 0 or math.isnan(s.peak_mlp_effect):
        return "-"
    return f"{100 * s.peak_mlp_effect / s.total_effect:.0f}%"


def format_report(result: Any, model: str, n_facts: int) -> str:
    """The human-readable summary ``mlake trace`` prints."""
    from analysis.tracing.summary import LAST, LAST_SUBJECT
    from mlake.stages.tracing import no_signal_text

    threshold = f"{100 * result.min_total_effect:g}%"
    lines = [
        f"model {model}; {n_facts} facts; kinds {','.join(result.kinds)}; window "
        f"{result.window}; noise std {result.noise_std:.4g}; {result.run_path}",
        "",
        "lang  traced  p_clean  p_corrupt  drop %  signal  peak MLP layer (last subject token), "
        "its effect (pp, % of the drop)",
    ]
    for s in result.summaries:
        peak, effect = "-", "-"
        if s.signal and s.peak_mlp_layer is not None:
            peak = s.peak_mlp_layer
            effect = f"{_cell(s.peak_mlp_effect, True)} ({_share(s)})"
        lines.append(
            f"  {s.lang:<4}{s.n_facts:>6}  {_cell(s.p_clean):>7}  {_cell(s.p_corrupt):>9}  "
            f"{_cell(s.relative_effect, True):>6}  {'yes' if s.signal else 'no':>6}  "
            f"{peak:>5}  {effect}"
        )
    lines.append(
        f"  (drop: p_clean - p_corrupt as % of p_clean; signal: a drop of at least {threshold})"
    )
    for s in result.summaries:
        if not s.signal:
            lines.append(f"  {s.lang}: {no_signal_text(s, result.min_total_effect)}")
    layers = "".join(f"{layer:>7}" for layer in range(result.n_layers))
    for kind, cls, label in (
        ("mlp", LAST_SUBJECT, "MLP effect at the last subject token"),
        ("attn", LAST, "attention effect at the last token"),
        ("resid", LAST_SUBJECT, "residual effect at the last subject token"),
    ):
        if kind not in result.kinds:
            continue
        lines += ["", f"{label}, by layer (percentage points)", "      " + layers]
        for s in result.summaries:
            if not s.signal:
                lines.append(f"  {s.lang:<4}  (no signal)")
                continue
            row = s.maps[kind][cls] if s.n_facts else [math.nan] * result.n_layers
            lines.append(f"  {s.lang:<4}" + "".join(f"{_cell(v, True):>7}" for v in row))
    lines += [
        "",
        "profile similarity (Pearson correlation of the average effect maps, all kinds)",
        "      " + "".join(f"{b:>7}" for b in result.langs),
    ]
    for a, row in zip(result.langs, result.similarity["all"], strict=True):
        lines.append(f"  {a:<4}" + "".join(f"{_cell(v):>7}" for v in row))
    quiet = [s.lang for s in result.summaries if not s.signal]
    if quiet:
        lines.append(
            f"  ({', '.join(quiet)}: no signal; their profiles are noise, and so are their "
            "similarities)"
        )
    by_lang = ", ".join(
        f"{k} {'- (no signal)' if v is None else v}" for k, v in result.recommended_by_lang.items()
    )
    lines.append("")
    if result.recommended_layer is not None:
        lines.append(
            f"recommended edit layer: {result.recommended_layer}, from the languages with "
            f"signal ({', '.join(result.signal_langs)}; per language: {by_lang}); "
            "`mlake edit transfer --layer auto` uses it for this model"
        )
    elif not result.signal_langs:
        lines.append(
            "recommended edit layer: none: tracing has no signal on this model in any language "
            "traced; `mlake edit transfer --layer auto` takes the documented default"
        )
    else:
        lines.append(
            "recommended edit layer: none (MLP not traced, or a one-layer model); "
            "`mlake edit transfer --layer auto` takes the documented default"
        )
    if result.skipped:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    return "\n".join(lines)
