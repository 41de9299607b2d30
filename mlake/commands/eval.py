"""``mlake eval knowledge``: what a model knows about MLaKE facts, per language.

Measures every fact view in the question form and (where well-posed) the cloze form: the
sequence log-probability of the original and the edit answer, alias-aware probabilities,
greedy generation matched against the answers' aliases, and multiple-choice accuracy on
v2024-04 (see ``mlake_core/metrics/knowledge.py``).  A fact is *known* in a language when the
question form is answered correctly by greedy alias match.

On a dataset that gives no original answers (``--dataset mzsre``, BMIKE-53's zsRE task)
what the model knows is not measurable: ``known``, the greedy and probability columns are
``-`` (``null`` in the JSON, with ``measurable`` false) and the table says so; the rows
still score the new answer (the prior of every edit).

Prints one row per language; ``--json`` prints the same as JSON.  Per-fact results go to the
results store (``--results-dir``, ``$MLAKE_RESULTS`` or ``./runs``), one table per language as
it finishes, so an interrupted run resumes and a repeated run is read back, not recomputed.
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
    open_session,
    settings_from_args,
)

#: The :class:`~mlake_core.metrics.knowledge.KnowledgeConfig` fields that are options.
KNOWLEDGE_FIELDS: tuple[str, ...] = ("forms", "max_new_tokens")


def register(subparsers: Any) -> None:
    """Add the ``eval`` command and its ``knowledge`` sub-command."""
    from mlake_core.metrics.knowledge import KnowledgeConfig

    parser = subparsers.add_parser("eval", help="measure models on MLaKE")
    sub = parser.add_subparsers(dest="eval_command", metavar="SUBCOMMAND")
    sub.required = True
    know = sub.add_parser(
        "knowledge",
        help="per-language table of what a model knows (greedy, probabilities, MCQA)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(know)
    add_data_args(
        know,
        facts_default=None,
        facts_help="N (the first N of the default selection: mlake-tiny's training facts for "
        "mlake-tiny models, all facts otherwise), trained (mlake-tiny's training facts) or all "
        "(every fact); none given: the whole default selection",
    )
    add_settings_args(
        know.add_argument_group("measurement"),
        KnowledgeConfig,
        fields=KNOWLEDGE_FIELDS,
        helps={"forms": "prompt forms to measure, comma-separated (question, cloze)"},
    )
    add_run_args(know)
    know.set_defaults(func=run_knowledge)


def run_knowledge(args: argparse.Namespace) -> int:
    """Entry point of ``mlake eval knowledge``."""
    from mlake.stages.knowledge import knowledge_stage
    from mlake_core.data.external import dataset_title
    from mlake_core.metrics.knowledge import KnowledgeConfig

    config = settings_from_args(args, KnowledgeConfig, fields=KNOWLEDGE_FIELDS)
    facts = data_settings(args).facts
    session = open_session(args)
    loaded, ctx = session.loaded, session.ctx
    if facts is None:
        facts = "trained" if loaded.trained_facts is not None else "all"
    started = time.perf_counter()
    result, run = knowledge_stage(ctx, config)
    seconds = time.perf_counter() - started
    summary = result.summary()
    report = {
        "model": loaded.name,
        "model_path": loaded.path,
        "backend": loaded.adapter.info.backend,
        "dtype": loaded.adapter.info.dtype,
        "device": loaded.adapter.info.device,
        "template": loaded.template.to_dict(),
        "bos_policy": loaded.adapter.info.bos.describe(),
        "data_version": ctx.dataset.version,
        "dataset": dataset_title(ctx.dataset),
        "n_facts": len(ctx.fact_ids),
        "facts": facts,
        "results": str(run.path),
        "seconds": round(seconds, 2),
        "skipped": result.skipped,
        "languages": {
            lang: {k: _json_value(v) for k, v in row.items()}
            for lang, row in summary.to_dict(orient="index").items()
        },
    }
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        print(format_summary(report))
    return 0


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if hasattr(value, "item"):
        return value.item()
    return value


def _pct(value: Any) -> str:
    return (
        "-"
        if value is None or (isinstance(value, float) and math.isnan(value))
        else (f"{100 * value:.1f}")
    )


def format_summary(report: dict[str, Any]) -> str:
    """The per-language table of ``mlake eval knowledge`` as text."""
    lines = [
        f"model {report['model']} ({report['backend']}, {report['dtype']}, {report['device']}); "
        f"template {report['template']['name']!r}; "
        + (
            f"MLaKE {report['data_version']}"
            if report.get("dataset", "MLaKE") == "MLaKE"
            else f"{report['dataset']} (--dataset {report['data_version']})"
        )
        + "; "
        f"{report['n_facts']} facts ({report['facts']})",
        "",
        "question form: known = greedy alias match; p(o)>p(e) = alias-aware probability of "
        "the original above the edit; logp = median summed log-prob of the answer (per token)",
        "",
        f"{'lang':<5}{'facts':>6}{'known':>7}{'greedy%':>9}{'p(o)>p(e)%':>12}"
        f"{'logp':>9}{'/tok':>8}  |{'cloze':>6}{'greedy%':>9}{'p(o)>p(e)%':>12}  |"
        f"{'mcqa':>5}{'acc%':>7}{'norm%':>7}",
    ]
    unmeasurable = []
    for lang, row in report["languages"].items():
        logp = row["target_logp"]
        mean = row["target_logp_mean"]
        known = "-" if row["known"] is None else int(row["known"])
        if row.get("measurable") is False:
            unmeasurable.append(lang)
        lines.append(
            f"{lang:<5}{row['facts']:>6}{known:>7}{_pct(row['greedy']):>9}"
            f"{_pct(row['prefers_original']):>12}"
            f"{('-' if logp is None else f'{logp:.3f}'):>9}"
            f"{('-' if mean is None else f'{mean:.3f}'):>8}  |"
            f"{row['cloze_facts']:>6}{_pct(row['cloze_greedy']):>9}"
            f"{_pct(row['cloze_prefers_original']):>12}  |"
            f"{row['mcqa_facts']:>5}{_pct(row['mcqa']):>7}{_pct(row['mcqa_norm']):>7}"
        )
    if unmeasurable:
        lines += [
            "",
            f"{', '.join(unmeasurable)}: known, greedy%, p(o)>p(e)% and logp not measurable "
            "(no original answers); the rows score the new answer only",
        ]
    if report["skipped"]:
        counts = ", ".join(f"{k} {v}" for k, v in sorted(report["skipped"].items()))
        lines += ["", f"not measured (language:form:reason count): {counts}"]
    lines += ["", f"per-fact results: {report['results']} ({report['seconds']} s)"]
    return "\n".join(lines)
