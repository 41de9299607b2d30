"""Cross-lingual probes: trained in language A, tested in language B, on facts never seen.

Two tasks, each giving a languages x languages transfer matrix (rows: A, the training
language; columns: B, the test language) per layer and position.

**Which answer** (``task = "answer"``).  The label of a fact is its original answer, named by
its text in a reference language (English when loaded), NFKC-normalised and case-folded; only
answers shared by at least ``min_class_facts`` facts are classes (a class needs facts to train
on and others to test on), and facts with other answers take no part.  The folds are whole
facts, each class dealt evenly over them (:func:`probes.linear.fact_folds`).  In each fold a
probe is trained on A's prompts of the training facts and predicts the answer of the held-out
facts from B's prompts.  So a probe is right only if what it learned from *other* facts
with the same answer, in language A, is written the same way for a new fact in language B:
the answer is decodable in a shared, language-independent direction.  Before probing, each
language's activations are centred on their own mean over the training facts
(``center``, on by default): a constant language offset would otherwise shift every B example
off the A probe's scale (Libovický et al. 2020 remove language centroids the same way).  The
diagonal (A = B) is ordinary held-out-fact accuracy.  Control (Hewitt & Liang 2019): the
answers permuted over the facts (one control answer per fact, in every language); chance is
``1 / n_classes`` (balanced accuracy).

**Which fact** (``task = "fact"``).  A fact's identity cannot be a class (each fact is one
example per language, and held-out facts would be unseen classes), so it is posed as
retrieval: a linear map from A's activations to B's (ridge regression on standardised
features, the ridge penalty chosen by leave-one-fact-out cross-validation,
:class:`~sklearn.linear_model.RidgeCV`) is learned on the training facts' pairs; each held-out
fact's A activation is mapped into B's space and the fact is retrieved when its own B
activation is the nearest (cosine, B centred on its training mean) among the fold's held-out
facts.  Chance is ``1 / n_candidates``.  Control: the map learned from the training facts'
pairs shuffled (each A row paired with a random other fact's B row).
"""

from __future__ import annotations

import warnings
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np

from mlake_core.data.text import normalize
from probes.activations import Activations
from probes.linear import (
    accuracy,
    balanced_accuracy,
    control_by_fact,
    fact_folds,
    fit_probe,
)

#: The cross-lingual tasks.
TASKS: tuple[str, ...] = ("answer", "fact")

ByLang = Mapping[str, tuple[np.ndarray, np.ndarray]]


def answer_classes(answers: Mapping[int, str], min_facts: int) -> dict[int, str]:
    """The answer class of each fact whose (normalised) answer is shared by at least
    ``min_facts`` facts.

    Args:
        answers: ``{fact_id: answer text}`` in one reference language.
        min_facts: the fewest facts a class may have.

    Returns:
        ``{fact_id: class}`` for the facts in a class (the class is the normalised answer).
    """
    norm = {f: normalize(a) for f, a in answers.items()}
    sizes: dict[str, int] = {}
    for a in norm.values():
        sizes[a] = sizes.get(a, 0) + 1
    return {f: a for f, a in norm.items() if sizes[a] >= min_facts}


def _centred(by_lang: ByLang, facts: set[int], center: bool) -> dict[str, np.ndarray]:
    """Each language's rows minus its mean over the rows of ``facts`` (or unchanged)."""
    out = {}
    for lang, (ids, X) in by_lang.items():
        if not center:
            out[lang] = X
            continue
        rows = np.isin(ids, list(facts))
        out[lang] = X - (X[rows].mean(axis=0) if rows.any() else 0.0)
    return out


