"""The BMIKE-53 reader on the hand-written fixture (tests/fixtures/bmike53: the published
layout, three tasks, English plus zh/de/he/af sides, with the published quirks)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlake_core.data.bmike import BMIKE_LANGUAGES, load_bmike
from mlake_core.data.external import ExternalDataset
from mlake_core.errors import ConfigError, DataError

FIXTURE = Path(__file__).resolve().parents[2] / "fixtures" / "bmike53"


@pytest.fixture(scope="module")
def cf() -> ExternalDataset:
    return load_bmike(FIXTURE, "counterfact", "en,zh,de")


def test_53_languages() -> None:
    assert len(BMIKE_LANGUAGES) == 53 and BMIKE_LANGUAGES[0] == "en"
    assert len(set(BMIKE_LANGUAGES)) == 53


def test_counterfact_fields(cf: ExternalDataset) -> None:
    assert cf.version == "bmike53-counterfact" and cf.has_original_answers
    assert [f.fact_id for f in cf.facts] == [0, 1, 2]
    en = cf.view(0, "en")
    assert en.source is not None and en.source.case_id == 101
    assert en.question.text == "What is the native language of Pierre Boulez?"
    assert en.question.target.text == "French"
    assert en.question.edit_target.text == "Italian"
    assert en.record.o_answer == "French" and en.record.e_answer == "Italian"
    assert en.question.subject is not None and en.question.subject.text == "Pierre Boulez"
    assert en.rephrase is not None
    assert en.rephrase.text == "Which language did Pierre Boulez grow up speaking?"
    assert en.locality == ("What is the native language of Jacques Brel?", "French")
    assert en.portability == (
        "Which country's official language is the native language of Pierre Boulez?",
        "Italy",
    )
    # The portability question is the fact's multi-hop "new" question (scored as portability).
    ports = [q for q in cf.fact(0).multi_hop if q.lang == "en"]
    assert len(ports) == 1 and ports[0].kind == "new" and ports[0].answer == "Italy"
    assert ports[0].fact_ids == (0,) and ports[0].link == "record"
    assert [q.fact_ids for q in cf.multi_hop["de"]] == [(0,), (1,), (2,)]
    zh = cf.view(2, "zh")
    assert zh.question.target.text == "俄罗斯" and zh.question.edit_target.text == "蒙古"
    assert zh.question.subject is not None and zh.question.subject.text == "贝加尔湖"
    assert zh.record.e_prompt == "贝加尔湖位于哪个国家？蒙古"
    de = cf.view(1, "de")
    assert de.question.subject is not None and de.question.subject.start == 35
    assert cf.subject_not_in_prompt == {"en": [], "zh": [], "de": []}
    assert cf.skipped == {}


def test_record_without_a_side_is_skipped_and_listed() -> None:
    ds = load_bmike(FIXTURE, "counterfact", "en,he")
    assert [f.fact_id for f in ds.facts] == [0, 2]  # record 1 has only its English side
    assert ds.skipped == {"he": [1]}
    assert ds.summary()["skipped_records"] == {"he": 1}
    assert ds.view(2, "he").question.subject_text == "אגם באיקל"
    with pytest.raises(DataError, match="fact id 1 not in BMIKE-53 \\(CounterFact\\)"):
        ds.fact(1)


def test_zsre_task_has_no_original_answer() -> None:
    ds = load_bmike(FIXTURE, "zsre", "en,zh,de")
    assert ds.version == "bmike53-zsre" and not ds.has_original_answers
    view = ds.view(1, "de")
    assert view.question.target.text == "" and view.question.edit_target.text == "Adriatisches Meer"
    assert view.source is not None and view.source.case_id == 1


def test_wikifactdiff_published_quirks() -> None:
    ds = load_bmike(FIXTURE, "wfd", "en,af,zh")
    # wfd_test_af.json case 3121 spells the 'old' key in Afrikaans ('oud'), as published.
    assert ds.view(0, "af").question.target.text == "Kaliforniese Departement van Vervoer"
    # An empty loc_ans: no locality question for that record.
    assert ds.view(1, "en").locality is None
    assert ds.view(0, "zh").locality == ("哪个组织负责维护海湾大桥？", "加州交通局")


def test_english_only_reads_one_file() -> None:
    ds = load_bmike(FIXTURE, "counterfact", "en")
    assert ds.langs == ("en",) and len(ds.facts) == 3 and len(ds.files) == 1


def _copy(tmp_path: Path) -> Path:
    out = tmp_path / "b"
    shutil.copytree(FIXTURE, out)
    return out


def _edit(path: Path, fn) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    fn(data)
    path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'xx' not in BMIKE-53 \(CounterFact\)"):
        load_bmike(FIXTURE, "counterfact", "en,xx")
    with pytest.raises(DataError, match="unknown BMIKE-53 task"):
        load_bmike(FIXTURE, "mquake", "en")

    root = _copy(tmp_path / "1")
    path = root / "CounterFact" / "counterfact_test_de.json"
    _edit(path, lambda d: d[2]["de"].pop("old"))
    with pytest.raises(DataError, match=r"de\.json: record 2 \[de\]: missing field 'old'"):
        load_bmike(root, "counterfact", "de")

    root = _copy(tmp_path / "2")
    path = root / "CounterFact" / "counterfact_test_zh.json"
    _edit(path, lambda d: d[0]["zh"].update(case_id=7))
    with pytest.raises(DataError, match=r"record 0: case_id 7 \[zh\] differs from 101 \[en\]"):
        load_bmike(root, "counterfact", "zh")

    root = _copy(tmp_path / "3")
    path = root / "CounterFact" / "counterfact_test_zh.json"
    _edit(path, lambda d: d[1]["en"].update(alt="Nissan"))
    with pytest.raises(DataError, match=r"record 1 \[en\] differs .* not parallel"):
        load_bmike(root, "counterfact", "de,zh")

    root = _copy(tmp_path / "4")
    path = root / "CounterFact" / "counterfact_test_zh.json"
    _edit(path, lambda d: d[1].update(ja=d[1]["zh"]))
    with pytest.raises(DataError, match=r"record 1: unexpected language key\(s\) \['ja'\]"):
        load_bmike(root, "counterfact", "zh")

    root = _copy(tmp_path / "5")
    (root / "CounterFact" / "counterfact_test_zh.json").unlink()
    with pytest.raises(DataError, match=r"counterfact_test_zh\.json: file not found"):
        load_bmike(root, "counterfact", "zh")

    with pytest.raises(DataError, match="no BMIKE-53 task folder"):
        load_bmike(tmp_path, "counterfact", "zh")
