"""The transfer stage: edit every fact in every language and evaluate each edit in every
language, saved edit by edit (resumable)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlake.stages.context import model_identity, open_stage_run, synced_seconds
from mlake_core.data.dataset import MlakeDataset
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run


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
    unit_sets: Mapping[str, Sequence[int]] | None = None,
    unit_source: str | None = None,
    knowledge_run: str | os.PathLike[str] | None = None,
) -> tuple[Any, Run]:
    """Edit every fact in every language with ``method`` and evaluate each edit in every
    language (:func:`analysis.transfer.evaluate_edit`).

    One table per edit language is saved as it finishes; inside a language, each edit's rows
    and the random generator's state after it are saved as they finish (and removed once the
    language's table is saved), so an interrupted run resumes at the next edit.  Pre-edit values come from
    ``knowledge`` (the knowledge stage's result, itself cached).  ``unit_sets`` (with
    ``unit_source``, the neuron run they come from) are the neuron sets of restricted editing
    (:attr:`~mlake_core.editing.base.EditContext.unit_sets`); they enter the run key.
    ``knowledge_run`` (the folder ``knowledge`` was loaded from) is recorded in the run's meta
    for the analyses that join pre-edit values (``mlake relate``).  Every row also carries its
    edit's ``edit_seconds`` (the method's own work), ``eval_seconds`` (the evaluation in every
    language) and ``setup_seconds`` (the run's shared statistics, ROME's and MEMIT's key second
    moments and subject means, measured or loaded on first use inside this edit and left out
    of its ``edit_seconds``), timed when the edit was computed, CUDA work included (rows saved
    before mlake timed edits have none: NaN once concatenated with newer rows).

    Returns:
        The per-fact, per-pair rows (a pandas DataFrame) and the run folder.
    """
    import pandas as pd
    import torch

    from analysis.transfer import evaluate_edit, locality_facts
    from mlake_core.editing.base import EditContext, get_method, make_request
    from mlake_core.editing.covariance import cached_second_moment
    from mlake_core.errors import MlakeError

    entry = get_method(method)
    ident = model_identity(adapter, model_path)
    extra: dict[str, Any] = {
        "method": method,
        # Fields added later are left out while at their default, so earlier runs stay valid.
        "method_config": {
            k: str(v)
            for k, v in vars(method_config).items()
            if (k, v) not in (("units", "all"), ("init", "zero"), ("restarts", 0))
        },
        "corpus": stable_hash(list(corpus)),
        "seed": seed,
    }
    if unit_sets:
        extra["unit_sets"] = stable_hash(
            {k: sorted(int(u) for u in v) for k, v in unit_sets.items()}
        )
    run = open_stage_run(
        "transfer",
        adapter,
        model_path,
        dataset,
        fact_ids,
        langs,
        template,
        config,
        results_dir,
        **extra,
    )
    run.write_meta(
        method=method,
        method_config={k: str(v) for k, v in vars(method_config).items()},
        unit_source=unit_source,
        unit_set_sizes={k: len(v) for k, v in (unit_sets or {}).items()},
        knowledge_run=str(knowledge_run) if knowledge_run else None,
    )
    loc_ids = locality_facts(dataset, fact_ids, config, locality_pool)
    kt = knowledge.table
    q = kt[kt["form"] == "question"]
    known_before = {
        (int(f), str(lang)): m == "original"
        for f, lang, m in zip(q["fact_id"], q["lang"], q["greedy_match"], strict=True)
    }
    moments: dict[int, Any] = {}

    # Seconds spent on the run's shared statistics (measured on first use, inside an edit's
    # method call): left out of that edit's edit_seconds and recorded as setup_seconds.
    setup = [0.0]

    def second_moment(layer: int) -> Any:
        if layer not in moments:
            started = time.perf_counter()
            moments[layer] = cached_second_moment(
                adapter, ident, layer, corpus, results_dir=results_dir
            )
            setup[0] += synced_seconds(adapter, started)
        return moments[layer]

    means: dict[tuple[int, str], Any] = {}

    def subject_mean(layer: int, lang: str) -> Any:
        if (layer, lang) not in means:
            started = time.perf_counter()
            means[layer, lang] = _subject_mean(
                run, adapter, dataset, fact_ids, lang, template, config.edit_form, layer, batch_size
            )
            setup[0] += synced_seconds(adapter, started)
        return means[layer, lang]

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
                # Each edit is saved as it finishes, with the generator's state after it, so a
                # run stopped inside a language resumes at the next fact with the same draws.
                piece = f"edit_{lang}_{fact_id}"
                if run.has_table(piece) and run.has_arrays(piece):
                    done = run.load_table(piece)
                    rows += done.to_dict(orient="records")
                    generator.set_state(torch.from_numpy(run.load_arrays(piece)["generator"]))
                    if on_edit and len(done):
                        loss = float(done["edit_loss"].iloc[0])
                        on_edit({"lang": lang, "fact_id": fact_id, "loss": loss, "loaded": True})
                    continue
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
                context = EditContext(
                    generator, second_moment, demos, dict(unit_sets or {}), subject_mean
                )
                setup[0] = 0.0
                started = time.perf_counter()
                result = entry.fn(adapter, [request], method_config, context)
                edit_seconds = synced_seconds(adapter, started) - setup[0]
                edited = time.perf_counter()
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
                timing = {
                    "edit_seconds": edit_seconds,
                    "eval_seconds": synced_seconds(adapter, edited),
                    "setup_seconds": setup[0],
                }
                edit_rows = [{**row, **timing} for row in edit_rows]
                rows += edit_rows
                run.save_table(piece, pd.DataFrame.from_records(edit_rows))
                run.save_arrays(piece, {"generator": generator.get_state().numpy()})
                if on_edit:
                    on_edit({"lang": lang, "fact_id": fact_id, "loss": result.loss})
            return pd.DataFrame.from_records(rows)

        table, computed = run.load_or_compute_table(f"edits_{lang}", compute)
        for fact_id in fact_ids:  # the language's table holds them now
            run.table_path(f"edit_{lang}_{fact_id}").unlink(missing_ok=True)
            run.arrays_path(f"edit_{lang}_{fact_id}").unlink(missing_ok=True)
        if log:
            log(
                f"transfer [{method}, edits in {lang}]: {'computed' if computed else 'loaded from'} {run.path}"
            )
        tables.append(table)
    rows = pd.concat(tables, ignore_index=True)
    run.write_meta(status="complete", skipped=skipped, locality_ids=loc_ids)
    return rows, run


def _subject_mean(
    run: Run,
    adapter: ModelAdapter,
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    lang: str,
    template: PromptTemplate,
    form: str,
    layer: int,
    batch_size: int,
) -> Any:
    """The mean of ``resid_post.{layer}`` at the subject's last token over (at most 1000 of)
    the run's edit prompts in ``lang`` (ROME's and MEMIT's ``init: subject-mean``), measured
    once per run and saved (``subject_mean_{lang}_{layer}``).

    Raises:
        DataError: when no fact has a usable prompt in ``lang``.
    """
    import torch

    from mlake_core.editing.base import make_request
    from mlake_core.errors import DataError, MlakeError

    name = f"subject_mean_{lang}_{layer}"
    if run.has_arrays(name):
        return torch.from_numpy(run.load_arrays(name)["mean"])
    requests = []
    for fact_id in fact_ids[:1000]:
        try:
            requests.append(
                make_request(adapter, dataset.fact(fact_id).views[lang], template, form)
            )
        except MlakeError:
            continue  # counted where the edit itself is skipped
    if not requests:
        raise DataError(f"subject mean [{lang}]: no fact has a usable {form} prompt")
    site, total = f"resid_post.{layer}", None
    for i in range(0, len(requests), batch_size):
        chunk = requests[i : i + batch_size]
        batch = adapter.batch([r.prompt_ids for r in chunk], padding_side="right")
        _, cache = adapter.run_with_cache(batch, [site])
        rows = torch.arange(len(chunk))
        picked = cache[site][rows, torch.tensor([r.subject_last for r in chunk])].double().sum(0)
        total = picked if total is None else total + picked
    assert total is not None
    mean = (total / len(requests)).float().cpu()
    run.save_arrays(name, {"mean": mean.numpy()})
    return mean
