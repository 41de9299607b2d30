"""The relation stage: read the saved runs of the other stages and relate sharing to transfer.

Inputs are run folders of the results store (:mod:`mlake_core.results.store`):

* a **transfer** run (``mlake edit transfer``, one method): the outcome, per fact and pair;
* its **knowledge** run (recorded in the transfer run's meta; else found in the same results
  root by model and data version): log p(new answer) before the edit;
* a **neurons** run (``mlake neurons``): each fact's overlap between two languages' important
  units, and the 5x5 mean overlap matrices;
* optionally a **tracing** run (``mlake trace``): 5x5 tracing-profile similarity;
* optionally a **probes** run (``mlake probe``): 5x5 probe transfer and representation
  similarity;
* optionally **restricted** transfer runs (FT restricted to shared / random neurons): each is
  compared with the main transfer run on the same facts;
* optionally a **lens-edit** run (``mlake lens --method M --edits N``, the transfer run's
  method) and a **patching** run (``mlake patch``): the predictors
  :data:`analysis.relate.INTERVENTION_PREDICTORS` (B follows A at the best layer, edit
  carried, the new answer decodable at B's subject / last position after the edit), per fact
  and per pair, beside the neuron overlap with the same statistics.

Runs not given are looked up in the transfer run's results root by model identity (the
newest complete one that covers the facts); what was used is recorded in the result.  The
statistics are :mod:`analysis.relate`'s and the result is
:class:`analysis.relate_result.RelateResult` (a transfer run read back:
:class:`analysis.transfer.TransferRun`); this module only finds, reads, joins and saves.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from analysis.relate import (
    CONTROLS,
    INTERVENTION_PREDICTORS,
    Difference,
    RelateConfig,
    fact_level,
    fact_table,
    join_measures,
    lens_measures,
    measure_matrices,
    pair_level,
    paired_difference,
    patching_measures,
    string_controls,
)
from analysis.relate_result import RelateResult, load_relate_result
from analysis.transfer import TransferRun, load_transfer
from mlake_core.errors import DataError
from mlake_core.metrics.knowledge import KnowledgeResult
from mlake_core.provenance import stable_hash
from mlake_core.results.store import Run, open_run

__all__ = [
    "RelateResult",
    "TransferRun",
    "compare_edits",
    "find_run",
    "load_knowledge_table",
    "load_relate_result",
    "load_transfer",
    "per_edit",
    "relate_stage",
]

# -- reading runs -----------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: missing") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None


def _kind_of(folder: Path) -> str:
    meta = folder / "meta.json"
    if not meta.is_file():
        raise DataError(f"{folder}: not a run folder of the results store (no meta.json)")
    return str(_read_json(meta).get("kind", ""))


def _check_kind(folder: Path, kind: str, option: str) -> Path:
    if not (folder / "meta.json").is_file():
        raise DataError(
            f"{option} {folder}: not a run folder of the results store (no meta.json); "
            f"expected a {kind} run"
        )
    found = _kind_of(folder)
    if found != kind:
        raise DataError(f"{option} {folder}: a {found or 'unknown'} run, expected a {kind} run")
    return folder


def find_run(
    root: Path,
    kind: str,
    model: Mapping[str, Any],
    *,
    covers: Sequence[int] = (),
    accept: Callable[[Mapping[str, Any]], bool] | None = None,
) -> Path | None:
    """The complete run of ``kind`` under ``root`` made on the same model (same weights hash
    and backend) whose facts include ``covers`` (and whose key ``accept`` takes, when given):
    the one with the most facts, then the newest; None if there is none."""
    folder = root / kind
    if not folder.is_dir():
        return None
    best: tuple[int, float, Path] | None = None
    for cand in folder.iterdir():
        if not cand.is_dir():
            continue
        try:
            key = _read_json(cand / "key.json")
            meta = _read_json(cand / "meta.json")
        except DataError:
            continue
        km = key.get("model") or {}
        if km.get("weights") != model.get("weights") or km.get("backend") != model.get("backend"):
            continue
        if meta.get("status") != "complete":
            continue
        if accept is not None and not accept(key):
            continue
        facts = set(meta.get("fact_ids") or [])
        if covers and facts and not set(covers) <= facts:
            continue
        rank = (len(facts), (cand / "meta.json").stat().st_mtime, cand)
        if best is None or rank[:2] > best[:2]:
            best = rank
    return best[2] if best else None


def load_knowledge_table(folder: Path) -> pd.DataFrame:
    """The knowledge stage's per-language tables, concatenated
    (:meth:`~mlake_core.metrics.knowledge.KnowledgeResult.load`)."""
    _check_kind(folder, "knowledge", "--knowledge")
    return KnowledgeResult.load(folder).table


def neuron_matrices(folder: Path, langs: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The 5x5 mean same-fact overlap (Jaccard) of every method and unit of a neuron run,
    named ``neuron_jaccard_<method>_<unit>``."""
    summary = _read_json(folder / "summary.json")
    order = list(summary.get("langs") or langs)
    out = {}
    for m in summary.get("methods", []):
        if m.get("jaccard") is None:
            continue
        frame = pd.DataFrame(m["jaccard"], index=order, columns=order)
        out[f"neuron_jaccard_{m['method']}_{m['unit']}"] = frame
    return out


