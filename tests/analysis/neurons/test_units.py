"""Units of the neuron stage, without a model: important and agreed sets, overlaps, unit
classes, LAPE on planted statistics, random control sets, ablation patches, the settings'
validation and the method registry."""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

from analysis.neurons import attribution as attr_mod
from analysis.neurons.ablation import random_like, unit_patches
from analysis.neurons.activation import ActivationStats, folder_texts, lape
from analysis.neurons.attribution import (
    Attribution,
    AttributionConfig,
    AttributionContext,
    AttributionPrompt,
    FactAttribution,
    agreed_units,
    attribute_fact,
    attribution_methods,
    get_attribution_method,
    important_units,
    register_attribution_method,
)
from analysis.neurons.config import NeuronConfig, NeuronResult
from analysis.neurons.sharing import (
    classes_from_assignment,
    classify_units,
    overlap_matrix,
    pair_rows,
    set_overlap,
)
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import UnitPatch

# -- important and agreed sets -------------------------------------------------------------


SCORES = np.array([[0.1, 1.0, 0.3], [-2.0, 0.2, 0.21]])


def test_important_units_threshold_rule():
    got = important_units(SCORES, AttributionConfig(threshold=0.2))
    # Above 0.2 x max (1.0), strictly: 1.0, 0.3, 0.21 -- not 0.2 itself, not the large
    # negative score (it opposes the answer).
    assert got.tolist() == [1, 2, 5]
    assert got.dtype == np.int64
    assert important_units(SCORES, AttributionConfig(threshold=0.5)).tolist() == [1]
    assert important_units(SCORES, AttributionConfig(threshold=0.15)).tolist() == [1, 2, 4, 5]
    # Relative to the prompt's maximum: scaling every score changes nothing.
    assert important_units(1e-6 * SCORES, AttributionConfig()).tolist() == [1, 2, 5]


def test_important_units_topk_rule():
    cfg = AttributionConfig(rule="topk", top_k=2)
    assert important_units(SCORES, cfg).tolist() == [1, 2]  # sorted indices, not by score
    cfg = AttributionConfig(rule="topk", top_k=3)
    assert important_units(SCORES, cfg).tolist() == [1, 2, 5]
    # Only positive scores qualify, however large k.
    cfg = AttributionConfig(rule="topk", top_k=100)
    assert important_units(SCORES, cfg).tolist() == [0, 1, 2, 4, 5]


@pytest.mark.parametrize("rule", ["threshold", "topk"])
def test_no_positive_score_gives_an_empty_set(rule):
    cfg = AttributionConfig(rule=rule)
    for scores in (-np.abs(SCORES), np.zeros((2, 3)), np.zeros((2, 0))):
        got = important_units(scores, cfg)
        assert got.shape == (0,) and got.dtype == np.int64


def test_agreed_units():
    a, b = np.array([1, 2, 5]), np.array([2, 5, 7])
    # With two prompts, 0.7 needs both (intersection); 0.5 needs one (union).
    assert agreed_units([a, b], 0.7).tolist() == [2, 5]
    assert agreed_units([a, b], 1.0).tolist() == [2, 5]
    assert agreed_units([a, b], 0.5).tolist() == [1, 2, 5, 7]
    c = np.array([5, 9])
    assert agreed_units([a, b, c], 0.6).tolist() == [2, 5]  # 2 of 3
    assert agreed_units([a, b, c], 0.7).tolist() == [5]  # ceil(2.1) = 3 of 3
    assert agreed_units([a, b, c], 1 / 3).tolist() == [1, 2, 5, 7, 9]
    assert agreed_units([a], 0.7).tolist() == [1, 2, 5]
    assert agreed_units([a, np.zeros(0, dtype=np.int64)], 0.7).tolist() == []
    assert agreed_units([], 0.7).tolist() == []


# -- overlap ----------------------------------------------------------------------------------


