"""The pipeline's steps: each stage of :data:`~mlake.pipeline.config.STAGES` as a function of
the run's shared state (what earlier steps loaded and computed).

The ``data``, ``model`` and ``knowledge`` steps build the
:class:`~mlake.stages.context.StageContext` through the same functions the commands use
(:mod:`mlake.session`); every later step calls a stage of :mod:`mlake.stages` with it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlake.pipeline.config import PipelineConfig
from mlake.pipeline.manifest import write_json
from mlake.progress import Bars, LogBar
from mlake.stages.context import StageContext
from mlake_core.errors import ConfigError


class StageSkipped(Exception):
    """A stage that cannot run here (e.g. an optional package missing): noted, not fatal."""


@dataclass
class PipelineState:
    """What the steps pass on to each other.

    Attributes:
        config: the pipeline config.
        out: the run folder.
        store: the results store.
        log: progress lines.
        bar: progress bars (or log lines).
        on_item: called after every fact or edit a stage finishes.
        dataset: MLaKE (``data`` step).
        loaded: the model (``model`` step).
        pool: the default fact selection (``model`` step).
        ctx: the stage context (``model`` step).
        knowledge: the knowledge stage's result.
        runs: label -> run folder of every stage run so far.
    """

    config: PipelineConfig
    out: Path
    store: Path
    log: Callable[[str], None]
    bar: Bars
    on_item: Callable[[str, dict[str, Any]], None] | None
    dataset: Any = None
    loaded: Any = None
    pool: tuple[int, ...] = ()
    ctx: StageContext | None = None
    knowledge: Any = None
    runs: dict[str, str] = field(default_factory=dict)

    def item(self, stage: str, info: dict[str, Any]) -> None:
        if self.on_item:
            self.on_item(stage, info)

    def need(self, *what: str) -> None:
        for name in what:
            if getattr(self, name) is None:
                step = {"ctx": "model", "loaded": "model"}.get(name, name)
                raise ConfigError(f"this stage needs the {step} stage (add it to run.stages)")

    @property
    def context(self) -> StageContext:
        """The stage context (after the ``data`` and ``model`` steps)."""
        self.need("dataset", "ctx")
        assert self.ctx is not None
        return self.ctx


def _stage_data(s: PipelineState) -> dict[str, str]:
    from mlake.session import load_dataset
    from mlake_core.data.stats import dataset_stats

    c = s.config.data
    s.dataset = load_dataset(c)
    stats = dataset_stats(s.dataset)
    write_json(s.out / "data_stats.json", stats)
    usable = {
        lang: sum(v.question.usable for v in s.dataset.views(lang)) for lang in s.dataset.langs
    }
    from mlake_core.data.external import ExternalDataset

    name = (
        f"{s.dataset.title} (--dataset {s.dataset.name})"
        if isinstance(s.dataset, ExternalDataset)
        else f"MLaKE {s.dataset.version}"
    )
    s.log(
        f"data: {name}, {len(s.dataset.facts)} facts; question form usable: "
        + ", ".join(f"{k} {v}" for k, v in usable.items())
    )
    if not any(usable.values()):
        raise ConfigError(f"data: no usable question in {', '.join(c.langs)}")
    return {"stats": str(s.out / "data_stats.json")}


def _stage_model(s: PipelineState) -> dict[str, str]:
    from mlake.loading import load_model
    from mlake.session import prepare_template, stage_context
    from mlake_core.data.selection import select_facts

    c = s.config
    s.loaded = load_model(c.model, data_dir=c.data.data_dir, log=s.log)
    if s.dataset is not None:
        selection = select_facts(s.dataset, c.data.facts, s.loaded.trained_facts)
        if selection.note:
            s.log(selection.note)
        # A few-shot template draws its demonstrations once, outside the run's facts.
        selection = prepare_template(s.loaded, s.dataset, selection, c.data, s.log)
        s.pool = selection.pool
        run = dataclasses.replace(c.run, results_dir=str(s.store))
        s.ctx = stage_context(s.loaded, s.dataset, selection, c.data, run, s.log)
        s.log(f"model: {s.loaded.path}; {len(selection.fact_ids)} facts of a pool of {len(s.pool)}")
    return {"model": str(s.loaded.path)}


def _stage_knowledge(s: PipelineState) -> dict[str, str]:
    from analysis.transfer import locality_facts
    from mlake.session import knowledge_facts
    from mlake.stages.knowledge import knowledge_stage

    ctx, c = s.context, s.config
    # The selected facts and the locality sample of the transfer stage (which needs to know
    # which of them the model knew), not the whole pool: on mlake-tiny, 300 facts x 5
    # languages would take most of the default pipeline's time.
    loc_ids = locality_facts(
        ctx.dataset, ctx.fact_ids, c.transfer.transfer_config(c.knowledge.max_new_tokens), s.pool
    )
    measured = knowledge_facts(ctx.fact_ids, loc_ids)
    bar = s.bar("knowledge", None, "seq")

    def progress(stage: str, n: int, total: int) -> None:
        # Counts restart with every language's measurement.
        if bar.total != total or n < bar.n:
            bar.reset(total=total)
        bar.update(n - bar.n)

    try:
        s.knowledge, run = knowledge_stage(
            ctx.with_facts(measured),
            c.knowledge,
            # As log lines, the stage's own line per language is enough.
            progress=None if isinstance(bar, LogBar) else progress,
        )
    finally:
        bar.close()
    s.runs["knowledge"] = str(run.path)
    return {"knowledge": str(run.path)}


def _known_total(s: PipelineState) -> int:
    ctx = s.context
    wanted = set(ctx.fact_ids)
    return sum(len(s.knowledge.known(lang) & wanted) for lang in ctx.langs)


def _stage_tracing(s: PipelineState) -> dict[str, str]:
    from mlake.stages.tracing import tracing_stage

    s.need("knowledge")
    bar = s.bar("tracing", _known_total(s), "fact")

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(info["lang"], refresh=False)
        bar.update(1)
        s.item("tracing", info)

    try:
        _, run = tracing_stage(s.context, s.config.tracing, knowledge=s.knowledge, on_fact=on_fact)
    finally:
        bar.close()
    s.runs["tracing"] = str(run.path)
    return {"tracing": str(run.path)}


def _stage_lens(s: PipelineState) -> dict[str, str]:
    """The fact lens; with ``lens.lens: tuned`` through a tuned lens (default fit settings,
    :class:`~analysis.tuned_lens.TunedLensConfig`); with ``lens.method`` and ``lens.edits``
    also the lens before and after edits (run ``lens_edits``; the method's settings resolved
    as the transfer stage resolves them)."""
    from mlake.stages.lens import lens_edits_stage, lens_edits_total, lens_stage, tuned_lens_for
    from mlake_core.editing.covariance import mlake_corpus, read_corpus

    s.need("knowledge")
    c, ctx = s.config, s.context
    tuned = tuned_lens_for(ctx) if c.lens.lens == "tuned" else None
    bar = s.bar("lens", _known_total(s), "fact")

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(info["lang"], refresh=False)
        bar.update(1)
        s.item("lens", info)

    try:
        _, run = lens_stage(ctx, c.lens, knowledge=s.knowledge, on_fact=on_fact, tuned=tuned)
    finally:
        bar.close()
    s.runs["lens"] = str(run.path)
    runs = {"lens": str(run.path)}
    if c.lens.measures_edits:
        method_config = _method_config(s, c.lens.method)
        corpus = read_corpus(c.transfer.corpus) if c.transfer.corpus else mlake_corpus(ctx.dataset)
        bar = s.bar("lens edits", lens_edits_total(ctx, c.lens, s.knowledge), "edit")

        def on_item(info: dict[str, Any]) -> None:
            bar.set_postfix_str(info["lang"], refresh=False)
            bar.update(1)
            s.item("lens", {"kind": "edit", **info})

        try:
            _, edits_run = lens_edits_stage(
                ctx,
                c.lens,
                knowledge=s.knowledge,
                method_config=method_config,
                corpus=corpus,
                on_item=on_item,
                tuned=tuned,
            )
        finally:
            bar.close()
        s.runs["lens_edits"] = runs["lens_edits"] = str(edits_run.path)
    return runs


def _stage_patching(s: PipelineState) -> dict[str, str]:
    from mlake.stages.patching import patching_stage, patching_total
    from mlake_core.editing.covariance import mlake_corpus, read_corpus

    s.need("knowledge")
    c, ctx = s.config, s.context
    method_config, corpus = None, []
    if c.patching.measures_edits:
        method_config = _method_config(s, c.patching.method)
        corpus = read_corpus(c.transfer.corpus) if c.transfer.corpus else mlake_corpus(ctx.dataset)
    bar = s.bar("patching", patching_total(ctx, c.patching, s.knowledge), "item")

    def on_item(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['kind']} {info['lang']}", refresh=False)
        bar.update(1)
        s.item("patching", info)

    try:
        _, run = patching_stage(
            ctx,
            c.patching,
            knowledge=s.knowledge,
            method_config=method_config,
            corpus=corpus,
            on_item=on_item,
        )
    finally:
        bar.close()
    s.runs["patching"] = str(run.path)
    return {"patching": str(run.path)}


def _method_config(s: PipelineState, name: str) -> Any:
    """Method ``name``'s config, resolved as ``mlake edit transfer`` resolves it
    (:func:`mlake.method_settings.resolve_method`): what the config sets away from the
    method's defaults wins, then the settings the model was trained for
    (``transfer.model_settings``), then tracing's layer for ``auto``."""
    from mlake.method_settings import resolve_method, set_fields

    t = s.config.transfer
    resolved = resolve_method(
        name,
        s.context.adapter,
        s.context.model_path,
        given=set_fields(t.method_config(name)),
        model_settings=t.model_settings,
        results_dir=s.store,
        log=lambda message: s.log(f"transfer: {message}"),
    )
    return resolved.config


