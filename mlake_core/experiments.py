"""Stages: an analysis bound to the results store.

A stage takes a loaded model, the data and a config, opens the run folder keyed by everything
that determines its result (:func:`mlake_core.results.open_run`), computes what is not saved
yet (one piece per language, so an interrupted run resumes) and returns the result.  The CLI
commands and the pipeline call stages; analyses themselves stay pure functions.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
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


def open_stage_run(
    kind: str,
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: Any,
    results_dir: str | os.PathLike[str] | None,
    **extra_key: Any,
) -> Run:
    """Open the run of a stage keyed by the model, data, facts, languages, template and config
    (``None``: a stage without one; left out of the key) plus ``extra_key``, and mark it
    running with the same provenance (stages add their own meta fields after)."""
    key = {
        "model": model_identity(adapter, model_path),
        "data_version": dataset.version,
        "facts": stable_hash(list(fact_ids)),
        "n_facts": len(fact_ids),
        "langs": list(langs),
        "template": template.to_dict(),
        **({"config": config.to_dict()} if config is not None else {}),
        **extra_key,
    }
    run = open_run(kind, key, results_dir)
    run.write_meta(
        status="running",
        model=adapter.info.to_dict(),
        template=template.to_dict(),
        config=config.to_dict() if config is not None else None,
        data_version=dataset.version,
        fact_ids=list(fact_ids),
        langs=list(langs),
    )
    return run


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
    language (:func:`mlake_core.editing.evaluate.evaluate_edit`).

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

    from mlake_core.editing.base import EditContext, get_method, make_request
    from mlake_core.editing.covariance import cached_second_moment
    from mlake_core.editing.evaluate import evaluate_edit, locality_facts
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
            setup[0] += _elapsed(adapter, started)
        return moments[layer]

    means: dict[tuple[int, str], Any] = {}

    def subject_mean(layer: int, lang: str) -> Any:
        if (layer, lang) not in means:
            started = time.perf_counter()
            means[layer, lang] = _subject_mean(
                run, adapter, dataset, fact_ids, lang, template, config.edit_form, layer, batch_size
            )
            setup[0] += _elapsed(adapter, started)
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
                edit_seconds = _elapsed(adapter, started) - setup[0]
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
                    "eval_seconds": _elapsed(adapter, edited),
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


def _elapsed(adapter: ModelAdapter, started: float) -> float:
    """Seconds since ``started`` (``time.perf_counter``), once the model's CUDA device has
    finished the work queued on it."""
    import torch

    if adapter.device.type == "cuda":
        torch.cuda.synchronize(adapter.device)
    return time.perf_counter() - started


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


def _trace_seed(seed: int, fact_id: int, lang: str) -> int:
    """The noise seed of one fact and language (independent of which others are traced)."""
    return int(stable_hash({"seed": seed, "fact": fact_id, "lang": lang}, length=12), 16)


def tracing_stage(
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    results_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    on_fact: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """Causal tracing (:mod:`mlake_core.tracing.causal`) of every fact the model knows, per
    language, saving each fact's trace as it finishes (an interrupted run resumes there).

    Facts the model does not know in a language (``knowledge``), and views whose form is not
    usable, are skipped and counted per reason.  The noise level (the standard deviation of
    subject-token embeddings over the question forms of ``fact_ids``) is measured once and
    saved.  At the end the per-language summaries, the profile similarity matrix and the
    recommended edit layer are saved (``summary.json``), and the recommendation is registered
    for editing's ``layer: auto`` (:func:`register_recommended_layer`).

    Returns:
        A :class:`~mlake_core.tracing.summary.TracingResult` and the run folder.
    """
    import numpy as np
    import torch

    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError
    from mlake_core.tracing.causal import KINDS, FactTrace, class_profile, trace_prompt
    from mlake_core.tracing.summary import (
        TracingResult,
        recommended_layer,
        similarity_matrix,
        summarize_language,
    )

    ident = model_identity(adapter, model_path)
    run = open_stage_run(
        "tracing",
        adapter,
        model_path,
        dataset,
        fact_ids,
        langs,
        template,
        config,
        results_dir,
        known_from="knowledge stage, question form, greedy alias match",
    )
    facts = {f.fact_id: f for f in dataset.facts}

    def located(fact_id: int, lang: str) -> Any:
        return locate_prompt(adapter, facts[fact_id].views[lang], template, config.form)

    noise_std = _subject_noise_std(run, adapter, located, fact_ids, langs, config.noise_scale)
    if log:
        log(
            f"tracing: noise {config.noise_scale} x {noise_std:.4g} (std of subject-token "
            f"embeddings); window {config.resolved_window(adapter.n_layers)}; {run.path}"
        )

    summaries, skipped, counts = [], {}, {}
    for lang in langs:
        known = knowledge.known(lang)
        profiles: dict[str, list[Any]] = {k: [] for k in config.kinds}
        p_clean, p_corrupt, passes, rows = [], [], [], []
        lang_skipped: dict[str, int] = {}
        ordered = [fid for fid in fact_ids if fid in facts]
        for fact_id in ordered:
            name = f"trace_{lang}_{fact_id}"
            if fact_id not in known:
                lang_skipped["not known before"] = lang_skipped.get("not known before", 0) + 1
                continue
            if run.has_arrays(name):
                arrays = run.load_arrays(name)
            else:
                view = facts[fact_id].views[lang]
                try:
                    loc = located(fact_id, lang)
                except MlakeError as err:
                    reason = str(err).split(": ", 1)[-1]
                    lang_skipped[reason] = lang_skipped.get(reason, 0) + 1
                    continue
                answer = loc.answer_ids(adapter, view.form(config.form).target.text)
                if not answer:
                    lang_skipped["empty answer"] = lang_skipped.get("empty answer", 0) + 1
                    continue
                generator = torch.Generator().manual_seed(_trace_seed(config.seed, fact_id, lang))
                swaps = (
                    _other_subjects(adapter, located, ordered, fact_id, lang, config, generator)
                    if config.corruption == "subject"
                    else []
                )
                trace = trace_prompt(
                    adapter,
                    loc.prompt_ids,
                    loc.subject_positions,
                    int(answer[0]),
                    config,
                    generator,
                    noise_std=noise_std,
                    swap_embeddings=swaps,
                )
                arrays = trace.to_arrays()
                run.save_arrays(name, arrays)
            trace = FactTrace.from_arrays(arrays)
            for kind in config.kinds:
                profiles[kind].append(class_profile(trace, kind))
            p_clean.append(trace.p_clean)
            p_corrupt.append(trace.p_corrupt)
            passes.append(trace.forward_passes)
            rows.append(trace.rows)
            if on_fact:
                on_fact({"lang": lang, "fact_id": fact_id, "p_clean": trace.p_clean})
        summaries.append(summarize_language(lang, profiles, p_clean, p_corrupt, adapter.n_layers))
        counts[lang] = {
            "traced": len(p_clean),
            "forward_passes_per_fact": float(np.mean(passes)) if passes else None,
            "rows_per_fact": float(np.mean(rows)) if rows else None,
        }
        for reason, n in lang_skipped.items():
            skipped[f"{lang}:{reason}"] = n
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
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped)
    if result.recommended_layer is not None:
        register_recommended_layer(ident, result, results_dir)
    return result, run


def _subject_noise_std(
    run: Run,
    adapter: ModelAdapter,
    located: Callable[[int, str], Any],
    fact_ids: Sequence[int],
    langs: Sequence[str],
    noise_scale: float,
) -> float:
    """The standard deviation of subject-token embeddings over (at most 1000 of) the facts'
    prompts, measured once per run and saved (``noise.json``)."""
    from mlake_core.errors import MlakeError
    from mlake_core.tracing.causal import embedding_noise_std

    if run.has_json("noise"):
        return float(run.load_json("noise")["embedding_std"])
    sample = []
    for fact_id in fact_ids:
        for lang in langs:
            try:
                loc = located(fact_id, lang)
            except MlakeError:
                continue
            sample.append((loc.prompt_ids, loc.subject_positions))
    sample = sample[:1000]
    noise_std = embedding_noise_std(adapter, sample)
    run.save_json(
        "noise",
        {
            "embedding_std": noise_std,
            "noise_scale": noise_scale,
            "noise_std": noise_scale * noise_std,
            "measured_on_subjects": len(sample),
        },
    )
    return noise_std


def load_trace(run: Run, lang: str, fact_id: int) -> Any:
    """One saved fact trace (:class:`~mlake_core.tracing.causal.FactTrace`) of a tracing run."""
    from mlake_core.tracing.causal import FactTrace

    return FactTrace.from_arrays(run.load_arrays(f"trace_{lang}_{fact_id}"))


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

    from mlake_core.errors import MlakeError
    from mlake_core.tracing.causal import subject_embeddings

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
    completed run wins), where editing's ``layer: auto`` finds it."""
    import json

    from mlake_core.results.store import results_root

    path = results_root(results_dir) / "tracing" / RECOMMENDED_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    table = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    table[stable_hash(ident)] = {
        "model": ident,
        "layer": result.recommended_layer,
        "by_lang": result.recommended_by_lang,
        "n_facts": {s.lang: s.n_facts for s in result.summaries},
        "run": result.run_path,
    }
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def lookup_recommended_layer(
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    results_dir: str | os.PathLike[str] | None = None,
) -> dict[str, Any] | None:
    """The tracing recommendation registered for this model (``layer``, ``by_lang``,
    ``run``), or ``None`` when the model was never traced."""
    import json

    from mlake_core.results.store import results_root

    path = results_root(results_dir) / "tracing" / RECOMMENDED_FILE
    if not path.is_file():
        return None
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ConfigError(f"{path}: malformed JSON ({err}); delete it to re-register") from None
    entry = table.get(stable_hash(model_identity(adapter, model_path)))
    return entry if isinstance(entry, dict) else None