def test_set_overlap_hand_values():
    jac, ovl = set_overlap(np.array([1, 2, 3, 4]), np.array([3, 4, 5]))
    assert jac == pytest.approx(2 / 5) and ovl == pytest.approx(2 / 3)
    assert set_overlap(np.array([1, 2]), np.array([1, 2])) == (1.0, 1.0)
    assert set_overlap(np.array([1, 2]), np.array([3])) == (0.0, 0.0)
    # A subset: Jaccard below 1, overlap coefficient 1.
    assert set_overlap(np.array([1]), np.array([1, 2, 3, 4])) == (0.25, 1.0)
    for a, b in (([], [1]), ([1], []), ([], [])):
        jac, ovl = set_overlap(np.array(a, dtype=np.int64), np.array(b, dtype=np.int64))
        assert math.isnan(jac) and math.isnan(ovl)


def _fact_sets():
    # n_units 10, two layers: flat index = layer * 10 + unit.
    return {"en": np.array([1, 2, 11, 12]), "zh": np.array([2, 3, 12]), "fr": np.array([])}


def test_pair_rows_totals_and_per_layer_values():
    rows = pair_rows(_fact_sets(), ["en", "zh", "fr", "de"], n_layers=2, n_units=10)
    # de has no set (not attributed): no pair; fr has an empty set: pairs with NaN.
    assert [(r["lang_a"], r["lang_b"]) for r in rows] == [("en", "zh"), ("en", "fr"), ("zh", "fr")]
    en_zh = rows[0]
    assert (en_zh["size_a"], en_zh["size_b"], en_zh["intersection"]) == (4, 3, 2)
    assert en_zh["jaccard"] == pytest.approx(2 / 5)
    assert en_zh["overlap"] == pytest.approx(2 / 3)
    # layer 0: {1, 2} vs {2, 3}; layer 1: {11, 12} vs {12}
    assert en_zh["jaccard_L0"] == pytest.approx(1 / 3) and en_zh["overlap_L0"] == 0.5
    assert en_zh["jaccard_L1"] == 0.5 and en_zh["overlap_L1"] == 1.0
    for row in rows[1:]:
        assert row["size_b"] == 0 and row["intersection"] == 0
        assert math.isnan(row["jaccard"]) and math.isnan(row["overlap_L1"])
    # Language order decides the pair's orientation, not the mapping's order.
    flipped = pair_rows(_fact_sets(), ["zh", "en"], n_layers=2, n_units=10)
    assert [(r["lang_a"], r["lang_b"], r["size_a"]) for r in flipped] == [("zh", "en", 3)]
    # A layer where one side is empty is NaN there, not 0.
    one_layer = pair_rows({"en": np.array([1]), "zh": np.array([1, 15])}, ["en", "zh"], 2, 10)[0]
    assert one_layer["jaccard_L0"] == 1.0 and math.isnan(one_layer["jaccard_L1"])


def test_overlap_matrix_means_over_facts():
    langs = ["en", "zh", "fr", "de"]
    rows = [{"fact_id": 1, **r} for r in pair_rows(_fact_sets(), langs, 2, 10)]
    second = {"en": np.array([5]), "zh": np.array([5]), "de": np.array([6])}
    rows += [{"fact_id": 2, **r} for r in pair_rows(second, langs, 2, 10)]
    table = pd.DataFrame.from_records(rows)
    m = overlap_matrix(table, langs, "jaccard")
    assert np.array_equal(m, m.T, equal_nan=True)
    assert np.all(np.diag(m) == 1.0)
    assert m[0, 1] == pytest.approx((0.4 + 1.0) / 2)  # en-zh over both facts
    assert m[0, 3] == 0.0 and m[1, 3] == 0.0  # en-de, zh-de: fact 2 only
    assert math.isnan(m[0, 2]) and math.isnan(m[1, 2])  # fr's set is empty: no valid pair
    assert math.isnan(m[2, 3])  # fr-de: never both present
    ovl = overlap_matrix(table, langs, "overlap")
    assert ovl[0, 1] == pytest.approx((2 / 3 + 1.0) / 2)
    assert overlap_matrix(table, langs, "jaccard_L1")[0, 1] == pytest.approx(0.5)
    for empty in (None, pd.DataFrame()):
        e = overlap_matrix(empty, ["en", "zh"])
        assert e[0, 0] == e[1, 1] == 1.0 and np.isnan(e[0, 1]) and np.isnan(e[1, 0])


