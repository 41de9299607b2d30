"""The sharing sweep: train mlake-tiny with more and more bilingual documents, and measure at
each point how much the languages share parameters and how far edits transfer.

A bilingual document (``TinyTrainConfig.bilingual_fraction``) puts one fact's question and
answer in one language right after the same fact's in another language, in one context.  The
fraction is the probability, per trained unit and epoch, of adding one.  More of them should
push the model to encode a fact once for several languages: the sweep measures whether that
raises (1) the same-fact overlap of the languages' important neurons and (2) cross-lingual
edit transfer, and whether the two move together (the dose-response curve).

For each fraction, on the same facts and with the same settings: train (cached), measure
knowledge, attribute neurons (integrated gradients), edit every fact in every language (FT by
default, with the settings the model brings: mlake-tiny's FT at layer 0, see
:func:`mlake.method_settings.resolve_method`) and relate the two
(:func:`mlake.stages.relate.relate_stage`).  Every step is a cached stage, so an interrupted
sweep resumes.  A point's numbers, each with a cluster-bootstrap
interval over facts:

* ``overlap``: mean same-fact Jaccard of the important neuron sets over language pairs (also
  within and across language families);
* ``transfer``: mean transfer success (greedy alias match of the new answer, test language
  known before), off the diagonal (also within / across families);
* ``gain``: mean log-probability gain of the new answer in the other languages;
* ``efficacy`` and ``locality`` of the same edits;
* the fact-level overlap coefficient of that point's relation analysis.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd

from analysis.relate import RelateConfig, bootstrap_mean
from mlake_core.configs import coerce_fields
from mlake_core.errors import ConfigError
from mlake_core.languages import family_group

#: Facts beyond the edited ones whose knowledge is measured (the locality pool).
POOL_EXTRA = 40


@dataclass(frozen=True)
class SweepConfig:
    """Settings of the sharing sweep.

    Attributes:
        fractions: bilingual fractions, one mlake-tiny each.
        train_facts: facts each mlake-tiny is trained on (300, the default model's, makes
            fraction 0 the default model; fewer trains faster).
        facts: facts edited and attributed per point (the first of mlake-tiny's training
            facts, the same at every point).
        method: editing method.
        method_config: the fields of its config set by the user (strings, coerced by the
            method's dataclass); the others come from the settings each point's model brings
            (mlake-tiny: FT at layer 0 with ``lr`` 0.01, ``steps`` 100, ``max_rel_norm`` 0.3),
            else the method's defaults (:func:`mlake.method_settings.resolve_method`).
        n_locality: locality facts per language.
        ablation_facts: known facts per language in the neuron ablation matrix.
        n_boot: bootstrap resamples.
        seed: seed of edits, attribution and bootstrap.
    """

    fractions: tuple[float, ...] = (0.0, 0.25, 0.5)
    train_facts: int = 300
    facts: int = 60
    method: str = "ft"
    method_config: Mapping[str, str] = field(default_factory=dict)
    n_locality: int = 10
    ablation_facts: int = 10
    n_boot: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        coerce_fields(self)
        try:
            fractions = tuple(float(f) for f in self.fractions)
        except (TypeError, ValueError):
            raise ConfigError(f"--fractions {self.fractions!r}: expected numbers") from None
        if len(fractions) < 2 or any(not 0 <= f <= 1 for f in fractions):
            raise ConfigError(f"--fractions {fractions}: give at least two values in [0, 1]")
        if len(set(fractions)) != len(fractions):
            raise ConfigError(f"--fractions {fractions}: repeated values")
        object.__setattr__(self, "fractions", tuple(sorted(fractions)))
        if self.facts < 5:
            raise ConfigError(f"--facts {self.facts}: at least 5")
        if self.train_facts < self.facts:
            raise ConfigError(f"--train-facts {self.train_facts}: fewer than --facts {self.facts}")

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["method_config"] = dict(self.method_config)
        return out


def _family_split(frame: pd.DataFrame, a: str, b: str) -> pd.Series:
    """Whether each row's two languages are of one family (a language of unknown family is
    a group of its own)."""
    return pd.Series(
        [family_group(x) == family_group(y) for x, y in zip(frame[a], frame[b], strict=True)],
        index=frame.index,
    )


def point_summary(
    fraction: float,
    overlap: pd.DataFrame,
    transfer: pd.DataFrame,
    relate_fit: Any,
    *,
    n_boot: int,
    seed: int,
) -> dict[str, Any]:
    """One point of the curve from the neuron overlap table (``fact_id``, ``lang_a``,
    ``lang_b``, ``jaccard``) and the transfer rows (module docstring)."""
    out: dict[str, Any] = {"fraction": fraction}

    def put(name: str, values: pd.Series, groups: pd.Series) -> None:
        mean, lo, hi = bootstrap_mean(values, groups, n_boot=n_boot, seed=seed)
        out[name] = mean
        out[f"{name}_ci"] = [lo, hi]
        out[f"{name}_n"] = int(values.notna().sum())

    ov = overlap.dropna(subset=["jaccard"])
    same = _family_split(ov, "lang_a", "lang_b")
    put("overlap", ov["jaccard"], ov["fact_id"])
    put("overlap_within", ov.loc[same, "jaccard"], ov.loc[same, "fact_id"])
    put("overlap_across", ov.loc[~same, "jaccard"], ov.loc[~same, "fact_id"])
    q = transfer[transfer["form"] == "question"]
    tr = q[(q["kind"] == "transfer") & q["known_before"].astype(bool) & (q["n"] > 0)]
    fam = _family_split(tr, "edit_lang", "test_lang")
    put("transfer", tr["success_greedy"], tr["fact_id"])
    put("transfer_within", tr.loc[fam, "success_greedy"], tr.loc[fam, "fact_id"])
    put("transfer_across", tr.loc[~fam, "success_greedy"], tr.loc[~fam, "fact_id"])
    put("transfer_prob", tr["success_prob"], tr["fact_id"])
    eff = q[q["kind"] == "efficacy"]
    put("efficacy", eff["success_greedy"], eff["fact_id"])
    loc = transfer[transfer["kind"] == "locality"]
    put("locality", loc["success_greedy"], loc["fact_id"])
    coef = math.nan
    ci = [math.nan, math.nan]
    if relate_fit is not None and not relate_fit.note:
        row = relate_fit.term("overlap")
        coef, ci = row["estimate"], [row["ci_low"], row["ci_high"]]
    out["relate_overlap_coef"] = coef
    out["relate_overlap_ci"] = ci
    return out


def dose_response(points: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rank correlations across the sweep's points: fraction with overlap, fraction with
    transfer, overlap with transfer.  Spearman rho with an exact permutation p-value
    (two-sided, every ordering of the points enumerated): with three points the smallest
    possible p is 1/3, so a sweep of three fractions is descriptive only."""
    import itertools

    from scipy.stats import spearmanr

    frame = pd.DataFrame.from_records(points)
    out: dict[str, Any] = {"n_points": len(frame)}
    for a, b in (("fraction", "overlap"), ("fraction", "transfer"), ("overlap", "transfer")):
        if len(frame) >= 3 and frame[a].nunique() > 1 and frame[b].nunique() > 1:
            x, y = frame[a].to_numpy(), frame[b].to_numpy()
            rho, p_value = spearmanr(x, y)
            if len(y) <= 8:  # exact; beyond that scipy's approximation is fine
                perms = list(itertools.permutations(range(len(y))))
                hits = sum(
                    abs(float(spearmanr(x, y[list(p)])[0])) >= abs(rho) - 1e-12 for p in perms
                )
                p_value = hits / len(perms)
            out[f"{a}_vs_{b}"] = {"rho": float(rho), "p": float(p_value)}
        else:
            out[f"{a}_vs_{b}"] = {"rho": math.nan, "p": math.nan}
    return out


