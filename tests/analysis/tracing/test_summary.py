"""Tracing summaries on synthetic numbers: the signal criterion (the corruption must lower the
answer's probability by at least ``min_total_effect`` of its clean value), the recommended edit
layer read only from languages with signal, and summaries saved before the criterion."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from analysis.tracing.causal import POSITION_CLASSES, TraceConfig
from analysis.tracing.summary import (
    LAST_SUBJECT,
    MIN_TOTAL_EFFECT,
    LanguageSummary,
    TracingResult,
    recommended_layer,
    summarize_language,
    tracing_signal,
)
from mlake_core.errors import ConfigError

N_LAYERS = 4


def _profile(peak_layer: int | None, effect: float = 0.3, noise: float = 0.0) -> np.ndarray:
    """A ``[class, layer]`` MLP profile: ``effect`` at the last subject token at
    ``peak_layer`` (``noise`` elsewhere, largest at the last layer)."""
    rng = np.random.default_rng(0)
    out = noise * rng.random((len(POSITION_CLASSES), N_LAYERS))
    if peak_layer is not None:
        out[LAST_SUBJECT, peak_layer] = effect
    return out


def _language(lang: str, p_clean: list[float], p_corrupt: list[float], profile) -> LanguageSummary:
    return summarize_language(
        lang,
        {"mlp": [profile] * len(p_clean)},
        p_clean,
        p_corrupt,
        N_LAYERS,
    )


def _result(summaries: list[LanguageSummary], **kw) -> TracingResult:
    return TracingResult(
        langs=tuple(s.lang for s in summaries),
        kinds=("mlp",),
        n_layers=N_LAYERS,
        window=1,
        noise_std=0.5,
        summaries=summaries,
        similarity={k: [[1.0] * len(summaries)] * len(summaries) for k in ("mlp", "all")},
        recommended_layer=recommended_layer(summaries, N_LAYERS),
        recommended_by_lang={s.lang: recommended_layer([s], N_LAYERS) for s in summaries},
        counts={},
        skipped={},
        run_path="",
        **kw,
    )


# -- the criterion ---------------------------------------------------------------------------


def test_the_default_threshold_is_a_tenth_of_the_clean_probability() -> None:
    assert MIN_TOTAL_EFFECT == TraceConfig().min_total_effect == 0.1


@pytest.mark.parametrize(
    "n, p_clean, p_corrupt, expected",
    [
        (12, 0.99999, 0.99999, (False, "small_total_effect")),  # corrupts nothing
        (12, 0.99782, 0.94674, (False, "small_total_effect")),  # a 5% drop
        (12, 0.99568, 0.78907, (True, None)),  # a 21% drop
        (12, 0.5, 0.44, (True, None)),  # a 0.06 drop is 12% of 0.5 (relative)
        (12, 0.5, 0.46, (False, "small_total_effect")),  # a 0.04 drop is 8% of 0.5
        (12, 0.9, 0.95, (False, "small_total_effect")),  # corruption raised it
        (0, math.nan, math.nan, (False, "no_facts")),
        (3, 0.0, 0.0, (False, "no_clean_probability")),
    ],
)
def test_tracing_signal(n, p_clean, p_corrupt, expected) -> None:
    assert tracing_signal(n, p_clean, p_corrupt) == expected


def test_the_threshold_is_a_setting() -> None:
    assert tracing_signal(12, 1.0, 0.95, 0.05) == (True, None)
    assert tracing_signal(12, 1.0, 0.95, 0.2) == (False, "small_total_effect")
    # Zero: any drop counts (a corruption that raises p(answer) still does not).
    assert tracing_signal(4, 0.9, 0.86, 0.0) == (True, None)
    assert tracing_signal(4, 0.9, 0.91, 0.0) == (False, "small_total_effect")
    for bad in (-0.1, 1.0, 2):
        with pytest.raises(ConfigError, match="--min-total-effect"):
            TraceConfig(min_total_effect=bad)


def test_the_threshold_stays_out_of_the_run_key_at_its_default() -> None:
    """Runs saved before the setting keep their key; another threshold is its own run."""
    assert "min_total_effect" not in TraceConfig().to_dict()
    assert TraceConfig(min_total_effect=0.2).to_dict()["min_total_effect"] == 0.2


# -- summaries and the recommended layer -----------------------------------------------------


def test_a_language_the_corruption_does_not_move_has_no_signal_and_no_layer() -> None:
    # The maps hold noise with a "peak" at layer 2: nothing is read from it.
    quiet = _language("zh", [1.0, 1.0], [0.99, 1.0], _profile(2, effect=0.001))
    assert quiet.signal is False and quiet.no_signal_reason == "small_total_effect"
    assert quiet.total_effect == pytest.approx(0.005)
    assert quiet.relative_effect == pytest.approx(0.005)
    assert quiet.peak_mlp_layer == 2  # measured, but not read
    assert recommended_layer([quiet], N_LAYERS) is None
    result = _result([quiet])
    assert result.recommended_layer is None and result.recommended_by_lang == {"zh": None}
    assert result.signal_langs == ()


def test_a_language_with_a_real_drop_has_signal_and_its_peak() -> None:
    loud = _language("en", [0.9, 0.8], [0.1, 0.2], _profile(1))
    assert loud.signal is True and loud.no_signal_reason is None
    assert loud.total_effect == pytest.approx(0.7)
    assert loud.peak_mlp_layer == 1 and loud.peak_mlp_effect == pytest.approx(0.3)
    assert recommended_layer([loud], N_LAYERS) == 1


def test_the_recommendation_comes_only_from_languages_with_signal() -> None:
    loud = _language("en", [0.9], [0.1], _profile(1, effect=0.05))
    # A larger (noise) peak elsewhere in a language without signal does not move it.
    quiet = _language("ja", [1.0], [0.98], _profile(2, effect=0.5))
    result = _result([loud, quiet])
    assert result.recommended_layer == 1
    assert result.recommended_by_lang == {"en": 1, "ja": None}
    assert result.signal_langs == ("en",)
    data = result.to_dict()
    assert data["signal"] == {"en": True, "ja": False}
    assert data["min_total_effect"] == MIN_TOTAL_EFFECT
    ja = data["summaries"][1]
    assert (ja["signal"], ja["no_signal_reason"]) == (False, "small_total_effect")
    assert ja["total_effect"] == pytest.approx(0.02)
    assert ja["relative_effect"] == pytest.approx(0.02)


def test_a_stricter_threshold_judges_the_summary() -> None:
    s = summarize_language("de", {"mlp": [_profile(0)]}, [1.0], [0.8], N_LAYERS, 0.25)
    assert s.signal is False
    assert summarize_language("de", {"mlp": [_profile(0)]}, [1.0], [0.8], N_LAYERS).signal


def test_a_summary_built_without_a_verdict_is_judged_with_the_default() -> None:
    s = LanguageSummary("fr", 12, 0.99782, 0.94674, {"mlp": _profile(0)}, 0)
    assert (s.signal, s.no_signal_reason) == (False, "small_total_effect")
    assert LanguageSummary("fr", 0, math.nan, math.nan, {}, None).no_signal_reason == "no_facts"


# -- saved summaries -------------------------------------------------------------------------


def test_the_verdict_survives_saving() -> None:
    result = _result(
        [
            _language("en", [0.9], [0.1], _profile(1)),
            _language("zh", [1.0], [1.0], _profile(2, effect=0.0001)),
        ],
        min_total_effect=0.2,
    )
    loaded = TracingResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert loaded.to_dict() == result.to_dict()
    assert loaded.min_total_effect == 0.2
    assert [s.signal for s in loaded.summaries] == [True, False]
    assert loaded.recommended_layer == 1


def _old_summary(p_corrupt: dict[str, float]) -> dict:
    """A summary.json as tracing saved it before the signal criterion: no verdict, no
    threshold, and a recommendation read from every language."""
    result = _result(
        [_language(lang, [1.0], [p], _profile(0, effect=0.002)) for lang, p in p_corrupt.items()]
    )
    data = result.to_dict()
    for key in ("min_total_effect", "signal"):
        del data[key]
    for s in data["summaries"]:
        for key in ("total_effect", "relative_effect", "signal", "no_signal_reason"):
            del s[key]
    data["recommended_layer"] = 0
    data["recommended_by_lang"] = dict.fromkeys(p_corrupt, 0)
    return data


def test_an_old_summary_without_signal_loads_judged_from_its_probabilities() -> None:
    # mlake-tiny's demo: the corruption leaves p(answer) at 1.00 in zh and ja, 0.95 in fr.
    data = _old_summary({"zh": 0.99999, "ja": 0.99997, "fr": 0.94674})
    loaded = TracingResult.from_dict(data)
    assert [s.signal for s in loaded.summaries] == [False, False, False]
    assert {s.no_signal_reason for s in loaded.summaries} == {"small_total_effect"}
    assert loaded.min_total_effect == MIN_TOTAL_EFFECT
    # The saved recommendation (layer 0, read from blank maps) is recomputed: none.
    assert loaded.recommended_layer is None
    assert loaded.recommended_by_lang == {"zh": None, "ja": None, "fr": None}
    assert loaded.to_dict()["summaries"][0]["total_effect"] == pytest.approx(1e-5)


def test_an_old_summary_with_a_language_with_signal_keeps_its_layer() -> None:
    loaded = TracingResult.from_dict(_old_summary({"de": 0.78907, "zh": 0.99999}))
    assert [s.signal for s in loaded.summaries] == [True, False]
    assert loaded.recommended_layer == 0
    assert loaded.recommended_by_lang == {"de": 0, "zh": None}


def test_an_old_summary_without_probabilities_has_no_signal() -> None:
    data = _old_summary({"en": 0.5})
    data["summaries"][0].update(n_facts=0, p_clean=None, p_corrupt=None)
    loaded = TracingResult.from_dict(data)
    assert loaded.summaries[0].signal is False
    assert loaded.summaries[0].no_signal_reason == "no_facts"
    assert loaded.recommended_layer is None