# -- classes ----------------------------------------------------------------------------------

LANGS = ("en", "zh", "fr", "de")
# Two layers of five units.  Unit 0 is important for every en and fr fact (shared); unit 7 for
# every zh fact (specific to zh); units 3, 4 and 9 are important once each.
PLANTED = {
    "en": [np.array([0, 3]), np.array([0, 4]), np.array([0])],
    "zh": [np.array([0, 7]), np.array([7]), np.array([7, 3])],
    "fr": [np.array([0]), np.array([0, 9])],
}


def test_classify_units_finds_the_planted_specific_and_shared_units():
    classes = classify_units(PLANTED, LANGS, n_layers=2, n_units=5, min_rate=0.5, min_facts=2)
    assert classes.used.shape == (4, 10)
    assert np.flatnonzero(classes.used[0]).tolist() == [0]  # en
    assert np.flatnonzero(classes.used[1]).tolist() == [7]  # zh (0 in 1 of 3 facts only)
    assert np.flatnonzero(classes.used[2]).tolist() == [0]  # fr
    assert not classes.used[3].any()  # de: no facts
    assert classes.rate[0, 0] == 1.0 and classes.rate[1, 3] == pytest.approx(1 / 3)
    assert classes.rate[2, 9] == 0.5 and not classes.rate[3].any()
    specific = classes.specific_sets()
    assert {k: v.tolist() for k, v in specific.items()} == {
        "en": [],
        "zh": [7],
        "fr": [],
        "de": [],
    }
    assert classes.shared_units().tolist() == [0]
    assert classes.counts() == [
        {"layer": 0, "specific_en": 0, "specific_zh": 0, "specific_fr": 0, "specific_de": 0,
         "shared": 1, "neither": 4},
        {"layer": 1, "specific_en": 0, "specific_zh": 1, "specific_fr": 0, "specific_de": 0,
         "shared": 0, "neither": 4},
    ]  # fmt: skip


def test_classify_units_min_rate_and_min_facts_edges():
    # min_facts 1: a unit important once is used, if its rate is high enough.
    loose = classify_units(PLANTED, LANGS, 2, 5, min_rate=0.3, min_facts=1)
    assert np.flatnonzero(loose.used[0]).tolist() == [0, 3, 4]  # 1/3 >= 0.3
    assert {k: v.tolist() for k, v in loose.specific_sets().items()} == {
        "en": [4],
        "zh": [7],
        "fr": [9],
        "de": [],
    }
    assert loose.shared_units().tolist() == [0, 3]  # 3: en and zh
    # A rate just above 1/3 drops the once-in-three units, not fr's once-in-two unit 9.
    strict = classify_units(PLANTED, LANGS, 2, 5, min_rate=0.34, min_facts=1)
    assert np.flatnonzero(strict.used[0]).tolist() == [0]
    assert np.flatnonzero(strict.used[2]).tolist() == [0, 9]
    # min_facts 3 needs three facts: fr (two facts) uses nothing, even unit 0 at rate 1.
    three = classify_units(PLANTED, LANGS, 2, 5, min_rate=0.05, min_facts=3)
    assert np.flatnonzero(three.used[0]).tolist() == [0]
    assert not three.used[2].any()
    assert {k: v.tolist() for k, v in three.specific_sets().items()}["en"] == [0]
    for kwargs in ({"min_rate": 0.0}, {"min_rate": 1.5}, {"min_facts": 0}):
        with pytest.raises(ConfigError):
            classify_units(PLANTED, LANGS, 2, 5, **kwargs)


