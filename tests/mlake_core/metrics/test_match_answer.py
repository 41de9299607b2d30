"""Greedy alias matching (:func:`match_answer`) and small scoring helpers of the knowledge
measures."""

from __future__ import annotations

import math
import random

import pytest

from mlake_core.metrics.knowledge import SequenceScore, _logsumexp, answer_decided, match_answer

CASES = [
    # exact match
    ("Paris", ["Paris"], ["London"], "en", "original"),
    # case folding both ways
    ("paris", ["Paris"], ["London"], "en", "original"),
    ("PARIS is the capital", ["paris"], ["London"], "en", "original"),
    # NFKC / width folding
    ("ＵＳＡ", ["USA"], ["Canada"], "en", "original"),
    ("USA", ["ＵＳＡ"], ["Canada"], "en", "original"),
    ("ﾊﾟﾘ", ["パリ"], ["ロンドン"], "ja", "original"),
    # aliases count
    ("UK", ["United Kingdom", "UK", "Britain"], ["France"], "en", "original"),
    ("Britain, of course", ["United Kingdom", "UK", "Britain"], ["France"], "en", "original"),
    ("the UK", ["United Kingdom", "UK"], ["France"], "en", "none"),
    # word boundary in spaced languages
    ("Parisian", ["Paris"], ["London"], "en", "none"),
    ("Paris, France", ["Paris"], ["London"], "en", "original"),
    ("Paris.", ["Paris"], ["London"], "fr", "original"),
    ("Paris-Nord", ["Paris"], ["London"], "fr", "original"),
    ("Berlins", ["Berlin"], ["London"], "de", "none"),
    ("Berlin 1990", ["Berlin"], ["London"], "de", "original"),
    # the answer must start the generation
    ("It is Paris", ["Paris"], ["London"], "en", "none"),
    # in zh and ja a prefix is enough
    ("巴黎市", ["巴黎"], ["伦敦"], "zh", "original"),
    ("巴黎是法国的首都", ["巴黎"], ["伦敦"], "zh", "original"),
    ("パリです", ["パリ"], ["ロンドン"], "ja", "original"),
    ("Tokyoite", ["Tokyo"], ["Osaka"], "ja", "original"),
    # a CJK form ends at a boundary even in a spaced language
    ("東京都", ["東京"], ["大阪"], "en", "original"),
    # leading spaces, quotes, colons and dashes are ignored
    ("   Paris", ["Paris"], ["London"], "en", "original"),
    ('"Paris"', ["Paris"], ["London"], "en", "original"),
    ("'Paris'", ["Paris"], ["London"], "en", "original"),
    (": Paris", ["Paris"], ["London"], "en", "original"),
    ("：巴黎", ["巴黎"], ["伦敦"], "zh", "original"),
    ("「パリ」", ["パリ"], ["ロンドン"], "ja", "original"),
    ("“Paris”", ["Paris"], ["London"], "en", "original"),
    ("- Paris", ["Paris"], ["London"], "en", "original"),
    # edit target, neither
    ("London", ["Paris"], ["London"], "en", "edit"),
    ("伦敦", ["巴黎"], ["伦敦"], "zh", "edit"),
    ("Rome", ["Paris"], ["London"], "en", "none"),
    ("", ["Paris"], ["London"], "en", "none"),
    ("  \n ", ["Paris"], ["London"], "en", "none"),
]


@pytest.mark.parametrize(("generated", "targets", "edits", "lang", "expected"), CASES)
def test_match_answer(
    generated: str, targets: list[str], edits: list[str], lang: str, expected: str
) -> None:
    assert match_answer(generated, targets, edits, lang) == expected


def test_whitespace_inside_forms_is_collapsed() -> None:
    assert match_answer("New   York City", ["New York"], ["Boston"], "en") == "original"
    assert match_answer("New York", ["New\u00a0 York"], ["Boston"], "en") == "original"


def test_longest_matching_form_decides() -> None:
    # The edit form is longer: "Paris Hilton" beats "Paris".
    assert match_answer("Paris Hilton", ["Paris"], ["Paris Hilton"], "en") == "edit"
    # The original form is longer: "New York City" beats "New York".
    assert match_answer("New York City", ["New York City"], ["New York"], "en") == "original"
    # Longest among aliases of both sides.
    assert match_answer("New York City", ["NYC", "New York City"], ["New York"], "en") == "original"
    # In zh the longer prefix decides as well.
    assert match_answer("北京大学", ["北京"], ["北京大学"], "zh") == "edit"
    assert match_answer("北京大学", ["北京大学"], ["北京"], "zh") == "original"


def test_shorter_form_wins_when_longer_one_breaks_a_word() -> None:
    # "Paris Hilt" matches as a prefix but not at a word boundary, so "Paris" decides.
    assert match_answer("Paris Hiltonian", ["Paris"], ["Paris Hilton"], "en") == "original"


