"""Edits on the other datasets as their papers measure them (issue 22 §3): knowledge on data
without original answers is "not measurable" but scored for the new answer; a question whose
subject was not placed is still asked; generalization reads the record's rephrase and
locality its own ``loc`` question, each hand-checked on a tiny random GPT-2 whose greedy
answers are read first; MLaKE keeps its measures."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest

from analysis.transfer import (
    NO_LOCALITY,
    NO_REPHRASE,
    TransferConfig,
    evaluate_edit,
    own_baseline,
    own_measures,
)
from mlake.cli import main
from mlake_core.data.dataset import Fact, FactView
from mlake_core.data.external import (
    EditRecord,
    ExternalDataset,
    ExternalView,
    build_view,
    has_original_answers,
    has_own_measures,
)
from mlake_core.data.sources import load_dataset
from mlake_core.editing import EditContext, get_method, make_request
from mlake_core.errors import DataError
from mlake_core.metrics.knowledge import KnowledgeConfig, askable, measure_knowledge
from mlake_core.models.prompting import get_template

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"
MZSRE = FIXTURES / "mzsre"
BMIKE = FIXTURES / "bmike53"
QA = get_template("qa")
QUESTION = KnowledgeConfig(forms=("question",), mcqa=False)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from mlake_core.models.tiny import TinySize, build_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    return build_tiny_model("gpt2", folder, size=TinySize(n_ctx=256))


@pytest.fixture(scope="module")
def adapter(tiny: Path):
    from mlake_core.models import load_adapter

    return load_adapter(str(tiny), device="cpu")


@pytest.fixture(scope="module")
def mzsre() -> ExternalDataset:
    ds = load_dataset("mzsre", MZSRE, "", "en,zh,de")
    assert isinstance(ds, ExternalDataset)
    return ds


def _greedy(adapter, view: FactView) -> str:
    """The tiny model's greedy answer to ``view``'s question (the qa template's cut)."""
    table = measure_knowledge(adapter, [view], QA, QUESTION, scored=False).table
    (text,) = table["greedy_text"]
    assert text.strip(), "the tiny model answered nothing; pick another prompt"
    return str(text).strip()


def _dataset_with(ds: ExternalDataset, views: dict[str, ExternalView]) -> ExternalDataset:
    """``ds`` holding one fact (id 0) with ``views``."""
    return dataclasses.replace(ds, facts=[Fact(0, views, ())], langs=tuple(views))


def _record(view: ExternalView, **changes) -> EditRecord:
    assert view.source is not None
    return dataclasses.replace(view.source, **changes)


# -- knowledge without original answers, and without placed subjects ------------------------


def test_knowledge_scores_the_new_answer_without_an_original(adapter, mzsre) -> None:
    assert not has_original_answers(mzsre) and has_own_measures(mzsre)
    views = [f.views[b] for f in mzsre.facts for b in mzsre.langs]
    result = measure_knowledge(adapter, views, QA, QUESTION)
    t = result.table
    # Every question is asked (none skipped for the empty original answer).
    assert len(t) == 9 and result.skipped == {}
    assert t["target_logp"].isna().all() and t["target_alias_logp"].isna().all()
    assert t["edit_logp"].notna().all() and (t["edit_logp"] < 0).all()
    # Nothing is "known": there is no original answer to give.
    assert not (t["greedy_match"] == "original").any()
    # Not measurable: no number where there is no original answer (issue 22 §3).
    assert t["prefers_original"].isna().all()
    summary = result.summary()
    for col in ("known", "greedy", "prefers_original", "target_logp", "target_logp_mean"):
        assert summary[col].isna().all(), col
    assert not summary["measurable"].any() and summary["facts"].tolist() == [3, 3, 3]


def test_a_question_without_a_placed_subject_is_asked_but_not_edited(adapter, mzsre) -> None:
    view = mzsre.view(0, "en")
    moved, method = build_view(0, "en", _record(view, subject="Mont Kilimandjaro"), "MzsRE")
    assert method == "none" and not moved.question.usable and moved.question.subject is None
    assert askable(moved, moved.question)  # knowledge needs no subject
    table = measure_knowledge(adapter, [moved], QA, QUESTION).table
    assert table["prompt"].str.contains("Mount Kilimanjaro").all() and len(table) == 1
    with pytest.raises(DataError, match=r"cannot be edited .*subject_not_in_prompt"):
        make_request(adapter, moved, QA, "question")
    # MLaKE's views keep "usable" = "subject located" for knowledge too (runs unchanged).
    plain = FactView(**{f.name: getattr(moved, f.name) for f in dataclasses.fields(FactView)})
    assert not askable(plain, plain.question)
    result = measure_knowledge(adapter, [plain], QA, QUESTION)
    assert len(result.table) == 0
    assert result.skipped == {
        "question:subject_not_in_prompt: 'Mont Kilimandjaro' does not occur in the question": 1
    }


# -- generalization and locality from the record's own prompts ------------------------------


def test_own_measures_hand_checked(adapter, mzsre) -> None:
    en, de = mzsre.view(0, "en"), mzsre.view(0, "de")
    # What the unedited tiny model answers to the locality question and the rephrase.
    loc_answer = _greedy(adapter, en.locality_view())
    rephrase_answer = _greedy(adapter, en.rephrased())
    # en: locality answer = what it says (kept), new answer = what the rephrase gives.
    en2, _ = build_view(
        0, "en", _record(en, locality_answer=loc_answer, new_answer=rephrase_answer), "MzsRE"
    )
    # de: a locality answer it does not give, and no rephrase.
    de2, _ = build_view(0, "de", _record(de, locality_answer="Zqxwv", rephrase=None), "MzsRE")
    ds = _dataset_with(mzsre, {"en": en2, "de": de2})
    got = {
        (m["test_lang"], m["kind"]): m
        for m in own_measures(adapter, ds.facts, ("en", "de"), QA, TransferConfig())
    }
    assert got["en", "locality"]["n"] == 1 and got["en", "locality"]["chose_edit"] == 1.0
    assert got["en", "locality"]["form"] == "locality"
    assert got["de", "locality"]["n"] == 1 and got["de", "locality"]["chose_edit"] == 0.0
    gen = got["en", "generalization"]
    assert gen["form"] == "rephrase" and gen["n"] == 1 and gen["chose_edit"] == 1.0
    assert math.isnan(gen["success_prob"])  # no original answer to compare with
    assert 0 < gen["p_new"] <= 1
    # No rephrase: counted missing, not crashed.
    miss = got["de", "generalization"]
    assert miss["n"] == 0 and miss["missing"] == NO_REPHRASE and miss["chose_edit"] == 0.0
    # The unedited model's table: the prior of every edit's rows.
    base = own_baseline(adapter, ds, [0], ("en", "de"), QA, TransferConfig())
    prior = {(r["test_lang"], r["kind"]): r for r in base.to_dict(orient="records")}
    assert prior["en", "locality"]["chose_edit"] == 1.0
    assert prior["en", "generalization"]["chose_edit"] == 1.0
    assert prior["de", "generalization"]["missing"] == NO_REPHRASE


def test_no_locality_question_is_counted_missing(adapter, mzsre) -> None:
    en = mzsre.view(1, "en")
    en2, _ = build_view(1, "en", _record(en, locality_prompt=None, locality_answer=None), "MzsRE")
    ds = dataclasses.replace(mzsre, facts=[Fact(1, {"en": en2}, ())], langs=("en",))
    (loc,) = [
        m
        for m in own_measures(adapter, ds.facts, ("en",), QA, TransferConfig())
        if m["kind"] == "locality"
    ]
    assert loc["n"] == 0 and loc["missing"] == NO_LOCALITY


def test_an_edit_is_measured_with_the_records_prompts(adapter, mzsre) -> None:
    langs = ("en", "zh", "de")
    entry = get_method("ft")
    import torch

    request = make_request(adapter, mzsre.view(2, "en"), QA, "question")
    result = entry.fn(
        adapter,
        [request],
        entry.config_cls(layer=0, steps=3),
        EditContext(torch.Generator().manual_seed(0), None),
    )
    before = {(2, b, "locality", "locality", ""): (1.0, math.nan) for b in langs}
    rows = evaluate_edit(
        adapter,
        result,
        mzsre,
        langs,
        QA,
        TransferConfig(),
        locality_ids=[0, 1],  # sampled facts: not read where the record has its own
        known_before={},
        before=before,
    )
    kinds = {(r["kind"], r["form"], r["test_lang"]) for r in rows}
    for b in langs:
        assert ("generalization", "rephrase", b) in kinds
        assert ("locality", "locality", b) in kinds
        assert ("portability", "multi_hop", b) in kinds
    assert ("efficacy", "question", "en") in kinds and ("transfer", "question", "zh") in kinds
    assert not any(r["kind"] == "locality" and r["form"] == "question" for r in rows)
    for r in rows:
        if r["kind"] in ("efficacy", "transfer", "generalization"):
            assert math.isnan(r["success_prob"])  # no original answer
            assert r["known_before"] is False
        if r["kind"] == "locality":
            assert r["chose_edit_before"] == 1.0 and r["n"] == 1
    # The locality verdict is the greedy answer's: recomputed by hand from its text.
    from mlake_core.metrics.knowledge import match_answer

    for r in rows:
        if r["kind"] == "locality":
            ans = mzsre.view(2, r["test_lang"]).locality[1]
            hit = match_answer(r["greedy_text"], (ans,), (), r["test_lang"]) == "original"
            assert r["chose_edit"] == float(hit)


# -- end to end, and MLaKE unchanged --------------------------------------------------------


@pytest.mark.slow
def test_edit_transfer_runs_on_mzsre(tiny: Path, tmp_path: Path, capsys) -> None:
    args = ["edit", "transfer", "--model", str(tiny), "--template", "qa", "--method", "ft"]
    args += ["--dataset", "mzsre", "--data-dir", str(MZSRE), "--langs", "en,zh"]
    args += ["--results-dir", str(tmp_path), "--device", "cpu", "--n-locality", "0"]
    args += ["--set", "ft.steps=2", "--json"]
    code = main(args)
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "MzsRE gives no original answer, so what the model knows is not measurable" in err
    run = Path(json.loads(out)["methods"]["ft"]["results"])
    key = json.loads((run / "key.json").read_text())
    assert key["own_measures"] == "rephrase,locality"
    assert (run / "tables" / "own_baseline.parquet").is_file()
    import pandas as pd

    rows = pd.concat(pd.read_parquet(p) for p in (run / "tables").glob("edits_*.parquet"))
    assert len(rows[rows["kind"] == "efficacy"]) == 6  # 3 facts x 2 edit languages
    gen = rows[rows["kind"] == "generalization"]
    assert set(gen["form"]) == {"rephrase"} and len(gen) == 12  # every test language
    assert rows["chose_edit_before"][rows["kind"] == "locality"].notna().all()


@pytest.mark.slow
def test_mlake_edits_keep_their_measures(adapter, mlake_v2411) -> None:
    """MLaKE: generalization is the cloze form, locality the sampled facts (no rephrase or
    record locality rows; rows checked identical to the code before this change on 3 facts
    with a tiny GPT-2 when it was made)."""
    assert has_original_answers(mlake_v2411) and not has_own_measures(mlake_v2411)
    import torch

    entry = get_method("ft")
    fact = mlake_v2411.facts[0]
    request = make_request(adapter, fact.views["en"], QA, "question")
    result = entry.fn(
        adapter,
        [request],
        entry.config_cls(layer=0, steps=2),
        EditContext(torch.Generator().manual_seed(0), None),
    )
    loc_ids = [f.fact_id for f in mlake_v2411.facts[1:4]]
    known = {(i, b): True for i in loc_ids for b in ("en", "zh")}
    rows = evaluate_edit(
        adapter,
        result,
        mlake_v2411,
        ("en", "zh"),
        QA,
        TransferConfig(n_locality=3),
        locality_ids=loc_ids,
        known_before=known,
    )
    forms = {(r["kind"], r["form"]) for r in rows}
    assert not {f for _, f in forms} & {"rephrase", "locality"}
    loc = [r for r in rows if r["kind"] == "locality"]
    assert [r["n"] for r in loc] == [3, 3] and {r["form"] for r in loc} == {"question"}


def test_pipeline_data_line_names_the_dataset(tmp_path: Path) -> None:
    from mlake.pipeline.config import config_from_dict
    from mlake.pipeline.steps import PipelineState, _stage_data
    from mlake.progress import Bars

    data = {"dataset": "mzsre", "data_dir": str(MZSRE), "langs": "en,zh"}
    lines: list[str] = []
    state = PipelineState(
        config_from_dict({"data": data}),
        tmp_path,
        tmp_path / "store",
        lines.append,
        Bars(False, lines.append),
        None,
    )
    _stage_data(state)
    assert lines == ["data: MzsRE (--dataset mzsre), 3 facts; question form usable: en 3, zh 3"]
