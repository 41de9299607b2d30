"""``mlake edit report RUN_DIR``: a transfer run's tables without a model, complete or as far
as it got (the edits saved one by one), ``--same-facts``, ``--json``, ``--csv``, and clear
errors."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from analysis.transfer import PROTOCOL_TABLES, TransferRun, protocol_cells
from mlake.cli import main
from mlake_core.errors import DataError
from mlake_core.results.store import open_run, read_run
from tests.analysis.transfer_rows import transfer_row

LANGS = ("en", "zh")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _edit_rows(fact: int, a: str, hit_zh: float, method: str = "ft") -> list[dict]:
    """One edit's rows (:func:`transfer_row`): free-form efficacy/transfer and single-hop
    multiple choice both ways, with the edit's own columns."""
    edit = {
        "method": method,
        "edit_form": "question",
        "edit_loss": 0.5,
        "edit_seconds": 1.0,
        "eval_seconds": 2.0,
    }
    rows = []
    for b in LANGS:
        hit = 1.0 if b == a else hit_zh
        kind = "efficacy" if b == a else "transfer"
        probs = {"success_prob": hit, "p_new": 0.5}  # the free-form rows' probability measures
        rows.append(
            {**edit, **probs, **transfer_row(fact, a, b, kind, "question", 1, hit, before=0.0)}
        )
        for by in ("loglik", "letter"):
            row = transfer_row(fact, a, b, "mcqa", "question", 1, hit, by=by, before=0.0,
                               orig=1.0 - hit)  # fmt: skip
            rows.append({**edit, "success_prob": math.nan, "p_new": math.nan, **row})
    return rows


def _save_piece(run, name: str, rows: pd.DataFrame) -> None:
    """An edit saved as the stage saves it: its rows, then its generator state."""
    run.save_table(name, rows)
    run.save_arrays(name, {"generator": np.zeros(4, dtype=np.uint8)})


def _store(
    tmp_path: Path,
    *,
    langs=LANGS,
    protocol="mlake",
    name="a",
    method="ft",
    method_config=None,
) -> Path:
    """A transfer run with en complete (facts 1-3, its table) and zh partial (facts 1-2,
    saved one by one)."""
    key = {
        "model": {"model_id": "m"},
        "data_version": "v2024-04",
        "facts": "abc",
        "n_facts": 3,
        "langs": list(langs),
        "config": {"protocol": protocol},
        "method": method,
        "method_config": method_config or {"lr": "0.1"},
        "seed": 0,
    }
    run = open_run("transfer", key, root=tmp_path / name)
    run.write_meta(method=method, method_config=key["method_config"])
    en = [r for f in (1, 2, 3) for r in _edit_rows(f, "en", float(f != 3), method)]
    run.save_table("edits_en", pd.DataFrame(en))
    for f in (1, 2):
        _save_piece(run, f"edit_zh_{f}", pd.DataFrame(_edit_rows(f, "zh", 1.0, method)))
    return run.path


# -- reading a run as far as it got ------------------------------------------------------


def test_partial_load_reads_the_saved_edits(tmp_path: Path) -> None:
    path = _store(tmp_path)
    full = TransferRun.load(path)  # only the complete tables
    assert set(full.rows["edit_lang"]) == {"en"} and full.complete == ("en",)
    run = TransferRun.load(path, partial=True)
    assert run.saved == {"en": 3, "zh": 2} and run.complete == ("en",)
    assert not run.is_complete and run.n_facts == 3 and run.langs == list(LANGS)
    zh = run.rows[run.rows["edit_lang"] == "zh"]
    assert sorted(set(zh["fact_id"])) == [1, 2]


def test_a_run_without_a_complete_table_points_to_the_report(tmp_path: Path) -> None:
    path = _store(tmp_path)
    (path / "tables" / "edits_en.parquet").unlink()
    with pytest.raises(DataError, match=r"no edits_<lang> table yet.*mlake edit report"):
        TransferRun.load(path)
    assert TransferRun.load(path, partial=True).saved == {"en": 0, "zh": 2}


def test_pieces_are_read_by_their_own_language_only(tmp_path: Path) -> None:
    path = _store(tmp_path)
    # A piece of another language whose code starts like zh's is not zh's.
    rows = pd.DataFrame(_edit_rows(7, "zh", 1.0)).assign(edit_lang="zh_x")
    _save_piece(read_run(path, "transfer"), "edit_zh_x_7", rows)
    run = TransferRun.load(path, partial=True)
    assert run.saved["zh"] == 2 and 7 not in set(run.rows["fact_id"])