def run_sweep(
    config: SweepConfig,
    *,
    langs: Sequence[str],
    data_dir: str | os.PathLike[str] | None = None,
    results_dir: str | os.PathLike[str] | None = None,
    backend: str = "tlens",
    device: str = "auto",
    batch_size: int = 32,
    log: Callable[[str], None] | None = None,
    on_edit: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, Any], Any]:
    """Run (or resume) the sweep; returns its summary and run folder (module docstring).

    Each point's model is loaded and its facts selected as a command does
    (:mod:`mlake.session`): the first ``config.facts`` of its training facts are edited and
    attributed, and knowledge is measured on those and the next :data:`POOL_EXTRA` (the
    locality pool).  The method's settings are resolved per model
    (:func:`~mlake.method_settings.resolve_method`); the sweep's run is keyed by its config
    with the method fields the first point's resolution sets away from the defaults.
    """
    from analysis.neurons.config import NeuronConfig
    from analysis.transfer import TransferConfig
    from mlake.loading import load_model
    from mlake.method_settings import resolve_method, set_fields
    from mlake.session import load_dataset, stage_context
    from mlake.settings import DataSettings, ModelSettings, RunSettings
    from mlake.stages.knowledge import knowledge_stage
    from mlake.stages.neurons import neurons_stage
    from mlake.stages.relate import relate_stage
    from mlake.stages.transfer import transfer_stage
    from mlake_core.data.selection import select_facts
    from mlake_core.editing import get_method
    from mlake_core.editing.covariance import mlake_corpus
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from mlake_core.models.mlake_tiny import TinyTrainConfig, ensure_tiny
    from mlake_core.results.store import open_run

    entry = get_method(config.method)
    entry.config_cls(**dict(config.method_config))  # a bad field fails before any training
    tconfig = TransferConfig(n_locality=config.n_locality)
    kconfig = KnowledgeConfig(mcqa=False, max_new_tokens=tconfig.max_new_tokens)
    nconfig = NeuronConfig(methods=("ig",), ablation_facts=config.ablation_facts)
    rconfig = RelateConfig(n_boot=config.n_boot, n_perm=0, seed=config.seed)
    base = TinyTrainConfig(langs=tuple(langs), facts=config.train_facts)
    data = DataSettings(
        langs=tuple(langs),
        facts=config.facts,
        version=base.data_version,
        data_dir=str(data_dir) if data_dir is not None else None,
    )
    run = RunSettings(
        seed=config.seed,
        batch_size=batch_size,
        results_dir=str(results_dir) if results_dir is not None else None,
    )
    sweep = None
    summary_config = config.to_dict()
    points: list[dict[str, Any]] = []
    dataset = None
    for fraction in config.fractions:
        tiny = replace(base, bilingual_fraction=fraction)
        path = ensure_tiny(tiny, data_dir=data_dir, progress=log, show_bar=False)
        if dataset is None:
            dataset = load_dataset(data)
        loaded = load_model(ModelSettings(name=str(path), backend=backend, device=device), log=log)
        meta = loaded.tiny_metadata or {}
        selection = select_facts(dataset, config.facts, loaded.trained_facts)
        ctx = stage_context(loaded, dataset, selection, data, run, log)
        method = resolve_method(
            entry.name,
            loaded.adapter,
            loaded.path,
            given=config.method_config,
            results_dir=run.results_dir,
            log=log,
        )
        method_fields = {k: str(v) for k, v in set_fields(method.config).items()}
        if sweep is None:
            # Keyed by the method settings in effect (FT on mlake-tiny: those the model brings).
            summary_config = {**config.to_dict(), "method_config": method_fields}
            sweep = open_run("sweep", {"config": summary_config, "langs": list(langs)}, results_dir)
            sweep.write_meta(status="running", config=summary_config)
        # Knowledge is measured on the edited facts plus the next POOL_EXTRA ones (the
        # locality sample is drawn from those): the whole 300-fact pool would cost 3x more.
        pool = list(selection.pool[: config.facts + POOL_EXTRA])
        if log:
            log(f"sweep: fraction {fraction}: {path}")
        knowledge, krun = knowledge_stage(ctx.with_facts(pool), kconfig)
        neurons, nrun = neurons_stage(ctx, nconfig, knowledge=knowledge)
        rows, trun = transfer_stage(
            ctx,
            entry.name,
            method.config,
            tconfig,
            knowledge=knowledge,
            locality_pool=pool,
            corpus=mlake_corpus(dataset),
            on_edit=on_edit,
            knowledge_run=str(krun.path),
        )
        related, rrun = relate_stage(
            trun.path,
            dataset,
            rconfig,
            knowledge_dir=krun.path,
            neurons_dir=nrun.path,
            results_dir=results_dir,
            log=log,
        )
        overlap = nrun.load_table("overlap_ig_neuron")
        point = point_summary(
            fraction,
            overlap,
            rows,
            related.fits.get("logistic"),
            n_boot=config.n_boot,
            seed=config.seed,
        )
        point["model"] = str(path)
        point["method_config"] = method_fields
        point["runs"] = {
            "knowledge": str(krun.path),
            "neurons": str(nrun.path),
            "transfer": str(trun.path),
            "relate": str(rrun.path),
        }
        point["training"] = {
            k: meta.get(k)
            for k in ("epochs", "train_seconds", "train_accuracy_teacher_forced", "stopped")
            if k in meta
        }
        points.append(point)
        sweep.save_json("summary", {"config": summary_config, "points": points})
        del loaded, ctx, neurons
    assert sweep is not None  # at least two fractions
    summary = {"config": summary_config, "points": points, "dose_response": dose_response(points)}
    sweep.save_json("summary", summary)
    sweep.write_meta(status="complete")
    return summary, sweep
