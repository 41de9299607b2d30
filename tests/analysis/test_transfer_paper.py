"""The papers' own scorer in the other datasets' tables: which rows carry it
(:func:`analysis.transfer._add_paper`), the unedited model's values read back
(:func:`analysis.transfer.paper_map`) and the cells (:func:`analysis.transfer.own_cells`),
hand-computed."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import pytest

from analysis.transfer import (
    OWN_CELL_COLUMNS,
    _add_paper,
    own_cells,
    paper_columns,
    paper_map,
)
from tests.analysis.transfer_rows import transfer_row


def _row(fact, a, b, kind, form, n=1, hits=0, f1=math.nan, f1_before=math.nan, em=0.0):
    scored = not math.isnan(f1)
    return {
        **transfer_row(fact, a, b, kind, form, n, hits, before=0.0, known_before=False),
        "paper_f1": f1,
        "paper_f1_before": f1_before,
        "paper_em": em if scored else math.nan,
        "paper_em_before": 0.0 if scored else math.nan,
        "paper_acc": 0.5 if scored else math.nan,
        "paper_acc_before": 0.25 if scored else math.nan,
    }


def test_rows_get_their_measures_scores() -> None:
    paper = {
        (1, "zh", "reliability"): {"f1": 0.5, "em": 0.0, "acc": 0.75},
        (1, "zh", "locality"): {"f1": 1.0, "em": 1.0, "acc": 1.0},
    }
    before = {(1, "zh", "reliability"): {"f1": 0.1, "em": 0.0, "acc": 0.2}}
    transfer: dict[str, Any] = {
        "fact_id": 1,
        "test_lang": "zh",
        "kind": "transfer",
        "form": "question",
        "n": 1,
    }
    _add_paper(transfer, paper, before)
    assert (transfer["paper_f1"], transfer["paper_acc"], transfer["paper_f1_before"]) == (
        0.5,
        0.75,
        0.1,
    )
    loc: dict[str, Any] = {
        "fact_id": 1,
        "test_lang": "zh",
        "kind": "locality",
        "form": "locality",
        "n": 1,
    }
    _add_paper(loc, paper, before)
    assert loc["paper_em"] == 1.0 and math.isnan(loc["paper_em_before"])  # no prior given
    # A row that is no measure of the papers' (mcqa) or was not measured (n 0): NaN.
    others: list[dict[str, Any]] = [
        {"fact_id": 1, "test_lang": "zh", "kind": "mcqa", "form": "question", "n": 1},
        {"fact_id": 1, "test_lang": "zh", "kind": "transfer", "form": "question", "n": 0},
    ]
    for row in others:
        _add_paper(row, paper, before)
        assert all(math.isnan(row[c]) for c in paper_columns())


def test_paper_map_reads_the_baseline_by_kind() -> None:
    table = pd.DataFrame(
        [
            {"fact_id": 3, "test_lang": "de", "kind": "reliability", "paper_f1": 0.25,
             "paper_em": 0.0, "paper_acc": 0.5},
            {"fact_id": 3, "test_lang": "de", "kind": "locality", "paper_f1": math.nan,
             "paper_em": math.nan, "paper_acc": math.nan},
        ]
    )  # fmt: skip
    assert paper_map(table) == {(3, "de", "reliability"): {"f1": 0.25, "em": 0.0, "acc": 0.5}}
    assert paper_map(table.drop(columns=["paper_f1", "paper_em", "paper_acc"])) == {}


def test_own_cells_give_the_scorer_beside_greedy() -> None:
    rows = []
    for fact, f1 in ((1, 1.0), (2, 0.5), (3, 0.0)):
        rows.append(_row(fact, "en", "en", "efficacy", "question", hits=int(f1 == 1.0), f1=f1))
        rows.append(
            _row(fact, "en", "zh", "transfer", "question", f1=f1 / 2, f1_before=0.1, em=1.0)
        )
    # A generalization row not scored by the paper's scorer (e.g. too long): counted by
    # greedy, not in the scorer's n.
    rows.append(_row(1, "en", "zh", "generalization", "rephrase", hits=1))
    cells = own_cells(pd.DataFrame(rows), ["en", "zh"])
    assert list(cells.columns) == list(OWN_CELL_COLUMNS)
    at = {(r["measure"], r["edit_lang"], r["test_lang"]): r for r in cells.to_dict("records")}
    rel = at["reliability", "en", "en"]
    assert (rel["pct"], rel["n"], rel["paper_n"]) == (33.3, 3, 3)
    assert rel["paper_f1_pct"] == 50.0  # (1 + 0.5 + 0) / 3
    assert rel["paper_f1_before_pct"] != rel["paper_f1_before_pct"]  # NaN: no prior given
    cross = at["reliability", "en", "zh"]
    assert cross["paper_f1_pct"] == 25.0 and cross["paper_f1_before_pct"] == 10.0
    assert cross["paper_em_pct"] == 100.0 and cross["paper_em_before_pct"] == 0.0
    assert cross["paper_acc_pct"] == 50.0 and cross["paper_acc_before_pct"] == 25.0
    gen = at["generalization", "en", "zh"]
    assert gen["pct"] == 100.0 and gen["n"] == 1 and gen["paper_n"] == 0
    assert math.isnan(gen["paper_f1_pct"])
    # Rows saved without the scorer's columns (MLaKE, older runs): NaN, paper_n 0.
    frame = pd.DataFrame(rows)
    plain = own_cells(frame.drop(columns=[c for c in paper_columns() if c in frame]), ["en", "zh"])
    assert (plain["paper_n"] == 0).all() and plain["paper_f1_pct"].isna().all()
    assert plain["pct"].tolist() == pytest.approx(cells["pct"].tolist(), nan_ok=True)


# -- end to end on the MzsRE fixture: an edit that changes nothing --------------------------


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from mlake_core.models import load_adapter
    from mlake_core.models.tiny import TinySize, build_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    return load_adapter(
        str(build_tiny_model("gpt2", folder, size=TinySize(n_ctx=256))), device="cpu"
    )


def test_an_edit_that_changes_nothing_scores_as_the_unedited_model(adapter) -> None:
    """The unedited model's scores (own_baseline, read back through paper_map) are every
    edit's ``_before`` columns; an edit with no change scores the same after, and ReMaKE's
    locality (against the unedited model's own prediction) is 1 before and after."""
    from pathlib import Path

    from analysis.transfer import TransferConfig, evaluate_edit, own_baseline
    from mlake_core.data.sources import load_dataset
    from mlake_core.editing import make_request
    from mlake_core.editing.base import EditResult
    from mlake_core.models.prompting import get_template

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "mzsre"
    ds = load_dataset("mzsre", fixtures, "", "en,zh")
    qa, langs = get_template("qa"), ("en", "zh")
    base = own_baseline(adapter, ds, [0, 1], langs, qa, TransferConfig())
    assert {"paper_f1", "paper_tokens"} <= set(base.columns)
    before = paper_map(base)
    assert before[0, "zh", "locality"]["f1"] == 1.0 and before[0, "zh", "locality"]["tokens"]
    request = make_request(adapter, ds.fact(0).views["en"], qa, "question")
    nothing = EditResult("ft", (request,))
    rows = evaluate_edit(
        adapter,
        nothing,
        ds,
        langs,
        qa,
        TransferConfig(),
        locality_ids=[],
        known_before={},
        paper_before=before,
    )
    scored = [r for r in rows if not math.isnan(r["paper_f1"])]
    measures = {(r["kind"], r["test_lang"]) for r in scored}
    assert measures == {
        (k, b) for k in ("efficacy", "generalization", "locality", "portability") for b in ("en",)
    } | {(k, "zh") for k in ("transfer", "generalization", "locality", "portability")}
    for r in scored:
        for m in ("f1", "em", "acc"):
            assert r[f"paper_{m}"] == pytest.approx(r[f"paper_{m}_before"]), (r["kind"], m)
        if r["kind"] == "locality":
            assert (r["paper_f1"], r["paper_em"], r["paper_acc"]) == (1.0, 1.0, 1.0)


def test_bmike53_perplexity_comparison_hand_checked(adapter) -> None:
    """BMIKE-53 CounterFact's ``ppl``: the new answer's per-token mean log-probability above
    ``loc_ans``'s after the question (after the ``loc`` question: ``loc_ans`` above the new
    answer), recomputed here from the sequence scores."""
    from pathlib import Path

    from analysis.transfer import paper_measures
    from mlake_core.data.external import ExternalView
    from mlake_core.data.sources import load_dataset
    from mlake_core.metrics.knowledge import score_sequences
    from mlake_core.models.prompting import get_template

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "bmike53"
    ds = load_dataset("bmike53-counterfact", fixtures, "", "de")
    qa = get_template("qa")
    ppl = ("reliability", "generalization", "locality")
    got = paper_measures(adapter, ds.facts[:2], ("de",), qa, ppl=ppl)
    plain = paper_measures(adapter, ds.facts[:2], ("de",), qa)
    assert not any("ppl" in v for v in plain.values())
    checked = 0
    for fact in ds.facts[:2]:
        view = fact.views["de"]
        assert isinstance(view, ExternalView)
        assert view.locality is not None and view.rephrase is not None
        loc_q, loc_ans = view.locality
        new = view.question.edit_target.text
        for measure, text, first, second in (
            ("reliability", view.question.text, new, loc_ans),
            ("generalization", view.rephrase.text, new, loc_ans),
            ("locality", loc_q, loc_ans, new),
        ):
            assert text is not None
            prompt, prefix = qa.question_prompt(text, "de")
            ids = adapter.encode(prompt)
            a, b = (
                adapter.tokenizer(prefix + x.strip(), add_special_tokens=False)["input_ids"]
                for x in (first, second)
            )
            sa, sb = score_sequences(adapter, [(ids, a), (ids, b)])
            assert got[fact.fact_id, "de", measure]["ppl"] == float(sa.mean > sb.mean)
            checked += 1
        assert "ppl" not in got[fact.fact_id, "de", "portability"]
    assert checked == 6


def test_own_cells_count_each_metric_over_its_own_questions() -> None:
    rows = [_row(1, "en", "en", "efficacy", "question", hits=1, f1=1.0) for _ in range(1)]
    rows += [_row(2, "en", "en", "efficacy", "question", hits=0, f1=0.0)]
    rows[0]["paper_ppl"], rows[0]["paper_ppl_before"] = 1.0, 0.0
    rows[1]["paper_ppl"], rows[1]["paper_ppl_before"] = math.nan, math.nan  # not compared
    cells = own_cells(pd.DataFrame(rows), ["en"])
    rel = cells[cells["measure"] == "reliability"].iloc[0]
    assert (rel["paper_n"], rel["paper_ppl_n"]) == (2, 1)
    assert (rel["paper_f1_pct"], rel["paper_ppl_pct"], rel["paper_ppl_before_pct"]) == (
        50.0,
        100.0,
        0.0,
    )
