"""The relation stage end to end (mlake/stages/relate.py and ``mlake relate``) on synthetic run
folders written with the real results store.

The world: 30 facts in three languages (en, de, zh), a transfer run whose success is planted
to follow the fact's neuron overlap, its knowledge run, a neuron run (fact overlap table and
two 3x3 Jaccard matrices), a tracing run, a restricted (``ft[shared]``) transfer run with
lower transfer, and distractor runs that must not be picked.  Every number the stage reports
is recomputed here by hand from the planted records (plain loops, pandas, scipy), not from
the stage's own tables.  The model path in the transfer run's key does not exist, so the
token controls are left out and the result says so.
"""

from __future__ import annotations

import itertools
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

import mlake.stages.relate as stage
from analysis.relate import RelateConfig
from mlake.cli import main as cli_main
from mlake.stages.relate import (
    compare_edits,
    find_run,
    load_relate_result,
    load_transfer,
    per_edit,
    relate_stage,
)
from mlake_core.errors import DataError
from mlake_core.results.store import open_run

LANGS = ["en", "de", "zh"]
FACTS = list(range(30))
CONFIG = RelateConfig(n_boot=100, n_perm=20)
DATA_VERSION = "v2024-11"

#: Planted drops (fact, edit language, test language); disjoint on purpose.
NOOP = {(1, "en", "de"), (2, "de", "zh"), (7, "zh", "en"), (8, "en", "zh")}  # n == 0
UNKNOWN = {(3, "de", "en"), (9, "zh", "de"), (10, "en", "zh"), (11, "de", "zh"), (12, "zh", "en")}
NO_PRE = (5, "zh")  # no question-form knowledge row: rows (5, en, zh) and (5, de, zh)
NAN_OVERLAP = (4, frozenset({"en", "de"}))  # jaccard NaN (both sets empty)
NO_OVERLAP_ROW = (6, frozenset({"de", "zh"}))  # no row in the overlap table at all
FLOOR_FACT = (13, "zh")  # log p before = -1000, floored at -690 in the gain
ZERO_P = (14, "en", "de")  # p_new underflowed to 0
RESTRICTED_FACTS = FACTS[2:]  # the restricted run edited 28 of the 30 facts

EXPECTED_DROPPED = {
    "new answer equals the old one in B": 4,
    "not known in B before the edit": 5,
    "no pre-edit measurement": 2,
    "no overlap (fact not attributed, or both sets empty)": 4,
}

#: Pair-level Jaccard matrices of the neuron run (symmetric; by unordered pair).
JACCARD = {
    "neuron_jaccard_ig_neuron": {("en", "de"): 0.30, ("en", "zh"): 0.05, ("de", "zh"): 0.12},
    "neuron_jaccard_atp_neuron": {("en", "de"): 0.10, ("en", "zh"): 0.20, ("de", "zh"): 0.15},
}
TRACING = {
    "tracing_similarity_resid": {("en", "de"): 0.99, ("en", "zh"): 0.60, ("de", "zh"): 0.55},
    "tracing_similarity_mlp": {("en", "de"): 0.20, ("en", "zh"): 0.90, ("de", "zh"): 0.40},
}
#: Centre of the per-fact overlap by unordered pair (the fact's overlap varies around it).
OVERLAP_CENTRE = {("en", "de"): 0.55, ("en", "zh"): 0.25, ("de", "zh"): 0.40}


def _sym(values: dict[tuple[str, str], float], a: str, b: str) -> float:
    if a == b:
        return 1.0
    return values[(a, b)] if (a, b) in values else values[(b, a)]


def _matrix(values: dict[tuple[str, str], float], order: list[str]) -> list[list[float]]:
    return [[_sym(values, a, b) for b in order] for a in order]


# -- the dataset stub ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Subject:
    text: str


@dataclass(frozen=True)
class _Record:
    e_answer: str


@dataclass(frozen=True)
class _View:
    subject: _Subject
    record: _Record


@dataclass
class _Fact:
    views: dict[str, _View]


@dataclass
class _Dataset:
    facts: dict[int, _Fact]

    def fact(self, fact_id: int) -> _Fact:
        return self.facts[int(fact_id)]


def _subject(f: int, lang: str) -> str:
    # en and de write the subject the same way for even facts; zh never does.
    return {"en": f"Person {f}", "de": f"Person {f}" if f % 2 == 0 else f"Persona {f}"}.get(
        lang, f"人物{f}"
    )


def _answer(f: int, lang: str) -> str:
    return {"en": f"City {f}", "de": f"city {f}" if f % 3 == 0 else f"Stadt {f}"}.get(
        lang, f"城市{f}"
    )


def _dataset() -> _Dataset:
    return _Dataset(
        {
            f: _Fact(
                {
                    lang: _View(_Subject(_subject(f, lang)), _Record(_answer(f, lang)))
                    for lang in LANGS
                }
            )
            for f in FACTS
        }
    )


# -- building the runs ------------------------------------------------------------------------


def _model(root: Path, weights: str = "w1", backend: str = "tlens") -> dict[str, str]:
    return {"weights": weights, "backend": backend, "path": str(root / "no_such_model")}


