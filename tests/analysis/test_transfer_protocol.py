"""The MLaKE protocol of edit evaluation (``--protocol mlake``): multiple choice read two
ways, hand-computed on the micro mlake-tiny; the cells' counts; missing records counted."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pandas as pd
import pytest
import torch

from analysis.transfer import (
    CELL_COLUMNS,
    NO_MULTI_HOP,
    TransferConfig,
    mcqa_measures,
    missing_reasons,
    protocol_cells,
)
from mlake_core.data.records import McqaRecord
from mlake_core.errors import ConfigError
from mlake_core.metrics.knowledge import McqaItem, lettered_question, score_mcqa
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from tests.analysis.transfer_rows import transfer_row

QA = get_template("qa")
LANGS = ("en", "zh")


# -- configuration --------------------------------------------------------------------------


def test_protocol_is_checked_and_keys_the_run() -> None:
    with pytest.raises(ConfigError, match=r"--protocol 'paper': choose free-form or mlake"):
        TransferConfig(protocol="paper")
    # The free-form protocol keeps the keys of runs made before protocols existed; an mlake
    # run has its own key, so a run without the multiple-choice rows is never read for it.
    assert "protocol" not in TransferConfig().to_dict()
    assert TransferConfig(protocol="mlake").to_dict()["protocol"] == "mlake"
    assert TransferConfig().to_dict() != TransferConfig(protocol="mlake").to_dict()


def test_lettered_question_layout() -> None:
    assert lettered_question(" Who? ", ["x ", " y", "z"]) == "Who?\nA. x\nB. y\nC. z"


# -- the cells ------------------------------------------------------------------------------


_row = transfer_row


def _rows() -> pd.DataFrame:
    rows = []
    for fact in (1, 2, 3):
        rows.append(_row(fact, "en", "en", "efficacy", "question", 1, 1, before=0))
        rows.append(_row(fact, "en", "zh", "transfer", "question", 1, int(fact == 1), before=0))
    # Single-hop multiple choice, edits in en measured in zh: fact 3 has no record in zh.
    for by, hits in (("loglik", (1, 0)), ("letter", (0, 0))):
        rows.append(_row(1, "en", "zh", "mcqa", "question", 1, hits[0], by=by, before=0, orig=0))
        rows.append(_row(2, "en", "zh", "mcqa", "question", 1, hits[1], by=by, before=1, orig=0))
        rows.append(
            _row(
                3, "en", "zh", "mcqa", "question", 0, 0, by=by, missing="no multiple-choice record"
            )
        )
    # Multi-hop portability: fact 1 has 3 questions in zh (2 answered), fact 2 one (0), fact
    # 3 none.
    rows.append(_row(1, "en", "zh", "portability", "multi_hop", 3, 2, before=1))
    rows.append(_row(2, "en", "zh", "portability", "multi_hop", 1, 0, before=0))
    rows.append(_row(3, "en", "zh", "portability", "multi_hop", 0, 0, missing=NO_MULTI_HOP))
    return pd.DataFrame(rows)


def _cell(cells: pd.DataFrame, hop: str, fmt: str, a: str, b: str) -> dict:
    sel = cells[
        (cells["hop"] == hop)
        & (cells["format"] == fmt)
        & (cells["edit_lang"] == a)
        & (cells["test_lang"] == b)
    ]
    assert len(sel) == 1
    return sel.iloc[0].to_dict()


def test_cells_hand_computed_and_counts_add_up() -> None:
    cells = protocol_cells(_rows(), LANGS)
    assert list(cells.columns) == list(CELL_COLUMNS)
    assert len(cells) == 6 * len(LANGS) ** 2  # six tables, every cell present

    c = _cell(cells, "single-hop", "free-form", "en", "zh")
    assert (c["n"], c["chose_edit"], c["pct"], c["before_pct"]) == (3, 1, 33.3, 0.0)
    c = _cell(cells, "single-hop", "mcqa-loglik", "en", "zh")
    assert (c["n"], c["chose_edit"], c["facts"], c["missing"], c["edits"]) == (2, 1, 2, 1, 3)
    assert (c["pct"], c["before_pct"], c["original_pct"]) == (50.0, 50.0, 0.0)
    c = _cell(cells, "single-hop", "mcqa-letter", "en", "zh")
    assert (c["pct"], c["before_pct"]) == (0.0, 50.0)
    c = _cell(cells, "multi-hop", "free-form", "en", "zh")  # questions, not facts, averaged
    assert (c["n"], c["chose_edit"], c["pct"], c["before_pct"]) == (4, 2, 50.0, 25.0)
    assert (c["facts"], c["missing"]) == (2, 1)
    c = _cell(cells, "multi-hop", "mcqa-loglik", "en", "zh")  # nothing measured: all missing
    assert c["n"] == 0 and math.isnan(c["pct"]) and (c["facts"], c["missing"]) == (0, 3)
    c = _cell(cells, "single-hop", "free-form", "zh", "en")  # no edit in zh
    assert c["edits"] == 0 and c["n"] == 0

    # Every cell: facts + missing = edits, chose_edit <= n, and pct is chose_edit / n.
    assert (cells["facts"] + cells["missing"] == cells["edits"]).all()
    assert (cells["chose_edit"] <= cells["n"]).all()
    measured = cells[cells["n"] > 0]
    assert (measured["pct"] == (100 * measured["chose_edit"] / measured["n"]).round(1)).all()


def test_missing_records_are_counted_with_their_reason() -> None:
    reasons = missing_reasons(_rows())
    got = {(r["hop"], r["test_lang"], r["missing"]): r["facts"] for _, r in reasons.iterrows()}
    assert got == {
        ("single-hop", "zh", "no multiple-choice record"): 1,  # one fact, both ways
        ("multi-hop", "zh", NO_MULTI_HOP): 1,
    }


def test_old_rows_without_counts_are_read_from_success() -> None:
    """Rows saved before the count columns existed give free-form cells from ``n`` and
    ``success_greedy``, with no prior."""
    rows = _rows()
    old = rows[rows["kind"] != "mcqa"].drop(
        columns=["chose_edit", "chose_original", "chose_edit_before", "chose_original_before"]
    )
    old = old.drop(columns=["mcqa_by", "missing"])
    c = _cell(protocol_cells(old, LANGS), "multi-hop", "free-form", "en", "zh")
    assert (c["n"], c["chose_edit"], c["pct"]) == (4, 2, 50.0) and math.isnan(c["before_pct"])


# -- scoring on the micro mlake-tiny --------------------------------------------------------


@pytest.fixture(scope="module")
def adapter(micro_tiny: Path):
    return load_adapter(str(micro_tiny), "tlens", device="cpu")


@pytest.fixture(scope="module")
def hf(micro_tiny: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(micro_tiny).eval()


def _reference_logp(hf, tokenizer, prompt: str, answer: str) -> float:
    """Summed log-probability of ``answer`` after ``prompt`` (tokenized apart and joined by
    ids, BOS first), one unpadded sequence through the plain Hugging Face model."""
    p = tokenizer(prompt)["input_ids"]
    if not p or p[0] != tokenizer.bos_token_id:
        p = [tokenizer.bos_token_id, *p] if tokenizer.bos_token_id is not None else p
    t = tokenizer(answer, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logp = hf(torch.tensor([p + t])).logits[0].log_softmax(-1)
    return float(sum(logp[len(p) - 1 + k, tok] for k, tok in enumerate(t)))


@pytest.mark.slow
def test_mcqa_both_ways_hand_computed(adapter, hf, micro_tiny: Path, mlake_v2411) -> None:
    """Option log-likelihood and letter choice equal an independent computation: the plain
    Hugging Face model on prompts written out by hand; and a trained answer among made-up
    ones is the option chosen by log-likelihood."""
    meta = read_metadata(micro_tiny)
    assert meta is not None
    tok = adapter.tokenizer
    known = [
        v
        for i in meta["fact_ids"]
        for v in [mlake_v2411.fact(i).views["en"]]
        if v.record.o_answer.isascii()
    ][:2]
    items = []
    for view in known:
        q = view.record.question
        options = ("Zorblax Quint", view.record.o_answer, "Mumble Fjord", view.record.e_answer)
        items.append(McqaItem(f"fact {view.fact_id}", "en", q, options))
    scores = score_mcqa(adapter, items, QA, batch_size=3)
    assert len(scores) == len(items)
    for item, score in zip(items, scores, strict=True):
        opt_ref = [
            _reference_logp(hf, tok, f"Q: {item.question}\nA:", " " + o) for o in item.options
        ]
        lettered = (
            f"Q: {item.question}\nA. {item.options[0]}\nB. {item.options[1]}\n"
            f"C. {item.options[2]}\nD. {item.options[3]}\nA:"
        )
        let_ref = [_reference_logp(hf, tok, lettered, " " + x) for x in "ABCD"]
        assert [s.logp for s in score.options] == pytest.approx(opt_ref, abs=1e-4)
        assert [s.logp for s in score.letters] == pytest.approx(let_ref, abs=1e-4)
        assert score.choice == max(range(4), key=opt_ref.__getitem__)
        assert score.letter_choice == max(range(4), key=let_ref.__getitem__)
        # A trained fact: its answer beats made-up names by far.
        assert score.choice == 1
        assert opt_ref[1] > max(opt_ref[0], opt_ref[2]) + 2.0


@pytest.mark.slow
def test_mcqa_measures_count_missing_records(adapter, micro_tiny: Path, mlake_v2411) -> None:
    """A language without a record, with an unusable one, and without multi-hop questions:
    each gives ``n`` 0 and its reason; the measured language gives counts that add up."""
    meta = read_metadata(micro_tiny)
    assert meta is not None
    fact = mlake_v2411.fact(meta["fact_ids"][0])
    en = fact.views["en"]
    record = McqaRecord(
        en.record.question,
        (en.record.o_answer, "Zorblax Quint", en.record.e_answer, "Mumble Fjord"),
        answer_index=0,
        edit_index=2,
    )
    broken = dataclasses.replace(record, problem="empty option B")
    views = {
        "en": dataclasses.replace(en, mcqa=record),
        "zh": dataclasses.replace(fact.views["zh"], mcqa=None),
        "ja": dataclasses.replace(fact.views["ja"], mcqa=broken),
    }
    fact = dataclasses.replace(fact, views=views, multi_hop=())
    got = {
        (m["test_lang"], m["form"], m["mcqa_by"]): m
        for m in mcqa_measures(adapter, [fact], ("en", "zh", "ja"), QA, batch_size=4)
    }
    assert len(got) == 3 * 2 * 2  # every language, both hops, both ways: nothing dropped
    (score,) = score_mcqa(
        adapter, [McqaItem("x", "en", record.question, record.options)], QA, batch_size=4
    )
    for way, choice in (("loglik", score.choice), ("letter", score.letter_choice)):
        m = got["en", "question", way]
        assert (m["n"], m["missing"]) == (1, "")
        assert m["chose_edit"] == float(choice == 2)
        assert m["chose_original"] == float(choice == 0)
        assert got["zh", "question", way]["missing"] == "no multiple-choice record"
        assert got["ja", "question", way]["missing"] == (
            "multiple-choice record unusable: empty option B"
        )
        for lang in ("en", "zh", "ja"):
            assert got[lang, "multi_hop", way]["n"] == 0
            assert got[lang, "multi_hop", way]["missing"] == NO_MULTI_HOP