def test_classes_from_assignment():
    selected = np.array([1, 6, 8])
    assignment = np.array([[True, False], [False, True], [True, True]])
    classes = classes_from_assignment(selected, assignment, ["en", "zh"], n_layers=2, n_units=5)
    assert np.flatnonzero(classes.used[0]).tolist() == [1, 8]
    assert np.flatnonzero(classes.used[1]).tolist() == [6, 8]
    assert {k: v.tolist() for k, v in classes.specific_sets().items()} == {"en": [1], "zh": [6]}
    assert classes.shared_units().tolist() == [8]
    assert np.isnan(classes.rate).all()
    assert [r["neither"] for r in classes.counts()] == [4, 3]
    assert [r["shared"] for r in classes.counts()] == [0, 1]


# -- LAPE -------------------------------------------------------------------------------------


def _planted_stats() -> ActivationStats:
    """Three languages, 2 layers x 50 neurons; every neuron fires on 20-50% of tokens in
    every language (high entropy), except planted ones."""
    rng = np.random.default_rng(0)
    n_tokens = np.array([1000, 2000, 500])
    prob = rng.uniform(0.2, 0.5, size=(3, 2, 50))
    prob[:, 0, 3] = [0.0, 0.95, 0.0]  # zh only: entropy 0
    prob[:, 1, 7] = [0.9, 0.01, 0.01]  # en, nearly only
    prob[:, 1, 20] = [0.8, 0.0, 0.8]  # en and fr: entropy log 2
    prob[:, 0, 10] = [0.05, 0.0, 0.0]  # en only, but rarely active: dismissed
    prob[:, 0, 11] = 0.0  # never active: dismissed
    positive = np.round(prob * n_tokens[:, None, None]).astype(np.int64)
    total = positive * 0.5
    return ActivationStats(("en", "zh", "fr"), n_tokens, positive, total, np.array([10, 20, 5]))


def test_lape_finds_planted_language_specific_neurons():
    stats = _planted_stats()
    found = lape(stats, top_rate=0.03, filter_rate=0.95, bar_rate=0.95)  # 3 of 100 neurons
    assert found.selected.tolist() == [3, 57, 70]
    assert found.assignment.tolist() == [
        [False, True, False],  # 3: zh
        [True, False, False],  # 57 = layer 1, neuron 7: en
        [True, False, True],  # 70 = layer 1, neuron 20: en and fr
    ]
    assert {k: v.tolist() for k, v in found.sets().items()} == {
        "en": [57, 70],
        "zh": [3],
        "fr": [70],
    }
    assert found.entropy[3] == pytest.approx(0.0, abs=1e-12)
    assert found.entropy[70] == pytest.approx(math.log(2))
    # Dismissed: rarely active (entropy 0 otherwise) and never active.
    assert np.isinf(found.entropy[10]) and np.isinf(found.entropy[11])
    assert 0.45 < found.bar < 0.8  # the 95% quantile of the probabilities
    # More neurons selected: the background (entropy near log 3) comes after the planted ones.
    wider = lape(stats, top_rate=0.1, filter_rate=0.95, bar_rate=0.95)
    assert {3, 57, 70} <= set(wider.selected.tolist())
    assert 10 not in wider.selected and 11 not in wider.selected


def test_lape_bad_input():
    stats = _planted_stats()
    with pytest.raises(ConfigError, match="--lape-top-rate"):
        lape(stats, top_rate=0.0)
    with pytest.raises(ConfigError, match="--lape-bar-rate"):
        lape(stats, bar_rate=1.0)
    one = ActivationStats(("en",), stats.n_tokens[:1], stats.positive[:1], stats.total[:1], [1])
    with pytest.raises(ConfigError, match="at least two"):
        lape(one)


