"""``mlake edit transfer --dataset mzsre|bmike53-*``: the datasets' own measures printed in
the ``--protocol mlake`` layout (edit language x test language, % with the unedited model's
in brackets, the counts), greedy alias match and the paper's scorer side by side, the same
numbers in ``--json`` and ``--csv``; MLaKE's run key keeps its fields (issue 22 §3)."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.transfer import OWN_CELL_COLUMNS, OWN_TABLES, own_cells
from mlake.cli import main

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
LANGS = ("en", "zh", "de")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from mlake_core.models.tiny import TinySize, build_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    return build_tiny_model("gpt2", folder, size=TinySize(n_ctx=256))


def _args(tiny: Path, results: Path, dataset: str, data: Path, langs: str) -> list[str]:
    args = ["edit", "transfer", "--model", str(tiny), "--template", "qa", "--method", "ft"]
    args += ["--dataset", dataset, "--data-dir", str(data), "--langs", langs]
    args += ["--results-dir", str(results), "--device", "cpu", "--n-locality", "0"]
    return [*args, "--set", "ft.steps=2"]


def _parse(text: str) -> dict[tuple[str, str, str], tuple[float, ...]]:
    """(title after the method, measure..., edit_lang, test_lang) -> (pct, before) as
    printed: ``{(title, a, b): (value, before)}``."""
    out: dict = {}
    lines = text.splitlines()
    for k, line in enumerate(lines):
        if not line.startswith("ft | "):
            continue
        title = line.removeprefix("ft | ")
        cols = lines[k + 1].split()
        for row in lines[k + 2 : k + 2 + len(cols)]:
            a, *cells = row.split()
            values = re.findall(r"(\S+) \((\S+)\)", " ".join(cells))
            for b, (v, p) in zip(cols, values, strict=True):
                out[title, a, b] = tuple(math.nan if x == "-" else float(x) for x in (v, p))
    return out


def test_mzsre_tables_greedy_and_remake_side_by_side(tiny: Path, tmp_path: Path, capsys) -> None:
    csv = tmp_path / "own.csv"
    args = _args(tiny, tmp_path / "runs", "mzsre", FIXTURES / "mzsre", ",".join(LANGS))
    assert main([*args, "--csv", str(csv)]) == 0
    text = capsys.readouterr().out
    found = re.search(r"== ft: 9 edits, \S+ s; (\S+)", text)
    assert found, text
    run = Path(found.group(1))
    key = json.loads((run / "key.json").read_text())
    assert key["paper_scorer"] == "remake;locality=unedited"
    assert key["own_measures"] == "rephrase,locality"
    rows = pd.concat(pd.read_parquet(p) for p in sorted((run / "tables").glob("edits_*.parquet")))
    cells = own_cells(rows, LANGS)
    printed = _parse(text)
    assert "ReMaKE's scorer (Vicky-Wil/ReMaKE@f2f9d5a" in text
    for measure, _, _, what in OWN_TABLES:
        for c in cells[cells["measure"] == measure].to_dict("records"):
            ab = (c["edit_lang"], c["test_lang"])
            greedy = printed[(f"{measure} | greedy alias match: {what}", *ab)]
            assert greedy == pytest.approx((c["pct"], c["before_pct"]), nan_ok=True)
            f1 = printed[
                (
                    f"{measure} | ReMaKE's token F1 (precision x recall of tokenizer ids), "
                    "teacher-forced argmax",
                    *ab,
                )
            ]
            assert f1 == pytest.approx((c["paper_f1_pct"], c["paper_f1_before_pct"]), nan_ok=True)
            acc = printed[
                (f"{measure} | ReMaKE's token accuracy (EasyEdit), teacher-forced argmax", *ab)
            ]
            assert acc[0] == pytest.approx(c["paper_acc_pct"], nan_ok=True)
    # Every measure scored by the paper's scorer in every cell (each fixture record has all).
    assert (cells["paper_n"] == cells["n"]).all() and (cells["n"] == 3).all()
    # ReMaKE's locality compares with the unedited model's own prediction: 100% before.
    loc = cells[cells["measure"] == "locality"]
    for m in ("f1", "em", "acc"):
        assert (loc[f"paper_{m}_before_pct"] == 100.0).all()
    assert "locality against the unedited model's own teacher-forced answer" in text
    # Hand-check one cell from the rows: the mean F1 of the edits in en tested in zh.
    sel = rows[(rows["edit_lang"] == "en") & (rows["test_lang"] == "zh")]
    sel = sel[sel["kind"] == "transfer"]
    cell = cells[(cells["measure"] == "reliability") & (cells["edit_lang"] == "en")]
    assert cell[cell["test_lang"] == "zh"]["paper_f1_pct"].item() == round(
        100 * sel["paper_f1"].mean(), 1
    )
    # The counts are printed under the greedy table: n/facts/missing.
    assert re.search(r"n/facts/missing\n  en\s+3/3/0\s+3/3/0\s+3/3/0", text)
    # The CSV holds the same cells.
    table = pd.read_csv(csv, keep_default_na=False, na_values=[""])
    assert list(table.columns) == ["method", *OWN_CELL_COLUMNS]
    assert len(table) == len(OWN_TABLES) * len(LANGS) ** 2
    assert table["paper_f1_pct"].tolist() == pytest.approx(
        cells["paper_f1_pct"].tolist(), nan_ok=True
    )
    # --json, read back (nothing recomputed): the same cells and the scorer.
    assert main([*args, "--csv", str(csv), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["paper_scorer"]["name"] == "remake"
    got = report["methods"]["ft"]["own_measures"]["cells"]
    assert [c["paper_n"] for c in got] == cells["paper_n"].tolist()


def test_bmike53_is_scored_by_its_papers_scorer(tiny: Path, tmp_path: Path, capsys) -> None:
    """BMIKE-53 CounterFact: F1/EM everywhere, and the perplexity comparison of reliability,
    generalization and locality (not portability), as its icl.py scores that task."""
    args = _args(tiny, tmp_path / "runs", "bmike53-counterfact", FIXTURES / "bmike53", "zh,de")
    assert main([*args, "--csv", str(tmp_path / "b.csv")]) == 0
    text = capsys.readouterr().out
    assert "ft | reliability | BMIKE-53's perplexity comparison" in text
    assert "ft | portability | BMIKE-53's perplexity comparison" not in text
    assert main([*args, "--csv", str(tmp_path / "b.csv"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["paper_scorer"]["name"] == "bmike53"
    assert report["paper_scorer"]["locality"] == "loc_ans"
    assert "a9b7cac" in report["paper_scorer"]["source"]
    cells = report["methods"]["ft"]["own_measures"]["cells"]
    scored = [c for c in cells if c["paper_n"]]
    assert scored and all(0.0 <= c["paper_f1_pct"] <= 100.0 for c in scored)
    by = {m: [c for c in cells if c["measure"] == m] for m, *_ in OWN_TABLES}
    for m in ("reliability", "generalization", "locality"):
        assert all(c["paper_ppl_n"] == c["paper_n"] > 0 for c in by[m]), m
    assert all(c["paper_ppl_n"] == 0 for c in by["portability"])


@pytest.mark.slow
def test_mlake_run_key_and_rows_are_unchanged(tiny: Path, tmp_path: Path, capsys) -> None:
    """MLaKE (``--dataset mlake``): no scorer in the key or the rows; the key holds exactly
    the fields it held before the scorers were added."""
    args = ["edit", "transfer", "--model", str(tiny), "--template", "qa", "--method", "ft"]
    args += ["--langs", "en,zh", "--facts", "1", "--n-locality", "1", "--set", "ft.steps=1"]
    args += ["--results-dir", str(tmp_path), "--device", "cpu", "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert "paper_scorer" not in report and "own_measures" not in report["methods"]["ft"]
    run = Path(report["methods"]["ft"]["results"])
    key = json.loads((run / "key.json").read_text())
    assert set(key) == {
        "model",
        "data_version",
        "subjects",
        "facts",
        "n_facts",
        "langs",
        "template",
        "config",
        "method",
        "method_config",
        "corpus",
        "seed",
    }
    rows = pd.concat(pd.read_parquet(p) for p in (run / "tables").glob("edits_*.parquet"))
    assert not [c for c in rows.columns if c.startswith("paper_")]
