"""``mlake eval knowledge`` and ``mlake model train-tiny`` from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from mlake.cli import main

pytestmark = pytest.mark.slow


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_eval_knowledge_json_store_and_resume(micro_tiny: Path, tmp_path: Path, capsys) -> None:
    args = ("eval", "knowledge", "--model", str(micro_tiny), "--langs", "en,zh", "--facts", "3")
    args += ("--results-dir", str(tmp_path), "--device", "cpu")
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_facts"] == 3 and report["facts"] == 3
    assert report["template"]["name"] == "qa"  # read from the model's metadata
    assert set(report["languages"]) == {"en", "zh"}
    run = Path(report["results"])
    assert run.parent == tmp_path / "knowledge"
    for lang in ("en", "zh"):
        table = pd.read_parquet(run / "tables" / f"knowledge_{lang}.parquet")
        q = table[table["form"] == "question"]
        assert len(q) == 3
        assert report["languages"][lang]["known"] == int((q["greedy_match"] == "original").sum())
        assert report["languages"][lang]["facts"] == 3
    meta = json.loads((run / "meta.json").read_text())
    assert meta["status"] == "complete"
    assert (
        meta["fact_ids"] == json.loads((micro_tiny / "mlake_tiny.json").read_text())["fact_ids"][:3]
    )
    assert meta["model"]["backend"] == "tlens" and "git_commit" in meta

    # A repeated run reads the saved tables; a lost table is recomputed alone.
    (run / "tables" / "knowledge_zh.parquet").unlink()
    code, out2, err = _run(capsys, *args, "--json")
    assert code == 0
    assert "knowledge [en]: loaded from" in err and "knowledge [zh]: measured" in err
    again = json.loads(out2)
    assert again["languages"] == report["languages"] and again["results"] == report["results"]

    # The text table has one row per language.
    code, text, _ = _run(capsys, *args)
    assert code == 0
    rows = [line for line in text.splitlines() if line.split()[:1] in (["en"], ["zh"])]
    assert len(rows) == 2 and rows[0].split()[1] == "3"


def test_eval_knowledge_other_template_is_another_run(
    micro_tiny: Path, tmp_path: Path, capsys
) -> None:
    base = ("eval", "knowledge", "--model", str(micro_tiny), "--langs", "en", "--facts", "2")
    base += ("--results-dir", str(tmp_path), "--json", "--forms", "question")
    _, out_a, _ = _run(capsys, *base)
    _, out_b, err = _run(capsys, *base, "--template", "bare")
    assert "differs from the template 'qa'" in err
    a, b = json.loads(out_a), json.loads(out_b)
    assert a["results"] != b["results"]
    assert b["template"]["name"] == "bare"


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--langs", "en,xx"), "unknown language code(s) 'xx'"),
        (("--facts", "0"), "--facts 0"),
        (("--forms", "essay"), "--forms essay"),
        (("--batch-size", "0"), "--batch-size 0"),
    ],
)
def test_eval_knowledge_bad_options(
    micro_tiny: Path, tmp_path: Path, capsys, extra, message
) -> None:
    code, _, err = _run(
        capsys,
        "eval",
        "knowledge",
        "--model",
        str(micro_tiny),
        "--results-dir",
        str(tmp_path),
        *extra,
    )
    assert code == 2
    assert message in err


def test_facts_trained_needs_an_mlake_tiny(tmp_path: Path, capsys) -> None:
    from mlake_core.models.tiny import build_tiny_model

    folder = build_tiny_model("gpt2", tmp_path / "gpt2")
    code, _, err = _run(
        capsys,
        "eval",
        "knowledge",
        "--model",
        str(folder),
        "--facts",
        "trained",
        "--results-dir",
        str(tmp_path / "runs"),
    )
    assert code == 2 and "--facts trained" in err


def test_train_tiny_trains_once_then_reuses_the_cache(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setenv("MLAKE_CACHE", str(tmp_path))
    args = ("model", "train-tiny", "--facts", "2", "--langs", "en,ja", "--max-epochs", "1")
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    meta = json.loads(out)
    path = Path(meta["path"])
    assert path.parent == tmp_path / "models" and path.name.startswith("mlake-tiny-")
    assert meta["epochs"] == 1 and len(meta["fact_ids"]) == 2
    assert meta["config"]["langs"] == ["en", "ja"]
    assert "training mlake-tiny" in err
    code, out, err = _run(capsys, *args)
    assert code == 0 and "training" not in err
    assert str(path) in out
    # Another seed is another model.
    code, out, _ = _run(capsys, *args, "--seed", "3", "--json")
    assert json.loads(out)["path"] != str(path)
    # A variant, with a field set on top of it, is another model that records both.
    code, out, err = _run(
        capsys, *args, "--variant", "mlake-tiny-editable", "--set", "route_masking=0.5", "--json"
    )
    assert code == 0, err
    config = json.loads(out)["config"]
    assert config["interchange"] == 1.0 and config["name_entities"] is True
    assert config["route_masking"] == 0.5 and config["langs"] == ["en", "ja"]
    assert "interchange 1.0" in err  # the training line names the options that are on
    code, _, err = _run(capsys, *args, "--set", "routing=1")
    assert code != 0 and "routing" in err
    code, _, err = _run(capsys, *args, "--set", "route_masking")
    assert code != 0 and "FIELD=VALUE" in err
