"""Reading and validating the raw MLaKE json files.

Every problem is reported as a :class:`~mlake_core.errors.DataError` that names the file and,
where it applies, the record index and field, so a broken file can be found and fixed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake_core.errors import DataError

SINGLE_HOP_FIELDS = (
    "question",
    "o_prompt",
    "o_answer",
    "o_answer_aliases",
    "e_prompt",
    "e_answer",
    "e_answer_aliases",
)
MCQA_LETTERS = "ABCDEFGH"


@dataclass(frozen=True)
class SingleHopRecord:
    """One single-hop record of one language file, as published (validated)."""

    question: str
    o_prompt: str
    o_answer: str
    o_answer_aliases: tuple[str, ...]
    e_prompt: str
    e_answer: str
    e_answer_aliases: tuple[str, ...]


@dataclass(frozen=True)
class MultiHopRecord:
    """One multi-hop record: ``old`` records ask for the original answer, ``new`` records
    for the answer after the edit described by ``e_prompt`` (always in English)."""

    kind: str  # "old" or "new"
    index: int
    question: str
    answer: str
    aliases: tuple[str, ...]
    e_prompt: str | None
    triples: tuple[tuple[str, str, str], ...] = ()


@dataclass(frozen=True)
class McqaRecord:
    """A multiple-choice record (v2024-04): options and the index of the correct one."""

    question: str
    options: tuple[str, ...]
    answer_index: int  # the correct option for the original fact (old) or the edit (new)
    edit_index: int | None  # single-hop only: the option stating the edit
    e_prompt: str | None = None
    problem: str | None = None  # why the record cannot be scored (e.g. an empty option)

    @property
    def usable(self) -> bool:
        return self.problem is None


def read_json_list(path: Path) -> list[dict[str, Any]]:
    """Read a json file that must hold a list of objects."""
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        with path.open(encoding="utf-8") as fh:
            data = json.load(fh)
    except json.JSONDecodeError as err:
        raise DataError(
            f"{path}: malformed JSON at line {err.lineno} column {err.colno}: {err.msg}"
        ) from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
    if not data:
        raise DataError(f"{path}: the file holds no records")
    for i, rec in enumerate(data):
        if not isinstance(rec, dict):
            raise DataError(f"{path}: record {i}: expected an object, found {type(rec).__name__}")
    return data


def _text(path: Path, i: int, rec: dict[str, Any], field: str, *, allow_empty: bool = False) -> str:
    if field not in rec:
        raise DataError(f"{path}: record {i}: missing field {field!r}")
    value = rec[field]
    if not isinstance(value, str):
        raise DataError(
            f"{path}: record {i}: field {field!r} must be a string, found {type(value).__name__}"
        )
    if not allow_empty and not value.strip():
        raise DataError(f"{path}: record {i}: field {field!r} is empty")
    return value


def _aliases(path: Path, i: int, rec: dict[str, Any], field: str) -> tuple[str, ...]:
    if field not in rec:
        raise DataError(f"{path}: record {i}: missing field {field!r}")
    value = rec[field]
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise DataError(f"{path}: record {i}: field {field!r} must be a list of strings")
    # Empty aliases carry no information; duplicates would double-count probability mass.
    return tuple(dict.fromkeys(v for v in value if v.strip()))


def read_single_hop(path: Path) -> list[SingleHopRecord]:
    """Read and validate one ``{lang}_qa.json`` single-hop file."""
    out = []
    for i, rec in enumerate(read_json_list(path)):
        out.append(
            SingleHopRecord(
                question=_text(path, i, rec, "question"),
                o_prompt=_text(path, i, rec, "o_prompt"),
                o_answer=_text(path, i, rec, "o_answer").strip(),
                o_answer_aliases=_aliases(path, i, rec, "o_answer_aliases"),
                e_prompt=_text(path, i, rec, "e_prompt"),
                e_answer=_text(path, i, rec, "e_answer").strip(),
                e_answer_aliases=_aliases(path, i, rec, "e_answer_aliases"),
            )
        )
    return out


def _triples(path: Path, i: int, rec: dict[str, Any]) -> tuple[tuple[str, str, str], ...]:
    raw = rec.get("triples")
    if raw is None:
        return ()
    if not isinstance(raw, list):
        raise DataError(f"{path}: record {i}: field 'triples' must be a list")
    out = []
    for t in raw:
        if isinstance(t, dict):
            t = [t.get("subject"), t.get("relation"), t.get("object")]
        if not (isinstance(t, list | tuple) and len(t) == 3 and all(isinstance(x, str) for x in t)):
            raise DataError(f"{path}: record {i}: malformed triple {t!r}")
        out.append((t[0], t[1], t[2]))
    return tuple(out)


def read_multi_hop(path: Path, kind: str) -> list[MultiHopRecord]:
    """Read and validate one ``{old,new}_{lang}_qa.json`` multi-hop file."""
    prefix = "o" if kind == "old" else "e"
    out = []
    for i, rec in enumerate(read_json_list(path)):
        out.append(
            MultiHopRecord(
                kind=kind,
                index=i,
                question=_text(path, i, rec, "question"),
                answer=_text(path, i, rec, f"{prefix}_answer").strip(),
                aliases=_aliases(path, i, rec, f"{prefix}_answer_aliases"),
                e_prompt=_text(path, i, rec, "e_prompt") if kind == "new" else None,
                triples=_triples(path, i, rec),
            )
        )
    return out


def _letter(path: Path, i: int, rec: dict[str, Any], field: str, n_options: int) -> int:
    letter = _text(path, i, rec, field).strip().upper()
    idx = MCQA_LETTERS.find(letter)
    if len(letter) != 1 or idx < 0 or idx >= n_options:
        raise DataError(
            f"{path}: record {i}: field {field!r} = {letter!r} is not one of the "
            f"{n_options} option letters"
        )
    return idx


def read_mcqa(path: Path, *, single_hop: bool, kind: str | None = None) -> list[McqaRecord]:
    """Read a multiple-choice file (v2024-04).

    Single-hop files give ``o_answer`` (letter of the original fact) and ``e_answer`` (letter
    of the edit). Multi-hop files give one letter in ``e_answer``: the correct option for the
    original chain (old files) or for the edited chain (new files).
    """
    out = []
    for i, rec in enumerate(read_json_list(path)):
        options = rec.get("options")
        if not isinstance(options, list) or len(options) < 2:
            raise DataError(f"{path}: record {i}: field 'options' must be a list of >= 2 strings")
        if not all(isinstance(o, str) for o in options):
            raise DataError(f"{path}: record {i}: 'options' holds a non-string option")
        # Seven published v2024-04 records (fr, de) have an empty option: keep the record,
        # mark it unusable for multiple-choice scoring, and let the stats count it.
        empty = [MCQA_LETTERS[k] for k, o in enumerate(options) if not o.strip()]
        problem = f"empty option {', '.join(empty)}" if empty else None
        if single_hop:
            answer = _letter(path, i, rec, "o_answer", len(options))
            edit: int | None = _letter(path, i, rec, "e_answer", len(options))
        else:
            answer = _letter(path, i, rec, "e_answer", len(options))
            edit = None
        out.append(
            McqaRecord(
                question=_text(path, i, rec, "question"),
                options=tuple(options),
                answer_index=answer,
                edit_index=edit,
                e_prompt=rec.get("e_prompt") if kind == "new" else None,
                problem=problem,
            )
        )
    return out
