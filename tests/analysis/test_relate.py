"""The relation statistics (analysis/relate.py) on hand-built tables: the Mantel test is exact
and valid, tables join what they say they join, and the fact-level models recover a planted
effect (and do not find one that is not there)."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import spearmanr

from analysis.relate import (
    CONTROLS,
    ModelFit,
    RelateConfig,
    bootstrap_mean,
    design,
    fact_level,
    fact_table,
    mantel,
    pair_level,
    paired_difference,
    string_controls,
)
from mlake_core.errors import ConfigError, DataError

LANGS = ("en", "zh", "ja", "fr", "de")
OFF5 = ~np.eye(5, dtype=bool)


def _random_square(rng: np.random.Generator, n: int = 5) -> np.ndarray:
    m = rng.normal(size=(n, n))
    np.fill_diagonal(m, np.nan)  # the diagonal is never used
    return m


# -- mantel ---------------------------------------------------------------------------------


def test_mantel_identical_matrices_exact_minimum_p() -> None:
    a = _random_square(np.random.default_rng(1))
    res = mantel(a, a.copy())
    assert res.exact is True and res.n_perm == 120 and res.n_cells == 20
    assert res.rho == pytest.approx(1.0)
    # Only the identity labelling reaches rho = 1: the smallest p an exact test can give.
    assert res.p == pytest.approx(1 / 120) and res.p_two_sided == pytest.approx(1 / 120)


def test_mantel_anti_correlated_is_one_sided() -> None:
    a = _random_square(np.random.default_rng(2))
    res = mantel(a, -a)
    assert res.rho == pytest.approx(-1.0)
    assert res.p == pytest.approx(1.0)  # every labelling gives rho >= -1
    assert res.p_two_sided == pytest.approx(1 / 120)


def test_mantel_matches_brute_force_reference() -> None:
    """p from an independent enumeration with scipy's Spearman over the 120 relabellings."""
    rng = np.random.default_rng(3)
    a, b = _random_square(rng), _random_square(rng)
    b = b + 0.8 * a  # some relation, so p is neither tiny nor 1
    res = mantel(a, b)
    rho0 = spearmanr(a[OFF5], b[OFF5]).statistic
    rhos = [
        spearmanr(a[np.ix_(p, p)][OFF5], b[OFF5]).statistic
        for p in map(list, itertools.permutations(range(5)))
    ]
    assert res.rho == pytest.approx(rho0)
    assert res.p == pytest.approx(np.mean(np.asarray(rhos) >= rho0 - 1e-12))
    assert res.p_two_sided == pytest.approx(np.mean(np.abs(rhos) >= abs(rho0) - 1e-12))
    assert 1 / 120 < res.p < 0.5


def test_mantel_is_invariant_to_relabelling_both_matrices() -> None:
    rng = np.random.default_rng(4)
    a, b = _random_square(rng), _random_square(rng)
    q = [3, 0, 4, 1, 2]
    r1, r2 = mantel(a, b), mantel(a[np.ix_(q, q)], b[np.ix_(q, q)])
    assert r1.rho == pytest.approx(r2.rho) and r1.p == pytest.approx(r2.p)
    # A label-permuted copy, realigned, is the identical case again.
    copy = a[np.ix_(q, q)]
    inv = np.argsort(q)
    assert mantel(copy[np.ix_(inv, inv)], a).p == pytest.approx(1 / 120)


def test_mantel_p_is_valid_under_independence() -> None:
    """Independent matrices: p < 0.05 about 5% of the time (exact test), and p is spread
    over (0, 1], not piled at either end."""
    rng = np.random.default_rng(5)
    ps = np.array([mantel(_random_square(rng), _random_square(rng)).p for _ in range(150)])
    assert np.mean(ps < 0.05) <= 0.09
    assert 0.35 <= np.mean(ps < 0.5) <= 0.65
    assert np.all((ps >= 1 / 120 - 1e-12) & (ps <= 1))
    # A label-permuted copy is no evidence of relation either.
    perm_ps = []
    for _ in range(50):
        a = _random_square(rng)
        q = rng.permutation(5)
        while np.array_equal(q, np.arange(5)):
            q = rng.permutation(5)
        perm_ps.append(mantel(a, a[np.ix_(q, q)]).p)
    assert np.mean(np.asarray(perm_ps) < 0.05) <= 0.15