def _make_run(
    root: Path,
    kind: str,
    *,
    model: dict[str, str],
    fact_ids: list[int],
    status: str = "complete",
    extra_key: dict[str, Any] | None = None,
    **meta: Any,
):
    key = {
        "model": model,
        "data_version": DATA_VERSION,
        "n_facts": len(fact_ids),
        "langs": LANGS,
        **(extra_key or {}),
    }
    run = open_run(kind, key, root)
    run.write_meta(status=status, fact_ids=fact_ids, langs=LANGS, **meta)
    return run


def _transfer_records(
    rng: np.random.Generator, overlap: dict[tuple[int, frozenset], float], *, restricted: bool
) -> pd.DataFrame:
    """Rows of a transfer run: efficacy, question and cloze transfer, locality."""
    recs = []
    facts = RESTRICTED_FACTS if restricted else FACTS
    for f in facts:
        for a in LANGS:
            base = {
                "method": "ft",
                "fact_id": f,
                "edit_lang": a,
                "edit_form": "question",
                "edit_loss": float(rng.uniform(0.01, 0.1)),
                "greedy_text": "",
            }
            eff = float(rng.random() < 0.9)
            recs.append(
                {
                    **base,
                    "test_lang": a,
                    "form": "question",
                    "kind": "efficacy",
                    "n": 1,
                    "success_prob": eff,
                    "p_new": 0.9 if eff else 0.05,
                    "success_greedy": eff,
                    "known_before": True,
                }
            )
            for b in LANGS:
                if b == a:
                    continue
                ov = overlap.get((f, frozenset({a, b})), 0.4)
                ov = 0.4 if ov is None or math.isnan(ov) else ov
                success = float(rng.random() < 1 / (1 + math.exp(-14 * (ov - 0.4))))
                if restricted and success and rng.random() < 0.6:
                    success = 0.0  # restricted editing transfers less
                p_new = float(rng.uniform(0.3, 0.9) if success else rng.uniform(1e-6, 1e-2))
                if (f, a, b) == ZERO_P:
                    success, p_new = 0.0, 0.0
                recs.append(
                    {
                        **base,
                        "test_lang": b,
                        "form": "question",
                        "kind": "transfer",
                        "n": 0 if (f, a, b) in NOOP else 1,
                        "success_prob": float(p_new > 0.2),
                        "p_new": p_new,
                        "success_greedy": success,
                        "known_before": (f, a, b) not in UNKNOWN,
                    }
                )
                # The cloze form must never be used (form="question"): opposite outcome.
                recs.append(
                    {
                        **base,
                        "test_lang": b,
                        "form": "cloze",
                        "kind": "transfer",
                        "n": 1,
                        "success_prob": 1.0 - success,
                        "p_new": 0.5,
                        "success_greedy": 1.0 - success,
                        "known_before": True,
                    }
                )
            for b in LANGS:
                loc = 1.0 if restricted else float(rng.choice([0.8, 0.9, 1.0]))
                recs.append(
                    {
                        **base,
                        "test_lang": b,
                        "form": "question",
                        "kind": "locality",
                        "n": 10,
                        "success_prob": math.nan,
                        "p_new": math.nan,
                        "success_greedy": loc,
                        "known_before": True,
                    }
                )
    return pd.DataFrame.from_records(recs)


def _save_transfer(root: Path, rows: pd.DataFrame, *, restricted: bool, model: dict) -> Path:
    units = "shared" if restricted else "all"
    method_config = {"layer": "0", "steps": "100", "lr": "0.01"}
    run = _make_run(
        root,
        "transfer",
        model=model,
        fact_ids=RESTRICTED_FACTS if restricted else FACTS,
        extra_key={
            "method": "ft",
            "method_config": {**method_config, **({"units": units} if restricted else {})},
            "seed": 0,
        },
        method="ft",
        method_config={**method_config, "units": units},
        unit_set_sizes={"en": 5, "de": 3, "zh": 0, "shared": 37} if restricted else {},
    )
    for lang in LANGS:
        run.save_table(f"edits_{lang}", rows[rows["edit_lang"] == lang].reset_index(drop=True))
    return run.path


def _knowledge_records(rng: np.random.Generator, facts: list[int], value=None) -> pd.DataFrame:
    recs = []
    for f in facts:
        for lang in LANGS:
            if value is None and (f, lang) == NO_PRE:
                continue
            logp = value if value is not None else float(rng.normal(-8, 2))
            if value is None and (f, lang) == FLOOR_FACT:
                logp = -1000.0
            for form, v in (("question", logp), ("cloze", -99.0)):
                recs.append(
                    {
                        "fact_id": f,
                        "lang": lang,
                        "form": form,
                        "target": "old",
                        "edit_target": "new",
                        "edit_alias_logp": v,
                        "target_alias_logp": -0.5,
                    }
                )
    return pd.DataFrame.from_records(recs)


def _save_knowledge(root: Path, table: pd.DataFrame, **kw: Any) -> Path:
    run = _make_run(root, "knowledge", extra_key={"config": {"forms": ["question", "cloze"]}}, **kw)
    for lang in LANGS:
        run.save_table(f"knowledge_{lang}", table[table["lang"] == lang].reset_index(drop=True))
    run.save_table("summary", pd.DataFrame({"lang": LANGS, "known": [0.5, 0.5, 0.5]}))
    return run.path


