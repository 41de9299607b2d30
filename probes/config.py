"""Settings and result of the probe stage (:func:`mlake.stages.probes.probe_stage`), and the 5x5
matrices other analyses read from a result (:func:`pair_matrices`)."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from typing import Any

from mlake_core.configs import coerce_fields
from mlake_core.errors import ConfigError
from mlake_core.results.store import read_run
from probes.activations import POSITIONS, layer_name

#: Position the pair matrices default to: the subject's last token, where an edit's key is
#: read (ROME and MEMIT write the MLP output at the last subject token), so it is the
#: representation edit transfer depends on most directly.
DEFAULT_POSITION = "subject"


def _floats(value: Any, option: str) -> tuple[float, ...]:
    """A tuple of positive floats from ``"0.01,0.1,1"`` or a sequence."""
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    try:
        out = tuple(float(v) for v in items if v != "")
    except (TypeError, ValueError):
        raise ConfigError(f"{option} {value!r}: expected comma-separated numbers") from None
    if not out or any(not math.isfinite(v) or v <= 0 for v in out):
        raise ConfigError(f"{option} {value!r}: expected one or more positive numbers")
    return out


@dataclass(frozen=True)
class ProbeConfig:
    """Settings of the probes (see :mod:`probes.linear` for how they are used).

    Attributes:
        folds: outer folds over facts (every probe is scored on held-out facts).
        inner_folds: folds over the training facts that choose the regularisation.
        cs: grid of the logistic probes' inverse L2 strength ``C`` (features standardised).
        alphas: grid of the ridge penalty of the fact-retrieval map.
        min_class_facts: an answer is a class of the answer task when at least this many
            facts have it.
        known_only: probe only the facts the model answers correctly in every language
            (knowledge stage, question form); otherwise all facts, with the known ones
            counted.
        center: centre each language on its own mean over the training facts before the
            cross-lingual answer probe (removes a constant language offset).
        max_iter: iterations of the logistic regression solver.
        seed: folds, control labels and shuffles.
    """

    folds: int = 5
    inner_folds: int = 3
    cs: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    alphas: tuple[float, ...] = (1.0, 10.0, 100.0, 1000.0, 10000.0)
    min_class_facts: int = 4
    known_only: bool = False
    center: bool = True
    max_iter: int = 500
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        object.__setattr__(self, "cs", tuple(sorted(_floats(self.cs, "--cs"))))
        object.__setattr__(self, "alphas", tuple(sorted(_floats(self.alphas, "--alphas"))))
        checks = [
            (self.folds >= 2, f"--folds {self.folds}: must be at least 2"),
            (self.inner_folds >= 2, f"--inner-folds {self.inner_folds}: must be at least 2"),
            (
                self.min_class_facts >= 2,
                f"--min-class-facts {self.min_class_facts}: must be at least 2 (a class needs "
                "facts to train on and facts to test on)",
            ),
            (self.max_iter >= 1, f"--max-iter {self.max_iter}: must be at least 1"),
            (self.seed >= 0, f"--seed {self.seed}: must be at least 0"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["cs"] = list(self.cs)
        out["alphas"] = list(self.alphas)
        return out


#: Significance level of a probe against its baseline (:func:`probe_signal`).
PROBE_ALPHA: float = 0.05

#: Why a probe shows no signal (:func:`probe_signal`): its held-out accuracy is not above its
#: baseline; it is above, but within what the baseline reaches by chance on that many
#: held-out examples.
PROBE_NO_SIGNAL_REASONS: tuple[str, ...] = ("not_above_baseline", "not_significant")


def probe_signal(
    accuracy: float,
    control: float,
    chance: float,
    n: float | None,
    alpha: float = PROBE_ALPHA,
) -> tuple[bool | None, str | None]:
    """Whether a probe's held-out accuracy is above its baseline.

    The baseline is the larger of the control task's accuracy (Hewitt & Liang 2019: the same
    pipeline on labels that carry no information about held-out facts, so what the label
    distribution and small test folds alone reach) and chance (``1 / classes``, or
    ``1 / candidates`` for retrieval).  A probe at or below it has no signal: the control
    equals the measurement.  Above it, the probe has signal when its ``n`` held-out examples
    would be unlikely to reach its accuracy if each were right with the baseline's
    probability: a one-sided exact binomial test, ``P(Binomial(n, baseline) >= round(accuracy
    * n)) < alpha`` (0.05, the conventional level; the same as the neuron ablation check).
    Without ``n`` only the comparison is made.  Approximations, all read in the probe's
    favour only slightly: a balanced accuracy is taken as a proportion (exact with balanced
    classes), the control's own sampling error is ignored, and a language-identity probe's
    rows count as ``n`` although the five languages of a fact share its folds.

    Returns:
        ``(signal, reason)``: ``(None, None)`` when the accuracy is unknown; ``(True, None)``;
        or ``(False, reason)``, ``reason`` one of :data:`PROBE_NO_SIGNAL_REASONS`.
    """
    if accuracy is None or math.isnan(float(accuracy)):
        return None, None
    known = [float(v) for v in (control, chance) if v is not None and not math.isnan(float(v))]
    if not known:
        return None, None
    baseline = max(known)
    if not accuracy > baseline:
        return False, "not_above_baseline"
    if n is None or math.isnan(float(n)) or int(n) < 1 or baseline <= 0:
        return True, None
    from scipy.stats import binom

    n = int(n)
    k = min(n, round(float(accuracy) * n))
    if float(binom.sf(k - 1, n, min(baseline, 1.0))) >= alpha:
        return False, "not_significant"
    return True, None


def _clean(value: Any) -> Any:
    """JSON-safe: NaN becomes None, numpy values become Python values."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def _records(table: Any) -> list[dict[str, Any]]:
    return [_clean(r) for r in table.to_dict(orient="records")] if len(table) else []


