"""Locating the subject of each MLaKE fact in each language and prompt form.

No MLaKE record names its subject, and the five languages phrase each fact differently, so
the subject is found by *evidence*, not by rule.  For one fact in one language:

1. **Candidates**: every span of the question (at word boundaries; each CJK character is a
   unit) that also occurs in ``o_prompt`` or ``e_prompt`` outside their answers.  The subject
   must be stated in both, while the relation is usually paraphrased.  Where they share no
   plausible span with the question (``o_prompt`` is the answer alone), the candidates are
   the question's spans that occur in the fact's other texts: its multi-hop questions and
   the other languages' questions (``method`` says which source gave the subject).
2. **Evidence** for each candidate, each a number in [0, 1]:

   - *multi-hop*: the fraction of this fact's multi-hop questions in the same language that
     contain it.  They mention the same subject with other relations ("the institution where
     Carl Sagan was employed"), which separates subject from relation wording;
   - *cross-lingual*: the fraction of the other languages whose question or ``o_prompt`` of the
     same fact contain it (names are often written identically in en, fr and de).  A zh or
     ja candidate counts through the alphabetic languages, and through the other of zh/ja
     only where that language's analyzer reads it there as a whole proper name (菅原道真);
   - *name*: how much of it can be a name: the share of capitalized content words in
     alphabetic languages; in zh and ja the share of characters that the jieba and MeCab
     (fugashi/UniDic) analyzers do not put in verbs, particles, auxiliaries, adverbs,
     pronouns, prepositions or conjunctions, in the best of the fact's texts that contain it;
   - *rarity*: relation wording repeats across many facts, names rarely: 1 when at most
     three facts' questions contain the candidate, ``1 / (1 + log(df / 3))`` above;
   - *boundary*: whether it starts and ends at word boundaries of the analyzer (zh, ja), in
     the best of the fact's texts that contain it.

3. The best candidate by a weighted sum wins; ties go to the longer one.  It grows over the
   rest of a multi-part name (:func:`_extend`), and then the rules of :func:`_finish` apply:
   a bracketed title is taken whole, a subject does not end in a predicate, particle or
   honorific (zh/ja, by the analyzers' tags), parentheses are closed, abbreviations keep
   their periods, French elisions are dropped.  A record whose texts share no plausible
   candidate gets no subject, with the reason, rather than a forced one.

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
from mlake_core.data.text import EDGE_PUNCT, Unit, find_normalized, is_cjk, normalize, units

MAX_UNITS = 16  # longest n-gram counted for rarity
MAX_SPAN_UNITS = 32  # longest candidate (a katakana name is one unit per character)
RARE_DF = 3
WEIGHTS = {"multi_hop": 3.0, "cross_lingual": 2.0, "name": 1.5, "rarity": 1.0, "boundary": 1.0}

# Words that may not begin or end an alphabetic subject span (compared normalized).
EDGE_STOP: dict[str, frozenset[str]] = {
    "en": FILLER["en"] | frozenset("who what which where when whom whose did does do".split()),
    "fr": FILLER["fr"]
    | frozenset("qui que quel quelle quels quelles où quand est-ce l d qu".split()),
    "de": FILLER["de"] | frozenset("wer was welche welcher welches wo wann wem wen wessen".split()),
    "es": FILLER["es"]
    | frozenset(
        "qué quién quiénes cuál cuáles dónde adónde cuándo cómo cuánto cuánta cuántos cuántas".split()
    ),
}
# English function words: never in the noun phrase a name modifies (_noun_phrase_head).
EN_FUNCTION_WORDS = EDGE_STOP["en"] | frozenset(
    "their his her its our my your this that these those".split()
)
# Characters that may not begin or end a zh/ja subject.
CJK_EDGE_STOP: dict[str, str] = {
    # 什 and 么 are no stops alone: a name may end in 什 before the question word 什么
    # (芭芭拉·布什么时候...); the candidate must occur in the other text anyway.
    "zh": "的是在了曾也都于将就和与及被把由为从对向哪谁何",
    "ja": "はがのをにでともへやかな、。",
}


def has_subject_rules(lang: str) -> bool:
    """Whether the subject locator has rules of its own for ``lang`` (edge words for an
    alphabetic language, edge characters and an analyzer for zh/ja).  Any other language is
    located by the generic rules: the same evidence, spans at word boundaries, names by
    capitalization, no stop words at the edges."""
    return lang in EDGE_STOP or lang in CJK_EDGE_STOP


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
        for j in range(i, min(len(qu), i + MAX_SPAN_UNITS)):
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
    """At least two letters, digits or CJK characters, one of them a letter: a lone digit,
    initial or character (国, 子) is no subject, but a model name with one letter is
    (B-17, C96)."""
    return sum(ch.isalnum() for ch in norm) >= 2 and any(ch.isalpha() for ch in norm)


def _may_name(question: str, c: _Cand, lang: str) -> bool:
    """zh/ja: a span the analyzer reads as verbs, particles, adverbs and the like only (信奉,
    奉仰 "believe in") is the relation, never the subject, even where the fact's multi-hop
    questions repeat it."""
    if lang not in ("zh", "ja"):
        return True
    name, _ = _analysis(question, lang)
    return any(name[k] for k in range(c.start, c.end) if not question[k].isspace())


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
# What may not end a subject (the predicate or a particle swallowed into the span; see
# :func:`_trim_predicate`).  zh: single characters that begin a predicate (最 "most", 以
# "by/with") besides ZH_FUNCTION_CHARS; words that jieba's dictionary tags as nouns but
# MLaKE's questions use as the verb right after the subject (信仰 "believe in", the
# religion relation; 通晓 "be versed in", which the dictionary tags as a person's name).  ja: verbs, particles, auxiliaries, adverbs, adjectives, conjunctions,
# and the honorific suffixes that UniDic tags 接尾辞 (トーマス・ティップ・オニール氏).
ZH_PREDICATE_CHARS = frozenset("最以")
ZH_PREDICATE_WORDS = frozenset({"信仰", "通晓"})  # 通晓 "be versed in": tagged a person's name
JA_PREDICATE = frozenset({"動詞", "助詞", "助動詞", "副詞", "接続詞", "形容詞"})
JA_HONORIFICS = frozenset({"氏", "さん", "様", "さま", "殿", "君", "くん", "ちゃん"})


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    surface: str
    tag: str  # jieba flag (zh); UniDic "pos1,pos2" (ja)
    non_name: bool  # a verb, particle, auxiliary, adverb, pronoun, ... (never in a name)
    predicate: bool  # may not end a subject (see :func:`_is_predicate`)


@lru_cache(maxsize=16384)
def _tokens(text: str, lang: str) -> tuple[_Token, ...]:
    """The analyzer's tokens of a zh or ja text with their character offsets.

    zh: jieba in dictionary mode (HMM off: the HMM would merge a following function
    character into an unknown name, 萨根曾); single-character tokens are judged by
    :data:`ZH_FUNCTION_CHARS` (jieba splits unknown transliterated names into single
    characters and tags them unreliably).  ja: MeCab with UniDic (fugashi).
    """
    raw: list[tuple[str, str, bool, bool]] = []
    if lang == "zh":
        for tok in _jieba().cut(text, HMM=False):
            flag = tok.flag or ""
            if len(tok.word) == 1:
                fn = tok.word in ZH_FUNCTION_CHARS
                raw.append((tok.word, flag, fn, fn or tok.word in ZH_PREDICATE_CHARS))
            else:
                non_name = flag.startswith(ZH_NON_NAME) and not flag.startswith("vn")
                raw.append((tok.word, flag, non_name, _zh_predicate(tok.word, flag)))
    else:
        for tok in _mecab()(text):
            pos1 = tok.feature.pos1 or ""
            predicate = pos1 in JA_PREDICATE or (pos1 == "接尾辞" and tok.surface in JA_HONORIFICS)
            tag = f"{pos1},{tok.feature.pos2 or ''}"
            raw.append((tok.surface, tag, pos1 in JA_NON_NAME, predicate))
    out = []
    pos = 0
    for surface, tag, non_name, predicate in raw:
        at = text.find(surface, pos)
        if at < 0:
            continue
        out.append(_Token(at, at + len(surface), surface, tag, non_name, predicate))
        pos = at + len(surface)
    return tuple(out)


def _zh_predicate(word: str, flag: str) -> bool:
    """Whether a multi-character zh word may not end a subject: verbs (also verbal nouns:
    首播), adverbs, adjectives, prepositions, conjunctions, particles, and time words
    (去世 and 最初 are tagged as time) except regnal numbers (一世, 十四世); plus
    :data:`ZH_PREDICATE_WORDS`."""
    if word in ZH_PREDICATE_WORDS:
        return True
    if flag.startswith("t"):
        return re.fullmatch(r"[一二三四五六七八九十百]+世", word) is None
    return flag.startswith(("v", "d", "a", "p", "c", "u", "y"))


@lru_cache(maxsize=8192)
def _analysis(text: str, lang: str) -> tuple[tuple[bool, ...], frozenset[int]]:
    """Per-character "may be part of a name" flags and the token boundaries (zh, ja).

    A character may be part of a name unless the analyzer puts it in a verb, particle,
    auxiliary, adverb, pronoun, preposition or conjunction (jieba tags for zh, UniDic
    part-of-speech for ja); nouns, numerals and unknown words may.
    """
    ok = [True] * len(text)
    bounds = {0, len(text)}
    for tok in _tokens(text, lang):
        at, non_name = tok.start, tok.non_name
        for k in range(at, tok.end):
            ch = text[k]
            latin_or_kana = (ch.isascii() and ch.isalnum()) or "\u30a0" <= ch <= "\u30ff"
            ok[k] = not non_name or latin_or_kana or ch in JOINERS
        bounds.add(at)
        bounds.add(tok.end)
    return tuple(ok), frozenset(bounds)


def _cjk_scores(
    question: str, c: _Cand, lang: str, contexts: Sequence[tuple[str, str]]
) -> tuple[float, float]:
    """zh/ja name and boundary scores of a candidate: the best over the question and every
    other text of the fact that contains it (``contexts``: ``o_prompt``, ``e_prompt``,
    multi-hop questions, and the other of zh/ja's question where it reads the candidate as a
    whole proper name; each with its language).  The analyzers segment an unknown name
    differently in different contexts (zh 菅原道真是 is read 菅原/道/真是, ja 菅原道真の as
    菅原/道真/の); one context that reads the span as a whole name is evidence that it is one."""
    best_name = best_bound = 0.0
    surface = question[c.start : c.end]
    for text, text_lang, span in [(question, lang, (c.start, c.end))] + [
        (t, lg, find_normalized(t, surface)) for t, lg in contexts
    ]:
        if span is None:
            continue
        name, bounds = _analysis(text, text_lang)
        chars = [k for k in range(*span) if not text[k].isspace()]
        best_name = max(best_name, sum(name[k] for k in chars) / max(1, len(chars)))
        best_bound = max(best_bound, 0.5 * (span[0] in bounds) + 0.5 * (span[1] in bounds))
    return best_name, best_bound


def _name_score(question: str, c: _Cand, lang: str) -> float:
    words = re.findall(r"[^\W_]+", question[c.start : c.end])
    stop = EDGE_STOP.get(lang, frozenset())
    content = [w for w in words if w.casefold() not in stop]
    if not content:
        return 0.0
    return sum(_capitalized(w) for w in content) / len(content)


def _capitalized(word: str) -> bool:
    """Written as a name: a capital letter anywhere (iPhone, eBay, McCartney) or a digit
    first (4S, 2000)."""
    return word[:1].isdigit() or any(ch.isupper() for ch in word)


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


def _han_share(
    norm: str,
    latin_others: Sequence[str],
    other_langs: Mapping[str, tuple[SingleHopRecord, AnswerLocation | None]],
    lang: str,
) -> float:
    """Cross-lingual evidence for a zh/ja candidate: the share of the alphabetic languages'
    texts containing it, and of the other of zh/ja whose question contains it *as a proper
    name* (the same Han name in both: 菅原道真).  A Han span of the other language counts only
    when that language's analyzer reads it as whole proper-noun tokens (jieba nr/ns/nt/nz,
    UniDic 固有名詞), since zh and ja share Han characters for common words too (王国)."""
    hits = [_contains(t, norm, lang) for t in latin_others]
    for lg, (o, _) in other_langs.items():
        if lg in ("zh", "ja"):
            hits.append(_proper_name_in(o.question, norm, lg))
    return sum(hits) / len(hits) if hits else 0.0


def _proper_name_in(text: str, norm: str, lang: str) -> bool:
    """Whether ``norm`` occurs in ``text`` as a whole run of analyzer tokens that are all
    proper nouns (jieba nr/ns/nt/nz; UniDic 固有名詞)."""
    hit = find_normalized(text, norm)
    if hit is None:
        return False
    every = _tokens(text, lang)
    inside = [k for k, t in enumerate(every) if t.start < hit[1] and t.end > hit[0]]
    if not inside or every[inside[0]].start != hit[0] or every[inside[-1]].end != hit[1]:
        return False
    if not all(_proper(every[k], lang) for k in inside):
        return False
    # The whole run of proper-noun tokens, not a part of it (王国 of 匈牙利王国, 菅原 of 菅原道真).
    before, after = inside[0] - 1, inside[-1] + 1
    return not (before >= 0 and _proper(every[before], lang)) and not (
        after < len(every) and _proper(every[after], lang)
    )


def _proper(tok: _Token, lang: str) -> bool:
    if lang == "zh":
        return tok.tag.startswith(("nr", "ns", "nt", "nz"))
    return tok.tag.endswith(",固有名詞")


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
    others = [
        o.question + " \u2588 " + _masked(o.o_prompt, (a.start, a.end) if a else None)
        for o, a in other_langs.values()
    ]
    # Where the question shares nothing plausible with o_prompt and e_prompt (they state
    # only the answer, or name the subject otherwise), the subject is sought in the fact's
    # other texts: its multi-hop questions and the other languages' questions.
    edit = find_normalized(rec.e_prompt, rec.e_answer) if rec.e_answer.strip() else None
    # e_prompt states the subject as o_prompt does: a span shared with either counts, so an
    # answer located inside the subject's name in one of them (足球 in 欧洲足球锦标赛) does not
    # cut the subject.
    sources = [
        ("evidence", cloze_text + " \u2588 " + _masked(rec.e_prompt, edit)),
        (
            "evidence:other_texts",
            " \u2588 ".join([*multi_hop, *(o.question for o, _ in other_langs.values())]),
        ),
    ]
    method, cands = "evidence", []
    for label, source in sources:
        method = label
        cands = [
            c
            for c in _candidates(rec.question, source, lang)
            if c.norm not in answer_norms
            and _has_content(c.norm)
            and _may_name(rec.question, c, lang)
        ]
        if cands:
            break
    if not cands:
        return SubjectLocation(
            None,
            None,
            None,
            "none",
            0.0,
            {},
            reason="no text shared by the question and o_prompt, e_prompt or the fact's "
            "other texts",
        )
    # Han characters are shared by zh and ja for common words too (王国, 子), so zh/ja
    # candidates count as cross-lingual only through the alphabetic languages.
    latin_others = [
        o.question + " \u2588 " + _masked(o.o_prompt, (a.start, a.end) if a else None)
        for lg, (o, a) in other_langs.items()
        if lg not in ("zh", "ja")
    ]
    contexts = [(t, lang) for t in (rec.o_prompt, rec.e_prompt, *multi_hop)]
    cjk = lang in ("zh", "ja")
    han_others = [(o.question, lg) for lg, (o, _) in other_langs.items() if lg in ("zh", "ja")]

    def evidence(c: _Cand, full: bool) -> dict[str, float]:
        """The candidate's evidence; with ``full=False`` the zh/ja analyzer evidence
        (name, boundary, the other of zh/ja) is its most optimistic value, an upper bound
        that is cheap to compute."""
        han = [(t, lg) for t, lg in han_others if not full or _proper_name_in(t, c.norm, lg)]
        if cjk and _cjk_text(c.norm):
            hits = [_contains(t, c.norm, lang) for t in latin_others]
            cross = (sum(hits) + len(han)) / (len(hits) + len(han_others) or 1)
        else:
            cross = _share(c.norm, others, lang)
        if not cjk:
            name, boundary = _name_score(rec.question, c, lang), 1.0
        elif full:
            name, boundary = _cjk_scores(rec.question, c, lang, contexts + han)
        else:
            name = boundary = 1.0
        return {
            "multi_hop": (
                sum(_contains(m, c.norm, lang) for m in multi_hop) / len(multi_hop)
                if multi_hop
                else 0.0
            ),
            "cross_lingual": cross,
            "name": name,
            "rarity": _rarity(df(lang, c.norm)),
            "boundary": boundary,
        }

    def total(ev: Mapping[str, float]) -> float:
        return round(sum(WEIGHTS[k] * v for k, v in ev.items()), 6)

    # Best first by the upper bound; a candidate whose bound is below the best full score
    # cannot win (ties go to the longer span, then the earlier candidate).
    bounds = sorted(
        ((total(evidence(c, False)), c.end - c.start, -i, c) for i, c in enumerate(cands)),
        key=lambda b: b[:3],
        reverse=True,
    )
    best: tuple[float, int, int, _Cand, dict[str, float]] | None = None
    for upper, length, order, c in bounds:
        if best is not None and (upper, length, order) < best[:3]:
            break
        ev = evidence(c, True)
        key = (total(ev), length, order)
        if best is None or key > best[:3]:
            best = (*key, c, ev)
    assert best is not None
    score, _, _, cand, ev = best
    cand = _extend(rec.question, cand, cands, lang, others)
    if lang == "en":
        cand = _noun_phrase_head(rec.question, cand, cands, others)
    start, end = _finish(rec.question, cand.start, cand.end, lang)
    q_span = (start, end)
    text = rec.question[start:end]
    cloze_span = _place(rec.o_prompt, text, answer_span)
    return SubjectLocation(text, q_span, cloze_span, method, score, ev)


def _finish(question: str, start: int, end: int, lang: str) -> tuple[int, int]:
    """The rules applied to the winning span, in order (each tested on built cases):

    1. a title in brackets is the subject whole: a span inside or across 《…》, 「…」 or
       『…』 becomes the title (zh and ja write titles in them);
    2. a subject other than a title does not end in a predicate, particle or honorific
       (:func:`_trim_predicate`);
    3. an opening parenthesis in the span is closed (汉娜·蒙塔娜 (原聲帶));
    4. abbreviations keep their periods: after initials (Varzim S.C.) and, in German, after
       a Roman numeral, which is an ordinal there (Innozenz XII.);
    5. fr: an elided article or preposition is dropped (l'Académie -> Académie).
    """
    title = False
    for m in re.finditer(r"《([^》]+)》|「([^」]+)」|『([^』]+)』", question):
        a, b = m.start() + 1, m.end() - 1
        if start < b and end > a:
            start, end, title = a, b, True
            break
    if lang in ("zh", "ja") and not title:  # a title may end in anything (夜はやさし)
        end = _trim_predicate(question, start, end, lang)
    span = question[start:end]
    if span.count("(") > span.count(")") or span.count("（") > span.count("）"):
        closing = re.match(r"\s*[^()（）]*[)）]", question[end:])
        if closing:
            end += closing.end()
    after = question[end : end + 1]
    if after == "." and (
        re.search(r"(?:^|[\s.])[^\W\d_]\.[^\W\d_]$", question[start:end])
        or (lang == "de" and re.search(r"\b[IVXLC]+$", question[start:end]))
    ):
        end += 1
    if lang == "fr":  # elided article or preposition: l'Académie -> Académie
        elided = re.match(r"(?i)(?:l|d|qu)['’]", question[start:end])
        if elided and end - start > elided.end():
            start += elided.end()
    return start, end


def _trim_predicate(question: str, start: int, end: int, lang: str) -> int:
    """Cut tokens that may not end a subject off the end of a zh/ja span: the predicate
    swallowed with the subject when question and ``o_prompt`` share it (鹧鸪家庭首播,
    约翰·拉岑贝格尔最, 维陶塔斯·兰茨贝吉斯通晓, 方济各信仰), and ja honorifics (オニール氏).  Only
    whole analyzer tokens inside the span are cut, never the span's first token nor a token
    right after a joiner (佩姬·安·加纳: jieba tags the transliterated 加纳 a verb), and only
    while some content remains."""
    toks = _tokens(question, lang)
    while True:
        last = next((t for t in reversed(toks) if t.start < end), None)
        if last is None or last.end != end or last.start <= start or not last.predicate:
            return end
        if question[last.start - 1] in JOINERS:
            return end  # a part after · or ・ is the name's (加纳, 甘迺迪 are tagged verbs)
        new_end = last.start
        while new_end > start and question[new_end - 1] in EDGE_PUNCT + JOINERS:
            new_end -= 1
        if not _has_content(normalize(question[start:new_end])):
            return end
        end = new_end


NAME_CONNECTORS = frozenset(
    "of von van der den de del della di da do dos du le la bin ibn al el y zu und & St. st".split()
)
JOINERS = "·・=＝-‐"
_KATAKANA = re.compile(r"[\u30a0-\u30ff]+")


def _extend(
    question: str, best: _Cand, cands: Sequence[_Cand], lang: str, others: Sequence[str]
) -> _Cand:
    """Grow the winning span over the rest of a multi-part name, when the longer span is also
    shared with ``o_prompt``: adjacent capitalized words and name connectors ("Otto of
    Freising") in alphabetic languages; parts joined by ``·``, ``・``, ``＝`` or ``-`` in zh
    and ja ("让-雅克·贝内").  German capitalizes every noun, so there a capitalized word added
    on the left must also occur in another language's text of the fact ("Band The Beatles"
    stops at "The Beatles"); names grow to the right freely ("Boris" -> "Boris Johnson").
    Each step takes the longest span that continues the name."""
    cur = best
    while True:
        inner = question[cur.start : cur.end]
        grown = [
            c
            for c in cands
            if c.start <= cur.start
            and c.end >= cur.end
            and c.end - c.start > cur.end - cur.start
            and _name_extension(question[c.start : cur.start], lang, "left", inner)
            and _name_extension(question[cur.end : c.end], lang, "right", inner)
            and (
                lang != "de"
                or _shared_words(question[c.start : cur.start], others)
                or (
                    _bare_numeral(cur, question) and len(question[c.start : cur.start].split()) == 1
                )
            )
        ]
        if not grown:
            return cur
        cur = max(grown, key=lambda c: (c.end - c.start, -c.start))


def _noun_phrase_head(
    question: str, cur: _Cand, cands: Sequence[_Cand], others: Sequence[str]
) -> _Cand:
    """English: a one-word name after a lower-case "the" that the other languages do not
    write the same way (at most a quarter of them) modifies the lower-case noun phrase after
    it, which the subject then includes: "the Afghanistan national football team" (a country
    takes no article; the other languages name the team, not the country).  Names of more
    words take the article themselves ("the Golden State Warriors participate" stops at the
    name), and a name the other languages write alike keeps its descriptor out ("the
    RC-135 aircraft").  The phrase is at most three lower-case content words
    (none of :data:`EN_FUNCTION_WORDS`: "the San Antonio Spurs as their head coach" stops at
    the name), and the longer span must be shared with ``o_prompt`` or ``e_prompt`` like any
    candidate."""
    if not re.search(r"\bthe\s+$", question[: cur.start]) or " " in question[cur.start : cur.end]:
        return cur
    if _share(cur.norm, others, "en") > 0.25:
        return cur
    longer = [
        c
        for c in cands
        if c.start == cur.start
        and c.end > cur.end
        and re.fullmatch(r"(?:\s+[a-z][a-z\-]*){1,3}", question[cur.end : c.end])
        and not set(question[cur.end : c.end].split()) & EN_FUNCTION_WORDS
    ]
    return max(longer, key=lambda c: c.end) if longer else cur


def _bare_numeral(c: _Cand, question: str) -> bool:
    """A span that is a Roman numeral alone (XII, III) is a regnal number: it always takes the
    one word before it (Innozenz XII), in German too (never more: "Partnerin von Ludwig
    VIII." stops at "Ludwig VIII.")."""
    return re.fullmatch(r"[IVXLC]+", question[c.start : c.end]) is not None


def _shared_words(extra: str, others: Sequence[str]) -> bool:
    words = [w for w in re.findall(r"[^\W_]+", extra) if w not in NAME_CONNECTORS]
    return all(any(_contains(t, normalize(w), "en") for t in others) for w in words)


def _name_extension(extra: str, lang: str, side: str, inner: str = "") -> bool:
    """Whether ``extra`` (text added on one side of the span ``inner``) continues a name."""
    if not extra:
        return True
    touching = inner[:1] if side == "left" else inner[-1:]
    if lang == "ja" and touching.isascii() and touching.isalnum() and _KATAKANA.fullmatch(extra):
        return (
            True  # a Latin abbreviation written against a katakana name: FCアンドラ, バーンリーFC
        )
    if re.fullmatch(r"\.[^\W_]+(?:\.[^\W_]+)*", extra if side == "right" else extra[::-1]):
        return True  # parts joined by periods: JD.com, S.C
    if lang in ("zh", "ja"):
        core = extra.strip()
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.\-]*(?: [A-Za-z0-9][A-Za-z0-9.\-]*)*", core):
            # Latin words of a name written in Latin letters (OS X Mavericks, UEFA EURO 2000)
            return all(w[0].isupper() or w[0].isdigit() for w in core.split())
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
    return all(_capitalized(w) or w in NAME_CONNECTORS for w in words)


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
