"""Planted activations with a known answer, shared by the probe tests."""

from __future__ import annotations

import numpy as np

from probes.activations import Activations
from probes.config import ProbeConfig

LANGS = ("en", "zh", "ja", "fr", "de")

#: Small grids and few folds: the tests are about the statistics, not the search.
FAST = ProbeConfig(folds=4, inner_folds=2, cs=(0.01, 0.1, 1.0), alphas=(1.0, 10.0, 100.0))


def rotation(d: int, rng: np.random.Generator) -> np.ndarray:
    """A random orthogonal matrix ``[d, d]``."""
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))


def planted(
    *,
    n_classes: int = 4,
    per_class: int = 24,
    d: int = 16,
    langs: tuple[str, ...] = LANGS,
    class_signal: float = 3.0,
    fact_signal: float = 0.0,
    lang_offset: float = 5.0,
    shared: bool = True,
    noise: float = 1.0,
    seed: int = 0,
) -> tuple[Activations, dict[int, str]]:
    """Gaussian activations of ``n_classes * per_class`` facts in every language, at two layers
    and both positions.

    Layer 0 carries nothing but noise.  Layer 1 is, for fact ``f`` of class ``c`` in language
    ``l``: ``lang_offset * o_l + class_signal * m_c + fact_signal * u_f + noise``, where ``o_l``,
    ``m_c`` and ``u_f`` are random unit-variance directions; ``m_c`` and ``u_f`` are the same in
    every language when ``shared``, and rotated by a random orthogonal map per language
    otherwise (the information is there in each language, written differently).

    Returns:
        The activations and ``{fact_id: class}``.
    """
    rng = np.random.default_rng(seed)
    n = n_classes * per_class
    classes = {f: f"class{f % n_classes}" for f in range(n)}
    means = rng.normal(size=(n_classes, d))
    facts = rng.normal(size=(n, d))
    offsets = rng.normal(size=(len(langs), d))
    rows_x0, rows_x1, fact_ids, lang_ids = [], [], [], []
    for i, lang in enumerate(langs):
        rot = np.eye(d) if shared else rotation(d, rng)
        signal = class_signal * means[np.arange(n) % n_classes] + fact_signal * facts
        x1 = lang_offset * offsets[i] + signal @ rot + noise * rng.normal(size=(n, d))
        rows_x1.append(x1)
        rows_x0.append(noise * rng.normal(size=(n, d)))
        fact_ids.append(np.arange(n))
        lang_ids += [lang] * n
    x0 = np.concatenate(rows_x0).astype(np.float32)
    x1 = np.concatenate(rows_x1).astype(np.float32)
    values = np.stack([x0, x1])
    acts = Activations(
        sites=("resid_pre.0", "resid_post.0"),
        fact_ids=np.concatenate(fact_ids),
        langs=np.array(lang_ids),
        values={"subject": values, "last": values.copy()},
        tokens={
            "subject": np.zeros(len(lang_ids), dtype=np.int64),
            "last": np.zeros(len(lang_ids), dtype=np.int64),
        },
    )
    return acts, classes
