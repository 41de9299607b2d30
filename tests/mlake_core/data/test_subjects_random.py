"""Subject spans against the random samples, each subject written in by hand in all five
languages: tests/fixtures/random_subjects.json (60 facts) and, drawn from the other facts
after the locator's rules were written from the first sample's failures,
tests/fixtures/random_subjects_heldout.json (40 facts); both drawn with recorded seeds by
tests/fixtures/make_random_sample.py.  Unlike the hand-verified hard cases, these samples
measure what a user meets.  The thresholds are the agreement measured when the locator was
last changed (README, "Subjects"), less one record; the end check implies the last-token
check of every tokenizer (same last character, same last token).
"""

from __future__ import annotations

import pytest

from mlake_core.languages import LANGUAGES
from tests.fixtures.make_random_sample import draw, draw_held_out
from tests.fixtures.score_subjects import fixture_records, score

# Records per language whose located span must end where the hand-written one does, and
# whose span must be exactly the hand-written one (or a reading it also accepts).
SAMPLES = {
    "random": (
        draw,
        60,
        {"en": 58, "zh": 59, "ja": 58, "fr": 58, "de": 59},
        {"en": 56, "zh": 59, "ja": 57, "fr": 49, "de": 53},
    ),
    "held-out": (
        draw_held_out,
        40,
        {"en": 39, "zh": 39, "ja": 39, "fr": 39, "de": 38},
        {"en": 34, "zh": 39, "ja": 39, "fr": 38, "de": 34},
    ),
}


@pytest.mark.parametrize("name", SAMPLES)
def test_the_sample_is_what_its_script_draws(name):
    drawer, n, _, _ = SAMPLES[name]
    records = fixture_records(name)
    facts = drawer()
    assert len(facts) == n
    assert sorted({r["fact"] for r in records}) == facts
    assert len(records) == n * len(LANGUAGES)
    for r in records:
        assert r["subject"] != "TODO", r
        for s in r["accepted"]:
            assert s in r["question"], r


def test_the_held_out_facts_are_not_in_the_first_sample():
    assert not set(draw()) & set(draw_held_out())


@pytest.mark.slow
@pytest.mark.parametrize("name", SAMPLES)
def test_subject_spans_match_the_random_samples(mlake_v2411, name):
    _, n, min_end, min_exact = SAMPLES[name]
    result = score(mlake_v2411, fixture_records(name))
    for lang in LANGUAGES:
        row = result[lang]
        assert row["n"] == n
        assert row["end"] >= min_end[lang], (lang, row.get("misses"))
        assert row["exact"] >= min_exact[lang], (lang, row.get("misses"))
