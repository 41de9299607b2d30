"""``mlake edit transfer --protocol mlake``: the paper's tables printed and written as CSV
(the same numbers), ``--json``, a read-back that computes nothing, and clear errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pandas as pd
import pytest

from analysis.transfer import PROTOCOL_TABLES, protocol_cells
from mlake.cli import main
from mlake.commands.edit import format_protocol, protocol_table, write_protocol_csv

LANGS = ("en", "zh")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# -- errors, before any model is loaded ----------------------------------------------------


def test_bad_protocol_is_refused_naming_the_choices(capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["edit", "transfer", "--method", "ft", "--protocol", "paper"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--protocol" in err and "invalid choice: 'paper'" in err
    assert "'free-form'" in err and "'mlake'" in err


def test_mlake_protocol_needs_the_multiple_choice_release(capsys) -> None:
    code, _, err = _run(capsys, "edit", "transfer", "--method", "ft", "--protocol", "mlake")
    assert code == 2
    assert "--protocol mlake: MLaKE v2024-11 has no multiple-choice files" in err
    assert "--version v2024-04" in err


def test_csv_without_the_mlake_protocol_is_refused(capsys, tmp_path: Path) -> None:
    code, _, err = _run(capsys, "edit", "transfer", "--method", "ft", "--csv", str(tmp_path / "x"))
    assert code == 2 and "--csv" in err and "--protocol mlake" in err


# -- the printed tables and the CSV --------------------------------------------------------


def _parse(text: str) -> dict[tuple[str, str, str, str, str], tuple[float, float, str]]:
    """(method, hop, format, edit_lang, test_lang) -> (pct, before_pct, "n/facts/missing")
    as printed."""
    out: dict = {}
    lines = text.splitlines()
    k = 0
    while k < len(lines):
        head = re.match(r"^(\S+) \| (\S+) \| (\S+): ", lines[k])
        if not head:
            k += 1
            continue
        method, hop, fmt = head.groups()
        langs = lines[k + 1].split()
        values = lines[k + 2 : k + 2 + len(langs)]
        assert lines[k + 2 + len(langs)].strip() == "n/facts/missing"
        counts = lines[k + 3 + len(langs) : k + 3 + 2 * len(langs)]
        for vrow, crow in zip(values, counts, strict=True):
            a = vrow.split()[0]
            pairs = re.findall(r"(-|\d+\.\d) \((-|\d+\.\d)\)", vrow)
            assert len(pairs) == len(langs), vrow
            assert crow.split()[0] == a
            for b, (v, p), c in zip(langs, pairs, crow.split()[1:], strict=True):
                num = [math.nan if x == "-" else float(x) for x in (v, p)]
                out[method, hop, fmt, a, b] = (num[0], num[1], c)
        k += 3 + 2 * len(langs)
    return out


def _assert_csv_equals_printed(csv: Path, text: str) -> int:
    table = pd.read_csv(csv, keep_default_na=True)
    printed = _parse(text)
    assert len(printed) == len(table)
    for r in table.to_dict(orient="records"):
        pct, before, counts = printed[
            r["method"], r["hop"], r["format"], r["edit_lang"], r["test_lang"]
        ]
        for got, want in ((pct, r["pct"]), (before, r["before_pct"])):
            assert (math.isnan(got) and math.isnan(want)) or got == want, (r, got, want)
        assert counts == f"{r['n']}/{r['facts']}/{r['missing']}"
        assert r["facts"] + r["missing"] == r["edits"]
    return len(table)


def _rows() -> pd.DataFrame:
    rows = []
    for fact in (1, 2, 3):
        for b in LANGS:
            base = {"fact_id": fact, "edit_lang": "en", "test_lang": b, "known_before": True}
            kind = "efficacy" if b == "en" else "transfer"
            hit = float(fact != 3 or b == "en")
            rows.append(
                {
                    **base,
                    "kind": kind,
                    "form": "question",
                    "n": 1,
                    "success_greedy": hit,
                    "chose_edit": hit,
                    "chose_edit_before": 0.0,
                    "chose_original": math.nan,
                    "mcqa_by": "",
                    "missing": "",
                }
            )
            for by in ("loglik", "letter"):
                n = 0 if (fact, b) == (3, "zh") else 1
                rows.append(
                    {
                        **base,
                        "kind": "mcqa",
                        "form": "question",
                        "n": n,
                        "success_greedy": math.nan,
                        "chose_edit": float(n and by == "loglik"),
                        "chose_edit_before": float(fact == 1),
                        "chose_original": 0.0,
                        "mcqa_by": by,
                        "missing": "" if n else "no multiple-choice record",
                    }
                )
    return pd.DataFrame(rows)


def test_printed_tables_equal_the_csv(tmp_path: Path) -> None:
    cells = protocol_cells(_rows(), LANGS)
    report = {
        "model": "m",
        "n_facts": 3,
        "methods": {
            "ft": {
                "edits": 3,
                "seconds": 1.0,
                "results": "r",
                "protocol_mlake": {"cells": cells.to_dict(orient="records"), "missing": []},
            },
        },
    }
    path = tmp_path / "sub" / "t.csv"
    write_protocol_csv(report, path)
    text = format_protocol(report, LANGS)
    assert _assert_csv_equals_printed(path, text) == len(PROTOCOL_TABLES) * len(LANGS) ** 2
    assert list(pd.read_csv(path).columns)[:3] == ["method", "hop", "format"]
    assert len(protocol_table(report)) == len(cells)
    printed = _parse(text)
    assert printed["ft", "single-hop", "mcqa-loglik", "en", "zh"] == (100.0, 50.0, "2/2/1")
    assert printed["ft", "single-hop", "free-form", "en", "zh"][:2] == (66.7, 0.0)


# -- end to end on the micro mlake-tiny ----------------------------------------------------


@pytest.mark.slow
def test_protocol_run_prints_writes_and_reads_back(
    micro_tiny: Path, tmp_path: Path, capsys
) -> None:
    csv = tmp_path / "tables.csv"
    args = ("edit", "transfer", "--model", str(micro_tiny), "--device", "cpu", "--method", "ft")
    args += ("--langs", "en,zh", "--facts", "2", "--n-locality", "1", "--version", "v2024-04")
    args += ("--set", "ft.steps=5", "--results-dir", str(tmp_path / "store"))
    args += ("--protocol", "mlake", "--csv", str(csv))
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    assert "multiple choice and multi-hop measured" in err
    assert _assert_csv_equals_printed(csv, text) == len(PROTOCOL_TABLES) * len(LANGS) ** 2
    table = pd.read_csv(csv)
    sh = table[(table["hop"] == "single-hop") & (table["format"] != "free-form")]
    assert (sh["n"] + sh["missing"] >= 1).all()  # each cell: measured or counted missing
    assert (sh["edits"] == 2).all()

    # The stored rows: multiple choice for every edit, both ways, in every test language.
    store = tmp_path / "store" / "transfer"
    (run,) = list(store.iterdir())
    rows = pd.concat(pd.read_parquet(p) for p in sorted((run / "tables").glob("edits_*.parquet")))
    mc = rows[rows["kind"] == "mcqa"]
    assert len(mc) == 2 * 2 * 2 * 2 * 2  # facts x edit langs x test langs x hops x ways
    assert set(mc["mcqa_by"]) == {"loglik", "letter"}
    assert (run / "tables" / "protocol_baseline.parquet").is_file()
    assert json.loads((run / "key.json").read_text())["config"]["protocol"] == "mlake"

    # Read back: nothing recomputed, the same tables; --json still works.
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    code, again, err = _run(capsys, *args)
    assert code == 0 and "measured" not in err and "loaded from" in err
    assert _parse(again) == _parse(text)
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == mtimes
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    report = json.loads(out)
    cells = report["methods"]["ft"]["protocol_mlake"]["cells"]
    assert len(cells) == len(table) and report["protocol_csv"] == str(csv)
