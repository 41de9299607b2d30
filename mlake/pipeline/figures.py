"""Every paper figure of a pipeline run folder, as PDF and PNG (``mlake figures RUN_DIR``).

The run folder's ``manifest.json`` names each stage's run in the results store; each figure
is drawn from the stage's saved result (nothing is recomputed):

=============================  ===========================================================
file (``figures/<name>``)       from
=============================  ===========================================================
``transfer_matrices``          transfer runs (one panel per method, restricted FT included)
``protocol_matrices_<label>``  transfer: one method's MLaKE-protocol tables, multi-hop (and
                               multiple choice, where measured) beside free-form
``tracing_map_<kind>``         tracing: average indirect effect by position and layer, per
                               language (one file per traced kind)
``tracing_profiles``           tracing: effect by layer per language
``tracing_fact_<lang>``        tracing: one fact's heatmaps with its real tokens, per language
``tracing_similarity``         tracing: 5x5 profile similarity
``lens_last``                  lens: per prompt language, the answer in each language by
                               layer at the last position (and the latent English curve)
``lens_subject_last``          lens: the same at the subject's last token
``lens_edits_<lang>``          lens (with ``lens.method``): before and after the edits in
                               one edit language, a panel per test language
``lens_failures``              lens (with ``lens.method``): where the edits' transfer fails,
                               a matrix per outcome (``mlake lens --failures``)
``patching_matrices``          patching: 5x5 B-follows-A and edit-carried matrices at the
                               best layer, per patched position
``patching_layers``            patching: follow and edit-carried rates by layer
``neuron_overlap_<unit>``      neurons: same-fact overlap matrices per attribution method
``unit_counts_<method>``       neurons: language-specific and shared units per layer
``ablation_<method>``          neurons: the ablation matrix (specific vs random units)
``sharing_vs_transfer_<m>``    relate: overlap against transfer per language pair
``restricted_editing``         relate: restricted minus unrestricted FT, with intervals
``relate_predictors_<m>``      relate (with lens-edit or patching runs): each lens and
                               patching predictor against transfer per language pair
``probe_accuracy``             probes: accuracy by layer (language identity, cross-lingual)
``probe_transfer_by_layer``    probes: per training language, a line per test language
``sweep_dose_response``        a sharing sweep's points (``--sweep``), when given
=============================  ===========================================================

A stage that did not run (or whose result is missing) is skipped with a logged note; the
list of what was written and skipped is saved as ``figures/index.json``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

#: Draws one figure.
Maker = Callable[[], Any]
#: Formats every figure is saved in.
FORMATS: tuple[str, ...] = ("pdf", "png")


def _save(fig: Any, folder: Path, name: str) -> list[Path]:
    import matplotlib.pyplot as plt

    paths = []
    for fmt in FORMATS:
        path = folder / f"{name}.{fmt}"
        fig.savefig(path, format=fmt)
        paths.append(path)
    plt.close(fig)
    return paths


def _runs(manifest: dict[str, Any], stage: str) -> dict[str, str]:
    entry = (manifest.get("stages") or {}).get(stage) or {}
    return dict(entry.get("runs") or {}) if entry.get("status") == "complete" else {}


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _fact_trace_figure(path: Path, kinds: Any) -> Any:
    """The ROME-style heatmaps of one saved fact trace (``trace_<lang>_<fact>.npz``)."""
    import numpy as np

    from analysis.tracing.causal import FactTrace
    from figures.tracing import trace_heatmap

    with np.load(path, allow_pickle=False) as data:
        trace = FactTrace.from_arrays({k: data[k] for k in data.files})
    _, lang, fact = path.stem.split("_")
    return trace_heatmap(trace, list(kinds), title=f"fact {fact} ({lang})")


def _protocol_fig(rows: Any, langs: Sequence[str], label: str) -> Any:
    """:func:`figures.editing.protocol_matrices` of one transfer run's rows."""
    from analysis.transfer import protocol_cells
    from figures import editing

    return editing.protocol_matrices(protocol_cells(rows, langs), langs, title=label)


def _failure_figure(edits_dir: str) -> Any:
    """The failure matrices of a lens-edit run (classified from its saved edit lenses, as the
    report's 'Where transfer fails' table is)."""
    from analysis.lens import EditLensResult
    from figures.failures import failure_matrices
    from mlake.stages.lens import edit_failures

    result = edit_failures(EditLensResult.load(edits_dir))
    return failure_matrices(result, result.methods[0])


