"""The pipeline report's MLaKE-protocol tables of a transfer run: the multi-hop matrix with
its counts always, multiple choice where the run measured it, and the facts without a
question with their reasons."""

from __future__ import annotations

import pandas as pd

from analysis.transfer import NO_MULTI_HOP
from mlake.pipeline.report import _protocol_lines
from tests.analysis.transfer_rows import transfer_row

LANGS = ("en", "zh")


def _row(fact, b, kind, form, n, hits, *, by="", before=0.0, missing=""):
    return transfer_row(fact, "en", b, kind, form, n, hits, by=by, before=before, missing=missing)


def _rows(mcqa: bool) -> pd.DataFrame:
    rows = []
    for fact in (1, 2):
        rows.append(_row(fact, "en", "efficacy", "question", 1, 1))
        rows.append(_row(fact, "zh", "transfer", "question", 1, 0))
    rows.append(_row(1, "zh", "portability", "multi_hop", 3, 2, before=1.0))
    rows.append(_row(2, "zh", "portability", "multi_hop", 0, 0, missing=NO_MULTI_HOP))
    if mcqa:
        for by in ("loglik", "letter"):
            rows.append(_row(1, "zh", "mcqa", "question", 1, 1, by=by))
            rows.append(_row(2, "zh", "mcqa", "question", 1, 0, by=by, before=1.0))
    return pd.DataFrame(rows)


def test_multi_hop_matrix_with_counts_and_missing_reasons() -> None:
    text = "\n".join(_protocol_lines(_rows(mcqa=False), LANGS))
    assert "multi-hop, free-form" in text
    assert (
        "| **en** | – | 66.7 (b 33.3; n 3 in 1 of 2 facts) |" in text
    )  # 2 of 3 questions; 1 of 3 before
    assert f"multi-hop [zh] {NO_MULTI_HOP}: 1" in text
    assert "Multiple choice: not measured" in text
    assert "mcqa-loglik" not in text


def test_multiple_choice_tables_where_measured() -> None:
    text = "\n".join(_protocol_lines(_rows(mcqa=True), LANGS))
    assert "single-hop, mcqa-loglik" in text and "single-hop, mcqa-letter" in text
    assert "| **en** | – | 50.0 (b 50.0; n 2 in 2 of 2 facts) |" in text
    assert "not measured" not in text
