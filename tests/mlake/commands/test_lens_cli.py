"""``mlake lens`` end to end on the micro mlake-tiny: the report (JSON and text), the results
store, resuming, bad options refused before the model loads, and the lens figures drawn by
the pipeline's figures stage and by ``mlake figures``."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from pathlib import Path

import matplotlib
import numpy as np
import pytest
import yaml

from analysis.lens import POSITIONS, FactLens, LensResult
from mlake.cli import main

matplotlib.use("Agg")
pytestmark = pytest.mark.slow

LANGS = ["en", "zh", "fr"]
N_FACTS = 4


def _run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def lensed(micro_tiny: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("lens_runs")
    args = ("lens", "--model", str(micro_tiny), "--langs", ",".join(LANGS))
    args += ("--facts", str(N_FACTS), "--results-dir", str(root), "--device", "cpu")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        assert main([*args, "--json"]) == 0
    return root, args


def _same(a: dict, b: dict) -> None:
    """The same report but for the time taken (a lens is saved as float32: exactly the
    probabilities the model computed)."""
    a, b = dict(a), dict(b)
    a.pop("seconds"), b.pop("seconds")
    assert a == b


def test_report_and_store(lensed, capsys) -> None:
    _root, args = lensed
    code, out, err = _run(capsys, *args, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["n_facts"] == N_FACTS and report["langs"] == LANGS
    assert report["n_layers"] == 2 and report["top_k"] == 10
    assert report["config"] == {
        "form": "question",
        "top_k": 10,
        "lens": "logit",
        "method": "none",
        "edits": 10,
        "seed": 0,
    }
    assert "edits" not in report and report["lens"] == "logit" and report["tuned"] == {}
    run = Path(report["run_path"])
    assert json.loads((run / "meta.json").read_text())["status"] == "complete"
    # summary.json is the result, and LensResult reads it back.
    saved = LensResult.load(run).to_dict()
    assert saved == {k: report[k] for k in saved}
    for s in report["summaries"]:
        lang = s["lang"]
        skipped = sum(v for k, v in report["skipped"].items() if k.startswith(f"{lang}:"))
        assert s["n_facts"] + skipped == N_FACTS  # every fact looked at or counted
        files = sorted(run.glob(f"arrays/lens_{lang}_*.npz"))
        assert len(files) == s["n_facts"]
        assert s["answer_langs"] == LANGS
        for pos in POSITIONS:
            assert np.array(s["mean_prob"][pos]).shape == (2, len(LANGS))
        # The summary is the mean of the saved per-fact lenses.
        if files:
            lenses = [FactLens.load(f) for f in files]
            mean = np.mean([f.prob[POSITIONS.index("last")] for f in lenses], axis=0)
            np.testing.assert_allclose(s["mean_prob"]["last"], mean, atol=2e-6)
        assert len(s["emergence"]) + s["never"] == s["n_facts"]
        assert sum(s["first_language"].values()) <= s["n_facts"]
        median = report["median_emergence"][lang]
        if s["emergence"]:
            assert median == float(np.median(s["emergence"]))
        else:
            assert median is None
        peak = report["latent_english_peak"][lang]
        if lang == "en" or not s["n_english_distinct"]:
            assert peak is None and (lang != "en" or s["latent_english"] == [])
        else:
            curve = s["latent_english"]
            assert peak == {"layer": int(np.argmax(curve)), "prob": max(curve)}
    assert any(s["n_facts"] for s in report["summaries"]), "no fact looked at"
    # The text report: one row per prompt language with the same numbers, and the run.
    code, text, err = _run(capsys, *args)
    assert code == 0, err
    rows = {}
    for line in text.splitlines():
        cells = re.split(r"\s{2,}", line.strip())
        if cells[0] in LANGS:
            rows[cells[0]] = cells
    assert list(rows) == LANGS
    for s in report["summaries"]:
        row = rows[s["lang"]]
        assert row[1] == str(s["n_facts"]) and row[3] == str(s["never"])
        median = report["median_emergence"][s["lang"]]
        assert row[2] == ("-" if median is None else f"{median:g}")
        first = sorted(s["first_language"].items(), key=lambda kv: (-kv[1], kv[0]))
        assert row[4] == (", ".join(f"{k} {v}" for k, v in first) or "-")
        peak = report["latent_english_peak"][s["lang"]]
        assert row[5] == ("-" if peak is None else f"layer {peak['layer']}, p {peak['prob']:.3g}")
        assert row[6] == ("-" if s["lang"] == "en" else str(s["n_english_distinct"]))
    assert "median emergence layer" in text and "latent English peak" in text
    assert f"run: {run}" in text.splitlines()
    assert text.startswith(f"model {args[2]}; {N_FACTS} facts; logit lens at 2 layers")
    assert "lens: logit lens at 2 layers, top 10" in err


def test_top_k_changes_the_run(lensed, capsys) -> None:
    _root, args = lensed
    _, out, _ = _run(capsys, *args, "--json")
    code, strict, err = _run(capsys, *args, "--top-k", "1", "--json")
    assert code == 0, err
    a, b = json.loads(out), json.loads(strict)
    assert b["top_k"] == 1 and b["config"]["top_k"] == 1
    assert a["run_path"] != b["run_path"]  # another key, another run
    for x, y in zip(a["summaries"], b["summaries"], strict=True):
        # A stricter threshold emerges no earlier, and never more often.
        assert y["never"] >= x["never"]
        assert x["mean_prob"] == y["mean_prob"]  # the probabilities do not depend on it


def test_resume_uses_saved_lenses(lensed, capsys, monkeypatch) -> None:
    import analysis.lens as lens_module

    _root, args = lensed
    _, first, _ = _run(capsys, *args, "--json")

    def boom(*a, **k):
        raise AssertionError("a saved lens was recomputed")

    monkeypatch.setattr(lens_module, "lens_prompts", boom)
    code, again, err = _run(capsys, *args, "--json")
    assert code == 0, err
    _same(json.loads(first), json.loads(again))
    # A lost lens is recomputed alone.
    monkeypatch.undo()
    real = lens_module.lens_prompts
    computed: list[int] = []

    def counting(adapter, items, batch_size=16, decode=None):
        computed.append(len(items))
        return real(adapter, items, batch_size, decode)

    monkeypatch.setattr(lens_module, "lens_prompts", counting)
    run = Path(json.loads(first)["run_path"])
    saved = sorted((run / "arrays").glob("lens_*.npz"))
    assert saved
    saved[0].unlink()
    code, third, err = _run(capsys, *args, "--json")
    assert code == 0, err
    assert sum(computed) == 1 and saved[0].is_file()
    _same(json.loads(first), json.loads(third))


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--top-k", "0"), "--top-k 0: must be at least 1"),
        (("--top-k", "many"), "--top-k: expected an integer, got 'many'"),
        (("--form", "essay"), "argument --form: invalid choice: 'essay'"),
        (("--langs", "en,xx"), "'xx'"),
        (("--facts", "some"), "--facts 'some'"),
        (("--batch-size", "0"), "--batch-size 0: must be at least 1"),
        (("--lens", "magic"), "argument --lens: invalid choice: 'magic'"),
        (("--edits", "-1"), "--edits -1: must be 0 or more"),
        (("--method", "nosuch"), "nosuch"),
        (("--method", "ft", "--set", "ft.nosuch=1"), "nosuch"),
        (("--tuned-holdout", "1.5"), "holdout"),
    ],
)
def test_bad_options(micro_tiny: Path, tmp_path: Path, capsys, extra, message) -> None:
    args = ["lens", "--model", str(micro_tiny), "--results-dir", str(tmp_path), *extra]
    try:
        code = main(args)
    except SystemExit as exit_:  # a value argparse itself refuses (a choice)
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert not list(tmp_path.iterdir())  # refused before anything was measured


def test_the_lens_before_and_after_edits(lensed, capsys) -> None:
    """``--method ft --edits 1``: a lens_edits run beside the fact lens, its per-edit arrays,
    the JSON and the text table; the fact lens's run is the same as without edits."""
    from analysis.lens import EditLens, EditLensResult

    _root, args = lensed
    _, plain, _ = _run(capsys, *args, "--json")
    edit_args = (*args, "--method", "ft", "--edits", "1", "--layer", "0")
    edit_args += ("--set", "ft.lr=0.01", "--set", "ft.steps=100", "--set", "ft.max_rel_norm=0.3")
    code, out, err = _run(capsys, *edit_args, "--json")
    assert code == 0, err
    report = json.loads(out)
    # The fact lens is not keyed on edits.
    assert report["run_path"] == json.loads(plain)["run_path"]
    edits = report["edits"]
    assert edits["method"] == "ft" and edits["langs"] == LANGS
    result = EditLensResult.load(edits["run_path"])
    assert result.to_dict() == edits
    n = 0
    for a in LANGS:
        assert len(edits["edits"][a]) <= 1
        for lens in result.lenses(a):
            n += 1
            assert isinstance(lens, EditLens) and lens.edit_lang == a
            assert lens.prob.shape == (len(lens.test_langs), 2, 2, 2, 2, len(LANGS))
            for b in lens.test_langs:
                assert result.pair(a, b).n_edits >= 1
    assert n >= 1
    code, text, err = _run(capsys, *edit_args)
    assert code == 0, err
    assert "before and after ft edits:" in text and "median emergence" in text
    assert f"run: {edits['run_path']}" in text.splitlines()