def _transfer(
    s: PipelineState,
    name: str,
    method_config: Any,
    label: str,
    unit_sets: Any = None,
    unit_source: str | None = None,
) -> str:
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.covariance import mlake_corpus, read_corpus

    ctx, c = s.context, s.config
    corpus = read_corpus(c.transfer.corpus) if c.transfer.corpus else mlake_corpus(ctx.dataset)
    bar = s.bar(label, len(ctx.fact_ids) * len(ctx.langs), "edit")

    def on_edit(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['lang']} loss {info['loss']:.3f}", refresh=False)
        bar.update(1)
        s.item("transfer", {"label": label, **info})

    try:
        _, run = transfer_stage(
            ctx,
            name,
            method_config,
            c.transfer.transfer_config(c.knowledge.max_new_tokens),
            knowledge=s.knowledge,
            locality_pool=s.pool,
            corpus=corpus,
            on_edit=on_edit,
            unit_sets=unit_sets,
            unit_source=unit_source,
            knowledge_run=s.runs.get("knowledge"),
        )
    finally:
        bar.close()
    s.runs[f"transfer:{label}"] = str(run.path)
    return str(run.path)


def _stage_transfer(s: PipelineState) -> dict[str, str]:
    s.need("knowledge")
    out = {}
    for name in s.config.transfer.methods:
        out[name] = _transfer(s, name, _method_config(s, name), name)
    return out


