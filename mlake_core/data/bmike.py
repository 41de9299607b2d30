"""BMIKE-53 (Nie, Shao, Ding, Wang, Schmid and Schütze 2024, "BMIKE-53: Investigating
Cross-Lingual Knowledge Editing with In-Context Learning", arXiv:2406.17764) as
:class:`~mlake_core.data.dataset.Fact` objects, one task at a time.

Schema, confirmed from the public repository ``shaobo9856/IKE`` (the paper's code; its
README is titled BMIKE-53) at commit ``a9b7cac588ffcbf1ca313dbd49dbc35c2d0f7b33``, branch
``main``, folder ``data/BMIKE53/``, and the runner ``search/icl.py`` that reads the files:

- Three tasks, one folder each: ``zsRE/zsre_test_{lang}.json`` (743 records),
  ``CounterFact/counterfact_test_{lang}.json`` (1031) and
  ``WikiFactDiff/wfd_test_{lang}.json`` (784), for 52 languages besides English.  The runner
  edits in English (``--lang1 en``) and tests in ``lang``.
- Each file is a JSON list; a record is an object with the key ``en`` and, in almost every
  record, the key ``lang``: two language sides with these fields:

  ``case_id``    the record's id in the source dataset (an integer; equal on both sides);
  ``subject``    the subject as written in that language;
  ``src``        the question that states the fact to edit (edit prompt in English, test
                 prompt in ``lang``);
  ``rephrase``   a paraphrase of ``src`` (generalization);
  ``old``        the original answer (CounterFact and WikiFactDiff only; zsRE has none);
  ``alt``        the new answer the edit installs;
  ``loc``        an unrelated question (locality);
  ``loc_ans``    its answer;
  ``port``       a question whose answer follows from the edit (portability);
  ``port_ans``   its answer after the edit.

- Records are parallel by index across a task's files (the English sides agree).
- Published quirks this reader handles, each counted, none guessed:

  * Some records have only the ``en`` side (e.g. 39 of ``zsre_test_he.json``, 17 of
    ``counterfact_test_he.json``): the fact is left out when that language is loaded, and
    :attr:`~mlake_core.data.sources.ExternalDataset.skipped` lists the record indices.
  * ``WikiFactDiff/wfd_test_af.json`` record 491 (``case_id`` 3121) writes the ``old``
    field's key in Afrikaans, ``oud``: read as ``old`` (:data:`KEY_QUIRKS`).
  * Five WikiFactDiff records give an empty ``loc_ans`` in every file: their views have no
    locality question (``locality`` is ``None``).
  * ``zsRE/zsre_test_la.json`` record 365 has an extra key ``female``: extra keys are
    ignored.
  * ``*_test_en.json`` are not English-only files (``counterfact_test_en.json`` is a copy of
    the German file) and ``*_test.json`` hold the English sides alone: neither is read;
    English comes from the ``en`` side of the language files read.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlake_core.data.external import (
    EditRecord,
    ExternalDataset,
    build_dataset,
    field_text,
    parse_wanted,
    require_dir,
)
from mlake_core.data.records import read_json_list
from mlake_core.errors import DataError

REPO = "shaobo9856/IKE"
COMMIT = "a9b7cac588ffcbf1ca313dbd49dbc35c2d0f7b33"
FOLDER = "data/BMIKE53"

#: BMIKE-53's languages (English first, then the 52 others as the files name them).
BMIKE_LANGUAGES: tuple[str, ...] = (
    "en", "af", "ar", "az", "be", "bg", "bn", "ca", "ceb", "cs", "cy", "da", "de", "el", "es",
    "et", "eu", "fa", "fi", "fr", "ga", "gl", "he", "hi", "hr", "hu", "hy", "id", "it", "ja",
    "ka", "ko", "la", "lt", "lv", "ms", "nl", "pl", "pt", "ro", "ru", "sk", "sl", "sq", "sr",
    "sv", "ta", "th", "tr", "uk", "ur", "vi", "zh",
)  # fmt: skip


@dataclass(frozen=True)
class Task:
    """One BMIKE-53 task: its folder, file prefix and whether it gives original answers."""

    key: str
    name: str
    title: str
    folder: str
    prefix: str
    n_records: int
    has_old: bool

    def path(self, root: Path, lang: str) -> Path:
        return root / self.folder / f"{self.prefix}{lang}.json"


TASKS: dict[str, Task] = {
    "zsre": Task("zsre", "bmike53-zsre", "BMIKE-53 (zsRE)", "zsRE", "zsre_test_", 743, False),
    "counterfact": Task(
        "counterfact",
        "bmike53-counterfact",
        "BMIKE-53 (CounterFact)",
        "CounterFact",
        "counterfact_test_",
        1031,
        True,
    ),
    "wfd": Task(
        "wfd", "bmike53-wfd", "BMIKE-53 (WikiFactDiff)", "WikiFactDiff", "wfd_test_", 784, True
    ),
}

#: Published field keys written in another language: (task, language, case_id) -> {key: field}.
KEY_QUIRKS: dict[tuple[str, str, int], dict[str, str]] = {("wfd", "af", 3121): {"oud": "old"}}

SIDE_FIELDS = ("case_id", "subject", "src", "rephrase", "alt", "loc", "loc_ans", "port", "port_ans")


def find_root(data_dir: Path) -> Path:
    """The folder holding the task folders: ``data_dir`` itself, or its ``BMIKE53/`` or
    ``data/BMIKE53/`` sub-folder (the repository's layout)."""
    for cand in (data_dir, data_dir / "BMIKE53", data_dir / FOLDER):
        if any((cand / t.folder).is_dir() for t in TASKS.values()):
            return cand
    raise DataError(
        f"{data_dir}: no BMIKE-53 task folder ({', '.join(t.folder for t in TASKS.values())}; "
        f"nor under BMIKE53/ or {FOLDER}/); download them with: mlake data fetch "
        f"--dataset bmike53-counterfact --dest {data_dir}"
    )


def read_side(path: Path, i: int, lang: str, side: Any, task: Task) -> EditRecord:
    """Validate one language side of record ``i`` of ``path``."""
    if not isinstance(side, dict):
        raise DataError(
            f"{path}: record {i} [{lang}]: expected an object, found {type(side).__name__}"
        )
    case_id = side.get("case_id")
    if isinstance(case_id, int) and not isinstance(case_id, bool):
        for key, name in KEY_QUIRKS.get((task.key, lang, case_id), {}).items():
            if key in side and name not in side:
                side = {**side, name: side[key]}
    for name in SIDE_FIELDS + (("old",) if task.has_old else ()):
        if name not in side:
            raise DataError(f"{path}: record {i} [{lang}]: missing field {name!r}")
    if not isinstance(case_id, int) or isinstance(case_id, bool):
        raise DataError(f"{path}: record {i} [{lang}]: field 'case_id' must be an integer")
    return EditRecord(
        prompt=field_text(path, i, lang, side, "src"),
        new_answer=field_text(path, i, lang, side, "alt").strip(),
        old_answer=field_text(path, i, lang, side, "old").strip() if task.has_old else None,
        subject=field_text(path, i, lang, side, "subject").strip(),
        rephrase=field_text(path, i, lang, side, "rephrase"),
        locality_prompt=field_text(path, i, lang, side, "loc"),
        locality_answer=field_text(path, i, lang, side, "loc_ans", allow_empty=True).strip()
        or None,
        portability_prompt=field_text(path, i, lang, side, "port"),
        portability_answer=field_text(path, i, lang, side, "port_ans").strip(),
        case_id=case_id,
    )


def read_task_file(
    path: Path, lang: str, task: Task
) -> tuple[list[EditRecord], dict[int, EditRecord], list[int]]:
    """Read one ``{prefix}{lang}.json``: the English sides in order, the ``lang`` sides by
    record index, and the indices of records without a ``lang`` side."""
    english: list[EditRecord] = []
    other: dict[int, EditRecord] = {}
    missing: list[int] = []
    for i, rec in enumerate(read_json_list(path)):
        if "en" not in rec:
            raise DataError(f"{path}: record {i}: no 'en' side (keys {sorted(rec)})")
        extra = sorted(set(rec) - {"en", lang})
        if extra:
            raise DataError(
                f"{path}: record {i}: unexpected language key(s) {extra}; the file name says "
                f"'en' and {lang!r}"
            )
        english.append(read_side(path, i, "en", rec["en"], task))
        if lang not in rec:
            missing.append(i)
            continue
        side = read_side(path, i, lang, rec[lang], task)
        if side.case_id != english[-1].case_id:
            raise DataError(
                f"{path}: record {i}: case_id {side.case_id} [{lang}] differs from "
                f"{english[-1].case_id} [en]"
            )
        other[i] = side
    return english, other, missing


def load_bmike(
    data_dir: str | os.PathLike[str] | None,
    task: str,
    langs: str | Iterable[str] | None = None,
) -> ExternalDataset:
    """Load one BMIKE-53 task (``zsre``, ``counterfact`` or ``wfd``) in the given languages
    (default all 53; English is read from the ``en`` sides of the other files).

    Raises:
        ConfigError: no ``data_dir``, an unknown task, or a language BMIKE-53 has not.
        DataError: a missing or malformed file or record (naming file, record, field), or
            files that are not parallel.
    """
    if task not in TASKS:
        raise DataError(f"unknown BMIKE-53 task {task!r}; choose {', '.join(TASKS)}")
    spec = TASKS[task]
    wanted = parse_wanted(langs, BMIKE_LANGUAGES, spec.title)
    root = find_root(require_dir(data_dir, spec.name, spec.title))
    to_read = [lang for lang in wanted if lang != "en"]
    if not to_read:  # English alone: from the first language file present
        present = [lang for lang in BMIKE_LANGUAGES[1:] if spec.path(root, lang).is_file()]
        if not present:
            raise DataError(f"{root / spec.folder}: no {spec.prefix}<lang>.json file")
        to_read = present[:1]
    records: dict[str, dict[int, EditRecord]] = {}
    skipped: dict[str, list[int]] = {}
    english: tuple[Path, list[EditRecord]] | None = None
    read: list[Path] = []
    for lang in to_read:
        path = spec.path(root, lang)
        en, other, missing = read_task_file(path, lang, spec)
        read.append(path)
        if english is None:
            english = (path, en)
        elif en != english[1]:
            if len(en) != len(english[1]):
                raise DataError(
                    f"{spec.title} files are not parallel (record counts differ): "
                    f"{english[0].name}: {len(english[1])}, {path.name}: {len(en)}"
                )
            bad = next(k for k, (x, y) in enumerate(zip(en, english[1], strict=True)) if x != y)
            raise DataError(
                f"{path}: record {bad} [en] differs from {english[0]}: the {spec.title} files "
                "are not parallel"
            )
        if lang in wanted:
            records[lang] = other
            skipped[lang] = missing
    assert english is not None
    if "en" in wanted:
        records["en"] = dict(enumerate(english[1]))
    return build_dataset(
        name=spec.name,
        title=spec.title,
        provenance=f"github.com/{REPO} @ {COMMIT[:12]}, {FOLDER}/{spec.folder}",
        root=root,
        langs=wanted,
        records=records,
        n_records=len(english[1]),
        skipped={k: v for k, v in skipped.items() if v},
        files=read,
        with_subjects=True,
        with_original_answers=spec.has_old,
        english=dict(enumerate(english[1])),
    )