def test_mantel_planted_relation_is_detected() -> None:
    rng = np.random.default_rng(6)
    hits = [
        mantel(a, a + 0.2 * _random_square(rng)).p <= 0.05
        for a in (_random_square(rng) for _ in range(10))
    ]
    assert sum(hits) >= 9


def test_mantel_drops_nan_cells_and_ignores_the_diagonal() -> None:
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    b = b + a
    a[0, 1] = a[2, 3] = np.nan
    b[4, 0] = np.nan
    res = mantel(a, b)
    assert res.n_cells == 17
    keep = OFF5 & np.isfinite(a) & np.isfinite(b)
    assert res.rho == pytest.approx(spearmanr(a[keep], b[keep]).statistic)
    a2 = a.copy()
    np.fill_diagonal(a2, 1e6)
    assert mantel(a2, b).rho == pytest.approx(res.rho)


def test_mantel_bad_shapes() -> None:
    with pytest.raises(DataError, match="equal squares"):
        mantel(np.zeros((5, 5)), np.zeros((4, 4)))
    with pytest.raises(DataError, match="equal squares"):
        mantel(np.zeros((5, 4)), np.zeros((5, 4)))


def test_mantel_nine_labels_uses_random_permutations() -> None:
    rng = np.random.default_rng(8)
    a = _random_square(rng, 9)
    b = _random_square(rng, 9)
    res = mantel(a, b, max_perm=300, rng=np.random.default_rng(0))
    assert res.exact is False and res.n_perm == 300 and res.n_cells == 72
    again = mantel(a, b, max_perm=300, rng=np.random.default_rng(0))
    assert again.p == res.p  # reproducible for a seed
    same = mantel(a, a, max_perm=300, rng=np.random.default_rng(0))
    assert same.rho == pytest.approx(1.0) and same.p == pytest.approx(1 / 300)
    # The default draws 10,000 - 1 relabellings (9! = 362,880 > 10,000).
    assert math.factorial(9) > 10_000


# -- pair level -----------------------------------------------------------------------------


def test_pair_level_aligns_by_label() -> None:
    rng = np.random.default_rng(9)
    values = rng.normal(size=(5, 5))
    canon = pd.DataFrame(values, index=list(LANGS), columns=list(LANGS))
    outcome = np.exp(canon)  # strictly monotone in the predictor, cell by cell
    scrambled_rows = ["de", "ja", "en", "fr", "zh"]
    scrambled_cols = ["zh", "fr", "de", "en", "ja"]
    predictor = canon.loc[scrambled_rows, scrambled_cols]
    out_frame = outcome.loc[scrambled_cols, scrambled_rows]  # another order again
    table = pair_level({"overlap": predictor}, {"transfer": out_frame}, LANGS)
    assert list(table.columns) == [
        "predictor",
        "outcome",
        "rho",
        "p",
        "p_two_sided",
        "n_cells",
        "n_perm",
        "exact",
    ]
    row = table.iloc[0]
    assert (row["predictor"], row["outcome"]) == ("overlap", "transfer")
    assert row["rho"] == pytest.approx(1.0) and row["p"] == pytest.approx(1 / 120)
    assert row["n_cells"] == 20 and row["n_perm"] == 120 and bool(row["exact"])
    # Positional use of the scrambled frames would not give a perfect relation.
    assert mantel(predictor.to_numpy(), out_frame.to_numpy()).rho < 0.99