def _overlap_records(rng: np.random.Generator) -> tuple[pd.DataFrame, dict]:
    recs, values = [], {}
    # Unordered pairs, written in the neuron run's own order (zh first for one of them).
    for f in FACTS:
        for a, b in (("en", "de"), ("en", "zh"), ("zh", "de")):
            pair = frozenset({a, b})
            if (f, pair) == NO_OVERLAP_ROW:
                continue
            centre = OVERLAP_CENTRE.get((a, b)) or OVERLAP_CENTRE[(b, a)]
            jac = float(np.clip(centre + rng.uniform(-0.3, 0.3), 0.0, 1.0))
            if (f, pair) == NAN_OVERLAP:
                jac = math.nan
            values[(f, pair)] = jac
            recs.append(
                {
                    "fact_id": f,
                    "lang_a": a,
                    "lang_b": b,
                    "size_a": 5,
                    "size_b": 4,
                    "intersection": 2,
                    "jaccard": jac,
                    "overlap": min(1.0, 1.5 * jac) if not math.isnan(jac) else math.nan,
                    "jaccard_L0": jac,
                    "overlap_L0": jac,
                }
            )
    return pd.DataFrame.from_records(recs), values


def _save_neurons(root: Path, overlap: pd.DataFrame, jaccard: dict, **kw: Any) -> Path:
    run = _make_run(root, "neurons", extra_key={"config": {"attribution": {"steps": 20}}}, **kw)
    order = ["zh", "en", "de"]  # not the transfer run's order: matrices are aligned by label
    methods = []
    for name, values in jaccard.items():
        method, unit = name.removeprefix("neuron_jaccard_").split("_")
        methods.append(
            {
                "method": method,
                "unit": unit,
                "n_facts": {lang: len(FACTS) for lang in order},
                "set_size": {lang: 5.0 for lang in order},
                "jaccard": _matrix(values, order),
                "overlap": _matrix(values, order),
                "n_pairs": [[0 if a == b else 30 for b in order] for a in order],
            }
        )
    # A method whose matrices were not computed: no predictor.
    methods.append({"method": "atp", "unit": "head", "n_facts": {}, "jaccard": None})
    run.save_json(
        "summary",
        {
            "langs": order,
            "n_layers": 4,
            "methods": methods,
            "skipped": {},
            "run_path": str(run.path),
        },
    )
    run.save_table("overlap_ig_neuron", overlap)
    run.save_table("overlap_atp_neuron", overlap.assign(jaccard=0.5))
    return run.path


def _save_tracing(root: Path, **kw: Any) -> Path:
    run = _make_run(root, "tracing", extra_key={"config": {"kinds": ["resid", "mlp"]}}, **kw)
    order = ["de", "zh", "en"]
    run.save_json(
        "summary",
        {
            "langs": order,
            "kinds": ["resid", "mlp"],
            "similarity": {
                name.removeprefix("tracing_similarity_"): _matrix(values, order)
                for name, values in TRACING.items()
            },
        },
    )
    return run.path


@dataclass
class World:
    root: Path
    model: dict[str, str]
    transfer: Path
    restricted: Path
    knowledge: Path
    neurons: Path
    tracing: Path | None
    transfer_rows: pd.DataFrame
    restricted_rows: pd.DataFrame
    knowledge_rows: pd.DataFrame
    overlap: dict[tuple[int, frozenset], float]
    distractors: dict[str, Path] = field(default_factory=dict)


def _build_world(root: Path, *, neurons: bool = True, tracing: bool = True) -> World:
    rng = np.random.default_rng(0)
    model = _model(root)
    overlap_table, overlap = _overlap_records(rng)
    transfer_rows = _transfer_records(rng, overlap, restricted=False)
    restricted_rows = _transfer_records(rng, overlap, restricted=True)
    knowledge_rows = _knowledge_records(rng, FACTS)
    transfer = _save_transfer(root, transfer_rows, restricted=False, model=model)
    restricted = _save_transfer(root, restricted_rows, restricted=True, model=model)
    knowledge = _save_knowledge(root, knowledge_rows, model=model, fact_ids=FACTS)
    distractors = {
        # Another model's knowledge, covering more facts: wrong weights, must be ignored.
        "knowledge_w2": _save_knowledge(
            root,
            _knowledge_records(rng, [*FACTS, 30, 31], value=-1.0),
            model=_model(root, "w2"),
            fact_ids=[*FACTS, 30, 31],
        ),
        # Same model, more facts, but fact 0 missing: does not cover the transfer run.
        "knowledge_partial": _save_knowledge(
            root,
            _knowledge_records(rng, FACTS[1:] + list(range(30, 60)), value=-2.0),
            model=model,
            fact_ids=FACTS[1:] + list(range(30, 60)),
        ),
    }
    neurons_path = None
    if neurons:
        neurons_path = _save_neurons(root, overlap_table, JACCARD, model=model, fact_ids=FACTS)
        # Same model, more facts, still running: must be ignored.
        distractors["neurons_running"] = _save_neurons(
            root,
            overlap_table.assign(jaccard=0.9),
            {k: {p: 0.5 for p in v} for k, v in JACCARD.items()},
            model=model,
            fact_ids=[*FACTS, 30],
            status="running",
        )
    tracing_path = _save_tracing(root, model=model, fact_ids=FACTS) if tracing else None
    return World(
        root=root,
        model=model,
        transfer=transfer,
        restricted=restricted,
        knowledge=knowledge,
        neurons=neurons_path,  # type: ignore[arg-type]
        tracing=tracing_path,
        transfer_rows=transfer_rows,
        restricted_rows=restricted_rows,
        knowledge_rows=knowledge_rows,
        overlap=overlap,
        distractors=distractors,
    )