def tracing_matrices(folder: Path, langs: Sequence[str]) -> dict[str, pd.DataFrame]:
    """The 5x5 tracing-profile similarity of a tracing run, per kind of restoration."""
    summary = _read_json(folder / "summary.json")
    order = list(summary.get("langs") or langs)
    return {
        f"tracing_similarity_{kind}": pd.DataFrame(values, index=order, columns=order)
        for kind, values in (summary.get("similarity") or {}).items()
    }


def probe_matrices(folder: Path) -> dict[str, pd.DataFrame]:
    """The probe run's 5x5 matrices (:func:`mlake.stages.probes.pair_matrices`).

    Raises:
        DataError: the probes package is missing, or the run has no cross-lingual accuracy
            to choose a layer by (too few facts); the caller leaves probes out with a note.
    """
    try:
        from mlake.stages import probes as probe_stage
    except ImportError as err:  # pragma: no cover - the probes package ships with mlake
        raise DataError(
            f"--probes {folder}: the probes package cannot be imported ({err})"
        ) from err
    result = probe_stage.load_probe_result(folder)
    try:
        return dict(probe_stage.pair_matrices(result))
    except KeyError as err:  # no cross-lingual accuracy to choose a layer by (too few facts)
        raise DataError(f"{folder}: {err.args[0] if err.args else err}") from None


def _run_method(folder: Path) -> tuple[str, int]:
    """The editing method and edits per language of a lens-edit or patching run's key."""
    config = _read_json(folder / "key.json").get("config") or {}
    return str(config.get("method", "none")), int(config.get("edits", 0) or 0)


def _split_name(stem: str, prefix: str, langs: Sequence[str], parts: int) -> list[str] | None:
    """``<prefix><lang>_[<lang>_]<fact>`` split into its languages and fact (languages may
    hold underscores: they are matched against ``langs``)."""
    rest = stem.removeprefix(prefix)
    out: list[str] = []
    for _ in range(parts):
        hit = next((lang for lang in langs if rest.startswith(f"{lang}_")), None)
        if hit is None:
            return None
        out.append(hit)
        rest = rest[len(hit) + 1 :]
    return [*out, rest] if rest.isdigit() else None


def patching_table(folder: Path, method: str) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The patching predictors per (fact, A, B) of a patching run
    (:func:`analysis.relate.patching_measures`), read from its saved patches; the edit patches
    only when the run's edits are ``method``'s.  Also what was read (best layers, counts).

    Raises:
        DataError: not a complete patching run (naming the folder).
    """
    from analysis.patching import POSITIONS as PATCH_POSITIONS
    from analysis.patching import CounterfactualPatch, EditPatch, PatchingResult

    result = PatchingResult.load(folder)
    langs = list(result.langs)
    best = {
        pos: (result.counterfactual.get(pos) or {}).get("best_layer") for pos in PATCH_POSITIONS
    }
    cf = []
    for path in sorted((folder / "arrays").glob("cf_*.npz")):
        parts = _split_name(path.stem, "cf_", langs, 2)
        if parts is not None:
            cf.append((parts[0], parts[1], CounterfactualPatch.load(path)))
    edits = []
    run_method, n_edits = _run_method(folder)
    if run_method == method and n_edits > 0:
        for path in sorted((folder / "arrays").glob("edit_*.npz")):
            parts = _split_name(path.stem, "edit_", langs, 1)
            if parts is not None:
                edits.append((parts[0], int(parts[1]), EditPatch.load(path)))
    info = {
        "best_layer": best,
        "counterfactual_patches": len(cf),
        "edit_patches": len(edits),
        "method": run_method,
    }
    return patching_measures(cf, edits, best), info


def lens_table(folder: Path) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The lens predictors per (fact, A, B) of a lens-edit run
    (:func:`analysis.relate.lens_measures`), read from its saved edit lenses, and what was
    read.

    Raises:
        DataError: not a complete lens-edit run (naming the folder).
    """
    from analysis.failures import latent_layers
    from analysis.lens import EditLensResult

    result = EditLensResult.load(folder)
    lenses = [lens for a in result.langs for lens in result.lenses(a)]
    info = {
        "method": result.method,
        "top_k": result.top_k,
        "lens": result.lens,
        "edits": len(lenses),
        "latent_layers": list(latent_layers(result.n_layers)),
    }
    return lens_measures(lenses, result.top_k), info