def test_pair_level_missing_language_and_every_combination() -> None:
    rng = np.random.default_rng(10)
    p1 = pd.DataFrame(rng.normal(size=(4, 4)), index=LANGS[:4], columns=LANGS[:4])  # no de
    p2 = pd.DataFrame(rng.normal(size=(5, 5)), index=LANGS, columns=LANGS)
    o1 = pd.DataFrame(rng.normal(size=(5, 5)), index=LANGS, columns=LANGS)
    table = pair_level({"a": p1, "b": p2}, {"x": o1, "y": o1 * 2}, LANGS)
    assert list(zip(table["predictor"], table["outcome"], strict=True)) == [
        ("a", "x"),
        ("a", "y"),
        ("b", "x"),
        ("b", "y"),
    ]
    assert table["n_cells"].tolist() == [12, 12, 20, 20]  # de's 8 cells are NaN for "a"
    # Scaling the outcome changes no rank.
    assert table["rho"].iloc[0] == pytest.approx(table["rho"].iloc[1])


# -- string controls ------------------------------------------------------------------------


def _chars(text: str) -> list[int]:
    return [ord(c) for c in text]


def test_string_controls_by_hand() -> None:
    texts = {
        (0, "en"): ("Berlin", "Paris"),
        (0, "de"): ("Ｂerlin", "paris "),  # full-width B (NFKC), case, trailing space
        (0, "zh"): ("柏林", "巴黎"),
        (1, "en"): ("Rome", "Milan"),  # one language only: no pair
    }
    table = string_controls(texts, _chars).set_index(["fact_id", "edit_lang", "test_lang"])
    assert len(table) == 6
    assert set(table.index.get_level_values(0)) == {0}
    en_de = table.loc[(0, "en", "de")]
    assert en_de["same_subject"] == 1.0 and en_de["same_answer"] == 1.0
    # {B,e,r,l,i,n} vs {Ｂ,e,r,l,i,n}: 5 shared of 7.
    assert en_de["subject_token_jaccard"] == pytest.approx(5 / 7)
    # {P,a,r,i,s} vs {p,a,r,i,s,' '}: 4 shared of 7.
    assert en_de["answer_token_jaccard"] == pytest.approx(4 / 7)
    pd.testing.assert_series_equal(
        table.loc[(0, "de", "en")], en_de, check_names=False
    )  # symmetric
    en_zh = table.loc[(0, "en", "zh")]
    assert en_zh["same_subject"] == 0.0 and en_zh["same_answer"] == 0.0
    assert en_zh["subject_token_jaccard"] == 0.0 and en_zh["answer_token_jaccard"] == 0.0
    # Without a tokenizer the token columns are NaN; the string columns stay.
    plain = string_controls(texts).set_index(["fact_id", "edit_lang", "test_lang"])
    assert plain["subject_token_jaccard"].isna().all()
    assert plain["answer_token_jaccard"].isna().all()
    assert plain.loc[(0, "en", "de"), "same_subject"] == 1.0


def test_string_controls_empty_token_sets_are_nan() -> None:
    table = string_controls({(3, "en"): ("a", "b"), (3, "zh"): ("c", "d")}, lambda _t: [])
    assert table["subject_token_jaccard"].isna().all()


# -- fact table -----------------------------------------------------------------------------


def _transfer_row(
    fact, a, b, *, kind="transfer", form="question", n=1, sg=1, sp=0, p_new=0.5, known=True
) -> dict:
    return {
        "kind": kind,
        "form": form,
        "fact_id": fact,
        "edit_lang": a,
        "test_lang": b,
        "n": n,
        "success_greedy": sg,
        "success_prob": sp,
        "p_new": p_new,
        "known_before": known,
    }


