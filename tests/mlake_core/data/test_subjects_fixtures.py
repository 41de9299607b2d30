"""Subject spans, cloze prefixes and well-posedness against hand-verified records.

The fixture (tests/fixtures/hand_verified.json) was annotated by reading each record, for 41
facts in all five languages chosen to include the hard cases.  The thresholds below are the
agreement measured when the method was written, minus a small margin: a change that makes
subject location worse fails here.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest

from mlake_core.languages import LANGUAGES
from tests.fixtures.mlake_texts import load_fixture

FIXTURE = Path(__file__).resolve().parents[3] / "tests" / "fixtures" / "hand_verified.json"
RECORDS = load_fixture(FIXTURE)["records"]  # the texts read from ../shared/mlake

# Minimum share of hand-verified subjects whose last character position we reproduce
# (the last subject token is what tracing and ROME use), and exact-span share.
MIN_END_MATCH = {"en": 0.9, "zh": 0.9, "ja": 0.9, "fr": 0.85, "de": 0.9}
MIN_EXACT = {"en": 0.8, "zh": 0.85, "ja": 0.85, "fr": 0.6, "de": 0.7}
MIN_PREFIX_EQUAL = {"en": 0.95, "zh": 0.95, "ja": 0.9, "fr": 0.8, "de": 0.9}
MIN_WELL_POSED_AGREEMENT = {"en": 0.9, "zh": 0.9, "ja": 0.85, "fr": 0.9, "de": 0.85}


def _by_lang():
    out = defaultdict(list)
    for r in RECORDS:
        out[r["lang"]].append(r)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("lang", LANGUAGES)
def test_subject_spans_match_hand_verified(mlake_v2411, lang):
    recs = [r for r in _by_lang()[lang] if r["question_subject"] is not None]
    assert len(recs) >= 20
    end_ok = exact_ok = 0
    misses = []
    for r in recs:
        view = mlake_v2411.facts[r["fact"]].views[lang]
        assert view.record.question == r["question"]
        gold = r["question_subject"]
        gold_end = r["question"].find(gold) + len(gold)
        span = view.question.subject
        if span is not None:
            assert view.question.text[span.start : span.end] == span.text
            end_ok += span.end == gold_end
            exact_ok += span.text == gold
        if span is None or span.text != gold:
            misses.append((r["fact"], gold, span.text if span else None))
    assert end_ok / len(recs) >= MIN_END_MATCH[lang], misses
    assert exact_ok / len(recs) >= MIN_EXACT[lang], misses


@pytest.mark.slow
@pytest.mark.parametrize("lang", LANGUAGES)
def test_cloze_prefix_and_well_posedness_match_hand_verified(mlake_v2411, lang):
    recs = _by_lang()[lang]
    prefix_ok = wp_ok = 0
    for r in recs:
        view = mlake_v2411.facts[r["fact"]].views[lang]
        prefix_ok += view.cloze.text == r["cloze_prefix"]
        wp_ok += view.cloze.usable == r["cloze_well_posed"]
        assert view.prefix_is_question_start == r["prefix_is_question_start"], r["fact"]
        if view.cloze.usable:
            # A usable cloze always has its subject span inside the prefix.
            s = view.cloze.subject
            assert s is not None and view.cloze.text[s.start : s.end] == s.text
    assert prefix_ok / len(recs) >= MIN_PREFIX_EQUAL[lang]
    assert wp_ok / len(recs) >= MIN_WELL_POSED_AGREEMENT[lang]


@pytest.mark.slow
def test_coverage_targets(mlake_v2411):
    """The issue's target: a question-form subject for at least 95% of records per language."""
    for lang in LANGUAGES:
        views = mlake_v2411.views(lang)
        assert len(views) == 1072
        found = sum(v.question.subject is not None for v in views)
        assert found / len(views) >= 0.95, (lang, found)
        # ja answers are never at the end of o_prompt (a documented property of the data).
    assert sum(v.answer_at_end for v in mlake_v2411.views("ja")) == 0


@pytest.mark.slow
def test_subset_load_gives_the_same_views(mlake_v2411):
    """Loading one language must not change its subjects or cloze judgements."""
    from mlake_core.data import load_mlake

    sub = load_mlake(mlake_v2411.root, "v2024-11", "ja")
    assert sub.langs == ("ja",)
    for full, part in zip(mlake_v2411.views("ja"), sub.views("ja"), strict=True):
        assert part.question == full.question
        assert part.cloze == full.cloze
    assert [q.fact_ids for q in sub.multi_hop["ja"]] == [
        q.fact_ids for q in mlake_v2411.multi_hop["ja"]
    ]
