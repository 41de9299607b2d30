"""The probe stage: activations, language identity, cross-lingual transfer and representation
similarity, bound to the results store.

Two runs, so that a new probe setting never re-reads the model:

* ``probe_activations/<key>``: the residual stream of every (fact, language) question prompt at
  every layer and both positions (:mod:`probes.activations`), one array file per language,
  keyed by the model, data, facts, languages and template (not the probe settings).
* ``probes/<key>``: the probe tables (``language_id``, ``transfer``, ``similarity``), each saved
  as it finishes, and ``summary.json`` (:class:`~probes.config.ProbeResult`), keyed by the same
  plus the :class:`~probes.config.ProbeConfig`.

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

    Returns:
        The activations (languages in order, facts in order within each), the usable views per
        language, the views left out (``"lang:reason"`` -> count) and the run folder.
    """
    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    template, batch_size = ctx.template, ctx.batch_size
    sites = probe_sites(adapter.n_layers)
    run = ctx.open_run(
        "probe_activations",
        None,
        sites=list(sites),
        positions=list(POSITIONS),
        version=ACTIVATIONS_VERSION,
    )
    run.write_meta(sites=list(sites))
    parts, usable, skipped = [], {}, {}
    for lang in langs:
        views = [dataset.fact(f).views[lang] for f in fact_ids]
        # Located on every run (tokenization only): a resumed run reports the same counts.
        prompts, why = question_prompts(adapter, views, template)
        usable[lang] = len(prompts)
        for reason, n in why.items():
            skipped[f"{lang}:{reason}"] = n
        name = f"acts_{lang}"
        if run.has_arrays(name):
            acts = Activations.from_arrays(run.load_arrays(name))
            ctx.say(f"probe activations [{lang}]: loaded from {run.path}")
        else:
            acts = collect_activations(
                adapter, prompts, sites, batch_size=batch_size, progress=progress
            )
            run.save_arrays(name, acts.to_arrays())
            ctx.say(f"probe activations [{lang}]: {len(prompts)} prompts read; {run.path}")
        parts.append(acts)
    acts = Activations.concat(parts)
    run.write_meta(status="complete", usable=usable, skipped=skipped)
    return acts, usable, skipped, run


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
