"""The neuron stage: every requested attribution method, run as its registry entry declares
(per fact: attribution of every known fact, important sets and their overlap, ablation checks;
per language: a selection from text statistics, LAPE), then language-specific and shared units
and the ablation matrix."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from mlake.stages.context import Settings, StageContext, subject_noise_std
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.models.adapter import ModelAdapter
from mlake_core.models.prompting import PromptTemplate
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run


def _attribution_prompts(
    adapter: ModelAdapter, view: Any, template: PromptTemplate, forms: Sequence[str]
) -> tuple[list[tuple[str, Any]], dict[str, int]]:
    """A fact view's prompts to attribute, one per usable form, and the forms skipped (by
    reason).  The answer is encoded separately and joined by ids."""
    from analysis.neurons.attribution import AttributionPrompt
    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError

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


def neurons_stage(
    ctx: StageContext,
    config: Any,
    *,
    knowledge: KnowledgeResult,
    text_folder: str | os.PathLike[str] | None = None,
    on_fact: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[Any, Run]:
    """Neuron attribution per language (:mod:`analysis.neurons`): per-fact attribution of
    every fact the model knows, important sets, their overlap between languages, the
    classification of units as language-specific or shared, the ablation check of every
    attribution and the ablation matrix; and LAPE's language-specific neurons from text.

    Everything is saved as it is computed: activation statistics, each fact's attribution (with
    its ablation check), each method's tables; an interrupted run resumes.  Each attribution is
    computed under its piece's claim (:meth:`~mlake_core.results.store.Run.claim`).  With an
    executor (``ctx.executor``) the attributions are computed first as shards, chunks of known
    facts in one language, every per-fact method each (:mod:`mlake.executors`), after the
    activation statistics and the noise level, which the calling process measures once and
    the shards read; with ``ctx.shard`` only the shard's attributions are computed and
    ``(None, run)`` is returned.  The classes, overlaps, ablation matrices and LAPE's
    selection (from the whole run's attributions or statistics) are computed in the calling
    process.

    Args:
        config: a :class:`~analysis.neurons.config.NeuronConfig`.
        knowledge: the knowledge stage's result (which facts are known, per language).
        text_folder: text per language for the activation statistics (``<lang>.txt`` or
            ``<lang>/``); default MLaKE's own statements and questions.

    Returns:
        A :class:`~analysis.neurons.config.NeuronResult` and the run folder.
    """
    adapter, dataset, fact_ids, langs = ctx.adapter, ctx.dataset, ctx.fact_ids, ctx.langs
    template, batch_size, log = ctx.template, ctx.batch_size, ctx.log

    import numpy as np
    import pandas as pd
    import torch
    from scipy.stats import wilcoxon

    from analysis.neurons.ablation import ablation_check, ablation_matrix
    from analysis.neurons.activation import (
        ActivationStats,
        activation_stats,
        folder_texts,
        mlake_texts,
    )
    from analysis.neurons.attribution import (
        AttributionContext,
        FactAttribution,
        attribute_fact,
        get_attribution_method,
    )
    from analysis.neurons.config import MethodSummary, NeuronResult
    from analysis.neurons.sharing import (
        classes_from_assignment,
        classify_units,
        overlap_matrix,
        pair_rows,
    )
    from mlake_core.editing.base import locate_prompt

    attr_cfg = config.attribution
    attr_cfg.check_layers(adapter.n_layers)
    text_key = None
    if text_folder is not None:
        texts = folder_texts(text_folder, langs)
        text_key = stable_hash({k: v for k, v in texts.items()})
    # The run is keyed by everything but the list of methods: each method's results are
    # separate files, so a later run with more methods reuses what an earlier one computed.
    run = ctx.open_run(
        "neurons",
        Settings({k: v for k, v in config.to_dict().items() if k != "methods"}),
        text=text_key or "mlake",
        known_from="knowledge stage, question form, greedy alias match",
    )
    # A complete run is read back: what each method derives again from the saved pieces (the
    # overlap table, LAPE's selection) is not saved again (reading writes nothing); a method
    # the run does not have yet is saved.
    read_back = run.complete
    facts = {f.fact_id: f for f in dataset.facts}

    # Activation statistics, measured on every run: the methods that need them (LAPE, the
    # mean baseline), mean ablation and the run's record of the text read use them.
    def measure_stats() -> dict[str, Any]:
        texts_by_lang = (
            folder_texts(text_folder, langs) if text_folder else mlake_texts(dataset, langs)
        )
        return activation_stats(
            adapter, texts_by_lang, max_tokens=config.text_tokens, batch_size=8 * batch_size
        ).to_arrays()

    # Measured once (by the calling process of a sharded run, before its shards), and read.
    saved_stats, _ = run.load_or_compute_arrays("activations", measure_stats)
    assert saved_stats is not None
    stats = ActivationStats.from_arrays(saved_stats)
    mean = stats.mean()
    if log and ctx.shard is None:
        log(
            "neurons: activation statistics on "
            + ", ".join(
                f"{lang} {int(n)} tokens"
                for lang, n in zip(stats.langs, stats.n_tokens, strict=False)
            )
            + f"; {run.path}"
        )
    # Each method declares what it needs (analysis.neurons.attribution.NEEDS) and gets that.
    entries = [get_attribution_method(m) for m in config.methods]
    noise_std = 0.0
    if any("noise" in entry.needs for entry in entries):

        def located(fact_id: int, lang: str) -> Any:
            return locate_prompt(adapter, facts[fact_id].views[lang], template, "question")

        noise_std = subject_noise_std(run, adapter, located, fact_ids, langs, attr_cfg.noise_scale)
    context_mean = {layer: torch.as_tensor(mean[layer]) for layer in range(adapter.n_layers)}
    known = {lang: knowledge.known(lang) for lang in langs}
    ordered = [fid for fid in fact_ids if fid in facts]
    # Sharded (mlake.executors): a shard is a chunk of known facts in one language, each
    # attributed by every per-fact method (with its own seeds: in any order).
    if any(e.per_fact for e in entries):
        ctx.fill_shards(
            "neurons",
            run,
            neurons_stage,
            config,
            knowledge=knowledge,
            # absolute: a worker's working folder is not the caller's (its text keys the run)
            text_folder=str(Path(text_folder).resolve()) if text_folder is not None else None,
            units={lang: [[f] for f in ordered if f in known[lang]] for lang in langs},
        )
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

    for entry in (e for e in entries if e.per_fact):
        method = entry.name
        sets: dict[str, dict[str, dict[int, np.ndarray]]] = {u: {} for u in entry.units}
        checks: dict[str, list[dict[str, float]]] = {u: [] for u in entry.units}
        seconds, passes = [], []
        for lang in langs:
            for fact_id in ordered:
                if not ctx.mine(lang, fact_id):  # another shard's fact
                    continue
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

                def attribute(
                    lang: str = lang,
                    fact_id: int = fact_id,
                    prompts: Any = prompts,
                    entry: Any = entry,
                    method: str = method,
                ) -> Any:
                    seed = int(
                        stable_hash(
                            {"seed": attr_cfg.seed, "fact": fact_id, "lang": lang}, length=12
                        ),
                        16,
                    )
                    context = AttributionContext(
                        torch.Generator().manual_seed(seed),
                        noise_std if "noise" in entry.needs else 0.0,
                        context_mean if "activation_stats" in entry.needs else None,
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
                    return arrays

                arrays, _ = run.load_or_compute_arrays(name, attribute)
                assert arrays is not None
                if ctx.shard is not None:  # a worker: the tables are the whole run's
                    continue
                fa = FactAttribution.from_arrays(arrays)
                seconds.append(float(arrays["seconds"]))
                passes.append(fa.passes)
                for unit in entry.units:
                    sets[unit].setdefault(lang, {})[fact_id] = fa.sets[unit]
                    c = np.asarray(arrays[f"check_{unit}"], dtype=float)
                    checks[unit].append({"p_clean": c[0], "p_ablated": c[1], "p_random": c[2]})
                if on_fact:
                    on_fact({"method": method, "lang": lang, "fact_id": fact_id})
        if ctx.shard is not None:
            continue
        for unit in entry.units:
            n_units = _n_units(adapter, unit)
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
            if not (read_back and run.has_table(f"overlap_{method}_{unit}")):
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

    if ctx.shard is not None:  # a worker: its attributions are saved; the rest is the run's
        return None, run
    # Methods of scope "language" select units per language from the activation statistics
    # (LAPE), with no per-fact sets: no overlap and no ablation check, only the classes and
    # the ablation matrix.
    selection: dict[str, Any] = {}
    for entry in (e for e in entries if not e.per_fact):
        (unit,) = entry.units
        found = entry.fn(stats, config)
        if not (read_back and run.has_arrays(entry.name)):
            run.save_arrays(entry.name, found.to_arrays())
        classes = classes_from_assignment(
            found.selected, found.assignment, langs, adapter.n_layers, _n_units(adapter, unit)
        )
        specific = classes.specific_sets()
        run.save_json(
            f"specific_{entry.name}_{unit}",
            {lang: units.tolist() for lang, units in specific.items()}
            | {"shared": classes.shared_units().tolist()},
        )
        drop, drop_random = (
            [[math.nan] * len(langs)] * len(langs),
            [[math.nan] * len(langs)] * len(langs),
        )
        if unit == "neuron" and config.ablation_facts > 0:
            drop, drop_random = neuron_ablation(f"ablation_{entry.name}_{unit}", specific)
        nan = [[math.nan] * len(langs) for _ in langs]
        summaries.append(
            MethodSummary(
                method=entry.name,
                unit=unit,
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
        selection = {
            **found.info(),
            "tokens": {lang: int(n) for lang, n in zip(stats.langs, stats.n_tokens, strict=False)},
        }
    result = NeuronResult(
        langs=tuple(langs),
        n_layers=adapter.n_layers,
        methods=summaries,
        skipped=skipped,
        run_path=str(run.path),
        lape=selection,
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", skipped=skipped)
    return result, run


def _n_units(adapter: ModelAdapter, unit: str) -> int:
    """Units of kind ``unit`` per layer: MLP neurons or attention heads."""
    return adapter.d_mlp if unit == "neuron" else adapter.info.n_heads


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
