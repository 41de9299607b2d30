"""Representation similarity of the same facts across languages, per layer and position.

For languages A and B, take the facts usable in both and stack their activations in the same
order: ``X`` (A) and ``Y`` (B), ``[n_facts, d]``.  Three measures, none learned:

* **Linear CKA** (centred kernel alignment; Kornblith et al. 2019, "Similarity of neural
  network representations revisited"): ``||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F)`` on
  column-centred ``X`` and ``Y``.  It compares the *geometry* of the facts in the two
  languages (which facts lie close to which), is invariant to rotations and isotropic scaling,
  and is 1 for identical representations.  Its plain estimate is biased upward when the
  width ``d`` is not small against ``n``: two *independent* random representations with
  ``d ~ n`` score around 0.5.  The headline value is therefore the **debiased** estimate (the
  unbiased HSIC estimator of Song et al. 2012 in place of the plain one, as in Nguyen, Raghu &
  Kornblith 2021), which is near 0 for independent representations; the plain one is kept as
  ``cka_biased``.
* **Same-fact cosine**: the mean cosine between a fact's A and B activations (``cos_same``),
  against the mean cosine between different facts' (``cos_diff``).  Each language is first
  centred on its own mean over the facts: raw residual streams share a large common
  direction (and a language offset) that makes every pair of vectors look alike.
* **Nearest-neighbour retrieval** without any map (``nn_accuracy``): the share of facts whose
  own B activation is the nearest (centred cosine) to their A activation, among all ``n``
  (chance ``1 / n``); compare with the learned map of :func:`probes.crosslingual.fact_retrieval`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from probes.activations import Activations


def _unbiased_dot(
    xty: float, rows_x: np.ndarray, rows_y: np.ndarray, norm_x: float, norm_y: float, n: int
) -> float:
    """``n (n - 3)`` times the unbiased HSIC estimate of two linear kernels, written in
    feature space (the helper of Kornblith's CKA notebook)."""
    return xty - n / (n - 2.0) * float(rows_x @ rows_y) + norm_x * norm_y / ((n - 1) * (n - 2))


def linear_cka(X: np.ndarray, Y: np.ndarray, *, debiased: bool = True) -> float:
    """Linear CKA between two representations of the same ``n`` examples.

    Args:
        X: ``[n, d1]``.
        Y: ``[n, d2]``.
        debiased: use the unbiased HSIC estimator (needs ``n >= 4``).

    Returns:
        CKA in ``[0, 1]`` for the plain estimate; the debiased estimate can be slightly
        negative for unrelated representations.  NaN when either is constant.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if X.ndim != 2 or Y.ndim != 2 or X.shape[0] != Y.shape[0]:
        raise ValueError(f"linear_cka: X {X.shape} and Y {Y.shape} must be [n, d] with one n")
    n = X.shape[0]
    if debiased and n < 4:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    X = X - X.mean(axis=0, keepdims=True)
    Y = Y - Y.mean(axis=0, keepdims=True)
    xty = float(np.linalg.norm(Y.T @ X) ** 2)
    xtx = float(np.linalg.norm(X.T @ X))
    yty = float(np.linalg.norm(Y.T @ Y))
    if debiased:
        rows_x = np.einsum("ij,ij->i", X, X)
        rows_y = np.einsum("ij,ij->i", Y, Y)
        nx, ny = float(rows_x.sum()), float(rows_y.sum())
        xty = _unbiased_dot(xty, rows_x, rows_y, nx, ny, n)
        sx = _unbiased_dot(xtx**2, rows_x, rows_x, nx, nx, n)
        sy = _unbiased_dot(yty**2, rows_y, rows_y, ny, ny, n)
        if sx <= 0 or sy <= 0:
            return float("nan")
        return xty / np.sqrt(sx * sy)
    if xtx == 0 or yty == 0:
        return float("nan")
    return xty / (xtx * yty)


def _unit_rows(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def cosine_same_vs_different(X: np.ndarray, Y: np.ndarray) -> tuple[float, float]:
    """Mean cosine of the same example in ``X`` and ``Y`` (row ``i`` with row ``i``) and of
    different examples (row ``i`` with row ``j != i``), each matrix centred on its own mean.

    Returns:
        ``(cos_same, cos_diff)``.
    """
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    n = X.shape[0]
    if n < 2:
        raise ValueError("cosine_same_vs_different needs at least 2 examples")
    sims = _unit_rows(X - X.mean(axis=0)) @ _unit_rows(Y - Y.mean(axis=0)).T
    same = float(np.trace(sims) / n)
    diff = float((sims.sum() - np.trace(sims)) / (n * (n - 1)))
    return same, diff


def nearest_neighbour_accuracy(X: np.ndarray, Y: np.ndarray) -> float:
    """Share of rows ``i`` of ``X`` whose nearest row of ``Y`` (cosine, each centred) is row
    ``i``."""
    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    sims = _unit_rows(X - X.mean(axis=0)) @ _unit_rows(Y - Y.mean(axis=0)).T
    return float(np.mean(np.argmax(sims, axis=1) == np.arange(len(X))))


def pair_similarity(X: np.ndarray, Y: np.ndarray) -> dict[str, float]:
    """Every measure for one pair of languages (rows: the same facts in the same order)."""
    same, diff = cosine_same_vs_different(X, Y)
    n = X.shape[0]
    return {
        "cka": linear_cka(X, Y, debiased=True) if n >= 4 else float("nan"),
        "cka_biased": linear_cka(X, Y, debiased=False),
        "cos_same": same,
        "cos_diff": diff,
        "nn_accuracy": nearest_neighbour_accuracy(X, Y),
        "nn_chance": 1.0 / n,
        "n_facts": n,
    }


def similarity_table(acts: Activations) -> Any:
    """:func:`pair_similarity` for every ordered pair of languages, at every position and layer.

    Returns:
        A pandas DataFrame, one row per (position, layer, lang_a, lang_b) (both orders, the
        diagonal included; only ``nn_accuracy`` differs between the orders): ``position``,
        ``layer``, ``site``, ``lang_a``, ``lang_b`` and the measures.
    """
    import pandas as pd

    rows = []
    for position in acts.positions:
        for layer, site in enumerate(acts.sites):
            by_lang = acts.by_lang(position, layer)
            for a, (ids_a, Xa) in by_lang.items():
                for b, (ids_b, Xb) in by_lang.items():
                    common = np.intersect1d(ids_a, ids_b)
                    where = {"position": position, "layer": layer, "site": site}
                    if len(common) < 2:
                        rows.append({**where, "lang_a": a, "lang_b": b, "n_facts": len(common)})
                        continue
                    X = Xa[np.searchsorted(ids_a, common)]
                    Y = Xb[np.searchsorted(ids_b, common)]
                    rows.append({**where, "lang_a": a, "lang_b": b, **pair_similarity(X, Y)})
    return pd.DataFrame.from_records(rows)
