"""Multi-hop questions and their link to single-hop facts.

MLaKE's multi-hop files are not parallel across languages and carry no fact index.  Links:

- ``new`` records carry the English edit sentence ``e_prompt``, which equals the English
  single-hop ``e_prompt`` of their fact: link ``e_prompt`` (exact, then whitespace/case
  normalized).
- ``old`` records carry only a question and the original answer.  An old question that is
  word for word a new question of the same language belongs to the same fact (link
  ``question``).  Otherwise, once subjects are located, an old question that mentions the
  subject of exactly one fact is linked to it (link ``subject``); one that mentions the
  subjects of several facts (or a subject shared by several facts) stays ``ambiguous``, with
  the candidates listed, and one that mentions none as
  ``unlinked``.  Nothing is forced.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mlake_core.data.paths import Release
from mlake_core.data.records import McqaRecord, SingleHopRecord, read_mcqa, read_multi_hop
from mlake_core.data.text import normalize
from mlake_core.errors import DataError


@dataclass(frozen=True)
class MultiHopQuestion:
    """One multi-hop question.

    Attributes:
        lang: language of the question.
        kind: ``old`` (answered by the original chain) or ``new`` (after the edit).
        index: record index in its file.
        question: the question text.
        answer: the expected answer; ``aliases`` its other forms.
        e_prompt: the English edit sentence (new records only).
        fact_ids: linked single-hop fact(s); for ``ambiguous`` the candidates.
        link: ``e_prompt``, ``question``, ``subject``, ``ambiguous`` or ``unlinked``.
        options: multiple-choice options (v2024-04), and ``answer_index`` the correct one.
        triples: Wikidata (subject, relation, object) ids where the file has them.
    """

    lang: str
    kind: str
    index: int
    question: str
    answer: str
    aliases: tuple[str, ...]
    e_prompt: str | None
    fact_ids: tuple[int, ...]
    link: str
    options: tuple[str, ...] = ()
    answer_index: int | None = None
    mcqa_problem: str | None = None
    triples: tuple[tuple[str, str, str], ...] = ()

    @property
    def linked(self) -> bool:
        """Linked to exactly the fact(s) in :attr:`fact_ids` (not ambiguous)."""
        return self.link in ("e_prompt", "question", "subject")

    def to_dict(self) -> dict[str, Any]:
        return {
            "lang": self.lang,
            "kind": self.kind,
            "index": self.index,
            "question": self.question,
            "answer": self.answer,
            "aliases": list(self.aliases),
            "e_prompt": self.e_prompt,
            "fact_ids": list(self.fact_ids),
            "link": self.link,
            "options": list(self.options),
            "answer_index": self.answer_index,
            "mcqa_problem": self.mcqa_problem,
        }


def _key(text: str) -> str:
    return normalize(text)


def link_multi_hop(
    base: Path,
    release: Release,
    langs: Sequence[str],
    english: Sequence[SingleHopRecord],
) -> dict[str, list[MultiHopQuestion]]:
    """Read the multi-hop files of ``langs`` and link them by ``e_prompt`` and question text.

    Args:
        base: the release's ``dataset/`` folder.
        release: its layout.
        langs: languages to read.
        english: the English single-hop records (their ``e_prompt`` is the link key).
    """
    by_eprompt: dict[str, int] = {}
    for i, rec in enumerate(english):
        by_eprompt.setdefault(_key(rec.e_prompt), i)
    out: dict[str, list[MultiHopQuestion]] = {}
    for lang in langs:
        questions: list[MultiHopQuestion] = []
        new_by_question: dict[str, tuple[int, ...]] = {}
        for kind in ("new", "old"):
            path = base / release.multi_hop_qa.format(kind=kind, lang=lang)
            recs = read_multi_hop(path, kind)
            mcqa: list[McqaRecord] = []
            mpath = path
            if release.multi_hop_mcqa:
                mpath = base / release.multi_hop_mcqa.format(kind=kind, lang=lang)
                mcqa = read_mcqa(mpath, single_hop=False, kind=kind)
                if len(mcqa) != len(recs):
                    raise DataError(f"{mpath}: {len(mcqa)} records, but {path} has {len(recs)}")
            for r in recs:
                fact_ids: tuple[int, ...] = ()
                link = "unlinked"
                if kind == "new" and r.e_prompt is not None:
                    fid = by_eprompt.get(_key(r.e_prompt))
                    if fid is not None:
                        fact_ids, link = (fid,), "e_prompt"
                        ids = new_by_question.get(_key(r.question), ())
                        new_by_question[_key(r.question)] = tuple(dict.fromkeys((*ids, fid)))
                elif kind == "old" and _key(r.question) in new_by_question:
                    fact_ids, link = new_by_question[_key(r.question)], "question"
                m = mcqa[r.index] if mcqa else None
                if m is not None and _key(m.question) != _key(r.question):
                    raise DataError(
                        f"{mpath}: record {r.index}: question differs from record {r.index} "
                        f"of {path}"
                    )
                questions.append(
                    MultiHopQuestion(
                        lang=lang,
                        kind=kind,
                        index=r.index,
                        question=r.question,
                        answer=r.answer,
                        aliases=r.aliases,
                        e_prompt=r.e_prompt,
                        fact_ids=fact_ids,
                        link=link,
                        options=m.options if m else (),
                        answer_index=m.answer_index if m else None,
                        mcqa_problem=m.problem if m else None,
                        triples=r.triples,
                    )
                )
        out[lang] = questions
    return out


def link_old_by_subject(
    questions: Sequence[MultiHopQuestion], subjects: Mapping[int, str]
) -> list[MultiHopQuestion]:
    """Second pass: link unlinked ``old`` questions through the subject they mention.

    Args:
        questions: one language's multi-hop questions.
        subjects: fact id -> subject text in that language (facts with a located subject).
    """
    by_subject: dict[str, list[int]] = {}
    for fid, subj in subjects.items():
        by_subject.setdefault(subj, []).append(fid)
    norms = {s: normalize(s) for s in by_subject if len(normalize(s)) >= 2}
    out = []
    for q in questions:
        if q.kind != "old" or q.linked:
            out.append(q)
            continue
        qn = normalize(q.question)
        hits = [s for s, n in norms.items() if n in qn]
        # Drop subjects contained in a longer matching subject ("Paul" inside "Paul V.").
        hits = [s for s in hits if not any(s != t and norms[s] in norms[t] for t in hits)]
        facts = sorted({fid for s in hits for fid in by_subject[s]})
        if len(facts) == 1:
            out.append(replace(q, fact_ids=tuple(facts), link="subject"))
        elif facts:  # several facts share the subject (or several subjects match)
            out.append(replace(q, fact_ids=tuple(facts), link="ambiguous"))
        else:
            out.append(q)
    return out
