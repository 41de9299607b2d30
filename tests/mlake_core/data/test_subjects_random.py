"""Subject spans against the random sample (tests/fixtures/random_subjects.json): 60 facts
drawn with a recorded seed (tests/fixtures/make_random_sample.py), each subject written in by
hand in all five languages.  Unlike the hand-verified hard cases, this sample measures what a
user meets.  The thresholds are the agreement measured when the locator was last changed
(README, "Subjects"), less one record; the end check implies the last-token check of every
tokenizer (same last character, same last token).
"""

from __future__ import annotations

import pytest

from mlake_core.languages import LANGUAGES
from tests.fixtures.score_subjects import fixture_records, score

RECORDS = fixture_records("random")
# Records (of 60 per language) whose located span must end where the hand-written one does,
# and whose span must be exactly the hand-written one.
MIN_END = {"en": 58, "zh": 59, "ja": 59, "fr": 58, "de": 59}
MIN_EXACT = {"en": 56, "zh": 59, "ja": 58, "fr": 49, "de": 53}


def test_the_sample_is_what_its_script_draws():
    from tests.fixtures.make_random_sample import N_FACTS, draw

    facts = draw()
    assert len(facts) == N_FACTS == 60
    assert sorted({r["fact"] for r in RECORDS}) == facts
    assert len(RECORDS) == 60 * len(LANGUAGES)
    for r in RECORDS:
        assert r["subject"] != "TODO", r
        for s in r["accepted"]:
            assert s in r["question"], r


@pytest.mark.slow
def test_subject_spans_match_the_random_sample(mlake_v2411):
    result = score(mlake_v2411, RECORDS)
    for lang in LANGUAGES:
        row = result[lang]
        assert row["n"] == 60
        assert row["end"] >= MIN_END[lang], (lang, row.get("misses"))
        assert row["exact"] >= MIN_EXACT[lang], (lang, row.get("misses"))
