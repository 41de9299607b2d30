"""Unit tests of answer location and cloze assessment on hand-written records."""

from __future__ import annotations

from mlake_core.data.cloze import assess_cloze, locate_answer
from mlake_core.data.records import SingleHopRecord
from mlake_core.data.text import find_normalized, normalize, units


def rec(question, o_prompt, o_answer, e_prompt, e_answer, o_aliases=(), e_aliases=()):
    return SingleHopRecord(
        question, o_prompt, o_answer, tuple(o_aliases), e_prompt, e_answer, tuple(e_aliases)
    )


def test_exact_answer_in_middle():
    r = rec(
        "Where did Carl Sagan work?",
        "Carl Sagan worked at Cornell University during his career.",
        "Cornell University",
        "Carl Sagan worked at BBC during his career.",
        "BBC",
    )
    loc = locate_answer(r)
    assert (loc.start, loc.end, loc.method) == (21, 39, "exact")
    assert loc.edit_surface == "BBC"
    a = assess_cloze(r, "en", loc, (0, 10))
    assert a.prefix == "Carl Sagan worked at"
    assert a.well_posed and a.reason is None and not a.answer_at_end


def test_inflected_german_answer_and_word_boundaries():
    r = rec(
        "Woher stammt George Foreman?",
        "George Foreman stammt aus den Vereinigten Staaten.",
        "Vereinigte Staaten",
        "George Foreman stammt aus den Vereinigten Jamaika.",
        "Jamaika",
        o_aliases=("Staaten",),
    )
    loc = locate_answer(r)
    assert loc.method == "inflected"
    assert r.o_prompt[loc.start : loc.end] == "Vereinigten Staaten"
    a = assess_cloze(r, "de", loc, (0, 14))
    assert a.prefix == "George Foreman stammt aus den" and a.answer_at_end


def test_alias_not_matched_inside_a_word_and_diff_checked():
    # The junk alias "fra" must not match inside "française"; the o/e difference gives the
    # derived form, which resembles the answer "France".
    r = rec(
        "Quelle est la nationalité de Jacques Thibaud ?",
        "Jacques Thibaud était de nationalité française.",
        "France",
        "Jacques Thibaud était de nationalité Allemagneançaise.",
        "Allemagne",
        o_aliases=("fra",),
    )
    loc = locate_answer(r)
    assert r.o_prompt[loc.start : loc.end] == "française"


def test_botched_edit_sentence_gives_no_answer():
    r = rec(
        "Quelle est la nationalité de Noel Gallagher ?",
        "Noel Gallagher détient la nationalité britannique.",
        "Royaume-Uni",
        "Noel Gallagher détient la Pakistan britannique.",
        "Pakistan",
    )
    assert locate_answer(r) is None
    a = assess_cloze(r, "fr", None, (0, 14))
    assert not a.well_posed and a.reason == "answer_not_found" and a.prefix is None


def test_japanese_reasons():
    base = dict(question="カール・セーガンが関わった教育機関は何ですか？", o_answer="コーネル大学")
    r1 = rec(
        base["question"],
        "カール・セーガンは、コーネル大学で勤務していました。",
        base["o_answer"],
        "カール・セーガンは、英国放送協会で勤務していました。",
        "英国放送協会",
    )
    a1 = assess_cloze(r1, "ja", locate_answer(r1), (0, 8))
    assert a1.prefix == "カール・セーガンは、" and a1.reason == "prefix_ends_at_subject"
    r2 = rec(
        base["question"],
        "カール・セーガンの勤務先はコーネル大学です。",
        base["o_answer"],
        "カール・セーガンの勤務先は英国放送協会です。",
        "英国放送協会",
    )
    a2 = assess_cloze(r2, "ja", locate_answer(r2), (0, 8))
    assert a2.well_posed, a2
    r3 = rec(
        base["question"],
        "カール・セーガンは主にコーネル大学で研究をしていました。",
        base["o_answer"],
        "カール・セーガンは主に英国放送協会で研究をしていました。",
        "英国放送協会",
    )
    a3 = assess_cloze(r3, "ja", locate_answer(r3), (0, 8))
    assert a3.reason == "prefix_ends_at_subject"  # 主に is a filler adverb
    r4 = rec(
        base["question"],
        "カール・セーガンの研究拠点はコーネル大学で、長く勤務していました。",
        base["o_answer"],
        "カール・セーガンの研究拠点は英国放送協会で、長く勤務していました。",
        "英国放送協会",
    )
    a4 = assess_cloze(r4, "ja", locate_answer(r4), (0, 8))
    assert a4.reason == "predicate_after_answer"


def test_empty_prefix_and_subject_after_answer():
    r = rec(
        "Who is the CEO of Tencent?",
        "Ma Huateng serves as the chief executive officer of Tencent.",
        "Ma Huateng",
        "Luca Cordero di Montezemolo serves as the chief executive officer of Tencent.",
        "Luca Cordero di Montezemolo",
    )
    loc = locate_answer(r)
    assert loc.start == 0
    a = assess_cloze(r, "en", loc, (52, 59))
    assert a.reason == "empty_prefix" and a.prefix == ""


def test_zh_prefix_is_question_start():
    r = rec(
        "卡尔·萨根曾受雇于哪所位于伊萨卡的学术机构？",
        "卡尔·萨根曾受雇于康奈尔大学。",
        "康奈尔大学",
        "卡尔·萨根曾受雇于英国广播公司。",
        "英国广播公司",
    )
    a = assess_cloze(r, "zh", locate_answer(r), (0, 5))
    assert a.prefix == "卡尔·萨根曾受雇于" and a.prefix_is_question_start and a.well_posed


def test_normalization_keeps_original_offsets():
    text = "Ｃａｒｌ  SAGAN worked"
    assert normalize(text) == "carl sagan worked"
    assert find_normalized(text, "carl sagan") == (0, 11)
    assert [u.norm for u in units("卡尔·萨根曾 Carl-Sagan's")] == [
        "卡",
        "尔",
        "萨",
        "根",
        "曾",
        "carl-sagan's",
    ]
