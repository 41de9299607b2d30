"""The report's knowledge table: counts as integers, and "not measurable" (never a count or
"nan") for a language whose dataset gives no original answers."""

import math

import pandas as pd

from mlake.pipeline.report import knowledge_rows


def test_counts_print_as_integers():
    summary = pd.DataFrame(
        [{"lang": "en", "facts": 110, "known": 109.0, "greedy": 0.99, "measurable": True}]
    )
    assert knowledge_rows(summary) == [["en", 110, "109", "99.0", "–"]]


def test_no_original_answers_is_not_measurable():
    summary = pd.DataFrame(
        [
            {"lang": "en", "facts": 5, "known": math.nan, "greedy": math.nan, "measurable": False},
            {"lang": "zh", "facts": 5, "known": 2, "greedy": 0.4, "cloze_greedy": 0.2},
        ]
    )
    rows = knowledge_rows(summary)
    assert rows[0] == ["en", 5, "not measurable", "–", "–"]
    assert rows[1] == ["zh", 5, "2", "40.0", "20.0"]
    assert all("nan" not in str(cell) for row in rows for cell in row)
