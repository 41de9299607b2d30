"""Reading back a complete run writes nothing (a read-only results folder can be read, and
nothing recorded is overwritten): the knowledge and transfer stages run twice on the same
store; the second time no file is written and the meta keeps what the computation
recorded."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from mlake_core.results import store

pytestmark = pytest.mark.slow


def test_a_complete_run_read_back_writes_nothing(
    micro_tiny: Path, mlake_v2411, tmp_path: Path, monkeypatch
) -> None:
    from analysis.transfer import TransferConfig
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.rome import RomeConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    ids = list(meta["fact_ids"][:1])
    ctx = StageContext(
        adapter,
        str(micro_tiny),
        mlake_v2411,
        tuple(ids),
        ("en", "zh"),
        get_template("qa"),
        results_dir=tmp_path,
    )

    def both() -> tuple:
        knowledge, krun = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
        _, trun = transfer_stage(
            ctx,
            "rome",
            RomeConfig(layer=0, steps=2, contexts="2x3"),
            TransferConfig(n_locality=1),
            knowledge=knowledge,
            locality_pool=list(meta["fact_ids"]),
            corpus=[v.record.question for v in mlake_v2411.views("en")[:40]],
        )
        return krun, trun

    krun, trun = both()
    recorded = trun.meta
    assert len(recorded["context_prefixes"][0]) == 3
    writes: list[Path] = []
    real = store._atomic_write

    def watched(path: Path, write) -> None:
        writes.append(path)
        real(path, write)

    monkeypatch.setattr(store, "_atomic_write", watched)
    krun2, trun2 = both()
    assert (krun2.path, trun2.path) == (krun.path, trun.path)
    assert writes == []
    assert trun2.meta == recorded