def figure_makers(
    manifest: dict[str, Any], sweep: str | os.PathLike[str] | None = None
) -> list[tuple[str, Callable[[], Any] | str]]:
    """``(name, make)`` for every figure of the run: ``make()`` returns the Figure, or, in
    place of ``make``, a string saying why the figure cannot be drawn."""
    from analysis.neurons.config import NeuronResult
    from analysis.relate_result import load_relate_result
    from analysis.tracing.summary import TracingResult
    from analysis.transfer import load_transfer, transfer_matrix
    from figures import editing, lens, neurons, relate, tracing

    makers: list[tuple[str, Maker | str]] = []

    # Edit transfer: every transfer run, restricted ones after the unrestricted.
    transfer_runs = {**_runs(manifest, "transfer"), **_runs(manifest, "restricted")}
    if transfer_runs:
        loaded = {label: load_transfer(path) for label, path in transfer_runs.items()}
        langs = list(next(iter(loaded.values())).meta.get("langs") or [])

        def transfer_fig() -> Any:
            matrices = {k: transfer_matrix(v.rows) for k, v in loaded.items()}
            counts = {k: editing.transfer_counts(v.rows) for k, v in loaded.items()}
            return editing.transfer_matrices(matrices, langs, counts=counts)

        makers.append(("transfer_matrices", transfer_fig))
        # The MLaKE protocol's tables: multi-hop (and multiple choice, where measured)
        # beside the free-form matrix, one figure per method.
        for label, tr_run in loaded.items():
            makers.append(
                (
                    f"protocol_matrices_{label}",
                    partial(_protocol_fig, tr_run.rows, langs, label),
                )
            )
    else:
        makers.append(("transfer_matrices", "no transfer stage in the run"))

    # Causal tracing.
    trace_dir = _runs(manifest, "tracing").get("tracing")
    if trace_dir and (Path(trace_dir) / "summary.json").is_file():
        result = TracingResult.from_dict(_read_json(Path(trace_dir) / "summary.json"))
        for kind in result.kinds:
            makers.append((f"tracing_map_{kind}", partial(tracing.average_effects, result, kind)))
        makers.append(("tracing_profiles", partial(tracing.profiles, result)))
        # One traced fact per language with its real tokens (CJK drawn with Noto Sans CJK).
        for lang in result.langs:
            first = sorted(
                (Path(trace_dir) / "arrays").glob(f"trace_{lang}_*.npz"),
                key=lambda p: int(p.stem.rsplit("_", 1)[1]),
            )[:1]
            for trace_file in first:
                makers.append(
                    (f"tracing_fact_{lang}", partial(_fact_trace_figure, trace_file, result.kinds))
                )
        makers.append(("tracing_similarity", partial(tracing.similarity_heatmap, result)))
    else:
        makers.append(("tracing_map_mlp", "no tracing stage in the run"))

    # Latent-language lens.
    lens_dir = _runs(manifest, "lens").get("lens")
    if lens_dir and (Path(lens_dir) / "summary.json").is_file():
        from analysis.lens import POSITIONS, LensResult

        lres = LensResult.from_dict(_read_json(Path(lens_dir) / "summary.json"))
        for position in reversed(POSITIONS):  # the last position first
            makers.append((f"lens_{position}", partial(lens.answer_probabilities, lres, position)))
    else:
        makers.append(("lens_last", "no lens stage in the run"))
    edits_dir = _runs(manifest, "lens").get("lens_edits")
    if edits_dir and (Path(edits_dir) / "summary.json").is_file():
        from analysis.lens import EditLensResult

        eres = EditLensResult.from_dict(_read_json(Path(edits_dir) / "summary.json"))
        for lang in eres.langs:  # one figure per edit language
            if eres.edits.get(lang):
                makers.append((f"lens_edits_{lang}", partial(lens.edit_curves, eres, lang)))
        if any(eres.edits.values()):
            makers.append(("lens_failures", partial(_failure_figure, edits_dir)))

    # Cross-lingual patching.
    patch_dir = _runs(manifest, "patching").get("patching")
    if patch_dir and (Path(patch_dir) / "summary.json").is_file():
        from analysis.patching import PatchingResult
        from figures import patching

        patched = PatchingResult.from_dict(_read_json(Path(patch_dir) / "summary.json"))
        makers.append(("patching_matrices", partial(patching.matrices, patched)))
        makers.append(("patching_layers", partial(patching.layer_curves, patched)))
    else:
        makers.append(("patching_matrices", "no patching stage in the run"))

    # Neurons.
    neuron_dir = _runs(manifest, "neurons").get("neurons")
    if neuron_dir and (Path(neuron_dir) / "summary.json").is_file():
        nres = NeuronResult.from_dict(_read_json(Path(neuron_dir) / "summary.json"))
        for unit in sorted({m.unit for m in nres.methods if m.per_fact}):
            makers.append((f"neuron_overlap_{unit}", partial(neurons.overlap_matrices, nres, unit)))
        for m in nres.methods:
            if m.unit != "neuron":
                continue
            makers.append((f"unit_counts_{m.method}", partial(neurons.unit_counts, nres, m.method)))
            has_ablation = any(v is not None and v == v for row in m.ablation for v in row)
            if has_ablation:
                makers.append(
                    (f"ablation_{m.method}", partial(neurons.ablation_matrix, nres, m.method))
                )
    else:
        makers.append(("neuron_overlap_neuron", "no neurons stage in the run"))

    # Relation.
    relate_runs = _runs(manifest, "relate")
    if relate_runs:
        for label, path in relate_runs.items():
            rres = load_relate_result(path)
            if rres.by_pair is None or len(rres.by_pair) == 0:
                makers.append(
                    (
                        f"sharing_vs_transfer_{label}",
                        "no language pair has both an overlap and a transfer rate (too few "
                        "facts known in two languages)",
                    )
                )
            else:
                makers.append(
                    (f"sharing_vs_transfer_{label}", partial(relate.sharing_vs_transfer, rres))
                )
            if rres.interventions:
                makers.append(("restricted_editing", partial(relate.restricted_editing, rres)))
            if rres.predictor_fits:  # the lens and patching runs' predictors
                makers.append(
                    (f"relate_predictors_{label}", partial(relate.predictors_vs_transfer, rres))
                )
    else:
        makers.append(("sharing_vs_transfer", "no relate stage in the run"))

    # Probes.
    probe_dir = _runs(manifest, "probes").get("probes")
    if probe_dir:
        try:
            from figures import probes as probe_figures
            from probes.config import load_probe_result

            pres = load_probe_result(probe_dir)
            makers.append(("probe_accuracy", partial(probe_figures.accuracy_by_layer, pres)))
            if hasattr(probe_figures, "probe_accuracy_by_layer") and pres.tasks():
                makers.append(
                    (
                        "probe_transfer_by_layer",
                        partial(probe_figures.probe_accuracy_by_layer, pres),
                    )
                )
        except ImportError as err:
            makers.append(("probe_accuracy", f"the probes package cannot be imported ({err})"))
    else:
        note = ((manifest.get("stages") or {}).get("probes") or {}).get("note")
        makers.append(("probe_accuracy", note or "no probes stage in the run"))

    # Sweep (run separately: `mlake sharing-sweep`).
    if sweep is not None:
        given = Path(sweep)
        summary = given / "summary.json" if given.is_dir() else given
        points = _read_json(summary).get("points") or []
        makers.append(("sweep_dose_response", partial(relate.sweep_dose_response, points)))
    else:
        makers.append(("sweep_dose_response", "no sweep given (mlake figures --sweep DIR)"))
    return makers


def write_figures(
    out: str | os.PathLike[str],
    *,
    sweep: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """Draw every figure of the pipeline run folder ``out`` into ``out/figures`` (PDF and
    PNG); returns the files written.  ``figures/index.json`` lists them and the skipped ones
    with the reason.

    Raises:
        DataError: ``out`` is not a pipeline run folder.
    """
    from mlake.pipeline.manifest import read_manifest

    out = Path(out)
    manifest = read_manifest(out)
    folder = out / "figures"
    folder.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    index: dict[str, Any] = {"written": {}, "skipped": {}}
    for name, make in figure_makers(manifest, sweep):
        if isinstance(make, str):
            index["skipped"][name] = make
            if log:
                log(f"figures: {name} skipped: {make}")
            continue
        paths = _save(make(), folder, name)
        written += paths
        index["written"][name] = [p.name for p in paths]
    (folder / "index.json").write_text(
        json.dumps(index, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
    )
    if log:
        log(f"figures: {len(index['written'])} figures ({len(written)} files) in {folder}")
    return written