def test_a_language_that_finishes_while_it_is_read(tmp_path: Path, monkeypatch) -> None:
    from mlake_core.results.store import Run

    path = _store(tmp_path)
    original = Run.load_table

    def finishing(self, name, **kw):
        if name == "edit_zh_1" and not self.has_table("edits_zh"):
            # The stage saves the language's table, then removes its pieces.
            zh = pd.concat([original(self, f"edit_zh_{f}") for f in (1, 2)])
            self.save_table("edits_zh", zh)
            for f in (1, 2):
                self.table_path(f"edit_zh_{f}").unlink()
        return original(self, name, **kw)

    monkeypatch.setattr(Run, "load_table", finishing)
    run = TransferRun.load(path, partial=True)
    assert run.complete == ("en", "zh") and run.is_complete
    assert run.saved == {"en": 3, "zh": 2}
    assert sorted(set(run.rows[run.rows["edit_lang"] == "zh"]["fact_id"])) == [1, 2]


def test_an_edit_whose_state_is_not_saved_yet_is_not_counted(tmp_path: Path) -> None:
    path = _store(tmp_path)
    store = read_run(path, "transfer")
    store.save_table("edit_zh_3", pd.DataFrame(_edit_rows(3, "zh", 1.0)))  # rows, no state
    run = TransferRun.load(path, partial=True)
    assert run.saved["zh"] == 2 and 3 not in set(run.rows[run.rows["edit_lang"] == "zh"]["fact_id"])


def test_a_language_skipped_whole_is_done(tmp_path: Path) -> None:
    path = _store(tmp_path)
    store = read_run(path, "transfer")
    for f in (1, 2):  # zh: restricted editing with an empty neuron set, nothing edited
        store.table_path(f"edit_zh_{f}").unlink()
    store.write_meta(skipped={"zh:EmptyUnitSet": 3}, status="complete")
    run = TransferRun.load(path, partial=True)
    assert run.is_complete and run.saved == {"en": 3, "zh": 0}


def test_no_edit_saved_names_the_folder(tmp_path: Path) -> None:
    run = open_run("transfer", {"langs": ["en"], "n_facts": 1}, root=tmp_path)
    run.write_meta(method="ft")
    with pytest.raises(DataError, match=re.escape(str(run.path)) + ".*no edit is saved"):
        TransferRun.load(run.path, partial=True)


# -- the command ---------------------------------------------------------------------------


