"""The pipeline's patching section: its config (after the lens, before editing; the section
is PatchConfig's, with FT edits for mlake-tiny), the report's matrices at the best layer on a
synthetic run folder, and the figures drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib
import numpy as np
import yaml

from analysis.patching import (
    CounterfactualPatch,
    EditPatch,
    PatchConfig,
    PatchingResult,
    summarize_counterfactual,
    summarize_edits,
)
from mlake.pipeline.config import STAGES, PipelineConfig, dump_config, load_config
from mlake.pipeline.report import build_report

matplotlib.use("Agg")
LANGS = ["en", "zh", "fr"]
N_LAYERS = 3


def _cf(follow_last: list[int]) -> CounterfactualPatch:
    prob = np.zeros((2, N_LAYERS, 2))
    prob[..., 1] = 0.5
    prob[1, :, 0] = [0.9 if f else 0.1 for f in follow_last]
    return CounterfactualPatch(
        prob,
        np.zeros((2, N_LAYERS, 2), int),
        np.array([0.1, 0.8]),
        np.array([5, 0]),
        (1, 2),
        (3, 4),
    )


def _edit(carried_last: list[int], success: bool = True) -> EditPatch:
    rank = np.ones((len(LANGS), 2, 2, N_LAYERS, 2), int)
    rank[:, 0, 1, :, 0] = [0 if c else 3 for c in carried_last]
    return EditPatch(
        prob=np.zeros(rank.shape),
        rank=rank,
        clean_prob=np.zeros((len(LANGS), 2, 2)),
        clean_rank=np.ones((len(LANGS), 2, 2), int),
        target_langs=list(LANGS),
        tokens=np.ones((len(LANGS), 2), int),
        source_success=success,
    )


def _result() -> PatchingResult:
    pairs = {(a, b): [_cf([0, 1, 1 if a == b else 0])] for a in LANGS for b in LANGS}
    pairs[("zh", "fr")] = []
    edits = {"en": [_edit([0, 1, 0]), _edit([1, 1, 1], success=False)], "zh": [_edit([0, 0, 1])]}
    return PatchingResult(
        langs=tuple(LANGS),
        n_layers=N_LAYERS,
        config=PatchConfig().to_dict(),
        counterfactual=summarize_counterfactual(LANGS, pairs, N_LAYERS),
        edits=summarize_edits(LANGS, edits, N_LAYERS),
        skipped={"counterfactual:zh-fr:no other known fact to pair": 1},
        run_path="store/patching/a",
    )


def test_the_patching_section(tmp_path: Path) -> None:
    assert STAGES.index("lens") + 1 == STAGES.index("patching") == STAGES.index("transfer") - 1
    assert PipelineConfig().patching == PatchConfig(method="ft", edits=3)
    path = tmp_path / "c.yaml"
    path.write_text("patching:\n  edits: '0'\n  method: rome\n", encoding="utf-8")
    config = load_config(path)
    assert config.patching == PatchConfig(method="rome", edits=0)
    assert not config.patching.measures_edits
    path.write_text(dump_config(config), encoding="utf-8")
    assert load_config(path) == config
    assert PipelineConfig().seeds()["patching"] == 0


def test_the_summary_and_its_matrices() -> None:
    result = _result()
    assert result.counterfactual["last"]["best_layer"] == 1
    follows = result.matrix("follows", "last")
    assert follows[0, 1] == 1.0 and np.isnan(follows[1, 2])
    assert result.matrix("follows", "last", layer=2)[0, 0] == 1.0
    assert result.edits["n"] == {"en": 1, "zh": 1, "fr": 0}
    assert result.edits["n_failed"]["en"] == 1
    assert result.edits["n_cells"] == [[1, 1, 1], [1, 1, 1], [0, 0, 0]]
    assert result.edits["edited_to_unedited"]["last"]["best_layer"] == 1
    carried = result.matrix("carried", "last")
    assert carried[0, 1] == 1.0 and carried[1, 1] == 0.0 and np.isnan(carried[2, 0])
    assert PatchingResult.from_dict(json.loads(json.dumps(result.to_dict()))) == result


def _run_folder(tmp_path: Path, summary: dict, figures: dict) -> Path:
    out = tmp_path / "run"
    folder = out / "store" / "patching" / "a"
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    manifest = {
        "stages": {
            "patching": {"status": "complete", "seconds": 1.0, "runs": {"patching": str(folder)}}
        }
    }
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    config = {"model": {"name": "mlake-tiny"}, "data": {"version": "v", "facts": 4, "langs": LANGS}}
    (out / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    (out / "figures").mkdir()
    index = {"written": figures, "skipped": {}}
    (out / "figures" / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return out


def test_the_report_section(tmp_path: Path) -> None:
    figures = {"patching_matrices": ["patching_matrices.pdf", "patching_matrices.png"]}
    report = build_report(_run_folder(tmp_path, _result().to_dict(), figures))
    section = report.split("## Cross-lingual patching")[1].split("\n## ")[0]
    assert "B follows A, patched at last, best layer 1 of 3" in section
    assert "| en | 1.00 | 1.00 | 1.00 |" in section  # layer 1: every pair follows
    assert "| zh | 1.00 | 1.00 | - |" in section  # zh -> fr has no pair
    assert "Edit carried (edited A state into the unedited B run), at last, best layer 1" in section
    assert "Edits counted (successful in A): en 1, zh 1, fr 0; failed in A: en 1" in section
    assert "no other known fact to pair 1" in section
    assert (
        "Edits per cell (rows: edit language A, columns: target B): en: 1,1,1; zh: 1,1,1" in section
    )
    assert "![patching_matrices](figures/patching_matrices.png)" in section


def test_the_figures() -> None:
    from figures import patching
    from figures.style import missing_glyphs

    result = _result()
    fig = patching.matrices(result)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 4  # 2 positions x (follows, carried)
    titles = [ax.get_title() for ax in fig.axes if ax.get_title()]
    assert "B follows A, last position\nlayer 1" in titles
    curves = patching.layer_curves(result)
    ax = curves.axes[1]  # the last position
    lines = {line.get_label(): line.get_ydata() for line in ax.get_lines()}
    np.testing.assert_allclose(lines["B = zh"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(lines["A = B"], [0.0, 1.0, 1.0])
    # en -> zh, fr carried at layer 1; zh -> en, fr at layer 2 (fr edited nothing)
    np.testing.assert_allclose(lines["edit carried (A ≠ B)"], [0.0, 0.5, 0.5])
    assert not any(missing_glyphs(t) for t in titles)
    without = PatchingResult(**{**result.__dict__, "edits": {}})
    assert len([ax for ax in patching.matrices(without).axes if ax.get_title()]) == 2