@pytest.fixture()
def tables():
    transfer = pd.DataFrame.from_records(
        [
            _transfer_row(0, "en", "zh", sg=1, sp=0, p_new=0.5),  # kept
            _transfer_row(0, "zh", "en", sg=0, sp=1, p_new=0.01),  # kept, reversed pair
            _transfer_row(0, "en", "en", kind="efficacy"),  # not a transfer row
            _transfer_row(0, "en", "zh", form="cloze"),  # other form
            _transfer_row(1, "en", "zh", n=0),  # no-op: dropped
            _transfer_row(1, "zh", "en", n=0),  # no-op: dropped
            _transfer_row(2, "en", "zh", known=False),  # not known: dropped
            _transfer_row(3, "en", "zh"),  # no pre-edit value: dropped
            _transfer_row(4, "en", "zh", p_new=0.0),  # kept; p_new underflowed
            _transfer_row(4, "zh", "en", p_new=0.2),  # kept; logp_before below the floor
            _transfer_row(5, "en", "zh"),  # overlap NaN: dropped
            _transfer_row(6, "en", "zh"),  # no overlap row: dropped
        ]
    )
    before = pd.DataFrame.from_records(
        [
            {"fact_id": f, "lang": lang, "form": form, "edit_alias_logp": v}
            for f, lang, form, v in [
                (0, "zh", "question", -3.0),
                (0, "zh", "cloze", -99.0),  # other form: must not be used
                (0, "en", "question", -2.0),
                (1, "zh", "question", -1.0),
                (1, "en", "question", -1.0),
                (2, "zh", "question", -1.0),
                (4, "zh", "question", -5.0),
                (4, "en", "question", -1000.0),
                (5, "zh", "question", -1.0),
                (6, "zh", "question", -1.0),
            ]
        ]
    )
    overlap = pd.DataFrame.from_records(
        [
            {"fact_id": 0, "lang_a": "en", "lang_b": "zh", "jaccard": 0.3, "overlap": 0.5},
            {"fact_id": 4, "lang_a": "zh", "lang_b": "en", "jaccard": 0.1, "overlap": 0.2},
            {"fact_id": 5, "lang_a": "en", "lang_b": "zh", "jaccard": np.nan, "overlap": np.nan},
            {"fact_id": 1, "lang_a": "en", "lang_b": "zh", "jaccard": 0.9, "overlap": 0.9},
            {"fact_id": 2, "lang_a": "en", "lang_b": "zh", "jaccard": 0.9, "overlap": 0.9},
            {"fact_id": 3, "lang_a": "en", "lang_b": "zh", "jaccard": 0.9, "overlap": 0.9},
        ]
    )
    controls = string_controls(
        {
            (0, "en"): ("Obama", "Paris"),
            (0, "zh"): ("奥巴马", "Paris"),
            (4, "en"): ("Curie", "Rome"),
            (4, "zh"): ("Curie", "罗马"),
        },
        _chars,
    )
    return transfer, before, overlap, controls


def test_fact_table_joins_by_hand(tables) -> None:
    transfer, before, overlap, controls = tables
    ft = fact_table(transfer, before, overlap, controls, RelateConfig())
    rows = ft.rows.set_index(["fact_id", "edit_lang", "test_lang"]).sort_index()
    assert list(ft.rows.columns) == [
        "fact_id",
        "edit_lang",
        "test_lang",
        "pair",
        "success",
        "gain",
        "overlap",
        *CONTROLS,
    ]
    assert sorted(rows.index) == [
        (0, "en", "zh"),
        (0, "zh", "en"),
        (4, "en", "zh"),
        (4, "zh", "en"),
    ]
    r = rows.loc[(0, "en", "zh")]
    assert r["gain"] == pytest.approx(math.log(0.5) - (-3.0))
    assert r["success"] == 1.0 and r["overlap"] == 0.3 and r["pair"] == "en->zh"
    assert r["known_before"] == 1.0
    assert r["same_answer"] == 1.0 and r["same_subject"] == 0.0
    r = rows.loc[(0, "zh", "en")]
    assert r["gain"] == pytest.approx(math.log(0.01) - (-2.0))
    assert r["success"] == 0.0 and r["overlap"] == 0.3  # the unordered pair, other order
    r = rows.loc[(4, "en", "zh")]
    assert r["gain"] == pytest.approx(math.log(1e-300) + 5.0)  # p_new floored
    assert r["overlap"] == 0.1  # stored as (zh, en)
    assert r["same_subject"] == 1.0 and r["subject_token_jaccard"] == 1.0
    r = rows.loc[(4, "zh", "en")]
    assert r["gain"] == pytest.approx(math.log(0.2) + 690.0)  # logp_before floored
    assert r["overlap"] == 0.1
    assert ft.dropped == {
        "new answer equals the old one in B": 2,
        "not known in B before the edit": 1,
        "no pre-edit measurement": 1,
        "no overlap (fact not attributed, or both sets empty)": 2,
    }


