"""The MzsRE reader on the hand-written fixture (tests/fixtures/mzsre: the published layout,
three en{x} pair files, three records each)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlake_core.data.external import ExternalDataset, ExternalView
from mlake_core.data.mzsre import MZSRE_LANGUAGES, load_mzsre
from mlake_core.errors import ConfigError, DataError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "mzsre"


@pytest.fixture(scope="module")
def ds() -> ExternalDataset:
    return load_mzsre(FIXTURE, "en,zh,de,cs")


def test_languages_iso_codes() -> None:
    assert len(MZSRE_LANGUAGES) == 12
    assert "cs" in MZSRE_LANGUAGES and "nl" in MZSRE_LANGUAGES
    assert "cz" not in MZSRE_LANGUAGES and "du" not in MZSRE_LANGUAGES


def test_fields_map_field_by_field(ds: ExternalDataset) -> None:
    assert ds.version == "mzsre" and ds.title == "MzsRE"
    assert ds.langs == ("en", "zh", "de", "cs")
    assert [f.fact_id for f in ds.facts] == [0, 1, 2]
    en = ds.view(0, "en")
    assert isinstance(en, ExternalView)
    assert en.question.text == "Which country is Mount Kilimanjaro located in?"
    assert en.question.edit_target.text == "Kenya"
    assert en.question.target.text == ""  # MzsRE gives no original answer
    assert en.question.subject is not None and en.question.subject.text == "Mount Kilimanjaro"
    assert (en.question.subject.start, en.question.subject.end) == (17, 34)
    assert en.question.usable
    assert en.rephrase is not None
    assert en.rephrase.text == "In which country can Mount Kilimanjaro be found?"
    assert en.rephrase.subject is not None and en.rephrase.subject.start == 21
    # English locality questions lose the "nq question: " prefix, as ReMaKE's runner does.
    assert en.locality == ("who wrote the novel moby dick", "Herman Melville")
    assert en.portability == (
        "What is the capital of the country where Mount Kilimanjaro is located?",
        "Nairobi",
    )
    assert en.record.e_prompt == "Which country is Mount Kilimanjaro located in? Kenya"
    assert en.record.o_prompt == en.record.question
    assert not en.cloze.usable and str(en.cloze.reason).startswith("no_statement")
    zh = ds.view(1, "zh")
    assert zh.question.subject is not None and zh.question.subject.text == "多瑙河"
    assert zh.record.e_prompt == "多瑙河流入哪个海？亚得里亚海"  # unspaced: no space
    assert zh.locality == ("第一部iPhone是什么时候推出的", "2007年")
    cs = ds.view(0, "cs")
    assert cs.question.edit_target.text == "Keňa"
    assert cs.subject.method == "given"


def test_english_subject_where_the_given_one_is_not_in_the_question(
    ds: ExternalDataset,
) -> None:
    # German record 2 gives "Karls-Universität"; its question keeps "Charles University".
    view = ds.view(2, "de")
    assert view.question.subject is not None and view.question.subject.text == "Charles University"
    assert view.question.usable and view.subject.method == "given_english"
    assert view.rephrase is not None and view.rephrase.subject_text == "Charles University"
    assert ds.subject_from_english == {"en": [], "zh": [], "de": [2], "cs": []}
    assert view.source is not None and view.source.subject == "Karls-Universität"


def test_subject_not_in_prompt_is_counted_not_dropped(ds: ExternalDataset) -> None:
    # Czech record 2 uses the genitive "Univerzity Karlovy" for "Univerzita Karlova".
    assert ds.subject_not_in_prompt == {"en": [], "zh": [], "de": [], "cs": [2]}
    view = ds.view(2, "cs")
    assert view.question.subject is None and not view.question.usable
    assert str(view.question.reason).startswith("subject_not_in_prompt")
    assert view.rephrase is not None and view.rephrase.usable  # the rephrase has it
    assert ds.summary()["subject_not_in_prompt"] == {"en": 0, "zh": 0, "de": 0, "cs": 1}
    assert ds.has_subjects and not ds.has_original_answers


def test_content_key_and_views(ds: ExternalDataset) -> None:
    key = ds.content_key
    assert set(key) == {"subjects", "data_content"} and len(key["data_content"]) == 64
    assert [v.lang for v in ds.views("de")] == ["de"] * 3
    assert json.dumps(ds.fact(0).to_dict(), ensure_ascii=False)  # serializable


def test_repository_layout_and_english_only(tmp_path: Path) -> None:
    nested = tmp_path / "data" / "MzsRE"
    shutil.copytree(FIXTURE, nested)
    ds = load_mzsre(tmp_path, "en")
    assert ds.langs == ("en",) and len(ds.facts) == 3
    assert ds.files == ("mzsre_test_duplicate_encz.json",)


def test_unknown_language_and_no_data_dir() -> None:
    with pytest.raises(ConfigError, match=r"'ja' not in MzsRE; it has en, cs"):
        load_mzsre(FIXTURE, "en,ja")
    with pytest.raises(ConfigError, match="give --data-dir"):
        load_mzsre(None, "en")


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "mz"
    shutil.copytree(FIXTURE, out)
    return out


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_bad_files_name_file_record_and_field(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    zh = root / "mzsre_test_duplicate_enzh.json"
    _edit(zh, lambda d: d[1]["zh"].pop("alt"))
    with pytest.raises(DataError, match=r"enzh\.json: record 1 \[zh\]: missing field 'alt'"):
        load_mzsre(root, "en,zh")

    root = _copy(tmp_path / "b")
    _edit(root / "mzsre_test_duplicate_ende.json", lambda d: d[2]["de"].update(src=3))
    with pytest.raises(DataError, match=r"record 2 \[de\]: field 'src' must be a string"):
        load_mzsre(root, "de")

    root = _copy(tmp_path / "c")
    _edit(root / "mzsre_test_duplicate_ende.json", lambda d: d[0].update(fr=d[0].pop("de")))
    with pytest.raises(DataError, match=r"record 0: expected the language keys 'en' and 'de'"):
        load_mzsre(root, "de")

    root = _copy(tmp_path / "d")
    _edit(root / "mzsre_test_duplicate_ende.json", lambda d: d[1]["en"].update(alt="Nile"))
    with pytest.raises(DataError, match=r"record 1 \[en\] differs .* not parallel"):
        load_mzsre(root, "zh,de")

    root = _copy(tmp_path / "e")
    (root / "mzsre_test_duplicate_ende.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DataError, match=r"ende\.json: malformed JSON"):
        load_mzsre(root, "de")

    root = _copy(tmp_path / "f")
    (root / "mzsre_test_duplicate_ende.json").unlink()
    with pytest.raises(DataError, match=r"no MzsRE file holds language 'de'"):
        load_mzsre(root, "de")

    with pytest.raises(DataError, match="no mzsre_test_duplicate_"):
        load_mzsre(tmp_path / "f" / "..", "de")
