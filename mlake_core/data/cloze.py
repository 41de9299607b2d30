"""Cloze prompts: where the answer stands in ``o_prompt``, and whether the prefix is usable.

MLaKE's ``o_prompt`` is a sentence that states the fact; it is *not* a prompt that ends
before the answer.  The answer sits in the middle for many records (always in ja, where the
predicate follows the object), and is not verbatim in some fr and de sentences (inflection,
translation).  A cloze prompt is therefore derived, honestly:

1. **Answer position** (:func:`locate_answer`), first method that works wins:

   - ``exact``: ``o_answer`` occurs verbatim;
   - ``normalized``: it occurs after NFKC, case and width folding;
   - ``inflected``: each word of the answer (or of an alias) occurs with a different ending
     (de "Vereinigten Staaten" for "Vereinigte Staaten", "Point Guards" for "Point Guard");
   - ``o_e_diff``: ``o_prompt`` and ``e_prompt`` state the same sentence with the answer
     replaced, so the part of ``o_prompt`` between their common prefix and common suffix
     (widened to whole words) is the answer's surface form, e.g. a derived form such as fr
     "roumaine" for "Roumanie".  Accepted only when the differing part of ``e_prompt`` mentions
     ``e_answer`` (or an alias) and the differing part of ``o_prompt`` resembles the answer (a
     shared word stem), so that botched replacements (fr "est Canada américaine") are not
     taken for an answer;
   - ``alias``: one of ``o_answer_aliases`` occurs (longest first); an alias that is itself
     part of the question is skipped (MLaKE has junk aliases such as fr "nationalité" for
     Royaume-Uni, or de "Johnson" for London).

   Matches never start or end inside an alphabetic word (the alias "fra" is not found in
   "française").

   When the answer occurs twice, the first occurrence wins, unless the answer's text also
   occurs in the question (it is part of the subject's name): then the occurrence inside the
   ``o_prompt``/``e_prompt`` difference wins.

2. **Prefix**: the text before the answer, trailing whitespace removed.

3. **Well-posed** (:func:`assess_cloze`): a prefix is a usable cloze prompt only if it
   mentions the subject and states the relation before the answer.  Reasons otherwise:

   - ``answer_not_found``: no answer position;
   - ``empty_prefix``: the sentence starts with the answer;
   - ``subject_not_in_prefix``: the subject is not located in the prefix (e.g. it follows
     the answer);
   - ``prefix_ends_at_subject``: nothing but the subject, particles, punctuation and filler
     adverbs precedes the answer (ja ``カール・セーガンは、``);
   - ``predicate_after_answer``: in verb-final languages (ja) the predicate that states the
     relation follows the answer; only a copula (です, だ, である, ...) may follow a well-posed
     answer.

   ``prefix_is_question_start`` is recorded separately: many zh prefixes are the first words
   of the question.  Such a prefix is still a valid cloze, but not an independent paraphrase.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mlake_core.data.records import SingleHopRecord
from mlake_core.data.text import EDGE_PUNCT, find_normalized, is_cjk, normalize, strip_edges

# Words and particles that carry no relation on their own (compared after normalize()).
FILLER: dict[str, frozenset[str]] = {
    "en": frozenset(
        "the a an of in at on to by as is was are were has had have with from for and".split()
    ),
    "fr": frozenset(
        "le la les l' un une des de du d' à au aux en et est a été par pour sur dans".split()
    ),
    "de": frozenset(
        "der die das den dem des ein eine einen einem eines und in im an am zu zum zur von".split()
        + "ist war hat".split()
    ),
    "es": frozenset(
        "el la los las lo un una unos unas de del a al en y e es son fue fueron era ha han".split()
        + "por para con sobre".split()
    ),
    "zh": frozenset(["的", "是", "在", "了", "曾", "也", "都", "于", "将", "就"]),
    "ja": frozenset(
        "は が の を に で と も へ や 通常 現在 主に かつて 一般的 一般的に もともと 元々 当初 最初".split()
    ),
}
# Copula endings that may follow a well-posed ja answer.
JA_COPULA = re.compile(
    r"^(です|でした|だ|だった|である|であった|でございます|となっています|となります|"
    r"と(いいます|言います|されています|呼ばれています)|)$"
)
VERB_FINAL: frozenset[str] = frozenset({"ja"})


@dataclass(frozen=True)
class AnswerLocation:
    """Where the original answer stands in ``o_prompt`` (character offsets, end exclusive)."""

    start: int
    end: int
    method: str  # exact | normalized | inflected | o_e_diff | alias
    edit_surface: str | None  # the counterpart in e_prompt, when the sentences align


def _diff_window(o: str, e: str) -> tuple[int, int, int, int]:
    """Common-prefix/suffix alignment of two sentences: returns (o_start, o_end, e_start, e_end)."""
    p = 0
    while p < min(len(o), len(e)) and o[p] == e[p]:
        p += 1
    s = 0
    while s < min(len(o), len(e)) - p and o[len(o) - 1 - s] == e[len(e) - 1 - s]:
        s += 1
    return p, len(o) - s, p, len(e) - s


def _alpha(ch: str) -> bool:
    """A letter or digit of an alphabetic script (CJK characters are not word-internal)."""
    return ch.isalnum() and not is_cjk(ch)


def _widen_to_words(text: str, start: int, end: int) -> tuple[int, int]:
    """Extend a character range to whole alphabetic words (the diff may cut inside one)."""
    while 0 < start < len(text) and _alpha(text[start - 1]) and _alpha(text[start]):
        start -= 1
    while 0 < end < len(text) and _alpha(text[end - 1]) and _alpha(text[end]):
        end += 1
    return start, end


def _stem_match(word: str, form: str) -> bool:
    """Whether ``word`` can be an inflected or derived form of ``form`` (both normalized).

    Accepts a shared beginning of at least four characters that covers all but the last
    three characters of the shorter word (``vereinigten``/``vereinigte``,
    ``roumaine``/``roumanie``, ``japanese``/``japan``).
    """
    if word == form:
        return True
    k = 0
    while k < min(len(word), len(form)) and word[k] == form[k]:
        k += 1
    return k >= 4 and k >= min(len(word), len(form)) - 3


def _resembles(surface: str, forms: tuple[str, ...]) -> bool:
    """Whether a differing part of ``o_prompt`` can be the answer given its forms."""
    norm = normalize(surface)
    if any(is_cjk(ch) for ch in norm):
        return any((f := normalize(x)) and (f in norm or norm in f) for x in forms)
    words = re.findall(r"[^\W_]+", norm)
    return any(
        _stem_match(w, fw)
        for x in forms
        for fw in re.findall(r"[^\W_]+", normalize(x))
        for w in words
    )


def _find_inflected(text: str, answer: str) -> list[tuple[int, int]]:
    """Find ``answer`` with each word possibly inflected (de/fr case and number endings)."""
    hits: list[tuple[int, int]] = []
    a_words = re.findall(r"[^\W_]+", normalize(answer))
    if not a_words or any(is_cjk(ch) for w in a_words for ch in w):
        return hits
    spans = [(m.start(), m.end(), normalize(m.group())) for m in re.finditer(r"[^\W_]+", text)]
    for i in range(len(spans) - len(a_words) + 1):
        window = spans[i : i + len(a_words)]
        if all(
            _stem_match(w, a) and len(w) - len(a) <= 3
            for (_, _, w), a in zip(window, a_words, strict=True)
        ):
            hits.append((window[0][0], window[-1][1]))
    return hits


def _on_word_boundaries(text: str, start: int, end: int) -> bool:
    """False when a match starts or ends inside an alphabetic word (``fra`` in ``française``)."""
    if 0 < start < len(text) and _alpha(text[start - 1]) and _alpha(text[start]):
        return False
    return not (0 < end < len(text) and _alpha(text[end - 1]) and _alpha(text[end]))


def _mentions(text: str, target: str, aliases: tuple[str, ...]) -> bool:
    norm = normalize(text)
    if not norm:
        return False
    return any(
        (n := normalize(f)) and (n in norm or norm in n) for f in (target, *aliases) if f.strip()
    )


def _plausible_aliases(rec: SingleHopRecord) -> tuple[str, ...]:
    """Aliases that are not words of the question: MLaKE has junk aliases such as fr
    "nationalité" for Royaume-Uni, or de "Teheran" for London."""
    q = normalize(rec.question)
    return tuple(a for a in rec.o_answer_aliases if normalize(a) not in q)


def locate_answer(rec: SingleHopRecord) -> AnswerLocation | None:
    """Find the original answer in ``rec.o_prompt`` (see the module docstring)."""
    o, e = rec.o_prompt, rec.e_prompt
    do_s, do_e, de_s, de_e = _diff_window(o, e)
    do_s, do_e = _widen_to_words(o, do_s, do_e)
    de_s, de_e = _widen_to_words(e, de_s, de_e)
    aligned = (
        do_s < do_e and de_s < de_e and _mentions(e[de_s:de_e], rec.e_answer, rec.e_answer_aliases)
    )
    edit_surface = e[de_s:de_e].strip(EDGE_PUNCT) if aligned else None

    def pick(needle: str, inflected: bool = False) -> tuple[int, int] | None:
        hits = []
        pos = 0
        while not inflected and (hit := find_normalized(o, needle, pos)) is not None:
            if _on_word_boundaries(o, *hit):
                hits.append(hit)
            pos = hit[0] + 1
        if inflected:
            hits = _find_inflected(o, needle)
        if not hits:
            return None
        # The first occurrence is the answer, unless the answer's text is also part of the
        # subject's name (fr "L'Iliouchine Il-28 a été développé par Iliouchine"): then it
        # also occurs in the question, and the occurrence the o/e difference points at wins.
        if aligned and normalize(needle) in normalize(rec.question):
            inside = [h for h in hits if h[0] < do_e and h[1] > do_s]
            if inside:
                return inside[0]
        return hits[0]

    hit = pick(rec.o_answer)
    if hit:
        method = "exact" if o[hit[0] : hit[1]] == rec.o_answer else "normalized"
        return AnswerLocation(hit[0], hit[1], method, edit_surface)
    for form in (rec.o_answer, *_plausible_aliases(rec)):
        span = pick(form, inflected=True)
        if span and normalize(o[span[0] : span[1]]) not in normalize(rec.question):
            return AnswerLocation(span[0], span[1], "inflected", edit_surface)
    if aligned:
        s, t = strip_edges(o, do_s, do_e)
        surface = o[s:t]
        if s < t and (
            _resembles(surface, (rec.o_answer,))
            or (
                _resembles(surface, _plausible_aliases(rec))
                # not a replacement that hit the subject or the relation
                and normalize(surface) not in normalize(rec.question)
            )
        ):
            return AnswerLocation(s, t, "o_e_diff", edit_surface)
    for alias in sorted(_plausible_aliases(rec), key=len, reverse=True):
        hit = pick(alias)
        if hit:
            return AnswerLocation(hit[0], hit[1], "alias", edit_surface)
    return None


@dataclass(frozen=True)
class ClozeAssessment:
    """The cloze prefix of a view and whether it is usable."""

    prefix: str | None
    answer: AnswerLocation | None
    answer_at_end: bool
    well_posed: bool
    reason: str | None
    prefix_is_question_start: bool


def _content(text: str, lang: str) -> str:
    """Text with punctuation and filler words/particles removed (normalized)."""
    norm = normalize(text)
    filler = FILLER.get(lang, frozenset())
    if lang in ("zh", "ja"):
        for f in sorted(filler, key=len, reverse=True):
            norm = norm.replace(f, " ")
        return "".join(ch for ch in norm if ch not in EDGE_PUNCT and not ch.isspace())
    words = re.findall(r"[^\W_]+", norm.replace("'", "' ").replace("’", "' "))
    return " ".join(w for w in words if w not in filler and f"{w}'" not in filler)


def assess_cloze(
    rec: SingleHopRecord,
    lang: str,
    answer: AnswerLocation | None,
    subject: tuple[int, int] | None,
) -> ClozeAssessment:
    """Judge the cloze form of one record (see the module docstring for the reasons).

    Args:
        rec: the record.
        lang: its language code.
        answer: the answer location from :func:`locate_answer`.
        subject: the subject's character span in ``o_prompt``, if located.
    """
    if answer is None:
        return ClozeAssessment(None, None, False, False, "answer_not_found", False)
    o = rec.o_prompt
    prefix = o[: answer.start].rstrip()
    suffix = o[answer.end :]
    at_end = all(ch in EDGE_PUNCT for ch in suffix)
    q_start = normalize(rec.question).startswith(normalize(prefix)) if prefix else False
    reason: str | None = None
    if not prefix.strip(EDGE_PUNCT):
        reason = "empty_prefix"
    elif subject is None or subject[1] > answer.start:
        reason = "subject_not_in_prefix"
    else:
        remainder = o[: subject[0]] + " " + o[subject[1] : answer.start]
        if not _content(remainder, lang):
            reason = "prefix_ends_at_subject"
        elif lang in VERB_FINAL and not JA_COPULA.match(
            "".join(ch for ch in suffix if ch not in EDGE_PUNCT and not ch.isspace())
        ):
            reason = "predicate_after_answer"
    return ClozeAssessment(prefix, answer, at_end, reason is None, reason, q_start)