def test_fact_table_options(tables) -> None:
    transfer, before, overlap, controls = tables
    ft = fact_table(
        transfer,
        before,
        overlap,
        controls,
        RelateConfig(outcome="success_prob", overlap="overlap", known_only=False),
    )
    rows = ft.rows.set_index(["fact_id", "edit_lang", "test_lang"])
    assert (2, "en", "zh") in rows.index  # kept without known_only
    assert rows.loc[(2, "en", "zh"), "known_before"] == 0.0
    assert "not known in B before the edit" not in ft.dropped
    assert rows.loc[(0, "en", "zh"), "success"] == 0.0  # success_prob column
    assert rows.loc[(0, "zh", "en"), "success"] == 1.0
    assert rows.loc[(0, "en", "zh"), "overlap"] == 0.5  # the overlap column
    assert rows.loc[(4, "zh", "en"), "overlap"] == 0.2
    # No controls for fact 2: NaN, not dropped.
    assert math.isnan(rows.loc[(2, "en", "zh"), "same_subject"])
    # The cloze form picks the cloze pre-edit value.
    cl = fact_table(transfer, before, overlap, controls, RelateConfig(form="cloze"))
    assert len(cl.rows) == 1
    assert cl.rows["gain"].iloc[0] == pytest.approx(math.log(0.5) + 99.0)


@pytest.mark.parametrize("column", ["kind", "n", "p_new", "success_greedy", "known_before"])
def test_fact_table_missing_transfer_columns(tables, column) -> None:
    transfer, before, overlap, controls = tables
    with pytest.raises(DataError, match=column):
        fact_table(transfer.drop(columns=[column]), before, overlap, controls, RelateConfig())


def test_fact_table_missing_overlap_column(tables) -> None:
    transfer, before, overlap, controls = tables
    with pytest.raises(DataError, match="'jaccard'"):
        fact_table(transfer, before, overlap.drop(columns=["jaccard"]), controls, RelateConfig())


def test_relate_config_validation() -> None:
    assert RelateConfig(n_boot="20").n_boot == 20  # coerced (CLI / YAML strings)
    for bad, match in [
        ({"outcome": "x"}, "--outcome"),
        ({"form": "x"}, "--form"),
        ({"overlap": "x"}, "--overlap"),
        ({"n_boot": 5}, "--n-boot"),
        ({"folds": 1}, "--folds"),
        ({"C": 0}, "C > 0"),
        ({"level": 1.0}, "--level"),
    ]:
        with pytest.raises(ConfigError, match=match):
            RelateConfig(**bad)


# -- fact level -----------------------------------------------------------------------------


