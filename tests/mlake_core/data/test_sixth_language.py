"""A sixth language in MLaKE's format (issue 22 §3): the hand-written Spanish facts 0-4 beside
the five published languages' facts 0-4 (tests/fixtures/sixth_language), loaded, located,
selected through the CLI, and run through knowledge and a 6x6 transfer matrix."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import pytest

from mlake.cli import main
from mlake_core.data import load_mlake
from mlake_core.data.cache import cache_key
from mlake_core.data.paths import RELEASES, content_sha256, data_suffix, release_dir
from mlake_core.errors import DataError
from mlake_core.languages import LANGUAGES, UnknownLanguageWarning
from tests.conftest import real_data_dir
from tests.fixtures.sixth_language.build import N_FACTS, SPANISH, build_sixth_language, resolve

SIX = (*LANGUAGES, "es")
VERSION = "v2024-11"

#: The Spanish subjects, checked by hand: (question span, cloze span in o_prompt).
ES_SUBJECTS = [
    ("Carl Sagan", (15, 25), (0, 10)),  # ¿Dónde trabajó Carl Sagan durante su carrera?
    ("Brandon Jennings", (36, 52), (0, 16)),
    ("Philip Pullman", (54, 68), (0, 14)),
    ("Gwendoline Christie", (33, 52), (0, 19)),
    ("Steve Mandanda", (41, 55), (0, 14)),
]


@pytest.fixture(scope="module")
def six_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if real_data_dir() is None:
        pytest.skip("real MLaKE data not found")
    return build_sixth_language(tmp_path_factory.mktemp("six") / "mlake", real_data_dir())


@pytest.fixture
def copy_dir(six_dir: Path, tmp_path: Path) -> Path:
    """A copy of the six-language folder a test may change."""
    return Path(shutil.copytree(six_dir, tmp_path / "mlake"))


def dataset_dir(root: Path) -> Path:
    return root / VERSION / "dataset"


def test_loads_six_languages(six_dir: Path) -> None:
    ds = load_mlake(six_dir, cache=False)
    assert ds.langs == SIX
    assert ds.available == SIX
    assert len(ds) == N_FACTS
    for fact in ds.facts:
        assert tuple(fact.views) == SIX
    es = ds.facts[3].views["es"]
    assert es.question.text == "¿De qué país tiene la ciudadanía Gwendoline Christie?"
    assert es.question.target.text == "Reino Unido"
    assert es.question.edit_target.text == "Australia"
    assert not es.edit_is_noop
    # the Spanish multi-hop chains link through the English edit sentence and the question
    links = [(q.kind, q.index, q.link, q.fact_ids) for q in ds.multi_hop["es"]]
    assert links[:4] == [("new", i, "e_prompt", (f,)) for i, f in enumerate((0, 0, 0, 3))]
    assert ("old", 0, "question", (0,)) in links and ("old", 1, "question", (0,)) in links


def test_spanish_subjects_by_hand(six_dir: Path) -> None:
    ds = load_mlake(six_dir, langs="es,en", cache=False)
    assert ds.langs == ("es", "en")
    assert ds.available == SIX
    for fact, (text, q_span, c_span) in zip(ds.facts, ES_SUBJECTS, strict=True):
        view = fact.views["es"]
        assert view.question.subject is not None
        assert view.question.subject_text == text
        assert (view.question.subject.start, view.question.subject.end) == q_span
        assert view.record.question[q_span[0] : q_span[1]] == text
        assert view.cloze.subject is not None
        assert (view.cloze.subject.start, view.cloze.subject.end) == c_span
        assert view.cloze.usable, view.cloze.reason
    assert ds.facts[0].views["es"].cloze.text == "Carl Sagan trabajó en la"


def test_published_release_keeps_its_five_and_hash() -> None:
    root = real_data_dir()
    if root is None:
        pytest.skip("real MLaKE data not found")
    for version, release in RELEASES.items():
        base = release_dir(root, version)
        assert release.languages(base) == LANGUAGES
        assert content_sha256(base, release) == release.published_sha256
        assert data_suffix(root, version) == ""


def test_other_data_is_named_and_cached_apart(six_dir: Path) -> None:
    release = RELEASES[VERSION]
    base = dataset_dir(six_dir)
    files = [p.relative_to(base).as_posix() for p in release.files(base)]
    assert "single_hop/es_qa.json" in files
    assert "multi_hop/new_es_qa.json" in files and "multi_hop/old_es_qa.json" in files
    content = content_sha256(base, release)
    assert data_suffix(six_dir, VERSION) == f"-data{content[:8]}"
    # the located-dataset cache keys on the languages present
    six = cache_key(VERSION, ("en",), content, SIX)
    assert "-en-of-en-zh-ja-fr-de-es-" in six
    assert six != cache_key(VERSION, ("en",), content, LANGUAGES)
    assert cache_key(VERSION, ("en",), content).startswith(f"{VERSION}-en-{content[:16]}-")


def test_cached_load_is_the_same(six_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MLAKE_CACHE", str(tmp_path / "cache"))
    first = load_mlake(six_dir, langs="en,es")
    names = [p.name for p in (tmp_path / "cache" / "data").iterdir()]
    assert len(names) == 1 and "-en-es-of-en-zh-ja-fr-de-es-" in names[0]
    again = load_mlake(six_dir, langs="en,es")
    assert again.subjects_sha256 == first.subjects_sha256
    assert again.available == SIX


def test_unequal_record_counts(copy_dir: Path) -> None:
    path = dataset_dir(copy_dir) / "single_hop" / "es_qa.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(records[:4], ensure_ascii=False), encoding="utf-8")
    with pytest.raises(DataError) as exc:
        load_mlake(copy_dir, cache=False)
    msg = str(exc.value)
    assert msg.startswith("single-hop files are not parallel (record counts differ): ")
    assert f"{dataset_dir(copy_dir) / 'single_hop' / 'en_qa.json'}: 5" in msg
    assert msg.endswith(f"{path}: 4")


def test_missing_file_of_a_present_language(copy_dir: Path) -> None:
    path = dataset_dir(copy_dir) / "multi_hop" / "old_es_qa.json"
    path.unlink()
    with pytest.raises(DataError) as exc:
        load_mlake(copy_dir, cache=False)
    assert str(exc.value) == f"{path}: file not found"


def _as_language(root: Path, code: str) -> None:
    """Copy the Spanish files under another language code."""
    base = dataset_dir(root)
    for rel in ("single_hop/{}_qa.json", "multi_hop/new_{}_qa.json", "multi_hop/old_{}_qa.json"):
        shutil.copyfile(base / rel.format("es"), base / rel.format(code))


def test_language_without_rules_warns_and_gets_generic_subjects(
    copy_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mlake_core import languages
    from mlake_core.data import dataset

    monkeypatch.setattr(languages, "_WARNED", set())
    monkeypatch.setattr(dataset, "_GENERIC_WARNED", set())
    _as_language(copy_dir, "eu")  # a code with no rules at all
    _as_language(copy_dir, "it")  # a known language the subject locator has no rules for
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = load_mlake(copy_dir, cache=False)
    assert ds.langs == (*SIX, "eu", "it")  # MLaKE's five first, then the others sorted
    messages = [str(w.message) for w in caught if issubclass(w.category, UnknownLanguageWarning)]
    assert len(messages) == 2
    assert messages[0].startswith("language 'eu': mlake has no rules of its own for it")
    assert "generic subject locator" in messages[0]
    assert messages[1].startswith("language 'it': the subject locator has no rules of its own")
    assert not any("'es'" in m for m in messages)
    # the generic locator still finds these names (capitalized, shared with o_prompt)
    for fact, (text, q_span, _) in zip(ds.facts, ES_SUBJECTS, strict=True):
        for code in ("eu", "it"):
            span = fact.views[code].question.subject
            assert span is not None and (span.start, span.end, span.text) == (*q_span, text)


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_langs_en_es(six_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = _cli(capsys, "data", "show", "2", "--langs", "en,es", "--data-dir", str(six_dir))
    assert rc == 0, err
    assert "[en] subject: 'Philip Pullman'" in out
    assert "[es] subject: 'Philip Pullman'" in out
    assert "¿Con qué institución estuvo afiliado profesionalmente [Philip Pullman]" in out
    assert "[zh]" not in out
    rc, out, err = _cli(capsys, "data", "stats", "--data-dir", str(six_dir), "--json")
    assert rc == 0, err
    assert list(json.loads(out)["languages"]) == list(SIX)  # all: the folder's languages


def test_cli_unknown_language_lists_the_folder(
    six_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = _cli(capsys, "data", "show", "0", "--langs", "xx", "--data-dir", str(six_dir))
    assert rc == 2 and out == ""
    assert err == (
        "mlake: error: unknown language code(s) 'xx'; the data holds en, zh, ja, fr, de, es\n"
    )
    rc, _, err = _cli(capsys, "data", "show", "0", "--langs", "en,EN", "--data-dir", str(six_dir))
    assert rc == 2 and "malformed language code 'EN'" in err


@pytest.mark.slow
def test_knowledge_and_transfer_on_six_languages(
    six_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """End to end with a tiny random Llama: knowledge in six languages and a 6x6 FT transfer
    matrix (one fact, short FT), rows and columns in the folder's order."""
    from mlake_core.models.tiny import TinySize, build_tiny_model

    model = build_tiny_model("llama", tmp_path / "llama", seed=0, size=TinySize(n_ctx=128))
    common = [
        *("--model", str(model), "--template", "qa", "--device", "cpu"),
        *("--data-dir", str(six_dir), "--results-dir", str(tmp_path / "runs")),
    ]
    rc, out, err = _cli(capsys, "eval", "knowledge", *common, "--facts", "2", "--json")
    assert rc == 0, err
    knowledge: dict[str, Any] = json.loads(out)
    assert list(knowledge["languages"]) == list(SIX)
    for lang in SIX:  # both facts measured in every language, Spanish included
        row = knowledge["languages"][lang]
        assert row["facts"] == 2
        assert row["target_logp"] < 0  # a summed log-probability, measured
    rc, out, err = _cli(
        capsys,
        *("edit", "transfer", "--method", "ft", "--set", "ft.steps=3"),
        *common,
        *("--facts", "1", "--n-locality", "1", "--json"),
    )
    assert rc == 0, err
    ft = json.loads(out)["methods"]["ft"]
    assert ft["edits"] == 6  # one fact edited in each of six languages
    matrices = {k: v for k, v in ft.items() if k.startswith("matrices")}
    assert matrices
    for groups in matrices.values():
        for matrix in groups.values():
            assert list(matrix) == list(SIX)
            assert all(list(row) == list(SIX) for row in matrix.values())


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    if isinstance(value, dict):
        if set(value) == {"data"}:
            return []  # a reference into the release, not a stored string
        return [s for v in value.values() for s in _strings(v)]
    return []


