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
traced, the clean and corrupted probabilities, the layer of peak MLP effect at the last
subject token, the MLP effect at the last subject token and the attention effect at the last
token by layer, the 5x5 similarity of the languages' effect profiles (Pearson correlation of
the average maps by position class and layer), and the recommended edit layer, which
``mlake edit transfer --layer auto`` then uses for this model.  Per-fact traces go to the
results store (resumable).
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
    check_run_args,
    facts_and_knowledge,
    load_model,
    log,
    parse_facts,
)


def register(subparsers: Any) -> None:
    """Add the ``trace`` command."""
    parser = subparsers.add_parser(
        "trace",
        help="causal tracing per language (peak layers, profile similarity)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    group = parser.add_argument_group("tracing")
    group.add_argument("--kinds", default="resid,mlp,attn", help="default: resid,mlp,attn")
    group.add_argument(
        "--window",
        type=int,
        default=None,
        help="layers restored together for mlp and attn (default: 10 for models of 40+ "
        "layers, n_layers // 4 below, at least 1)",
    )
    group.add_argument(
        "--noise-scale",
        type=float,
        default=3.0,
        help="noise std in units of the subject-token embedding std (default: 3)",
    )
    group.add_argument("--samples", type=int, default=10, help="corrupted runs per fact")
    group.add_argument("--form", default="question", choices=("question", "cloze"))
    group.add_argument("--corruption", default="noise", choices=("noise", "subject"))
    group.add_argument("--seed", type=int, default=0, help="noise seed")
    group.add_argument(
        "--max-rows",
        type=int,
        default=None,
        help="rows per forward pass (default: adapted to the free memory)",
    )
    add_data_args(parser, facts_default="20", facts_help="N (the first N) or all (default: 20)")
    add_run_args(parser)
    parser.set_defaults(func=run_trace)


def run_trace(args: argparse.Namespace) -> int:
    """Entry point of ``mlake trace``."""
    from analysis.tracing.causal import TraceConfig
    from mlake.progress import progress_bar
    from mlake.stages.tracing import tracing_stage
    from mlake_core.languages import parse_langs

    langs = parse_langs(args.langs)
    facts_option = parse_facts(args.facts)
    check_run_args(args)
    config = TraceConfig(
        kinds=args.kinds,
        window=args.window,
        noise_scale=args.noise_scale,
        n_samples=args.samples,
        seed=args.seed,
        form=args.form,
        corruption=args.corruption,
        max_rows=args.max_rows,
    )
    loaded = load_model(args)
    data = facts_and_knowledge(args, loaded, langs, facts_option)
    dataset, fact_ids, knowledge = data.dataset, data.fact_ids, data.knowledge
    wanted = set(fact_ids)
    total = sum(len(knowledge.known(lang) & wanted) for lang in langs)
    bar = progress_bar("trace", total, "fact", log)

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['lang']} p_clean {info['p_clean']:.2f}", refresh=False)
        bar.update(1)

    started = time.perf_counter()
    result, _ = tracing_stage(
        loaded.adapter,
        loaded.path,
        dataset,
        fact_ids,
        langs,
        loaded.template,
        config,
        knowledge=knowledge,
        results_dir=args.results_dir,
        log=log,
        on_fact=on_fact,
    )
    bar.close()
    report = {"model": loaded.name, "n_facts": len(fact_ids), **result.to_dict()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(result, loaded.name, len(fact_ids)))
    return 0


def _cell(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def format_report(result: Any, model: str, n_facts: int) -> str:
    """The human-readable summary ``mlake trace`` prints."""
    from analysis.tracing.summary import LAST, LAST_SUBJECT

    lines = [
        f"model {model}; {n_facts} facts; kinds {','.join(result.kinds)}; window "
        f"{result.window}; noise std {result.noise_std:.4g}; {result.run_path}",
        "",
        "lang  traced  p_clean  p_corrupt  peak MLP layer (last subject token), its effect",
    ]
    for s in result.summaries:
        lines.append(
            f"  {s.lang:<4}{s.n_facts:>6}  {_cell(s.p_clean):>7}  {_cell(s.p_corrupt):>9}  "
            f"{'-' if s.peak_mlp_layer is None else s.peak_mlp_layer:>5}"
            f"  {_cell(s.peak_mlp_effect, True):>6}"
        )
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
            row = s.maps[kind][cls] if s.n_facts else [math.nan] * result.n_layers
            lines.append(f"  {s.lang:<4}" + "".join(f"{_cell(v, True):>7}" for v in row))
    lines += [
        "",
        "profile similarity (Pearson correlation of the average effect maps, all kinds)",
        "      " + "".join(f"{b:>7}" for b in result.langs),
    ]
    for a, row in zip(result.langs, result.similarity["all"], strict=True):
        lines.append(f"  {a:<4}" + "".join(f"{_cell(v):>7}" for v in row))
    by_lang = ", ".join(f"{k} {v}" for k, v in result.recommended_by_lang.items())
    lines += [
        "",
        f"recommended edit layer: {result.recommended_layer} (per language: {by_lang}); "
        "`mlake edit transfer --layer auto` uses it for this model",
    ]
    if result.skipped:
        lines.append("skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())))
    return "\n".join(lines)
