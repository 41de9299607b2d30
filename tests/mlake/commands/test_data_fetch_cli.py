"""``mlake data fetch/stats/show --dataset`` and a run end to end on the other datasets'
fixtures with a tiny random model."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from mlake.cli import main
from mlake_core.data import fetch
from mlake_core.data.fetch import FileSet, sha256_file

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MZSRE = FIXTURES / "mzsre"
BMIKE = FIXTURES / "bmike53"


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> str:
    """The MzsRE entry with the fixture's files and checksums; returns the mirror URL."""
    names = sorted(p.name for p in MZSRE.glob("*.json"))
    files = FileSet(
        "https://example.invalid/none", "MzsRE", {n: sha256_file(MZSRE / n) for n in names}
    )
    monkeypatch.setitem(fetch.FILE_SETS, "mzsre", files)
    return MZSRE.as_uri()


def test_fetch_then_stats_and_show(mirror: str, tmp_path: Path, capsys) -> None:
    dest = tmp_path / "data"
    code, out, err = _run(
        capsys, "data", "fetch", "--dataset", "mzsre", "--dest", str(dest), "--from", mirror
    )
    assert code == 0, err
    assert f"mzsre: {dest / 'MzsRE'}" in out and "--dataset mzsre --data-dir" in out
    assert len(list((dest / "MzsRE").glob("*.json"))) == 3

    base = ("--dataset", "mzsre", "--data-dir", str(dest), "--langs", "en,zh,de,cs")
    code, out, err = _run(capsys, "data", "stats", *base, "--json")
    assert code == 0, err
    stats = json.loads(out)
    assert stats["facts"] == 3 and stats["langs"] == ["en", "zh", "de", "cs"]
    assert stats["subject_not_in_prompt"] == {"en": 0, "zh": 0, "de": 0, "cs": 1}
    assert stats["subject_from_english"]["de"] == 1 and not stats["has_original_answers"]
    code, text, _ = _run(capsys, "data", "stats", *base)
    assert code == 0 and "MzsRE: 3 facts in 4 languages" in text
    assert "original answers: no" in text

    code, out, err = _run(capsys, "data", "show", "2", *base)
    assert code == 0, err
    assert "fact 2 (MzsRE)" in out
    assert "In welcher Stadt befindet sich die [Charles University]? <>" in out
    assert "rephrase: Kde sídlí [Univerzita Karlova]?" in out
    assert "portability: Which river flows through the city" in out


def test_fetch_unreachable_fails_clearly(mirror: str, tmp_path: Path, capsys) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    code, _, err = _run(
        capsys, "data", "fetch", "--dataset", "mzsre", "--dest", str(tmp_path), "--from", url
    )
    assert code == 2
    assert f"cannot reach {url}/mzsre_test_duplicate_encz.json" in err
    assert f"download it yourself from {url}/mzsre_test_duplicate_encz.json into" in err
    assert list((tmp_path / "MzsRE").iterdir()) == []


def test_dataset_option_errors(capsys) -> None:
    code, _, err = _run(capsys, "data", "stats", "--dataset", "bmike53")
    assert code == 2 and "choose bmike53-zsre, bmike53-counterfact or bmike53-wfd" in err
    code, _, err = _run(capsys, "data", "stats", "--dataset", "mzsre", "--langs", "en")
    assert code == 2 and "give --data-dir" in err
    code, _, err = _run(
        capsys, "data", "stats", "--dataset", "mzsre", "--data-dir", str(MZSRE), "--langs", "ja"
    )
    assert code == 2 and "'ja'; the data holds en, cs, de, nl" in err
    code, _, err = _run(capsys, "data", "fetch", "--from", MZSRE.as_uri(), "--dest", "x")
    assert code == 2 and "--from: only for another dataset than mlake" in err


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory) -> Path:
    from mlake_core.models.tiny import TinySize, build_tiny_model

    # 256 positions: the qa-framed WikiFactDiff questions run past the default 64 tokens.
    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    return build_tiny_model("gpt2", folder, size=TinySize(n_ctx=256))


def test_knowledge_end_to_end_on_bmike(tiny_gpt2: Path, tmp_path: Path, capsys) -> None:
    head = ("eval", "knowledge", "--model", str(tiny_gpt2), "--template", "qa", "--json")
    run = ("--results-dir", str(tmp_path), "--device", "cpu", "--data-dir", str(BMIKE))
    code, out, err = _run(
        capsys, *head, *run, "--dataset", "bmike53-counterfact", "--langs", "en,zh,de"
    )
    assert code == 0, err
    report = json.loads(out)
    assert report["n_facts"] == 3 and set(report["languages"]) == {"en", "zh", "de"}
    assert all(report["languages"][lang]["facts"] == 3 for lang in ("en", "zh", "de"))
    meta = json.loads((Path(report["results"]) / "meta.json").read_text())
    assert meta["data_version"] == "bmike53-counterfact" and meta["fact_ids"] == [0, 1, 2]
    # Another task, same model and languages: another run (the dataset is in the key).
    code, out2, err = _run(capsys, *head, *run, "--dataset", "bmike53-wfd", "--langs", "en,zh")
    assert code == 0, err
    other = json.loads(out2)
    assert other["results"] != report["results"] and other["n_facts"] == 2


def test_knowledge_not_measurable_without_original_answers(
    tiny_gpt2: Path, tmp_path: Path, capsys
) -> None:
    """MzsRE gives no original answer: the knowledge stage says knowledge is not measurable
    and scores the new answer (the prior of edits) instead of refusing."""
    args = ["eval", "knowledge", "--model", str(tiny_gpt2), "--template", "qa", "--json"]
    args += ["--dataset", "mzsre", "--data-dir", str(MZSRE), "--langs", "en,zh"]
    args += ["--results-dir", str(tmp_path), "--device", "cpu"]
    code, out, err = _run(capsys, *args)
    assert code == 0, err
    assert "MzsRE gives no original answer, so what the model knows is not measurable" in err
    report = json.loads(out)
    assert all(report["languages"][lang]["facts"] == 3 for lang in ("en", "zh"))
    # Nothing can be known without an original answer: no count, not zero.
    for lang in ("en", "zh"):
        entry = report["languages"][lang]
        assert entry["known"] is None, entry  # null in the JSON
        assert entry.get("measurable") is False, entry
