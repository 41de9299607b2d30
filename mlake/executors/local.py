"""The in-process executor: a stage's shards one after another in the calling process, with
its own model.  ``--executor local`` (the default) does not need it (the stage computes every
piece itself, in order); it is what a sharded run is checked against without a cluster, and
the reference for what every executor does: plan the shards, run each chain in order, and
leave the reading back to the stage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from mlake.executors import Units, plan_shards, run_chain
from mlake.stages.context import StageContext


class InProcessExecutor:
    """Runs every shard in this process (module docstring).

    Attributes:
        shard_facts: facts per shard.
        done: ``(stage, shard)`` of every shard run, in order.
    """

    def __init__(self, shard_facts: int = 32) -> None:
        self.shard_facts = shard_facts
        self.done: list[tuple[str, Any]] = []

    def fill(
        self,
        stage: str,
        ctx: StageContext,
        fn: Callable[..., Any],
        *args: Any,
        units: Units | None = None,
        **kw: Any,
    ) -> None:
        """Compute ``stage``'s missing pieces shard by shard (:func:`mlake.executors.run_chain`;
        ``units``: the stage's units of work, :data:`mlake.executors.Units`)."""
        for chain in plan_shards(stage, ctx, self.shard_facts, units):
            run_chain(ctx, fn, args, kw, chain)
            self.done += [(stage, shard) for shard in chain]

    def close(self) -> None:
        """Nothing to release."""
