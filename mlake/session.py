"""Opening a run: load the model and the data, select the facts, and build the
:class:`~mlake.stages.context.StageContext` every stage takes (and, for the per-fact
analyses, measure what the model knows first).

The commands and the sweep open a :class:`Session`; the pipeline does the same steps as its
``data``, ``model`` and ``knowledge`` stages, through the same functions.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from mlake.loading import LoadedModel, load_model
from mlake.settings import DataSettings, ModelSettings, RunSettings
from mlake.stages.context import StageContext
from mlake_core.data.dataset import MlakeDataset
from mlake_core.data.selection import FactSelection, select_facts
from mlake_core.errors import ConfigError


@dataclass
class Session:
    """A loaded model and data, ready for stages.

    Attributes:
        loaded: the model and how it was asked for.
        ctx: the stage context, with the facts asked for.
        pool: the default selection (mlake-tiny's training facts, else all facts): where
            locality facts are drawn from.
        knowledge: what the model knows about the pool and the facts asked for (``None``
            until :meth:`measure_knowledge`).
        knowledge_run: the knowledge stage's run folder.
    """

    loaded: LoadedModel
    ctx: StageContext
    pool: tuple[int, ...]
    knowledge: Any = None
    knowledge_run: str | None = None

    def measure_knowledge(self, config: Any = None, *, extra: Sequence[int] = ()) -> Any:
        """Measure (or load) what the model knows about the facts asked for and ``extra``
        facts (editing: its locality sample), as editing, tracing, attribution and probes
        need (facts unknown before are reported apart or skipped), as the pipeline does.  Not
        the whole pool: on a model without training facts that is every fact, an hour of
        CPU for a pretrained model before a 10-fact analysis.  ``config`` defaults to
        :class:`~mlake_core.metrics.knowledge.KnowledgeConfig` without MCQA."""
        from mlake.stages.knowledge import knowledge_stage
        from mlake_core.metrics.knowledge import KnowledgeConfig

        wanted = knowledge_facts(self.ctx.fact_ids, extra)
        self.knowledge, run = knowledge_stage(
            self.ctx.with_facts(wanted), config or KnowledgeConfig(mcqa=False)
        )
        self.knowledge_run = str(run.path)
        return self.knowledge


def knowledge_facts(*groups: Sequence[int]) -> list[int]:
    """The facts whose knowledge a run measures: each group's facts in order, once each (the
    facts asked for, then the locality sample)."""
    out: list[int] = []
    seen: set[int] = set()
    for group in groups:
        for f in group:
            if int(f) not in seen:
                seen.add(int(f))
                out.append(int(f))
    return out


def load_dataset(data: DataSettings) -> MlakeDataset:
    """The run's dataset in the run's languages: MLaKE
    (:func:`~mlake_core.data.dataset.load_mlake`), or the one ``data.dataset`` names
    (:mod:`mlake_core.data.sources`)."""
    from mlake_core.data.sources import load_dataset as load_source

    return load_source(data.dataset, data.data_dir, data.version, data.langs)


def prepare_template(
    loaded: LoadedModel,
    dataset: MlakeDataset,
    selection: FactSelection,
    data: DataSettings,
    log: Callable[[str], None] | None = None,
) -> FactSelection:
    """Build the run's prompt template into ``loaded.template`` and return the selection
    without the demonstration facts.

    A plain template is kept as it is.  A few-shot template draws its demonstrations here,
    once per run, from the facts outside ``selection.fact_ids`` in the run's languages
    (:meth:`~mlake_core.models.prompting.FewShotTemplate.for_run`), so every stage asks the
    same prompts.  When the selection leaves too few usable facts outside it and it is the
    whole default selection (``--facts`` none given, ``all`` or ``trained``), the
    demonstrations are drawn from every fact and taken out of the selection (said on
    ``log``); for ``--facts N`` that is an error.  The demonstration facts are always taken
    out of the pool, so no locality sample holds a fact the prompt answers.

    Raises:
        ConfigError: too few usable facts for the demonstrations (naming the languages).
    """
    from mlake_core.models.prompting import DemonstrationShortage

    template = loaded.template
    if template.needs_build:
        try:
            template = template.for_run(dataset, selection.fact_ids, data.langs)
        except DemonstrationShortage as err:
            if isinstance(data.facts, int):
                raise DemonstrationShortage(
                    f"{err}; ask for fewer facts (--facts) or another template (--template qa)",
                    err.langs,
                ) from None
            template = template.for_run(dataset, (), data.langs)
        loaded.template = template
    demo = template.demonstration_facts()
    if not demo:
        return selection
    taken = [f for f in selection.fact_ids if f in demo]
    if log is not None:
        log(f"prompts: {template.describe()}")
        if taken:
            log(
                f"prompts: facts {', '.join(map(str, taken))} are demonstrations, taken out "
                "of the evaluated facts"
            )
    return FactSelection(
        pool=tuple(f for f in selection.pool if f not in demo),
        fact_ids=tuple(f for f in selection.fact_ids if f not in demo),
    )


def stage_context(
    loaded: LoadedModel,
    dataset: MlakeDataset,
    selection: FactSelection,
    data: DataSettings,
    run: RunSettings,
    log: Callable[[str], None] | None = None,
) -> StageContext:
    """The stage context of a loaded model, data and fact selection.  A few-shot template
    not built yet (:func:`prepare_template`) draws its demonstrations from the facts outside
    the selection.

    Raises:
        ConfigError: demonstrations among the selected facts (a template built for another
            selection), or too few usable facts for them.
    """
    template = loaded.template
    if template.needs_build:
        template = template.for_run(dataset, selection.fact_ids, data.langs)
    both = sorted(template.demonstration_facts() & set(selection.fact_ids))
    if both:
        raise ConfigError(
            f"prompt template {template.name!r}: facts {both[:5]} are both demonstrations and "
            "evaluated (prepare_template the run's selection first)"
        )
    return StageContext(
        adapter=loaded.adapter,
        model_path=loaded.path,
        dataset=dataset,
        fact_ids=selection.fact_ids,
        langs=tuple(data.langs),
        template=template,
        results_dir=run.results_dir,
        batch_size=run.batch_size,
        seed=run.seed,
        log=log,
    )


def open_session(
    model: ModelSettings,
    data: DataSettings,
    run: RunSettings,
    *,
    log: Callable[[str], None] | None = None,
) -> Session:
    """Load the model and the data and select the facts (module docstring).

    Raises:
        ConfigError, DataError: a bad option, model or data file (the message names it).
    """
    loaded = load_model(model, data_dir=data.data_dir, log=log)
    dataset = load_dataset(data)
    selection = select_facts(dataset, data.facts, loaded.trained_facts)
    if selection.note and log:
        log(selection.note)
    selection = prepare_template(loaded, dataset, selection, data, log)
    ctx = stage_context(loaded, dataset, selection, data, run, log)
    return Session(loaded=loaded, ctx=ctx, pool=selection.pool)
