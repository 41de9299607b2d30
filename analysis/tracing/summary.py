"""Per-language summaries of causal tracing: average effects by position class and layer, peak
layers, profile similarity between languages, and the recommended edit layer.

Definitions (also printed by ``mlake trace`` and used by the figures):

* the *average map* of a language and kind is the mean over its traced facts of the
  per-fact class profile (:func:`~analysis.tracing.causal.class_profile`):
  ``[position class, layer]`` indirect effects, classes a prompt lacks left out of the mean;
* the *peak MLP layer* of a language is the layer of the largest average MLP effect at the
  last subject token (the layer ROME edits);
* the *profile similarity* of two languages is the Pearson correlation of their average maps
  (every traced kind, flattened and concatenated): 1 means the same places matter in the
  same proportions, whatever the overall size of the effects;
* the *total effect* of a language is ``p_clean - p_corrupt``, both averaged over its traced
  facts: what corrupting the subject takes from the answer's probability;
* a language has *signal* when its total effect is at least ``min_total_effect``
  (:class:`~analysis.tracing.causal.TraceConfig`, default 0.1) of its ``p_clean``
  (:func:`tracing_signal`); without signal its maps, peaks and recommendation are not read;
* the *recommended edit layer* is the peak of the MLP effect at the last subject token averaged
  over the languages with signal, among the layers an edit at the subject can change (not the
  last one); ``None`` when no language has signal.

Why the signal criterion, and why a tenth.  Tracing measures how much restoring one clean state
recovers of what the corruption took away, so everything a map can show is bounded by the
total effect (restoring one state rarely recovers more than the corruption took).  When the
corrupted run keeps the answer's probability (the control equals the measurement: a model that
answers from the question's wording, not from the subject, as mlake-tiny often does), every
map is near zero and its argmax, the "peak layer", is the argmax of noise.  The criterion is
relative to ``p_clean`` so that it means the same for a confident and an unconfident answer.  A
tenth is an order of magnitude: below it the corrupted run keeps more than nine tenths of the
clean probability, and every effect in the maps is at least ten times smaller than the
probability it would explain.  It is deliberately not stricter (for example, asking the
corrupted run to lose the answer, ``p_corrupt < p_clean / 2``): partial corruption is common
(for many facts the corrupted run keeps part of the answer's probability), and the maps of a
language that loses a fifth of its probability still locate where that fifth is restored.  It is
a screen on the size of the effect, not a significance test: a drop that is consistent across
facts but small is still too small to map.  The language means can hide a spread over facts (a
few facts losing most of their probability, the others nothing); :func:`tracing_signal` applies
to one fact's trace as well, and the per-fact figures say which facts have signal.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.tracing.causal import POSITION_CLASSES, TraceConfig, profile_similarity
from mlake_core.results.store import read_run

LAST_SUBJECT = POSITION_CLASSES.index("last_subject")
LAST = POSITION_CLASSES.index("last")

#: The default of :attr:`TraceConfig.min_total_effect` (written once, in the dataclass).
MIN_TOTAL_EFFECT: float = TraceConfig.min_total_effect

#: Why a language has no signal (:func:`tracing_signal`): no fact traced; no clean
#: probability to corrupt (``p_clean`` zero or unknown); the corruption leaves the answer's
#: probability within ``min_total_effect`` of its clean value.
NO_SIGNAL_REASONS: tuple[str, ...] = ("no_facts", "no_clean_probability", "small_total_effect")


def tracing_signal(
    n_facts: int,
    p_clean: float,
    p_corrupt: float,
    min_total_effect: float = MIN_TOTAL_EFFECT,
) -> tuple[bool, str | None]:
    """Whether tracing has signal (module docstring): the total effect ``p_clean - p_corrupt``
    is at least ``min_total_effect * p_clean``.

    Args:
        n_facts: facts the probabilities average over (1 for one fact's trace).
        p_clean: mean clean probability of the answer's first token.
        p_corrupt: mean corrupted probability.
        min_total_effect: the threshold, a fraction of ``p_clean``.

    Returns:
        ``(signal, reason)``: ``reason`` is ``None`` with signal, else one of
        :data:`NO_SIGNAL_REASONS`.
    """
    if not n_facts:
        return False, "no_facts"
    if not (p_clean > 0) or math.isnan(float(p_corrupt)):
        return False, "no_clean_probability"
    if p_clean - p_corrupt >= min_total_effect * p_clean:
        return True, None
    return False, "small_total_effect"


@dataclass
class LanguageSummary:
    """Tracing averages of one language.

    Attributes:
        lang: the language.
        n_facts: facts traced (known in this language).
        p_clean: mean clean probability of the answer's first token.
        p_corrupt: mean corrupted probability.
        maps: per kind, the average map ``[class, layer]`` (NaN where no fact has the class).
        peak_mlp_layer: layer of the largest average MLP effect at the last subject token
            (``None`` without MLP tracing).
        peak_mlp_effect: that effect (read the layer with it: a peak of 0.001 is noise).
        signal: whether tracing has signal in this language (:func:`tracing_signal`, with
            ``min_total_effect``); left ``None``, it is computed with the default threshold.
        no_signal_reason: without signal, why (one of :data:`NO_SIGNAL_REASONS`).
    """

    lang: str
    n_facts: int
    p_clean: float
    p_corrupt: float
    maps: dict[str, np.ndarray]
    peak_mlp_layer: int | None
    peak_mlp_effect: float = math.nan
    signal: bool | None = None
    no_signal_reason: str | None = None

    def __post_init__(self) -> None:
        if self.signal is None:
            self.signal, self.no_signal_reason = tracing_signal(
                self.n_facts, self.p_clean, self.p_corrupt
            )

    @property
    def total_effect(self) -> float:
        """``p_clean - p_corrupt`` (NaN without facts)."""
        return float(self.p_clean - self.p_corrupt)

    @property
    def relative_effect(self) -> float:
        """The total effect as a fraction of ``p_clean`` (NaN when ``p_clean`` is not
        positive)."""
        return self.total_effect / self.p_clean if self.p_clean > 0 else math.nan

    def to_dict(self) -> dict[str, Any]:
        # The effects are derived from the probabilities as saved (rounded), so a summary read
        # back gives the same dict (its properties see only the rounded probabilities).
        p_clean, p_corrupt = _round(self.p_clean), _round(self.p_corrupt)
        saved = None if p_clean is None or p_corrupt is None else (p_clean, p_corrupt)
        total = math.nan if saved is None else saved[0] - saved[1]
        relative = total / saved[0] if saved is not None and saved[0] > 0 else math.nan
        return {
            "lang": self.lang,
            "n_facts": self.n_facts,
            "p_clean": p_clean,
            "p_corrupt": p_corrupt,
            "total_effect": _round(total),
            "relative_effect": _round(relative),
            "signal": self.signal,
            "no_signal_reason": self.no_signal_reason,
            "peak_mlp_layer": self.peak_mlp_layer,
            "peak_mlp_effect": _round(self.peak_mlp_effect),
            "maps": {
                kind: [[_round(v) for v in row] for row in m] for kind, m in self.maps.items()
            },
        }


def _round(v: float) -> float | None:
    return None if v is None or math.isnan(float(v)) else round(float(v), 5)


def summarize_language(
    lang: str,
    profiles: Mapping[str, Sequence[np.ndarray]],
    p_clean: Sequence[float],
    p_corrupt: Sequence[float],
    n_layers: int,
    min_total_effect: float = MIN_TOTAL_EFFECT,
) -> LanguageSummary:
    """Average the per-fact class profiles of one language (``profiles[kind]`` is a list of
    ``[class, layer]`` arrays; a language with none gets NaN maps), and decide whether it has
    signal (:func:`tracing_signal` with ``min_total_effect``)."""
    maps: dict[str, np.ndarray] = {}
    for kind, arrays in profiles.items():
        if len(arrays):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", category=RuntimeWarning)  # all-NaN classes
                maps[kind] = np.nanmean(np.stack(list(arrays)), axis=0)
        else:
            maps[kind] = np.full((len(POSITION_CLASSES), n_layers), np.nan)
    peak, peak_effect = None, math.nan
    if "mlp" in maps and not np.isnan(maps["mlp"][LAST_SUBJECT]).all():
        peak = int(np.nanargmax(maps["mlp"][LAST_SUBJECT]))
        peak_effect = float(maps["mlp"][LAST_SUBJECT][peak])
    mean_clean = float(np.mean(p_clean)) if len(p_clean) else math.nan
    mean_corrupt = float(np.mean(p_corrupt)) if len(p_corrupt) else math.nan
    signal, reason = tracing_signal(len(p_clean), mean_clean, mean_corrupt, min_total_effect)
    return LanguageSummary(
        lang=lang,
        n_facts=len(p_clean),
        p_clean=mean_clean,
        p_corrupt=mean_corrupt,
        maps=maps,
        peak_mlp_layer=peak,
        peak_mlp_effect=peak_effect,
        signal=signal,
        no_signal_reason=reason,
    )


def similarity_matrix(
    summaries: Sequence[LanguageSummary], kinds: Sequence[str] | None = None
) -> np.ndarray:
    """Profile similarity (Pearson correlation of the average maps of ``kinds``, default all
    traced kinds) between every pair of languages, ``[n_langs, n_langs]``."""
    n = len(summaries)
    out = np.full((n, n), np.nan)
    for i, a in enumerate(summaries):
        for j, b in enumerate(summaries):
            ks = list(kinds) if kinds is not None else [k for k in a.maps if k in b.maps]
            if not ks or not a.n_facts or not b.n_facts:
                continue
            x = np.concatenate([a.maps[k].ravel() for k in ks])
            y = np.concatenate([b.maps[k].ravel() for k in ks])
            out[i, j] = profile_similarity(x, y)
    return out


def recommended_layer(summaries: Sequence[LanguageSummary], n_layers: int) -> int | None:
    """The recommended edit layer (see the module docstring) from the ``summaries`` with
    signal (one of them for a language's own); ``None`` without MLP tracing, or when none of
    them has signal."""
    rows = [
        s.maps["mlp"][LAST_SUBJECT]
        for s in summaries
        if s.signal
        and s.n_facts
        and "mlp" in s.maps
        and not np.isnan(s.maps["mlp"][LAST_SUBJECT]).all()
    ]
    if not rows or n_layers < 2:
        return None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=RuntimeWarning)
        mean = np.nanmean(np.stack(rows), axis=0)[: n_layers - 1]
    return int(np.nanargmax(mean))


@dataclass
class TracingResult:
    """What ``mlake trace`` reports (saved as the run's ``summary.json``).

    Attributes:
        langs: languages traced.
        kinds: restoration kinds traced.
        n_layers: layers of the model.
        window: window of ``mlp`` and ``attn`` restorations.
        noise_std: standard deviation of the embedding noise used.
        summaries: one per language.
        similarity: 5x5 profile similarity, per kind and ``all`` (kinds concatenated).
        recommended_layer: the recommended edit layer (from the languages with signal;
            ``None`` when none has it).
        recommended_by_lang: each language's own recommendation (``None`` without signal).
        counts: per language, facts traced and forward passes and rows per fact.
        skipped: views not traced, keyed ``lang:reason``.
        run_path: the run folder.
        min_total_effect: the signal threshold the summaries were judged with
            (:func:`tracing_signal`).
    """

    langs: tuple[str, ...]
    kinds: tuple[str, ...]
    n_layers: int
    window: int
    noise_std: float
    summaries: list[LanguageSummary]
    similarity: dict[str, Any]
    recommended_layer: int | None
    recommended_by_lang: dict[str, int | None]
    counts: dict[str, Any]
    skipped: dict[str, int]
    run_path: str
    min_total_effect: float = MIN_TOTAL_EFFECT

    @property
    def signal_langs(self) -> tuple[str, ...]:
        """The languages with signal, in order."""
        return tuple(s.lang for s in self.summaries if s.signal)

    def summary(self, lang: str) -> LanguageSummary:
        for s in self.summaries:
            if s.lang == lang:
                return s
        raise KeyError(lang)

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> TracingResult:
        """The result a tracing run saved (its ``summary.json``, through :meth:`from_dict`):
        what :func:`mlake.stages.tracing.tracing_stage` returned, with the values as saved
        (rounded to 5 decimals, NaN kept) and :attr:`run_path` the folder it was read from.
        Each fact's trace is beside it (:meth:`~analysis.tracing.causal.FactTrace.load`).

        Raises:
            DataError: not a tracing run, or one that did not finish (no ``summary.json``);
                the message names the folder or file.
        """
        run = read_run(run_dir, "tracing")
        result = cls.from_dict(run.load_summary("tracing summary"))
        result.run_path = str(run.path)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TracingResult:
        """A result from its :meth:`to_dict` (a tracing run's ``summary.json``).

        A summary saved before the signal criterion (no ``signal`` per language) is judged on
        load from its saved ``p_clean`` and ``p_corrupt`` with the saved threshold, else the
        default; its recommendations are then recomputed from its maps (the saved ones did not
        look at signal)."""

        def array(rows: Any) -> np.ndarray:
            return np.array(
                [[np.nan if v is None else v for v in row] for row in rows], dtype=float
            )

        threshold = data.get("min_total_effect")
        threshold = MIN_TOTAL_EFFECT if threshold is None else float(threshold)
        summaries = []
        judged_on_load = False
        for s in data["summaries"]:
            n_facts = int(s["n_facts"])
            p_clean = math.nan if s["p_clean"] is None else float(s["p_clean"])
            p_corrupt = math.nan if s["p_corrupt"] is None else float(s["p_corrupt"])
            if s.get("signal") is None:
                judged_on_load = True
                signal, reason = tracing_signal(n_facts, p_clean, p_corrupt, threshold)
            else:
                signal, reason = bool(s["signal"]), s.get("no_signal_reason")
            summaries.append(
                LanguageSummary(
                    lang=s["lang"],
                    n_facts=n_facts,
                    p_clean=p_clean,
                    p_corrupt=p_corrupt,
                    maps={k: array(m) for k, m in s["maps"].items()},
                    peak_mlp_layer=s.get("peak_mlp_layer"),
                    peak_mlp_effect=math.nan
                    if s.get("peak_mlp_effect") is None
                    else float(s["peak_mlp_effect"]),
                    signal=signal,
                    no_signal_reason=reason,
                )
            )
        n_layers = int(data["n_layers"])
        if judged_on_load:
            recommended: int | None = recommended_layer(summaries, n_layers)
            by_lang = {s.lang: recommended_layer([s], n_layers) for s in summaries}
        else:
            recommended = data.get("recommended_layer")
            by_lang = dict(data.get("recommended_by_lang") or {})
        return cls(
            langs=tuple(data["langs"]),
            kinds=tuple(data["kinds"]),
            n_layers=n_layers,
            window=int(data["window"]),
            noise_std=float(data["noise_std"]),
            summaries=summaries,
            similarity={
                k: [[math.nan if v is None else v for v in row] for row in m]
                for k, m in data["similarity"].items()
            },
            recommended_layer=recommended,
            recommended_by_lang=by_lang,
            counts=dict(data.get("counts") or {}),
            skipped=dict(data.get("skipped") or {}),
            run_path=str(data.get("run", "")),
            min_total_effect=threshold,
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "langs": list(self.langs),
            "kinds": list(self.kinds),
            "n_layers": self.n_layers,
            "window": self.window,
            "noise_std": self.noise_std,
            "position_classes": list(POSITION_CLASSES),
            "summaries": [s.to_dict() for s in self.summaries],
            "peak_mlp_layer": {s.lang: s.peak_mlp_layer for s in self.summaries},
            "min_total_effect": self.min_total_effect,
            "signal": {s.lang: s.signal for s in self.summaries},
            "similarity": {
                k: [[_round(v) for v in row] for row in m] for k, m in self.similarity.items()
            },
            "recommended_layer": self.recommended_layer,
            "recommended_by_lang": self.recommended_by_lang,
            "counts": self.counts,
            "skipped": self.skipped,
            "run": self.run_path,
        }
