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


def transfer_stage(
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    method: str,
    method_config: Any,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    locality_pool: Sequence[int],
    corpus: Sequence[str],
    seed: int = 0,
    batch_size: int = 32,
    results_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    on_edit: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """Edit every fact in every language with ``method`` and evaluate each edit in every
    language (:func:`mlake_core.editing.evaluate.evaluate_edit`).

    One table per edit language is saved as it finishes (resumable).  Pre-edit values come from
    ``knowledge`` (the knowledge stage's result, itself cached).

    Returns:
        The per-fact, per-pair rows (a pandas DataFrame) and the run folder.
    """
    import pandas as pd
    import torch

    from mlake_core.editing.base import EditContext, get_method, make_request
    from mlake_core.editing.covariance import cached_second_moment
    from mlake_core.editing.evaluate import evaluate_edit, locality_facts
    from mlake_core.errors import MlakeError

    entry = get_method(method)
    ident = model_identity(adapter, model_path)
    key = {
        "model": ident,
        "data_version": dataset.version,
        "facts": stable_hash(list(fact_ids)),
        "n_facts": len(fact_ids),
        "langs": list(langs),
        "template": template.to_dict(),
        "method": method,
        "method_config": {k: str(v) for k, v in vars(method_config).items()},
        "config": config.to_dict(),
        "corpus": stable_hash(list(corpus)),
        "seed": seed,
    }
    run = open_run("transfer", key, results_dir)
    run.write_meta(
        status="running",
        model=adapter.info.to_dict(),
        method=method,
        fact_ids=list(fact_ids),
        langs=list(langs),
    )
    loc_ids = locality_facts(dataset, fact_ids, config, locality_pool)
    kt = knowledge.table
    q = kt[kt["form"] == "question"]
    known_before = {
        (int(f), str(lang)): m == "original"
        for f, lang, m in zip(q["fact_id"], q["lang"], q["greedy_match"], strict=True)
    }
    moments: dict[int, Any] = {}

    def second_moment(layer: int) -> Any:
        if layer not in moments:
            moments[layer] = cached_second_moment(
                adapter, ident, layer, corpus, results_dir=results_dir
            )
        return moments[layer]

    demos = {
        lang: [
            (
                f.views[lang].record.e_prompt,
                f.views[lang].record.question,
                f.views[lang].record.e_answer,
            )
            for f in (dataset.fact(i) for i in loc_ids)
        ]
        for lang in langs
    }
    tables = []
    skipped: dict[str, int] = {}
    for lang in langs:

        def compute(lang: str = lang) -> Any:
            rows: list[dict[str, Any]] = []
            generator = torch.Generator().manual_seed(seed)
            for fact_id in fact_ids:
                view = dataset.fact(fact_id).views[lang]
                try:
                    request = make_request(adapter, view, template, config.edit_form)
                except MlakeError as err:
                    skipped[f"{lang}:{type(err).__name__}"] = (
                        skipped.get(f"{lang}:{type(err).__name__}", 0) + 1
                    )
                    if log:
                        log(f"skipped: {err}")
                    continue
                context = EditContext(generator, second_moment, demos)
                result = entry.fn(adapter, [request], method_config, context)
                edit_rows = evaluate_edit(
                    adapter,
                    result,
                    dataset,
                    langs,
                    template,
                    config,
                    locality_ids=loc_ids,
                    known_before=known_before,
                    batch_size=batch_size,
                )
                rows += edit_rows
                if on_edit:
                    on_edit({"lang": lang, "fact_id": fact_id, "loss": result.loss})
            return pd.DataFrame.from_records(rows)

        table, computed = run.load_or_compute_table(f"edits_{lang}", compute)
        if log:
            log(
                f"transfer [{method}, edits in {lang}]: {'computed' if computed else 'loaded from'} {run.path}"
            )
        tables.append(table)
    rows = pd.concat(tables, ignore_index=True)
    run.write_meta(status="complete", skipped=skipped, locality_ids=loc_ids)
    return rows, run