def test_activation_stats_probability_mean_and_arrays():
    stats = _planted_stats()
    assert stats.probability[1, 0, 3] == pytest.approx(0.95)
    assert stats.probability[0, 1, 7] == pytest.approx(0.9)
    # The mean pools every language's tokens.
    want = stats.total[:, 1, 20].sum() / 3500
    assert stats.mean().shape == (2, 50) and stats.mean()[1, 20] == pytest.approx(want)
    back = ActivationStats.from_arrays(stats.to_arrays())
    assert back.langs == stats.langs
    for name in ("n_tokens", "positive", "total", "n_texts"):
        assert np.array_equal(getattr(back, name), getattr(stats, name))


def test_folder_texts(tmp_path):
    (tmp_path / "en.txt").write_text("one\n\n two \n", encoding="utf-8")
    (tmp_path / "zh").mkdir()
    (tmp_path / "zh" / "a.txt").write_text("甲\n", encoding="utf-8")
    (tmp_path / "zh" / "b.txt").write_text("乙\n丙\n", encoding="utf-8")
    assert folder_texts(tmp_path, ["en", "zh"]) == {"en": ["one", "two"], "zh": ["甲", "乙", "丙"]}
    with pytest.raises(ConfigError, match="no text for fr"):
        folder_texts(tmp_path, ["en", "fr"])
    with pytest.raises(ConfigError, match="is not a folder"):
        folder_texts(tmp_path / "missing", ["en"])
    (tmp_path / "ja.txt").write_bytes(b"\xff\xfe\x00bad")
    with pytest.raises(ConfigError, match="UTF-8"):
        folder_texts(tmp_path, ["ja"])


# -- random control sets and ablation patches -------------------------------------------------


def test_random_like_keeps_per_layer_counts_and_excludes_the_units():
    units = np.array([3, 7, 12, 15, 16, 29])  # layers 0: 2, 1: 3, 2: 1 (10 units a layer)
    seen = set()
    for seed in range(30):
        got = random_like(units, 10, np.random.default_rng(seed), n_layers=3)
        assert np.all(np.diff(got) > 0)  # sorted, no repeats
        assert np.bincount(got // 10, minlength=3).tolist() == [2, 3, 1]
        assert not set(got.tolist()) & set(units.tolist())
        seen |= set(got.tolist())
    # Every other unit gets drawn sometimes: random, not a fixed choice.
    assert seen == set(range(30)) - set(units.tolist())
    a = random_like(units, 10, np.random.default_rng(5), 3)
    assert np.array_equal(a, random_like(units, 10, np.random.default_rng(5), 3))
    assert random_like(np.zeros(0, dtype=np.int64), 10, np.random.default_rng(0), 3).size == 0
    # A layer without enough other units gives what it has.
    assert random_like(np.array([0, 1, 2]), 4, np.random.default_rng(0), 1).tolist() == [3]


def _fake_adapter():
    return SimpleNamespace(d_mlp=6, info=SimpleNamespace(n_heads=3, d_head=2))


def test_unit_patches():
    adapter = _fake_adapter()
    patches = unit_patches(adapter, np.array([1, 4, 8]), "neuron")
    assert [p.site for p in patches] == ["mlp_post.0", "mlp_post.1"]
    assert patches[0].units.tolist() == [1, 4] and patches[1].units.tolist() == [2]
    assert all(isinstance(p, UnitPatch) and not p.values.any() for p in patches)
    mean = np.arange(12, dtype=float).reshape(2, 6) / 10
    patches = unit_patches(adapter, np.array([1, 4, 8]), "neuron", mode="mean", mean=mean)
    assert patches[0].values.tolist() == pytest.approx([0.1, 0.4])
    assert patches[1].values.tolist() == pytest.approx([0.8])
    # Heads: each head's d_head columns of attn_z, always zeroed.
    patches = unit_patches(adapter, np.array([0, 2, 4]), "head", mode="mean", mean=mean)
    assert [p.site for p in patches] == ["attn_z.0", "attn_z.1"]
    assert patches[0].units.tolist() == [0, 1, 4, 5] and patches[1].units.tolist() == [2, 3]
    assert not any(p.values.any() for p in patches)
    assert unit_patches(adapter, np.zeros(0, dtype=np.int64), "neuron") == []
    with pytest.raises(ConfigError, match="--ablation"):
        unit_patches(adapter, np.array([1]), "neuron", mode="half")
    with pytest.raises(ConfigError, match="mean activations"):
        unit_patches(adapter, np.array([1]), "neuron", mode="mean")


def test_unit_patch_validation():
    patch = UnitPatch.zero("mlp_post.0", [4, 1])
    assert patch.units.dtype == torch.long and patch.units.tolist() == [4, 1]
    assert patch.values.tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match=r"\[k\]"):
        UnitPatch("mlp_post.0", torch.tensor([1, 2]), torch.zeros(3))
    with pytest.raises(ValueError, match=r"\[k\]"):
        UnitPatch("mlp_post.0", torch.tensor([[1, 2]]), torch.zeros(1, 2))


