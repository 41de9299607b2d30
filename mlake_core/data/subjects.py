"""Locating the subject of each MLaKE fact in each language and prompt form.

No MLaKE record names its subject, and the five languages phrase each fact differently, so
the subject is found by *evidence*, not by rule.  For one fact in one language:

1. **Candidates**: every span of the question (at word boundaries; each CJK character is a
   unit) that also occurs in ``o_prompt`` outside the answer.  The subject must be stated in
   both, while the relation is usually paraphrased.
2. **Evidence** for each candidate, each a number in [0, 1]:

   - *multi-hop*: the fraction of this fact's multi-hop questions in the same language that
     contain it.  They mention the same subject with other relations ("the institution where
     Carl Sagan was employed"), which separates subject from relation wording;
   - *cross-lingual*: the fraction of the other languages whose question or ``o_prompt`` of the
     same fact contain it (names are often written identically in en, fr and de, and Latin or
     shared-Han names appear in zh and ja);
   - *name*: how much of it can be a name: the share of capitalized content words in
     alphabetic languages; in zh and ja the share of characters that the jieba and MeCab
     (fugashi/UniDic) analyzers do not put in verbs, particles, auxiliaries, adverbs,
     pronouns, prepositions or conjunctions;
   - *rarity*: relation wording repeats across many facts, names rarely: 1 when at most
     three facts' questions contain the candidate, ``1 / (1 + log(df / 3))`` above;
   - *boundary*: whether it starts and ends at word boundaries of the analyzer (zh, ja).

3. The best candidate by a weighted sum wins; ties go to the longer one.  Leading articles and
   trailing particles are trimmed.  A record whose question and ``o_prompt`` share no
   plausible candidate gets no subject, with the reason, rather than a forced one.

Then the span is placed in each form: the question span is the winning candidate's first
occurrence, and the cloze span is its first occurrence in ``o_prompt`` before the answer (or
anywhere, which :func:`~mlake_core.data.cloze.assess_cloze` then flags).
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from mlake_core.data.cloze import FILLER, AnswerLocation
from mlake_core.data.records import SingleHopRecord
from mlake_core.data.text import Unit, find_normalized, is_cjk, normalize, units

MAX_UNITS = 16
RARE_DF = 3
WEIGHTS = {"multi_hop": 3.0, "cross_lingual": 2.0, "name": 1.5, "rarity": 1.0, "boundary": 1.0}

# Words that may not begin or end an alphabetic subject span (compared normalized).
EDGE_STOP: dict[str, frozenset[str]] = {
    "en": FILLER["en"] | frozenset("who what which where when whom whose did does do".split()),
    "fr": FILLER["fr"]
    | frozenset("qui que quel quelle quels quelles où quand est-ce l d qu".split()),
    "de": FILLER["de"] | frozenset("wer was welche welcher welches wo wann wem wen wessen".split()),
}
# Characters that may not begin or end a zh/ja subject.
CJK_EDGE_STOP: dict[str, str] = {
    "zh": "的是在了曾也都于将就和与及被把由为从对向哪谁什么何",
    "ja": "はがのをにでともへやかな、。",
}


@dataclass(frozen=True)
class SubjectLocation:
    """The subject of one fact in one language.

    Attributes:
        text: the subject as written in the question (or ``o_prompt`` when only there).
        question: ``(start, end)`` character span in the question, or ``None``.
        cloze: ``(start, end)`` character span in ``o_prompt``, or ``None``.
        method: ``evidence`` (scored candidates), or ``none`` with ``reason`` set.
        score: the winning candidate's score.
        evidence: the winning candidate's evidence values.
        reason: why no subject was found.
    """

    text: str | None
    question: tuple[int, int] | None
    cloze: tuple[int, int] | None
    method: str
    score: float
    evidence: Mapping[str, float]
    reason: str | None = None


@dataclass(frozen=True)
class _Cand:
    start: int  # in the question
    end: int
    norm: str
    units: int


def _masked(text: str, span: tuple[int, int] | None) -> str:
    """The text with a span replaced by a separator that matches nothing."""
    if span is None:
        return text
    return text[: span[0]] + " \u2588 " + text[span[1] :]


def _candidates(question: str, other: str, lang: str) -> list[_Cand]:
    """Spans of ``question`` (unit boundaries) whose normalized text occurs in ``other``."""
    qu = units(question)
    other_norm = normalize(other)
    cjk = lang in ("zh", "ja")
    out: list[_Cand] = []
    for i in range(len(qu)):
        for j in range(i, min(len(qu), i + MAX_UNITS)):
            start, end = qu[i].start, qu[j].end
            norm = normalize(question[start:end])
            if norm not in other_norm:
                break  # longer spans from i cannot match either
            if not cjk and not _word_bounded(other_norm, norm):
                continue
            if _bad_edges(qu[i], qu[j], lang):
                continue
            out.append(_Cand(start, end, norm, j - i + 1))
    return out


def _word_bounded(haystack: str, needle: str) -> bool:
    for m in re.finditer(re.escape(needle), haystack):
        before = haystack[m.start() - 1] if m.start() > 0 else " "
        after = haystack[m.end()] if m.end() < len(haystack) else " "
        if not (before.isalnum() and not is_cjk(before)) and not (
            after.isalnum() and not is_cjk(after)
        ):
            return True
    return False


def _has_content(norm: str) -> bool:
    """At least two letters or CJK characters: a lone digit, initial or character (国, 子)
    is no subject."""
    return sum(ch.isalpha() for ch in norm) >= 2


def _bad_edges(first: Unit, last: Unit, lang: str) -> bool:
    if lang in CJK_EDGE_STOP:
        chars = CJK_EDGE_STOP[lang]
        return (first.norm in chars and len(first.norm) == 1) or (
            last.norm in chars and len(last.norm) == 1
        )
    words = EDGE_STOP.get(lang, frozenset())
    return first.norm in words or last.norm in words


@lru_cache(maxsize=1)
def _jieba() -> Any:
    import jieba
    import jieba.posseg

    jieba.setLogLevel(60)
    return jieba.posseg


@lru_cache(maxsize=1)
def _mecab() -> Any:
    import fugashi

    return fugashi.Tagger()


# Analyzer tags of words that state a relation or glue words together, never part of a name:
# verbs, particles, auxiliaries, adverbs, pronouns, prepositions, conjunctions.
ZH_NON_NAME = ("v", "p", "u", "r", "c", "d", "y", "e", "f", "q", "b")
# Function characters of zh that end or begin a name's context (jieba's dictionary mode splits
# unknown transliterated names into single characters, which are tagged unreliably).
ZH_FUNCTION_CHARS = frozenset("的是在曾于被把由为从对向和与及了着过也都就将所哪谁")
JA_NON_NAME = frozenset({"動詞", "助詞", "助動詞", "副詞", "代名詞", "接続詞", "形容詞"})


@lru_cache(maxsize=8192)
def _analysis(text: str, lang: str) -> tuple[tuple[bool, ...], frozenset[int]]:
    """Per-character "may be part of a name" flags and the token boundaries (zh, ja).

    A character may be part of a name unless the analyzer puts it in a verb, particle,
    auxiliary, adverb, pronoun, preposition or conjunction (jieba tags for zh, UniDic
    part-of-speech for ja); nouns, numerals and unknown words may.
    """
    ok = [True] * len(text)
    bounds = {0, len(text)}
    pos = 0
    tokens: list[tuple[str, bool]] = []
    if lang == "zh":
        # Dictionary mode (HMM off): the HMM would merge a following function character into
        # an unknown name (萨根曾).  Single-character tokens are judged by ZH_FUNCTION_CHARS.
        for tok in _jieba().cut(text, HMM=False):
            flag = tok.flag or ""
            if len(tok.word) == 1:
                tokens.append((tok.word, tok.word in ZH_FUNCTION_CHARS))
            else:
                tokens.append(
                    (tok.word, flag.startswith(ZH_NON_NAME) and not flag.startswith("vn"))
                )
    else:
        for tok in _mecab()(text):
            tokens.append((tok.surface, tok.feature.pos1 in JA_NON_NAME))
    for surface, non_name in tokens:
        at = text.find(surface, pos)
        if at < 0:
            continue
        for k in range(at, at + len(surface)):
            ch = text[k]
            latin_or_kana = (ch.isascii() and ch.isalnum()) or "\u30a0" <= ch <= "\u30ff"
            ok[k] = not non_name or latin_or_kana or ch in JOINERS
        bounds.add(at)
        bounds.add(at + len(surface))
        pos = at + len(surface)
    return tuple(ok), frozenset(bounds)


def _name_score(question: str, c: _Cand, lang: str) -> float:
    if lang in ("zh", "ja"):
        name, _ = _analysis(question, lang)
        chars = [k for k in range(c.start, c.end) if not question[k].isspace()]
        return sum(name[k] for k in chars) / max(1, len(chars))
    words = re.findall(r"[^\W_]+", question[c.start : c.end])
    stop = EDGE_STOP.get(lang, frozenset())
    content = [w for w in words if w.casefold() not in stop]
    if not content:
        return 0.0
    return sum(w[0].isupper() or w[0].isdigit() for w in content) / len(content)


def _boundary_score(question: str, c: _Cand, lang: str) -> float:
    if lang not in ("zh", "ja"):
        return 1.0
    _, bounds = _analysis(question, lang)
    return 0.5 * (c.start in bounds) + 0.5 * (c.end in bounds)


def _contains(text: str, norm: str, lang: str) -> bool:
    t = normalize(text)
    if lang in ("zh", "ja") or any(is_cjk(ch) for ch in norm):
        return norm in t
    return _word_bounded(t, norm)


def _rarity(df: int) -> float:
    """1 for spans in at most :data:`RARE_DF` questions, decreasing for frequent ones.

    Only frequent spans are penalized: any longer span is rarer than its parts, so rewarding
    rarity itself would favour spans that run on into the relation."""
    return 1.0 if df <= RARE_DF else 1.0 / (1.0 + math.log(df / RARE_DF))


def _cjk_text(norm: str) -> bool:
    return any(is_cjk(ch) for ch in norm)


def _share(norm: str, texts: Sequence[str], lang: str) -> float:
    return sum(_contains(t, norm, lang) for t in texts) / len(texts) if texts else 0.0


class DocumentFrequency:
    """How many facts' questions contain each unit n-gram, per language (for rarity)."""

    def __init__(self, questions: Mapping[str, Sequence[str]]):
        self._df: dict[str, Counter[str]] = {}
        for lang, texts in questions.items():
            counter: Counter[str] = Counter()
            for text in texts:
                us = units(text)
                grams = set()
                for i in range(len(us)):
                    for j in range(i, min(len(us), i + MAX_UNITS)):
                        grams.add(normalize(text[us[i].start : us[j].end]))
                counter.update(grams)
            self._df[lang] = counter

    def __call__(self, lang: str, norm: str) -> int:
        return max(1, self._df.get(lang, Counter())[norm])


