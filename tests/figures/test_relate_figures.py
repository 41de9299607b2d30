"""The lens and patching predictors' figure on a built relation result: one panel per
predictor the result has (the neuron overlap first), a point per off-diagonal cell both
matrices define, the pair-level statistics in the title."""

from __future__ import annotations

import matplotlib
import numpy as np
import pandas as pd
import pytest

from analysis.relate_result import RelateResult
from figures.relate import predictors_vs_transfer

matplotlib.use("Agg")

LANGS = ["en", "de", "zh"]


def _matrix(values: list[list[float]]) -> pd.DataFrame:
    return pd.DataFrame(values, index=LANGS, columns=LANGS, dtype=float)


def _result() -> RelateResult:
    nan = float("nan")
    transfer = _matrix([[nan, 0.2, 0.0], [0.1, nan, 0.05], [0.0, nan, nan]])
    predictors = {
        "neuron_jaccard_ig_neuron": _matrix([[1, 0.3, 0.1], [0.3, 1, 0.2], [0.1, 0.2, 1]]),
        "patch_follow_last": _matrix([[1, 0.9, 0.2], [0.5, 1, 0.4], [0.1, 0.3, 1]]),
        "patch_carried": _matrix([[1, 0, 0], [0, 1, 0], [0, 0, 1]]),
        "tracing_similarity_resid": _matrix([[1, 0.5, 0.5], [0.5, 1, 0.5], [0.5, 0.5, 1]]),
    }
    pair_level = pd.DataFrame.from_records(
        [
            {
                "predictor": "neuron_jaccard_ig_neuron",
                "outcome": "transfer",
                "rho": 0.8,
                "p": 0.167,
            },
            {"predictor": "patch_follow_last", "outcome": "transfer", "rho": 1.0, "p": 0.167},
            {"predictor": "patch_carried", "outcome": "transfer", "rho": np.nan, "p": np.nan},
        ]
    )
    return RelateResult(
        config={},
        langs=LANGS,
        inputs={},
        method="ft",
        unit="ig_neuron",
        predictors=predictors,
        outcomes={"transfer": transfer, "gain": transfer},
        pair_level=pair_level,
        fits={},
        n_rows=0,
        n_facts=0,
        dropped={},
        by_pair=pd.DataFrame(),
    )


def test_predictors_vs_transfer() -> None:
    import matplotlib.pyplot as plt

    fig = predictors_vs_transfer(_result())
    titles = [ax.get_title() for ax in fig.axes]
    # the overlap first, then the lens and patching predictors the result has (not tracing)
    assert [t.split("\n")[0] for t in titles] == [
        "neuron_jaccard_ig_neuron",
        "patch_follow_last",
        "patch_carried",
    ]
    assert titles[1].endswith("ρ = 1.00, p = 0.167")
    assert titles[2].endswith("ρ undefined (a constant)")
    # five off-diagonal cells have a transfer rate (zh->de has none); points in percent
    points = np.concatenate([c.get_offsets() for c in fig.axes[1].collections])
    assert sorted(map(tuple, np.round(points, 9).tolist())) == [
        (0.1, 0.0),
        (0.2, 0.0),
        (0.4, 5.0),
        (0.5, 10.0),
        (0.9, 20.0),
    ]
    plt.close(fig)
    with pytest.raises(ValueError, match="outcome 'rank'"):
        predictors_vs_transfer(_result(), "rank")


def test_the_pipeline_draws_it_when_relate_has_the_predictors(monkeypatch) -> None:
    from mlake.pipeline import figures as pipeline_figures

    result = _result()
    monkeypatch.setattr("analysis.relate_result.load_relate_result", lambda path: result)
    manifest = {"stages": {"relate": {"status": "complete", "runs": {"ft": "runs/relate/x"}}}}
    assert "relate_predictors_ft" not in dict(pipeline_figures.figure_makers(manifest))
    result.predictor_fits = {"patch_follow_last": {}}
    maker = dict(pipeline_figures.figure_makers(manifest))["relate_predictors_ft"]
    assert callable(maker)
    assert [ax.get_title().split("\n")[0] for ax in maker().axes][1] == "patch_follow_last"