def test_the_tuned_lens(lensed, capsys, monkeypatch, tmp_path: Path) -> None:
    """``--lens tuned``: fitted on the facts not selected, cached (a second call reads it
    back: the same run), and the held-out KL reported per layer."""
    monkeypatch.setenv("MLAKE_CACHE", str(tmp_path / "cache"))
    _root, args = lensed
    tuned_args = (*args, "--lens", "tuned", "--tuned-steps", "20", "--tuned-max-facts", "40")
    code, out, err = _run(capsys, *tuned_args, "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["lens"] == "tuned" and report["config"]["lens"] == "tuned"
    tuned = report["tuned"]
    assert tuned["fit_facts"] == 32 and tuned["held_facts"] == 8
    assert len(tuned["validation"]["tuned"]) == 2 == len(tuned["validation"]["logit"])
    assert tuned["validation"]["tuned"][-1] == pytest.approx(0.0, abs=1e-5)
    assert list((tmp_path / "cache" / "lens").glob("tuned-*.npz"))
    _, plain, _ = _run(capsys, *args, "--json")
    assert json.loads(plain)["run_path"] != report["run_path"]  # another lens, another run
    code, again, err = _run(capsys, *tuned_args, "--json")
    assert code == 0 and "tuned lens: read from" in err
    _same(report, json.loads(again))
    code, text, err = _run(capsys, *tuned_args)
    assert "Held-out KL to the last layer" in text and "tuned lens at 2 layers" in text


def test_the_pipeline_draws_the_lens_figures(micro_tiny: Path, tmp_path: Path) -> None:
    """The pipeline's lens stage and its figures stage: the figures as PDF and PNG, one panel
    per prompt language titled with its facts; the report's lens section; ``mlake figures``
    draws them again."""
    import matplotlib.pyplot as plt

    from mlake.pipeline import read_manifest
    from mlake.pipeline.figures import figure_makers

    config = tmp_path / "cfg.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"name": str(micro_tiny), "device": "cpu"},
                "data": {"langs": LANGS, "facts": 3},
                "run": {"stages": ["data", "model", "knowledge", "lens", "figures", "report"]},
                "lens": {"top_k": 5, "method": "ft", "edits": 1},
            }
        )
    )
    out = tmp_path / "run"
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["pipeline", "--config", str(config), "--out", str(out), "--no-bars"])
    assert code == 0, err.getvalue()
    manifest = read_manifest(out)
    assert manifest["stages"]["lens"]["status"] == "complete"
    result = LensResult.load(manifest["stages"]["lens"]["runs"]["lens"])
    assert result.top_k == 5
    index = json.loads((out / "figures" / "index.json").read_text())
    for name in ("lens_last", "lens_subject_last"):
        assert index["written"][name] == [f"{name}.pdf", f"{name}.png"]
        for fmt in ("pdf", "png"):
            path = out / "figures" / f"{name}.{fmt}"
            assert path.is_file() and path.stat().st_size > 1000, path
    fig = dict(figure_makers(manifest))["lens_last"]()
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == [f"{s.lang} prompts (n={s.n_facts})" for s in result.summaries]
    plt.close(fig)
    report = (out / "report.md").read_text()
    section = report.split("## Latent-language lens")[1].split("\n## ")[0]
    for s in result.summaries:
        median = "–" if math.isnan(s.median_emergence) else f"{s.median_emergence:g}"
        assert f"| {s.lang} | {s.n_facts} | {median} | {s.never} |" in section
    assert "in the top 5" in section and "![lens_last](figures/lens_last.png)" in section
    # The lens before and after edits: its run, a figure per edit language, its table.
    from analysis.lens import EditLensResult

    edits = EditLensResult.load(manifest["stages"]["lens"]["runs"]["lens_edits"])
    assert edits.method == "ft" and edits.top_k == 5
    edited = [a for a in LANGS if edits.edits.get(a)]
    assert edited
    for a in edited:
        assert index["written"][f"lens_edits_{a}"] == [f"lens_edits_{a}.pdf", f"lens_edits_{a}.png"]
        assert f"![lens_edits_{a}](figures/lens_edits_{a}.png)" in section
    assert "### The lens before and after edits" in section
    for a in edited:
        for b in LANGS:
            p = edits.pair(a, b)
            if p.n_edits:
                assert (
                    f"| {a} | {b} | {p.n_edits} | {p.n_success} | {p.n_known_before} |" in section
                )
    # `mlake figures` draws them again.
    for png in (out / "figures").glob("lens_*.png"):
        png.unlink()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        assert main(["figures", str(out)]) == 0
    assert (out / "figures" / "lens_last.png").is_file()
    assert (out / "figures" / "lens_subject_last.png").is_file()