# -- the stage --------------------------------------------------------------------------------


def per_edit(rows: pd.DataFrame, before: pd.DataFrame, form: str = "question") -> pd.DataFrame:
    """Per (fact, edit language): efficacy, transfer (mean over test languages where the
    fact was known before), gain (mean log-probability gain of the new answer over those) and
    locality; the units restricted editing is compared on."""
    pre = before[before["form"] == form][["fact_id", "lang", "edit_alias_logp"]].rename(
        columns={"lang": "test_lang", "edit_alias_logp": "logp_before"}
    )
    sel = rows[rows["form"] == form].merge(pre, on=["fact_id", "test_lang"], how="left")
    sel = sel.assign(
        gain=np.log(np.clip(sel["p_new"].to_numpy(dtype=float), 1e-300, None))
        - np.maximum(sel["logp_before"].to_numpy(dtype=float), -690.0)
    )
    keys = ["fact_id", "edit_lang"]
    eff = sel[sel["kind"] == "efficacy"].groupby(keys)["success_greedy"].mean()
    tr = sel[(sel["kind"] == "transfer") & sel["known_before"].astype(bool) & (sel["n"] > 0)]
    loc = rows[rows["kind"] == "locality"].groupby(keys)["success_greedy"].mean()
    return pd.DataFrame(
        {
            "efficacy": eff,
            "transfer": tr.groupby(keys)["success_greedy"].mean(),
            "transfer_prob": tr.groupby(keys)["success_prob"].mean(),
            "gain": tr.groupby(keys)["gain"].mean(),
            "locality": loc,
        }
    )


def compare_edits(
    base: pd.DataFrame, other: pd.DataFrame, *, n_boot: int, level: float, seed: int
) -> dict[str, Difference]:
    """Paired differences (other - base) of :func:`per_edit`'s metrics on the edits both
    have (same fact and edit language, value defined in both), averaged per fact over edit
    languages first, so the bootstrap resamples facts."""
    out = {}
    for metric in ("efficacy", "transfer", "transfer_prob", "gain", "locality"):
        both = pd.concat(
            [base[metric].rename("a"), other[metric].rename("b")], axis=1, join="inner"
        ).dropna()
        a = both["a"].groupby(level="fact_id").mean()
        b = both["b"].groupby(level="fact_id").mean()
        out[metric] = paired_difference(a, b, n_boot=n_boot, level=level, seed=seed)
    return out


def _tokenizer(model_path: str | None) -> tuple[Callable[[str], list[int]] | None, str | None]:
    if not model_path:
        return None, "no model path in the transfer run: token controls left out"
    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(model_path)
    except Exception as err:
        return (
            None,
            f"tokenizer of {model_path} not loadable ({type(err).__name__}): token controls left out",
        )
    return (lambda text: tok(text, add_special_tokens=False)["input_ids"]), None


