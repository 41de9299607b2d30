"""Language-identity probe: which language is this prompt in, read off one layer's residual
stream at one position.

Examples are the (fact, language) question prompts; the label is the language.  The folds are
whole facts (:func:`probes.linear.fact_folds`): a test fact's prompts are unseen in every
language.  The control task (Hewitt & Liang 2019) permutes the language labels among each
fact's own prompts (:func:`probes.linear.control_within_fact`), the same permutation at every
layer and position; selectivity is accuracy minus control accuracy.  Chance is
``1 / n_languages`` (balanced accuracy).

Two points of reference come for free.  At the embeddings (layer 0), the last token of every
``qa`` prompt is the same token (``:``), and rotary models add no position to the residual
stream, so the probe is at chance there by construction; the subject's last token is often the
same string in English, French and German, so layer 0 shows how far the token alone tells the
language.  Later layers show how much the context has written the language into the stream.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from probes.activations import Activations
from probes.linear import (
    accuracy,
    balanced_accuracy,
    control_within_fact,
    fact_folds,
    fit_probe,
    split_indices,
)


def language_id_scores(
    X: np.ndarray,
    langs: np.ndarray,
    facts: np.ndarray,
    folds: dict[int, int],
    config: Any,
) -> dict[str, Any]:
    """Cross-validated language identification from one layer at one position.

    Args:
        X: ``[n, d]`` activations.
        langs: ``[n]`` each row's language (the label).
        facts: ``[n]`` each row's fact (the unit of the folds).
        folds: ``{fact_id: fold}`` (:func:`probes.linear.fact_folds`).
        config: a :class:`~probes.config.ProbeConfig` (``cs``, ``inner_folds``, ``max_iter``,
            ``seed``).

    Returns:
        ``accuracy`` (balanced, pooled over the held-out folds), ``plain_accuracy``,
        ``control`` (balanced accuracy of the control task), ``selectivity``, ``chance``,
        ``recall`` per language, ``C`` (median chosen), ``n`` (rows).
    """
    langs = np.asarray(langs, dtype=str)
    facts = np.asarray(facts)
    fold_of = np.array([folds[int(f)] for f in facts])
    n_folds = int(fold_of.max()) + 1
    control = control_within_fact(langs, facts, config.seed)
    predicted = np.empty(len(langs), dtype=langs.dtype)
    predicted_control = np.empty(len(langs), dtype=langs.dtype)
    chosen = []
    for k, (train, test) in enumerate(split_indices(fold_of, n_folds)):
        for labels, out in ((langs, predicted), (control, predicted_control)):
            probe, c = fit_probe(
                X[train],
                labels[train],
                facts[train],
                cs=config.cs,
                inner_folds=config.inner_folds,
                max_iter=config.max_iter,
                seed=config.seed + k,
            )
            out[test] = probe.predict(X[test])
            if labels is langs:
                chosen.append(c)
    acc = balanced_accuracy(langs, predicted)
    ctrl = balanced_accuracy(control, predicted_control)
    classes = sorted(set(langs.tolist()))
    return {
        "accuracy": acc,
        "plain_accuracy": accuracy(langs, predicted),
        "control": ctrl,
        "selectivity": acc - ctrl,
        "chance": 1.0 / len(classes),
        "recall": {c: float(np.mean(predicted[langs == c] == c)) for c in classes},
        "C": float(np.median(chosen)),
        "n": len(langs),
    }


def language_id_table(acts: Activations, config: Any) -> Any:
    """:func:`language_id_scores` at every position and layer of ``acts``.

    Returns:
        A pandas DataFrame, one row per (position, layer): ``position``, ``layer`` (0 = the
        embeddings), ``site``, ``accuracy``, ``plain_accuracy``, ``control``, ``selectivity``,
        ``chance``, ``C``, ``n`` and ``recall_<lang>`` per language.
    """
    import pandas as pd

    if len(set(acts.langs.tolist())) < 2:
        raise ValueError("language identity needs at least two languages")
    folds = fact_folds(acts.fact_ids, config.folds, config.seed)
    rows = []
    for position in acts.positions:
        for layer, site in enumerate(acts.sites):
            scores = language_id_scores(
                acts.values[position][layer], acts.langs, acts.fact_ids, folds, config
            )
            recall = scores.pop("recall")
            rows.append(
                {
                    "position": position,
                    "layer": layer,
                    "site": site,
                    **scores,
                    **{f"recall_{lang}": v for lang, v in recall.items()},
                }
            )
    return pd.DataFrame.from_records(rows)
