"""The transfer stage: edit every fact in every language and evaluate each edit in every
language, saved edit by edit (resumable)."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlake.stages.context import StageContext, synced_seconds
from mlake_core.data.dataset import MlakeDataset
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run


def transfer_stage(
    ctx: StageContext,
    method: str,
    method_config: Any,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    locality_pool: Sequence[int],
    corpus: Sequence[str],
    on_edit: Callable[[dict[str, Any]], None] | None = None,
    unit_sets: Mapping[str, Sequence[int]] | None = None,
    unit_source: str | None = None,
    knowledge_run: str | os.PathLike[str] | None = None,
) -> tuple[Any, Run]:
    """Edit every fact in every language with ``method`` and evaluate each edit in every
    language (:func:`analysis.transfer.evaluate_edit`).

    One table per edit language is saved as it finishes; inside a language, each edit's rows
    and the random generator's state after it are saved as they finish (and removed once the
    language's table is saved), so an interrupted run resumes at the next edit; each edit is
    computed under its piece's claim (:meth:`~mlake_core.results.store.Run.claim`), so
    concurrent processes never compute the same edit.  With an executor (``ctx.executor``)
    the edits are computed first as shards, chunks of facts in one edit language, a
    language's chunks in order (:mod:`mlake.executors`); with ``ctx.shard`` only the edits up
    to the shard's last fact are computed and ``(None, run)`` is returned.  Pre-edit values come from
    ``knowledge`` (the knowledge stage's result, itself cached).  ``unit_sets`` (with
    ``unit_source``, the neuron run they come from) are the neuron sets of restricted editing
    (:attr:`~mlake_core.editing.base.EditContext.unit_sets`); they enter the run key.
    ``knowledge_run`` (the folder ``knowledge`` was loaded from) is recorded in the run's meta
    for the analyses that join pre-edit values (``mlake relate``).  With ``config.protocol``
    ``mlake`` the unedited model's multiple choice and multi-hop answers are measured once
    first (table ``protocol_baseline``, :func:`analysis.transfer.protocol_baseline`) and
    every edit's rows carry them; the protocol is part of the run key, so a run without those
    measures is never read back for it.  On a dataset with its own prompts (MzsRE, BMIKE-53)
    the unedited model's answers to them are measured once likewise (table
    ``own_baseline``), with the dataset's own scorer where it has one
    (:func:`~mlake_core.metrics.paper_scores.paper_scorer`, named in the run key as
    ``paper_scorer``).  Every row also carries its
    edit's ``edit_seconds`` (the method's own work), ``eval_seconds`` (the evaluation in every
    language) and ``setup_seconds`` (the run's shared statistics, ROME's and MEMIT's key second
    moments and subject means, measured or loaded on first use inside this edit and left out
    of its ``edit_seconds``), timed when the edit was computed, CUDA work included (rows saved
    before mlake timed edits have none: NaN once concatenated with newer rows).

    Returns:
        The per-fact, per-pair rows (a pandas DataFrame) and the run folder.
    """
    from mlake_core.data.external import has_own_measures, require_subjects
    from mlake_core.metrics.paper_scores import paper_scorer

    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    if method in ("rome", "memit"):  # they write at the subject's last token
        require_subjects(dataset, f"{method.upper()} edits")
    template, seed, batch_size, results_dir = (
        ctx.template,
        ctx.seed,
        ctx.batch_size,
        ctx.results_dir,
    )

    import pandas as pd
    import torch

    from analysis.transfer import (
        BASELINE_COLUMNS,
        baseline_map,
        evaluate_edit,
        locality_facts,
        own_baseline,
        paper_map,
        protocol_baseline,
        require_mcqa,
    )
    from mlake_core.editing import EditContext, get_method, make_request
    from mlake_core.editing.contexts import ContextPrefixes
    from mlake_core.editing.covariance import cached_second_moment
    from mlake_core.errors import MlakeError

    entry = get_method(method)
    ident = ctx.identity()
    extra: dict[str, Any] = {
        "method": method,
        # Fields added later are left out while at the value that keeps the earlier
        # behaviour, so earlier runs stay valid.
        "method_config": {
            k: str(v)
            for k, v in vars(method_config).items()
            if (k, v)
            not in (("units", "all"), ("init", "zero"), ("restarts", 0), ("contexts", "none"))
        },
        "corpus": stable_hash(list(corpus)),
        "seed": seed,
    }
    own_measures = has_own_measures(dataset)
    if own_measures:  # generalization and locality read the dataset's own prompts
        extra["own_measures"] = "rephrase,locality"
        scorer = paper_scorer(dataset)
        if scorer is not None:  # its paper's scorer beside greedy alias match
            extra["paper_scorer"] = scorer.key
    if unit_sets:
        extra["unit_sets"] = stable_hash(
            {k: sorted(int(u) for u in v) for k, v in unit_sets.items()}
        )
    if config.protocol == "mlake":  # before any model work
        require_mcqa(dataset, langs)
    run = ctx.open_run("transfer", config, **extra)
    run.write_meta(
        method=method,
        method_config={k: str(v) for k, v in vars(method_config).items()},
        unit_source=unit_source,
        unit_set_sizes={k: len(v) for k, v in (unit_sets or {}).items()},
        knowledge_run=str(knowledge_run) if knowledge_run else None,
    )
    prior: dict[tuple[Any, ...], tuple[float, float]] = {}
    paper_prior: dict[tuple[int, str, str], dict[str, Any]] = {}
    if config.protocol == "mlake":
        # The unedited model's multiple-choice and multi-hop answers: measured once per run
        # (saved; read back on resume and by every shard), the prior of every edit's counts.
        baseline, computed = run.load_or_compute_table(
            "protocol_baseline",
            lambda: protocol_baseline(
                adapter, dataset, fact_ids, langs, template, config, batch_size
            ),
            columns=BASELINE_COLUMNS,
        )
        prior = baseline_map(baseline)
        ctx.say(
            f"transfer [{method}]: the unedited model's multiple choice and multi-hop "
            f"{'measured' if computed else 'loaded'}"
        )
    if own_measures:
        # The dataset's own rephrase and locality questions, before any edit (the prior of
        # every edit's generalization and locality rows): measured once per run.
        own, computed = run.load_or_compute_table(
            "own_baseline",
            lambda: own_baseline(adapter, dataset, fact_ids, langs, template, config, batch_size),
            columns=BASELINE_COLUMNS,
        )
        prior.update(baseline_map(own))
        paper_prior = paper_map(own)
        ctx.say(
            f"transfer [{method}]: the unedited model's rephrase and locality answers "
            f"{'measured' if computed else 'loaded'}"
        )
    # Sharded (mlake.executors): a shard is a chunk of facts in one edit language.
    ctx.fill_shards(
        "transfer",
        run,
        transfer_stage,
        method,
        method_config,
        config,
        knowledge=knowledge,
        locality_pool=locality_pool,
        corpus=corpus,
        unit_sets=unit_sets,
        unit_source=unit_source,
        knowledge_run=knowledge_run,
    )
    shard = ctx.shard
    loc_ids = locality_facts(dataset, fact_ids, config, locality_pool)
    kt = knowledge.table
    q = kt[kt["form"] == "question"]
    known_before = {
        (int(f), str(lang)): m == "original"
        for f, lang, m in zip(q["fact_id"], q["lang"], q["greedy_match"], strict=True)
    }
    new_before = {
        (int(f), str(lang), str(form)): m == "edit"
        for f, lang, form, m in zip(
            kt["fact_id"], kt["lang"], kt["form"], kt["greedy_match"], strict=True
        )
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

    prefixes = ContextPrefixes(adapter, seed)

    def context_prefixes(lengths: Any) -> tuple[str, ...]:
        if tuple(lengths) in prefixes.drawn:
            return prefixes.drawn[tuple(lengths)]
        started = time.perf_counter()
        drawn = prefixes(lengths)
        setup[0] += synced_seconds(adapter, started)
        return drawn

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
    empty = empty_unit_sets(adapter, method_config, unit_sets or {}, langs)
    for lang in langs:
        if shard is not None and not shard.covers(lang):
            continue
        if lang in empty:  # restricted editing that could change nothing
            skipped[f"{lang}:EmptyUnitSet"] = len(fact_ids)
            ctx.say(f"skipped: {method} edits in {lang}: {empty[lang]}")
            continue

        def compute(lang: str = lang) -> Any:
            rows: list[dict[str, Any]] = []
            generator = torch.Generator().manual_seed(seed)
            # A shard computes the edits up to its last fact: each edit draws from the
            # generator where the one before left it, so the facts before the shard's come
            # first (loaded when saved, as the executor runs a language's shards in order).
            last = fact_ids.index(max(shard.facts, key=fact_ids.index)) if shard else None
            for i, fact_id in enumerate(fact_ids):
                if last is not None and i > last:
                    break
                # Each edit is saved as it finishes, with the generator's state after it, so a
                # run stopped inside a language resumes at the next fact with the same draws.
                piece = f"edit_{lang}_{fact_id}"
                if not (run.has_table(piece) and run.has_arrays(piece)):
                    with run.claim(piece):  # one process edits it; another waits, then reads
                        if not (run.has_table(piece) and run.has_arrays(piece)):
                            rows += edit_one(lang, fact_id, piece, generator)
                            continue
                done = run.load_table(piece)
                rows += done.to_dict(orient="records")
                state = run.load_arrays(piece, keys=("generator",), what="an edit's state")
                generator.set_state(torch.from_numpy(state["generator"]))
                if on_edit and len(done):
                    loss = float(done["edit_loss"].iloc[0])
                    on_edit({"lang": lang, "fact_id": fact_id, "loss": loss, "loaded": True})
            return pd.DataFrame.from_records(rows)

        def edit_one(lang: str, fact_id: int, piece: str, generator: Any) -> list[dict[str, Any]]:
            """Edit ``fact_id`` in ``lang`` and evaluate it; its rows (none when skipped),
            saved as the piece ``piece`` with the generator's state after it."""
            view = dataset.fact(fact_id).views[lang]
            try:
                request = make_request(adapter, view, template, config.edit_form)
            except MlakeError as err:
                skipped[f"{lang}:{type(err).__name__}"] = (
                    skipped.get(f"{lang}:{type(err).__name__}", 0) + 1
                )
                ctx.say(f"skipped: {err}")
                return []
            context = EditContext(
                generator,
                second_moment,
                demos,
                dict(unit_sets or {}),
                subject_mean,
                context_prefixes,
            )
            setup[0] = 0.0
            started = time.perf_counter()
            result = entry.fn(adapter, [request], method_config, context)
            edit_seconds = synced_seconds(adapter, started) - setup[0]
            failed = edit_failure(result)
            if failed:  # counted and reported, never evaluated or stored as a result
                key = f"{lang}:NonFiniteEdit"
                skipped[key] = skipped.get(key, 0) + 1
                ctx.say(f"skipped: {method} edit of fact {fact_id} [{lang}] failed: {failed}")
                return []
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
                new_before=new_before,
                before=prior,
                paper_before=paper_prior,
            )
            timing = {
                "edit_seconds": edit_seconds,
                "eval_seconds": synced_seconds(adapter, edited),
                "setup_seconds": setup[0],
            }
            edit_rows = [{**row, **timing} for row in edit_rows]
            run.save_table(piece, pd.DataFrame.from_records(edit_rows))
            run.save_arrays(piece, {"generator": generator.get_state().numpy()})
            if on_edit:
                on_edit({"lang": lang, "fact_id": fact_id, "loss": result.loss})
            return edit_rows

        if shard is not None:  # a worker: its edits are saved; the table is the whole run's
            if not run.has_table(f"edits_{lang}"):
                compute()
            continue
        table, computed = run.load_or_compute_table(f"edits_{lang}", compute, columns=EDIT_COLUMNS)
        for fact_id in fact_ids:  # the language's table holds them now
            run.table_path(f"edit_{lang}_{fact_id}").unlink(missing_ok=True)
            run.arrays_path(f"edit_{lang}_{fact_id}").unlink(missing_ok=True)
        ctx.say(
            f"transfer [{method}, edits in {lang}]: {'computed' if computed else 'loaded from'} {run.path}"
        )
        tables.append(table)
    if shard is not None:
        return None, run
    rows = pd.concat(tables, ignore_index=True)
    # Languages read back keep what their computation recorded (a complete run read back
    # writes nothing).
    before = run.meta
    drawn = [list(p) for p in prefixes.drawn.values()]
    run.write_meta(
        status="complete",
        skipped={**before.get("skipped", {}), **skipped},
        locality_ids=loc_ids,
        context_prefixes=drawn or before.get("context_prefixes", []),
    )
    return rows, run