def _synthetic(
    n_facts: int, seed: int, *, beta: float, gain_beta: float = 0.0, langs=LANGS
) -> tuple[pd.DataFrame, dict[str, float]]:
    """Fact-table rows with success ~ Bernoulli(sigmoid(-2 + beta z(overlap) + pair)) and
    gain = gain_beta z(overlap) + pair + N(0, 1); the controls are noise."""
    rng = np.random.default_rng(seed)
    pairs = [f"{a}->{b}" for a in langs for b in langs if a != b]
    effect = {p: float(rng.normal(0, 0.5)) for p in pairs}
    df = pd.DataFrame(
        [(f, p.split("->")[0], p.split("->")[1], p) for f in range(n_facts) for p in pairs],
        columns=["fact_id", "edit_lang", "test_lang", "pair"],
    )
    n = len(df)
    df["overlap"] = rng.beta(2, 5, n)
    z = (df["overlap"] - df["overlap"].mean()) / df["overlap"].std(ddof=0)
    pe = df["pair"].map(effect)
    df["success"] = (rng.random(n) < 1 / (1 + np.exp(-(-2 + beta * z + pe)))).astype(float)
    df["gain"] = gain_beta * z + pe + rng.normal(0, 1, n)
    df["same_subject"] = (rng.random(n) < 0.3).astype(float)
    df["subject_token_jaccard"] = rng.random(n)
    df["same_answer"] = (rng.random(n) < 0.2).astype(float)
    df["answer_token_jaccard"] = rng.random(n)
    df["known_before"] = (rng.random(n) < 0.7).astype(float)
    return df, effect


@pytest.fixture(scope="module")
def planted():
    rows, effect = _synthetic(300, 0, beta=1.5, gain_beta=0.8)
    return rows, effect, fact_level(rows, RelateConfig(n_boot=100, n_perm=50))


def test_fact_level_logistic_recovers_the_planted_effect(planted) -> None:
    rows, _, fits = planted
    fit = fits["logistic"]
    assert fit.note == "" and fit.n_rows == 6000 and fit.n_facts == 300
    assert fit.n_events == int(rows["success"].sum())
    ov = fit.term("overlap")
    assert ov["ci_low"] > 0
    assert ov["ci_low"] - 0.1 <= 1.5 <= ov["ci_high"] + 0.1  # L2 (C=10) shrinks a little
    assert ov["estimate"] == pytest.approx(1.5, abs=0.15)
    assert ov["p"] == pytest.approx(1 / 51)  # no permutation reaches the observed value
    assert fit.terms["term"].tolist()[:7] == ["intercept", "overlap", *CONTROLS]
    assert len(fit.terms) == 1 + 1 + len(CONTROLS) + 19  # 20 ordered pairs, first is the base
    assert all(
        math.isnan(p)
        for t, p in zip(fit.terms["term"], fit.terms["p"], strict=True)
        if t != "overlap"
    )
    # The controls are noise: at most one of their intervals misses 0 by chance.
    misses = sum(not (fit.term(c)["ci_low"] <= 0 <= fit.term(c)["ci_high"]) for c in CONTROLS)
    assert misses <= 1
    assert fit.auc > fit.auc_controls + 0.1
    assert fit.auc_gain == pytest.approx(fit.auc - fit.auc_controls)
    assert 0 < fit.auc_gain_ci[0] <= fit.auc_gain <= fit.auc_gain_ci[1]


def test_fact_level_linear_recovers_the_planted_effect(planted) -> None:
    rows, effect, fits = planted
    fit = fits["linear"]
    ov = fit.term("overlap")
    assert ov["ci_low"] <= 0.8 <= ov["ci_high"]
    assert ov["estimate"] == pytest.approx(0.8, abs=0.05)
    assert ov["p"] < 0.05
    assert fit.n_events == 0 and math.isnan(fit.auc)
    # By hand: OLS on the raw predictors; the standardised coefficient is the raw one times
    # the overlap's (population) standard deviation.
    pairs = sorted(rows["pair"].unique())
    raw = np.column_stack(
        [
            np.ones(len(rows)),
            rows["overlap"],
            rows[list(CONTROLS)],
            *[(rows["pair"] == p).to_numpy(float) for p in pairs[1:]],
        ]
    )
    coef, *_ = np.linalg.lstsq(raw, rows["gain"].to_numpy(), rcond=None)
    assert ov["estimate"] == pytest.approx(coef[1] * rows["overlap"].std(ddof=0), rel=1e-6)
    # Pair indicators: the planted effects relative to the first pair.
    est = [fit.term(f"pair[{p}]")["estimate"] for p in pairs[1:]]
    true = [effect[p] - effect[pairs[0]] for p in pairs[1:]]
    assert np.corrcoef(est, true)[0, 1] > 0.95


