"""The probes' statistics on synthetic data with a known answer: CKA (against the unbiased
HSIC estimator written with Gram matrices), cosines and retrieval by hand, balanced accuracy,
folds and control labels."""

from __future__ import annotations

import numpy as np
import pytest

from probes.linear import (
    balanced_accuracy,
    control_by_fact,
    control_within_fact,
    fact_folds,
    fit_probe,
)
from probes.similarity import (
    cosine_same_vs_different,
    linear_cka,
    nearest_neighbour_accuracy,
    pair_similarity,
)
from tests.probes.helpers import rotation


def _hsic_unbiased(K: np.ndarray, L: np.ndarray) -> float:
    """Song et al. (2012), eq. 5, from Gram matrices (the reference)."""
    n = K.shape[0]
    K, L = K.copy(), L.copy()
    np.fill_diagonal(K, 0.0)
    np.fill_diagonal(L, 0.0)
    one = np.ones(n)
    return float(
        (
            np.trace(K @ L)
            + (one @ K @ one) * (one @ L @ one) / ((n - 1) * (n - 2))
            - 2.0 / (n - 2) * (one @ K @ L @ one)
        )
        / (n * (n - 3))
    )


def _cka_reference(X: np.ndarray, Y: np.ndarray) -> float:
    K, L = X @ X.T, Y @ Y.T
    return _hsic_unbiased(K, L) / np.sqrt(_hsic_unbiased(K, K) * _hsic_unbiased(L, L))


@pytest.mark.parametrize(("n", "d"), [(40, 8), (100, 100), (150, 200)])
def test_cka_identical_and_rotated_is_one(n, d):
    rng = np.random.default_rng(n)
    X = rng.normal(size=(n, d))
    Y = 2.5 * X @ rotation(d, rng) + 7.0  # rotation, isotropic scale, shift
    for debiased in (True, False):
        assert linear_cka(X, X, debiased=debiased) == pytest.approx(1.0, abs=1e-9)
        assert linear_cka(X, Y, debiased=debiased) == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize(("n", "d"), [(40, 8), (100, 100), (150, 200)])
def test_cka_debiased_matches_unbiased_hsic(n, d):
    rng = np.random.default_rng(d)
    X = rng.normal(size=(n, d))
    Y = 0.3 * X[:, ::-1] + rng.normal(size=(n, d))
    assert linear_cka(X, Y) == pytest.approx(_cka_reference(X, Y), abs=1e-10)


def test_cka_independent_is_near_zero_debiased_not_biased():
    """Independent representations as wide as the sample: the plain estimate is about 0.5,
    the debiased one near 0 (why the headline is the debiased one)."""
    rng = np.random.default_rng(1)
    debiased, biased = [], []
    for _ in range(10):
        X, Y = rng.normal(size=(120, 120)), rng.normal(size=(120, 120))
        debiased.append(linear_cka(X, Y))
        biased.append(linear_cka(X, Y, debiased=False))
    assert abs(np.mean(debiased)) < 0.01
    assert max(abs(v) for v in debiased) < 0.05
    assert 0.4 < np.mean(biased) < 0.6


def test_cka_hand_case_and_errors():
    # Two 1-d representations: linear CKA is the squared Pearson correlation.
    x = np.array([[1.0], [2.0], [3.0], [5.0]])
    y = np.array([[2.0], [1.0], [4.0], [4.0]])
    r = np.corrcoef(x[:, 0], y[:, 0])[0, 1]
    assert linear_cka(x, y, debiased=False) == pytest.approx(r**2)
    with pytest.raises(ValueError, match="at least 4"):
        linear_cka(x[:3], y[:3])
    with pytest.raises(ValueError, match="one n"):
        linear_cka(x, y[:3])
    assert np.isnan(linear_cka(np.ones((5, 2)), x.repeat(2, axis=0)[:5], debiased=False))