def test_the_fixture_stores_no_mlake_string() -> None:
    """House rule: nothing of the release is stored in the repository.  Every string of
    spanish.json that is also a string of the v2024-11 release must be a reference."""
    data = real_data_dir()
    if data is None:
        pytest.skip("real MLaKE data not found")
    release: set[str] = set()
    for path in (data / VERSION / "dataset").rglob("*.json"):
        release.update(_strings(json.loads(path.read_text(encoding="utf-8"))))
    stored = _strings(json.loads(SPANISH.read_text(encoding="utf-8")))
    assert stored, "spanish.json holds no text"
    assert not [s for s in stored if s in release]
    assert not list(SPANISH.parent.glob("*_qa.json")), "no file in MLaKE's layout is stored"


def test_references_resolve_and_a_bad_one_names_itself(tmp_path: Path) -> None:
    data = real_data_dir()
    if data is None:
        pytest.skip("real MLaKE data not found")
    base = data / VERSION / "dataset"
    english = json.loads((base / "single_hop" / "en_qa.json").read_text(encoding="utf-8"))
    ref = {"data": ["single_hop/en_qa.json", 0, "o_answer_aliases", 0]}
    assert resolve([ref, "x"], base) == [english[0]["o_answer_aliases"][0], "x"]
    with pytest.raises(IndexError, match=re.escape("no ['single_hop/en_qa.json', 99999")):
        resolve({"data": ["single_hop/en_qa.json", 99999, "o_answer"]}, base)
