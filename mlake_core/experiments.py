"""Stages: an analysis bound to the results store.

A stage takes a loaded model, the data and a config, opens the run folder keyed by everything
that determines its result (:func:`mlake_core.results.open_run`), computes what is not saved
yet (one piece per language, so an interrupted run resumes) and returns the result.  The CLI
commands and the pipeline call stages; analyses themselves stay pure functions.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlake_core.data.dataset import MlakeDataset
from mlake_core.errors import ConfigError
from mlake_core.metrics.knowledge import KnowledgeConfig, KnowledgeResult, measure_knowledge
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run, open_run


def model_identity(adapter: ModelAdapter, path: str | os.PathLike[str]) -> dict[str, Any]:
    """What identifies a model's weights in a result key.

    A hub model is its id, revision and resolved commit.  A local folder is its resolved path
    and the size and modification time of each weight file (so retraining into the same
    folder gives new keys), plus the mlake-tiny training key when there is one.
    """
    info = adapter.info
    ident: dict[str, Any] = {
        "model_id": info.model_id,
        "backend": info.backend,
        "dtype": info.dtype,
    }
    folder = Path(path)
    if folder.is_dir():
        files = sorted(folder.glob("*.safetensors"))
        ident["path"] = str(folder.resolve())
        ident["weights"] = stable_hash(
            [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        )
        from mlake_core.models.mlake_tiny import read_metadata

        meta = read_metadata(folder)
        if meta:
            ident["mlake_tiny_key"] = meta.get("key")
    else:
        ident["revision"] = info.revision
        ident["commit_hash"] = info.commit_hash
    return ident


def select_fact_ids(
    dataset: MlakeDataset, facts: int | str, trained: Sequence[int] | None = None
) -> list[int]:
    """Facts to use: ``"trained"`` (a mlake-tiny's training facts), ``"all"``, or the first
    ``N`` of the default selection (trained facts when known, else all facts in order).

    Raises:
        ConfigError: ``trained`` for a model that records no training facts, or facts that
            are not in the dataset.
    """
    all_ids = [f.fact_id for f in dataset.facts]
    if facts == "all":
        return all_ids
    if facts == "trained" and trained is None:
        raise ConfigError(
            "--facts trained: this model records no training facts (only mlake-tiny does); "
            "use a number or 'all'"
        )
    base = list(trained) if trained is not None else all_ids
    missing = sorted(set(base) - set(all_ids))
    if missing:
        raise ConfigError(
            f"the model's training facts include ids not in MLaKE {dataset.version}: {missing[:5]}"
        )
    if facts == "trained":
        return base
    return base[: int(facts)]


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

    key = {
        "model": model_identity(adapter, model_path),
        "data_version": dataset.version,
        "facts": stable_hash(list(fact_ids)),
        "n_facts": len(fact_ids),
        "langs": list(langs),
        "template": template.to_dict(),
        "config": config.to_dict(),
    }
    run = open_run("knowledge", key, results_dir)
    run.write_meta(
        status="running",
        model=adapter.info.to_dict(),
        template=template.to_dict(),
        config=config.to_dict(),
        data_version=dataset.version,
        fact_ids=list(fact_ids),
        langs=list(langs),
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