#: Columns that identify a saved table of edit rows (a table without them is refused, not
#: read).
EDIT_COLUMNS: tuple[str, ...] = ("fact_id", "edit_lang", "kind", "test_lang", "form")


def empty_unit_sets(
    adapter: Any, method_config: Any, unit_sets: Mapping[str, Sequence[int]], langs: Sequence[str]
) -> dict[str, str]:
    """Edit languages whose restricted edits could change nothing, with the reason: the unit
    set they are restricted to (``units``: ``shared``, ``random``, or the language's own for
    ``specific``) has no neuron at the edited layer.  Empty for unrestricted methods."""
    from mlake_core.editing.layers import resolve_layer

    units = getattr(method_config, "units", "all")
    if units == "all" or not unit_sets:
        return {}
    layer = resolve_layer(adapter, getattr(method_config, "layer", "auto"))
    width = adapter.d_mlp
    out = {}
    for lang in langs:
        name = lang if units == "specific" else units
        if name not in unit_sets:
            out[lang] = f"there is no {name!r} unit set (units={units})"
        elif not any(int(u) // width == layer for u in unit_sets[name]):
            out[lang] = f"the {name!r} unit set has no neuron at layer {layer} (units={units})"
    return out


def stage_second_moment(ctx: StageContext, corpus: Sequence[str]) -> Callable[[int], Any]:
    """The key second moment of a layer for a stage's edits
    (:func:`~mlake_core.editing.covariance.cached_second_moment` on ``corpus``, in the run's
    results store), computed once per layer and kept for the stage's later edits."""
    from mlake_core.editing.covariance import cached_second_moment

    moments: dict[int, Any] = {}

    def second_moment(layer: int) -> Any:
        if layer not in moments:
            moments[layer] = cached_second_moment(
                ctx.adapter, ctx.identity(), layer, corpus, results_dir=ctx.results_dir
            )
        return moments[layer]

    return second_moment


def edit_fact(
    adapter: Any,
    entry: Any,
    request: Any,
    method_config: Any,
    seed: int,
    second_moment: Callable[[int], Any],
    command: str,
) -> tuple[Any, str | None]:
    """One edit for a stage that reads the edited model's states (the lens, cross-lingual
    patching): ``entry``'s method on ``request`` with a generator seeded ``seed`` and the
    run's key second moments; returns the :class:`~mlake_core.editing.base.EditResult` and
    why it cannot be used (:func:`edit_failure`; ``None``: it can).

    Raises:
        ConfigError: a method whose edits change no weights (a prompt prefix: no edited
            state to read), naming ``command``.
    """
    import torch

    from mlake_core.editing import EditContext
    from mlake_core.errors import ConfigError

    context = EditContext(torch.Generator().manual_seed(seed), second_moment)
    edited = entry.fn(adapter, [request], method_config, context)
    if not edited.deltas:
        raise ConfigError(
            f"{command} --method {entry.name}: its edits change no weights (a prompt prefix), "
            "so there is no edited state to read; choose rome, memit or ft"
        )
    return edited, edit_failure(edited)


def edit_failure(result: Any) -> str | None:
    """Why an edit cannot be evaluated: a non-finite loss or weight change (an unstable
    optimisation), else ``None``."""
    import math

    import torch

    if not math.isfinite(result.loss) and not (math.isnan(result.loss) and not result.deltas):
        return f"its loss is {result.loss}"
    bad = [name for name, d in result.deltas.items() if not bool(torch.isfinite(d).all())]
    if bad:
        return f"non-finite change of {', '.join(bad)}"
    return None


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

    name = f"subject_mean_{lang}_{layer}"
    if not run.has_arrays(name):
        with run.claim(name):  # measured by one process; the others read it
            if not run.has_arrays(name):
                return _measure_subject_mean(
                    run, name, adapter, dataset, fact_ids, lang, template, form, layer, batch_size
                )
    saved = run.load_arrays(name, keys=("mean",), what="a subject mean", finite=("mean",))
    return torch.from_numpy(saved["mean"])


def _measure_subject_mean(
    run: Run,
    name: str,
    adapter: ModelAdapter,
    dataset: MlakeDataset,
    fact_ids: Sequence[int],
    lang: str,
    template: PromptTemplate,
    form: str,
    layer: int,
    batch_size: int,
) -> Any:
    import torch

    from mlake_core.editing.base import make_request
    from mlake_core.errors import DataError, MlakeError

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
        cache = adapter.activations(batch, [site])
        rows = torch.arange(len(chunk))
        picked = cache[site][rows, torch.tensor([r.subject_last for r in chunk])].double().sum(0)
        total = picked if total is None else total + picked
    assert total is not None
    mean = (total / len(requests)).float().cpu()
    run.save_arrays(name, {"mean": mean.numpy()})
    return mean


def read_unit_sets(
    run_dir: str | os.PathLike[str], method: str, *, seed: int = 0
) -> dict[str, list[int]]:
    """The neuron classes of a neuron-attribution run (``specific_<method>_neuron.json``:
    one set per language and ``shared``) plus ``random``: as many neurons per layer as the
    shared set has, drawn (seeded) from the neurons in no class, the control of restricted
    editing (the sets :func:`transfer_stage` takes as ``unit_sets``).

    Raises:
        DataError: the folder is not a neuron run, or lacks ``method``'s classes.
    """
    import json
    from pathlib import Path

    import numpy as np

    from mlake_core.errors import DataError

    folder = Path(run_dir)
    path = folder / f"specific_{method}_neuron.json"
    summary = folder / "summary.json"
    if not path.is_file() or not summary.is_file():
        raise DataError(
            f"--units-from {run_dir}: no {path.name} and summary.json there; give a run folder "
            "of `mlake neurons` (it prints it)"
        )
    sets = {k: [int(u) for u in v] for k, v in json.loads(path.read_text()).items()}
    meta = json.loads(summary.read_text())
    n_layers = int(meta["n_layers"])
    width = int(meta.get("d_mlp") or 0) or _width_from(folder)
    taken = {u for v in sets.values() for u in v}
    rng = np.random.default_rng(seed)
    chosen: list[int] = []
    for layer in range(n_layers):
        need = sum(1 for u in sets.get("shared", []) if u // width == layer)
        pool = [layer * width + i for i in range(width) if layer * width + i not in taken]
        chosen += [int(u) for u in rng.choice(pool, size=min(need, len(pool)), replace=False)]
    sets["random"] = sorted(chosen)
    return sets


def _width_from(folder: Any) -> int:
    """MLP width of the model a neuron run was made on (from its meta)."""
    import json

    from mlake_core.errors import DataError

    meta = json.loads((folder / "meta.json").read_text())
    model = meta.get("model") or {}
    width = model.get("d_mlp")
    if not width:
        raise DataError(f"{folder}: the run's meta does not give the model's d_mlp")
    return int(width)