def relate_stage(
    transfer_dir: str | os.PathLike[str],
    dataset: Any,
    config: RelateConfig,
    *,
    knowledge_dir: str | os.PathLike[str] | None = None,
    neurons_dir: str | os.PathLike[str] | None = None,
    tracing_dir: str | os.PathLike[str] | None = None,
    probes_dir: str | os.PathLike[str] | None = None,
    restricted: Sequence[str | os.PathLike[str]] = (),
    unit: str = "ig_neuron",
    results_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
    lens_dir: str | os.PathLike[str] | None = None,
    patching_dir: str | os.PathLike[str] | None = None,
) -> tuple[RelateResult, Run]:
    """Relate the neuron overlap (and the other pair-level views, and the lens and patching
    predictors) to the transfer of one transfer run (module docstring).  The result is cached
    keyed by the input runs (their keys and contents) and ``config``.

    Raises:
        DataError: a missing or wrong-kind run, a neuron run without the ``unit`` table, or a
            lens-edit or patching run of another editing method than the transfer run's
            (naming the option).
    """
    main = load_transfer(transfer_dir)
    root = main.path.parent.parent
    model = main.key.get("model") or {}
    fact_ids = [int(f) for f in main.meta.get("fact_ids") or sorted(main.rows["fact_id"].unique())]
    langs = list(main.meta.get("langs") or main.key.get("langs") or [])
    if not langs:
        raise DataError(f"{main.path}: the run records no languages")
    notes: list[str] = []

    def same_method(key: Mapping[str, Any]) -> bool:
        config = key.get("config") or {}
        return str(config.get("method")) == main.method and int(config.get("edits") or 0) > 0

    accepts = {"lens_edits": same_method, "patching": same_method}

    def pick(given: Any, kind: str, option: str, required: bool) -> Path | None:
        if given:
            folder = _check_kind(Path(given), kind, option)
            if kind in accepts:
                method, n_edits = _run_method(folder)
                if kind == "lens_edits" and method != main.method:
                    raise DataError(
                        f"{option} {folder}: a lens run of {method} edits; the transfer run "
                        f"{main.path} edits with {main.method}"
                    )
                if kind == "patching" and n_edits > 0 and method != main.method:
                    raise DataError(
                        f"{option} {folder}: a patching run of {method} edits; the transfer "
                        f"run {main.path} edits with {main.method}"
                    )
            return folder
        found = find_run(
            root,
            kind,
            model,
            covers=fact_ids if kind != "tracing" else (),
            accept=accepts.get(kind),
        )
        if found is None and required:
            raise DataError(
                f"no complete {kind} run for this model under {root}; run `mlake {kind}` on "
                f"the same model (or give {option} RUN_DIR)"
            )
        if found is None:
            notes.append(f"no {kind} run found for this model under {root}: left out")
        elif log:
            log(f"relate: {kind} run {found}")
        return found

    recorded = main.meta.get("knowledge_run")
    if recorded and not (Path(recorded) / "meta.json").is_file():
        notes.append(f"the recorded knowledge run {recorded} is gone: searched instead")
        recorded = None
    knowledge = pick(knowledge_dir or recorded, "knowledge", "--knowledge", True)
    neurons = pick(neurons_dir, "neurons", "--neurons", True)
    tracing = pick(tracing_dir, "tracing", "--tracing", False)
    probes = pick(probes_dir, "probes", "--probes", False) if probes_dir else None
    if probes is None and not probes_dir:
        probes = find_run(root, "probes", model)
    lens_run = pick(lens_dir, "lens_edits", "--lens-run", False)
    patching_run = pick(patching_dir, "patching", "--patching-run", False)
    others = [load_transfer(p) for p in restricted]
    assert knowledge is not None and neurons is not None
    overlap_table = neurons / "tables" / f"overlap_{unit}.parquet"
    if not overlap_table.is_file():
        have = sorted(
            p.stem.removeprefix("overlap_") for p in (neurons / "tables").glob("overlap_*")
        )
        raise DataError(
            f"--unit {unit}: {neurons} has no such overlap table (it has: {', '.join(have)})"
        )

    def digest(folder: Path | None) -> str | None:
        if folder is None:
            return None
        files = sorted(
            p for p in folder.rglob("*") if p.is_file() and p.suffix in (".json", ".parquet")
        )
        return stable_hash(
            [(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        )

    inputs: dict[str, Any] = {
        "transfer": str(main.path),
        "knowledge": str(knowledge),
        "neurons": str(neurons),
        "tracing": str(tracing) if tracing else None,
        "probes": str(probes) if probes else None,
        "restricted": [str(o.path) for o in others],
        "lens_edits": str(lens_run) if lens_run else None,
        "patching": str(patching_run) if patching_run else None,
    }
    key = {
        "inputs": inputs,
        "digests": {k: digest(Path(v)) for k, v in inputs.items() if isinstance(v, str)},
        "restricted_digests": [digest(o.path) for o in others],
        "config": config.to_dict(),
        "unit": unit,
    }
    run = open_run("relate", key, results_dir or root)
    if run.complete and run.has_json("summary"):
        if log:
            log(f"relate: loaded from {run.path}")
        return RelateResult.from_dict(run.load_json("summary")), run
    run.write_meta(status="running", inputs=inputs)

    before = load_knowledge_table(knowledge)
    overlap = pd.read_parquet(overlap_table)
    if overlap.empty:  # no fact attributed in two languages (a few facts, little known)
        overlap = pd.DataFrame(columns=["fact_id", "lang_a", "lang_b", config.overlap])
        notes.append(
            "no fact was attributed in two languages, so no fact has an overlap: the fact-level "
            "model has no rows"
        )
    texts = {}
    for fact_id in fact_ids:
        fact = dataset.fact(fact_id)
        for lang in langs:
            view = fact.views.get(lang)
            if view is None or not view.subject.text:
                continue
            texts[(fact_id, lang)] = (view.subject.text, view.record.e_answer)
    tokenize, note = _tokenizer(model.get("path"))
    if note:
        notes.append(note)
    controls = string_controls(texts, tokenize)
    measures = []
    if patching_run:
        ptable, pinfo = patching_table(patching_run, main.method)
        inputs["patching_read"] = pinfo
        if not pinfo["edit_patches"]:
            notes.append(
                f"the patching run {patching_run} has no {main.method} edit patches: "
                "patch_carried left out"
            )
        measures.append(ptable)
    if lens_run:
        ltable, linfo = lens_table(lens_run)
        inputs["lens_edits_read"] = linfo
        measures.append(ltable)
    extra = join_measures(*measures) if measures else None
    table = fact_table(main.rows, before, overlap, controls, config, extra)
    fits = fact_level(table.rows, config)
    predictor_fits: dict[str, Any] = {}
    missing: dict[str, int] = {}
    for name in INTERVENTION_PREDICTORS:
        if extra is None or name not in extra.columns or extra[name].notna().sum() == 0:
            continue
        rows, missing[name] = table.with_predictor(name)
        predictor_fits[name] = fact_level(rows, config, predictor=name)

    predictors = neuron_matrices(neurons, langs)
    if tracing:
        predictors.update(tracing_matrices(tracing, langs))
    if probes:
        try:
            predictors.update(probe_matrices(probes))
        except DataError as err:
            notes.append(f"probes left out: {err}")
    if extra is not None:
        predictors.update(measure_matrices(extra, langs))
    sel = main.rows[
        (main.rows["kind"] == "transfer")
        & (main.rows["form"] == config.form)
        & main.rows["known_before"].astype(bool)
        & (main.rows["n"] > 0)
    ]
    transfer_m = sel.pivot_table(
        index="edit_lang", columns="test_lang", values=config.outcome, aggfunc="mean"
    )
    gain_m = table.rows.pivot_table(
        index="edit_lang", columns="test_lang", values="gain", aggfunc="mean"
    )
    outcomes = {
        "transfer": transfer_m.reindex(index=langs, columns=langs),
        "gain": gain_m.reindex(index=langs, columns=langs),
    }
    pl = pair_level(predictors, outcomes, langs)
    by_pair = (
        table.rows.groupby(["edit_lang", "test_lang"])
        .agg(
            rows=("success", "size"),
            overlap=("overlap", "mean"),
            transfer=("success", "mean"),
            gain=("gain", "mean"),
        )
        .reset_index()
    )
    interventions = []
    if others:
        base = per_edit(main.rows, before, config.form)
        for other in others:
            diffs = compare_edits(
                base,
                per_edit(other.rows, before, config.form),
                n_boot=config.n_boot,
                level=config.level,
                seed=config.seed,
            )
            interventions.append(
                {
                    "label": other.label,
                    "run": str(other.path),
                    "against": main.label,
                    "units": (other.meta.get("unit_set_sizes") or {}),
                    "differences": {k: v.to_dict() for k, v in diffs.items()},
                }
            )
    result = RelateResult(
        config=config.to_dict(),
        langs=langs,
        inputs=inputs,
        method=main.label,
        unit=unit,
        predictors=predictors,
        outcomes=outcomes,
        pair_level=pl,
        fits=fits,
        n_rows=len(table.rows),
        n_facts=int(table.rows["fact_id"].nunique()) if len(table.rows) else 0,
        dropped=table.dropped,
        by_pair=by_pair,
        interventions=interventions,
        notes=notes,
        predictor_fits=predictor_fits,
        missing=missing,
    )
    run.save_table("facts", table.rows)
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", controls=list(CONTROLS))
    return result, run