def _stage_neurons(s: PipelineState) -> dict[str, str]:
    from mlake.stages.neurons import neurons_stage

    s.need("knowledge")
    c = s.config
    bar = s.bar("neurons", _known_total(s) * len(c.neurons.fact_methods), "fact")

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['method']} {info['lang']}", refresh=False)
        bar.update(1)
        s.item("neurons", info)

    try:
        _, run = neurons_stage(s.context, c.neurons, knowledge=s.knowledge, on_fact=on_fact)
    finally:
        bar.close()
    s.runs["neurons"] = str(run.path)
    return {"neurons": str(run.path)}


def _stage_restricted(s: PipelineState) -> dict[str, str]:
    from mlake.stages.transfer import read_unit_sets

    t = s.config.transfer
    if not t.restricted:
        raise StageSkipped("no restricted editing asked for (transfer.restricted is empty)")
    if "neurons" not in s.runs:
        raise StageSkipped("needs the neurons stage")
    if t.units_method not in s.config.neurons.methods:
        raise StageSkipped(f"the neuron stage did not run {t.units_method} (transfer.units_method)")
    unit_sets = read_unit_sets(s.runs["neurons"], t.units_method, seed=s.config.run.seed)
    source = f"{s.runs['neurons']} ({t.units_method})"
    base = _method_config(s, "ft")
    out = {}
    for units in t.restricted:
        label = f"ft[{units}]"
        cfg = dataclasses.replace(base, units=units)
        out[label] = _transfer(s, "ft", cfg, label, unit_sets, source)
    return out


