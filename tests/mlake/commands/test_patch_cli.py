"""``mlake patch`` end to end on the micro mlake-tiny: the report (JSON and text), the results
store, resuming, bad options refused before the model loads, and the pipeline's patching stage
with its figures and report section."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml

from analysis.patching import POSITIONS, CounterfactualPatch, EditPatch, PatchingResult
from mlake.cli import main

matplotlib.use("Agg")
pytestmark = pytest.mark.slow

LANGS = ["en", "zh", "fr"]
N_FACTS = 4
#: FT as the micro model is edited (the settings mlake-tiny brings apply by name).
EDIT = ("--method", "ft", "--edits", "1", "--set", "ft.steps=20")


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def patched(micro_tiny: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("patch_runs")
    args = ("patch", "--model", str(micro_tiny), "--langs", ",".join(LANGS), *EDIT)
    args += ("--facts", str(N_FACTS), "--results-dir", str(root), "--device", "cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--json"]) == 0
    return root, args


def test_report_and_store(patched, capsys) -> None:
    _root, args = patched
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_facts"] == N_FACTS and report["langs"] == LANGS
    assert report["n_layers"] == 2 and report["config"]["method"] == "ft"
    assert report["method_config"]["steps"] == "20"
    run = Path(report["run_path"])
    assert json.loads((run / "meta.json").read_text())["status"] == "complete"
    saved = PatchingResult.load(run).to_dict()
    assert saved == {k: report[k] for k in saved}
    # Every counterfactual cell is the mean of its saved pairs.
    n = report["counterfactual"]["n"]
    for ia, a in enumerate(LANGS):
        for ib, b in enumerate(LANGS):
            files = sorted(run.glob(f"arrays/cf_{a}_{b}_*.npz"))
            assert len(files) == n[ia][ib]
            if not files:
                continue
            pairs = [CounterfactualPatch.load(f) for f in files]
            for i, pos in enumerate(POSITIONS):
                rate = np.mean([p.follows()[i] for p in pairs], axis=0)
                got = [
                    report["counterfactual"][pos]["follows"][layer][ia][ib] for layer in range(2)
                ]
                np.testing.assert_allclose(got, rate, atol=1e-6)
    assert sum(map(sum, n)) > 0, "no pair measured"
    # The best-layer matrices are those of the summary.
    for pos in POSITIONS:
        best = report["best"][pos]
        layer = report["counterfactual"][pos]["best_layer"]
        assert best["layer"] == layer
        if layer is not None:
            assert best["follows"] == report["counterfactual"][pos]["follows"][layer]
    edits = sorted(run.glob("arrays/edit_*.npz"))
    assert len(edits) == sum(report["edits"]["n"].values()) + sum(
        report["edits"]["n_failed"].values()
    )
    for path in edits:
        edit = EditPatch.load(path)
        assert edit.rank.shape[1:] == (2, len(POSITIONS), 2, 2)
    # The text report: the matrices and the run.
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    assert text.startswith(f"model {args[2]}; {N_FACTS} facts; resid_post patched at 2 layers")
    assert "B follows A, patched at last" in text and f"run: {run}" in text.splitlines()


def test_resume_uses_saved_pairs(patched, capsys, monkeypatch) -> None:
    import analysis.patching as patching_module

    _root, args = patched
    _, first, _ = _run(capsys, *args, "--json")

    def boom(*a, **k):
        raise AssertionError("a saved pair or edit was recomputed")

    monkeypatch.setattr(patching_module, "patch_rows", boom)
    code, again, err = _run(capsys, *args, "--json")
    assert code == 0, err
    a, b = json.loads(first), json.loads(again)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--edits", "-1"), "--edits -1: must be 0 or more"),
        (("--form", "essay"), "argument --form: invalid choice: 'essay'"),
        (("--method", "nope"), "nope"),
        (("--method", "ft", "--set", "ft.lr=fast"), "--set ft"),
        (("--set", "ft.lr=0.1"), "method 'ft' is not among --method (rome)"),
        (("--max-rows", "0"), "--max-rows 0: must be at least 1"),
        (("--langs", "en,xx"), "'xx'"),
    ],
)
def test_bad_options(micro_tiny: Path, tmp_path: Path, capsys, extra, message) -> None:
    args = ["patch", "--model", str(micro_tiny), "--results-dir", str(tmp_path), *extra]
    try:
        code = main(args)
    except SystemExit as exit_:  # a value argparse itself refuses (a choice)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not list(tmp_path.iterdir())  # refused before anything was measured


def test_the_pipeline_draws_the_patching_figures(micro_tiny: Path, tmp_path: Path) -> None:
    """The pipeline's patching stage (counterfactual only) and its figures; the report's
    section; ``mlake figures`` draws them again."""
    from mlake.pipeline import read_manifest

    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(micro_tiny), "device": "cpu"},
                "data": {"langs": LANGS, "facts": 3},
                "run": {"stages": ["data", "model", "knowledge", "patching", "figures", "report"]},
                "patching": {"edits": 0},
            }
        )
    )
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["pipeline", "--config", str(config), "--out", str(out), "--no-bars"])
    assert code == 0, err.getvalue()
    manifest = read_manifest(out)
    assert manifest["stages"]["patching"]["status"] == "complete"
    result = PatchingResult.load(manifest["stages"]["patching"]["runs"]["patching"])
    assert result.edits == {} and result.config["edits"] == 0
    index = json.loads((out / "figures" / "index.json").read_text())
    for name in ("patching_matrices", "patching_layers"):
        assert index["written"][name] == [f"{name}.pdf", f"{name}.png"]
    report = (out / "report.md").read_text()
    section = report.split("## Cross-lingual patching")[1].split("\n## ")[0]
    assert "B follows A, patched at subject_last" in section
    assert "![patching_matrices](figures/patching_matrices.png)" in section
    for png in (out / "figures").glob("patching_*.png"):
        png.unlink()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["figures", str(out)]) == 0
    assert (out / "figures" / "patching_matrices.png").is_file()