def locate_subject(
    lang: str,
    rec: SingleHopRecord,
    answer: AnswerLocation | None,
    multi_hop: Sequence[str],
    other_langs: Mapping[str, tuple[SingleHopRecord, AnswerLocation | None]],
    df: DocumentFrequency,
) -> SubjectLocation:
    """Locate the subject of one fact in one language (see the module docstring).

    Args:
        lang: language code of ``rec``.
        rec: the record.
        answer: the answer's location in ``rec.o_prompt``.
        multi_hop: questions of this fact's multi-hop chains in the same language.
        other_langs: the same fact in the other languages, with their answer locations.
        df: document frequencies of question n-grams.
    """
    answer_span = (answer.start, answer.end) if answer else None
    cloze_text = _masked(rec.o_prompt, answer_span)
    # Answers can share words with the subject's question context; never take them.
    answer_norms = {normalize(f) for f in (rec.o_answer, *rec.o_answer_aliases)}
    cands = [
        c
        for c in _candidates(rec.question, cloze_text, lang)
        if c.norm not in answer_norms and _has_content(c.norm)
    ]
    if not cands:
        return SubjectLocation(
            None, None, None, "none", 0.0, {}, reason="no text shared by question and o_prompt"
        )
    others = [
        o.question + " \u2588 " + _masked(o.o_prompt, (a.start, a.end) if a else None)
        for o, a in other_langs.values()
    ]
    # Han characters are shared by zh and ja for common words too (王国, 子), so zh/ja
    # candidates count as cross-lingual only through the alphabetic languages.
    latin_others = [
        o.question + " \u2588 " + _masked(o.o_prompt, (a.start, a.end) if a else None)
        for lg, (o, a) in other_langs.items()
        if lg not in ("zh", "ja")
    ]
    best: tuple[float, int, _Cand, dict[str, float]] | None = None
    for c in cands:
        ev = {
            "multi_hop": (
                sum(_contains(m, c.norm, lang) for m in multi_hop) / len(multi_hop)
                if multi_hop
                else 0.0
            ),
            "cross_lingual": _share(c.norm, latin_others if _cjk_text(c.norm) else others, lang),
            "name": _name_score(rec.question, c, lang),
            "rarity": _rarity(df(lang, c.norm)),
            "boundary": _boundary_score(rec.question, c, lang),
        }
        score = sum(WEIGHTS[k] * v for k, v in ev.items())
        key = (round(score, 6), c.end - c.start)
        if best is None or key > (round(best[0], 6), best[1]):
            best = (score, c.end - c.start, c, ev)
    assert best is not None
    score, _, cand, ev = best
    cand = _extend(rec.question, cand, cands, lang, others)
    start = cand.start
    if lang == "fr":  # elided article or preposition: l'Académie -> Académie
        m = re.match(r"(?i)(?:l|d|qu)['’]", rec.question[start : cand.end])
        if m and cand.end - start > m.end():
            start += m.end()
    q_span = (start, cand.end)
    text = rec.question[start : cand.end]
    cloze_span = _place(rec.o_prompt, text, answer_span)
    return SubjectLocation(text, q_span, cloze_span, "evidence", score, ev)