def _attribution_prompts(
    adapter: ModelAdapter, view: Any, template: PromptTemplate, forms: Sequence[str]
) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    """A fact view's prompts to attribute, one per usable form, and the forms skipped (by
    reason).  The answer is encoded separately and joined by ids."""
    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError
    from mlake_core.neurons.attribution import AttributionPrompt

    prompts: list[tuple[str, Any]] = []
    skipped: dict[str, int] = {}
    for form in forms:
        try:
            loc = locate_prompt(adapter, view, template, form)
        except MlakeError as err:
            reason = f"{form} form: " + str(err).split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        answer = loc.answer_ids(adapter, view.form(form).target.text)
        if not answer:
            skipped[f"{form} form: empty answer"] = skipped.get(f"{form} form: empty answer", 0) + 1
            continue
        prompts.append(
            (
                form,
                AttributionPrompt(loc.where, loc.prompt_ids, loc.subject_positions, tuple(answer)),
            )
        )
    return prompts, skipped


class _Settings:
    """A config given as a plain dict (for run keys)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self._values = values

    def to_dict(self) -> dict[str, Any]:
        return dict(self._values)


def neurons_stage(
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    langs: Sequence[str],
    template: PromptTemplate,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    text_folder: str | os.PathLike[str] | None = None,
    batch_size: int = 32,
    results_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    on_fact: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """Neuron attribution per language (:mod:`mlake_core.neurons`): per-fact attribution of
    every fact the model knows, important sets, their overlap between languages, the
    classification of units as language-specific or shared, the ablation check of every
    attribution and the ablation matrix; and LAPE's language-specific neurons from text.

    Everything is saved as it is computed: activation statistics, each fact's attribution (with
    its ablation check), each method's tables; an interrupted run resumes.

    Args:
        config: a :class:`~mlake_core.neurons.config.NeuronConfig`.
        knowledge: the knowledge stage's result (which facts are known, per language).
        text_folder: text per language for the activation statistics (``<lang>.txt`` or
            ``<lang>/``); default MLaKE's own statements and questions.

    Returns:
        A :class:`~mlake_core.neurons.config.NeuronResult` and the run folder.
    """

    import numpy as np
    import pandas as pd
    import torch
    from scipy.stats import wilcoxon

    from mlake_core.editing.base import locate_prompt
    from mlake_core.neurons.ablation import ablation_check, ablation_matrix
    from mlake_core.neurons.activation import (
        ActivationStats,
        activation_stats,
        folder_texts,
        lape,
        mlake_texts,
    )
    from mlake_core.neurons.attribution import (
        AttributionContext,
        FactAttribution,
        attribute_fact,
        get_attribution_method,
    )
    from mlake_core.neurons.config import MethodSummary, NeuronResult
    from mlake_core.neurons.sharing import (
        classes_from_assignment,
        classify_units,
        overlap_matrix,
        pair_rows,
    )

    attr_cfg = config.attribution
    attr_cfg.check_layers(adapter.n_layers)
    text_key = None
    if text_folder is not None:
        texts = folder_texts(text_folder, langs)
        text_key = stable_hash({k: v for k, v in texts.items()})
    # The run is keyed by everything but the list of methods: each method's results are
    # separate files, so a later run with more methods reuses what an earlier one computed.
    run = open_stage_run(
        "neurons",
        adapter,
        model_path,
        dataset,
        fact_ids,
        langs,
        template,
        _Settings({k: v for k, v in config.to_dict().items() if k != "methods"}),
        results_dir,
        text=text_key or "mlake",
        known_from="knowledge stage, question form, greedy alias match",
    )
    facts = {f.fact_id: f for f in dataset.facts}

    # Activation statistics: LAPE, the mean baseline and mean ablation use them.
    if run.has_arrays("activations"):
        stats = ActivationStats.from_arrays(run.load_arrays("activations"))
    else:
        texts_by_lang = (
            folder_texts(text_folder, langs) if text_folder else mlake_texts(dataset, langs)
        )
        stats = activation_stats(
            adapter, texts_by_lang, max_tokens=config.text_tokens, batch_size=8 * batch_size
        )
        run.save_arrays("activations", stats.to_arrays())
    mean = stats.mean()
    if log:
        log(
            "neurons: activation statistics on "
            + ", ".join(
                f"{lang} {int(n)} tokens"
                for lang, n in zip(stats.langs, stats.n_tokens, strict=False)
            )
            + f"; {run.path}"
        )
    noise_std = 0.0
    if "atp" in config.fact_methods:

        def located(fact_id: int, lang: str) -> Any:
            return locate_prompt(adapter, facts[fact_id].views[lang], template, "question")

        noise_std = _subject_noise_std(run, adapter, located, fact_ids, langs, attr_cfg.noise_scale)
    context_mean = {layer: torch.as_tensor(mean[layer]) for layer in range(adapter.n_layers)}
    known = {lang: knowledge.known(lang) for lang in langs}
    ordered = [fid for fid in fact_ids if fid in facts]
    skipped: dict[str, int] = {}
    summaries: list[MethodSummary] = []
    rng_seed = int(stable_hash({"seed": attr_cfg.seed, "what": "ablation"}, length=8), 16)

    def matrix_views() -> dict[str, list[Any]]:
        return {
            lang: [facts[f].views[lang] for f in ordered if f in known[lang]][
                : config.ablation_facts
            ]
            for lang in langs
        }

    def neuron_ablation(
        name: str, specific: dict[str, Any]
    ) -> tuple[list[list[float]], list[list[float]]]:
        """The ablation matrix of a language -> specific-neurons map (saved as ``name``): the
        accuracy drops with the specific and with random neurons, ``[ablated, measured]``."""

        def compute() -> Any:
            return pd.DataFrame.from_records(
                ablation_matrix(
                    adapter,
                    matrix_views(),
                    template,
                    specific,
                    "neuron",
                    generator=np.random.default_rng(rng_seed),
                    mode=config.ablation,
                    mean=mean,
                    batch_size=batch_size,
                )
            )

        rows, _ = run.load_or_compute_table(name, compute)
        drop = np.full((len(langs), len(langs)), np.nan)
        drop_random = np.full((len(langs), len(langs)), np.nan)
        index = {lang: i for i, lang in enumerate(langs)}
        for r in rows.itertuples():
            drop[index[r.ablated_lang], index[r.measured_lang]] = r.drop
            drop_random[index[r.ablated_lang], index[r.measured_lang]] = r.drop_random
        return drop.tolist(), drop_random.tolist()

    for method in config.fact_methods:
        entry = get_attribution_method(method)
        sets: dict[str, dict[str, dict[int, np.ndarray]]] = {u: {} for u in entry.units}
        checks: dict[str, list[dict[str, float]]] = {u: [] for u in entry.units}
        seconds, passes = [], []
        for lang in langs:
            for fact_id in ordered:
                if fact_id not in known[lang]:
                    key = f"{method}:{lang}:not known before"
                    skipped[key] = skipped.get(key, 0) + 1
                    continue
                name = f"{method}_{lang}_{fact_id}"
                # Located on every run (tokenization only), so a resumed run reports the same
                # skipped forms as the first.
                view = facts[fact_id].views[lang]
                prompts, why = _attribution_prompts(adapter, view, template, attr_cfg.forms)
                for reason, n in why.items():
                    skipped[f"{method}:{lang}:{reason}"] = (
                        skipped.get(f"{method}:{lang}:{reason}", 0) + n
                    )
                if not prompts:
                    continue
                if run.has_arrays(name):
                    arrays = run.load_arrays(name)
                else:
                    seed = int(
                        stable_hash(
                            {"seed": attr_cfg.seed, "fact": fact_id, "lang": lang}, length=12
                        ),
                        16,
                    )
                    context = AttributionContext(
                        torch.Generator().manual_seed(seed), noise_std, context_mean
                    )
                    started = time.perf_counter()
                    fa = attribute_fact(adapter, method, prompts, attr_cfg, context)
                    elapsed = time.perf_counter() - started
                    arrays = fa.to_arrays()
                    arrays["seconds"] = np.array(elapsed)
                    rng = np.random.default_rng([rng_seed, fact_id, langs.index(lang)])
                    for unit in entry.units:
                        check = ablation_check(
                            adapter,
                            prompts[0][1],
                            fa.sets[unit],
                            unit,
                            n_random=config.n_random,
                            generator=rng,
                            mode=config.ablation if unit == "neuron" else "zero",
                            mean=mean,
                        )
                        arrays[f"check_{unit}"] = np.array(
                            [check["p_clean"], check["p_ablated"], check["p_random"]]
                        )
                    run.save_arrays(name, arrays)
                fa = FactAttribution.from_arrays(arrays)
                seconds.append(float(arrays["seconds"]))
                passes.append(fa.passes)
                for unit in entry.units:
                    sets[unit].setdefault(lang, {})[fact_id] = fa.sets[unit]
                    c = np.asarray(arrays[f"check_{unit}"], dtype=float)
                    checks[unit].append({"p_clean": c[0], "p_ablated": c[1], "p_random": c[2]})
                if on_fact:
                    on_fact({"method": method, "lang": lang, "fact_id": fact_id})
        for unit in entry.units:
            n_units = adapter.d_mlp if unit == "neuron" else adapter.info.n_heads
            rows = []
            for fact_id in ordered:
                per_lang = {
                    lang: sets[unit][lang][fact_id]
                    for lang in langs
                    if fact_id in sets[unit].get(lang, {})
                }
                for row in pair_rows(per_lang, langs, adapter.n_layers, n_units):
                    rows.append({"fact_id": fact_id, **row})
            table = pd.DataFrame.from_records(rows)
            run.save_table(f"overlap_{method}_{unit}", table)
            classes = classify_units(
                {lang: list(sets[unit].get(lang, {}).values()) for lang in langs},
                langs,
                adapter.n_layers,
                n_units,
                min_rate=config.min_rate,
                min_facts=config.min_facts,
            )
            specific = classes.specific_sets()
            run.save_json(
                f"specific_{method}_{unit}",
                {lang: units.tolist() for lang, units in specific.items()}
                | {"shared": classes.shared_units().tolist()},
            )
            n_pairs = np.zeros((len(langs), len(langs)), dtype=int)
            if len(table):
                valid = table.dropna(subset=["jaccard"])
                for (a, b), n in valid.groupby(["lang_a", "lang_b"]).size().items():
                    i, j = langs.index(a), langs.index(b)
                    n_pairs[i, j] = n_pairs[j, i] = n
            drop, drop_random = (
                [[math.nan] * len(langs)] * len(langs),
                [[math.nan] * len(langs)] * len(langs),
            )
            if unit == "neuron" and config.ablation_facts > 0:
                drop, drop_random = neuron_ablation(f"ablation_{method}_{unit}", specific)
            check_rows = [c for c in checks[unit] if not math.isnan(c["p_random"])]
            summaries.append(
                MethodSummary(
                    method=method,
                    unit=unit,
                    n_facts={lang: len(sets[unit].get(lang, {})) for lang in langs},
                    set_size={
                        lang: float(np.mean([len(s) for s in sets[unit][lang].values()]))
                        if sets[unit].get(lang)
                        else math.nan
                        for lang in langs
                    },
                    jaccard=overlap_matrix(table, langs, "jaccard").tolist(),
                    overlap=overlap_matrix(table, langs, "overlap").tolist(),
                    n_pairs=n_pairs.tolist(),
                    counts=classes.counts(),
                    ablation=drop,
                    ablation_random=drop_random,
                    check=_check_summary(check_rows, wilcoxon),
                    seconds_per_fact=float(np.mean(seconds)) if seconds else None,
                    passes_per_fact=float(np.mean(passes)) if passes else None,
                )
            )
        if log:
            log(
                f"neurons [{method}]: {sum(len(v) for v in sets[entry.units[0]].values())} fact attributions; {run.path}"
            )

    lape_info: dict[str, Any] = {}
    if "lape" in config.methods:
        found = lape(
            stats,
            top_rate=config.lape_top_rate,
            filter_rate=config.lape_filter_rate,
            bar_rate=config.lape_bar_rate,
        )
        run.save_arrays(
            "lape",
            {"selected": found.selected, "assignment": found.assignment, "entropy": found.entropy},
        )
        classes = classes_from_assignment(
            found.selected, found.assignment, langs, adapter.n_layers, adapter.d_mlp
        )
        specific = classes.specific_sets()
        run.save_json(
            "specific_lape_neuron",
            {lang: units.tolist() for lang, units in specific.items()}
            | {"shared": classes.shared_units().tolist()},
        )
        drop, drop_random = (
            [[math.nan] * len(langs)] * len(langs),
            [[math.nan] * len(langs)] * len(langs),
        )
        if config.ablation_facts > 0:
            drop, drop_random = neuron_ablation("ablation_lape_neuron", specific)
        nan = [[math.nan] * len(langs) for _ in langs]
        summaries.append(
            MethodSummary(
                method="lape",
                unit="neuron",
                n_facts={lang: 0 for lang in langs},
                set_size={lang: float(len(specific[lang])) for lang in langs},
                jaccard=nan,
                overlap=nan,
                n_pairs=[[0] * len(langs) for _ in langs],
                counts=classes.counts(),
                ablation=drop,
                ablation_random=drop_random,
                check={},
            )
        )
        lape_info = {
            "selected": len(found.selected),
            "bar": found.bar,
            "tokens": {lang: int(n) for lang, n in zip(stats.langs, stats.n_tokens, strict=False)},
        }
    result = NeuronResult(
        langs=tuple(langs),
        n_layers=adapter.n_layers,
        methods=summaries,
        skipped=skipped,
        run_path=str(run.path),
        lape=lape_info,
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped)
    return result, run


def _check_summary(rows: Sequence[dict[str, float]], wilcoxon: Any) -> dict[str, float]:
    """Mean answer-probability drop with the attributed sets and with random sets of the same
    sizes, the fraction of facts where the attributed set hurts more, and a one-sided
    Wilcoxon signed-rank p-value (attributed drop > random drop)."""
    import numpy as np

    if not rows:
        return {"n": 0}
    drop = np.array([r["p_clean"] - r["p_ablated"] for r in rows])
    drop_random = np.array([r["p_clean"] - r["p_random"] for r in rows])
    diff = drop - drop_random
    p_value = math.nan
    if len(rows) >= 5 and np.any(diff != 0):
        p_value = float(wilcoxon(drop, drop_random, alternative="greater").pvalue)
    return {
        "n": len(rows),
        "drop": float(drop.mean()),
        "drop_random": float(drop_random.mean()),
        "fraction_above_random": float((diff > 0).mean()),
        "wilcoxon_p": p_value,
    }