# -- settings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"steps": 0}, "--steps"),
        ({"baseline": "one"}, "--baseline"),
        ({"positions": "first"}, "--positions"),
        ({"samples": 0}, "--samples"),
        ({"noise_scale": 0.0}, "--noise-scale"),
        ({"rule": "abs"}, "--rule"),
        ({"threshold": 0.0}, "--threshold"),
        ({"threshold": 1.0}, "--threshold"),
        ({"threshold": 2}, "--threshold"),
        ({"top_k": 0}, "--top-k"),
        ({"agreement": 0.0}, "--agreement"),
        ({"agreement": 1.5}, "--agreement"),
        ({"max_rows": -1}, "--max-rows"),
        ({"forms": "question,mcqa"}, "--forms"),
        ({"forms": ()}, "--forms"),
        ({"layers": "2,x"}, "--layers"),
    ],
)
def test_bad_attribution_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        AttributionConfig(**kwargs)


def test_attribution_config_layers_and_forms():
    assert AttributionConfig().check_layers(3) == (0, 1, 2)
    assert AttributionConfig(layers="").layers is None
    cfg = AttributionConfig(layers="2, 0,2", forms="cloze, question")
    assert cfg.layers == (2, 0, 2) and cfg.forms == ("cloze", "question")
    assert cfg.check_layers(3) == (0, 2)  # sorted, deduplicated
    for layers in ("0,3", "-1", (5,)):
        with pytest.raises(ConfigError, match=r"out of range for a model with 3 layers \(0..2\)"):
            AttributionConfig(layers=layers).check_layers(3)
    d = AttributionConfig(layers=[1]).to_dict()
    assert d["layers"] == [1] and d["forms"] == ["question", "cloze"] and d["steps"] == 20
    assert AttributionConfig(**{**d, "layers": "1"}) == AttributionConfig(layers=(1,))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"methods": "ig,xyz"}, "unknown xyz"),
        ({"methods": ""}, "--methods"),
        ({"min_rate": 0.0}, "--min-rate"),
        ({"min_rate": 1.5}, "--min-rate"),
        ({"min_facts": 0}, "--min-facts"),
        ({"text_tokens": 0}, "--text-tokens"),
        ({"ablation": "half"}, "--ablation"),
        ({"n_random": 0}, "--n-random"),
        ({"ablation_facts": -1}, "--ablation-facts"),
        ({"lape_top_rate": 1.0}, "--lape-top-rate"),
        ({"lape_filter_rate": 0.0}, "--lape-filter-rate"),
        ({"lape_bar_rate": 2.0}, "--lape-bar-rate"),
    ],
)
def test_bad_neuron_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        NeuronConfig(**kwargs)


def test_neuron_config_methods_and_dict():
    cfg = NeuronConfig(methods="lape, atp")
    assert cfg.methods == ("lape", "atp") and cfg.fact_methods == ("atp",)
    assert NeuronConfig().fact_methods == ("ig", "atp")
    d = cfg.to_dict()
    assert d["methods"] == ["lape", "atp"] and d["attribution"]["threshold"] == 0.2
    result = NeuronResult(("en",), 2, [], {"x": 1}, "/run", {"bar": float("nan")})
    assert result.to_dict()["lape"] == {"bar": None}  # NaN is written as null
    with pytest.raises(KeyError, match="no result for ig"):
        result.get("ig")


