"""Language-specific versus shared units: overlap of important sets and classification.

Overlap: for one fact, the important sets ``A`` and ``B`` of two languages (flat unit indices
``layer * n_units + unit``) give the Jaccard index ``|A & B| / |A | B|`` and the overlap
coefficient ``|A & B| / min(|A|, |B|)``, in total and per layer (units of that layer only).
Both are undefined (NaN) when a set is empty; averages skip NaN and report how many pairs
entered.  The language x language matrices average over facts the model knows in both languages.

Classification: a unit is *used* by a language when it is in the important sets of at least
``min_facts`` of that language's attributed facts and of at least ``min_rate`` of them.  A unit
used by exactly one language is *specific* to it; used by two or more, *shared*; by none,
*neither*.  For LAPE the assignment of each selected neuron to languages plays the role of
"used" (:func:`classes_from_assignment`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlake_core.errors import ConfigError


def set_overlap(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Jaccard index and overlap coefficient of two unit sets (NaN when either is empty)."""
    if len(a) == 0 or len(b) == 0:
        return float("nan"), float("nan")
    inter = len(np.intersect1d(a, b, assume_unique=True))
    union = len(a) + len(b) - inter
    return inter / union, inter / min(len(a), len(b))


def pair_rows(
    sets: Mapping[str, np.ndarray],
    langs: Sequence[str],
    n_layers: int,
    n_units: int,
) -> list[dict[str, Any]]:
    """Overlap of one fact's sets for every unordered pair of languages that have a set.

    Args:
        sets: important set per language (languages where the fact was not attributed are
            absent).
        langs: language order (pairs are ``(a, b)`` with ``a`` before ``b``).
        n_layers: layers of the model.
        n_units: units per layer.

    Returns:
        One row per pair: sizes, intersection, ``jaccard`` and ``overlap`` in total and per
        layer (``jaccard_L{l}``, ``overlap_L{l}``).
    """
    rows = []
    present = [lang for lang in langs if lang in sets]
    for i, a in enumerate(present):
        for b in present[i + 1 :]:
            sa, sb = np.asarray(sets[a]), np.asarray(sets[b])
            jac, ovl = set_overlap(sa, sb)
            row: dict[str, Any] = {
                "lang_a": a,
                "lang_b": b,
                "size_a": len(sa),
                "size_b": len(sb),
                "intersection": len(np.intersect1d(sa, sb)),
                "jaccard": jac,
                "overlap": ovl,
            }
            for layer in range(n_layers):
                la = sa[sa // n_units == layer]
                lb = sb[sb // n_units == layer]
                row[f"jaccard_L{layer}"], row[f"overlap_L{layer}"] = set_overlap(la, lb)
            rows.append(row)
    return rows


def overlap_matrix(table: Any, langs: Sequence[str], column: str = "jaccard") -> np.ndarray:
    """Mean of ``column`` over facts per language pair, as a symmetric ``[n, n]`` matrix
    (diagonal 1, NaN where no fact has sets in both languages)."""
    n = len(langs)
    out = np.full((n, n), np.nan)
    for i in range(n):
        out[i, i] = 1.0
    if table is None or len(table) == 0:
        return out
    index = {lang: i for i, lang in enumerate(langs)}
    means = table.groupby(["lang_a", "lang_b"])[column].mean()
    for (a, b), value in means.items():
        if a in index and b in index:
            out[index[a], index[b]] = out[index[b], index[a]] = value
    return out


@dataclass
class UnitClasses:
    """Which languages use each unit, and the classes that follow.

    Attributes:
        langs: languages, in order.
        n_layers: layers.
        n_units: units per layer.
        used: ``[n_langs, n_layers * n_units]`` bool.
        rate: ``[n_langs, n_layers * n_units]`` fraction of the language's facts whose set
            holds the unit (NaN for LAPE).
    """

    langs: tuple[str, ...]
    n_layers: int
    n_units: int
    used: np.ndarray
    rate: np.ndarray

    @property
    def n_used(self) -> np.ndarray:
        return self.used.sum(0)

    def specific_sets(self) -> dict[str, np.ndarray]:
        """Per language, the units specific to it (flat indices)."""
        only = self.n_used == 1
        return {lang: np.flatnonzero(only & self.used[i]) for i, lang in enumerate(self.langs)}

    def shared_units(self) -> np.ndarray:
        """Units used by two or more languages."""
        return np.flatnonzero(self.n_used >= 2)

    def counts(self) -> list[dict[str, Any]]:
        """Per layer: units specific to each language, shared, and neither."""
        layer_of = np.arange(self.n_layers * self.n_units) // self.n_units
        rows = []
        for layer in range(self.n_layers):
            here = layer_of == layer
            row: dict[str, Any] = {"layer": layer}
            for i, lang in enumerate(self.langs):
                row[f"specific_{lang}"] = int((here & (self.n_used == 1) & self.used[i]).sum())
            row["shared"] = int((here & (self.n_used >= 2)).sum())
            row["neither"] = int((here & (self.n_used == 0)).sum())
            rows.append(row)
        return rows


def classify_units(
    sets: Mapping[str, Sequence[np.ndarray]],
    langs: Sequence[str],
    n_layers: int,
    n_units: int,
    *,
    min_rate: float = 0.05,
    min_facts: int = 2,
) -> UnitClasses:
    """Classify units from each language's per-fact important sets (module docstring).

    Args:
        sets: per language, the important set of each attributed fact.
        langs: language order.
        n_layers: layers.
        n_units: units per layer.
        min_rate: fraction of a language's facts a unit must be important for.
        min_facts: and at least this many facts.
    """
    if not 0 < min_rate <= 1 or min_facts < 1:
        raise ConfigError(
            f"--min-rate {min_rate} must be in (0, 1] and --min-facts {min_facts} at least 1"
        )
    size = n_layers * n_units
    used = np.zeros((len(langs), size), dtype=bool)
    rate = np.zeros((len(langs), size))
    for i, lang in enumerate(langs):
        fact_sets = list(sets.get(lang, []))
        if not fact_sets:
            continue
        count = np.zeros(size, dtype=np.int64)
        for s in fact_sets:
            count[np.asarray(s, dtype=np.int64)] += 1
        rate[i] = count / len(fact_sets)
        used[i] = (count >= min_facts) & (rate[i] >= min_rate)
    return UnitClasses(tuple(langs), n_layers, n_units, used, rate)


def classes_from_assignment(
    selected: np.ndarray, assignment: np.ndarray, langs: Sequence[str], n_layers: int, n_units: int
) -> UnitClasses:
    """Unit classes from LAPE's assignment of selected neurons to languages."""
    used = np.zeros((len(langs), n_layers * n_units), dtype=bool)
    for i in range(len(langs)):
        used[i, selected[assignment[:, i]]] = True
    return UnitClasses(tuple(langs), n_layers, n_units, used, np.full(used.shape, np.nan))