# -- hand computations ------------------------------------------------------------------------


def _hand_fact_rows(world: World) -> pd.DataFrame:
    """The fact-level rows by plain loops over the planted records."""
    pre = {
        (int(r.fact_id), r.lang): float(r.edit_alias_logp)
        for r in world.knowledge_rows.itertuples()
        if r.form == "question"
    }
    out = []
    for r in world.transfer_rows.itertuples():
        if r.kind != "transfer" or r.form != "question" or r.n == 0 or not r.known_before:
            continue
        f, a, b = int(r.fact_id), r.edit_lang, r.test_lang
        if (f, b) not in pre:
            continue
        ov = world.overlap.get((f, frozenset({a, b})))
        if ov is None or math.isnan(ov):
            continue
        gain = math.log(max(r.p_new, 1e-300)) - max(pre[(f, b)], -690.0)
        out.append(
            {
                "fact_id": f,
                "edit_lang": a,
                "test_lang": b,
                "success": r.success_greedy,
                "gain": gain,
                "overlap": ov,
            }
        )
    return pd.DataFrame.from_records(out)


def _hand_transfer_matrix(rows: pd.DataFrame) -> pd.DataFrame:
    sel = rows[
        (rows["kind"] == "transfer")
        & (rows["form"] == "question")
        & rows["known_before"]
        & (rows["n"] > 0)
    ]
    return sel.groupby(["edit_lang", "test_lang"])["success_greedy"].mean().unstack()


def _cells(matrix: Any, order: list[str]) -> np.ndarray:
    get = (lambda a, b: matrix(a, b)) if callable(matrix) else (lambda a, b: matrix.loc[a, b])
    return np.array([get(a, b) for a in order for b in order if a != b], dtype=float)


def _hand_mantel(predictor: dict, outcome: pd.DataFrame) -> tuple[float, float]:
    """Spearman rho of the off-diagonal cells and the exact one-sided p over the 3! label
    permutations of the predictor."""
    y = _cells(outcome, LANGS)
    rho = spearmanr(_cells(lambda a, b: _sym(predictor, a, b), LANGS), y).statistic
    rhos = []
    for perm in itertools.permutations(LANGS):
        relabel = dict(zip(LANGS, perm, strict=True))
        x = _cells(lambda a, b, r=relabel: _sym(predictor, r[a], r[b]), LANGS)
        rhos.append(spearmanr(x, y).statistic)
    return float(rho), float(np.mean(np.asarray(rhos) >= rho - 1e-12))


def _hand_transfer_per_fact(rows: pd.DataFrame) -> dict[int, float]:
    """Per fact: mean over edit languages of the transfer rate over known test languages."""
    out = {}
    for f, per_fact in rows.groupby("fact_id"):
        rates = []
        for _, per_edit_lang in per_fact.groupby("edit_lang"):
            sel = per_edit_lang[
                (per_edit_lang["kind"] == "transfer")
                & (per_edit_lang["form"] == "question")
                & per_edit_lang["known_before"]
                & (per_edit_lang["n"] > 0)
            ]
            if len(sel):
                rates.append(sel["success_greedy"].mean())
        out[int(f)] = float(np.mean(rates))
    return out


