"""The knowledge stage: what a model knows, per language, cached per language."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from mlake.stages.context import open_stage_run
from mlake_core.data.dataset import MlakeDataset
from mlake_core.metrics.knowledge import KnowledgeConfig, KnowledgeResult, measure_knowledge
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.results.store import Run


def knowledge_stage(
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: KnowledgeConfig,
    *,
    batch_size: int = 32,
    results_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> tuple[KnowledgeResult, Run]:
    """Measure knowledge (:func:`~mlake_core.metrics.knowledge.measure_knowledge`) per language,
    saving each language's table as it finishes and reusing saved ones.

    Returns:
        The combined result and its run folder.
    """
    import pandas as pd

    run = open_stage_run(
        "knowledge", adapter, model_path, dataset, fact_ids, langs, template, config, results_dir
    )
    wanted = set(fact_ids)
    tables, skipped = [], {}
    for lang in langs:
        views = [f.views[lang] for f in dataset.facts if f.fact_id in wanted]

        def compute(views: list[Any] = views, lang: str = lang) -> Any:
            result = measure_knowledge(
                adapter, views, template, config, batch_size=batch_size, progress=progress
            )
            run.save_json(f"skipped_{lang}", result.skipped)
            return result.table

        table, computed = run.load_or_compute_table(f"knowledge_{lang}", compute)
        if log:
            log(f"knowledge [{lang}]: {'measured' if computed else 'loaded from'} {run.path}")
        tables.append(table)
        if run.has_json(f"skipped_{lang}"):
            for k, v in run.load_json(f"skipped_{lang}").items():
                skipped[f"{lang}:{k}"] = v
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    result = KnowledgeResult(
        table=table, skipped=skipped, langs=tuple(langs), fact_ids=tuple(fact_ids)
    )
    summary = result.summary()
    run.save_table("summary", summary.reset_index())
    run.write_meta(status="complete", skipped=skipped)
    return result, run
