"""Sharded runs (:mod:`mlake.executors`): the shards of knowledge, tracing and transfer,
computed in this process or on a local Ray cluster of 2 CPU workers, give the same tables as
the run computed in one process; a Ray worker killed mid-chain loses and duplicates nothing.

Every test runs on the micro mlake-tiny (4 of its 6 training facts, en and zh)."""

from __future__ import annotations

import dataclasses
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mlake.executors import plan_shards
from mlake.executors.local import InProcessExecutor
from mlake.settings import DataSettings, ModelSettings
from mlake.stages.context import Shard, StageContext

pytestmark = pytest.mark.slow

LANGS = ("en", "zh")
#: Columns that differ between two computations of the same rows (wall-clock times).
TIMING = ("edit_seconds", "eval_seconds", "setup_seconds")


@dataclass
class World:
    model: ModelSettings
    data: DataSettings
    ctx: StageContext
    pool: tuple[int, ...]


@pytest.fixture(scope="module")
def world(micro_tiny: Path) -> World:
    from mlake.loading import load_model
    from mlake.session import load_dataset

    model = ModelSettings(name=str(micro_tiny), device="cpu", template="qa")
    data = DataSettings(langs=LANGS, version="v2024-11")
    loaded = load_model(model, data_dir=data.data_dir)
    dataset = load_dataset(data)
    pool = tuple(loaded.trained_facts or ())
    ctx = StageContext(
        loaded.adapter,
        loaded.path,
        dataset,
        pool[:4],
        LANGS,
        loaded.template,
        batch_size=8,
    )
    return World(model, data, ctx, pool)


def _stages(ctx: StageContext, pool: tuple[int, ...]) -> dict[str, Any]:
    """Knowledge, tracing and IKE transfer (whose every edit draws from the run's generator)
    on ``ctx``; their tables and summaries."""
    from analysis.tracing.causal import TraceConfig
    from analysis.transfer import TransferConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.tracing import tracing_stage
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.ike import IkeConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    knowledge, k_run = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    tracing, t_run = tracing_stage(
        ctx, TraceConfig(kinds=("resid", "mlp"), n_samples=2), knowledge=knowledge
    )
    edits, e_run = transfer_stage(
        ctx,
        "ike",
        IkeConfig(n_demonstrations=2),
        TransferConfig(n_locality=2),
        knowledge=knowledge,
        locality_pool=pool,
        corpus=(),
    )
    summary = tracing.to_dict()
    summary.pop("run")
    return {
        "knowledge": knowledge.table,
        "tracing": summary,
        "edits": edits.drop(columns=list(TIMING)),
        "runs": (k_run, t_run, e_run),
    }


def _same(a: dict[str, Any], b: dict[str, Any]) -> None:
    pd.testing.assert_frame_equal(a["knowledge"], b["knowledge"])
    assert a["tracing"] == b["tracing"]
    pd.testing.assert_frame_equal(a["edits"], b["edits"])
    for x, y in zip(a["runs"], b["runs"], strict=True):  # the same run keys
        assert x.key == y.key
        assert y.complete


