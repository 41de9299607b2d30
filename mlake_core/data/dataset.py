"""MLaKE as :class:`Fact` objects: one per parallel single-hop record, one view per language.

Example:
    >>> from mlake_core.data import load_mlake
    >>> ds = load_mlake(langs="en,zh")            # finds ../shared/mlake or $MLAKE_DATA
    >>> view = ds.facts[0].views["zh"]
    >>> view.question.text, view.question.subject_text
    ('卡尔·萨根曾受雇于哪所位于伊萨卡的学术机构？', '卡尔·萨根')

Each :class:`FactView` has two prompt forms (:class:`PromptForm`): the **question form**
(the record's ``question``, which states the relation in every language; the primary form)
and the **cloze form** (the text of ``o_prompt`` before the answer, see
:mod:`mlake_core.data.cloze`).  Both carry the original target and the edit target with
aliases, and the subject's character span inside that form's text.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlake_core.data.cache import cache_key, cache_path, read_cached, write_cached
from mlake_core.data.cloze import AnswerLocation, assess_cloze, locate_answer
from mlake_core.data.multihop import MultiHopQuestion, link_multi_hop, link_old_by_subject
from mlake_core.data.paths import (
    DEFAULT_VERSION,
    content_sha256,
    get_release,
    release_dir,
    resolve_data_dir,
)
from mlake_core.data.records import (
    MCQA_LETTERS,
    McqaRecord,
    SingleHopRecord,
    read_mcqa,
    read_single_hop,
)
from mlake_core.data.subjects import (
    DocumentFrequency,
    SubjectLocation,
    has_subject_rules,
    locate_subject,
)
from mlake_core.data.text import normalize
from mlake_core.errors import DataError
from mlake_core.languages import LANGUAGES, UnknownLanguageWarning, language, parse_langs

FormKind = Literal["question", "cloze"]


@dataclass(frozen=True)
class Span:
    """A character span ``[start, end)`` of a prompt text, with the text it covers."""

    start: int
    end: int
    text: str

    def to_dict(self) -> dict[str, Any]:
        return {"start": self.start, "end": self.end, "text": self.text}


@dataclass(frozen=True)
class Target:
    """An answer with its aliases.  An answer counts through any of :attr:`forms`."""

    text: str
    aliases: tuple[str, ...] = ()

    @property
    def forms(self) -> tuple[str, ...]:
        """The answer and its aliases, without duplicates, the answer first."""
        return tuple(dict.fromkeys((self.text, *self.aliases)))

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "aliases": list(self.aliases)}


@dataclass(frozen=True)
class PromptForm:
    """One way of asking a fact: the prompt text, the two targets and the subject span.

    Attributes:
        kind: ``question`` or ``cloze``.
        text: the prompt; for the cloze form the prefix of ``o_prompt`` before the answer
            (``None`` when no answer position was found).
        target: the original answer (what the unedited model should say).
        edit_target: the counterfactual answer that an edit installs.
        subject: the subject's span inside :attr:`text`, or ``None`` if not located there.
        usable: the question form is usable when it has a subject span; the cloze form when
            it is well-posed (see :mod:`mlake_core.data.cloze`).
        reason: why the form is not usable (``None`` when it is).
    """

    kind: FormKind
    text: str | None
    target: Target
    edit_target: Target
    subject: Span | None
    usable: bool
    reason: str | None

    @property
    def subject_text(self) -> str | None:
        return self.subject.text if self.subject else None

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "text": self.text,
            "target": self.target.to_dict(),
            "edit_target": self.edit_target.to_dict(),
            "subject": self.subject.to_dict() if self.subject else None,
            "usable": self.usable,
            "reason": self.reason,
        }


@dataclass(frozen=True)
class FactView:
    """One fact in one language.

    Attributes:
        fact_id: index of the parallel record (same in every language).
        lang: language code.
        record: the published record.
        question: the question form (primary for knowledge, editing and tracing).
        cloze: the cloze form; check ``cloze.usable`` before using it.
        answer: where the original answer stands in ``o_prompt`` (span and method).
        answer_at_end: whether only punctuation follows the answer in ``o_prompt``.
        prefix_is_question_start: whether the cloze prefix is the start of the question.
        subject: the subject-location evidence.
        mcqa: the multiple-choice version (v2024-04 only).
    """

    fact_id: int
    lang: str
    record: SingleHopRecord
    question: PromptForm
    cloze: PromptForm
    answer: Span | None
    answer_method: str | None
    answer_at_end: bool
    prefix_is_question_start: bool
    subject: SubjectLocation
    mcqa: McqaRecord | None = None

    @property
    def edit_is_noop(self) -> bool:
        """Whether the edit's new answer is one of the original answer's forms (NFKC,
        case-folded): a published quirk (2 French facts and 1 Japanese one), where an "edit"
        changes nothing and transfer cannot be measured."""
        old = {normalize(self.record.o_answer), *map(normalize, self.record.o_answer_aliases)}
        new = {normalize(self.record.e_answer), *map(normalize, self.record.e_answer_aliases)}
        return bool(old & new)

    def form(self, kind: FormKind) -> PromptForm:
        """The prompt form of the given kind."""
        return self.question if kind == "question" else self.cloze

    def to_dict(self) -> dict[str, Any]:
        return {
            "fact_id": self.fact_id,
            "lang": self.lang,
            "question": self.question.to_dict(),
            "cloze": self.cloze.to_dict(),
            "o_prompt": self.record.o_prompt,
            "e_prompt": self.record.e_prompt,
            "answer_in_o_prompt": self.answer.to_dict() if self.answer else None,
            "answer_method": self.answer_method,
            "answer_at_end": self.answer_at_end,
            "prefix_is_question_start": self.prefix_is_question_start,
            "subject_evidence": dict(self.subject.evidence),
            "subject_reason": self.subject.reason,
            "mcqa": (
                {
                    "options": list(self.mcqa.options),
                    "answer": MCQA_LETTERS[self.mcqa.answer_index],
                    "edit": MCQA_LETTERS[self.mcqa.edit_index]
                    if self.mcqa.edit_index is not None
                    else None,
                }
                if self.mcqa
                else None
            ),
        }


@dataclass(frozen=True)
class Fact:
    """One MLaKE fact: the parallel record in every loaded language.

    Attributes:
        fact_id: index of the record in every single-hop file.
        views: one :class:`FactView` per loaded language.
        multi_hop: multi-hop questions linked to this fact (all loaded languages).
    """

    fact_id: int
    views: Mapping[str, FactView]
    multi_hop: tuple[MultiHopQuestion, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "fact_id": self.fact_id,
            "views": {lang: v.to_dict() for lang, v in self.views.items()},
            "multi_hop": [m.to_dict() for m in self.multi_hop],
        }


@dataclass
class MlakeDataset:
    """The loaded benchmark: facts, multi-hop questions and provenance."""

    version: str
    root: Path
    langs: tuple[str, ...]
    facts: list[Fact]
    multi_hop: dict[str, list[MultiHopQuestion]] = field(default_factory=dict)
    content_sha256: str = ""
    #: Every language of the data folder (its matrices' full order); ``langs`` are the
    #: loaded ones.
    available: tuple[str, ...] = LANGUAGES

    @property
    def content_key(self) -> dict[str, str]:
        """What run keys add for the data's content: the located subjects
        (:attr:`subjects_sha256`: results read at the subject's tokens are never reused
        once the subject locator places a subject differently), and the data's hash for a
        copy that differs from the release as published (an edited answer never reuses
        results computed on other data)."""
        key = {"subjects": self.subjects_sha256[:16]}
        published = get_release(self.version).published_sha256
        if self.content_sha256 and self.content_sha256 != published:
            key["data_content"] = self.content_sha256
        return key

    @property
    def subjects_sha256(self) -> str:
        """SHA-256 over every loaded view's subject spans (question and cloze form), in fact
        and language order."""
        digest = hashlib.sha256()
        for fact in self.facts:
            for lang in self.langs:
                view = fact.views[lang]
                spans = [
                    (s.start, s.end) if s else None
                    for s in (view.question.subject, view.cloze.subject)
                ]
                digest.update(f"{fact.fact_id}\0{lang}\0{spans}\0".encode())
        return digest.hexdigest()

    def __len__(self) -> int:
        return len(self.facts)

    def fact(self, fact_id: int) -> Fact:
        """The fact with this id, or a DataError naming the valid range."""
        if not 0 <= fact_id < len(self.facts):
            raise DataError(
                f"fact id {fact_id} out of range: {self.version} has facts 0..{len(self.facts) - 1}"
            )
        return self.facts[fact_id]

    def views(self, lang: str) -> list[FactView]:
        """All views of one language, in fact order."""
        return [f.views[lang] for f in self.facts]


def _question_form(rec: SingleHopRecord, subj: SubjectLocation) -> PromptForm:
    span = (
        Span(subj.question[0], subj.question[1], rec.question[subj.question[0] : subj.question[1]])
        if subj.question
        else None
    )
    return PromptForm(
        kind="question",
        text=rec.question,
        target=Target(rec.o_answer, rec.o_answer_aliases),
        edit_target=Target(rec.e_answer, rec.e_answer_aliases),
        subject=span,
        usable=span is not None,
        reason=None if span else f"subject_not_found: {subj.reason}",
    )


def _cloze_form(
    rec: SingleHopRecord, lang: str, answer: AnswerLocation | None, subj: SubjectLocation
) -> tuple[PromptForm, bool, bool]:
    assessment = assess_cloze(rec, lang, answer, subj.cloze)
    prefix = assessment.prefix
    span = None
    if prefix is not None and subj.cloze and subj.cloze[1] <= len(prefix):
        span = Span(subj.cloze[0], subj.cloze[1], prefix[subj.cloze[0] : subj.cloze[1]])
    target = Target(rec.o_answer, rec.o_answer_aliases)
    edit = Target(rec.e_answer, rec.e_answer_aliases)
    if answer is not None:
        surface = rec.o_prompt[answer.start : answer.end]
        if surface != rec.o_answer:  # the sentence uses another form: it continues the prefix
            target = Target(surface, tuple(dict.fromkeys((rec.o_answer, *rec.o_answer_aliases))))
        if answer.edit_surface and answer.edit_surface != rec.e_answer:
            edit = Target(
                answer.edit_surface, tuple(dict.fromkeys((rec.e_answer, *rec.e_answer_aliases)))
            )
    form = PromptForm(
        kind="cloze",
        text=prefix,
        target=target,
        edit_target=edit,
        subject=span,
        usable=assessment.well_posed,
        reason=assessment.reason,
    )
    return form, assessment.answer_at_end, assessment.prefix_is_question_start


_GENERIC_WARNED: set[str] = set()


def _warn_generic_subjects(lang: str) -> None:
    """One :class:`~mlake_core.languages.UnknownLanguageWarning` per process for a language
    whose subjects are located by the generic rules: an unknown code warns through
    :func:`~mlake_core.languages.language`, a known one without subject rules here."""
    if language(lang).known and not has_subject_rules(lang) and lang not in _GENERIC_WARNED:
        _GENERIC_WARNED.add(lang)
        warnings.warn(
            f"language {lang!r}: the subject locator has no rules of its own for it; "
            "using the generic ones (spans at word boundaries, names by capitalization)",
            UnknownLanguageWarning,
            stacklevel=4,
        )


def load_mlake(
    data_dir: str | os.PathLike[str] | None = None,
    version: str = DEFAULT_VERSION,
    langs: str | Iterable[str] | None = None,
    *,
    cache: bool = True,
) -> MlakeDataset:
    """Load MLaKE single-hop facts (and multi-hop questions) in the given languages.

    Args:
        data_dir: the data directory (``None``: ``$MLAKE_DATA`` or the default, see
            :mod:`mlake_core.data.paths`).
        version: ``v2024-11`` (default, canonical) or ``v2024-04``.
        langs: languages to load (default: every language of the data folder, MLaKE's
            five first, see :meth:`~mlake_core.data.paths.Release.languages`).  Subjects
            are located with the help of all the folder's languages whatever is asked,
            because names shared across languages are part of the evidence.
        cache: read the located dataset from mlake's cache folder, and write it there when
            it is missing (:mod:`mlake_core.data.cache`: keyed by the data files' hash and
            the code version).

    Raises:
        DataError: for missing or malformed files (a language with any file present must
            have all of them), or language files of different lengths.
        ConfigError: for an unknown version, or a language the folder does not hold (the
            error lists those it holds).
    """
    release = get_release(version)
    root = resolve_data_dir(data_dir)
    base = release_dir(root, version)
    present = release.languages(base)
    if not present:
        raise DataError(
            f"{base}: no language files (expected {release.single_hop_qa.format(lang='<lang>')}"
            ", e.g. en)"
        )
    wanted = parse_langs(langs, present)
    for lang in present:  # the same error as reading them would give, before hashing
        path = base / release.single_hop_qa.format(lang=lang)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
    content = content_sha256(base, release)
    if not cache:
        return _build(root, version, wanted, content, present)
    key = cache_key(version, wanted, content, present)
    path = cache_path(key)
    dataset = read_cached(path, key)
    if isinstance(dataset, MlakeDataset):
        dataset.root = root  # the same content may be read from another folder
        return dataset
    dataset = _build(root, version, wanted, content, present)
    write_cached(path, key, dataset)
    return dataset


def _build(
    root: Path,
    version: str,
    wanted: tuple[str, ...],
    content: str,
    present: tuple[str, ...] = LANGUAGES,
) -> MlakeDataset:
    """Read, validate and locate the dataset (what :func:`load_mlake` caches)."""
    release = get_release(version)
    base = release_dir(root, version)
    for lang in present:
        _warn_generic_subjects(lang)
    records: dict[str, list[SingleHopRecord]] = {}
    for lang in present:
        records[lang] = read_single_hop(base / release.single_hop_qa.format(lang=lang))
    lengths = {lang: len(r) for lang, r in records.items()}
    if len(set(lengths.values())) != 1:
        detail = ", ".join(
            f"{base / release.single_hop_qa.format(lang=lang)}: {n}" for lang, n in lengths.items()
        )
        raise DataError(f"single-hop files are not parallel (record counts differ): {detail}")
    n_facts = lengths[present[0]]
    mcqa: dict[str, list[McqaRecord]] = {}
    if release.single_hop_mcqa:
        for lang in wanted:
            path = base / release.single_hop_mcqa.format(lang=lang)
            mcqa[lang] = read_mcqa(path, single_hop=True)
            if len(mcqa[lang]) != n_facts:
                raise DataError(
                    f"{path}: {len(mcqa[lang])} records, but the single-hop files have {n_facts}"
                )
    answers = {lang: [locate_answer(r) for r in records[lang]] for lang in present}
    # Multi-hop questions and n-gram statistics are evidence only for the languages asked for.
    # New multi-hop records link through the English edit sentence: without English, none do.
    multi_hop = link_multi_hop(base, release, wanted, records.get("en", []))
    mh_text: dict[str, dict[int, list[str]]] = {lang: {} for lang in wanted}
    for lang, questions in multi_hop.items():
        for q in questions:
            for fid in q.fact_ids:
                mh_text[lang].setdefault(fid, []).append(q.question)
    df = DocumentFrequency({lang: [r.question for r in records[lang]] for lang in wanted})

    subjects: dict[str, list[SubjectLocation]] = {}
    for lang in wanted:
        subjects[lang] = [
            locate_subject(
                lang,
                records[lang][i],
                answers[lang][i],
                mh_text[lang].get(i, []),
                {o: (records[o][i], answers[o][i]) for o in present if o != lang},
                df,
            )
            for i in range(n_facts)
        ]
        multi_hop[lang] = link_old_by_subject(
            multi_hop[lang], {i: s.text for i, s in enumerate(subjects[lang]) if s.text}
        )
    facts = []
    for i in range(n_facts):
        views = {}
        for lang in wanted:
            rec, ans, subj = records[lang][i], answers[lang][i], subjects[lang][i]
            c_form, at_end, q_start = _cloze_form(rec, lang, ans, subj)
            views[lang] = FactView(
                fact_id=i,
                lang=lang,
                record=rec,
                question=_question_form(rec, subj),
                cloze=c_form,
                answer=Span(ans.start, ans.end, rec.o_prompt[ans.start : ans.end]) if ans else None,
                answer_method=ans.method if ans else None,
                answer_at_end=at_end,
                prefix_is_question_start=q_start,
                subject=subj,
                mcqa=mcqa[lang][i] if lang in mcqa else None,
            )
        linked = tuple(
            q for lang in wanted for q in multi_hop[lang] if q.linked and i in q.fact_ids
        )
        facts.append(Fact(i, views, linked))
    return MlakeDataset(
        version=version,
        root=root,
        langs=wanted,
        facts=facts,
        multi_hop={lang: multi_hop[lang] for lang in wanted},
        content_sha256=content,
        available=present,
    )
