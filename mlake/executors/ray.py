"""The Ray executor: a stage's shards on the workers of a Ray cluster.

Each worker is a long-lived Ray actor (:class:`ShardWorker`) that loads the model and the
data once and then runs shards (:func:`mlake.executors.run_chain`), writing every piece into
the one results store, a path every worker reaches (a shared filesystem).  Ray places the
workers (one GPU each by default), hands out the chains (:class:`ray.util.ActorPool`) and
restarts a worker that dies, retrying its chain there; the chain recomputes only the pieces
that are missing, and the piece the dead worker was computing is claimed again (its claim
died with it: :meth:`~mlake_core.results.store.Run.claim`).  mlake schedules nothing itself.

Ray is an optional extra: ``pip install 'mlake[ray]'``.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from typing import Any

from mlake.executors import ContextSpec, Units, plan_shards, run_chain, worker_settings
from mlake.stages.context import StageContext
from mlake_core.errors import ConfigError

#: How often Ray restarts a worker that died (and retries the chain it was running) before
#: the run fails: a killed or preempted worker is replaced, a worker that dies every time
#: (out of memory on every try) is not retried for ever.
MAX_RESTARTS = 3


def _ray() -> Any:
    try:
        import ray
    except ImportError:
        raise ConfigError(
            "--executor ray needs Ray, which is not installed: pip install 'mlake[ray]'"
        ) from None
    return ray


class ShardWorker:
    """One worker: the model and the data, loaded once, and the shards it is given.

    Created by :class:`RayExecutor` as a Ray actor (``ray.remote(ShardWorker)``); a plain
    object otherwise (the tests build one directly).
    """

    def __init__(self, model: Any, data: Any) -> None:
        from mlake.loading import load_model
        from mlake.session import load_dataset

        self.loaded = load_model(model, data_dir=data.data_dir)
        self.dataset = load_dataset(data)
        self.where = f"Ray worker {socket.gethostname()}:{os.getpid()}"

    def ready(self) -> dict[str, Any]:
        """Where the worker runs and what it loaded."""
        adapter = self.loaded.adapter
        return {"pid": os.getpid(), "host": socket.gethostname(), "device": str(adapter.device)}

    def run(
        self,
        payload: tuple[ContextSpec, Callable[..., Any], tuple[Any, ...], dict[str, Any]],
        chain: list[Any],
    ) -> dict[str, Any]:
        """Run one chain of shards of a stage (``payload``: the caller's context, the stage
        function and its arguments)."""
        spec, fn, args, kw = payload
        started = time.perf_counter()
        ctx = spec.build(self.loaded.adapter, self.loaded.path, self.dataset, self.where)
        run_chain(ctx, fn, args, kw, chain)
        return {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "shards": [s.describe() for s in chain],
            "seconds": time.perf_counter() - started,
        }


class RayExecutor:
    """Runs shards on a Ray cluster (module docstring).  The workers start on the first
    sharded stage and stay for the next ones; :meth:`close` stops them.

    Args:
        model: the caller's :class:`~mlake.settings.ModelSettings` (each worker loads it).
        data: the caller's :class:`~mlake.settings.DataSettings`.
        address: the cluster (``None``: ``$RAY_ADDRESS``, else a cluster on this machine;
            ignored when this process is already connected, as the tests are).
        gpus_per_worker: GPUs each worker holds (0: CPU workers).
        workers: how many (``None``: the cluster's GPUs over ``gpus_per_worker``, or its CPUs
            for CPU workers).
        shard_facts: facts per shard.
        log: progress lines.

    Raises:
        ConfigError: Ray is not installed.
    """

    def __init__(
        self,
        model: Any,
        data: Any,
        *,
        address: str | None = None,
        gpus_per_worker: float = 1.0,
        workers: int | None = None,
        shard_facts: int = 32,
        log: Callable[[str], None] | None = None,
    ) -> None:
        _ray()
        self.model, self.data = worker_settings(model, data)
        self.address = address
        self.gpus_per_worker = float(gpus_per_worker)
        self.workers = workers
        self.shard_facts = shard_facts
        self.log = log or (lambda _m: None)
        self.actors: list[Any] = []
        self._connected_here = False

    def _worker_count(self, ray: Any) -> int:
        resources = ray.cluster_resources()
        if self.workers is not None:
            return int(self.workers)
        if self.gpus_per_worker > 0:
            n = int(resources.get("GPU", 0) // self.gpus_per_worker)
            if n < 1:
                raise ConfigError(
                    f"--gpus-per-worker {self.gpus_per_worker:g}: the Ray cluster has "
                    f"{resources.get('GPU', 0):g} GPUs; give --gpus-per-worker 0 for CPU "
                    "workers, or join a cluster with GPUs (--address)"
                )
            return n
        return max(1, int(resources.get("CPU", 1)))

    def start(self) -> list[Any]:
        """Connect to the cluster and start the workers (once); their descriptions.

        Raises:
            ConfigError: no GPU for GPU workers; a worker that cannot load the model or the
                data (with its error).
        """
        ray = _ray()
        if self.actors:
            return self.actors
        if not ray.is_initialized():
            ray.init(address=self.address, log_to_driver=True)
            self._connected_here = True
        n = self._worker_count(ray)
        actor = ray.remote(ShardWorker).options(
            num_cpus=1,
            num_gpus=self.gpus_per_worker,
            max_restarts=MAX_RESTARTS,
            max_task_retries=MAX_RESTARTS,
        )
        self.actors = [actor.remote(self.model, self.data) for _ in range(n)]
        try:
            where = ray.get([a.ready.remote() for a in self.actors])
        except ray.exceptions.RayActorError as err:
            self.close()
            raise ConfigError(f"a Ray worker could not load the model or the data: {err}") from None
        self.log(
            f"ray: {n} workers ({self.gpus_per_worker:g} GPU each): "
            + ", ".join(f"{w['host']}:{w['pid']} on {w['device']}" for w in where)
        )
        return self.actors

    def fill(
        self,
        stage: str,
        ctx: StageContext,
        fn: Callable[..., Any],
        *args: Any,
        units: Units | None = None,
        **kw: Any,
    ) -> None:
        """Compute ``stage``'s missing pieces on the workers, one chain of shards per task
        (:func:`mlake.executors.plan_shards`, with the stage's ``units``), and return when
        every chain is done."""
        ray = _ray()
        from ray.util import ActorPool

        chains = plan_shards(stage, ctx, self.shard_facts, units)
        if not chains:
            return
        actors = self.start()
        payload = ray.put((ContextSpec.of(ctx), fn, tuple(args), dict(kw)))
        started = time.perf_counter()
        pool = ActorPool(actors)
        shards = 0
        for done in pool.map_unordered(lambda a, chain: a.run.remote(payload, chain), chains):
            shards += len(done["shards"])
            self.log(
                f"ray [{stage}]: {'; '.join(done['shards'])} done on {done['host']}:"
                f"{done['pid']} in {done['seconds']:.1f} s"
            )
        self.log(
            f"ray [{stage}]: {shards} shards on {len(actors)} workers in "
            f"{time.perf_counter() - started:.1f} s"
        )

    def close(self) -> None:
        """Stop the workers (and leave the cluster, when this executor joined it)."""
        if not self.actors and not self._connected_here:
            return
        ray = _ray()
        for a in self.actors:
            ray.kill(a)
        self.actors = []
        if self._connected_here:
            ray.shutdown()
            self._connected_here = False