@pytest.fixture(scope="module")
def local(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The stages computed in one process, as without an executor."""
    root = tmp_path_factory.mktemp("local")
    ctx = dataclasses.replace(world.ctx, results_dir=str(root))
    return _stages(ctx, world.pool)


def test_plans_cut_facts_and_languages(world: World) -> None:
    ctx = world.ctx
    tracing = plan_shards("tracing", ctx, 3)
    assert [c[0] for c in tracing] == [
        Shard(ctx.fact_ids[:3], ("en",)),
        Shard(ctx.fact_ids[3:], ("en",)),
        Shard(ctx.fact_ids[:3], ("zh",)),
        Shard(ctx.fact_ids[3:], ("zh",)),
    ]
    transfer = plan_shards("transfer", ctx, 3)  # one chain per edit language, in order
    assert [[s.facts for s in c] for c in transfer] == [[ctx.fact_ids[:3], ctx.fact_ids[3:]]] * 2
    assert plan_shards("knowledge", ctx, 3) == [[Shard(ctx.fact_ids, (lang,))] for lang in LANGS]


def test_in_process_shards_give_the_local_tables(
    world: World, local: dict[str, Any], tmp_path: Path
) -> None:
    executor = InProcessExecutor(shard_facts=3)
    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path), executor=executor)
    sharded = _stages(ctx, world.pool)
    _same(local, sharded)
    # Tracing's unit is a group of FACTS_PER_GROUP facts traced together (a fact's share of
    # the group's passes is in the tables), never split: each language's known facts here
    # are one group, so one shard each.
    assert [stage for stage, _ in executor.done] == ["knowledge"] * 2 + ["tracing"] * 2 + [
        "transfer"
    ] * 4
    # Read back complete, nothing is sharded again.
    n_shards = len(executor.done)
    _stages(ctx, world.pool)
    assert len(executor.done) == n_shards


def test_a_shard_computes_only_its_pieces(world: World, tmp_path: Path) -> None:
    from analysis.tracing.causal import TraceConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.tracing import tracing_stage
    from mlake_core.metrics.knowledge import KnowledgeConfig

    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path))
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    # Tracing's unit is a whole group of facts traced together (here every known zh fact is
    # one group): a zh shard traces it, and nothing in en.
    shard = Shard(ctx.fact_ids, ("zh",))
    result, run = tracing_stage(
        dataclasses.replace(ctx, shard=shard), TraceConfig(n_samples=2), knowledge=knowledge
    )
    assert result is None and not run.complete and not run.has_json("summary")
    traced = sorted(p.stem for p in (run.path / "arrays").glob("trace_*.npz"))
    known = knowledge.known("zh")
    assert traced == sorted(f"trace_zh_{f}" for f in ctx.fact_ids if f in known)
    assert traced  # the micro model knows some of them
    # A shard that holds no group's first fact traces nothing.
    first = min(known, key=ctx.fact_ids.index)
    rest = tuple(f for f in ctx.fact_ids if f != first)
    tracing_stage(
        dataclasses.replace(ctx, shard=Shard(rest, ("zh",)), results_dir=str(tmp_path / "b")),
        TraceConfig(n_samples=2),
        knowledge=knowledge,
    )
    assert not list((tmp_path / "b").rglob("trace_*.npz"))


# -- Ray ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ray_executor(world: World) -> Iterator[Any]:
    """Two CPU workers on a local Ray cluster of 2 CPUs, started once for the module."""
    ray = pytest.importorskip("ray", reason="Ray is not installed (pip install 'mlake[ray]')")
    from mlake.executors.ray import RayExecutor

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    executor = RayExecutor(world.model, world.data, gpus_per_worker=0, shard_facts=2)
    try:
        executor.start()
        yield executor
    finally:
        executor.close()
        ray.shutdown()


def test_ray_workers_give_the_local_tables(
    world: World, local: dict[str, Any], ray_executor: Any, tmp_path: Path
) -> None:
    import ray

    where = ray.get([a.ready.remote() for a in ray_executor.actors])
    assert len({w["pid"] for w in where} | {os.getpid()}) == 3  # two worker processes
    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path), executor=ray_executor)
    _same(local, _stages(ctx, world.pool))


def test_a_ray_worker_killed_mid_chain_loses_and_duplicates_nothing(
    world: World, local: dict[str, Any], ray_executor: Any, tmp_path: Path
) -> None:
    import ray

    from analysis.transfer import TransferConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.ike import IkeConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path))
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    victim = ray.get(ray_executor.actors[0].ready.remote())["pid"]
    # Shards of 2 facts: a chain of 2 per edit language, one language per worker; killed
    # once the first edit is saved, the worker dies inside its first shard.
    ctx = dataclasses.replace(ctx, executor=ray_executor)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["edits"], outcome["run"] = transfer_stage(
                ctx,
                "ike",
                IkeConfig(n_demonstrations=2),
                TransferConfig(n_locality=2),
                knowledge=knowledge,
                locality_pool=world.pool,
                corpus=(),
            )
        except BaseException as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 60
    pieces: list[Path] = []
    while time.monotonic() < deadline and not pieces:  # the first edit saved: mid-chain
        pieces = list(tmp_path.glob("transfer/*/tables/edit_*.parquet"))
        time.sleep(0.02)
    assert pieces, "no edit was saved"
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=120)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    # Ray restarted the worker, which ran its chain again: the saved edits read back, the rest
    # computed (the one the killed worker was computing, its claim gone with it, included).
    assert ray.get(ray_executor.actors[0].ready.remote())["pid"] != victim
    edits = outcome["edits"].drop(columns=list(TIMING))
    pd.testing.assert_frame_equal(edits, local["edits"])
    assert not edits.duplicated().any()
    assert outcome["run"].complete


# -- lens, edit lens, neurons, probes, patching ----------------------------------------------

#: Sequences per pass in the per-fact stages below: 2, so that the lens and the probe
#: activations read each language's facts in several batches, and a shard of 3 facts holds one
#: whole batch (the units are batches: a shard never splits one).
BATCH = 2
#: Keys of the results that differ between two computations of the same pieces (wall-clock
#: times, the run folder).
VARYING = ("run", "run_path", "seconds_per_fact")


def _plain(value: Any) -> str:
    """A result as exact text (floats as ``repr``; NaN equal to NaN), its varying keys left
    out."""
    import json

    def strip(v: Any) -> Any:
        if isinstance(v, dict):
            return {k: strip(x) for k, x in v.items() if k not in VARYING}
        if isinstance(v, list | tuple):
            return [strip(x) for x in v]
        return v

    return json.dumps(strip(value), sort_keys=True, default=str)


def _per_fact_stages(ctx: StageContext, pool: tuple[int, ...]) -> dict[str, Any]:
    """The lens, the edit lens (ROME), neurons (AtP and LAPE), probes and patching (ROME edits)
    on ``ctx``; their summaries (as exact text), the probe tables and the runs."""
    from analysis.lens import LensConfig
    from analysis.neurons.attribution import AttributionConfig
    from analysis.neurons.config import NeuronConfig
    from analysis.patching import PatchConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.lens import lens_edits_stage, lens_stage
    from mlake.stages.neurons import neurons_stage
    from mlake.stages.patching import patching_stage
    from mlake.stages.probes import probe_stage
    from mlake_core.editing.rome import RomeConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from probes.config import ProbeConfig

    rome = RomeConfig(steps=8, contexts="none")
    # ROME's key statistics on a small corpus: the pool's statements in the run's languages.
    corpus = [ctx.dataset.fact(f).views[lang].record.o_prompt for f in pool for lang in LANGS]
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    lens, l_run = lens_stage(ctx, LensConfig(), knowledge=knowledge)
    edit_lens, e_run = lens_edits_stage(
        ctx,
        LensConfig(method="rome", edits=2),
        knowledge=knowledge,
        method_config=rome,
        corpus=corpus,
    )
    neurons, n_run = neurons_stage(
        ctx,
        NeuronConfig(
            methods=("atp", "lape"),
            attribution=AttributionConfig(forms=("question",)),
            text_tokens=2000,
            n_random=1,
            ablation_facts=2,
            min_facts=1,
        ),
        knowledge=knowledge,
    )
    probes, p_run = probe_stage(
        ctx, ProbeConfig(folds=2, inner_folds=2, cs=(0.1,), min_class_facts=2), knowledge=knowledge
    )
    patching, pa_run = patching_stage(
        ctx,
        PatchConfig(method="rome", edits=1),
        knowledge=knowledge,
        method_config=rome,
        corpus=corpus,
    )
    return {
        "lens": _plain(lens.to_dict()),
        "lens_edits": _plain(edit_lens.to_dict()),
        "neurons": _plain(neurons.to_dict()),
        "probes": _plain(probes.to_dict()),
        "probe_tables": (probes.language_id, probes.transfer, probes.similarity),
        "patching": _plain(patching.to_dict()),
        "runs": (l_run, e_run, n_run, p_run, pa_run),
    }


def _same_per_fact(a: dict[str, Any], b: dict[str, Any]) -> None:
    """The same summaries and tables, bit for bit, and the same pieces, array by array."""
    import numpy as np

    for stage in ("lens", "lens_edits", "neurons", "probes", "patching"):
        assert a[stage] == b[stage], stage
    for x, y in zip(a["probe_tables"], b["probe_tables"], strict=True):
        pd.testing.assert_frame_equal(x, y, check_exact=True)
    for x, y in zip(a["runs"], b["runs"], strict=True):
        assert x.key == y.key
        assert y.complete
        pieces = sorted(p.name for p in (x.path / "arrays").glob("*.npz"))
        assert pieces == sorted(p.name for p in (y.path / "arrays").glob("*.npz")), x.kind
        for name in pieces:
            left, right = np.load(x.path / "arrays" / name), np.load(y.path / "arrays" / name)
            assert sorted(left.files) == sorted(right.files)
            for key in left.files:
                if key != "seconds":  # an attribution's wall-clock time
                    np.testing.assert_array_equal(left[key], right[key], err_msg=f"{name}:{key}")


@pytest.fixture(scope="module")
def local_per_fact(world: World, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The per-fact stages computed in one process, as without an executor."""
    root = tmp_path_factory.mktemp("local_per_fact")
    ctx = dataclasses.replace(world.ctx, results_dir=str(root), batch_size=BATCH)
    return _per_fact_stages(ctx, world.pool)


def test_per_fact_stages_in_process_shards_give_the_local_tables(
    world: World, local_per_fact: dict[str, Any], tmp_path: Path
) -> None:
    executor = InProcessExecutor(shard_facts=3)
    ctx = dataclasses.replace(
        world.ctx, results_dir=str(tmp_path), batch_size=BATCH, executor=executor
    )
    _same_per_fact(local_per_fact, _per_fact_stages(ctx, world.pool))
    stages = [stage for stage, _ in executor.done]
    for stage in ("lens", "lens_edits", "neurons", "probe_activations", "patching"):
        assert stage in stages, stage
    # The lens's shards are whole batches: a shard of 3 facts holds one batch of 2.
    lens_shards = [shard for stage, shard in executor.done if stage == "lens"]
    assert lens_shards and all(len(s.facts) <= BATCH for s in lens_shards)
    assert sum(len(s.facts) for s in lens_shards) > BATCH  # several batches, several shards
    # Read back complete, nothing is sharded again.
    done = len(executor.done)
    _same_per_fact(local_per_fact, _per_fact_stages(ctx, world.pool))
    assert len(executor.done) == done


def test_a_lens_shard_reads_only_its_batches(world: World, tmp_path: Path) -> None:
    from analysis.lens import LensConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.lens import lens_stage
    from mlake_core.metrics.knowledge import KnowledgeConfig

    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path), batch_size=BATCH)
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    known = [f for f in ctx.fact_ids if f in knowledge.known("en")]
    assert len(known) > BATCH  # the micro model knows several
    shard = Shard(tuple(known[BATCH : 2 * BATCH]), ("en",))  # the second batch of en
    result, run = lens_stage(
        dataclasses.replace(ctx, shard=shard), LensConfig(), knowledge=knowledge
    )
    assert result is None and not run.complete and not run.has_json("summary")
    read = sorted(p.stem for p in (run.path / "arrays").glob("lens_*.npz"))
    assert read == sorted(f"lens_en_{f}" for f in known[BATCH : 2 * BATCH])


