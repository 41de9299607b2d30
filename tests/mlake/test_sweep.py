"""The sharing sweep's pure parts: a point's summary from hand-made tables, and the
dose-response correlations."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from analysis.relate import ModelFit
from mlake.sweep import SweepConfig, dose_response, point_summary
from mlake_core.errors import ConfigError


def _overlap() -> pd.DataFrame:
    # en-de within family (Germanic), en-zh across.
    return pd.DataFrame(
        {
            "fact_id": [0, 0, 1, 1, 2],
            "lang_a": ["en", "en", "en", "en", "en"],
            "lang_b": ["de", "zh", "de", "zh", "de"],
            "jaccard": [0.5, 0.0, 0.3, 0.1, float("nan")],
        }
    )


def _transfer() -> pd.DataFrame:
    rows = []
    for fact, (de, zh) in enumerate([(1.0, 0.0), (0.0, 0.0), (1.0, 1.0)]):
        base = {"fact_id": fact, "edit_lang": "en", "form": "question", "n": 1}
        rows.append(
            {
                **base,
                "test_lang": "en",
                "kind": "efficacy",
                "success_greedy": 1.0,
                "success_prob": 1.0,
                "known_before": True,
            }
        )
        rows.append(
            {
                **base,
                "test_lang": "de",
                "kind": "transfer",
                "success_greedy": de,
                "success_prob": de,
                "known_before": True,
            }
        )
        rows.append(
            {
                **base,
                "test_lang": "zh",
                "kind": "transfer",
                "success_greedy": zh,
                "success_prob": zh,
                "known_before": fact != 2,
            }
        )  # fact 2 unknown in zh
        rows.append(
            {
                **base,
                "test_lang": "de",
                "kind": "locality",
                "success_greedy": 0.9,
                "success_prob": math.nan,
                "known_before": True,
            }
        )
    return pd.DataFrame(rows)


def test_point_summary_values() -> None:
    fit = ModelFit(
        "logistic",
        pd.DataFrame(
            [{"term": "overlap", "estimate": 0.7, "ci_low": 0.1, "ci_high": 1.2, "p": 0.02}]
        ),
        10,
        3,
    )
    p = point_summary(0.25, _overlap(), _transfer(), fit, n_boot=200, seed=0)
    assert p["fraction"] == 0.25
    assert p["overlap"] == pytest.approx((0.5 + 0.0 + 0.3 + 0.1) / 4)
    assert p["overlap_n"] == 4
    assert p["overlap_within"] == pytest.approx(0.4)
    assert p["overlap_across"] == pytest.approx(0.05)
    # transfer: de 1,0,1 ; zh 0,0 (fact 2's zh row is unknown before: left out)
    assert p["transfer"] == pytest.approx(2 / 5)
    assert p["transfer_n"] == 5
    assert p["transfer_within"] == pytest.approx(2 / 3)
    assert p["transfer_across"] == pytest.approx(0.0)
    assert p["efficacy"] == pytest.approx(1.0)
    assert p["locality"] == pytest.approx(0.9)
    lo, hi = p["transfer_ci"]
    assert lo <= p["transfer"] <= hi
    assert p["relate_overlap_coef"] == pytest.approx(0.7)
    assert p["relate_overlap_ci"] == [0.1, 1.2]


def test_point_summary_without_a_fit() -> None:
    p = point_summary(0.0, _overlap(), _transfer(), None, n_boot=50, seed=0)
    assert math.isnan(p["relate_overlap_coef"])
    unfitted = ModelFit("logistic", pd.DataFrame(), 3, 3, note="too few events")
    p = point_summary(0.0, _overlap(), _transfer(), unfitted, n_boot=50, seed=0)
    assert math.isnan(p["relate_overlap_coef"])


def test_dose_response_monotone_and_flat() -> None:
    points = [
        {"fraction": 0.0, "overlap": 0.1, "transfer": 0.02},
        {"fraction": 0.25, "overlap": 0.2, "transfer": 0.05},
        {"fraction": 0.5, "overlap": 0.3, "transfer": 0.09},
    ]
    dr = dose_response(points)
    assert dr["n_points"] == 3
    assert dr["fraction_vs_overlap"]["rho"] == pytest.approx(1.0)
    assert dr["overlap_vs_transfer"]["rho"] == pytest.approx(1.0)
    # exact: of the 3! orderings only the identity and the reversal reach |rho| = 1
    assert dr["overlap_vs_transfer"]["p"] == pytest.approx(1 / 3)
    flat = [dict(p, transfer=0.05) for p in points]
    assert math.isnan(dose_response(flat)["fraction_vs_transfer"]["rho"])
    assert math.isnan(dose_response(points[:2])["fraction_vs_overlap"]["rho"])


@pytest.mark.parametrize(
    "fractions",
    [(0.0,), (0.0, 1.5), (0.2, 0.2), ("a", 0.1)],
)
def test_sweep_config_rejects(fractions: tuple) -> None:
    with pytest.raises(ConfigError, match="--fractions"):
        SweepConfig(fractions=fractions)


def test_sweep_config_sorts() -> None:
    assert SweepConfig(fractions=(0.5, 0.0, 0.25)).fractions == (0.0, 0.25, 0.5)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fractions", "x,0.5"], "--fractions"),
        (["--fractions", "0"], "at least two"),
        (["--set", "ft.bogus=1"], "no field 'bogus'"),
        (["--method", "nope"], "nope"),
    ],
)
def test_sweep_cli_bad_options(argv: list[str], message: str, capsys, monkeypatch) -> None:
    import mlake.sweep as sweep
    from mlake.cli import main

    def fail(*args: object, **kwargs: object) -> None:
        raise AssertionError("the sweep must not start on bad options")

    monkeypatch.setattr(sweep, "run_sweep", fail)
    assert main(["sharing-sweep", *argv]) == 2
    assert message in capsys.readouterr().err
