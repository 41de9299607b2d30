"""The lens stage: the latent-language lens (:mod:`analysis.lens`) of every known fact, per
prompt language, saved fact by fact."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlake.stages.context import StageContext
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.results.store import Run


def lens_stage(
    ctx: StageContext,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    on_fact: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """The latent-language lens of every fact the model knows, per prompt language, each
    fact's lens saved as it finishes (an interrupted run resumes there; a complete run is read
    back without writing).

    Each view is scored on its fact's answer written in every language of the run (the
    question form's original answer of each language's view): its first token with content,
    read where the prompt language's answer begins (:func:`~analysis.lens.reading_tokens`).  Facts the model does not know
    in the prompt language (``knowledge``), and views whose form or answers are not usable,
    are skipped and counted per reason.

    Returns:
        A :class:`~analysis.lens.LensResult` and the run folder.
    """
    from analysis.lens import (
        LENS_KEYS,
        FactLens,
        LensResult,
        lens_prompts,
        reading_tokens,
        summarize_lens,
    )
    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError

    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    run = ctx.open_run(
        "lens",
        config,
        known_from="knowledge stage, question form, greedy alias match",
        reading="after the prompt language's leading answer whitespace; first content tokens; "
        "the prompt language's own as tracing reads it",
    )
    facts = {f.fact_id: f for f in dataset.facts}
    ctx.say(f"lens: logit lens at {adapter.n_layers} layers, top {config.top_k}; {run.path}")
    summaries, skipped = [], {}
    for lang in langs:
        known = knowledge.known(lang)
        lang_skipped: dict[str, int] = {}
        lenses: list[FactLens] = []
        todo: list[tuple[int, tuple[list[int], int, list[int]]]] = []
        for fact_id in (f for f in fact_ids if f in facts):
            name = f"lens_{lang}_{fact_id}"
            if fact_id not in known:
                lang_skipped["not known before"] = lang_skipped.get("not known before", 0) + 1
                continue
            if run.has_arrays(name):
                lenses.append(
                    FactLens.from_arrays(run.load_arrays(name, keys=LENS_KEYS, what="a fact lens"))
                )
                continue
            try:
                loc = locate_prompt(adapter, facts[fact_id].views[lang], ctx.template, config.form)
            except MlakeError as err:
                reason = str(err).split(": ", 1)[-1]
                lang_skipped[reason] = lang_skipped.get(reason, 0) + 1
                continue
            texts = [facts[fact_id].views[a].form(config.form).target.text for a in langs]
            lead, answers = reading_tokens(adapter, loc, texts[langs.index(lang)], texts)
            tokens = [a for a in answers if a is not None]
            if len(tokens) < len(answers):
                lang_skipped["empty answer"] = lang_skipped.get("empty answer", 0) + 1
                continue
            ids = [*loc.prompt_ids, *lead]
            todo.append((fact_id, (ids, loc.subject_positions[-1], tokens)))
        batch_size = ctx.batch_size
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            for (fact_id, (ids, subject_last, answer_ids)), (prob, rank) in zip(
                chunk, lens_prompts(adapter, [item for _, item in chunk], batch_size), strict=True
            ):
                lens = FactLens(
                    prob=prob,
                    rank=rank,
                    answer_ids=answer_ids,
                    answer_langs=list(langs),
                    positions=[subject_last, len(ids) - 1],
                )
                run.save_arrays(f"lens_{lang}_{fact_id}", lens.to_arrays())
                lenses.append(lens)
                if on_fact:
                    on_fact({"lang": lang, "fact_id": fact_id})
        summaries.append(summarize_lens(lang, lenses, langs, config.top_k))
        for reason, n in lang_skipped.items():
            skipped[f"{lang}:{reason}"] = n
    result = LensResult(
        langs=tuple(langs),
        n_layers=adapter.n_layers,
        top_k=config.top_k,
        summaries=summaries,
        skipped=skipped,
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped)
    return result, run