def test_per_fact_stages_on_ray_workers_give_the_local_tables(
    world: World, local_per_fact: dict[str, Any], ray_executor: Any, tmp_path: Path
) -> None:
    ctx = dataclasses.replace(
        world.ctx, results_dir=str(tmp_path), batch_size=BATCH, executor=ray_executor
    )
    _same_per_fact(local_per_fact, _per_fact_stages(ctx, world.pool))


def test_a_finished_shard_is_not_recomputed_and_the_rest_is_filled(
    world: World, local_per_fact: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shard of edit-lens edits finished (the rest of its run lost with a killed worker):
    the run afterwards edits only the missing facts, and its table is the local run's."""
    import mlake.stages.lens as lens_stage_module
    from analysis.lens import LensConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake_core.editing.rome import RomeConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path), batch_size=BATCH)
    corpus = [ctx.dataset.fact(f).views[lang].record.o_prompt for f in world.pool for lang in LANGS]
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    config, rome = LensConfig(method="rome", edits=2), RomeConfig(steps=8, contexts="none")
    kw = {"knowledge": knowledge, "method_config": rome, "corpus": corpus}
    done_facts = tuple(f for f in ctx.fact_ids if f in knowledge.known("zh"))[:1]
    shard = Shard(done_facts, ("zh",))
    result, run = lens_stage_module.lens_edits_stage(
        dataclasses.replace(ctx, shard=shard), config, **kw
    )
    assert result is None and [p.stem for p in (run.path / "arrays").glob("edit_*.npz")] == [
        f"edit_zh_{done_facts[0]}"
    ]
    real, edited = lens_stage_module.edit_fact, []

    def counting(adapter: Any, entry: Any, request: Any, *a: Any) -> Any:
        edited.append(request)
        return real(adapter, entry, request, *a)

    monkeypatch.setattr(lens_stage_module, "edit_fact", counting)
    result, run = lens_stage_module.lens_edits_stage(ctx, config, **kw)
    assert _plain(result.to_dict()) == local_per_fact["lens_edits"]
    assert len(edited) == sum(len(v) for v in result.edits.values()) - 1  # the saved one read