def test_cosine_same_vs_different_by_hand():
    # Centred rows of X: (1,0), (-1,0), (0,1), (0,-1); Y is X with rows 2 and 3 swapped.
    X = np.array([[1.0, 0], [-1, 0], [0, 1], [0, -1]]) + 3.0
    Y = np.array([[1.0, 0], [-1, 0], [0, -1], [0, 1]]) - 1.0
    same, diff = cosine_same_vs_different(X, Y)
    # Same rows: cos 1, 1, -1, -1 -> 0.  Different rows: the 12 cosines sum to 0 - 0 = 0.
    assert same == pytest.approx(0.0)
    assert diff == pytest.approx(0.0)
    same, diff = cosine_same_vs_different(X, X)
    assert same == pytest.approx(1.0)
    # Off-diagonal cosines: -1 twice per pair of opposite rows (4 of 12), 0 otherwise.
    assert diff == pytest.approx(-4 / 12)


def test_retrieval_and_pair_similarity_planted():
    rng = np.random.default_rng(3)
    X = rng.normal(size=(60, 32))
    Y = X @ rotation(32, rng) + 0.05 * rng.normal(size=(60, 32))
    # A rotation moves every vector: without a map, nearest neighbours are chance-like.
    assert nearest_neighbour_accuracy(X, Y) < 0.2
    assert nearest_neighbour_accuracy(X, X + 0.05 * rng.normal(size=X.shape)) == 1.0
    sims = pair_similarity(X, Y)
    assert sims["cka"] == pytest.approx(1.0, abs=0.01)
    assert sims["nn_chance"] == pytest.approx(1 / 60)
    assert sims["n_facts"] == 60


def test_balanced_accuracy_by_hand():
    y = np.array(["a", "a", "a", "a", "b"])
    assert balanced_accuracy(y, np.array(["a"] * 5)) == pytest.approx(0.5)
    assert balanced_accuracy(y, np.array(["a", "a", "b", "b", "b"])) == pytest.approx(0.75)
    assert np.isnan(balanced_accuracy(np.array([]), np.array([])))


def test_fact_folds_stratified_and_deterministic():
    strata = {f: f % 3 for f in range(31)}
    folds = fact_folds(list(strata), 4, seed=5, strata=strata)
    assert folds == fact_folds(list(reversed(list(strata))), 4, seed=5, strata=strata)
    assert folds != fact_folds(list(strata), 4, seed=6, strata=strata)
    sizes = np.bincount(list(folds.values()), minlength=4)
    assert sizes.max() - sizes.min() <= 1
    for c in range(3):
        per_fold = np.bincount([folds[f] for f in strata if strata[f] == c], minlength=4)
        assert per_fold.max() - per_fold.min() <= 1
    with pytest.raises(ValueError, match="cannot be split"):
        fact_folds([1, 2], 3, seed=0)
    with pytest.raises(ValueError, match="at least 2"):
        fact_folds([1, 2], 1, seed=0)


def test_control_labels_keep_distribution():
    labels = {f: "ab"[f % 2] if f < 10 else "c" for f in range(16)}
    control = control_by_fact(labels, seed=0)
    assert sorted(control.values()) == sorted(labels.values())
    assert control != labels
    assert control == control_by_fact(labels, seed=0)

    groups = np.repeat(np.arange(20), 5)
    y = np.tile(np.array(["en", "zh", "ja", "fr", "de"]), 20)
    shuffled = control_within_fact(y, groups, seed=1)
    for g in range(20):
        assert sorted(shuffled[groups == g]) == sorted(y[groups == g])
    assert np.mean(shuffled == y) < 0.5


def test_fit_probe_generalises_and_uses_its_grid():
    rng = np.random.default_rng(0)
    y = np.array(["a", "b"] * 60)
    X = rng.normal(size=(120, 20))
    X[:, 0] += np.where(y == "a", 2.0, -2.0)
    train, test = np.arange(80), np.arange(80, 120)
    grid = (1e-3, 1e-2, 1e-1, 1.0)
    probe, c = fit_probe(
        X[train], y[train], train, cs=grid, inner_folds=3, max_iter=500, seed=0, stratify=True
    )
    assert c in grid
    assert np.mean(probe.predict(X[test]) == y[test]) > 0.85
    again, c_again = fit_probe(
        X[train], y[train], train, cs=grid, inner_folds=3, max_iter=500, seed=0, stratify=True
    )
    assert c_again == c
    assert np.array_equal(again.predict(X), probe.predict(X))
    _, c = fit_probe(X, y, np.arange(120), cs=(5.0,), inner_folds=3, max_iter=500, seed=0)
    assert c == 5.0