def answer_transfer(
    by_lang: ByLang,
    classes: Mapping[int, Hashable],
    folds: Mapping[int, int],
    config: Any,
) -> list[dict[str, Any]]:
    """The "which answer" transfer matrix at one layer and position (see the module docstring).

    Args:
        by_lang: per language, ``(fact_ids [n], X [n, d])``: the facts usable in it.
        classes: ``{fact_id: class}`` (:func:`answer_classes`); other facts are ignored.
        folds: ``{fact_id: fold}`` for every fact of ``classes``.
        config: a :class:`~probes.config.ProbeConfig` (``cs``, ``inner_folds``, ``max_iter``,
            ``center``, ``seed``).

    Returns:
        One row per (train_lang, test_lang): ``accuracy`` (balanced, pooled over the folds),
        ``plain_accuracy``, ``control``, ``selectivity``, ``chance``, ``n_train`` (A's
        labelled facts), ``n_test`` (B's), ``C`` (median chosen for A).
    """
    langs = list(by_lang)
    control = control_by_fact(dict(classes), config.seed)
    labelled = {lang: np.isin(ids, list(classes)) for lang, (ids, _) in by_lang.items()}
    y = {
        lang: np.array([classes.get(int(f), "") for f in ids], dtype=object)
        for lang, (ids, _) in by_lang.items()
    }
    y_ctrl = {
        lang: np.array([control.get(int(f), "") for f in ids], dtype=object)
        for lang, (ids, _) in by_lang.items()
    }
    fold_of = {
        lang: np.array([folds.get(int(f), -1) for f in ids]) for lang, (ids, _) in by_lang.items()
    }
    n_folds = max(folds.values()) + 1
    pred = {(a, b): np.empty(len(by_lang[b][0]), dtype=object) for a in langs for b in langs}
    pred_ctrl = {k: np.empty_like(v) for k, v in pred.items()}
    chosen: dict[str, list[float]] = {a: [] for a in langs}
    for k in range(n_folds):
        train_facts = {f for f, fold in folds.items() if fold != k}
        X = _centred(by_lang, train_facts, config.center)
        for a in langs:
            train = labelled[a] & (fold_of[a] != k)
            if len(set(y[a][train])) < 2:
                continue
            for labels, out in ((y[a], pred), (y_ctrl[a], pred_ctrl)):
                probe, c = fit_probe(
                    X[a][train],
                    labels[train].astype(str),
                    by_lang[a][0][train],
                    cs=config.cs,
                    inner_folds=config.inner_folds,
                    max_iter=config.max_iter,
                    seed=config.seed + k,
                    stratify=True,
                )
                if labels is y[a]:
                    chosen[a].append(c)
                for b in langs:
                    test = labelled[b] & (fold_of[b] == k)
                    if test.any():
                        out[a, b][test] = probe.predict(X[b][test])
    rows = []
    n_classes = len(set(classes.values()))
    for a in langs:
        for b in langs:
            test = labelled[b] & np.array([p is not None for p in pred[a, b]])
            truth, guess = y[b][test].astype(str), pred[a, b][test].astype(str)
            ctrl_truth, ctrl_guess = y_ctrl[b][test].astype(str), pred_ctrl[a, b][test].astype(str)
            acc = balanced_accuracy(truth, guess)
            ctrl = balanced_accuracy(ctrl_truth, ctrl_guess)
            rows.append(
                {
                    "train_lang": a,
                    "test_lang": b,
                    "accuracy": acc,
                    "plain_accuracy": accuracy(truth, guess),
                    "control": ctrl,
                    "selectivity": acc - ctrl,
                    "chance": 1.0 / len(set(truth)) if len(truth) else 1.0 / n_classes,
                    "n_train": int(labelled[a].sum()),
                    "n_test": int(test.sum()),
                    "C": float(np.median(chosen[a])) if chosen[a] else float("nan"),
                }
            )
    return rows


def _retrieval(
    Xa: np.ndarray,
    Yb: np.ndarray,
    fold_of: np.ndarray,
    alphas: Sequence[float],
    rng: np.random.Generator,
) -> tuple[int, int, float, float]:
    """Correct retrievals with the learned map and with the control map, the number of
    queries, and the summed chance over queries."""
    from sklearn.linear_model import RidgeCV
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    correct = correct_ctrl = n = 0
    chance = 0.0
    for k in np.unique(fold_of):
        train, test = np.flatnonzero(fold_of != k), np.flatnonzero(fold_of == k)
        if len(train) < 2 or len(test) < 2:
            continue
        mean_b = Yb[train].mean(axis=0)
        target = Yb[test] - mean_b
        shuffled = train[rng.permutation(len(train))]
        for pairs, is_control in ((train, False), (shuffled, True)):
            ridge = make_pipeline(StandardScaler(), RidgeCV(alphas=[float(a) for a in alphas]))
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ridge.fit(Xa[train], Yb[pairs])
            mapped = ridge.predict(Xa[test]) - mean_b
            sims = _unit(mapped) @ _unit(target).T
            hits = int(np.sum(np.argmax(sims, axis=1) == np.arange(len(test))))
            if is_control:
                correct_ctrl += hits
            else:
                correct += hits
        n += len(test)
        chance += 1.0  # len(test) queries, each 1 / len(test)
    return correct, correct_ctrl, n, chance