def test_report_of_a_partial_run_says_so_and_prints_the_tables(tmp_path: Path, capsys) -> None:
    path = _store(tmp_path)
    code, out, err = _run(capsys, "edit", "report", str(path))
    assert code == 0, err
    assert "ft: PARTIAL" in out and "en 3/3, zh 2/3" in out
    assert "ft | single-hop | mcqa-loglik" in out
    code, out, err = _run(capsys, "edit", "report", str(path), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["partial"] is True and report["methods"]["ft"]["saved"] == {"en": 3, "zh": 2}
    cells = pd.DataFrame(report["methods"]["ft"]["protocol_mlake"]["cells"])
    run = TransferRun.load(path, partial=True)
    want = protocol_cells(run.rows, LANGS)
    assert len(cells) == len(PROTOCOL_TABLES) * len(LANGS) ** 2
    pd.testing.assert_frame_equal(
        cells[["pct", "n", "edits"]], want[["pct", "n", "edits"]], check_dtype=False
    )
    en_zh = cells[
        (cells["format"] == "mcqa-loglik")
        & (cells["edit_lang"] == "en")
        & (cells["test_lang"] == "zh")
    ].iloc[0]
    assert en_zh["edits"] == 3 and en_zh["pct"] == pytest.approx(66.7)


def test_same_facts_keeps_the_facts_every_edit_language_has(tmp_path: Path, capsys) -> None:
    path = _store(tmp_path)
    csv = tmp_path / "t.csv"
    code, out, err = _run(capsys, "edit", "report", str(path), "--same-facts", "--csv", str(csv))
    assert code == 0, err
    assert "only the facts edited in every edit language" in out and "en 2/3, zh 2/3" in out
    table = pd.read_csv(csv)
    assert (table["edits"] == 2).all()  # fact 3 (en only) is left out
    cell = table[
        (table["format"] == "mcqa-loglik")
        & (table["edit_lang"] == "en")
        & (table["test_lang"] == "zh")
    ].iloc[0]
    assert cell["pct"] == 100.0  # facts 1 and 2 transfer; fact 3 did not and is out


def test_complete_run_says_complete(tmp_path: Path, capsys) -> None:
    path = _store(tmp_path)
    run = TransferRun.load(path, partial=True)
    from mlake_core.results.store import read_run

    store = read_run(path, "transfer")
    store.save_table("edits_zh", run.rows[run.rows["edit_lang"] == "zh"])
    code, out, err = _run(capsys, "edit", "report", str(path))
    assert code == 0, err
    assert "ft: complete" in out and "PARTIAL" not in out


def test_each_run_says_whether_it_is_complete(tmp_path: Path, capsys) -> None:
    done = _store(tmp_path, name="a")
    run = TransferRun.load(done, partial=True)
    read_run(done, "transfer").save_table("edits_zh", run.rows[run.rows["edit_lang"] == "zh"])
    going = _store(tmp_path, name="b", method="rome")
    code, out, err = _run(capsys, "edit", "report", str(done), str(going))
    assert code == 0, err
    assert "ft: complete;" in out and "rome: PARTIAL" in out
    assert "== ft:" in out and "== rome:" in out


def test_two_runs_of_one_method_are_refused(tmp_path: Path, capsys) -> None:
    a = _store(tmp_path, name="a")
    b = _store(tmp_path, name="b", method_config={"lr": "0.5"})
    code, _, err = _run(capsys, "edit", "report", str(a), str(b))
    assert code == 2 and "both ft runs" in err and str(a) in err and str(b) in err


def test_csv_of_a_free_form_run_is_refused(tmp_path: Path, capsys) -> None:
    path = _store(tmp_path, protocol="free-form")
    code, _, err = _run(capsys, "edit", "report", str(path), "--csv", str(tmp_path / "t.csv"))
    assert code == 2 and "--csv" in err and "free-form" in err
    assert not (tmp_path / "t.csv").exists()
    code, out, err = _run(capsys, "edit", "report", str(path))
    assert code == 0 and "success_greedy" in out  # the free-form matrices


def test_runs_of_other_languages_are_refused(tmp_path: Path, capsys) -> None:
    a = _store(tmp_path, name="a")
    b = _store(tmp_path, langs=("en", "zh", "ja"), name="b")
    code, _, err = _run(capsys, "edit", "report", str(a), str(b))
    assert code == 2 and str(b) in err and "langs differs" in err


def test_a_folder_that_is_no_transfer_run_is_named(tmp_path: Path, capsys) -> None:
    code, _, err = _run(capsys, "edit", "report", str(tmp_path / "missing"))
    assert code == 2 and str(tmp_path / "missing") in err


# -- end to end: a real run reads back the transfer command's own tables -----------------


@pytest.mark.slow
def test_report_reprints_the_transfer_tables_and_reads_pieces_alike(
    micro_tiny: Path, tmp_path: Path, capsys
) -> None:
    args = ("edit", "transfer", "--model", str(micro_tiny), "--device", "cpu", "--method", "ft")
    args += ("--langs", "en,zh", "--facts", "2", "--n-locality", "1", "--version", "v2024-04")
    args += ("--set", "ft.steps=5", "--results-dir", str(tmp_path / "store"))
    args += ("--protocol", "mlake", "--csv", str(tmp_path / "t.csv"))
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    (run,) = list((tmp_path / "store" / "transfer").iterdir())

    def tables(printed: str) -> list[str]:
        """The printed tables (from the first table's title on), without the header lines
        that name the run's wall time and the CSV."""
        lines = printed.splitlines()
        start = next(i for i, x in enumerate(lines) if " | single-hop | " in x)
        kept = [x for x in lines[start:] if not x.startswith("tables as CSV")]
        while kept and not kept[-1].strip():
            kept.pop()
        return kept

    code, out, err = _run(capsys, "edit", "report", str(run))
    assert code == 0, err
    assert "ft: complete; edits saved per edit language: en 2/2, zh 2/2" in out
    assert tables(out) == tables(text)

    # The same rows saved edit by edit (as a run stopped inside zh leaves them): the same
    # tables, now said to be partial.
    zh = pd.read_parquet(run / "tables" / "edits_zh.parquet")
    store = read_run(run, "transfer")
    for fact, rows in zh.groupby("fact_id"):
        _save_piece(store, f"edit_zh_{fact}", rows.reset_index(drop=True))
    (run / "tables" / "edits_zh.parquet").unlink()
    code, out, err = _run(capsys, "edit", "report", str(run))
    assert code == 0, err
    assert "ft: PARTIAL" in out and "en 2/2, zh 2/2" in out
    assert tables(out) == tables(text)
