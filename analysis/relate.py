"""Does parameter sharing predict cross-lingual edit transfer?  The statistics.

Two levels, as a reviewer would ask for both:

**Pair level** (:func:`mantel`, :func:`pair_level`).  Each predictor is a languages x
languages matrix (mean neuron overlap of the same fact, tracing-profile similarity, probe
transfer, representation similarity); the outcome is the edit-transfer matrix (rows: edit
language, columns: test language).  Their off-diagonal cells are rank-correlated (Spearman)
and the p-value comes from a Mantel test: the language labels of the predictor are permuted
(rows and columns together, which keeps each matrix's internal dependence) and the
correlation recomputed.  With five languages there are only ``5! = 120`` permutations, so the
test is *exact* (every permutation enumerated) and its smallest possible p-value is 1/120:
twenty dependent cells cannot give more evidence than that, and we do not pretend they do.
(Up to seven languages, 7! = 5040, the test stays exact; with eight or more, sampled
permutations with a fixed seed are used and each result says ``exact`` False.)
The outcome matrix may be asymmetric; symmetric predictors are compared cell by cell.

**Fact level** (:func:`fact_level`).  One row per (fact, edit language A, test language B,
A != B) whose new answer differs from the old one.  The outcome is transfer success (binary;
greedy alias match of the new answer in B) and, separately, the continuous gain
``log p_new(after) - log p_new(before)`` in B.  The predictor of interest is that fact's
overlap between A's and B's important units; the controls are what the field knows to
confound it:

* ``same_subject`` / ``subject_token_jaccard``: the subject is written the same way, or shares
  tokens, in A and B (a string or token route for transfer that needs no shared parameters);
* ``same_answer`` / ``answer_token_jaccard``: the same for the new answer;
* ``known_before``: whether the model knew the fact in B before the edit;
* the ordered language pair (fixed effects: one indicator per pair but the first).

Continuous predictors are standardised, so a coefficient is the change in log-odds (or in
gain, nats) per standard deviation.  Confidence intervals are percentile intervals of a
*cluster* bootstrap that resamples facts (the rows of one fact are not independent).  The
logistic model carries a weak L2 penalty (``C``, on standardised predictors) so that its
estimates stay finite when an indicator separates the outcome perfectly, which happens with
twenty pair indicators and rare successes.  The predictive value is the out-of-fold AUC with
folds grouped by fact, for the full model and for the controls alone; their difference (with
a paired bootstrap interval over facts) is what the overlap adds.  A within-pair permutation
of the overlap gives a p-value for its coefficient that does not rely on the bootstrap.

Everything here is a pure function of tables: no model, no files, no printing.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from mlake_core.configs import coerce_fields
from mlake_core.errors import ConfigError, DataError

#: Controls of the fact-level model, in report order (pair indicators come after them).
CONTROLS: tuple[str, ...] = (
    "same_subject",
    "subject_token_jaccard",
    "same_answer",
    "answer_token_jaccard",
    "known_before",
)


@dataclass(frozen=True)
class RelateConfig:
    """Settings of the relation analysis.

    Attributes:
        outcome: the binary transfer outcome column of the transfer rows
            (``success_greedy`` or ``success_prob``).
        form: the prompt form transfer is measured on in B (``question`` or ``cloze``).
        overlap: which overlap measure of the neuron tables (``jaccard`` or ``overlap``).
        known_only: fact level: keep only rows where the fact was known in B before the edit
            (the pair-level matrices always use only those, as transfer is defined there).
        n_boot: bootstrap resamples (facts) for the confidence intervals.
        n_perm: within-pair permutations of the overlap for its coefficient's p-value.
        folds: cross-validation folds (grouped by fact) for the AUC.
        C: inverse L2 strength of the logistic model (standardised predictors).
        level: confidence level of the intervals.
        seed: seed of the bootstrap, the permutations and the folds.
    """

    outcome: str = "success_greedy"
    form: str = "question"
    overlap: str = "jaccard"
    known_only: bool = True
    n_boot: int = 1000
    n_perm: int = 200
    folds: int = 5
    C: float = 10.0
    level: float = 0.95
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.outcome not in ("success_greedy", "success_prob"):
            raise ConfigError(f"--outcome {self.outcome!r}: choose success_greedy or success_prob")
        if self.form not in ("question", "cloze"):
            raise ConfigError(f"--form {self.form!r}: choose question or cloze")
        if self.overlap not in ("jaccard", "overlap"):
            raise ConfigError(f"--overlap {self.overlap!r}: choose jaccard or overlap")
        if self.n_boot < 10 or self.n_perm < 0 or self.folds < 2 or self.C <= 0:
            raise ConfigError("--n-boot must be >= 10, --n-perm >= 0, --folds >= 2, C > 0")
        if not 0.5 < self.level < 1:
            raise ConfigError(f"--level {self.level}: must be in (0.5, 1)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- pair level -------------------------------------------------------------------------------


@dataclass(frozen=True)
class MantelResult:
    """Rank correlation of two matrices' off-diagonal cells with its permutation p-value.

    Attributes:
        rho: Spearman correlation over the cells both matrices define.
        p: one-sided p-value (``rho`` at least as large under permuted labels), counting the
            observed labelling; exact when every permutation was enumerated.
        p_two_sided: the same for ``|rho|``.
        n_cells: cells used.
        n_perm: permutations evaluated (the identity included).
        exact: every permutation of the labels was enumerated.
    """

    rho: float
    p: float
    p_two_sided: float
    n_cells: int
    n_perm: int
    exact: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _spearman(x: np.ndarray, y: np.ndarray) -> float:
    from scipy.stats import rankdata

    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan
    rx, ry = rankdata(x), rankdata(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def mantel(
    predictor: np.ndarray,
    outcome: np.ndarray,
    *,
    max_perm: int = 10_000,
    rng: np.random.Generator | None = None,
) -> MantelResult:
    """Mantel test of two ``n x n`` matrices over the same labels (module docstring).

    Cells that are NaN in either matrix are left out.  With ``n! <= max_perm`` every
    permutation is enumerated (exact); otherwise ``max_perm - 1`` random ones plus the
    identity are drawn from ``rng``.
    """
    a = np.asarray(predictor, dtype=float)
    b = np.asarray(outcome, dtype=float)
    if a.shape != b.shape or a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise DataError(f"mantel: matrices of shapes {a.shape} and {b.shape}; need equal squares")
    n = a.shape[0]
    off = ~np.eye(n, dtype=bool)
    observed = _mantel_rho(a, b, off)
    exact = math.factorial(n) <= max_perm
    if exact:
        perms: Any = itertools.permutations(range(n))
    else:
        gen = rng or np.random.default_rng(0)
        perms = [tuple(range(n))] + [tuple(gen.permutation(n)) for _ in range(max_perm - 1)]
    rhos = []
    for perm in perms:
        idx = np.asarray(perm)
        rhos.append(_mantel_rho(a[np.ix_(idx, idx)], b, off))
    values = np.asarray(rhos)
    cells = int((off & np.isfinite(a) & np.isfinite(b)).sum())
    if math.isnan(observed):
        return MantelResult(math.nan, math.nan, math.nan, cells, len(values), exact)
    valid = values[np.isfinite(values)]
    tol = 1e-12
    p = float((valid >= observed - tol).sum() / len(valid))
    p2 = float((np.abs(valid) >= abs(observed) - tol).sum() / len(valid))
    return MantelResult(observed, p, p2, cells, len(values), exact)


def _mantel_rho(a: np.ndarray, b: np.ndarray, off: np.ndarray) -> float:
    keep = off & np.isfinite(a) & np.isfinite(b)
    return _spearman(a[keep], b[keep])


def pair_level(
    predictors: Mapping[str, pd.DataFrame],
    outcomes: Mapping[str, pd.DataFrame],
    langs: Sequence[str],
) -> pd.DataFrame:
    """Every predictor matrix against every outcome matrix (Mantel, exact for up to seven
    languages: 7! = 5040 permutations; with more, :func:`mantel` draws 9,999 random
    permutations plus the identity with seed 0, and the row's ``exact`` is False).  Matrices
    are DataFrames indexed and columned by language, in ``langs``' order; missing languages
    become NaN cells.

    Returns:
        One row per (predictor, outcome): ``rho``, ``p``, ``p_two_sided``, ``n_cells``,
        ``n_perm``, ``exact``.
    """
    rows = []
    for pname, pm in predictors.items():
        a = _square(pm, langs)
        for oname, om in outcomes.items():
            res = mantel(a, _square(om, langs))
            rows.append({"predictor": pname, "outcome": oname, **res.to_dict()})
    return pd.DataFrame.from_records(
        rows,
        columns=["predictor", "outcome", "rho", "p", "p_two_sided", "n_cells", "n_perm", "exact"],
    )


def _square(frame: pd.DataFrame, langs: Sequence[str]) -> np.ndarray:
    return frame.reindex(index=list(langs), columns=list(langs)).to_numpy(dtype=float)


# -- fact level: the table --------------------------------------------------------------------


def _norm(text: str) -> str:
    import unicodedata

    return unicodedata.normalize("NFKC", str(text)).strip().casefold()


def _jaccard(a: set[int], b: set[int]) -> float:
    union = a | b
    return len(a & b) / len(union) if union else math.nan


def string_controls(
    texts: Mapping[tuple[int, str], tuple[str, str]],
    tokenize: Any = None,
) -> pd.DataFrame:
    """Per (fact, language A, language B) with A != B: whether the subject and the new answer
    are written the same way (NFKC, case-folded) and, given ``tokenize`` (text -> token ids),
    the Jaccard index of their token sets.

    Args:
        texts: ``(fact_id, lang) -> (subject, new answer)``.
        tokenize: the model's tokenizer as a function, or None (token columns are NaN).
    """
    by_fact: dict[int, dict[str, tuple[str, str]]] = {}
    for (fact, lang), pair in texts.items():
        by_fact.setdefault(int(fact), {})[lang] = pair
    cache: dict[str, set[int]] = {}

    def toks(text: str) -> set[int]:
        if text not in cache:
            cache[text] = set(tokenize(text)) if tokenize is not None else set()
        return cache[text]

    rows = []
    for fact, views in by_fact.items():
        for a, b in itertools.permutations(sorted(views), 2):
            (sa, na), (sb, nb) = views[a], views[b]
            rows.append(
                {
                    "fact_id": fact,
                    "edit_lang": a,
                    "test_lang": b,
                    "same_subject": float(_norm(sa) == _norm(sb)),
                    "same_answer": float(_norm(na) == _norm(nb)),
                    "subject_token_jaccard": _jaccard(toks(sa), toks(sb)) if tokenize else math.nan,
                    "answer_token_jaccard": _jaccard(toks(na), toks(nb)) if tokenize else math.nan,
                }
            )
    return pd.DataFrame.from_records(rows)


@dataclass
class FactTable:
    """The fact-level rows and what was left out, with the reason.

    Attributes:
        rows: one row per (fact, edit language, test language): ``success``, ``gain``,
            ``overlap`` and the controls.
        dropped: reason -> number of rows left out.
        base: the rows before the overlap's drop (``overlap`` NaN where the fact has none),
            with a column per other predictor (``extra`` of :func:`fact_table`; NaN where its
            run does not measure the row): each other predictor's model is fitted on the
            rows that have it (:meth:`with_predictor`).
    """

    rows: pd.DataFrame
    dropped: dict[str, int] = field(default_factory=dict)
    base: pd.DataFrame | None = None

    def with_predictor(self, name: str) -> tuple[pd.DataFrame, int]:
        """The rows that have predictor ``name`` (``overlap``: :attr:`rows`) and the number
        of rows of :attr:`base` without it (counted, reported, not fitted)."""
        if name == "overlap" or self.base is None:
            return self.rows, 0
        if name not in self.base.columns:
            raise KeyError(name)
        have = self.base[name].notna()
        return self.base[have].reset_index(drop=True), int((~have).sum())


def fact_table(
    transfer: pd.DataFrame,
    before: pd.DataFrame,
    overlap: pd.DataFrame,
    controls: pd.DataFrame,
    config: RelateConfig,
    extra: pd.DataFrame | None = None,
) -> FactTable:
    """Join the transfer rows, the pre-edit log-probabilities, the fact's overlap and the
    string controls (see the module docstring), and other per-row predictors.

    Args:
        transfer: the transfer stage's rows (``kind``, ``form``, ``fact_id``, ``edit_lang``,
            ``test_lang``, ``n``, ``success_greedy``, ``success_prob``, ``p_new``,
            ``known_before``).
        before: the knowledge stage's table (``fact_id``, ``lang``, ``form``,
            ``edit_alias_logp``): log p(new answer) before the edit.
        overlap: the neuron stage's overlap table (``fact_id``, ``lang_a``, ``lang_b`` and the
            overlap columns; unordered pairs).
        controls: :func:`string_controls`.
        config: which outcome, form and overlap measure.
        extra: other predictors by ordered pair (``fact_id``, ``edit_lang``, ``test_lang``
            and one column each, e.g. :func:`intervention_measures`'s); they go into
            :attr:`FactTable.base`, never into the overlap's rows.
    """
    need = {"kind", "form", "fact_id", "edit_lang", "test_lang", "n", "p_new", "known_before"}
    need.add(config.outcome)
    missing = need - set(transfer.columns)
    if missing:
        raise DataError(f"transfer rows lack columns {sorted(missing)}")
    if config.overlap not in overlap.columns:
        raise DataError(f"the overlap table has no column {config.overlap!r}")
    dropped: dict[str, int] = {}
    sel = transfer[(transfer["kind"] == "transfer") & (transfer["form"] == config.form)].copy()
    noop = sel["n"] == 0
    dropped["new answer equals the old one in B"] = int(noop.sum())
    sel = sel[~noop]
    if config.known_only:
        unknown = ~sel["known_before"].astype(bool)
        dropped["not known in B before the edit"] = int(unknown.sum())
        sel = sel[~unknown]
    pre = before[before["form"] == config.form][["fact_id", "lang", "edit_alias_logp"]].rename(
        columns={"lang": "test_lang", "edit_alias_logp": "logp_before"}
    )
    sel = sel.merge(pre, on=["fact_id", "test_lang"], how="left")
    no_pre = sel["logp_before"].isna()
    dropped["no pre-edit measurement"] = int(no_pre.sum())
    sel = sel[~no_pre]
    # log p after; p_new underflows to 0 for hopeless cases: floor at the float64 limit.
    logp_after = np.log(np.clip(sel["p_new"].to_numpy(dtype=float), 1e-300, None))
    sel["gain"] = logp_after - np.maximum(sel["logp_before"].to_numpy(dtype=float), -690.0)
    sel["success"] = sel[config.outcome].astype(float)
    ov = overlap[["fact_id", "lang_a", "lang_b", config.overlap]]
    both = pd.concat(
        [
            ov.rename(columns={"lang_a": "edit_lang", "lang_b": "test_lang"}),
            ov.rename(columns={"lang_a": "test_lang", "lang_b": "edit_lang"}),
        ],
        ignore_index=True,
    ).drop_duplicates(["fact_id", "edit_lang", "test_lang"])
    sel = sel.merge(
        both.rename(columns={config.overlap: "overlap"}),
        on=["fact_id", "edit_lang", "test_lang"],
        how="left",
    )
    sel = sel.merge(controls, on=["fact_id", "edit_lang", "test_lang"], how="left")
    sel["known_before"] = sel["known_before"].astype(float)
    sel["pair"] = sel["edit_lang"] + "->" + sel["test_lang"]
    cols = ["fact_id", "edit_lang", "test_lang", "pair", "success", "gain", "overlap", *CONTROLS]
    names: list[str] = []
    if extra is not None:
        keys = ["fact_id", "edit_lang", "test_lang"]
        names = [c for c in extra.columns if c not in keys]
        clash = set(names) & set(sel.columns)
        if clash:
            raise DataError(f"extra predictors {sorted(clash)} clash with the fact table's columns")
        if extra.duplicated(keys).any():
            raise DataError("extra predictors: more than one row per fact and ordered pair")
        sel = sel.merge(extra, on=keys, how="left")
    base = sel[cols + names].reset_index(drop=True)
    no_overlap = sel["overlap"].isna()
    dropped["no overlap (fact not attributed, or both sets empty)"] = int(no_overlap.sum())
    sel = sel[~no_overlap]
    return FactTable(
        sel[cols].reset_index(drop=True), {k: v for k, v in dropped.items() if v}, base
    )


# -- predictors from the lens and from patching (issue 21 part 4) ----------------------------

#: The predictors read from a cross-lingual patching run (:mod:`analysis.patching`) and a lens
#: run before and after edits (:mod:`analysis.lens`), per (fact, edit language A, test language
#: B), in report order.  Each is the source module's own definition; a pair-level matrix is the
#: mean over the run's rows of (A, B).  The layer of the follow rates is the patching run's best
#: layer of the position (:func:`analysis.patching.best_layer`: the highest mean off-diagonal
#: follow rate of the unedited model's counterfactual patches), chosen before, and without,
#: any transfer outcome.
INTERVENTION_PREDICTORS: dict[str, str] = {
    "patch_follow_subject": (
        "patching, unedited model: B's run on the fact follows another fact's state from A "
        "patched in at the subject's last token, at that position's best layer"
    ),
    "patch_follow_last": (
        "patching, unedited model: the same, patched in at the last position, at its best layer"
    ),
    "patch_carried": (
        "patching, the edit made in A: its edited subject state, patched into B's unedited run "
        "at some layer, makes the new answer B's top token (analysis.failures."
        "carried_at_subject; edits that succeed in A)"
    ),
    "lens_new_at_subject": (
        "lens after the edit in A: the new answer (any form) decodable at B's subject position "
        "at some layer (the failure rules' 'enriched'; facts known in B)"
    ),
    "lens_new_at_last_latent": (
        "lens after the edit in A: the new answer (any form) decodable at B's last position in "
        "the latent layers (the failure rules' 'extracted'; facts known in B)"
    ),
}

#: The predictors of each run kind (the names of :data:`INTERVENTION_PREDICTORS`).
INTERVENTION_PREDICTORS_PATCHING: tuple[str, ...] = (
    "patch_follow_subject",
    "patch_follow_last",
    "patch_carried",
)
INTERVENTION_PREDICTORS_LENS: tuple[str, ...] = ("lens_new_at_subject", "lens_new_at_last_latent")


_KEYS = ["fact_id", "edit_lang", "test_lang"]


def patching_measures(
    counterfactual: Iterable[tuple[str, str, Any]],
    edits: Iterable[tuple[str, int, Any]],
    best_layers: Mapping[str, int | None],
) -> pd.DataFrame:
    """The patching predictors (:data:`INTERVENTION_PREDICTORS`) per (fact, A, B).

    Args:
        counterfactual: ``(A, B, patch)`` per saved
            :class:`~analysis.patching.CounterfactualPatch`; the row's fact is the patch's
            target fact (the fact B's prompt asks about).
        edits: ``(A, fact, patch)`` per saved :class:`~analysis.patching.EditPatch`.
        best_layers: per position (:data:`analysis.patching.POSITIONS`), the run's best layer
            of the counterfactual follow rate (``None``: no pair, the column stays NaN).

    Returns:
        ``fact_id``, ``edit_lang``, ``test_lang``, ``patch_follow_subject``,
        ``patch_follow_last``, ``patch_carried`` (1.0 / 0.0; NaN where the run does not say).
    """
    from analysis.failures import carried_at_subject
    from analysis.patching import POSITIONS as PATCH_POSITIONS

    columns = {"subject_last": "patch_follow_subject", "last": "patch_follow_last"}
    recs: dict[tuple[int, str, str], dict[str, Any]] = {}

    def row(fact: int, a: str, b: str) -> dict[str, Any]:
        return recs.setdefault(
            (int(fact), a, b),
            {
                "fact_id": int(fact),
                "edit_lang": a,
                "test_lang": b,
                **dict.fromkeys(INTERVENTION_PREDICTORS_PATCHING, math.nan),
            },
        )

    for a, b, patch in counterfactual:
        follows = patch.follows()
        r = row(patch.facts[1], a, b)
        for i, pos in enumerate(PATCH_POSITIONS):
            layer = best_layers.get(pos)
            if layer is not None:
                r[columns[pos]] = float(follows[i, int(layer)])
    for a, fact, patch in edits:
        for b in patch.target_langs:
            carried = carried_at_subject(patch, b)
            if carried is not None:
                row(fact, a, b)["patch_carried"] = float(carried)
    frame = pd.DataFrame.from_records(
        list(recs.values()), columns=[*_KEYS, *INTERVENTION_PREDICTORS_PATCHING]
    )
    return frame.astype({"fact_id": "int64"})


def lens_measures(lenses: Iterable[Any], top_k: int) -> pd.DataFrame:
    """The lens predictors (:data:`INTERVENTION_PREDICTORS`) per (fact, A, B), from the
    :class:`~analysis.lens.EditLens` of each edit (``top_k``: the lens run's threshold), by
    :func:`analysis.failures.new_answer_decodable`; only where the failure rules apply (B read,
    the fact known in B before the edit, new and old answers not sharing a first token).

    Returns:
        ``fact_id``, ``edit_lang``, ``test_lang``, ``lens_new_at_subject``,
        ``lens_new_at_last_latent`` (1.0 / 0.0).
    """
    from analysis.failures import new_answer_decodable

    recs = []
    for lens in lenses:
        for t, b in enumerate(lens.test_langs):
            if not lens.known_before[t]:
                continue
            decodable = new_answer_decodable(lens, b, top_k)
            if decodable is None:
                continue
            recs.append(
                {
                    "fact_id": int(lens.fact_id),
                    "edit_lang": lens.edit_lang,
                    "test_lang": b,
                    "lens_new_at_subject": float(decodable[0]),
                    "lens_new_at_last_latent": float(decodable[1]),
                }
            )
    frame = pd.DataFrame.from_records(recs, columns=[*_KEYS, *INTERVENTION_PREDICTORS_LENS])
    return frame.astype({"fact_id": "int64"})


def join_measures(*tables: pd.DataFrame) -> pd.DataFrame:
    """Measure tables (:func:`patching_measures`, :func:`lens_measures`) joined by (fact, A,
    B); a row one table lacks is NaN in its columns."""
    out: pd.DataFrame | None = None
    for table in tables:
        if table is None:
            continue
        out = table if out is None else out.merge(table, on=_KEYS, how="outer")
    if out is None:
        return pd.DataFrame(columns=_KEYS)
    return out.sort_values(_KEYS).reset_index(drop=True)


def measure_matrices(table: pd.DataFrame, langs: Sequence[str]) -> dict[str, pd.DataFrame]:
    """Per measure column of ``table`` (:func:`join_measures`), the languages x languages
    matrix of its mean over the rows that have it (rows: A, columns: B; NaN: no row);
    a measure no row has is left out."""
    out = {}
    for name in [c for c in table.columns if c not in _KEYS]:
        have = table[table[name].notna()]
        if have.empty:
            continue
        m = have.pivot_table(index="edit_lang", columns="test_lang", values=name, aggfunc="mean")
        out[name] = m.reindex(index=list(langs), columns=list(langs)).astype(float)
    return out


# -- fact level: the models -------------------------------------------------------------------


@dataclass
class Design:
    """A design matrix with its column names and row groups (facts)."""

    x: np.ndarray
    names: list[str]
    groups: np.ndarray
    means: np.ndarray
    scales: np.ndarray


def design(
    rows: pd.DataFrame,
    *,
    with_overlap: bool = True,
    pairs: Sequence[str] = (),
    predictor: str = "overlap",
) -> Design:
    """Standardised continuous predictors (the predictor of interest, ``overlap`` unless
    ``predictor`` names another column, and the controls that vary) and indicators of the
    ordered pairs but the first (``pairs`` gives their order; the rows' own otherwise).
    Constant columns are left out (they carry no information and break the fit)."""
    names: list[str] = []
    cols: list[np.ndarray] = []
    for name in ((predictor,) if with_overlap else ()) + CONTROLS:
        v = rows[name].to_numpy(dtype=float)
        if np.isnan(v).all() or np.nanmax(v) == np.nanmin(v):  # std of a constant is ~1e-17
            continue
        cols.append(np.nan_to_num(v, nan=float(np.nanmean(v))))
        names.append(name)
    x = np.column_stack(cols) if cols else np.zeros((len(rows), 0))
    means = x.mean(axis=0) if len(rows) else np.zeros(x.shape[1])
    scales = x.std(axis=0) if len(rows) else np.ones(x.shape[1])
    scales[scales == 0] = 1.0
    x = (x - means) / scales
    levels = list(pairs) or sorted(rows["pair"].unique())
    dummies = [(rows["pair"] == p).to_numpy(dtype=float) for p in levels[1:]]
    if dummies:
        x = np.column_stack([x, *dummies])
        names += [f"pair[{p}]" for p in levels[1:]]
    return Design(x, names, rows["fact_id"].to_numpy(), means, scales)


def _fit_logit(x: np.ndarray, y: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=C, max_iter=2000)
    model.fit(x, y)
    return np.concatenate([model.intercept_, model.coef_[0]])


def _fit_ols(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    xa = np.column_stack([np.ones(len(x)), x])
    coef, *_ = np.linalg.lstsq(xa, y, rcond=None)
    return coef


class _Clusters:
    """Bootstrap samples of whole groups (facts): the rows of a resampled fact come along
    together, as they are not independent."""

    def __init__(self, groups: np.ndarray) -> None:
        _, inverse = np.unique(groups, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        bounds = np.flatnonzero(np.diff(inverse[order])) + 1
        self.members = np.split(order, bounds)

    def sample(self, rng: np.random.Generator) -> np.ndarray:
        picked = rng.integers(0, len(self.members), size=len(self.members))
        return np.concatenate([self.members[g] for g in picked])


@dataclass
class ModelFit:
    """One fitted fact-level model.

    Attributes:
        kind: ``logistic`` (success) or ``linear`` (gain).
        terms: coefficient table: ``term``, ``estimate``, ``ci_low``, ``ci_high`` (percentile
            cluster bootstrap), and for ``overlap`` a permutation ``p``.
        n_rows, n_facts, n_events: sample sizes (events: successes, logistic only).
        auc, auc_controls, auc_gain, auc_gain_ci: out-of-fold AUCs (logistic only).
        note: why the model was not fitted, when it was not.
    """

    kind: str
    terms: pd.DataFrame
    n_rows: int
    n_facts: int
    n_events: int = 0
    auc: float = math.nan
    auc_controls: float = math.nan
    auc_gain: float = math.nan
    auc_gain_ci: tuple[float, float] = (math.nan, math.nan)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in asdict(self).items() if k != "terms"}
        out["auc_gain_ci"] = list(self.auc_gain_ci)
        out["terms"] = self.terms.to_dict(orient="records")
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelFit:
        values = dict(data)
        values["terms"] = pd.DataFrame.from_records(
            values.get("terms", []), columns=["term", "estimate", "ci_low", "ci_high", "p"]
        )
        values["auc_gain_ci"] = tuple(values.get("auc_gain_ci", (math.nan, math.nan)))
        return cls(**values)

    def term(self, name: str) -> dict[str, Any]:
        """The coefficient row of ``name``."""
        hit = self.terms[self.terms["term"] == name] if "term" in self.terms else self.terms
        if hit.empty:
            raise KeyError(name)
        return hit.iloc[0].to_dict()


def _terms(
    names: Sequence[str], estimate: np.ndarray, boots: np.ndarray, level: float
) -> pd.DataFrame:
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    rows = []
    for j, name in enumerate(["intercept", *names]):
        col = boots[:, j] if len(boots) else np.array([math.nan])
        col = col[np.isfinite(col)]
        rows.append(
            {
                "term": name,
                "estimate": float(estimate[j]),
                "ci_low": float(np.percentile(col, lo)) if len(col) else math.nan,
                "ci_high": float(np.percentile(col, hi)) if len(col) else math.nan,
            }
        )
    return pd.DataFrame.from_records(rows)


def _permutation_p(
    rows: pd.DataFrame,
    fit: Any,
    y: np.ndarray,
    observed: float,
    n_perm: int,
    rng: np.random.Generator,
    pairs: Sequence[str],
    predictor: str = "overlap",
) -> float:
    """Two-sided p-value of the predictor's coefficient: the predictor permuted within each
    ordered pair (so the pair effects stay), model refitted."""
    if n_perm == 0 or not math.isfinite(observed):
        return math.nan
    index = [np.flatnonzero(rows["pair"].to_numpy() == p) for p in pairs]
    overlap = rows[predictor].to_numpy(dtype=float)
    count = 1
    for _ in range(n_perm):
        shuffled = overlap.copy()
        for idx in index:
            shuffled[idx] = overlap[rng.permutation(idx)]
        perm_rows = rows.assign(**{predictor: shuffled})
        d = design(perm_rows, pairs=pairs, predictor=predictor)
        if predictor not in d.names:  # a within-pair shuffle cannot make it constant
            continue
        coef = fit(d.x, y)
        count += int(abs(coef[1 + d.names.index(predictor)]) >= abs(observed) - 1e-12)
    return count / (n_perm + 1)


def fact_level(
    rows: pd.DataFrame, config: RelateConfig, predictor: str = "overlap"
) -> dict[str, ModelFit]:
    """Fit the logistic model of transfer success and the linear model of the probability
    gain on the fact table (module docstring), on ``predictor`` (the overlap, or another
    column of the rows, e.g. one of :data:`INTERVENTION_PREDICTORS`) with the controls.

    Returns:
        ``{"logistic": ModelFit, "linear": ModelFit}`` (the predictor's coefficient is the
        term named ``predictor``).  A model that cannot be estimated (no rows, no variation in
        the outcome, or no variation in the predictor) comes back with an empty ``terms``
        table and a ``note`` saying why.
    """
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import GroupKFold

    rng = np.random.default_rng(config.seed)
    pairs = sorted(rows["pair"].unique()) if len(rows) else []
    n_facts = int(rows["fact_id"].nunique()) if len(rows) else 0
    out: dict[str, ModelFit] = {}
    empty = pd.DataFrame(columns=["term", "estimate", "ci_low", "ci_high"])
    for kind in ("logistic", "linear"):
        y = (
            rows["success"].to_numpy(dtype=float)
            if kind == "logistic"
            else rows["gain"].to_numpy(dtype=float)
        )
        events = int(np.nansum(y)) if kind == "logistic" else 0
        note = ""
        if len(rows) < 10:
            note = f"only {len(rows)} rows"
        elif kind == "logistic" and (events < 5 or len(rows) - events < 5):
            note = f"{events} successes of {len(rows)} rows: too few events to estimate"
        elif np.nanmax(rows[predictor].to_numpy(dtype=float)) == np.nanmin(
            rows[predictor].to_numpy(dtype=float)
        ):
            note = f"the {predictor} does not vary"
        if note:
            out[kind] = ModelFit(kind, empty.copy(), len(rows), n_facts, events, note=note)
            continue

        def fit(x: np.ndarray, yy: np.ndarray, kind: str = kind) -> np.ndarray:
            if kind == "logistic":
                if len(np.unique(yy)) < 2:
                    return np.full(x.shape[1] + 1, math.nan)
                return _fit_logit(x, yy, config.C)
            return _fit_ols(x, yy)

        d = design(rows, pairs=pairs, predictor=predictor)
        estimate = fit(d.x, y)
        boots = []
        clusters = _Clusters(d.groups)
        for _ in range(config.n_boot):
            idx = clusters.sample(rng)
            boots.append(fit(d.x[idx], y[idx]))
        terms = _terms(d.names, estimate, np.asarray(boots), config.level)
        observed = float(estimate[1 + d.names.index(predictor)])
        p = _permutation_p(rows, fit, y, observed, config.n_perm, rng, pairs, predictor)
        terms["p"] = [p if t == predictor else math.nan for t in terms["term"]]
        mf = ModelFit(kind, terms, len(rows), n_facts, events)
        if kind == "logistic":
            folds = min(config.folds, n_facts)
            full = np.full(len(rows), math.nan)
            ctrl = np.full(len(rows), math.nan)
            dc = design(rows, with_overlap=False, pairs=pairs, predictor=predictor)
            for train, test in GroupKFold(n_splits=folds).split(d.x, y, d.groups):
                if len(np.unique(y[train])) < 2:
                    continue
                full[test] = _predict(d.x[train], y[train], d.x[test], config.C)
                ctrl[test] = _predict(dc.x[train], y[train], dc.x[test], config.C)
            ok = np.isfinite(full) & np.isfinite(ctrl)
            if ok.sum() and len(np.unique(y[ok])) == 2:
                mf.auc = float(roc_auc_score(y[ok], full[ok]))
                mf.auc_controls = float(roc_auc_score(y[ok], ctrl[ok]))
                mf.auc_gain = mf.auc - mf.auc_controls
                mf.auc_gain_ci = _auc_gain_ci(y[ok], full[ok], ctrl[ok], d.groups[ok], config, rng)
        out[kind] = mf
    return out


def _predict(xtr: np.ndarray, ytr: np.ndarray, xte: np.ndarray, C: float) -> np.ndarray:
    from sklearn.linear_model import LogisticRegression

    if xtr.shape[1] == 0:
        return np.full(len(xte), ytr.mean())
    model = LogisticRegression(C=C, max_iter=2000).fit(xtr, ytr)
    return model.predict_proba(xte)[:, 1]


def _auc_gain_ci(
    y: np.ndarray,
    full: np.ndarray,
    ctrl: np.ndarray,
    groups: np.ndarray,
    config: RelateConfig,
    rng: np.random.Generator,
) -> tuple[float, float]:
    """Paired cluster-bootstrap interval of AUC(full) - AUC(controls) over facts."""
    from sklearn.metrics import roc_auc_score

    diffs = []
    clusters = _Clusters(groups)
    for _ in range(config.n_boot):
        idx = clusters.sample(rng)
        if len(np.unique(y[idx])) < 2:
            continue
        diffs.append(roc_auc_score(y[idx], full[idx]) - roc_auc_score(y[idx], ctrl[idx]))
    if not diffs:
        return (math.nan, math.nan)
    lo, hi = (1 - config.level) / 2 * 100, (1 + config.level) / 2 * 100
    return (float(np.percentile(diffs, lo)), float(np.percentile(diffs, hi)))


# -- comparing two conditions (restricted editing, sweep points) ------------------------------


@dataclass(frozen=True)
class Difference:
    """Mean of a per-fact quantity in condition B minus condition A, on the facts both have.

    Attributes:
        a, b: the two means.
        diff: ``b - a``.
        ci_low, ci_high: paired bootstrap interval over facts.
        n_facts: facts in both.
    """

    a: float
    b: float
    diff: float
    ci_low: float
    ci_high: float
    n_facts: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def paired_difference(
    a: pd.Series, b: pd.Series, *, n_boot: int = 1000, level: float = 0.95, seed: int = 0
) -> Difference:
    """Paired bootstrap of ``mean(b) - mean(a)`` over the index both series share (facts)."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    n = len(both)
    if n == 0:
        return Difference(math.nan, math.nan, math.nan, math.nan, math.nan, 0)
    va, vb = both["a"].to_numpy(dtype=float), both["b"].to_numpy(dtype=float)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(n_boot, n))
    diffs = vb[idx].mean(axis=1) - va[idx].mean(axis=1)
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return Difference(
        float(va.mean()),
        float(vb.mean()),
        float(vb.mean() - va.mean()),
        float(np.percentile(diffs, lo)),
        float(np.percentile(diffs, hi)),
        n,
    )


def bootstrap_mean(
    values: pd.Series,
    groups: pd.Series | None = None,
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of ``values`` with a (cluster, when ``groups`` is given) bootstrap interval."""
    v = values.to_numpy(dtype=float)
    keep = np.isfinite(v)
    v = v[keep]
    if len(v) == 0:
        return (math.nan, math.nan, math.nan)
    rng = np.random.default_rng(seed)
    g = groups.to_numpy()[keep] if groups is not None else np.arange(len(v))
    clusters = _Clusters(g)
    means = [v[clusters.sample(rng)].mean() for _ in range(n_boot)]
    lo, hi = (1 - level) / 2 * 100, (1 + level) / 2 * 100
    return (float(v.mean()), float(np.percentile(means, lo)), float(np.percentile(means, hi)))
