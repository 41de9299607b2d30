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
* the *recommended edit layer* is the peak of the MLP effect at the last subject token averaged
  over languages, among the layers an edit at the subject can change (not the last one).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from analysis.tracing.causal import POSITION_CLASSES, profile_similarity
from mlake_core.errors import DataError
from mlake_core.results.store import read_run

LAST_SUBJECT = POSITION_CLASSES.index("last_subject")
LAST = POSITION_CLASSES.index("last")


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
    """

    lang: str
    n_facts: int
    p_clean: float
    p_corrupt: float
    maps: dict[str, np.ndarray]
    peak_mlp_layer: int | None
    peak_mlp_effect: float = math.nan

    def to_dict(self) -> dict[str, Any]:
        return {
            "lang": self.lang,
            "n_facts": self.n_facts,
            "p_clean": _round(self.p_clean),
            "p_corrupt": _round(self.p_corrupt),
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
) -> LanguageSummary:
    """Average the per-fact class profiles of one language (``profiles[kind]`` is a list of
    ``[class, layer]`` arrays; a language with none gets NaN maps)."""
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
    return LanguageSummary(
        lang=lang,
        n_facts=len(p_clean),
        p_clean=float(np.mean(p_clean)) if len(p_clean) else math.nan,
        p_corrupt=float(np.mean(p_corrupt)) if len(p_corrupt) else math.nan,
        maps=maps,
        peak_mlp_layer=peak,
        peak_mlp_effect=peak_effect,
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
    """The recommended edit layer (see the module docstring) from ``summaries`` (one of them
    for a language's own); ``None`` without MLP tracing or facts."""
    rows = [
        s.maps["mlp"][LAST_SUBJECT]
        for s in summaries
        if s.n_facts and "mlp" in s.maps and not np.isnan(s.maps["mlp"][LAST_SUBJECT]).all()
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
        recommended_layer: the recommended edit layer (all languages).
        recommended_by_lang: each language's own recommendation.
        counts: per language, facts traced and forward passes and rows per fact.
        skipped: views not traced, keyed ``lang:reason``.
        run_path: the run folder.
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
        if not run.has_json("summary"):
            raise DataError(
                f"{run.json_path('summary')}: no tracing summary (the run did not finish)"
            )
        result = cls.from_dict(run.load_json("summary"))
        result.run_path = str(run.path)
        return result

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TracingResult:
        """A result from its :meth:`to_dict` (a tracing run's ``summary.json``)."""

        def array(rows: Any) -> np.ndarray:
            return np.array(
                [[np.nan if v is None else v for v in row] for row in rows], dtype=float
            )

        summaries = [
            LanguageSummary(
                lang=s["lang"],
                n_facts=int(s["n_facts"]),
                p_clean=math.nan if s["p_clean"] is None else float(s["p_clean"]),
                p_corrupt=math.nan if s["p_corrupt"] is None else float(s["p_corrupt"]),
                maps={k: array(m) for k, m in s["maps"].items()},
                peak_mlp_layer=s.get("peak_mlp_layer"),
                peak_mlp_effect=math.nan
                if s.get("peak_mlp_effect") is None
                else float(s["peak_mlp_effect"]),
            )
            for s in data["summaries"]
        ]
        return cls(
            langs=tuple(data["langs"]),
            kinds=tuple(data["kinds"]),
            n_layers=int(data["n_layers"]),
            window=int(data["window"]),
            noise_std=float(data["noise_std"]),
            summaries=summaries,
            similarity={
                k: [[math.nan if v is None else v for v in row] for row in m]
                for k, m in data["similarity"].items()
            },
            recommended_layer=data.get("recommended_layer"),
            recommended_by_lang=dict(data.get("recommended_by_lang") or {}),
            counts=dict(data.get("counts") or {}),
            skipped=dict(data.get("skipped") or {}),
            run_path=str(data.get("run", "")),
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
            "similarity": {
                k: [[_round(v) for v in row] for row in m] for k, m in self.similarity.items()
            },
            "recommended_layer": self.recommended_layer,
            "recommended_by_lang": self.recommended_by_lang,
            "counts": self.counts,
            "skipped": self.skipped,
            "run": self.run_path,
        }
