"""The latent-language lens figure on a built result: one panel per prompt language with its
facts counted in the title, one line per answer language holding the saved mean
probabilities, the prompt language's own line drawn thick, the latent English curve only where
there is one, and a panel without facts that says so."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from analysis.lens import POSITIONS, LensResult, LensSummary
from figures.lens import LATENT_LABEL, OWN_WIDTH, answer_probabilities
from figures.style import missing_glyphs

matplotlib.use("Agg")

LANGS = ("en", "zh", "fr")
N_LAYERS = 4


def _summary(lang: str, n_facts: int, offset: float) -> LensSummary:
    empty = n_facts == 0
    probs = {
        pos: []
        if empty
        else [[round(offset + 0.1 * layer + 0.01 * j + 0.001 * i, 6) for j in range(3)]
              for layer in range(N_LAYERS)]
        for i, pos in enumerate(POSITIONS)
    }  # fmt: skip
    return LensSummary(
        lang=lang,
        n_facts=n_facts,
        answer_langs=list(LANGS),
        mean_prob=probs,
        decodable=probs,
        emergence=[] if empty else [2] * n_facts,
        never=0,
        first_language={} if empty else {lang: n_facts},
        latent_english=[] if lang == "en" or empty else [0.05, 0.2, 0.1, 0.02],
        n_english_distinct=0 if lang == "en" or empty else n_facts - 1,
    )


def _result() -> LensResult:
    return LensResult(
        langs=LANGS,
        n_layers=N_LAYERS,
        top_k=10,
        summaries=[_summary("en", 3, 0.0), _summary("zh", 2, 0.3), _summary("fr", 0, 0.0)],
        skipped={"fr:not known before": 4},
        run_path="",
    )


def _lines(ax) -> dict[str, list]:
    return {line.get_label(): line for line in ax.get_lines()}


def test_one_panel_per_prompt_language_with_its_lines() -> None:
    result = _result()
    fig = answer_probabilities(result, "last")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "en prompts (n=3)",
        "zh prompts (n=2)",
        "fr prompts (n=0)",
    ]
    for ax, s in zip(panels[:2], result.summaries[:2], strict=True):
        lines = _lines(ax)
        for j, lang in enumerate(LANGS):
            line = lines[f"{lang} answer"]
            np.testing.assert_allclose(line.get_ydata(), np.array(s.mean_prob["last"])[:, j])
            np.testing.assert_array_equal(line.get_xdata(), np.arange(N_LAYERS))
            # The prompt language's own answer is the thick line.
            assert (line.get_linewidth() == OWN_WIDTH) == (lang == s.lang)
    # Latent English: zh only (English prompts have none; fr has no fact).
    assert LATENT_LABEL not in _lines(panels[0])
    np.testing.assert_allclose(_lines(panels[1])[LATENT_LABEL].get_ydata(), [0.05, 0.2, 0.1, 0.02])
    assert "latent English: n=1" in [t.get_text() for t in panels[1].texts]
    assert not panels[2].get_lines()
    assert panels[2].texts[0].get_text() == "no fact\nlooked at"
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:3] == ["en answer", "zh answer", "fr answer"] and LATENT_LABEL in legend
    text = "".join(t.get_text() for ax in fig.axes for t in [ax.title, *ax.texts])
    assert not missing_glyphs(text + fig.get_suptitle())


def test_the_subject_position_reads_its_own_rows() -> None:
    result = _result()
    fig = answer_probabilities(result, "subject_last")
    zh = _lines(fig.axes[1])
    np.testing.assert_allclose(
        zh["zh answer"].get_ydata(), np.array(result.summaries[1].mean_prob["subject_last"])[:, 1]
    )
    assert LATENT_LABEL not in zh  # the latent English curve is read at the last position
    assert "subject's last token" in fig.get_suptitle()
    with pytest.raises(ValueError, match="position 'first'"):
        answer_probabilities(result, "first")


def test_one_language_only() -> None:
    fig = answer_probabilities(_result(), langs=["zh"])
    assert [ax.get_title() for ax in fig.axes] == ["zh prompts (n=2)"]
