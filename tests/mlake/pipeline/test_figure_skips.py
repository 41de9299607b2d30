"""A figure that has nothing to draw on a small run is skipped with its reason, not an
error that stops the pipeline (the Gemma demo on 3 facts: no language pair with both an
overlap and a transfer rate)."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd

from mlake.pipeline import figures as pipeline_figures


def test_sharing_vs_transfer_without_pairs_is_skipped(monkeypatch) -> None:
    manifest = {"stages": {"relate": {"status": "complete", "runs": {"rome": "runs/relate/x"}}}}
    empty = SimpleNamespace(by_pair=pd.DataFrame(), interventions=None, predictor_fits={})
    monkeypatch.setattr("analysis.relate_result.load_relate_result", lambda path: empty)
    makers = dict(pipeline_figures.figure_makers(manifest))
    reason = makers["sharing_vs_transfer_rome"]
    assert isinstance(reason, str) and "no language pair" in reason
    with_pairs = SimpleNamespace(
        by_pair=pd.DataFrame({"overlap": [0.1]}), interventions=None, predictor_fits={}
    )
    monkeypatch.setattr("analysis.relate_result.load_relate_result", lambda path: with_pairs)
    assert callable(dict(pipeline_figures.figure_makers(manifest))["sharing_vs_transfer_rome"])
