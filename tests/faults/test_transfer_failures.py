"""An edit whose optimisation diverged (non-finite loss or weight change) is counted and
reported as failed, never evaluated or stored as a result; the run goes on with the next
edit."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mlake.stages.transfer import edit_failure
from mlake_core.editing import EditResult
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template


def test_edit_failure_names_the_reason() -> None:
    ok = EditResult("ft", (), {"w": torch.zeros(2)}, loss=0.3)
    assert edit_failure(ok) is None
    assert edit_failure(EditResult("ike", (), prefix="New fact: ...")) is None  # no loss
    assert edit_failure(dataclasses.replace(ok, loss=math.nan)) == "its loss is nan"
    assert edit_failure(dataclasses.replace(ok, loss=math.inf)) == "its loss is inf"
    bad = dataclasses.replace(ok, deltas={"w": torch.tensor([0.0, math.nan])})
    assert edit_failure(bad) == "non-finite change of w"


@pytest.mark.slow
def test_a_diverged_edit_is_counted_not_stored(
    micro_tiny: Path, mlake_v2411, tmp_path: Path, monkeypatch
) -> None:
    import mlake_core.editing as editing
    from analysis.transfer import TransferConfig
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.ft import FtConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    ids = list(meta["fact_ids"][:2])
    said: list[str] = []
    ctx = StageContext(
        adapter,
        str(micro_tiny),
        mlake_v2411,
        tuple(ids),
        ("en",),
        get_template("qa"),
        results_dir=tmp_path,
        log=said.append,
    )
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    real = editing.get_method("ft")

    def diverging(adapter, requests, config, context):
        result = real.fn(adapter, requests, config, context)
        if requests[0].fact_id == ids[0]:
            return dataclasses.replace(result, loss=math.nan)
        return result

    monkeypatch.setattr(editing, "get_method", lambda name: dataclasses.replace(real, fn=diverging))
    rows, run = transfer_stage(
        ctx,
        "ft",
        FtConfig(layer=0, steps=2),
        TransferConfig(n_locality=1),
        knowledge=knowledge,
        locality_pool=list(meta["fact_ids"]),
        corpus=[],
    )
    assert set(rows["fact_id"]) == {ids[1]}  # the diverged edit has no rows
    assert run.meta["skipped"] == {"en:NonFiniteEdit": 1}
    assert any(f"fact {ids[0]} [en] failed: its loss is nan" in line for line in said)


@pytest.mark.slow
def test_restricted_edits_with_no_unit_at_the_layer_are_skipped(
    micro_tiny: Path, mlake_v2411, tmp_path: Path
) -> None:
    """Restricted FT whose unit set has no neuron at the edited layer would change nothing:
    those languages are skipped, counted and reported; the others run."""
    from analysis.transfer import TransferConfig
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.transfer import empty_unit_sets, transfer_stage
    from mlake_core.editing.ft import FtConfig
    from mlake_core.metrics.knowledge import KnowledgeConfig

    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    width = adapter.d_mlp
    # en's specific neurons are at layer 1 only; zh's at layer 0 (the edited layer).
    sets = {"en": [width + 3], "zh": [5, 7], "shared": []}
    config = FtConfig(layer=0, steps=2, units="specific")
    assert empty_unit_sets(adapter, config, sets, ["en", "zh", "ja"]) == {
        "en": "the 'en' unit set has no neuron at layer 0 (units=specific)",
        "ja": "there is no 'ja' unit set (units=specific)",
    }
    assert empty_unit_sets(adapter, FtConfig(layer=0), sets, ["en"]) == {}
    said: list[str] = []
    ids = list(meta["fact_ids"][:1])
    ctx = StageContext(
        adapter,
        str(micro_tiny),
        mlake_v2411,
        tuple(ids),
        ("en", "zh"),
        get_template("qa"),
        results_dir=tmp_path,
        log=said.append,
    )
    knowledge, _ = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    rows, run = transfer_stage(
        ctx,
        "ft",
        config,
        TransferConfig(n_locality=1),
        knowledge=knowledge,
        locality_pool=list(meta["fact_ids"]),
        corpus=[],
        unit_sets=sets,
    )
    assert set(rows["edit_lang"]) == {"zh"}
    assert run.meta["skipped"] == {"en:EmptyUnitSet": 1}
    assert any("ft edits in en: the 'en' unit set has no neuron" in line for line in said)