def test_fact_level_no_relation_is_not_significant() -> None:
    cfg = RelateConfig(n_boot=100, n_perm=20)
    significant = []
    for seed in range(5):
        rows, _ = _synthetic(100, 100 + seed, beta=0.0, langs=LANGS[:3])
        fits = fact_level(rows, cfg)
        for kind in ("logistic", "linear"):
            ov = fits[kind].term("overlap")
            significant.append(not (ov["ci_low"] <= 0 <= ov["ci_high"]) or ov["p"] < 0.05)
        if seed == 0:
            lo = fits["logistic"].term("overlap")
            assert lo["ci_low"] < 0 < lo["ci_high"] and lo["p"] > 0.05
            # The overlap adds nothing out of fold.
            assert abs(fits["logistic"].auc_gain) < 0.03
            assert fits["logistic"].auc_gain_ci[0] < 0.01
    assert sum(significant) <= 2  # of 10 tests at the 5% level


def test_fact_level_unestimable_models_say_why() -> None:
    rows, _ = _synthetic(10, 1, beta=0.0, langs=("en", "zh"))
    rows["success"] = 0.0
    rows.loc[rows.index[:3], "success"] = 1.0
    fits = fact_level(rows, RelateConfig(n_boot=10, n_perm=0))
    lo = fits["logistic"]
    assert "3 successes of 20 rows" in lo.note and lo.terms.empty and lo.n_events == 3
    assert lo.n_rows == 20 and lo.n_facts == 10 and math.isnan(lo.auc)
    assert fits["linear"].note == "" and not fits["linear"].terms.empty
    assert math.isnan(fits["linear"].term("overlap")["p"])  # n_perm = 0
    few = fact_level(rows.iloc[:9], RelateConfig(n_boot=10))
    assert few["logistic"].note == "only 9 rows" and few["linear"].note == "only 9 rows"
    with pytest.raises(KeyError):
        lo.term("overlap")


@pytest.mark.parametrize("value", [0.0, 0.2])
def test_fact_level_constant_overlap_is_not_fitted(value) -> None:
    """A constant overlap carries no information.  0.2 repeated has a floating-point
    standard deviation of about 3e-17, not 0: it must still count as constant (otherwise
    ``design`` divides by that and the overlap coefficient is noise)."""
    rows, _ = _synthetic(10, 1, beta=0.0, langs=("en", "zh"))
    flat = rows.assign(overlap=value, success=np.tile([0.0, 1.0], 10))
    fits = fact_level(flat, RelateConfig(n_boot=10, n_perm=0))
    for kind in ("logistic", "linear"):
        assert fits[kind].note == "the overlap does not vary", kind
        assert fits[kind].terms.empty


def test_design_drops_constant_columns() -> None:
    rows, _ = _synthetic(5, 2, beta=0.0, langs=("en", "zh", "ja"))
    rows["same_answer"] = 1.0
    rows["answer_token_jaccard"] = np.nan
    d = design(rows)
    assert d.names == [
        "overlap",
        "same_subject",
        "subject_token_jaccard",
        "known_before",
        "pair[en->zh]",
        "pair[ja->en]",
        "pair[ja->zh]",
        "pair[zh->en]",
        "pair[zh->ja]",
    ]
    assert np.allclose(d.x[:, :4].mean(0), 0) and np.allclose(d.x[:, :4].std(0), 1)
    assert d.x[:, 4].tolist() == (rows["pair"] == "en->zh").astype(float).tolist()
    assert design(rows, with_overlap=False).names[0] == "same_subject"


# -- comparing two conditions ---------------------------------------------------------------


