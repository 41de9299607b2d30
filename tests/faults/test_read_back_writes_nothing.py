"""Reading back a complete run writes nothing (a read-only results folder can be read, and
nothing recorded is overwritten).

Every stage with a stored run (knowledge, transfer, tracing, neurons, probes with their
activations, relate) runs once on the micro mlake-tiny into one results store; then each runs
again on the same store.  The second time no file is written, through the store
(``_atomic_write``, which every ``save_table``, ``save_arrays``, ``save_json`` and
``write_meta`` goes through) or any other way (tracing's shared ``recommended_layers.json``
and its lock, a temporary file, a new folder: every file and folder of the store keeps its
inode, size and times), the meta keeps what the computation recorded, and the stage returns
what it returned the first time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from mlake_core.results import store
from mlake_core.results.store import Run

pytestmark = pytest.mark.slow

LANGS = ("en", "zh")


@dataclass
class World:
    """The store and what the first run of every stage returned (``first[stage]``: its
    result's fingerprint, its run folder and the run's meta then)."""

    root: Path
    ctx: Any
    dataset: Any
    pool: list[int]
    knowledge: Any = None
    runs: dict[str, Run] = field(default_factory=dict)
    first: dict[str, tuple[str, Path, dict[str, Any]]] = field(default_factory=dict)


def _fingerprint(value: Any) -> str:
    """A result as JSON text (NaN equal to NaN, which ``==`` on floats is not)."""
    if isinstance(value, pd.DataFrame):
        return value.reset_index(drop=True).to_json(orient="split", double_precision=15)
    if hasattr(value, "to_dict"):
        value = value.to_dict()
    return json.dumps(value, sort_keys=True, default=str)


def _knowledge(w: World) -> tuple[Any, Run]:
    from mlake.stages.knowledge import knowledge_stage
    from mlake_core.metrics.knowledge import KnowledgeConfig

    result, run = knowledge_stage(w.ctx, KnowledgeConfig(mcqa=False))
    if w.knowledge is None:
        w.knowledge = result
    return result.table, run


def _transfer(w: World) -> tuple[Any, Run]:
    from analysis.transfer import TransferConfig
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.rome import RomeConfig

    return transfer_stage(
        w.ctx.with_facts(w.pool[:1]),
        "rome",
        RomeConfig(layer=0, steps=2, contexts="2x3"),
        TransferConfig(n_locality=1),
        knowledge=w.knowledge,
        locality_pool=w.pool,
        corpus=[v.record.question for v in w.dataset.views("en")[:40]],
    )


def _tracing(w: World) -> tuple[Any, Run]:
    from analysis.tracing.causal import TraceConfig
    from mlake.stages.tracing import tracing_stage

    config = TraceConfig(kinds=("resid", "mlp"), n_samples=2)
    return tracing_stage(w.ctx, config, knowledge=w.knowledge)


def _neurons(w: World) -> tuple[Any, Run]:
    from analysis.neurons.config import NeuronConfig
    from mlake.stages.neurons import neurons_stage

    config = NeuronConfig(
        methods="atp,lape", ablation_facts=1, min_facts=1, n_random=1, text_tokens=2000
    )
    return neurons_stage(w.ctx, config, knowledge=w.knowledge)


def _probes(w: World) -> tuple[Any, Run]:
    from mlake.stages.probes import probe_stage
    from probes.config import ProbeConfig

    config = ProbeConfig(folds=2, inner_folds=2, cs=(0.1,), alphas=(1.0,))
    return probe_stage(w.ctx, config, knowledge=w.knowledge)


def _relate(w: World) -> tuple[Any, Run]:
    from analysis.relate import RelateConfig
    from mlake.stages.relate import relate_stage

    return relate_stage(
        w.runs["transfer"].path,
        w.dataset,
        RelateConfig(n_boot=10, n_perm=2, folds=2),
        knowledge_dir=w.runs["knowledge"].path,
        neurons_dir=w.runs["neurons"].path,
        tracing_dir=w.runs["tracing"].path,
        probes_dir=w.runs["probes"].path,
        unit="atp_neuron",
    )


#: Every stage with a stored run, in the order they run (relate reads the others' runs).
STAGES: dict[str, Callable[[World], tuple[Any, Run]]] = {
    "knowledge": _knowledge,
    "transfer": _transfer,
    "tracing": _tracing,
    "neurons": _neurons,
    "probes": _probes,
    "relate": _relate,
}


@pytest.fixture(scope="module")
def world(micro_tiny: Path, mlake_v2411: Any, tmp_path_factory: pytest.TempPathFactory) -> World:
    """Every stage run once into one store, on the micro mlake-tiny's facts in two languages."""
    from mlake.stages.context import StageContext

    meta = read_metadata(micro_tiny)
    assert meta is not None
    pool = [int(f) for f in meta["fact_ids"]]
    root = tmp_path_factory.mktemp("store")
    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    ctx = StageContext(
        adapter, str(micro_tiny), mlake_v2411, tuple(pool), LANGS, get_template("qa"),
        results_dir=root, batch_size=16,
    )  # fmt: skip
    w = World(root=root, ctx=ctx, dataset=mlake_v2411, pool=pool)
    for name, stage in STAGES.items():
        value, run = stage(w)
        w.runs[name] = run
        w.first[name] = (_fingerprint(value), run.path, run.meta)
    return w


def _tree(root: Path) -> dict[str, tuple[int, int, int, int]]:
    """Every file and folder under ``root`` (hidden ones too: locks, temporary files) with
    its inode, size, modification and change times: any write changes one of them (an atomic
    replace the inode, a file created and removed again its folder's times)."""
    out = {}
    for path in (root, *sorted(root.rglob("*"))):
        st = path.lstat()
        out[str(path.relative_to(root))] = (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    return out


@pytest.fixture
def atomic_writes(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Path]]:
    """The paths the store writes from now on (``_atomic_write``, which every save of the
    store and ``write_meta`` go through)."""
    writes: list[Path] = []
    real = store._atomic_write

    def watched(path: Path, write: Callable[[Path], None]) -> None:
        writes.append(path)
        real(path, write)

    monkeypatch.setattr(store, "_atomic_write", watched)
    yield writes


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_complete_run_read_back_writes_nothing(
    world: World, stage: str, atomic_writes: list[Path]
) -> None:
    fingerprint, path, meta = world.first[stage]
    assert meta["status"] == "complete"
    before = _tree(world.root)
    value, run = STAGES[stage](world)
    assert atomic_writes == []
    after = _tree(world.root)
    changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
    assert changed == []
    assert run.path == path
    assert run.meta == meta
    assert _fingerprint(value) == fingerprint


def test_a_transfer_run_read_back_keeps_its_prefixes(world: World) -> None:
    """What the transfer computation recorded (the context prefixes drawn) is in the meta a
    read-back left (the read-back itself draws none)."""
    _, _, meta = world.first["transfer"]
    assert len(meta["context_prefixes"][0]) == 3
    _transfer(world)
    assert world.runs["transfer"].meta["context_prefixes"] == meta["context_prefixes"]
