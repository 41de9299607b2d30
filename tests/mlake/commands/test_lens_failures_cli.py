"""``mlake lens --failures`` end to end on the micro mlake-tiny: where each edit's transfer
fails, in the JSON and the text report, equal to the classification of the saved edit lenses,
and refused without edits before the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.failures import OUTCOMES, FailureResult, classify_edits
from analysis.lens import EditLensResult
from analysis.patching import EditPatch
from mlake.cli import main

pytestmark = pytest.mark.slow

LANGS = ["en", "zh", "fr"]


def test_failures_from_the_saved_edit_lenses(micro_tiny: Path, tmp_path: Path, capsys) -> None:
    args = ["lens", "--model", str(micro_tiny), "--langs", ",".join(LANGS), "--facts", "4"]
    args += ["--results-dir", str(tmp_path), "--device", "cpu", "--failures"]
    args += ["--method", "ft", "--edits", "1", "--layer", "0", "--set", "ft.steps=20"]
    assert main([*args, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    failures = FailureResult.from_dict(report["failures"])
    edited = EditLensResult.load(report["edits"]["run_path"])
    lenses = {a: list(edited.lenses(a)) for a in LANGS}
    expected = classify_edits("ft", lenses, LANGS, edited.n_layers, edited.top_k, edited.run_path)
    assert failures == expected
    n_edits = sum(len(v) for v in lenses.values())
    assert n_edits >= 1
    assert sum(failures.totals("ft").values()) == n_edits * len(LANGS)
    assert set(failures.totals("ft")) == set(OUTCOMES)
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "where transfer fails:" in text and "not enriched" in text
    assert any(line.split()[:3] == ["ft", "all", "all"] for line in text.splitlines())


def test_failures_with_a_patching_run(micro_tiny: Path, tmp_path: Path, capsys) -> None:
    """``--patching-run``: each failure's edit looked up in a patching run of the same edits
    (the first fact of each language, FT with the same settings); a run of another method is
    refused."""
    from analysis.failures import FAILURES

    common = ["--model", str(micro_tiny), "--langs", ",".join(LANGS), "--facts", "4"]
    common += ["--results-dir", str(tmp_path), "--device", "cpu"]
    edit = ["--method", "ft", "--edits", "1", "--layer", "0", "--set", "ft.steps=20"]
    assert main(["patch", *common, *edit, "--json"]) == 0
    patching = json.loads(capsys.readouterr().out)["run_path"]
    args = ["lens", *common, *edit, "--failures", "--patching-run", patching, "--json"]
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    failures = FailureResult.from_dict(report["failures"])
    edited = EditLensResult.load(report["edits"]["run_path"])
    lenses = {a: list(edited.lenses(a)) for a in LANGS}
    patches = {
        a: {f: EditPatch.load(Path(patching) / "arrays" / f"edit_{a}_{f}.npz") for f in facts}
        for a, facts in edited.edits.items()
    }
    expected = classify_edits(
        "ft", lenses, LANGS, edited.n_layers, edited.top_k, edited.run_path, patches
    )
    assert failures == expected
    patched = sum(s.patched[o] for s in failures.summaries for o in FAILURES)
    n_failed = sum(s.n_failed for s in failures.summaries)
    own_ok = sum(s.n_failed - s.own_failed for s in failures.summaries)
    assert n_failed >= 1
    assert patched == own_ok  # every failure of an edit that took in A is patched
    rome = [*args[: args.index("--method")], "--method", "rome", "--edits", "1"]
    rome += ["--failures", "--patching-run", patching]
    assert main(rome) == 2
    assert "a patching run of ft edits" in capsys.readouterr().err


def test_failures_needs_edits(micro_tiny: Path, tmp_path: Path, capsys) -> None:
    args = ["lens", "--model", str(micro_tiny), "--results-dir", str(tmp_path), "--failures"]
    assert main(args) == 2
    assert "--failures: needs --method" in capsys.readouterr().err
    assert main([*args[:-1], "--patching-run", str(tmp_path)]) == 2
    assert "--patching-run: only with --failures" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_the_pipeline_report_has_the_failure_table(micro_tiny: Path, tmp_path: Path) -> None:
    import contextlib
    import io

    import yaml

    from mlake.pipeline import read_manifest

    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(micro_tiny), "device": "cpu"},
                "data": {"langs": LANGS, "facts": 3},
                "run": {"stages": ["data", "model", "knowledge", "lens", "figures", "report"]},
                "lens": {"method": "ft", "edits": 1},
            }
        )
    )
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["pipeline", "--config", str(config), "--out", str(out), "--no-bars"])
    assert code == 0, err.getvalue()
    edited = EditLensResult.load(read_manifest(out)["stages"]["lens"]["runs"]["lens_edits"])
    lenses = {a: list(edited.lenses(a)) for a in LANGS}
    failures = classify_edits("ft", lenses, LANGS, edited.n_layers, edited.top_k)
    section = (out / "report.md").read_text().split("### Where transfer fails")[1]
    assert "![lens_failures](figures/lens_failures.png)" in section.split("\n## ")[0]
    total = failures.totals("ft")
    assert f"| ft | all | all | {sum(total.values())} |" in section
    for s in failures.summaries:
        if s.n_edits:
            assert f"| ft | {s.edit_lang} | {s.test_lang} | {s.n_edits} |" in section