def test_paired_difference_by_hand() -> None:
    a = pd.Series([1.0, 2.0, 3.0, 4.0], index=[0, 1, 2, 3])
    b = pd.Series([4.0, 5.0, 6.0, 100.0, np.nan], index=[1, 2, 3, 9, 0])  # 9: a lacks it
    d = paired_difference(a, b, n_boot=200)
    assert d.n_facts == 3  # inner join on {1, 2, 3} (0 is NaN in b)
    assert d.a == pytest.approx(3.0) and d.b == pytest.approx(5.0) and d.diff == pytest.approx(2.0)
    # A constant shift: every resample gives exactly 2.
    assert d.ci_low == pytest.approx(2.0) and d.ci_high == pytest.approx(2.0)
    empty = paired_difference(a, pd.Series([1.0], index=[42]))
    assert empty.n_facts == 0 and math.isnan(empty.diff)


def test_paired_difference_interval_covers_the_truth() -> None:
    rng = np.random.default_rng(11)
    a = pd.Series(rng.normal(0, 2, 400))
    b = a + 0.5 + pd.Series(rng.normal(0, 0.5, 400))
    d = paired_difference(a, b, n_boot=500, seed=3)
    assert d.ci_low < 0.5 < d.ci_high and d.ci_low > 0.4 and d.ci_high < 0.6
    # Pairing matters: the interval reflects the 0.5 noise, not a's spread of 2.
    assert d.ci_high - d.ci_low < 0.15
    assert paired_difference(a, b, n_boot=500, seed=3) == d  # seeded


def test_bootstrap_mean_by_hand_and_clusters() -> None:
    mean, lo, hi = bootstrap_mean(pd.Series([1.0, 2.0, np.nan, 3.0, 6.0]), n_boot=500)
    assert mean == pytest.approx(3.0) and 1.0 <= lo < 3.0 < hi <= 6.0
    assert all(math.isnan(v) for v in bootstrap_mean(pd.Series([np.nan])))
    # Ten facts of twenty identical rows each: the cluster interval is about sqrt(20) times
    # wider than one that treats the 200 rows as independent.
    rng = np.random.default_rng(12)
    per_fact = rng.normal(0, 1, 10)
    values = pd.Series(np.repeat(per_fact, 20))
    groups = pd.Series(np.repeat(np.arange(10), 20))
    m, clo, chi = bootstrap_mean(values, groups, n_boot=500)
    _, ilo, ihi = bootstrap_mean(values, n_boot=500)
    assert m == pytest.approx(per_fact.mean())
    assert (chi - clo) > 3 * (ihi - ilo)
    # Two facts of constant value: a resample holds 0, 1 or 2 copies of each.
    m2, lo2, hi2 = bootstrap_mean(
        pd.Series([1.0, 1.0, 3.0, 3.0]), pd.Series(["a", "a", "b", "b"]), n_boot=500
    )
    assert (m2, lo2, hi2) == (2.0, 1.0, 3.0)


def test_model_fit_round_trip(planted) -> None:
    _, _, fits = planted
    for fit in fits.values():
        data = json.loads(json.dumps(fit.to_dict()))
        back = ModelFit.from_dict(data)
        pd.testing.assert_frame_equal(back.terms, fit.terms)
        for name in ("kind", "n_rows", "n_facts", "n_events", "note"):
            assert getattr(back, name) == getattr(fit, name)
        for name in ("auc", "auc_controls", "auc_gain"):
            a, b = getattr(back, name), getattr(fit, name)
            assert (math.isnan(a) and math.isnan(b)) or a == b
        assert isinstance(back.auc_gain_ci, tuple)
        assert np.allclose(back.auc_gain_ci, fit.auc_gain_ci, equal_nan=True)
        assert back.term("overlap") == pytest.approx(fit.term("overlap"), nan_ok=True)
    noted = ModelFit("logistic", pd.DataFrame(), 3, 2, 0, note="only 3 rows")
    back = ModelFit.from_dict(json.loads(json.dumps(noted.to_dict())))
    assert back.note == "only 3 rows" and back.terms.empty and back.n_rows == 3
