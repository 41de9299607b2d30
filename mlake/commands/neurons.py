"""``mlake neurons``: which MLP neurons and attention heads carry each fact in each language,
which are specific to one language and which are shared.

Methods (``--methods``): ``ig`` (integrated gradients over MLP neurons, Dai et al. 2022),
``atp`` (attribution patching over neurons and heads: clean versus subject-corrupted run), and
``lape`` (language-specific neurons by activation probability entropy over text in each
language, Tang et al. 2024; MLaKE's own statements and questions, or ``--text DIR`` with
``<lang>.txt`` or ``<lang>/*.txt``).  The attributed quantity is the probability of the whole
answer.

Per fact and language, the important set is the units above ``--threshold`` x the largest
score (or the ``--rule topk`` best), kept when important in at least ``--agreement`` of the
fact's prompts (question and, where well-posed, cloze form).  Only facts the model knows in a
language are attributed (knowledge stage; others are counted as skipped).

Prints, per method and unit kind: facts attributed and mean set size per language; the language x language
mean Jaccard overlap of the same fact's sets; the ablation check (answer-probability drop when
the set is ablated versus random sets of the same sizes and layers, and whether the sets can
be told from the random ones: a larger mean drop and a one-sided Wilcoxon p < 0.05, else the
attribution's sets are reported indistinguishable from random sets); per layer, the units
specific to each language, shared, and neither (a unit is used by a language when important
for at least --min-rate and --min-facts of its facts); and the ablation matrix: the drop of
knowledge accuracy in each measured language (columns) when the units specific to the ablated
language (rows) are ablated, next to the drop with random sets of the same sizes.  Results go
to the results store (each fact's attribution saved as it finishes: resumable).

With --executor ray the per-fact attributions (IG, AtP, each with its ablation check) run as
shards on Ray workers, chunks of known facts in one language; the activation statistics,
LAPE, the classes and the ablation matrices are computed in the calling process (README:
Running on a cluster).
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
    data_settings,
    log,
    open_session,
    settings_from_args,
)

#: The :class:`~analysis.neurons.config.NeuronConfig` fields that are options, by group (the
#: per-fact methods' settings, :class:`~analysis.neurons.attribution.AttributionConfig`, are
#: options of their own, named as the fields).
SHARE_FIELDS: tuple[str, ...] = (
    "min_rate",
    "min_facts",
    "lape_top_rate",
    "lape_filter_rate",
    "lape_bar_rate",
    "text_tokens",
)
ABLATION_FIELDS: tuple[str, ...] = ("ablation", "n_random", "ablation_facts")
NEURON_FIELDS: tuple[str, ...] = ("methods", *SHARE_FIELDS, *ABLATION_FIELDS)


def register(subparsers: Any) -> None:
    """Add the ``neurons`` command."""
    from analysis.neurons.ablation import MODES
    from analysis.neurons.attribution import BASELINES, POSITIONS, RULES, AttributionConfig
    from analysis.neurons.config import NeuronConfig

    parser = subparsers.add_parser(
        "neurons",
        help="neuron attribution per language (overlap, specific/shared units, ablation)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    group = parser.add_argument_group("attribution")
    add_settings_args(
        group, NeuronConfig, fields=("methods",), helps={"methods": "comma-separated methods"}
    )
    add_settings_args(
        group,
        AttributionConfig,
        choices={"baseline": BASELINES, "positions": POSITIONS, "rule": RULES},
        helps={
            "layers": "candidate layers, e.g. 2,3,4 (none given: all)",
            "threshold": "the threshold rule keeps units scoring above this fraction of the "
            "prompt's largest score (Dai et al.: 0.2)",
        },
    )
    share = parser.add_argument_group("specific and shared units")
    add_settings_args(share, NeuronConfig, fields=SHARE_FIELDS)
    share.add_argument("--text", default=None, help="text folder for LAPE (default: MLaKE)")
    add_settings_args(
        parser.add_argument_group("ablation"),
        NeuronConfig,
        fields=ABLATION_FIELDS,
        choices={"ablation": MODES},
    )
    add_data_args(parser, facts_default="20", facts_help="N (the first N), trained or all")
    add_run_args(parser)
    parser.set_defaults(func=run_neurons)


def config_from_args(args: argparse.Namespace) -> Any:
    """The :class:`~analysis.neurons.config.NeuronConfig` the options describe.

    Raises:
        ConfigError: a value that does not parse or that the config rejects, naming the option.
    """
    from analysis.neurons.attribution import AttributionConfig
    from analysis.neurons.config import NeuronConfig

    attribution = settings_from_args(args, AttributionConfig)
    return settings_from_args(
        args, NeuronConfig, fields=NEURON_FIELDS, base=NeuronConfig(attribution=attribution)
    )


def run_neurons(args: argparse.Namespace) -> int:
    """Entry point of ``mlake neurons``."""
    from mlake.progress import progress_bar
    from mlake.stages.neurons import neurons_stage

    config = config_from_args(args)
    if args.text is not None:
        from analysis.neurons.activation import folder_texts

        folder_texts(args.text, data_settings(args).langs)  # fail before loading the model
    session = open_session(args)
    ctx = session.ctx
    config.attribution.check_layers(ctx.adapter.n_layers)
    knowledge = session.measure_knowledge()
    wanted = set(ctx.fact_ids)
    per_method = sum(len(knowledge.known(lang) & wanted) for lang in ctx.langs)
    bar = progress_bar("neurons", per_method * len(config.fact_methods), "fact", log)

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['method']} {info['lang']}", refresh=False)
        bar.update(1)

    started = time.perf_counter()
    result, _ = neurons_stage(
        ctx, config, knowledge=knowledge, text_folder=args.text, on_fact=on_fact
    )
    bar.close()
    name, n_facts = session.loaded.name, len(ctx.fact_ids)
    report = {"model": name, "n_facts": n_facts, **result.to_dict()}
    report["seconds"] = round(time.perf_counter() - started, 1)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_report(result, name, n_facts))
    return 0


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return f"{100 * v:.1f}" if pct else f"{v:.2f}"


def _matrix(langs: Any, rows: Any, pct: bool = False) -> list[str]:
    lines = ["      " + "".join(f"{b:>7}" for b in langs)]
    for a, row in zip(langs, rows, strict=True):
        lines.append(f"  {a:<4}" + "".join(f"{_fmt(v, pct):>7}" for v in row))
    return lines


def format_report(result: Any, model: str, n_facts: int) -> str:
    """The human-readable summary ``mlake neurons`` prints."""
    from mlake.pipeline.report import ablation_check_text

    langs = result.langs
    lines = [f"model {model}; {n_facts} facts; {result.run_path}"]
    if result.lape:
        lines.append(
            f"LAPE: {result.lape['selected']} low-entropy neurons selected; activation bar "
            f"{result.lape['bar']:.3f}; text tokens "
            + ", ".join(f"{k} {v}" for k, v in result.lape["tokens"].items())
        )
    for m in result.methods:
        title = f"== {m.method} ({m.unit}s)"
        if m.seconds_per_fact is not None:
            title += (
                f": {m.seconds_per_fact:.2f} s and {m.passes_per_fact:.1f} passes per fact "
                "and language"
            )
        lines += ["", title]
        if m.per_fact:
            lines.append(
                "facts attributed: "
                + ", ".join(f"{k} {v}" for k, v in m.n_facts.items())
                + "; mean set size: "
                + ", ".join(f"{k} {_fmt(v)}" for k, v in m.set_size.items())
            )
            lines += ["same-fact overlap of important sets (mean Jaccard)"]
            lines += _matrix(langs, m.jaccard)
            c = m.check
            if c.get("n"):
                lines.append(
                    f"ablation check ({c['n']} facts): answer probability drops "
                    f"{_fmt(c['drop'], True)} pp with the set, {_fmt(c['drop_random'], True)} pp "
                    f"with random sets; set hurts more in {_fmt(c['fraction_above_random'], True)}% "
                    f"of facts (Wilcoxon p = {c['wilcoxon_p']:.3g})"
                )
                lines.append("  " + ablation_check_text(m).replace("**", ""))
        else:
            lines.append(
                "specific neurons per language: "
                + ", ".join(f"{k} {int(v)}" for k, v in m.set_size.items())
            )
        header = "layer" + "".join(f"{'spec_' + lang:>9}" for lang in langs)
        lines += [
            "units per layer: specific to each language, shared, neither",
            "  " + header + f"{'shared':>9}{'neither':>9}",
        ]
        for row in m.counts:
            lines.append(
                f"  {row['layer']:>5}"
                + "".join(f"{row['specific_' + lang]:>9}" for lang in langs)
                + f"{row['shared']:>9}{row['neither']:>9}"
            )
        if any(not math.isnan(v) for r in m.ablation for v in r if v is not None):
            lines += [
                "ablation matrix: knowledge-accuracy drop (pp) in the measured language "
                "(columns) with the units specific to the ablated language (rows) ablated"
            ]
            lines += _matrix(langs, m.ablation, pct=True)
            lines += ["same with random units (same sizes and layers)"]
            lines += _matrix(langs, m.ablation_random, pct=True)
    if result.skipped:
        lines += [
            "",
            "skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(result.skipped.items())),
        ]
    return "\n".join(lines)
