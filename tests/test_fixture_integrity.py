"""Integrity checks for the hand-verified MLaKE fixture (tests/fixtures/hand_verified.json).

The fixture holds subject spans and cloze prefixes annotated by hand, so that span-finding code
can be checked against an independent reference.  These tests only check that the fixture is
self-consistent and still matches the dataset it was annotated on; they do not check the spans'
linguistic correctness.

The fixture stores annotations only; each record's texts are read from the data
(``$MLAKE_DATA`` if set, else ``../shared/mlake`` next to the repository root;
tests/fixtures/mlake_texts.py).  The checks that need the texts are skipped when the data is
absent.
"""

from __future__ import annotations

from collections import defaultdict
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from tests.fixtures.mlake_texts import TEXT_FIELDS, load_fixture, read_annotations

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = REPO_ROOT / "tests" / "fixtures" / "hand_verified.json"
LANGS = ("en", "zh", "ja", "fr", "de")
MIN_FACTS = 20
REASONS = {
    "answer_not_found",
    "empty_prefix",
    "subject_not_in_prefix",
    "prefix_ends_at_subject",
    "predicate_after_answer",
}
#: The fields a record stores (its MLaKE texts are read from the data: tests/fixtures/mlake_texts.py).
FIELDS = {
    "fact",
    "lang",
    "question_subject",
    "cloze_subject",
    "cloze_prefix_chars",
    "answer_at_end",
    "cloze_well_posed",
    "cloze_reason",
    "prefix_is_question_start",
}


@cache
def fixture() -> dict[str, Any]:
    """The fixture with its records' MLaKE texts read from the data."""
    try:
        return load_fixture(FIXTURE)
    except FileNotFoundError as err:
        pytest.skip(str(err))


def stored() -> dict[str, Any]:
    """The fixture as stored: annotations only."""
    return read_annotations(FIXTURE)


def records() -> list[dict[str, Any]]:
    return fixture()["records"]


def record_id(rec: dict[str, Any]) -> str:
    return f"{rec['fact']}-{rec['lang']}"


def test_top_level_shape() -> None:
    fx = fixture()
    assert fx["version"] == "v2024-11"
    assert isinstance(fx["conventions"], str) and fx["conventions"].strip()
    assert isinstance(fx["records"], list) and fx["records"]


def test_record_fields() -> None:
    bad = []
    for rec in stored()["records"]:
        missing = FIELDS - rec.keys()
        extra = rec.keys() - FIELDS - {"note"}
        if missing or extra or rec["lang"] not in LANGS:
            bad.append((record_id(rec), sorted(missing), sorted(extra)))
    assert not bad


def test_all_languages_for_every_fact_and_enough_facts() -> None:
    langs_by_fact: dict[int, list[str]] = defaultdict(list)
    for rec in records():
        langs_by_fact[rec["fact"]].append(rec["lang"])
    incomplete = {f: ls for f, ls in langs_by_fact.items() if sorted(ls) != sorted(LANGS)}
    assert not incomplete, f"facts without exactly one record per language: {incomplete}"
    assert len(langs_by_fact) >= MIN_FACTS


def test_subjects_are_substrings() -> None:
    bad = []
    for rec in records():
        for field, text in (("question_subject", "question"), ("cloze_subject", "o_prompt")):
            span = rec[field]
            if span is not None and (not span or span not in rec[text]):
                bad.append((record_id(rec), field, span))
    assert not bad


def test_cloze_prefix_is_prefix_of_o_prompt() -> None:
    bad = []
    for rec in records():
        prefix = rec["cloze_prefix"]
        if prefix is None:
            continue
        if not rec["o_prompt"].startswith(prefix) or prefix != prefix.rstrip():
            bad.append((record_id(rec), prefix))
    assert not bad


def test_well_posed_and_reason_agree() -> None:
    bad = []
    for rec in records():
        prefix, reason = rec["cloze_prefix"], rec["cloze_reason"]
        if rec["cloze_well_posed"]:
            ok = reason is None and prefix is not None and rec["cloze_subject"] is not None
            ok = ok and rec["cloze_subject"] in prefix
        else:
            ok = reason in REASONS and (prefix is None) == (reason == "answer_not_found")
        if prefix is None:
            ok = ok and rec["answer_at_end"] is None
        else:
            ok = ok and isinstance(rec["answer_at_end"], bool)
        if not ok:
            bad.append(record_id(rec))
    assert not bad


def test_prefix_is_question_start_flag() -> None:
    bad = []
    for rec in records():
        prefix = rec["cloze_prefix"]
        expected = bool(prefix) and rec["question"].startswith(prefix)
        if rec["prefix_is_question_start"] != expected:
            bad.append(record_id(rec))
    assert not bad


def test_no_mlake_text_is_stored() -> None:
    """The fixture stores annotations only; MLaKE's texts stay in ../shared/mlake."""
    bad = [
        record_id(rec)
        for rec in stored()["records"]
        if set(TEXT_FIELDS) & rec.keys() or "cloze_prefix" in rec
    ]
    assert not bad


def test_every_record_is_in_the_data() -> None:
    """Every annotated fact is in the release (load_fixture raises for one that is not) and
    its texts come from there."""
    assert [(r["fact"], r["lang"]) for r in records()] == [
        (r["fact"], r["lang"]) for r in stored()["records"]
    ]
