"""The result of the relation analysis (``mlake relate``), as its run saves and loads it.

The statistics are :mod:`analysis.relate`'s (pure functions of tables); the stage that reads
the other stages' runs and joins them is :func:`mlake.stages.relate.relate_stage`.  This
module holds what the stage returns and saves (``summary.json`` of a ``relate`` run, the fact
table beside it as ``tables/facts.parquet``), so that figures and reports take it from here.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from analysis.relate import ModelFit
from mlake_core.results.store import read_run


def _matrix_dict(frame: pd.DataFrame) -> dict[str, dict[str, float | None]]:
    return {
        str(a): {str(b): (None if pd.isna(v) else float(v)) for b, v in row.items()}
        for a, row in frame.iterrows()
    }


def _matrix_frame(data: Mapping[str, Mapping[str, float | None]]) -> pd.DataFrame:
    return pd.DataFrame(data).T.astype(float)


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    out = []
    for rec in frame.to_dict(orient="records"):
        out.append(
            {
                k: (None if isinstance(v, float) and math.isnan(v) else _plain(v))
                for k, v in rec.items()
            }
        )
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, np.bool_):
        return bool(value)
    return value


@dataclass
class RelateResult:
    """Everything ``mlake relate`` reports (saved as the run's ``summary.json``; the fact
    table is saved beside it).

    Attributes:
        config: the :class:`~analysis.relate.RelateConfig` as a dict.
        langs: language order.
        inputs: the run folders used, by role.
        method: the transfer run's editing method (with its unit restriction).
        unit: the neuron overlap used at fact level (``<method>_<unit>``).
        predictors: name -> languages x languages matrix (pair level).
        outcomes: name -> languages x languages matrix: ``transfer`` (the outcome rate,
            facts known in B) and ``gain`` (mean log-probability gain of the new answer in B).
        pair_level: the Mantel table (records).
        fits: ``logistic`` and ``linear`` fact-level models.
        n_rows, n_facts: fact-level sample.
        dropped: fact-level rows left out, by reason.
        by_pair: per ordered pair: rows, mean overlap, transfer rate, mean gain.
        interventions: per restricted run: label and per-metric paired differences.
        notes: warnings (e.g. no tokenizer for the token controls).
        predictor_fits: per predictor read from the lens and patching runs
            (:data:`analysis.relate.INTERVENTION_PREDICTORS` that a run measured), its
            ``logistic`` and ``linear`` fact-level models, fitted as the overlap's are on the
            rows that have it.
        missing: per such predictor, the fact-level rows (of those before the overlap's drop)
            its run does not measure: counted, not fitted.
    """

    config: dict[str, Any]
    langs: list[str]
    inputs: dict[str, Any]
    method: str
    unit: str
    predictors: dict[str, pd.DataFrame]
    outcomes: dict[str, pd.DataFrame]
    pair_level: pd.DataFrame
    fits: dict[str, ModelFit]
    n_rows: int
    n_facts: int
    dropped: dict[str, int]
    by_pair: pd.DataFrame
    interventions: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    predictor_fits: dict[str, dict[str, ModelFit]] = field(default_factory=dict)
    missing: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "config": self.config,
            "langs": self.langs,
            "inputs": self.inputs,
            "method": self.method,
            "unit": self.unit,
            "predictors": {k: _matrix_dict(v) for k, v in self.predictors.items()},
            "outcomes": {k: _matrix_dict(v) for k, v in self.outcomes.items()},
            "pair_level": _records(self.pair_level),
            "fits": {k: v.to_dict() for k, v in self.fits.items()},
            "n_rows": self.n_rows,
            "n_facts": self.n_facts,
            "dropped": self.dropped,
            "by_pair": _records(self.by_pair),
            "interventions": self.interventions,
            "notes": self.notes,
            "predictor_fits": {
                name: {k: v.to_dict() for k, v in fits.items()}
                for name, fits in self.predictor_fits.items()
            },
            "missing": self.missing,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RelateResult:
        return cls(
            config=dict(data["config"]),
            langs=list(data["langs"]),
            inputs=dict(data["inputs"]),
            method=str(data["method"]),
            unit=str(data["unit"]),
            predictors={k: _matrix_frame(v) for k, v in data["predictors"].items()},
            outcomes={k: _matrix_frame(v) for k, v in data["outcomes"].items()},
            pair_level=pd.DataFrame.from_records(data["pair_level"]),
            fits={k: ModelFit.from_dict(v) for k, v in data["fits"].items()},
            n_rows=int(data["n_rows"]),
            n_facts=int(data["n_facts"]),
            dropped=dict(data["dropped"]),
            by_pair=pd.DataFrame.from_records(data["by_pair"]),
            interventions=list(data.get("interventions", [])),
            notes=list(data.get("notes", [])),
            predictor_fits={
                name: {k: ModelFit.from_dict(v) for k, v in fits.items()}
                for name, fits in (data.get("predictor_fits") or {}).items()
            },
            missing={k: int(v) for k, v in (data.get("missing") or {}).items()},
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> RelateResult:
        """The result a relation run saved (its ``summary.json``, through :meth:`from_dict`):
        what :func:`mlake.stages.relate.relate_stage` returned, as JSON keeps it (NaN stays
        NaN in the matrices and tables).

        Raises:
            DataError: not a relate run, or one that did not finish (no ``summary.json``);
                the message names the folder or file.
        """
        run = read_run(run_dir, "relate")
        return cls.from_dict(run.load_summary("relate summary"))


def load_relate_result(run_dir: str | os.PathLike[str]) -> RelateResult:
    """:meth:`RelateResult.load` (kept for callers)."""
    return RelateResult.load(run_dir)
