"""The probe stage: activations, language identity, cross-lingual transfer and representation
similarity, bound to the results store.

Two runs, so that a new probe setting never re-reads the model:

* ``probe_activations/<key>``: the residual stream of every (fact, language) question prompt at
  every layer and both positions (:mod:`probes.activations`), one array file per language
  (joined from its batches, each saved as it is read: the reading is per fact, and shards with
  an executor), keyed by the model, data, facts, languages and template (not the probe
  settings).
* ``probes/<key>``: the probe tables (``language_id``, ``transfer``, ``similarity``), each saved
  as it finishes, and ``summary.json`` (:class:`~probes.config.ProbeResult`), keyed by the same
  plus the :class:`~probes.config.ProbeConfig`.

The probes are fit on all facts at once, in the calling process: they do not shard.

Views whose question form is not usable are left out and counted per language and reason;
facts the model does not know (knowledge stage) are counted, and left out only with
``known_only``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from mlake.stages.context import StageContext
from mlake_core.errors import ConfigError
from mlake_core.results.store import Run
from probes.activations import (
    POSITIONS,
    Activations,
    collect_activations,
    probe_sites,
    question_prompts,
)
from probes.config import ProbeConfig, ProbeResult, load_probe_result, pair_matrices

__all__ = [
    "activations_stage",
    "load_probe_result",
    "pair_matrices",
    "probe_stage",
]

#: Bump when what the activation run stores changes (new keys, new folders).
ACTIVATIONS_VERSION = 1


def activations_stage(
    ctx: StageContext,
    *,
    progress: Callable[[int], None] | None = None,
) -> tuple[Activations, dict[str, int], dict[str, int], Run]:
    """Read (or load) the probed activations of every usable (fact, language) question prompt.

    A language's prompts are read in batches of ``ctx.batch_size`` sorted by length
    (:func:`~probes.activations.collect_activations`); each batch is saved as it finishes
    (``acts_<lang>_<batch size>x<k>``, the k-th batch of that order), under its claim
    (:meth:`~mlake_core.results.store.Run.claim`), then the language's batches are joined into
    its one array file (``acts_<lang>``) and removed.  With an executor (``ctx.executor``) the
    batches are read first as shards, chunks of whole batches in one language
    (:mod:`mlake.executors`; every prompt is read in the same pass as in one process, so the
    activations are bit-identical); with ``ctx.shard`` only the shard's batches are read
    (:func:`activations_shard`).

    Returns:
        The activations (languages in order, facts in order within each), the usable views per
        language, the views left out (``"lang:reason"`` -> count) and the run folder.
    """
    run, prompts, batches, usable, skipped = _activation_plan(ctx)
    # Sharded (mlake.executors): a shard is a chunk of whole batches of one language.
    ctx.fill_shards(
        "probe_activations",
        run,
        activations_shard,
        units={
            lang: [[prompts[lang][i].fact_id for i in rows] for rows in batches[lang]]
            for lang in ctx.langs
        },
    )
    parts = []
    for lang in ctx.langs:
        name = f"acts_{lang}"
        if run.has_arrays(name):
            acts = Activations.from_arrays(run.load_arrays(name))
            ctx.say(f"probe activations [{lang}]: loaded from {run.path}")
        else:
            with run.claim(name):
                if not run.has_arrays(name):
                    pieces = [
                        _read_batch(ctx, run, lang, prompts[lang], batches[lang], rows, progress)
                        for rows in batches[lang]
                    ]
                    run.save_arrays(name, _join_batches(ctx, batches[lang], pieces))
                    for rows in batches[lang]:
                        run.arrays_path(_batch_name(lang, batches[lang], rows)).unlink(
                            missing_ok=True
                        )
                    ctx.say(
                        f"probe activations [{lang}]: {len(prompts[lang])} prompts read; {run.path}"
                    )
            acts = Activations.from_arrays(run.load_arrays(name))
        parts.append(acts)
    acts = Activations.concat(parts)
    run.write_meta(status="complete", usable=usable, skipped=skipped)
    return acts, usable, skipped, run


def activations_shard(ctx: StageContext) -> None:
    """Read and save the batches of :func:`activations_stage` that ``ctx.shard`` covers (a
    shard of whole batches: those whose first fact it covers); the probes are fit on all facts
    at once, in the calling process, once every batch is read."""
    run, prompts, batches, _, _ = _activation_plan(ctx)
    for lang in ctx.langs:
        if run.has_arrays(f"acts_{lang}"):
            continue
        for rows in batches[lang]:
            if ctx.mine(lang, prompts[lang][rows[0]].fact_id):
                _read_batch(ctx, run, lang, prompts[lang], batches[lang], rows, None)


def _activation_plan(
    ctx: StageContext,
) -> tuple[Run, dict[str, list[Any]], dict[str, list[list[int]]], dict[str, int], dict[str, int]]:
    """The activation run, each language's usable prompts (located on every run:
    tokenization only, so a resumed run reports the same counts) and their batches (indices
    into the prompts, in :func:`~probes.activations.collect_activations`' order: by length,
    ``ctx.batch_size`` each), the usable views per language and the views left out."""
    adapter, dataset, fact_ids = ctx.adapter, ctx.dataset, ctx.fact_ids
    sites = probe_sites(adapter.n_layers)
    run = ctx.open_run(
        "probe_activations",
        None,
        sites=list(sites),
        positions=list(POSITIONS),
        version=ACTIVATIONS_VERSION,
    )
    run.write_meta(sites=list(sites))
    prompts, batches, usable, skipped = {}, {}, {}, {}
    for lang in ctx.langs:
        views = [dataset.fact(f).views[lang] for f in fact_ids]
        found, why = question_prompts(adapter, views, ctx.template)
        usable[lang] = len(found)
        for reason, n in why.items():
            skipped[f"{lang}:{reason}"] = n
        order = sorted(range(len(found)), key=lambda i: (len(found[i].prompt_ids), i))
        prompts[lang] = found
        batches[lang] = [
            order[i : i + ctx.batch_size] for i in range(0, len(order), ctx.batch_size)
        ]
    return run, prompts, batches, usable, skipped


def _batch_name(lang: str, batches: list[list[int]], rows: list[int]) -> str:
    """A batch's piece: ``acts_<lang>_<batch size>x<k>``, the k-th batch (of ``batches``, in
    the length order) of that size: the same batch on every run of the same batch size (the
    prompts are the run's), another name for another size."""
    return f"acts_{lang}_{len(batches[0])}x{batches.index(rows)}"


def _read_batch(
    ctx: StageContext,
    run: Run,
    lang: str,
    prompts: list[Any],
    batches: list[list[int]],
    rows: list[int],
    progress: Callable[[int], None] | None,
) -> Activations:
    """One batch of a language's prompts (indices ``rows``, one of ``batches``), read and
    saved, or loaded."""
    sites = probe_sites(ctx.adapter.n_layers)
    chosen = sorted(rows)  # the prompts' own order: collect_activations sorts them as the run

    def read() -> dict[str, Any]:
        acts = collect_activations(
            ctx.adapter,
            [prompts[i] for i in chosen],
            sites,
            batch_size=ctx.batch_size,
            progress=progress,
        )
        return acts.to_arrays()

    arrays, _ = run.load_or_compute_arrays(
        _batch_name(lang, batches, rows), read, what="probe activations"
    )
    assert arrays is not None
    return Activations.from_arrays(arrays)


def _join_batches(
    ctx: StageContext, batches: list[list[int]], pieces: list[Activations]
) -> dict[str, Any]:
    """A language's batches joined in the order of its prompts (as one
    :func:`~probes.activations.collect_activations` call returns them)."""
    if not pieces:  # no usable prompt: no rows
        sites = probe_sites(ctx.adapter.n_layers)
        return collect_activations(ctx.adapter, [], sites, batch_size=ctx.batch_size).to_arrays()
    index = np.concatenate([np.array(sorted(rows), dtype=np.int64) for rows in batches])
    joined = Activations.concat(pieces)
    return joined.select(np.argsort(index, kind="stable")).to_arrays()


def probe_stage(
    ctx: StageContext,
    config: ProbeConfig,
    *,
    knowledge: Any = None,
    progress: Callable[[int], None] | None = None,
) -> tuple[ProbeResult, Run]:
    """Language-identity probes, cross-lingual probes and representation similarity of the
    question prompts of ``fact_ids`` in ``langs``, per layer and position.

    Args:
        config: the probe settings.
        knowledge: the knowledge stage's result (which facts the model answers, per
            language); required with ``config.known_only``, and used for counts otherwise.
        progress: called with the number of prompts read after each batch.

    Returns:
        A :class:`~probes.config.ProbeResult` and the probe run folder.

    Raises:
        ConfigError: ``known_only`` without ``knowledge``; fewer probed facts than folds; fewer
            than two languages.
    """
    from probes.crosslingual import answer_classes, transfer_table
    from probes.language_id import language_id_table
    from probes.similarity import similarity_table

    dataset, fact_ids, langs = ctx.dataset, ctx.fact_ids, ctx.langs
    if len(langs) < 2:
        raise ConfigError("probes need at least two languages (--langs)")
    if config.known_only and knowledge is None:
        raise ConfigError("known_only needs the knowledge stage's result")
    acts, usable, skipped, _ = activations_stage(ctx, progress=progress)
    known = {lang: knowledge.known(lang) & set(fact_ids) for lang in langs} if knowledge else {}
    if config.known_only:
        known_all = set.intersection(*(known[lang] for lang in langs))
        keep = np.isin(acts.fact_ids, sorted(known_all))
        for lang in langs:
            n = int(np.sum((acts.langs == lang) & ~keep))
            if n:
                skipped[f"{lang}:not known in every language"] = n
        acts = acts.select(keep)
    probed_facts = sorted(set(acts.fact_ids.tolist()))
    if len(probed_facts) < config.folds:
        raise ConfigError(
            f"--folds {config.folds}: only {len(probed_facts)} facts can be probed (usable"
            f"{', known' if config.known_only else ''}); use more --facts or fewer --folds"
        )
    answer_lang = "en" if "en" in langs else langs[0]
    answers = {f: dataset.fact(f).views[answer_lang].record.o_answer for f in probed_facts}
    classes = answer_classes(answers, config.min_class_facts)
    class_sizes: dict[str, int] = {}
    for c in classes.values():
        class_sizes[c] = class_sizes.get(c, 0) + 1
    tasks = ["fact"]
    unclassed = len(probed_facts) - len(classes)
    if unclassed:
        skipped[f"answer task:answer shared by fewer than {config.min_class_facts} facts"] = (
            unclassed
        )
    if len(class_sizes) >= 2 and len(classes) >= config.folds:
        tasks.insert(0, "answer")
    elif classes:
        skipped["answer task:fewer than 2 answer classes or fewer facts than folds (not run)"] = (
            len(classes)
        )

    run = ctx.open_run(
        "probes",
        config,
        activations_version=ACTIVATIONS_VERSION,
        known_from="knowledge stage, question form, greedy alias match"
        if config.known_only
        else None,
    )
    pieces = {
        "language_id": lambda: language_id_table(acts, config),
        "transfer": lambda: transfer_table(acts, classes, config, tasks),
        "similarity": lambda: similarity_table(acts),
    }
    tables = {}
    for name, compute in pieces.items():
        tables[name], computed = run.load_or_compute_table(name, compute)
        ctx.say(f"probes [{name}]: {'computed' if computed else 'loaded from'} {run.path}")
    counts = {
        lang: {
            "facts": len(fact_ids),
            "usable": usable[lang],
            **({"known": len(known[lang])} if known else {}),
            "probed": int(np.sum(acts.langs == lang)),
        }
        for lang in langs
    }
    result = ProbeResult(
        langs=tuple(langs),
        sites=acts.sites,
        positions=acts.positions,
        language_id=tables["language_id"],
        transfer=tables["transfer"],
        similarity=tables["similarity"],
        counts=counts,
        skipped=skipped,
        classes=dict(sorted(class_sizes.items(), key=lambda kv: (-kv[1], kv[0]))),
        answer_lang=answer_lang,
        config=config.to_dict(),
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped, counts=counts)
    return result, run