NAME_CONNECTORS = frozenset(
    "of von van der den de del della di da du le la bin ibn al el y zu und & St. st".split()
)
JOINERS = "·・=＝-‐"


def _extend(
    question: str, best: _Cand, cands: Sequence[_Cand], lang: str, others: Sequence[str]
) -> _Cand:
    """Grow the winning span over the rest of a multi-part name, when the longer span is also
    shared with ``o_prompt``: adjacent capitalized words and name connectors ("Otto of
    Freising") in alphabetic languages; parts joined by ``·``, ``・``, ``＝`` or ``-`` in zh
    and ja ("让-雅克·贝内").  German capitalizes every noun, so there a capitalized word added
    on the left must also occur in another language's text of the fact ("Band The Beatles"
    stops at "The Beatles"); names grow to the right freely ("Boris" -> "Boris Johnson")."""
    cur = best
    changed = True
    while changed:
        changed = False
        for c in cands:
            if not (c.start <= cur.start and c.end >= cur.end) or c == cur:
                continue
            left = question[c.start : cur.start]
            right = question[cur.end : c.end]
            if (
                _name_extension(left, lang, side="left")
                and _name_extension(right, lang, side="right")
                and (lang != "de" or _shared_words(left, others))
            ):
                if c.end - c.start > cur.end - cur.start:
                    cur = c
                    changed = True
    return cur