def _same(a: Any, b: Any) -> bool:
    """Deep equality with NaN equal to NaN."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return _build_world(tmp_path_factory.mktemp("relate_world") / "runs")


@pytest.fixture(scope="module")
def related(world):
    logged: list[str] = []
    result, run = relate_stage(
        world.transfer, _dataset(), CONFIG, restricted=[world.restricted], log=logged.append
    )
    return result, run, logged


# -- the stage on the planted world ---------------------------------------------------------------


def test_inputs_are_the_matching_runs(world, related) -> None:
    result, run, logged = related
    assert result.inputs == {
        "transfer": str(world.transfer),
        "knowledge": str(world.knowledge),  # not the w2 one, not the one missing fact 0
        "neurons": str(world.neurons),  # not the running one
        "tracing": str(world.tracing),
        "probes": None,
        "restricted": [str(world.restricted)],
        "lens_edits": None,  # none in the world: looked up, not found, left out
        "patching": None,
    }
    assert run.path.parent == world.root / "relate" and run.complete
    assert f"relate: knowledge run {world.knowledge}" in logged
    assert f"relate: neurons run {world.neurons}" in logged
    assert result.method == "ft" and result.unit == "ig_neuron" and result.langs == LANGS
    assert result.config == CONFIG.to_dict()
    # The model path does not exist: no tokenizer, so no token controls.
    # No lens-edit or patching run of this model: looked up, left out, said.
    assert len(result.notes) == 3
    assert result.notes[0].startswith("no lens_edits run found for this model")
    assert result.notes[1].startswith("no patching run found for this model")
    assert "not loadable" in result.notes[2] and "token controls left out" in result.notes[2]
    assert result.predictor_fits == {} and result.missing == {}


def test_dropped_rows_are_counted_by_reason(related) -> None:
    result, _, _ = related
    assert result.dropped == EXPECTED_DROPPED
    assert result.n_rows == 6 * len(FACTS) - sum(EXPECTED_DROPPED.values()) == 165
    assert result.n_facts == len(FACTS)


def test_by_pair_matches_the_hand_computed_rows(world, related) -> None:
    result, run, _ = related
    hand = _hand_fact_rows(world)
    assert len(hand) == result.n_rows
    expected = (
        hand.groupby(["edit_lang", "test_lang"])
        .agg(
            rows=("success", "size"),
            overlap=("overlap", "mean"),
            transfer=("success", "mean"),
            gain=("gain", "mean"),
        )
        .reset_index()
    )
    got = result.by_pair.sort_values(["edit_lang", "test_lang"]).reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expected, check_dtype=False, atol=1e-12, rtol=0)
    # Spot checks of the planted special cases in the saved fact table.
    facts = run.load_table("facts").set_index(["fact_id", "edit_lang", "test_lang"])
    f, lang = FLOOR_FACT
    row = facts.loc[(f, "en", lang)]
    p_new = world.transfer_rows.query(
        "fact_id == @f and edit_lang == 'en' and test_lang == @lang and form == 'question' "
        "and kind == 'transfer'"
    )["p_new"].item()
    assert row["gain"] == pytest.approx(math.log(p_new) + 690.0)
    f, _, lang = ZERO_P
    pre = world.knowledge_rows.query("fact_id == @f and lang == @lang and form == 'question'")
    assert facts.loc[ZERO_P, "gain"] == pytest.approx(
        math.log(1e-300) - pre["edit_alias_logp"].item()
    )
    # Controls: en and de write the subject the same way for even facts only.
    assert facts.loc[(0, "en", "de"), "same_subject"] == 1.0
    assert facts.loc[(15, "en", "de"), "same_subject"] == 0.0
    assert facts.loc[(0, "en", "de"), "same_answer"] == 1.0  # "City 0" vs "city 0"
    assert facts.loc[(1, "de", "en"), "same_answer"] == 0.0
    assert facts["subject_token_jaccard"].isna().all()  # no tokenizer


def test_planted_overlap_effect_is_found(world, related) -> None:
    result, _, _ = related
    hand = _hand_fact_rows(world)
    fit = result.fits["logistic"]
    assert fit.note == ""
    assert (fit.n_rows, fit.n_facts, fit.n_events) == (165, 30, int(hand["success"].sum()))
    ov = fit.term("overlap")
    assert ov["estimate"] > 1.0 and ov["ci_low"] > 0
    assert ov["ci_low"] <= ov["estimate"] <= ov["ci_high"]
    assert ov["p"] == pytest.approx(1 / (CONFIG.n_perm + 1))  # no permutation reaches it
    pairs = sorted(f"{a}->{b}" for a in LANGS for b in LANGS if a != b)
    # Constant (known_before) and all-NaN (token Jaccard) controls are left out of the design.
    assert fit.terms["term"].tolist() == [
        "intercept",
        "overlap",
        "same_subject",
        "same_answer",
        *[f"pair[{p}]" for p in pairs[1:]],
    ]
    assert fit.auc > fit.auc_controls
    lin = result.fits["linear"]
    # The gain model is fitted on the same rows (its planted floor case, log p before = -1000,
    # is an outlier of +690 nats, so no claim on its coefficient here).
    assert lin.note == "" and (lin.n_rows, lin.n_facts, lin.n_events) == (165, 30, 0)
    assert lin.terms["term"].tolist() == fit.terms["term"].tolist()
    assert math.isnan(lin.auc)


def test_pair_level_matches_scipy(world, related) -> None:
    result, _, _ = related
    transfer = _hand_transfer_matrix(world.transfer_rows)
    gain = _hand_fact_rows(world).groupby(["edit_lang", "test_lang"])["gain"].mean().unstack()
    for a in LANGS:
        for b in LANGS:
            got_t, got_g = result.outcomes["transfer"].loc[a, b], result.outcomes["gain"].loc[a, b]
            if a == b:
                assert math.isnan(got_t) and math.isnan(got_g)
            else:
                assert got_t == pytest.approx(transfer.loc[a, b], abs=1e-12)
                assert got_g == pytest.approx(gain.loc[a, b], abs=1e-12)
    # Predictor matrices read back by label (the neuron and tracing runs use other orders).
    assert set(result.predictors) == {*JACCARD, *TRACING}
    for name, values in {**JACCARD, **TRACING}.items():
        m = result.predictors[name]
        for a in LANGS:
            for b in LANGS:
                assert m.loc[a, b] == pytest.approx(_sym(values, a, b))
    pl = result.pair_level.set_index(["predictor", "outcome"])
    assert len(pl) == 4 * 2
    for name, values in {**JACCARD, **TRACING}.items():
        for outcome, matrix in (("transfer", transfer), ("gain", gain)):
            rec = pl.loc[(name, outcome)]
            rho, p = _hand_mantel(values, matrix)
            assert rec["rho"] == pytest.approx(rho, abs=1e-12), (name, outcome)
            assert rec["p"] == pytest.approx(p, abs=1e-12), (name, outcome)
            assert (rec["n_cells"], rec["n_perm"], bool(rec["exact"])) == (6, 6, True)
            assert rec["p"] >= 1 / 6


def test_restricted_run_is_compared_on_shared_facts(world, related) -> None:
    result, _, _ = related
    assert len(result.interventions) == 1
    item = result.interventions[0]
    assert item["label"] == "ft[shared]" and item["against"] == "ft"
    assert item["run"] == str(world.restricted)
    assert item["units"] == {"en": 5, "de": 3, "zh": 0, "shared": 37}
    base = _hand_transfer_per_fact(world.transfer_rows)
    other = _hand_transfer_per_fact(world.restricted_rows)
    shared = sorted(set(base) & set(other))
    a = float(np.mean([base[f] for f in shared]))
    b = float(np.mean([other[f] for f in shared]))
    d = item["differences"]["transfer"]
    assert d["n_facts"] == len(RESTRICTED_FACTS) == 28
    assert d["a"] == pytest.approx(a, abs=1e-12) and d["b"] == pytest.approx(b, abs=1e-12)
    assert d["diff"] == pytest.approx(b - a, abs=1e-12)
    assert b - a < -0.1  # planted: restricted editing transfers less
    assert d["ci_low"] <= d["diff"] <= d["ci_high"] and d["ci_high"] < 0
    # Locality: the restricted run is planted at 1.0 everywhere.
    loc = item["differences"]["locality"]
    base_loc = (
        world.transfer_rows[world.transfer_rows["kind"] == "locality"]
        .query("fact_id in @shared")
        .groupby("fact_id")["success_greedy"]
        .mean()
        .mean()
    )
    assert loc["b"] == pytest.approx(1.0) and loc["a"] == pytest.approx(base_loc)
    assert set(item["differences"]) == {"efficacy", "transfer", "transfer_prob", "gain", "locality"}


def test_per_edit_and_compare_edits_by_hand(world) -> None:
    main, other = load_transfer(world.transfer), load_transfer(world.restricted)
    before = world.knowledge_rows
    base = per_edit(main.rows, before)
    assert list(base.columns) == ["efficacy", "transfer", "transfer_prob", "gain", "locality"]
    assert len(base) == len(FACTS) * len(LANGS)
    rows = world.transfer_rows
    for f, a in [(0, "en"), (8, "en"), (12, "zh"), (29, "de")]:
        got = base.loc[(f, a)]
        mine = rows[(rows["fact_id"] == f) & (rows["edit_lang"] == a)]
        eff = mine[(mine["kind"] == "efficacy")]["success_greedy"].mean()
        tr = mine[
            (mine["kind"] == "transfer")
            & (mine["form"] == "question")
            & mine["known_before"]
            & (mine["n"] > 0)
        ]
        loc = mine[mine["kind"] == "locality"]["success_greedy"].mean()
        assert got["efficacy"] == pytest.approx(eff)
        assert got["transfer"] == pytest.approx(tr["success_greedy"].mean())
        assert got["transfer_prob"] == pytest.approx(tr["success_prob"].mean())
        assert got["locality"] == pytest.approx(loc)
    # (8, en): en->zh is a no-op, so its transfer is the en->de row alone.
    assert (
        base.loc[(8, "en"), "transfer"]
        == rows.query(
            "fact_id == 8 and edit_lang == 'en' and test_lang == 'de' and form == 'question' "
            "and kind == 'transfer'"
        )["success_greedy"].item()
    )
    diffs = compare_edits(base, per_edit(other.rows, before), n_boot=50, level=0.9, seed=3)
    assert diffs["transfer"].n_facts == 28
    per_fact_a = base["efficacy"].groupby(level="fact_id").mean()
    eff = diffs["efficacy"]
    assert eff.a == pytest.approx(per_fact_a.loc[RESTRICTED_FACTS].mean())


# -- caching and reading back -------------------------------------------------------------------


def test_second_call_is_read_from_the_saved_summary(world, related, monkeypatch) -> None:
    result, run, _ = related

    def boom(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("fact_level must not run again")

    monkeypatch.setattr(stage, "fact_level", boom)
    logged: list[str] = []
    again, run2 = relate_stage(
        world.transfer, _dataset(), CONFIG, restricted=[world.restricted], log=logged.append
    )
    assert run2.path == run.path
    assert f"relate: loaded from {run.path}" in logged
    assert _same(again.to_dict(), result.to_dict())
    loaded = load_relate_result(run.path)
    assert _same(loaded.to_dict(), result.to_dict())
    assert loaded.fits["logistic"].term("overlap") == pytest.approx(
        result.fits["logistic"].term("overlap"), nan_ok=True
    )
    pd.testing.assert_frame_equal(
        loaded.outcomes["transfer"], result.outcomes["transfer"], check_names=False
    )
    # Another config is another run: it is computed (and here refused by the patched fit).
    with pytest.raises(AssertionError, match="must not run again"):
        relate_stage(
            world.transfer,
            _dataset(),
            RelateConfig(n_boot=100, n_perm=20, seed=7),
            restricted=[world.restricted],
        )


# -- finding runs -------------------------------------------------------------------------------


def _touch(path: Path, mtime: float) -> None:
    os.utime(path / "meta.json", (mtime, mtime))


def test_find_run_picks_the_covering_run_with_most_facts(tmp_path) -> None:
    root = tmp_path / "runs"
    model = _model(root)
    covers = [0, 1, 2]
    assert find_run(root, "knowledge", model, covers=covers) is None  # no folder yet

    def make(name: str, facts: list[int], **kw: Any) -> Path:
        kw.setdefault("model", model)
        return _make_run(root, "knowledge", fact_ids=facts, extra_key={"name": name}, **kw).path

    other_weights = make("w2", list(range(100)), model=_model(root, "w2"))
    other_backend = make("nnsight", list(range(100)), model=_model(root, backend="nnsight"))
    running = make("running", list(range(100)), status="running")
    not_covering = make("partial", list(range(1, 100)))
    small = make("small", [0, 1, 2])
    big = make("big", list(range(10)))
    t = 1_700_000_000
    for i, p in enumerate([other_weights, other_backend, running, not_covering, small]):
        _touch(p, t + 100 + i)  # all newer than `big`
    _touch(big, t)
    assert find_run(root, "knowledge", model, covers=covers) == big
    # Equal fact counts: the newest wins.
    newer = make("newer", list(range(10)))
    _touch(newer, t + 1)
    assert find_run(root, "knowledge", model, covers=covers) == newer
    _touch(newer, t - 1)
    assert find_run(root, "knowledge", model, covers=covers) == big
    # Facts no run covers: none.
    assert find_run(root, "knowledge", model, covers=[0, 200]) is None
    # Nothing for other weights but their own run; stray files and broken folders are skipped.
    (root / "knowledge" / "stray.txt").write_text("x")
    (root / "knowledge" / "broken").mkdir()
    (root / "knowledge" / "broken" / "key.json").write_text("{not json")
    assert find_run(root, "knowledge", _model(root, "w2"), covers=covers) == other_weights
    assert find_run(root, "knowledge", _model(root, "w3"), covers=covers) is None


def test_load_transfer_reads_every_edit_table(world, tmp_path) -> None:
    tr = load_transfer(world.transfer)
    assert len(tr.rows) == len(world.transfer_rows)
    assert sorted(tr.rows["edit_lang"].unique()) == sorted(LANGS)
    assert tr.key["model"] == world.model and tr.method == "ft" and tr.label == "ft"
    assert load_transfer(world.restricted).label == "ft[shared]"
    with pytest.raises(DataError, match="expected a transfer run"):
        load_transfer(world.knowledge)
    with pytest.raises(DataError, match=r"no meta\.json"):
        load_transfer(tmp_path / "nothing")
    empty = _make_run(tmp_path, "transfer", model=world.model, fact_ids=FACTS, status="running")
    with pytest.raises(DataError, match="no edits_<lang> table yet"):
        load_transfer(empty.path)


def test_missing_neurons_run_says_which_command(tmp_path) -> None:
    w = _build_world(tmp_path / "runs", neurons=False, tracing=False)
    with pytest.raises(DataError, match="run `mlake neurons`") as err:
        relate_stage(w.transfer, _dataset(), CONFIG)
    assert str(w.root) in str(err.value)


def test_wrong_kind_or_unit_is_refused(world) -> None:
    with pytest.raises(DataError, match=r"--neurons .*a knowledge run, expected a neurons run"):
        relate_stage(world.transfer, _dataset(), CONFIG, neurons_dir=world.knowledge)
    with pytest.raises(DataError, match=r"--unit lape_neuron: .*it has: atp_neuron, ig_neuron"):
        relate_stage(world.transfer, _dataset(), CONFIG, unit="lape_neuron")
    with pytest.raises(DataError, match="expected a transfer run"):
        relate_stage(world.transfer, _dataset(), CONFIG, restricted=[world.neurons])


# -- the command ----------------------------------------------------------------------------------


def test_cli_prints_the_tables_and_json(world, monkeypatch, capsys) -> None:
    calls = []
    dataset = _dataset()

    def fake_load(data_dir=None, version="", langs=None):
        calls.append((data_dir, version, langs))
        return dataset

    monkeypatch.setattr("mlake_core.data.dataset.load_mlake", fake_load)
    args = [
        "relate",
        str(world.transfer),
        "--n-boot",
        "100",
        "--n-perm",
        "20",
        "--seed",
        "1",  # not the fixture's run: computed here
        "--restricted",
        str(world.restricted),
    ]
    assert cli_main(args) == 0
    out, err = capsys.readouterr()
    assert calls == [(None, DATA_VERSION, LANGS)]
    assert f"mlake: relate: neurons run {world.neurons}" in err
    lines = out.splitlines()
    header = lines[0]
    assert header.startswith(
        "mlake relate: ft edits, overlap ig_neuron; 165 fact-level rows from 30 facts; "
    )
    run_path = header.rsplit("; ", 1)[1]
    assert Path(run_path).parent == world.root / "relate"
    assert lines[1].startswith("note: no lens_edits run found for this model")
    assert lines[2].startswith("note: no patching run found for this model")
    assert lines[3].startswith("note: tokenizer of ") and lines[3].endswith(
        "token controls left out"
    )
    assert lines[4] == "rows left out: " + ", ".join(
        f"{k}: {v}" for k, v in EXPECTED_DROPPED.items()
    )

    # Pair level: rho and p as computed by hand, printed with the report's widths.
    transfer = _hand_transfer_matrix(world.transfer_rows)
    rho, p = _hand_mantel(JACCARD["neuron_jaccard_ig_neuron"], transfer)
    assert f"  {'neuron_jaccard_ig_neuron':<34}{'transfer':<10}{rho:>7.2f}{p:>8.3f}{6:>7}" in lines
    # The transfer matrix in percent, rows by edit language.
    for a in LANGS:
        cells = "".join(
            f"{'-':>7}" if a == b else f"{100 * transfer.loc[a, b]:>7.1f}" for b in LANGS
        )
        assert f"  {a:<4}{cells}" in lines
    # The intervention's transfer line: point values by hand.
    base = _hand_transfer_per_fact(world.transfer_rows)
    other = _hand_transfer_per_fact(world.restricted_rows)
    shared = sorted(set(base) & set(other))
    a_, b_ = np.mean([base[f] for f in shared]), np.mean([other[f] for f in shared])
    assert (
        "intervention: ft[shared] against ft (units: {'en': 5, 'de': 3, 'zh': 0, 'shared': 37})"
        in lines
    )
    assert any(
        line.startswith(f"  {'transfer':<14}{a_:.3f} -> {b_:.3f}: {b_ - a_:.3f} [")
        and line.endswith(", 28 facts")
        for line in lines
    )

    # --json: the same run, read back (logged as such), with the same numbers.
    assert cli_main([*args, "--json"]) == 0
    out_json, err_json = capsys.readouterr()
    assert f"relate: loaded from {run_path}" in err_json
    # Standard JSON: NaN (no value) is null, never the non-standard NaN token.
    data = json.loads(out_json, parse_constant=lambda c: pytest.fail(f"{c} in --json output"))
    assert data["run"] == run_path and data["dropped"] == EXPECTED_DROPPED
    assert data["config"]["seed"] == 1 and data["n_rows"] == 165
    terms = {t["term"]: t for t in data["fits"]["logistic"]["terms"]}
    assert terms["intercept"]["p"] is None  # only the overlap has a permutation p
    assert data["fits"]["linear"]["auc"] is None
    ov = terms["overlap"]
    assert ov["estimate"] > 0 and ov["ci_low"] > 0
    printed = (
        f"  {'overlap':<24}{ov['estimate']:>8.3f}  [{ov['ci_low']:.3f}, {ov['ci_high']:.3f}]"
        f"  p={ov['p']:.3f}"
    )
    assert printed in lines
    assert lines.index(printed) > lines.index(
        "fact level: transfer success, logistic (log-odds per SD); 165 rows, 30 facts, "
        f"{data['fits']['logistic']['n_events']} successes"
    )
    pl = {(r["predictor"], r["outcome"]): r for r in data["pair_level"]}
    assert pl[("neuron_jaccard_ig_neuron", "transfer")]["rho"] == pytest.approx(rho, abs=1e-12)
    assert pl[("neuron_jaccard_ig_neuron", "transfer")]["p"] == pytest.approx(p, abs=1e-12)
    assert data["outcomes"]["transfer"]["en"]["de"] == pytest.approx(transfer.loc["en", "de"])
    assert data["outcomes"]["transfer"]["en"]["en"] is None
    d = data["interventions"][0]["differences"]["transfer"]
    assert d["diff"] == pytest.approx(b_ - a_, abs=1e-12)


def test_cli_missing_run_folder_exits_2(tmp_path, capsys) -> None:
    missing = tmp_path / "nonexistent"
    assert cli_main(["relate", str(missing)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("mlake: error: ") and str(missing) in err


def test_compare_edits_pairs_the_same_edits_only() -> None:
    """A restricted run that has edited only some languages is compared on those edits: the
    base's other edit languages must not enter its per-fact means."""
    from mlake.stages.relate import compare_edits

    idx = pd.MultiIndex.from_tuples(
        [(0, "en"), (0, "de"), (1, "en"), (1, "de")], names=["fact_id", "edit_lang"]
    )
    cols = ["efficacy", "transfer", "transfer_prob", "gain", "locality"]
    base = pd.DataFrame({c: [1.0, 0.0, 1.0, 0.0] for c in cols}, index=idx)
    other = base.loc[[(0, "en"), (1, "en")]] * 0.5  # only en edited, half as good
    diffs = compare_edits(base, other, n_boot=50, level=0.95, seed=0)
    assert diffs["efficacy"].a == pytest.approx(1.0)  # base's en edits only, not (1 + 0) / 2
    assert diffs["efficacy"].b == pytest.approx(0.5)
    assert diffs["efficacy"].diff == pytest.approx(-0.5)
    assert diffs["efficacy"].n_facts == 2