# -- registry and attribute_fact --------------------------------------------------------------


def test_registry_refuses_duplicates_and_unknown_names(monkeypatch):
    assert attribution_methods()[:3] == ("ig", "atp", "lape")
    assert get_attribution_method("ig").units == ("neuron",)
    assert get_attribution_method("atp").units == ("neuron", "head")
    with pytest.raises(ValueError, match="already registered"):
        register_attribution_method("ig", units=("neuron",), summary="again")(lambda *a: None)
    assert get_attribution_method("ig").fn is attr_mod.integrated_gradients
    with pytest.raises(ConfigError, match=r"unknown attribution method 'xyz'; choose from .*atp"):
        get_attribution_method("xyz")


def test_entries_declare_scope_and_needs():
    """The stage asks the entries what they need and what they cover, never their names."""
    ig, atp, lape_entry = (get_attribution_method(m) for m in ("ig", "atp", "lape"))
    assert (ig.scope, ig.needs, ig.per_fact) == ("fact", ("activation_stats",), True)
    assert (atp.scope, atp.needs, atp.per_fact) == ("fact", ("noise",), True)
    assert (lape_entry.scope, lape_entry.needs, lape_entry.units) == (
        "language",
        ("activation_stats",),
        ("neuron",),
    )
    assert not lape_entry.per_fact
    # LAPE's entry takes the statistics and the stage's config and returns its selection.
    stats = _planted_stats()
    config = NeuronConfig(lape_top_rate=0.03)
    found = lape_entry.fn(stats, config)
    same = lape(stats, top_rate=0.03, filter_rate=0.95, bar_rate=0.95)
    assert found.selected.tolist() == same.selected.tolist() and found.bar == same.bar
    assert set(found.to_arrays()) == {"selected", "assignment", "entropy"}
    assert found.info() == {"selected": len(same.selected), "bar": same.bar}
    # Bad declarations are programming errors.
    for kwargs in (
        {"units": ("neuron",), "scope": "corpus"},
        {"units": ("neuron",), "needs": ("gpu",)},
        {"units": ("synapse",)},
        {"units": ("neuron", "head"), "scope": "language"},
    ):
        with pytest.raises(ValueError, match="attribution method 'bad'"):
            register_attribution_method("bad", summary="", **kwargs)
    assert "bad" not in attribution_methods()


def test_scope_of_methods_in_config_and_summaries():
    cfg = NeuronConfig(methods="lape,ig,atp")
    assert cfg.fact_methods == ("ig", "atp")  # by scope, in order
    assert NeuronConfig().methods == ("ig", "atp", "lape")
    result = NeuronResult.from_dict(
        {
            "langs": ["en"],
            "n_layers": 1,
            "methods": [_saved_summary("ig"), _saved_summary("lape")],
        }
    )  # a summary.json as earlier runs wrote it (no scope saved)
    assert [m.per_fact for m in result.methods] == [True, False]
    assert "scope" not in result.methods[0].to_dict() and "per_fact" not in result.to_dict()


def _saved_summary(method: str) -> dict:
    return {
        "method": method,
        "unit": "neuron",
        "n_facts": {"en": 0},
        "set_size": {"en": None},
        "jaccard": [[None]],
        "overlap": [[None]],
        "n_pairs": [[0]],
        "counts": [],
        "ablation": [[None]],
        "ablation_random": [[None]],
        "check": {},
    }


