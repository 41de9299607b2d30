"""Other multilingual editing datasets as MLaKE's objects: the records, views and dataset
that the readers (:mod:`mlake_core.data.mzsre`, :mod:`mlake_core.data.bmike`) build, and the
guards of the stages that need what some datasets lack.

Which datasets there are, and ``--dataset NAME``, is the registry's
(:mod:`mlake_core.data.sources`).

Every reader returns the same objects as MLaKE's (:class:`~mlake_core.data.dataset.Fact`
with one :class:`~mlake_core.data.dataset.FactView` per language), so the analyses take them
unchanged.  What the other datasets have and MLaKE has not, and the other way round:

- **No statement sentences** (MLaKE's ``o_prompt``): the cloze form is never usable
  (reason ``no_statement``); ``record.o_prompt`` holds the question, and ``record.e_prompt``
  (the new fact, which IKE shows in context) is the question followed by the new answer, as
  the datasets' own in-context editing code writes a new fact.
- **The subject is given**, not located: the question form's subject span is where the
  given subject occurs in the question (exactly, else ignoring case).  Where it does not,
  but the English side's subject does (MzsRE translated the subject apart from the question,
  which often keeps the English name: ``Ruf den Arzt`` for "Welcher Künstler hat Call the
  Doctor geschaffen?"), the span is the English subject's (method ``given_english``,
  counted in :attr:`ExternalDataset.subject_from_english`).  Where neither occurs (an
  inflected form in Slavic languages, a transliteration) the view keeps no span,
  its question form is not usable (reason ``subject_not_in_prompt``; the subject stages skip
  it and count it) and :attr:`ExternalDataset.subject_not_in_prompt` counts it per language.
- **No original answer** in zsRE-based data (MzsRE, BMIKE-53's zsRE task): the target is
  empty and :attr:`ExternalDataset.has_original_answers` is false.  These are edit
  benchmarks: the knowledge stage still scores the new answer (the unedited model's rate of
  giving it is every edit's prior) and reports knowledge as not measurable; edits and their
  evaluation run; the stages that need the original answer refuse
  (:func:`require_original_answers`).
- **The subject is not needed to ask a question**: the knowledge measures ask a question
  form whose subject was not placed (:func:`~mlake_core.metrics.knowledge.askable`); the
  subject stages (tracing, ROME/MEMIT edits) skip it, counted.
- **Generalization, locality and portability** come per view
  (:class:`ExternalView`: ``rephrase``, ``locality``, ``portability``), in every test
  language, and the transfer analysis reads them (:func:`analysis.transfer.evaluate_edit`):
  generalization asks ``rephrase`` (form ``rephrase``), locality asks the record's own
  ``loc`` question for ``loc_ans`` (instead of sampled other facts), and the portability
  question is also the fact's multi-hop "new" question in that language
  (:attr:`~mlake_core.data.dataset.Fact.multi_hop`, ``link`` ``record``: the record gives
  it), which the transfer analysis scores as portability.
- A dataset without subjects would set :attr:`ExternalDataset.has_subjects` false; the
  stages that need the subject refuse it (:func:`require_subjects`).  Both datasets read
  here give a subject in every record.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from mlake_core.data.dataset import Fact, FactView, MlakeDataset, PromptForm, Span, Target
from mlake_core.data.multihop import MultiHopQuestion
from mlake_core.data.records import SingleHopRecord
from mlake_core.data.subjects import SubjectLocation
from mlake_core.errors import ConfigError, DataError
from mlake_core.languages import is_unspaced


@dataclass(frozen=True)
class EditRecord:
    """One language side of one published record of an editing dataset (validated).

    Attributes:
        prompt: the edit/test question (MzsRE and BMIKE-53 ``src``).
        new_answer: the answer the edit installs (``alt``).
        old_answer: the original answer (BMIKE-53 ``old``; ``None`` in zsRE-based data).
        subject: the subject as the dataset gives it (``None`` when it gives none).
        rephrase: a paraphrase of the question (generalization), or ``None``.
        locality_prompt: an unrelated question whose answer must not change.
        locality_answer: its answer.
        portability_prompt: a question whose answer follows from the edit.
        portability_answer: its answer after the edit.
        case_id: the record's id in the dataset (BMIKE-53 ``case_id``), else ``None``.
    """

    prompt: str
    new_answer: str
    old_answer: str | None
    subject: str | None
    rephrase: str | None
    locality_prompt: str | None
    locality_answer: str | None
    portability_prompt: str | None
    portability_answer: str | None
    case_id: int | None = None


@dataclass(frozen=True)
class ExternalView(FactView):
    """A :class:`~mlake_core.data.dataset.FactView` of another dataset, with its extra
    prompts.

    Attributes:
        source: the published language side of the record.
        rephrase: the generalization form (the paraphrased question, same targets and subject
            span where the subject occurs in it), or ``None``.
        locality: ``(prompt, answer)`` of an unrelated fact, or ``None``.
        portability: ``(prompt, answer)`` of a fact that follows from the edit, or ``None``.
    """

    source: EditRecord | None = None
    rephrase: PromptForm | None = None
    locality: tuple[str, str] | None = None
    portability: tuple[str, str] | None = None

    @property
    def has_original_answer(self) -> bool:
        """Whether the record gives the original answer (zsRE-based data does not)."""
        return self.source is None or self.source.old_answer is not None

    def rephrased(self) -> ExternalView | None:
        """This view with the rephrase as its question form (what generalization asks), or
        ``None`` when the record has no rephrase."""
        if self.rephrase is None:
            return None
        return replace(self, question=self.rephrase)

    def locality_view(self) -> ExternalView | None:
        """This view with the record's locality question as its question form, its answer
        ``loc_ans`` as the target (what the model must keep giving after an edit), or
        ``None`` when the record has none.  Its ``source`` is dropped: its target is
        ``loc_ans``, not an answer of the record (so it has an original answer)."""
        if self.locality is None:
            return None
        prompt, answer = self.locality
        form = PromptForm(
            kind="question",
            text=prompt,
            target=Target(answer),
            edit_target=Target(""),
            subject=None,
            usable=False,
            reason="locality question: no subject",
        )
        return replace(self, question=form, source=None)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(
            rephrase=self.rephrase.to_dict() if self.rephrase else None,
            locality=list(self.locality) if self.locality else None,
            portability=list(self.portability) if self.portability else None,
            case_id=self.source.case_id if self.source else None,
        )
        return out


@dataclass
class ExternalDataset(MlakeDataset):
    """A dataset other than MLaKE, read into facts and views (module docstring).

    ``version`` is the dataset's registry name (it enters run keys as ``data_version``).

    Attributes:
        title: what to call the dataset in messages (``MzsRE``, ``BMIKE-53 (zsRE)``).
        provenance: where the files come from (repository and commit).
        with_subjects: whether the dataset gives subjects (:attr:`has_subjects`).
        with_original_answers: whether it gives original answers.
        subject_not_in_prompt: per language, the fact ids whose given subject does not occur
            in the question, nor the English side's (their question form is not usable).
        subject_from_english: per language, the fact ids whose span is the English side's
            subject (the given one does not occur in the question).
        skipped: per language, the record indices left out because the file has no side in
            that language for them (counted, never silently).
        files: the files read, relative to ``root``.
    """

    title: str = ""
    provenance: str = ""
    with_subjects: bool = True
    with_original_answers: bool = True
    subject_not_in_prompt: dict[str, list[int]] = field(default_factory=dict)
    subject_from_english: dict[str, list[int]] = field(default_factory=dict)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return self.version

    @property
    def has_subjects(self) -> bool:
        """Whether the dataset gives a subject for its records."""
        return self.with_subjects

    @property
    def has_original_answers(self) -> bool:
        """Whether the dataset gives the original answer (what the unedited model knows)."""
        return self.with_original_answers

    @property
    def content_key(self) -> dict[str, str]:
        """Run keys name the data's content and the subject spans (always: there is no
        published hash to leave out)."""
        return {"subjects": self.subjects_sha256[:16], "data_content": self.content_sha256}

    def fact(self, fact_id: int) -> Fact:
        """The fact with this id (the record's index in the files), or a DataError."""
        for f in self.facts:
            if f.fact_id == fact_id:
                return f
        ids = [f.fact_id for f in self.facts]
        span = f"{min(ids)}..{max(ids)}" if ids else "none"
        raise DataError(f"fact id {fact_id} not in {self.title} as loaded (fact ids {span})")

    def view(self, fact_id: int, lang: str) -> ExternalView:
        """The view of fact ``fact_id`` in ``lang``, with its extra prompts."""
        view = self.fact(fact_id).views[lang]
        assert isinstance(view, ExternalView)
        return view

    def summary(self) -> dict[str, Any]:
        """What was read: facts, languages, and the counts of records left out or without a
        usable subject span."""
        return {
            "dataset": self.version,
            "title": self.title,
            "provenance": self.provenance,
            "root": str(self.root),
            "facts": len(self.facts),
            "langs": list(self.langs),
            "has_subjects": self.has_subjects,
            "has_original_answers": self.has_original_answers,
            "subject_not_in_prompt": {k: len(v) for k, v in self.subject_not_in_prompt.items()},
            "subject_from_english": {k: len(v) for k, v in self.subject_from_english.items()},
            "skipped_records": {k: len(v) for k, v in self.skipped.items()},
        }


# --- guards the stages call -------------------------------------------------------------


def dataset_title(dataset: Any) -> str:
    """The dataset's name for messages (``MLaKE`` for MLaKE)."""
    return dataset.title if isinstance(dataset, ExternalDataset) else "MLaKE"


def require_subjects(dataset: Any, what: str) -> None:
    """Refuse ``what`` (a stage that reads the subject's tokens) on a dataset without
    subjects.

    Raises:
        ConfigError: naming the dataset and the stages that need no subject.
    """
    if isinstance(dataset, ExternalDataset) and not dataset.has_subjects:
        raise ConfigError(
            f"{what} needs each fact's subject, and {dataset.title} gives none; on this "
            "dataset run the analyses that need no subject (FT/IKE edits and transfer, the "
            "last-position logit lens, probes)"
        )


def require_original_answers(dataset: Any, what: str) -> None:
    """Refuse ``what`` (a stage that scores the original answer) on a dataset without one.

    Raises:
        ConfigError: naming the dataset and why.
    """
    if isinstance(dataset, ExternalDataset) and not dataset.has_original_answers:
        raise ConfigError(
            f"{what} scores each fact's original answer, and {dataset.title} gives none "
            "(its records hold only the new answer of the edit); use a dataset with "
            "original answers (mlake, bmike53-counterfact, bmike53-wfd), or run the edits "
            "(mlake edit transfer), which this dataset measures"
        )


def has_original_answers(dataset: Any) -> bool:
    """Whether ``dataset`` gives original answers (MLaKE does; MzsRE and BMIKE-53's zsRE
    task do not)."""
    return not isinstance(dataset, ExternalDataset) or dataset.has_original_answers


def has_own_measures(dataset: Any) -> bool:
    """Whether ``dataset``'s views carry their own generalization and locality prompts
    (``rephrase``, ``locality``), which edit evaluation then reads."""
    return isinstance(dataset, ExternalDataset)


# --- building facts from records ---------------------------------------------------------


def subject_span(text: str, subject: str | None) -> Span | None:
    """Where ``subject`` occurs in ``text``: the first exact occurrence, else the first
    occurrence ignoring case (only where lower-casing keeps the length); ``None`` when it
    does not occur."""
    if not subject or not subject.strip():
        return None
    start = text.find(subject)
    if start < 0 and len(text.lower()) == len(text) and len(subject.lower()) == len(subject):
        start = text.lower().find(subject.lower())
    if start < 0:
        return None
    return Span(start, start + len(subject), text[start : start + len(subject)])


def new_fact_statement(lang: str, prompt: str, answer: str) -> str:
    """The new fact as the datasets' in-context editing code writes it: the question, then
    the new answer (joined without a space in unspaced languages)."""
    sep = "" if is_unspaced(lang) else " "
    return f"{prompt.rstrip()}{sep}{answer}"


def build_view(
    fact_id: int, lang: str, rec: EditRecord, title: str, english_subject: str | None = None
) -> tuple[ExternalView, str]:
    """The view of one record side, and how its subject span was found: ``given``,
    ``given_english`` (``english_subject`` occurs in the question, the given one does not),
    ``none`` (neither) or ``no_subject`` (the dataset gives none)."""
    old = Target(rec.old_answer or "")
    new = Target(rec.new_answer)
    span = subject_span(rec.prompt, rec.subject)
    method = "given"
    if span is None and english_subject and english_subject != rec.subject:
        span = subject_span(rec.prompt, english_subject)
        method = "given_english"
    if span is None:
        method = "none" if rec.subject is not None else "no_subject"
    if rec.subject is None:
        reason: str | None = f"no_subject: {title} gives no subject"
    elif span is None:
        reason = f"subject_not_in_prompt: {rec.subject!r} does not occur in the question"
    else:
        reason = None
    question = PromptForm(
        kind="question",
        text=rec.prompt,
        target=old,
        edit_target=new,
        subject=span,
        usable=span is not None,
        reason=reason,
    )
    cloze = PromptForm(
        kind="cloze",
        text=None,
        target=old,
        edit_target=new,
        subject=None,
        usable=False,
        reason=f"no_statement: {title} gives no statement sentence",
    )
    rephrase = None
    if rec.rephrase is not None:
        r_span = subject_span(rec.rephrase, rec.subject) or subject_span(
            rec.rephrase, english_subject if method == "given_english" else None
        )
        rephrase = PromptForm(
            kind="question",
            text=rec.rephrase,
            target=old,
            edit_target=new,
            subject=r_span,
            usable=r_span is not None,
            reason=None if r_span else "subject_not_in_prompt",
        )
    record = SingleHopRecord(
        question=rec.prompt,
        o_prompt=rec.prompt,
        o_answer=rec.old_answer or "",
        o_answer_aliases=(),
        e_prompt=new_fact_statement(lang, rec.prompt, rec.new_answer),
        e_answer=rec.new_answer,
        e_answer_aliases=(),
    )
    located = SubjectLocation(
        text=span.text if span else rec.subject,
        question=(span.start, span.end) if span else None,
        cloze=None,
        method=method,
        score=1.0 if span else 0.0,
        evidence={},
        reason=None if span else reason,
    )
    loc = (
        (rec.locality_prompt, rec.locality_answer)
        if rec.locality_prompt is not None and rec.locality_answer is not None
        else None
    )
    port = (
        (rec.portability_prompt, rec.portability_answer)
        if rec.portability_prompt is not None and rec.portability_answer is not None
        else None
    )
    view = ExternalView(
        fact_id=fact_id,
        lang=lang,
        record=record,
        question=question,
        cloze=cloze,
        answer=None,
        answer_method=None,
        answer_at_end=False,
        prefix_is_question_start=False,
        subject=located,
        source=rec,
        rephrase=rephrase,
        locality=loc,
        portability=port,
    )
    return view, method


def build_dataset(
    *,
    name: str,
    title: str,
    provenance: str,
    root: Path,
    langs: Sequence[str],
    records: Mapping[str, Mapping[int, EditRecord]],
    n_records: int,
    skipped: Mapping[str, list[int]],
    files: Sequence[Path],
    with_subjects: bool,
    with_original_answers: bool,
    english: Mapping[int, EditRecord] | None = None,
) -> ExternalDataset:
    """Facts from per-language records keyed by record index: a fact for every index that
    has a record in every language asked for (the others are in ``skipped``).  ``english``:
    the English sides, whose subject is the fallback of the other languages' spans."""
    not_in_prompt: dict[str, list[int]] = {lang: [] for lang in langs}
    from_english: dict[str, list[int]] = {lang: [] for lang in langs}
    facts = []
    for i in range(n_records):
        if any(i not in records[lang] for lang in langs):
            continue
        views = {}
        en = english.get(i) if english is not None else None
        for lang in langs:
            fallback = en.subject if en is not None and lang != "en" else None
            view, method = build_view(i, lang, records[lang][i], title, fallback)
            views[lang] = view
            if method == "none":
                not_in_prompt[lang].append(i)
            elif method == "given_english":
                from_english[lang].append(i)
        portability = tuple(
            MultiHopQuestion(
                lang=lang,
                kind="new",
                index=i,
                question=view.portability[0],
                answer=view.portability[1],
                aliases=(),
                e_prompt=None,
                fact_ids=(i,),
                link="record",
            )
            for lang, view in views.items()
            if view.portability is not None
        )
        facts.append(Fact(i, views, portability))
    if not facts:
        raise DataError(
            f"{root}: no record of {title} has every language asked for ({', '.join(langs)})"
        )
    return ExternalDataset(
        version=name,
        root=root,
        langs=tuple(langs),
        facts=facts,
        multi_hop={
            lang: [q for f in facts for q in f.multi_hop if q.lang == lang] for lang in langs
        },
        content_sha256=files_sha256(root, files),
        title=title,
        provenance=provenance,
        with_subjects=with_subjects,
        with_original_answers=with_original_answers,
        subject_not_in_prompt=not_in_prompt,
        subject_from_english=from_english,
        skipped={k: list(v) for k, v in skipped.items()},
        files=tuple(str(p.relative_to(root)) for p in files),
    )


def files_sha256(root: Path, files: Iterable[Path]) -> str:
    """SHA-256 over the files read (their paths under ``root`` and their bytes)."""
    digest = hashlib.sha256()
    for path in sorted(files):
        digest.update(str(path.relative_to(root)).encode() + b"\0")
        digest.update(path.read_bytes())
    return digest.hexdigest()


# --- validation helpers the readers share ------------------------------------------------


def field_text(
    path: Path, i: int, side: str, rec: Mapping[str, Any], name: str, *, allow_empty: bool = False
) -> str:
    """A string field of one language side of a record, or a DataError naming the file,
    the record index, the side and the field."""
    if name not in rec:
        raise DataError(f"{path}: record {i} [{side}]: missing field {name!r}")
    value = rec[name]
    if not isinstance(value, str):
        raise DataError(
            f"{path}: record {i} [{side}]: field {name!r} must be a string, "
            f"found {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise DataError(f"{path}: record {i} [{side}]: field {name!r} is empty")
    return value


def parse_wanted(
    langs: str | Iterable[str] | None, available: Sequence[str], title: str
) -> tuple[str, ...]:
    """The languages asked for, each one the dataset has (``None``/``all``: every one)."""
    if langs is None:
        return tuple(available)
    items = [v.strip() for v in langs.split(",")] if isinstance(langs, str) else list(langs)
    items = [v for v in items if v]
    if items == ["all"]:
        return tuple(available)
    if not items:
        raise ConfigError(f"empty language list; {title} has {', '.join(available)}")
    unknown = [v for v in items if v not in available]
    if unknown:
        raise ConfigError(
            f"language(s) {', '.join(map(repr, unknown))} not in {title}; it has "
            f"{', '.join(available)} (pass --langs)"
        )
    return tuple(dict.fromkeys(items))


def require_dir(data_dir: str | os.PathLike[str] | None, name: str, title: str) -> Path:
    """The folder a reader reads: given, and a folder."""
    if data_dir is None:
        raise ConfigError(
            f"--dataset {name}: give --data-dir, the folder holding {title}'s files "
            f"(mlake data fetch --dataset {name} --dest DIR downloads them)"
        )
    root = Path(data_dir)
    if not root.is_dir():
        raise DataError(f"{root}: not a folder ({title} data)")
    return root
