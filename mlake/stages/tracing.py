"""The tracing stage: causal tracing of every known fact, per language, saved fact by fact;
and the registry of tracing-recommended edit layers that editing's ``layer: auto`` reads."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from mlake.stages.context import StageContext, model_identity, subject_noise_std
from mlake_core.errors import ConfigError
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.models.adapter import ModelAdapter
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run

#: Which answer token tracing measures (part of every tracing run's key): the first with
#: content, the whitespace-only tokens before it joined to the prompt
#: (:meth:`~mlake_core.editing.base.LocatedPrompt.answer_start`).  Runs before it measured
#: the first token, which for Chinese and Japanese answers (and French on mlake-tiny) was
#: often a bare space, whose probability no corruption moves.
ANSWER_TOKEN = "first with content; leading whitespace tokens joined to the prompt"


#: Facts traced together, their restorations sharing forward passes
#: (:func:`~analysis.tracing.causal.trace_prompts`: the same numbers as one at a time).  Each
#: is saved when its group finishes, so an interrupted run loses at most one group's work.
FACTS_PER_GROUP = 8


def _trace_seed(seed: int, fact_id: int, lang: str) -> int:
    """The noise seed of one fact and language (independent of which others are traced)."""
    return int(stable_hash({"seed": seed, "fact": fact_id, "lang": lang}, length=12), 16)


def tracing_stage(
    ctx: StageContext,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    on_fact: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """Causal tracing (:mod:`analysis.tracing.causal`) of every fact the model knows, per
    language, :data:`FACTS_PER_GROUP` facts at a time sharing forward passes (the same numbers
    as one at a time), saving each fact's trace as its group finishes (an interrupted run
    resumes there; the run's key does not depend on the grouping).

    Facts the model does not know in a language (``knowledge``), and views whose form is not
    usable, are skipped and counted per reason.  The noise level (the standard deviation of
    subject-token embeddings over the question forms of ``fact_ids``) is measured once and
    saved.  At the end the per-language summaries (each judged for signal:
    :func:`~analysis.tracing.summary.tracing_signal` with ``config.min_total_effect``), the
    profile similarity matrix and the recommended edit layer (from the languages with signal)
    are saved (``summary.json``), and the recommendation is registered for editing's
    ``layer: auto`` (:func:`register_recommended_layer`).  Each trace is computed under its
    piece's claim (:meth:`~mlake_core.results.store.Run.claim`, a group's claims taken in fact
    order), so concurrent processes never trace the same fact.  With an executor (``ctx.executor``) the traces are computed first as
    shards, a chunk of whole groups in one language each (:mod:`mlake.executors`; the groups
    are fixed, cut from every traceable fact, so a fact's share of its group's passes is the
    same in shards, in one process and on resuming, where a group is traced whole again); with ``ctx.shard``
    only the shard's traces are computed and ``(None, run)`` is returned.  With no language showing signal
    there is no recommendation: the entry registered for the model says so (replacing an
    earlier run's), ``layer: auto`` falls back to the documented default, and the log line
    says why.

    Returns:
        A :class:`~analysis.tracing.summary.TracingResult` and the run folder.
    """
    from mlake_core.data.external import require_subjects

    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    require_subjects(dataset, "causal tracing")
    template, results_dir = ctx.template, ctx.results_dir

    import numpy as np
    import torch

    from analysis.tracing.causal import (
        KINDS,
        TRACE_FINITE,
        TRACE_KEYS,
        FactTrace,
        PromptToTrace,
        class_profile,
        trace_prompts,
    )
    from analysis.tracing.summary import (
        TracingResult,
        recommended_layer,
        similarity_matrix,
        summarize_language,
    )
    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError

    ident = ctx.identity()
    run = ctx.open_run(
        "tracing",
        config,
        known_from="knowledge stage, question form, greedy alias match",
        answer_token=ANSWER_TOKEN,
    )
    facts = {f.fact_id: f for f in dataset.facts}

    def located(fact_id: int, lang: str) -> Any:
        return locate_prompt(adapter, facts[fact_id].views[lang], template, config.form)

    # The facts to trace per language, with their prompts, in fixed groups of
    # FACTS_PER_GROUP: a group's restorations share passes (trace_prompts), and a fact's
    # share of its group's passes (FactTrace.forward_passes) depends on the group, so groups
    # are cut from every traceable fact (saved or not) and a group is traced whole (its saved
    # facts kept): a resumed or sharded run gives the tables of a run in one process.
    ordered = [fid for fid in fact_ids if fid in facts]
    plans: dict[str, tuple[list[list[tuple[int, Any, tuple[int, ...], int]]], dict[str, int]]]
    plans = {}
    for lang in langs:
        known = knowledge.known(lang)
        traceable: list[tuple[int, Any, tuple[int, ...], int]] = []
        lang_skipped: dict[str, int] = {}
        for fact_id in ordered:
            if fact_id not in known:
                lang_skipped["not known before"] = lang_skipped.get("not known before", 0) + 1
                continue
            view = facts[fact_id].views[lang]
            try:
                loc = located(fact_id, lang)
            except MlakeError as err:
                reason = str(err).split(": ", 1)[-1]
                lang_skipped[reason] = lang_skipped.get(reason, 0) + 1
                continue
            lead, answer = loc.answer_start(adapter, view.form(config.form).target.text)
            if answer is None:
                lang_skipped["empty answer"] = lang_skipped.get("empty answer", 0) + 1
                continue
            traceable.append((fact_id, loc, tuple(lead), int(answer)))
        groups = [
            traceable[at : at + FACTS_PER_GROUP] for at in range(0, len(traceable), FACTS_PER_GROUP)
        ]
        plans[lang] = (groups, lang_skipped)
    # Sharded (mlake.executors): a shard is a chunk of whole groups in one language.
    units = {lang: [[g[0] for g in group] for group in plans[lang][0]] for lang in langs}
    ctx.fill_shards("tracing", run, tracing_stage, config, knowledge=knowledge, units=units)
    shard = ctx.shard

    noise_std = subject_noise_std(run, adapter, located, fact_ids, langs, config.noise_scale)
    ctx.say(
        f"tracing: noise {config.noise_scale} x {noise_std:.4g} (std of subject-token "
        f"embeddings); window {config.resolved_window(adapter.n_layers)}; {run.path}"
    )

    summaries, skipped, counts = [], {}, {}
    for lang in langs:
        if shard is not None and not shard.covers(lang):
            continue
        profiles: dict[str, list[Any]] = {k: [] for k in config.kinds}
        p_clean, p_corrupt, passes, rows = [], [], [], []
        groups, lang_skipped = plans[lang]
        mine: list[int] = []
        for group in groups:
            if shard is not None and not shard.covers(lang, group[0][0]):
                continue
            mine += [g[0] for g in group]
            if all(run.has_arrays(f"trace_{lang}_{g[0]}") for g in group):
                continue
            with ExitStack() as held:
                for fact_id, *_ in group:  # one process traces a group; the others read it
                    held.enter_context(run.claim(f"trace_{lang}_{fact_id}"))
                if all(run.has_arrays(f"trace_{lang}_{g[0]}") for g in group):
                    continue
                prompts = []
                for fact_id, loc, lead, answer in group:
                    generator = torch.Generator().manual_seed(
                        _trace_seed(config.seed, fact_id, lang)
                    )
                    swaps = (
                        _other_subjects(adapter, located, ordered, fact_id, lang, config, generator)
                        if config.corruption == "subject"
                        else []
                    )
                    prompts.append(
                        PromptToTrace(
                            (*loc.prompt_ids, *lead),
                            loc.subject_positions,
                            answer,
                            generator,
                            swaps,
                        )
                    )
                traces = trace_prompts(adapter, prompts, config, noise_std=noise_std)
                for (fact_id, *_), trace in zip(group, traces, strict=True):
                    if not run.has_arrays(f"trace_{lang}_{fact_id}"):
                        run.save_arrays(f"trace_{lang}_{fact_id}", trace.to_arrays())
        for fact_id in mine:
            trace = FactTrace.from_arrays(
                run.load_arrays(
                    f"trace_{lang}_{fact_id}",
                    keys=TRACE_KEYS,
                    what="a fact trace",
                    finite=TRACE_FINITE,
                )
            )
            for kind in config.kinds:
                profiles[kind].append(class_profile(trace, kind))
            p_clean.append(trace.p_clean)
            p_corrupt.append(trace.p_corrupt)
            passes.append(trace.forward_passes)
            rows.append(trace.rows)
            if on_fact:
                on_fact({"lang": lang, "fact_id": fact_id, "p_clean": trace.p_clean})
        summaries.append(
            summarize_language(
                lang, profiles, p_clean, p_corrupt, adapter.n_layers, config.min_total_effect
            )
        )
        counts[lang] = {
            "traced": len(p_clean),
            "forward_passes_per_fact": float(np.mean(passes)) if passes else None,
            "rows_per_fact": float(np.mean(rows)) if rows else None,
        }
        for reason, n in lang_skipped.items():
            skipped[f"{lang}:{reason}"] = n
    if shard is not None:  # a worker: its pieces are saved; the summary is the whole run's
        return None, run
    similarity = {kind: similarity_matrix(summaries, [kind]).tolist() for kind in config.kinds}
    similarity["all"] = similarity_matrix(summaries).tolist()
    result = TracingResult(
        langs=tuple(langs),
        kinds=tuple(k for k in KINDS if k in config.kinds),
        n_layers=adapter.n_layers,
        window=config.resolved_window(adapter.n_layers),
        noise_std=noise_std * config.noise_scale,
        summaries=summaries,
        similarity=similarity,
        recommended_layer=recommended_layer(summaries, adapter.n_layers),
        recommended_by_lang={s.lang: recommended_layer([s], adapter.n_layers) for s in summaries},
        counts=counts,
        skipped=skipped,
        run_path=str(run.path),
        min_total_effect=config.min_total_effect,
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped)
    register_recommended_layer(ident, result, results_dir)
    ctx.say(recommendation_line(result))
    return result, run


def recommendation_line(result: Any) -> str:
    """The log line of a finished tracing run: the recommended edit layer and the languages it
    comes from, or why there is none."""
    quiet = [s for s in result.summaries if not s.signal]
    without = "; no signal in " + ", ".join(f"{s.lang} ({_no_signal_numbers(s)})" for s in quiet)
    if result.recommended_layer is not None:
        return (
            f"tracing: recommended edit layer {result.recommended_layer}, from "
            f"{', '.join(result.signal_langs)}{without if quiet else ''}"
        )
    if not any(s.signal for s in result.summaries):
        return (
            "tracing: no recommended edit layer: no language has signal (the corruption must "
            f"lower p(answer) by at least {100 * result.min_total_effect:g}% of its clean "
            f"value){without}; editing's layer auto takes the documented default"
        )
    return (
        "tracing: no recommended edit layer (MLP not traced, or a one-layer model); editing's "
        "layer auto takes the documented default"
    )


def no_signal_text(s: Any, min_total_effect: float) -> str:
    """Why tracing has no signal in one language (a
    :class:`~analysis.tracing.summary.LanguageSummary` without signal), with its numbers: what
    ``mlake trace`` and the pipeline report print."""
    if s.no_signal_reason == "no_facts":
        return "no fact traced"
    if s.no_signal_reason == "no_clean_probability":
        return f"no clean probability to corrupt (p_clean {s.p_clean:.2f})"
    return (
        "tracing has no signal on this model and language: the corruption leaves p(answer) near "
        f"its clean value (p_clean {s.p_clean:.2f}, p_corrupt {s.p_corrupt:.2f}, a drop of "
        f"{_pct(s.relative_effect)}% of p_clean, under {100 * min_total_effect:g}%), so "
        "its maps hold noise and no peak or edit layer is read from them"
    )


def _pct(v: float) -> str:
    text = f"{100 * v:.1f}"
    return text.lstrip("-") if float(text) == 0 else text  # no "-0.0"


def _no_signal_numbers(s: Any) -> str:
    if not s.n_facts:
        return "no fact traced"
    return f"p_clean {s.p_clean:.2f}, p_corrupt {s.p_corrupt:.2f}"


def load_trace(run: Run, lang: str, fact_id: int) -> Any:
    """One saved fact trace (:class:`~analysis.tracing.causal.FactTrace`) of a tracing run."""
    from analysis.tracing.causal import TRACE_FINITE, TRACE_KEYS, FactTrace

    return FactTrace.from_arrays(
        run.load_arrays(
            f"trace_{lang}_{fact_id}", keys=TRACE_KEYS, what="a fact trace", finite=TRACE_FINITE
        )
    )


def _other_subjects(
    adapter: ModelAdapter,
    located: Callable[[int, str], Any],
    fact_ids: Sequence[int],
    fact_id: int,
    lang: str,
    config: Any,
    generator: Any,
) -> list[Any]:
    """Token embeddings of ``config.n_samples`` other facts' subjects in ``lang`` (drawn with
    ``generator``), for the ``subject`` corruption."""
    import torch

    from analysis.tracing.causal import subject_embeddings
    from mlake_core.errors import MlakeError

    others = [f for f in fact_ids if f != fact_id]
    prompts = []
    for i in torch.randperm(len(others), generator=generator).tolist():
        try:
            loc = located(others[i], lang)
        except MlakeError:
            continue
        prompts.append((loc.prompt_ids, loc.subject_positions))
        if len(prompts) == config.n_samples:
            break
    if len(prompts) < config.n_samples:
        raise ConfigError(
            f"--corruption subject: fewer than {config.n_samples} other subjects in {lang}"
        )
    return subject_embeddings(adapter, prompts)


#: File under the results root that maps a model to its tracing-recommended edit layer.
RECOMMENDED_FILE = "recommended_layers.json"


def register_recommended_layer(
    ident: dict[str, Any], result: Any, results_dir: str | os.PathLike[str] | None = None
) -> Path:
    """Record a tracing run's recommended edit layer for the model ``ident`` (the latest
    completed run wins), where editing's ``layer: auto`` finds it.  A run without a
    recommendation (no language with signal) records ``layer: None``, which ``layer: auto``
    reads as no recommendation, and replaces what an earlier run recorded.

    The file is shared by every run in the results root: it is read, changed and written
    under a file lock (``recommended_layers.json.lock``), through a temporary file of this
    writer's own (:func:`~mlake_core.results.store.write_text`: the mode the umask gives), so two processes never lose or corrupt each other's entries.  When it
    already holds this entry (a complete run read back) nothing is written and no lock is
    taken (a read-only results folder can be read).

    Raises:
        ConfigError: the file is not valid JSON (naming it and how to recover).
    """
    import json

    from filelock import FileLock

    from mlake_core.results.store import results_root, write_text

    path = results_root(results_dir) / "tracing" / RECOMMENDED_FILE
    model = stable_hash(ident)
    entry = json.loads(
        json.dumps(
            {
                "model": ident,
                "layer": result.recommended_layer,
                "by_lang": result.recommended_by_lang,
                "n_facts": {s.lang: s.n_facts for s in result.summaries},
                "signal": {s.lang: s.signal for s in result.summaries},
                "run": result.run_path,
            }
        )
    )  # as it reads back from the file
    if path.is_file() and _read_recommended(path).get(model) == entry:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        table = _read_recommended(path) if path.is_file() else {}
        table[model] = entry
        write_text(path, json.dumps(table, indent=2, ensure_ascii=False) + "\n")
    return path


def _read_recommended(path: Path) -> dict[str, Any]:
    """The recommendations file's table.

    Raises:
        ConfigError: it is not a JSON object (naming the file and how to recover).
    """
    import json

    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        table = err
    if not isinstance(table, dict):
        raise ConfigError(
            f"{path}: not a valid recommendations file ({table}); delete it and run "
            "`mlake trace` again (the tracing runs themselves are kept) to re-register"
        )
    return table


def lookup_recommended_layer(
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    results_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """The tracing recommendation registered for this model (``layer``, ``by_lang``,
    ``run``), or ``None`` when the model was never traced."""

    from mlake_core.results.store import results_root

    path = results_root(results_dir) / "tracing" / RECOMMENDED_FILE
    if not path.is_file():
        return None
    table = _read_recommended(path)
    entry = table.get(stable_hash(model_identity(adapter, model_path)))
    return entry if isinstance(entry, dict) else None