def _frame(records: list[dict[str, Any]]) -> Any:
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    # JSON has no NaN: None came from NaN in numeric columns.
    for col in frame.columns:
        if frame[col].dtype == object and all(
            v is None or isinstance(v, (int, float)) for v in frame[col]
        ):
            frame[col] = frame[col].astype(float)
    return frame


@dataclass
class ProbeResult:
    """What ``mlake probe`` reports (saved as the run's ``summary.json``).

    Layers are indexed by depth: 0 is the embeddings (``resid_pre.0``), ``L + 1`` the residual
    stream after block ``L`` (``resid_post.{L}``); :attr:`sites` names them.

    Attributes:
        langs: languages.
        sites: the site of each layer.
        positions: ``subject`` (the subject's last token) and ``last`` (the prompt's last).
        language_id: per (position, layer): language-ID ``accuracy`` (balanced),
            ``control``, ``selectivity``, ``chance``, ... (:func:`probes.language_id.language_id_table`).
        transfer: per (task, position, layer, train_lang, test_lang): cross-lingual
            ``accuracy``, ``control``, ``selectivity``, ``chance``, ...
            (:func:`probes.crosslingual.transfer_table`).
        similarity: per (position, layer, lang_a, lang_b): ``cka``, ``cka_biased``,
            ``cos_same``, ``cos_diff``, ``nn_accuracy``, ... (:func:`probes.similarity.similarity_table`).
        counts: per language: ``facts`` asked, ``usable`` (question form), ``known`` (of the
            facts asked), ``probed``.
        skipped: views left out, ``"lang:reason"`` -> count.
        classes: the answer task's classes and their number of facts.
        answer_lang: the language whose answers name the classes.
        config: the :class:`ProbeConfig` as a dict.
        run_path: the run folder.
    """

    langs: tuple[str, ...]
    sites: tuple[str, ...]
    positions: tuple[str, ...]
    language_id: Any
    transfer: Any
    similarity: Any
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    skipped: dict[str, int] = field(default_factory=dict)
    classes: dict[str, int] = field(default_factory=dict)
    answer_lang: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    run_path: str = ""

    @property
    def layers(self) -> list[int]:
        return list(range(len(self.sites)))

    def layer_names(self) -> list[str]:
        return [layer_name(i) for i in self.layers]

    def tasks(self) -> list[str]:
        """The cross-lingual tasks present (``answer`` is absent when there were fewer than
        two answer classes)."""
        if not len(self.transfer):
            return []
        return [t for t in ("answer", "fact") if t in set(self.transfer["task"])]

    def _check(self, task: str | None, position: str) -> None:
        if position not in self.positions:
            raise KeyError(f"position {position!r}: the result has {', '.join(self.positions)}")
        if task is not None and task not in self.tasks():
            raise KeyError(
                f"task {task!r}: the result has {', '.join(self.tasks()) or 'no transfer task'}"
            )

    def transfer_matrix(self, task: str, position: str, layer: int, value: str = "accuracy") -> Any:
        """A train-language x test-language DataFrame of one transfer column."""
        self._check(task, position)
        t = self.transfer
        sel = t[(t["task"] == task) & (t["position"] == position) & (t["layer"] == layer)]
        matrix = sel.pivot(index="train_lang", columns="test_lang", values=value)
        return matrix.reindex(index=list(self.langs), columns=list(self.langs)).astype(float)

    def best_layer(
        self, task: str = "answer", position: str = DEFAULT_POSITION, *, embeddings: bool = False
    ) -> int:
        """The layer with the highest mean off-diagonal (cross-lingual) accuracy of ``task``.

        The embeddings (layer 0) are left out unless ``embeddings``: there a position's vector
        is its token's alone, so a subject written the same way in two languages (most names
        in English, French and German) looks perfectly shared.  Layer 0 is the lexical
        baseline the model's own layers are read against, not a candidate.

        The choice is made on the same held-out accuracies it reports (one of a few layers),
        so the best layer's accuracy is slightly optimistic; its control and selectivity are
        reported beside it.
        """
        self._check(task, position)
        t = self.transfer
        sel = t[
            (t["task"] == task)
            & (t["position"] == position)
            & (t["train_lang"] != t["test_lang"])
            & ((t["layer"] > 0) | embeddings)
        ]
        means = sel.groupby("layer")["accuracy"].mean()
        if means.dropna().empty:
            raise KeyError(f"no cross-lingual {task} accuracy at {position}")
        return int(means.idxmax())

    def similarity_matrix(self, position: str, layer: int, measure: str = "cka") -> Any:
        """A language x language DataFrame of one similarity measure."""
        self._check(None, position)
        s = self.similarity
        if measure not in s.columns:
            raise KeyError(f"measure {measure!r}: choose from {', '.join(s.columns[5:])}")
        sel = s[(s["position"] == position) & (s["layer"] == layer)]
        matrix = sel.pivot(index="lang_a", columns="lang_b", values=measure)
        return matrix.reindex(index=list(self.langs), columns=list(self.langs)).astype(float)

    def language_id_table(self, position: str) -> Any:
        """Language-ID rows of one position, by layer."""
        self._check(None, position)
        t = self.language_id
        return t[t["position"] == position].sort_values("layer").reset_index(drop=True)

    def language_id_signal(self, position: str, layer: int) -> tuple[bool | None, str | None]:
        """:func:`probe_signal` of the language-identity probe at one position and layer
        (``n``: its held-out rows); ``(None, None)`` when there is no such probe."""
        self._check(None, position)
        t = self.language_id
        if not len(t):
            return None, None
        sel = t[(t["position"] == position) & (t["layer"] == layer)]
        if not len(sel):
            return None, None
        r = sel.iloc[0]
        return probe_signal(r["accuracy"], r.get("control"), r.get("chance"), r.get("n"))

    def cross_lingual_signal(
        self, task: str, position: str, layer: int
    ) -> tuple[bool | None, str | None]:
        """:func:`probe_signal` of the mean over the ordered language pairs A != B of the
        cross-lingual ``task`` at one position and layer: the mean accuracy against the mean of
        each pair's baseline, with ``n`` the median number of held-out facts of a pair (the
        pairs test the same facts, so their examples do not add up)."""
        self._check(task, position)
        t = self.transfer
        sel = t[
            (t["task"] == task)
            & (t["position"] == position)
            & (t["layer"] == layer)
            & (t["train_lang"] != t["test_lang"])
        ]
        if not len(sel):
            return None, None
        baseline = sel[["control", "chance"]].max(axis=1, skipna=True)
        n = float(sel["n_test"].median()) if "n_test" in sel else None
        return probe_signal(float(sel["accuracy"].mean()), float(baseline.mean()), math.nan, n)

    def to_dict(self) -> dict[str, Any]:
        return _clean(
            {
                "langs": list(self.langs),
                "sites": list(self.sites),
                "positions": list(self.positions),
                "language_id": _records(self.language_id),
                "transfer": _records(self.transfer),
                "similarity": _records(self.similarity),
                "counts": self.counts,
                "skipped": self.skipped,
                "classes": self.classes,
                "answer_lang": self.answer_lang,
                "config": self.config,
                "run_path": self.run_path,
            }
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> ProbeResult:
        """The result a probe run saved (its ``summary.json``, through :meth:`from_dict`):
        what :func:`mlake.stages.probes.probe_stage` returned, with :attr:`run_path` the
        folder it was read from.  The activations probed are in their own run
        (:meth:`probes.activations.Activations.load`).

        Raises:
            DataError: not a probe run, or one that did not finish (no ``summary.json``); the
                message names the folder or file.
        """
        run = read_run(run_dir, "probes")
        result = cls.from_dict(run.load_summary("probe summary"))
        result.run_path = str(run.path)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProbeResult:
        """Rebuild a result from :meth:`to_dict` (``None`` becomes NaN in the tables)."""
        return cls(
            langs=tuple(data["langs"]),
            sites=tuple(data["sites"]),
            positions=tuple(data.get("positions", POSITIONS)),
            language_id=_frame(data.get("language_id", [])),
            transfer=_frame(data.get("transfer", [])),
            similarity=_frame(data.get("similarity", [])),
            counts=dict(data.get("counts", {})),
            skipped=dict(data.get("skipped", {})),
            classes=dict(data.get("classes", {})),
            answer_lang=str(data.get("answer_lang", "")),
            config=dict(data.get("config", {})),
            run_path=str(data.get("run_path", "")),
        )


def load_probe_result(run_dir: str | os.PathLike[str]) -> ProbeResult:
    """:meth:`ProbeResult.load` (kept for callers)."""
    return ProbeResult.load(run_dir)


def pair_matrices(
    result: ProbeResult, position: str = DEFAULT_POSITION, layer: int | None = None
) -> dict[str, Any]:
    """The languages x languages matrices that relate probing to edit transfer.

    All matrices are taken at one position and one layer: by default the subject's last token
    (:data:`DEFAULT_POSITION`) and the layer after the embeddings where the cross-lingual
    answer probe transfers best (highest mean off-diagonal accuracy,
    :meth:`ProbeResult.best_layer`; the retrieval task's best layer when the answer task did
    not run).  The embeddings are not a candidate: they measure the token's identity (lexical
    overlap), which relate should see as a control, not as shared representation; ask for
    ``layer=0`` to get them.  Each DataFrame's ``attrs`` say which
    (``position``, ``layer``, ``site``, ``measure``).

    Returns:
        ``probe_transfer``: answer-probe balanced accuracy, trained in the row language and
        tested on held-out facts in the column language (absent without the answer task);
        ``probe_transfer_selectivity``: the same minus its control;
        ``fact_retrieval``: top-1 retrieval of held-out facts through a map learned from the
        row language to the column language;
        ``rep_similarity_cka``: debiased linear CKA of the same facts (symmetric, 1 on the
        diagonal);
        ``rep_similarity_cosine``: mean cosine of the same fact's activations, each language
        centred on its own mean (symmetric, 1 on the diagonal).
    """
    tasks = result.tasks()
    if layer is None:
        if not tasks:
            raise KeyError("the result has no cross-lingual task to choose a layer by")
        layer = result.best_layer(tasks[0], position)
    if layer not in result.layers:
        raise KeyError(f"layer {layer}: the result has layers 0..{len(result.sites) - 1}")
    out: dict[str, Any] = {}
    if "answer" in tasks:
        out["probe_transfer"] = result.transfer_matrix("answer", position, layer, "accuracy")
        out["probe_transfer_selectivity"] = result.transfer_matrix(
            "answer", position, layer, "selectivity"
        )
    if "fact" in tasks:
        out["fact_retrieval"] = result.transfer_matrix("fact", position, layer, "accuracy")
    out["rep_similarity_cka"] = result.similarity_matrix(position, layer, "cka")
    out["rep_similarity_cosine"] = result.similarity_matrix(position, layer, "cos_same")
    measures = {
        "probe_transfer": "answer probe balanced accuracy",
        "probe_transfer_selectivity": "answer probe accuracy minus control",
        "fact_retrieval": "top-1 retrieval through a learned linear map",
        "rep_similarity_cka": "debiased linear CKA",
        "rep_similarity_cosine": "same-fact cosine, languages centred",
    }
    for name, matrix in out.items():
        matrix.attrs.update(
            position=position,
            layer=layer,
            site=result.sites[layer],
            measure=measures[name],
        )
    return out