def _stage_probes(s: PipelineState) -> dict[str, str]:
    s.need("knowledge")
    if s.config.probes is None:
        raise StageSkipped("the probes package is not installed")
    try:
        from mlake.stages.probes import probe_stage
    except ImportError as err:
        raise StageSkipped(f"the probes package cannot be imported ({err})") from None
    ctx = s.context
    bar = s.bar("probes", len(ctx.fact_ids) * len(ctx.langs), "prompt")

    def progress(n: int) -> None:
        bar.update(n)
        s.item("probes", {"prompts": n})

    try:
        _, run = probe_stage(ctx, s.config.probes, knowledge=s.knowledge, progress=progress)
    finally:
        bar.close()
    s.runs["probes"] = str(run.path)
    return {"probes": str(run.path)}


def _stage_relate(s: PipelineState) -> dict[str, str]:
    from mlake.stages.relate import relate_stage

    s.need("dataset")
    if "neurons" not in s.runs:
        raise StageSkipped("needs the neurons stage")
    mains = [k.split(":", 1)[1] for k in s.runs if k.startswith("transfer:") and "[" not in k]
    if not mains:
        raise StageSkipped("needs the transfer stage")
    restricted = [v for k, v in s.runs.items() if k.startswith("transfer:ft[")]
    out = {}
    for label in mains:
        _, run = relate_stage(
            s.runs[f"transfer:{label}"],
            s.dataset,
            s.config.relate.stats,
            knowledge_dir=s.runs.get("knowledge"),
            neurons_dir=s.runs["neurons"],
            tracing_dir=s.runs.get("tracing"),
            probes_dir=s.runs.get("probes"),
            restricted=restricted if label == "ft" else [],
            unit=s.config.relate.unit,
            results_dir=s.store,
            log=s.log,
            # The lens and patching predictors, from this run's stages when they edited with
            # this method (else looked up in the store, as tracing is).
            lens_dir=s.runs.get("lens_edits") if s.config.lens.method == label else None,
            patching_dir=s.runs.get("patching") if s.config.patching.method == label else None,
        )
        out[label] = str(run.path)
        s.item("relate", {"method": label})
    return out


def _stage_figures(s: PipelineState) -> dict[str, str]:
    from mlake.pipeline.figures import write_figures

    written = write_figures(s.out, log=s.log)
    return {"figures": f"{len(written)} files in {s.out / 'figures'}"}


def _stage_report(s: PipelineState) -> dict[str, str]:
    from mlake.pipeline.report import write_report

    path = write_report(s.out)
    return {"report": str(path)}


STAGE_FUNCTIONS: dict[str, Callable[[PipelineState], dict[str, str] | None]] = {
    "data": _stage_data,
    "model": _stage_model,
    "knowledge": _stage_knowledge,
    "tracing": _stage_tracing,
    "lens": _stage_lens,
    "patching": _stage_patching,
    "transfer": _stage_transfer,
    "neurons": _stage_neurons,
    "restricted": _stage_restricted,
    "probes": _stage_probes,
    "relate": _stage_relate,
    "figures": _stage_figures,
    "report": _stage_report,
}
