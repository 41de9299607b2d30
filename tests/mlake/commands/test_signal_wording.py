"""What the commands print where an analysis has no signal, on synthetic results: ``mlake
trace`` (and the tracing stage's last log line) reports a language without signal with its
numbers instead of peaks, and takes the recommended edit layer from the languages with signal
or gives none; ``mlake neurons`` says when an attribution's sets are indistinguishable from
random sets; ``mlake probe`` marks the probes not above their control or chance."""

from __future__ import annotations

import numpy as np

from analysis.tracing.causal import POSITION_CLASSES
from analysis.tracing.summary import (
    LAST_SUBJECT,
    TracingResult,
    recommended_layer,
    summarize_language,
)
from mlake.commands.trace import format_report
from mlake.stages.tracing import recommendation_line

N_LAYERS = 3


def _summary(lang: str, p_clean: float, p_corrupt: float, peak: int, effect: float):
    profile = np.zeros((len(POSITION_CLASSES), N_LAYERS))
    profile[LAST_SUBJECT, peak] = effect
    return summarize_language(
        lang, {"mlp": [profile], "attn": [profile]}, [p_clean], [p_corrupt], N_LAYERS
    )


def _result(*summaries) -> TracingResult:
    n = len(summaries)
    return TracingResult(
        langs=tuple(s.lang for s in summaries),
        kinds=("mlp", "attn"),
        n_layers=N_LAYERS,
        window=1,
        noise_std=0.2,
        summaries=list(summaries),
        similarity={"all": np.eye(n).tolist()},
        recommended_layer=recommended_layer(summaries, N_LAYERS),
        recommended_by_lang={s.lang: recommended_layer([s], N_LAYERS) for s in summaries},
        counts={},
        skipped={},
        run_path="runs/x",
    )


def test_no_signal_anywhere_is_said_with_the_numbers_and_no_layer() -> None:
    result = _result(
        _summary("zh", 0.99999, 0.99999, 0, 0.00001),
        _summary("fr", 0.99782, 0.94674, 1, 0.0023),
    )
    text = format_report(result, "mlake-tiny", 12)
    assert (
        "  zh: tracing has no signal on this model and language: the corruption leaves "
        "p(answer) near its clean value (p_clean 1.00, p_corrupt 1.00, a drop of 0.0% of "
        "p_clean, under 10%)"
    ) in text
    assert "p_clean 1.00, p_corrupt 0.95, a drop of 5.1% of p_clean, under 10%" in text
    # No peak, no effect row, no layer read from the blank maps.
    assert "  zh       1     1.00       1.00     0.0      no      -  -" in text
    assert "  fr    (no signal)" in text
    assert "(zh, fr: no signal; their profiles are noise" in text
    assert "recommended edit layer: none: tracing has no signal on this model" in text
    assert "recommended edit layer: 0" not in text
    line = recommendation_line(result)
    assert line.startswith("tracing: no recommended edit layer: no language has signal")
    assert "zh (p_clean 1.00, p_corrupt 1.00)" in line and "documented default" in line


def test_the_layer_comes_from_the_languages_with_signal() -> None:
    result = _result(
        _summary("de", 0.99568, 0.78907, 1, 0.05),
        _summary("ja", 0.99999, 0.99997, 2, 0.4),  # a larger peak, but no signal
    )
    text = format_report(result, "m", 2)
    assert "  de       1     1.00       0.79    20.8     yes      1  5.0 (24%)" in text
    assert "  ja       1     1.00       1.00     0.0      no      -  -" in text
    assert (
        "recommended edit layer: 1, from the languages with signal (de; per language: de 1, "
        "ja - (no signal))"
    ) in text
    assert recommendation_line(result) == (
        "tracing: recommended edit layer 1, from de; no signal in ja (p_clean 1.00, p_corrupt 1.00)"
    )


def test_neurons_says_when_the_sets_are_indistinguishable_from_random() -> None:
    from analysis.neurons.config import NeuronResult
    from mlake.commands.neurons import format_report as neurons_report
    from tests.analysis.neurons.test_check_signal import method

    quiet = method({"n": 36, "drop": 0.143, "drop_random": 0.120, "wilcoxon_p": 0.216,
                    "fraction_above_random": 0.56})  # fmt: skip
    loud = method(
        {"n": 51, "drop": 0.033, "drop_random": 0.0, "wilcoxon_p": 2e-9,
         "fraction_above_random": 0.94},
        "ig",
        "neuron",
    )  # fmt: skip
    result = NeuronResult(
        langs=("en", "zh"), n_layers=1, methods=[loud, quiet], skipped={}, run_path="runs/n"
    )
    text = neurons_report(result, "m", 3)
    ig, atp = text.split("== atp (heads)")
    assert "The attributed sets hurt the answer more than random sets do." in ig
    assert "No signal" not in ig
    assert (
        "  No signal: the attribution's sets are indistinguishable from random sets of the same "
        "sizes (they lower the answer's probability a little more than random sets on average, "
        "but not reliably: Wilcoxon p >= 0.05)."
    ) in atp


def test_probe_marks_the_probes_without_signal() -> None:
    import dataclasses

    from mlake.commands.probe import SIGNAL_NOTE
    from mlake.commands.probe import format_report as probe_report
    from probes.config import ProbeResult
    from probes.crosslingual import transfer_table
    from probes.language_id import language_id_table
    from probes.similarity import similarity_table
    from tests.probes.helpers import FAST, LANGS, planted

    config = dataclasses.replace(FAST, cs=(0.1,))
    acts, classes = planted(per_class=12)  # layer 0: noise; layer 1: language, answer, fact
    result = ProbeResult(
        langs=LANGS,
        sites=acts.sites,
        positions=acts.positions,
        language_id=language_id_table(acts, config),
        transfer=transfer_table(acts, classes, config),
        similarity=similarity_table(acts),
        counts={lang: {"facts": 48, "usable": 48, "probed": 48} for lang in LANGS},
        config=config.to_dict(),
    )
    text = probe_report(result, "m", 48)
    lid = text.split("language identity per layer")[1].split("\n")
    # Layer 0 holds only noise, layer 1 the language.
    assert lid[2].rstrip().endswith("no") and lid[3].rstrip().endswith("yes")
    assert SIGNAL_NOTE in text
    rows = text.split("cross-lingual answer probe: mean over")[1].split("\n")
    assert rows[2].rstrip().endswith("no") and rows[3].rstrip().endswith("yes")
