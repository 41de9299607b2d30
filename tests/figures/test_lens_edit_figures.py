"""The lens-before-and-after-an-edit figure on a built result: one panel per test language,
titled with its edits and successes, four curves holding the saved means (new and old answer,
before dashed and after solid), a panel without edits that says so, and bad arguments
refused."""

from __future__ import annotations

import matplotlib
import numpy as np
import pytest

from analysis.lens import EDIT_CURVES, POSITIONS, EditLensResult, EditLensSummary
from figures.lens import edit_curves
from figures.style import missing_glyphs

matplotlib.use("Agg")

LANGS = ("en", "zh", "fr")
N_LAYERS = 4


def _pair(a: str, b: str, n: int) -> EditLensSummary:
    curves = {
        pos: {
            f"{k}_{p}": [] if not n else [round(0.1 * layer + 0.01 * i + 0.001 * c, 6)
                                          for layer in range(N_LAYERS)]
            for c, (k, p) in enumerate(EDIT_CURVES)
        }
        for i, pos in enumerate(POSITIONS)
    }  # fmt: skip
    return EditLensSummary(
        edit_lang=a,
        test_lang=b,
        n_edits=n,
        n_success=n // 2,
        n_known_before=n,
        mean_prob=curves,
        decodable=curves,
        emergence=[2] * (n // 2),
        never=n - n // 2,
        first_language={b: n // 2} if n else {},
        other_form_first=0,
    )


def _result() -> EditLensResult:
    counts = {"en": 4, "zh": 3, "fr": 0}
    return EditLensResult(
        langs=LANGS,
        method="ft",
        n_layers=N_LAYERS,
        top_k=10,
        lens="logit",
        pairs={a: {b: _pair(a, b, counts[b]) for b in LANGS} for a in LANGS},
        edits={a: [1, 2, 3, 4] for a in LANGS},
        skipped={},
        run_path="",
    )


def test_one_panel_per_test_language_with_the_saved_curves() -> None:
    result = _result()
    fig = edit_curves(result, "en", "last")
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in panels] == [
        "read in en: 2/4 succeed",
        "read in zh: 1/3 succeed",
        "read in fr: 0/0 succeed",
    ]
    for ax, b in zip(panels[:2], ("en", "zh"), strict=True):
        lines = {line.get_label(): line for line in ax.get_lines()}
        assert len(lines) == 4
        saved = result.pair("en", b).mean_prob["last"]
        np.testing.assert_allclose(
            lines["new answer, after the edit"].get_ydata(), saved["new_after"]
        )
        np.testing.assert_allclose(lines["old answer, before"].get_ydata(), saved["old_before"])
        assert lines["new answer, before"].get_linestyle() == "--"
        assert lines["new answer, after the edit"].get_linestyle() == "-"
    assert not panels[2].get_lines() and panels[2].texts[0].get_text() == "no edit\nread here"
    assert "ft edits in en (n=4)" in fig.get_suptitle()
    text = "".join(t.get_text() for ax in fig.axes for t in [ax.title, *ax.texts])
    assert not missing_glyphs(text + fig.get_suptitle())
    sub = edit_curves(result, "zh", "subject_last", langs=["zh"])
    (line,) = [x for x in sub.axes[0].get_lines() if x.get_label() == "old answer, after the edit"]
    np.testing.assert_allclose(
        line.get_ydata(), result.pair("zh", "zh").mean_prob["subject_last"]["old_after"]
    )


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="position 'first'"):
        edit_curves(_result(), "en", "first")
    with pytest.raises(ValueError, match="edit language 'xx'"):
        edit_curves(_result(), "xx")
