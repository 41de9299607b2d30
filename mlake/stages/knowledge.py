"""The knowledge stage: what a model knows, per language, cached per language."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlake.stages.context import StageContext
from mlake_core.metrics.knowledge import (
    KEY_COLUMNS,
    KnowledgeConfig,
    KnowledgeResult,
    measure_knowledge,
)
from mlake_core.results.store import Run


def knowledge_stage(
    ctx: StageContext,
    config: KnowledgeConfig,
    *,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[KnowledgeResult, Run]:
    """Measure knowledge (:func:`~mlake_core.metrics.knowledge.measure_knowledge`) per language,
    saving each language's table as it finishes and reusing saved ones.  With an executor
    (``ctx.executor``) the languages are computed as shards first (:mod:`mlake.executors`);
    with ``ctx.shard``, only the shard's languages, and the result holds only those.  On a
    dataset without original answers (MzsRE, BMIKE-53 zsRE) knowledge is not measurable:
    the stage says so and scores the new answer, every edit's prior.

    Returns:
        The combined result and its run folder.
    """
    import pandas as pd

    from mlake_core.data.external import dataset_title, has_original_answers

    run = ctx.open_run("knowledge", config)
    if not has_original_answers(ctx.dataset):
        ctx.say(
            f"knowledge: {dataset_title(ctx.dataset)} gives no original answer, so what the "
            "model knows is not measurable; the new answer is scored (the unedited model's "
            "rate of giving it is the prior of every edit)"
        )
    # Sharded (mlake.executors): each language's table is a piece.
    ctx.fill_shards("knowledge", run, knowledge_stage, config)
    fact_ids, langs = ctx.fact_ids, ctx.langs
    if ctx.shard is not None:  # a worker: its languages' tables, no summary
        langs = tuple(lang for lang in langs if ctx.shard.covers(lang))
    wanted = set(fact_ids)
    tables, skipped = [], {}
    for lang in langs:
        views = [f.views[lang] for f in ctx.dataset.facts if f.fact_id in wanted]

        def compute(views: list[Any] = views, lang: str = lang) -> Any:
            result = measure_knowledge(
                ctx.adapter,
                views,
                ctx.template,
                config,
                batch_size=ctx.batch_size,
                progress=progress,
            )
            run.save_json(f"skipped_{lang}", result.skipped)
            return result.table

        table, computed = run.load_or_compute_table(
            f"knowledge_{lang}", compute, columns=KEY_COLUMNS
        )
        ctx.say(f"knowledge [{lang}]: {'measured' if computed else 'loaded from'} {run.path}")
        tables.append(table)
        if run.has_json(f"skipped_{lang}"):
            for k, v in run.load_json(f"skipped_{lang}").items():
                skipped[f"{lang}:{k}"] = v
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    result = KnowledgeResult(
        table=table, skipped=skipped, langs=tuple(langs), fact_ids=tuple(fact_ids)
    )
    if ctx.shard is not None:
        return result, run
    if not (run.complete and run.has_table("summary")):  # read back: nothing to write
        run.save_table("summary", result.summary().reset_index())
    run.write_meta(status="complete", skipped=skipped)
    return result, run
