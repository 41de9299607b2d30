"""The other datasets' tables (:func:`analysis.transfer.own_cells`), hand-counted."""

from __future__ import annotations

import math

import pandas as pd

from analysis.transfer import NO_REPHRASE, OWN_CELL_COLUMNS, own_cells
from tests.analysis.transfer_rows import transfer_row


def _row(fact, a, b, kind, form, n, hits, before=math.nan, missing=""):
    return transfer_row(
        fact, a, b, kind, form, n, hits, before=before, missing=missing, known_before=False
    )


def test_own_cells_count_every_edited_fact() -> None:
    rows = []
    for fact in (1, 2, 3):
        rows.append(_row(fact, "en", "en", "efficacy", "question", 1, 1, before=0))
        rows.append(_row(fact, "en", "zh", "transfer", "question", 1, int(fact == 1), before=0))
        rows.append(_row(fact, "en", "zh", "locality", "locality", 1, int(fact != 2), before=1))
        # Fact 3 has no rephrase in zh.
        has = fact != 3
        rows.append(
            _row(
                fact,
                "en",
                "zh",
                "generalization",
                "rephrase",
                int(has),
                int(fact == 2),
                before=int(fact == 2),
                missing="" if has else NO_REPHRASE,
            )
        )
    cells = own_cells(pd.DataFrame(rows), ["en", "zh"])
    assert list(cells.columns) == list(OWN_CELL_COLUMNS)
    at = {(r["measure"], r["edit_lang"], r["test_lang"]): r for r in cells.to_dict("records")}
    rel = at["reliability", "en", "en"]
    assert (rel["pct"], rel["before_pct"], rel["n"], rel["missing"]) == (100.0, 0.0, 3, 0)
    assert at["reliability", "en", "zh"]["pct"] == 33.3
    loc = at["locality", "en", "zh"]
    assert (loc["pct"], loc["before_pct"], loc["hits"]) == (66.7, 100.0, 2)
    gen = at["generalization", "en", "zh"]
    assert (gen["n"], gen["hits"], gen["pct"], gen["before_pct"], gen["missing"]) == (
        2,
        1,
        50.0,
        50.0,
        1,
    )
    # No edits in zh: empty cells, not errors.
    empty = at["reliability", "zh", "en"]
    assert empty["n"] == 0 and math.isnan(empty["pct"]) and empty["edits"] == 0
