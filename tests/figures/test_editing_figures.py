"""The MLaKE protocol figure: the multiple-choice and multi-hop matrices beside the free-form
one, the values and counts of :func:`analysis.transfer.protocol_cells`."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.transfer import CELL_COLUMNS, PROTOCOL_TABLES
from figures.editing import protocol_matrices

LANGS = ("en", "zh")


def _cells(mcqa: bool = True) -> pd.DataFrame:
    records = []
    for k, (hop, fmt, _) in enumerate(PROTOCOL_TABLES):
        for i, a in enumerate(LANGS):
            for j, b in enumerate(LANGS):
                n = (
                    0
                    if (fmt != "free-form" and not mcqa) or (hop, a, b) == ("multi-hop", "zh", "en")
                    else 4
                )
                pct = 10.0 * k + 25.0 * i + 5.0 * j if n else math.nan
                records.append(
                    {
                        "hop": hop,
                        "format": fmt,
                        "edit_lang": a,
                        "test_lang": b,
                        "pct": pct,
                        "before_pct": 25.0 if n else math.nan,
                        "original_pct": math.nan,
                        "n": n,
                        "chose_edit": round(pct * n / 100) if n else 0,
                        "facts": 2 if n else 0,
                        "missing": 0 if n else 2,
                        "edits": 2,
                    }
                )
    return pd.DataFrame(records, columns=list(CELL_COLUMNS))


def test_six_panels_with_the_cells_values_and_counts() -> None:
    cells = _cells()
    fig = protocol_matrices(cells, LANGS, title="ft")
    panels = [ax for ax in fig.axes if ax.images]
    assert len(panels) == 6
    titles = [ax.get_title() for ax in panels]
    assert titles[0] == "single-hop, free-form"
    assert titles[1] == "single-hop, MC, option text"
    assert titles[5] == "multi-hop, MC, letter"
    for ax, (hop, fmt, _) in zip(panels, PROTOCOL_TABLES, strict=True):
        sel = cells[(cells["hop"] == hop) & (cells["format"] == fmt)]
        want = sel.pivot(index="edit_lang", columns="test_lang", values="pct")
        want = want.reindex(index=list(LANGS), columns=list(LANGS)).to_numpy()
        got = np.ma.filled(ax.images[0].get_array().astype(float), np.nan)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_allclose(got[~np.isnan(got)], want[~np.isnan(want)])
    texts = [t.get_text() for t in panels[0].texts]
    assert any("b25 n=4" in t for t in texts)
    assert any("n/a" in t for t in (t.get_text() for t in panels[3].texts))  # zh -> en


def test_free_form_run_draws_only_free_form_panels() -> None:
    fig = protocol_matrices(_cells(mcqa=False), LANGS)
    assert [ax.get_title() for ax in fig.axes if ax.images] == [
        "single-hop, free-form",
        "multi-hop, free-form",
    ]


def test_no_question_at_all_is_an_error() -> None:
    cells = _cells().assign(n=0)
    with pytest.raises(ValueError, match="no protocol cell has a question"):
        protocol_matrices(cells, LANGS)
