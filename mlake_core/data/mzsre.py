"""MzsRE (ReMaKE, Wang, Haddow and Birch 2023, "Retrieval-augmented Multilingual Knowledge
Editing", arXiv:2312.13040) as :class:`~mlake_core.data.dataset.Fact` objects.

Schema, confirmed from the public repository ``Vicky-Wil/ReMaKE`` at commit
``f2f9d5a4525cef995873bac242e21fd905bb09ff`` (files ``data/MzsRE/*.json`` and the runner
``run_bizsre.py`` that reads them):

- ``data/MzsRE/mzsre_test_duplicate_{a}{b}.json``, one per ordered language pair: 121 files,
  every pair of the 12 file codes ``en cz de du es fr pt ru th tr vi zh`` except those with
  ``en`` second.  The runner edits in ``a`` and tests in ``b``.
- Each file is a JSON list of 743 records; a record is an object with exactly two keys,
  ``a`` and ``b``, each one language side with these fields (all strings but
  ``portability``):

  ``subject``      the subject as written in that language;
  ``src``          the question that states the fact to edit (edit prompt in ``a``,
                   test prompt in ``b``);
  ``rephrase``     a paraphrase of ``src`` (generalization);
  ``alt``          the new answer the edit installs, in that language;
  ``loc``          an unrelated Natural Questions question (locality); English sides start
                   with ``nq question: ``, which the runner strips and so does this reader;
  ``loc_ans``      its answer (sometimes left in English in other languages);
  ``portability``  an object ``{"New Question": ..., "New Answer": ...}``: a question whose
                   answer follows from the edit, and that answer.

  There is **no original answer** (zsRE's ground truth is not in the files): the target of
  every view is empty, and :attr:`~mlake_core.data.sources.ExternalDataset.has_original_answers`
  is false.
- The files are parallel: record ``i`` is the same fact in every file, and a language's side
  is identical in every file that holds it (checked on all 121 files at that commit), so one
  file per language is enough.  This reader reads ``mzsre_test_duplicate_en{x}.json`` for
  every language ``x`` asked for (English from the first of them), falling back to any file
  holding ``x``; the English sides of the files it reads must agree.

Language codes: the files' ``cz`` (Czech) and ``du`` (Dutch) are read as ISO 639-1 ``cs``
and ``nl``; the others are ISO codes already.  The given subject occurs in ``src`` in every
English and Chinese record of the published files (``mzsre_test_duplicate_enzh.json``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
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

NAME = "mzsre"
TITLE = "MzsRE"
REPO = "Vicky-Wil/ReMaKE"
COMMIT = "f2f9d5a4525cef995873bac242e21fd905bb09ff"
FOLDER = "data/MzsRE"
FILE_PATTERN = "mzsre_test_duplicate_{a}{b}.json"
N_RECORDS = 743

#: The files' language codes, in the runner's order.
FILE_CODES: tuple[str, ...] = (
    "en",
    "cz",
    "de",
    "du",
    "es",
    "fr",
    "pt",
    "ru",
    "th",
    "tr",
    "vi",
    "zh",
)
#: File code -> ISO 639-1 code (where they differ).
ISO_CODES: dict[str, str] = {"cz": "cs", "du": "nl"}
#: MzsRE's languages as ISO codes, English first.
MZSRE_LANGUAGES: tuple[str, ...] = tuple(ISO_CODES.get(c, c) for c in FILE_CODES)
_FILE_CODE: dict[str, str] = {ISO_CODES.get(c, c): c for c in FILE_CODES}

SIDE_FIELDS = ("subject", "src", "rephrase", "alt", "loc", "loc_ans", "portability")
LOC_PREFIX = "nq question: "


def find_root(data_dir: Path) -> Path:
    """The folder holding the ``mzsre_test_duplicate_*.json`` files: ``data_dir`` itself,
    or its ``MzsRE/`` or ``data/MzsRE/`` sub-folder (the repository's layout)."""
    for cand in (data_dir, data_dir / "MzsRE", data_dir / FOLDER):
        if any(cand.glob("mzsre_test_duplicate_*.json")):
            return cand
    raise DataError(
        f"{data_dir}: no mzsre_test_duplicate_*.json files (nor in MzsRE/ or {FOLDER}/); "
        f"download them with: mlake data fetch --dataset {NAME} --dest {data_dir}"
    )


def _pick_file(root: Path, code: str) -> tuple[Path, str, str]:
    """The file to read language ``code`` (file code) from, and its two codes."""
    if code == "en":
        for other in FILE_CODES[1:]:
            path = root / FILE_PATTERN.format(a="en", b=other)
            if path.is_file():
                return path, "en", other
    else:
        path = root / FILE_PATTERN.format(a="en", b=code)
        if path.is_file():
            return path, "en", code
        for other in FILE_CODES:
            for a, b in ((other, code), (code, other)):
                path = root / FILE_PATTERN.format(a=a, b=b)
                if other != code and path.is_file():
                    return path, a, b
    raise DataError(
        f"{root}: no MzsRE file holds language {ISO_CODES.get(code, code)!r} (file code "
        f"{code!r}); expected {FILE_PATTERN.format(a='en', b=code if code != 'en' else 'zh')}"
    )


def read_side(path: Path, i: int, code: str, side: Any) -> EditRecord:
    """Validate one language side of record ``i`` of ``path``."""
    if not isinstance(side, dict):
        raise DataError(
            f"{path}: record {i} [{code}]: expected an object, found {type(side).__name__}"
        )
    for name in SIDE_FIELDS:
        if name not in side:
            raise DataError(f"{path}: record {i} [{code}]: missing field {name!r}")
    port = side["portability"]
    if not isinstance(port, dict):
        raise DataError(f"{path}: record {i} [{code}]: field 'portability' must be an object")
    loc = field_text(path, i, code, side, "loc")
    if loc.startswith(LOC_PREFIX):
        loc = loc[len(LOC_PREFIX) :]
    return EditRecord(
        prompt=field_text(path, i, code, side, "src"),
        new_answer=field_text(path, i, code, side, "alt").strip(),
        old_answer=None,
        subject=field_text(path, i, code, side, "subject").strip(),
        rephrase=field_text(path, i, code, side, "rephrase"),
        locality_prompt=loc,
        locality_answer=field_text(path, i, code, side, "loc_ans").strip(),
        portability_prompt=field_text(path, i, f"{code}.portability", port, "New Question"),
        portability_answer=field_text(path, i, f"{code}.portability", port, "New Answer").strip(),
    )


def read_pair_file(path: Path, a: str, b: str) -> dict[str, list[EditRecord]]:
    """Read and validate one pair file: per file code, its records in order."""
    out: dict[str, list[EditRecord]] = {a: [], b: []}
    for i, rec in enumerate(read_json_list(path)):
        if set(rec) != {a, b}:
            raise DataError(
                f"{path}: record {i}: expected the language keys {a!r} and {b!r} (from the "
                f"file name), found {sorted(rec)}"
            )
        for code in (a, b):
            out[code].append(read_side(path, i, code, rec[code]))
    return out


def load_mzsre(
    data_dir: str | os.PathLike[str] | None, langs: str | Iterable[str] | None = None
) -> ExternalDataset:
    """Load MzsRE in the given languages (ISO codes; default all 12).

    Raises:
        ConfigError: no ``data_dir``, or a language MzsRE has not.
        DataError: a missing or malformed file or record (naming file, record, field), or
            files that are not parallel.
    """
    wanted = parse_wanted(langs, MZSRE_LANGUAGES, TITLE)
    root = find_root(require_dir(data_dir, NAME, TITLE))
    sides: dict[str, list[EditRecord]] = {}
    english: tuple[Path, list[EditRecord]] | None = None
    read: list[Path] = []
    needed = [_FILE_CODE[lang] for lang in wanted]
    # Every other language first: English comes with them (en{x} files).
    for code in sorted(needed, key=lambda c: c == "en"):
        if code in sides:
            continue
        path, a, b = _pick_file(root, code)
        pair = read_pair_file(path, a, b)
        if read and len(pair[a]) != len(sides[next(iter(sides))]):
            raise DataError(
                f"MzsRE files are not parallel (record counts differ): {read[0].name}: "
                f"{len(sides[next(iter(sides))])}, {path.name}: {len(pair[a])}"
            )
        read.append(path)
        for c, recs in pair.items():
            if c == "en":
                if english is None:
                    english = (path, recs)
                elif recs != english[1]:
                    bad = next(
                        k for k, (x, y) in enumerate(zip(recs, english[1], strict=True)) if x != y
                    )
                    raise DataError(
                        f"{path}: record {bad} [en] differs from {english[0]}: the MzsRE files "
                        "are not parallel"
                    )
            sides.setdefault(c, recs)
    n = len(sides[needed[0]])
    records = {lang: dict(enumerate(sides[_FILE_CODE[lang]])) for lang in wanted}
    return build_dataset(
        name=NAME,
        title=TITLE,
        provenance=f"github.com/{REPO} @ {COMMIT[:12]}, {FOLDER}",
        root=root,
        langs=wanted,
        records=records,
        n_records=n,
        skipped={},
        files=read,
        with_subjects=True,
        with_original_answers=False,
        english=dict(enumerate(english[1])) if english is not None else None,
    )
