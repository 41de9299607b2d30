"""Executors: where the per-fact stages compute their pieces.

A per-fact stage saves its result piece by piece in one run folder of the results store
(a fact's trace, an edit's rows, a language's knowledge table), keyed by everything that
determines the whole run.  A *shard* (:class:`~mlake.stages.context.Shard`) is a part of
those pieces: a chunk of facts in one language (for transfer, one edit language of one
method's run).  A shard is the stage itself, called with ``ctx.shard`` set: it computes only
its missing pieces, each under the piece's claim (:meth:`~mlake_core.results.store.Run.claim`),
so it is idempotent and resumable and two workers never compute the same piece.  Once every
shard is done, the stage runs as usual in the calling process and reads every piece back into
the same tables, summary and status as a run computed in one process.

``local`` (the default) shards nothing: the stage computes every piece itself, in order
(``ctx.executor`` is ``None``).  :class:`~mlake.executors.local.InProcessExecutor` runs the
shards one after another in the calling process, with its model (what every executor must
match).  ``ray`` (:class:`~mlake.executors.ray.RayExecutor`) runs them on a Ray cluster: one
long-lived worker per GPU, each loading the model once.

Which stages are sharded and how (:data:`SHARDED`):

- ``knowledge``: one shard per language (its pieces are whole languages);
- ``tracing``: chunks of ``shard_facts`` facts in one language, in any order;
- ``transfer``: chunks of facts in one edit language, a language's chunks in order on one
  worker (each edit draws from the random generator where the edit before left it, as in a
  run in one process), the languages in parallel; each method is its own run;
- ``lens``: chunks of whole batches of the facts read in one prompt language (the lens reads
  ``batch_size`` facts per pass; a shard of whole batches reads them in the same passes as a
  run in one process, so its numbers are bit-identical);
- ``lens_edits``, ``patching``: chunks of facts in one language (an edit's language; for
  patching's counterfactual matrix, a target's language: all its source languages share its
  passes), in any order (every edit seeds its own generator);
- ``neurons``: chunks of facts in one language (each fact's attribution in every per-fact
  method, with its own seeds), in any order;
- ``probe_activations``: chunks of whole batches of one language's question prompts (read in
  batches sorted by length; the probes themselves are fit on all facts at once, in the
  calling process).

A stage declares its unit of work when it asks for shards
(:meth:`~mlake.stages.context.StageContext.fill_shards`, ``units``): per language, the groups
of facts that one shard computes together (a batch), in order; a shard is as many whole groups
as fit ``shard_facts`` facts (at least one).  Without ``units`` every fact is its own group.
How the shards' pieces merge is the stage's own: run without a shard, it reads them back.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake.stages.context import Shard, StageContext
from mlake_core.errors import ConfigError

#: A stage's shards as chains: the shards of a chain run in order on one worker; chains run
#: in any order, in parallel.
Chains = list[list[Shard]]

#: A stage's units of work, per language: the groups of facts one shard computes together
#: (a batch read in one pass), in order (module docstring).
Units = Mapping[str, Sequence[Sequence[int]]]


def _chunks(fact_ids: Sequence[int], size: int) -> list[tuple[int, ...]]:
    return [tuple(fact_ids[i : i + size]) for i in range(0, len(fact_ids), size)]


def _by_language(ctx: StageContext, size: int, units: Units | None) -> Chains:
    return [[Shard(facts=tuple(ctx.fact_ids), langs=(lang,))] for lang in ctx.langs]


def _independent_chunks(ctx: StageContext, size: int, units: Units | None) -> Chains:
    return [[shard] for shard in _unit_shards(ctx, size, units)]


def _chunks_in_order(ctx: StageContext, size: int, units: Units | None) -> Chains:
    return [
        [Shard(facts=chunk, langs=(lang,)) for chunk in _chunks(ctx.fact_ids, size)]
        for lang in ctx.langs
    ]


def _unit_shards(ctx: StageContext, size: int, units: Units | None) -> list[Shard]:
    """Per language (in the run's order), its units packed in order into shards of at most
    ``size`` facts (a unit larger than ``size`` is one shard); without ``units``, chunks of
    ``size`` facts.  Languages without units get no shard."""
    out = []
    for lang in ctx.langs:
        groups = (
            [(int(f),) for f in ctx.fact_ids]
            if units is None
            else [tuple(int(f) for f in g) for g in units.get(lang, ()) if len(g)]
        )
        facts: list[int] = []
        for group in groups:
            if facts and len(facts) + len(group) > size:
                out.append(Shard(facts=tuple(facts), langs=(lang,)))
                facts = []
            facts += group
        if facts:
            out.append(Shard(facts=tuple(facts), langs=(lang,)))
    return out


#: How each sharded stage is cut into shards (module docstring).  A stage missing here is
#: not sharded: it computes its pieces itself, in the calling process.
SHARDED: dict[str, Callable[[StageContext, int, Units | None], Chains]] = {
    "knowledge": _by_language,
    "tracing": _independent_chunks,
    "transfer": _chunks_in_order,
    "lens": _independent_chunks,
    "lens_edits": _independent_chunks,
    "neurons": _independent_chunks,
    "patching": _independent_chunks,
    "probe_activations": _independent_chunks,
}


def plan_shards(
    stage: str, ctx: StageContext, shard_facts: int, units: Units | None = None
) -> Chains:
    """The shards of ``stage`` on ``ctx``'s facts and languages, as chains (:data:`Chains`);
    ``units``: the stage's units of work (:data:`Units`; ``None``: every fact its own).

    Raises:
        ConfigError: a stage that is not sharded (naming the ones that are).
    """
    if stage not in SHARDED:
        raise ConfigError(f"stage {stage!r} is not sharded (sharded: {', '.join(SHARDED)})")
    return SHARDED[stage](ctx, shard_facts, units)


@dataclass(frozen=True)
class ContextSpec:
    """A :class:`~mlake.stages.context.StageContext` without its model and data, to send to a
    worker, which holds its own (:meth:`build`).  Paths are absolute, as a worker's working
    folder is not the caller's.

    Attributes:
        identity: the caller's model identity (a worker's must be the same, or its results
            would go to other run folders).
        data_sha256: the caller's data (the same check).
        model_path, fact_ids, langs, template, results_dir, batch_size, seed: as in the
            context.
    """

    identity: dict[str, Any]
    data_sha256: str
    model_path: str
    fact_ids: tuple[int, ...]
    langs: tuple[str, ...]
    template: Any
    results_dir: str
    batch_size: int
    seed: int

    @classmethod
    def of(cls, ctx: StageContext) -> ContextSpec:
        from mlake_core.results.store import results_root

        return cls(
            identity=ctx.identity(),
            data_sha256=ctx.dataset.content_sha256,
            model_path=ctx.model_path,
            fact_ids=tuple(ctx.fact_ids),
            langs=tuple(ctx.langs),
            template=ctx.template,
            results_dir=str(results_root(ctx.results_dir).resolve()),
            batch_size=ctx.batch_size,
            seed=ctx.seed,
        )

    def build(self, adapter: Any, model_path: str, dataset: Any, where: str) -> StageContext:
        """The context on a worker's own model and data.

        Raises:
            ConfigError: the worker's model or data is not the caller's (naming ``where``,
                the worker).
        """
        ctx = StageContext(
            adapter=adapter,
            model_path=model_path,
            dataset=dataset,
            fact_ids=self.fact_ids,
            langs=self.langs,
            template=self.template,
            results_dir=self.results_dir,
            batch_size=self.batch_size,
            seed=self.seed,
        )
        if ctx.identity() != self.identity:
            raise ConfigError(
                f"{where}: loaded another model than the caller ({ctx.identity()} against "
                f"{self.identity}); give every worker the same model files (a shared cache or "
                "checkpoint folder) so that their results land in the caller's run folders"
            )
        if dataset.content_sha256 != self.data_sha256:
            raise ConfigError(
                f"{where}: its MLaKE data differ from the caller's; point every worker at the "
                "same data (--data-dir or $MLAKE_DATA on a shared path)"
            )
        return ctx


def worker_settings(model: Any, data: Any) -> tuple[Any, Any]:
    """The model and data settings as a worker on another machine needs them: the data folder
    and a local model folder as absolute paths."""
    from mlake_core.data.paths import resolve_data_dir

    data = dataclasses.replace(data, data_dir=str(resolve_data_dir(data.data_dir).resolve()))
    if Path(model.name).expanduser().is_dir():
        model = dataclasses.replace(model, name=str(Path(model.name).expanduser().resolve()))
    return model, data


def run_chain(
    ctx: StageContext,
    fn: Callable[..., Any],
    args: Sequence[Any],
    kw: dict[str, Any],
    chain: Sequence[Shard],
) -> None:
    """Run a chain's shards in order: ``fn(ctx with the shard, *args, **kw)`` each."""
    for shard in chain:
        fn(dataclasses.replace(ctx, shard=shard, executor=None), *args, **kw)


def make_executor(
    run: Any, model: Any, data: Any, *, log: Callable[[str], None] | None = None
) -> Any:
    """The executor of ``run.executor`` (:class:`~mlake.settings.RunSettings`): ``None`` for
    ``local``, a :class:`~mlake.executors.ray.RayExecutor` for ``ray`` (started on first use;
    :meth:`close` it).

    Raises:
        ConfigError: ``ray`` without Ray installed (naming the extra to install).
    """
    if run.executor == "local":
        return None
    if run.executor == "ray":
        from mlake.executors.ray import RayExecutor

        return RayExecutor(
            model,
            data,
            address=run.address,
            gpus_per_worker=run.gpus_per_worker,
            workers=run.workers,
            shard_facts=run.shard_facts,
            log=log,
        )
    raise ConfigError(f"--executor {run.executor!r}: choose local or ray")


__all__ = [
    "SHARDED",
    "Chains",
    "ContextSpec",
    "Units",
    "make_executor",
    "plan_shards",
    "run_chain",
    "worker_settings",
]