def test_attribute_fact_with_a_registered_method(monkeypatch):
    """A new method plugs in through the registry; attribute_fact keeps the agreed units."""
    monkeypatch.setattr(attr_mod, "ATTRIBUTION_METHODS", attr_mod.ATTRIBUTION_METHODS.copy())
    table = {
        # per prompt: neuron scores [2 layers, 3 units] (flat indices 0..5)
        "q": np.array([[0.0, 1.0, 0.5], [0.1, 0.0, 0.9]]),  # important: 1, 2, 5
        "c": np.array([[0.0, 0.05, 0.6], [0.0, 0.0, 1.0]]),  # important: 2, 5
    }
    calls = []

    @register_attribution_method("fake", units=("neuron",), summary="a test double")
    def fake(adapter, prompt, config, context):
        calls.append(prompt.where)
        return Attribution("fake", {"neuron": table[prompt.where]}, 0.5, 2, (0, 1))

    assert "fake" in attribution_methods()
    prompts = [(form, AttributionPrompt(where, (1, 2), (0,), (3,))) for form, where in
               (("question", "q"), ("cloze", "c"))]  # fmt: skip
    context = AttributionContext(torch.Generator())
    fa = attribute_fact(None, "fake", prompts, AttributionConfig(), context)
    assert calls == ["q", "c"]
    assert fa.forms == ["question", "cloze"] and fa.p_answer == [0.5, 0.5] and fa.passes == 4
    assert fa.scores["neuron"].shape == (2, 2, 3)
    assert fa.sets["neuron"].tolist() == [2, 5]  # 0.7 of two prompts: both
    fa = attribute_fact(None, "fake", prompts, AttributionConfig(agreement=0.5), context)
    assert fa.sets["neuron"].tolist() == [1, 2, 5]
    with pytest.raises(ConfigError, match="unknown attribution method"):
        attribute_fact(None, "nope", prompts, AttributionConfig(), context)
    with pytest.raises(ConfigError, match="lape is not a per-fact attribution method"):
        attribute_fact(None, "lape", prompts, AttributionConfig(), context)
    assert "fake" not in NeuronConfig().methods  # the default: the built-in methods


def test_fact_attribution_round_trip(tmp_path):
    fa = FactAttribution(
        method="atp",
        forms=["question", "cloze"],
        p_answer=[0.25, 0.5],
        scores={"neuron": np.arange(12.0).reshape(2, 2, 3), "head": -np.ones((2, 2, 4))},
        sets={"neuron": np.array([1, 4]), "head": np.zeros(0, dtype=np.int64)},
        passes=6,
    )
    path = tmp_path / "fa.npz"
    np.savez(path, **fa.to_arrays())
    with np.load(path, allow_pickle=False) as data:  # no pickled objects
        back = FactAttribution.from_arrays(dict(data))
    assert (back.method, back.forms, back.p_answer, back.passes) == (
        "atp",
        ["question", "cloze"],
        [0.25, 0.5],
        6,
    )
    assert set(back.scores) == {"neuron", "head"}
    assert back.scores["neuron"].dtype == np.float32
    assert np.array_equal(back.scores["neuron"], fa.scores["neuron"])
    assert back.sets["neuron"].tolist() == [1, 4] and back.sets["head"].dtype == np.int64
    assert back.sets["head"].size == 0


def test_attribution_prompt_needs_prompt_and_answer():
    with pytest.raises(ConfigError, match="empty prompt or answer"):
        AttributionPrompt("fact 1 [en]", (1, 2), (0,), ())
    with pytest.raises(ConfigError, match="empty prompt or answer"):
        AttributionPrompt("fact 1 [en]", (), (), (3,))


def test_answer_probability_in_half_precision():
    from analysis.neurons.attribution import answer_probability

    logits = torch.zeros(2, 3, 5, dtype=torch.float16)
    logits[1, 2, 4] = 20.0  # row 1: the second answer token is certain
    prompt = SimpleNamespace(prompt_ids=(1, 2), answer_ids=(3, 4))
    p = answer_probability(logits, prompt)
    assert p.dtype == torch.float32
    assert p.tolist() == pytest.approx([1 / 25, 1 / 5], rel=1e-4)