def test_empty_forms_are_ignored() -> None:
    assert match_answer("Rome", [""], ["London"], "en") == "none"
    assert match_answer("Rome", ["Paris"], ["", "   "], "en") == "none"
    assert match_answer("London", ["", " "], ["London"], "en") == "edit"
    assert match_answer("Paris", ["Paris"], [""], "en") == "original"
    assert match_answer("Paris", [], [], "en") == "none"


def test_sequence_score_mean() -> None:
    assert SequenceScore(logp=-3.0, n_tokens=2).mean == -1.5
    assert SequenceScore(logp=-0.5, n_tokens=1).mean == -0.5
    assert math.isnan(SequenceScore(logp=0.0, n_tokens=0).mean)


def test_logsumexp() -> None:
    assert _logsumexp([math.log(1.0), math.log(3.0)]) == pytest.approx(math.log(4.0))
    assert _logsumexp([-2.5]) == pytest.approx(-2.5)
    # Stable for large magnitudes (a naive sum of exp would overflow / underflow).
    assert _logsumexp([1000.0, 1000.0]) == pytest.approx(1000.0 + math.log(2.0))
    assert _logsumexp([-1000.0, -1000.0, -1000.0]) == pytest.approx(-1000.0 + math.log(3.0))
    assert _logsumexp([0.0, -math.inf]) == pytest.approx(0.0)
    assert math.isnan(_logsumexp([]))


@pytest.mark.parametrize(
    ("generated", "forms", "expected"),
    [
        ("", ["Paris"], False),
        ("  ", ["Paris"], False),
        ("Par", ["Paris"], False),  # may still become Paris
        ("Paris", ["Paris"], False),  # the next character decides the word boundary
        ("Paris,", ["Paris"], False),  # the last character is not settled yet
        ("Paris, th", ["Paris"], True),
        ("Parisian", ["Paris"], True),
        ("Berlin", ["Paris", "London"], True),
        ("Lo", ["Paris", "London"], False),
        ("New York is", ["New York", "New York City"], True),
        ("New York Ci", ["New York", "New York City"], False),  # the longer form is open
        ("北京是中", ["北京市", "北京"], True),
        ("北京市", ["北京市", "北京"], False),
        ("cafe", ["café"], False),  # a combining accent may follow the e
        ("cafe\u0301", ["café"], False),
        ("cafe\u0301 au", ["café"], True),
        ("ﾊ", ["パリ"], False),  # half-width ha, then its voicing mark
        ("ﾊﾟﾘで", ["パリ"], False),  # で is not settled yet
        ("ﾊﾟﾘです", ["パリ"], True),
        ("abc\ufffd", ["abcd"], False),  # a token ended inside a character
        ("Rome", [], True),
    ],
)
def test_answer_decided(generated: str, forms: list[str], expected: bool) -> None:
    assert answer_decided(generated, forms) is expected


def _decisions_hold(generated: str, targets: list[str], edits: list[str], lang: str) -> int:
    """Check every prefix that answer_decided calls decided gives the full text's verdict;
    return how many prefixes were decided."""
    full = match_answer(generated, targets, edits, lang)
    decided = 0
    for end in range(len(generated) + 1):
        if answer_decided(generated[:end], [*targets, *edits]):
            decided += 1
            assert match_answer(generated[:end], targets, edits, lang) == full, (generated, end)
    return decided


@pytest.mark.parametrize(("generated", "targets", "edits", "lang", "expected"), CASES)
def test_a_decided_prefix_gives_the_verdict_of_the_whole_text(
    generated: str, targets: list[str], edits: list[str], lang: str, expected: str
) -> None:
    _decisions_hold(generated + " and more text", targets, edits, lang)


def test_decisions_hold_on_random_texts() -> None:
    """Random generations built from pieces of the forms, combining and voicing marks,
    punctuation and spaces: a decided prefix never disagrees with the whole text, and many
    prefixes are decided (the check is not vacuous)."""
    rng = random.Random(0)
    pieces = [
        "Par",
        "is",
        "Paris",
        " ",
        ",",
        "-",
        "ian",
        "New",
        " York",
        " City",
        "巴黎",
        "市",
        "是",
        "ﾊ",
        "ﾟ",
        "ﾘ",
        "パリ",
        "e",
        "\u0301",
        "caf",
        "「",
        "Lon",
        "don",
        "\ufffd",
    ]
    form_pool = [
        "Paris",
        "New York",
        "New York City",
        "巴黎",
        "巴黎市",
        "パリ",
        "café",
        "London",
        "Par",
    ]
    decided = 0
    for _ in range(2000):
        generated = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 8)))
        targets = rng.sample(form_pool, rng.randint(1, 3))
        edits = rng.sample([f for f in form_pool if f not in targets], rng.randint(0, 2))
        decided += _decisions_hold(generated, targets, edits, rng.choice(["en", "zh", "ja"]))
    assert decided > 2000