def test_an_empty_overlap_table_gives_no_fact_rows_not_an_error(tmp_path) -> None:
    """When no fact was attributed in two languages (a few facts the model barely knows, as
    in the Gemma demo on 3 facts) the neuron stage's overlap table is empty: relate runs,
    says so, and fits no fact-level model."""
    world = _build_world(tmp_path / "runs", neurons=False)
    _save_neurons(world.root, pd.DataFrame(), JACCARD, model=world.model, fact_ids=FACTS)
    result, run = relate_stage(world.transfer, _dataset(), CONFIG)
    assert run.complete
    assert any("no fact was attributed in two languages" in note for note in result.notes)


def test_probes_without_cross_lingual_accuracy_are_left_out(tmp_path, monkeypatch) -> None:
    """A probe run too small to have a cross-lingual accuracy (the Gemma demo on 3 facts)
    is a DataError the stage turns into a note, not a KeyError that ends the pipeline."""
    from mlake.stages import probes as probe_stage
    from mlake.stages.relate import probe_matrices

    def no_layer(result):
        raise KeyError("no cross-lingual fact accuracy at subject")

    monkeypatch.setattr(probe_stage, "load_probe_result", lambda folder: object())
    monkeypatch.setattr(probe_stage, "pair_matrices", no_layer)
    with pytest.raises(DataError, match="no cross-lingual fact accuracy at subject"):
        probe_matrices(tmp_path)
