"""What every probe shares: folds by fact, a linear probe whose regularisation is chosen by
cross-validation, control labels and balanced accuracy.

Honest probing, as this package does it:

* **Split by fact.**  Every example of a fact (its five languages) is in the same fold, so a
  probe is always scored on facts it never saw in any language.  A fact's subject is often the
  same string in English, French and German; a split by example would let the probe recognise
  the subject instead of decoding the property asked about.
* **Regularisation by cross-validation, on training facts only.**  The probe is a pipeline of
  a :class:`~sklearn.preprocessing.StandardScaler` and an L2
  :class:`~sklearn.linear_model.LogisticRegression` (classes weighted to balance them); its
  inverse regularisation ``C`` is chosen from a grid by an inner cross-validation whose folds are
  again whole facts (:class:`~sklearn.model_selection.GridSearchCV`, the scaler refitted in
  each inner fold).  The test facts take no part in the choice.
* **Control tasks** (Hewitt & Liang 2019, "Designing and interpreting probes with control
  tasks"): the same pipeline, the same folds, trained and scored on control labels that keep
  the label distribution but are a random function of the example's *type*; *selectivity* is
  accuracy minus control accuracy.  Here the type is the fact (see :func:`control_by_fact` and
  :func:`control_within_fact`).  Because test facts are unseen, a probe cannot memorise their
  control labels: control accuracy measures what the pipeline reaches from the label
  distribution alone (class imbalance, small test folds), and a control accuracy well above
  chance would reveal leakage across the split.
* **Balanced accuracy** (mean recall over the classes present), so that chance is
  ``1 / n_classes`` whatever the class sizes; plain accuracy is kept beside it.
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np


def fact_folds(
    fact_ids: Sequence[int] | np.ndarray,
    n_folds: int,
    seed: int,
    strata: Mapping[int, Hashable] | None = None,
) -> dict[int, int]:
    """Assign each fact to one of ``n_folds`` folds, at random (seeded).

    With ``strata`` (a class per fact), the facts of each class are shuffled and dealt round
    the folds in turn, continuing where the previous class stopped, so every fold holds a
    share of every class and the fold sizes differ by at most one.

    Returns:
        ``{fact_id: fold}``.

    Raises:
        ValueError: fewer facts than folds, or fewer than two folds.
    """
    facts = sorted({int(f) for f in fact_ids})
    if n_folds < 2:
        raise ValueError(f"{n_folds} folds: need at least 2")
    if len(facts) < n_folds:
        raise ValueError(f"{len(facts)} facts cannot be split into {n_folds} folds")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for f in facts:
        groups.setdefault(repr(strata[f]) if strata is not None else "", []).append(f)
    out: dict[int, int] = {}
    dealt = int(rng.integers(n_folds))
    for name in sorted(groups):
        members = [groups[name][i] for i in rng.permutation(len(groups[name]))]
        for f in members:
            out[f] = dealt % n_folds
            dealt += 1
    return out


def split_indices(fold_of: np.ndarray, n_folds: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(train, test)`` row indices of each fold, given each row's fold."""
    return [
        (np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k))
        for k in range(n_folds)
        if np.any(fold_of == k)
    ]


def fit_probe(
    X: np.ndarray,
    y: np.ndarray,
    groups: np.ndarray,
    *,
    cs: Sequence[float],
    inner_folds: int,
    max_iter: int,
    seed: int,
    stratify: bool = False,
) -> tuple[Any, float]:
    """Fit a standardised L2 logistic-regression probe, ``C`` chosen by inner
    cross-validation over whole groups (facts).

    Args:
        X: ``[n, d]`` features.
        y: ``[n]`` labels.
        groups: ``[n]`` the fact of each row; inner folds never split a fact.
        cs: the grid of inverse regularisation strengths (ties go to the first, so list them
            from strongest regularisation up).
        inner_folds: folds of the inner cross-validation (fewer when there are fewer facts).
        stratify: deal each label's facts evenly over the inner folds (when a fact has one
            label, as in the answer task).

    Returns:
        The fitted pipeline and the chosen ``C``.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GridSearchCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    pipe = make_pipeline(
        StandardScaler(),
        LogisticRegression(max_iter=max_iter, class_weight="balanced"),
    )
    unique = np.unique(groups)
    k = min(inner_folds, len(unique))
    if len(cs) == 1 or k < 2:
        pipe.set_params(logisticregression__C=float(cs[0]))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pipe.fit(X, y)
        return pipe, float(cs[0])
    strata = None
    if stratify:
        label = {int(g): y[i] for i, g in enumerate(groups)}
        strata = {g: label[g] for g in label}
    folds = fact_folds(unique, k, seed, strata)
    inner = split_indices(np.array([folds[int(g)] for g in groups]), k)
    search = GridSearchCV(
        pipe,
        {"logisticregression__C": [float(c) for c in cs]},
        cv=inner,
        scoring="balanced_accuracy",
        refit=True,
        error_score=np.nan,
    )
    with warnings.catch_warnings():
        # Inner folds may miss a rare class (balanced accuracy then averages the classes
        # present) and lbfgs may stop at max_iter on separable data; neither is an error here.
        warnings.simplefilter("ignore")
        search.fit(X, y)
    return search.best_estimator_, float(search.best_params_["logisticregression__C"])


def balanced_accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Mean recall over the classes present in ``y_true`` (NaN when there are no rows)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    recalls = [float(np.mean(y_pred[y_true == c] == c)) for c in np.unique(y_true)]
    return float(np.mean(recalls))


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Share of rows predicted right (NaN when there are none)."""
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    return float(np.mean(y_true == y_pred)) if len(y_true) else float("nan")


def control_by_fact(labels: Mapping[int, Hashable], seed: int) -> dict[int, Hashable]:
    """Control labels for a task with one label per fact (the answer task): the labels
    permuted over the facts (seeded).  Every language of a fact gets the same control label,
    and each label keeps its number of facts."""
    facts = sorted(labels)
    perm = np.random.default_rng(seed).permutation(len(facts))
    return {f: labels[facts[int(p)]] for f, p in zip(facts, perm, strict=True)}


def control_within_fact(y: np.ndarray, groups: np.ndarray, seed: int) -> np.ndarray:
    """Control labels for a task whose labels vary within a fact (language identity): each
    fact's labels permuted among its own rows (seeded), so each fact keeps one row per label
    but the labels no longer follow the rows' languages."""
    rng = np.random.default_rng(seed)
    out = np.array(y, copy=True)
    for g in np.unique(groups):
        rows = np.flatnonzero(groups == g)
        out[rows] = y[rows[rng.permutation(len(rows))]]
    return out