def _shared_words(extra: str, others: Sequence[str]) -> bool:
    words = [w for w in re.findall(r"[^\W_]+", extra) if w not in NAME_CONNECTORS]
    return all(any(_contains(t, normalize(w), "en") for t in others) for w in words)


def _name_extension(extra: str, lang: str, side: str) -> bool:
    """Whether ``extra`` (text added on one side of a span) continues a name."""
    if not extra:
        return True
    if lang in ("zh", "ja"):
        core = extra.strip()
        if " " in core or not core:
            return False
        joined = core[-1] in JOINERS if side == "left" else core[0] in JOINERS
        return joined and all(
            ch in JOINERS or is_cjk(ch) or (ch.isascii() and ch.isalnum()) for ch in core
        )
    words = extra.split()
    if not words:
        return True
    if side == "right" and words[-1] in NAME_CONNECTORS:
        return False  # a name does not end with "of"
    if side == "left" and words[0] in NAME_CONNECTORS:
        return False
    return all(w[0].isupper() or w[0].isdigit() or w in NAME_CONNECTORS for w in words)


def _place(sentence: str, subject: str, answer: tuple[int, int] | None) -> tuple[int, int] | None:
    """The subject's span in ``sentence``: the first occurrence that does not overlap the
    answer, preferring one before it."""
    hits = []
    pos = 0
    while (hit := find_normalized(sentence, subject, pos)) is not None:
        hits.append(hit)
        pos = hit[0] + 1
    if answer is not None:
        hits = [h for h in hits if h[1] <= answer[0] or h[0] >= answer[1]] or hits
        before = [h for h in hits if h[1] <= answer[0]]
        if before:
            return before[0]
    return hits[0] if hits else None
