"""The where-transfer-fails figure on a built result: one panel per outcome, each cell the
outcome's share with its count, pairs without applicable edits n/a, an unknown method
refused."""

from __future__ import annotations

import matplotlib
import pytest

from analysis.failures import FAILURES, OUTCOMES, TRANSFERRED, FailureResult, FailureSummary
from figures.failures import failure_matrices

matplotlib.use("Agg")

LANGS = ("en", "zh")


def _summary(a: str, b: str) -> FailureSummary:
    counts = dict.fromkeys(OUTCOMES, 0)
    if a == "en":  # en edits: 3 transferred in en; in zh 1 of 4 not enriched, 3 lost
        counts.update({TRANSFERRED: 3} if b == "en" else {FAILURES[0]: 1, FAILURES[2]: 3})
    return FailureSummary("ft", a, b, sum(counts.values()), counts)


def test_failure_matrices() -> None:
    import matplotlib.pyplot as plt

    result = FailureResult(LANGS, 4, 10, [0, 1, 2], [_summary(a, b) for a in LANGS for b in LANGS])
    fig = failure_matrices(result, "ft")
    panels = [ax for ax in fig.axes if ax.get_title()]
    assert [ax.get_title() for ax in panels] == [TRANSFERRED, *FAILURES]
    texts = {ax.get_title(): [t.get_text() for t in ax.texts] for ax in panels}
    assert texts[TRANSFERRED][:4] == ["1.00", "3/3", "0.00", "0/4"]  # en row: en, zh
    assert texts[FAILURES[0]][2:4] == ["0.25", "1/4"]
    assert texts[FAILURES[2]][2:4] == ["0.75", "3/4"]
    assert texts[TRANSFERRED][4:] == ["n/a", "n/a"]  # zh edits: none
    assert "latent layers 0-2 of 4" in fig._suptitle.get_text()
    plt.close(fig)
    with pytest.raises(ValueError, match="rome"):
        failure_matrices(result, "rome")