def _unit(X: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return X / np.where(norms > 0, norms, 1.0)


def fact_retrieval(by_lang: ByLang, folds: Mapping[int, int], config: Any) -> list[dict[str, Any]]:
    """The "which fact" retrieval matrix at one layer and position (see the module docstring).

    Args:
        by_lang: per language, ``(fact_ids [n], X [n, d])``.
        folds: ``{fact_id: fold}`` for every fact.
        config: a :class:`~probes.config.ProbeConfig` (``alphas``, ``seed``).

    Returns:
        One row per (train_lang, test_lang): ``accuracy`` (top-1 retrieval among the fold's
        held-out facts, pooled), ``control``, ``selectivity``, ``chance``, ``n_test`` (facts
        usable in both languages).
    """
    rows = []
    langs = list(by_lang)
    for i, a in enumerate(langs):
        for j, b in enumerate(langs):
            ids_a, Xa = by_lang[a]
            ids_b, Xb = by_lang[b]
            common = np.intersect1d(ids_a, ids_b)
            ra = np.searchsorted(ids_a, common)
            rb = np.searchsorted(ids_b, common)
            fold_of = np.array([folds[int(f)] for f in common])
            rng = np.random.default_rng([config.seed, i, j])
            correct, correct_ctrl, n, chance = _retrieval(
                Xa[ra].astype(np.float64), Xb[rb].astype(np.float64), fold_of, config.alphas, rng
            )
            acc = correct / n if n else float("nan")
            ctrl = correct_ctrl / n if n else float("nan")
            rows.append(
                {
                    "train_lang": a,
                    "test_lang": b,
                    "accuracy": acc,
                    "plain_accuracy": acc,
                    "control": ctrl,
                    "selectivity": acc - ctrl,
                    "chance": chance / n if n else float("nan"),
                    "n_train": len(common),
                    "n_test": n,
                    "C": float("nan"),
                }
            )
    return rows


def transfer_table(
    acts: Activations,
    classes: Mapping[int, Hashable],
    config: Any,
    tasks: Sequence[str] = TASKS,
) -> Any:
    """Both cross-lingual tasks at every position and layer of ``acts``.

    Args:
        classes: the answer class of each fact taking part in the answer task
            (:func:`answer_classes`); with fewer than two classes the answer task is left out.
        tasks: which of :data:`TASKS` to run.

    Returns:
        A pandas DataFrame, one row per (task, position, layer, train_lang, test_lang), with
        the columns of :func:`answer_transfer` plus ``task``, ``position``, ``layer`` and
        ``site``.
    """
    import pandas as pd

    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task(s) {bad}; choose from {TASKS}")
    run_answer = "answer" in tasks and len(set(classes.values())) >= 2
    answer_folds = (
        fact_folds(list(classes), config.folds, config.seed, strata=classes) if run_answer else {}
    )
    all_folds = fact_folds(acts.fact_ids, config.folds, config.seed)
    rows = []
    for position in acts.positions:
        for layer, site in enumerate(acts.sites):
            by_lang = acts.by_lang(position, layer)
            where = {"position": position, "layer": layer, "site": site}
            if run_answer:
                for r in answer_transfer(by_lang, classes, answer_folds, config):
                    rows.append({"task": "answer", **where, **r})
            if "fact" in tasks:
                for r in fact_retrieval(by_lang, all_folds, config):
                    rows.append({"task": "fact", **where, **r})
    return pd.DataFrame.from_records(rows)