def test_a_ray_worker_killed_in_an_edit_lens_shard_loses_and_duplicates_nothing(
    world: World, local_per_fact: dict[str, Any], ray_executor: Any, tmp_path: Path
) -> None:
    import ray

    from analysis.lens import LensConfig
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.lens import lens_edits_stage
    from mlake_core.editing.rome import RomeConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    ctx = dataclasses.replace(world.ctx, results_dir=str(tmp_path), batch_size=BATCH)
    corpus = [ctx.dataset.fact(f).views[lang].record.o_prompt for f in world.pool for lang in LANGS]
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    victim = ray.get(ray_executor.actors[1].ready.remote())["pid"]
    ctx = dataclasses.replace(ctx, executor=ray_executor)
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"], outcome["run"] = lens_edits_stage(
                ctx,
                LensConfig(method="rome", edits=2),
                knowledge=knowledge,
                method_config=RomeConfig(steps=8, contexts="none"),
                corpus=corpus,
            )
        except BaseException as err:  # reported below
            outcome["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.monotonic() + 120
    pieces: list[Path] = []
    while time.monotonic() < deadline and not pieces:  # the first edit saved: mid-shard
        pieces = list(tmp_path.glob("lens_edits/*/arrays/edit_*.npz"))
        time.sleep(0.02)
    assert pieces, "no edit was saved"
    os.kill(victim, signal.SIGKILL)
    thread.join(timeout=180)
    assert not thread.is_alive()
    assert "error" not in outcome, outcome.get("error")
    assert ray.get(ray_executor.actors[1].ready.remote())["pid"] != victim  # restarted
    assert _plain(outcome["result"].to_dict()) == local_per_fact["lens_edits"]
    assert outcome["run"].complete
