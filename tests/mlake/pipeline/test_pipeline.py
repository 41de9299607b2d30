"""``mlake pipeline`` end to end on the micro mlake-tiny: the run folder (config, provenance,
manifest, report, every figure), a run stopped in the middle of a stage and restarted gives
the same final results as an uninterrupted one, and ``mlake figures`` redraws every figure."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

import mlake_core.data.dataset as dataset_module
from mlake.cli import main
from mlake.pipeline import config_from_dict, read_manifest, run_pipeline

pytestmark = pytest.mark.slow

#: Settings small enough for the micro model (6 facts): 4 facts edited, 2 for locality.
SMALL = {
    "model": {"device": "cpu"},
    "data": {"langs": ["en", "zh", "ja"], "facts": 4},
    "tracing": {"n_samples": 2, "kinds": ["mlp", "attn"]},
    "transfer": {
        "methods": ["ft", "ike"],
        "n_locality": 2,
        "ft": {"steps": 5},
        "ike": {"n_demonstrations": 1},
    },
    "neurons": {
        "attribution": {"steps": 3, "samples": 2},
        "text_tokens": 300,
        "ablation_facts": 2,
        "min_facts": 1,
        "n_random": 1,
    },
    "probes": {"folds": 2, "inner_folds": 2, "min_class_facts": 2, "max_iter": 50},
    "relate": {"n_boot": 20, "n_perm": 5, "folds": 2},
}
#: Figures every complete run of :data:`SMALL` has.
EXPECTED_FIGURES = {
    "transfer_matrices",
    "tracing_map_mlp",
    "tracing_map_attn",
    "tracing_profiles",
    "tracing_fact_en",
    "tracing_fact_zh",
    "tracing_fact_ja",
    "tracing_similarity",
    "lens_last",
    "lens_subject_last",
    "neuron_overlap_neuron",
    "neuron_overlap_head",
    "unit_counts_ig",
    "unit_counts_atp",
    "unit_counts_lape",
    "ablation_ig",
    "sharing_vs_transfer_ft",
    "sharing_vs_transfer_ike",
    "restricted_editing",
}


@pytest.fixture(scope="module", autouse=True)
def cached_data():
    """Load MLaKE once per module (the same object the real loader returns)."""
    real = dataset_module.load_mlake
    cache: dict = {}

    def load(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_module, "load_mlake", load)
        yield


def _config(model: Path, **extra):
    data = json.loads(json.dumps(SMALL))
    data["model"]["name"] = str(model)
    for section, values in extra.items():
        data.setdefault(section, {}).update(values)
    return config_from_dict(data)


#: Fields that record where or how fast, not what was computed.
VOLATILE = {
    "seconds_per_fact",
    "seconds",
    "edit_seconds",
    "eval_seconds",
    "setup_seconds",
    "run_path",
    "run",
    "inputs",
}


def _clean(value):
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _results(out: Path, stages=None) -> dict:
    """Every stage's final result (summaries and tables), without paths and timings."""
    manifest = read_manifest(out)
    found: dict = {}
    for stage, rec in manifest["stages"].items():
        if stages is not None and stage not in stages:
            continue
        assert rec["status"] in ("complete", "skipped"), (stage, rec)
        for label, path in (rec.get("runs") or {}).items():
            folder = Path(path)
            if not folder.is_dir() or not (folder / "key.json").is_file():
                continue
            key = f"{stage}:{label}"
            if (folder / "summary.json").is_file():
                summary = _clean(json.loads((folder / "summary.json").read_text()))
                found[key] = json.dumps(summary, sort_keys=True)
            for table in sorted((folder / "tables").glob("*.parquet")):
                frame = pd.read_parquet(table)
                found[f"{key}:{table.stem}"] = frame.drop(
                    columns=[c for c in frame.columns if c in VOLATILE]
                ).to_json()
    return found


@pytest.fixture(scope="module")
def complete(micro_tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("pipeline") / "run"
    result = run_pipeline(_config(micro_tiny), out)
    return out, result


def test_run_folder(complete, micro_tiny):
    out, result = complete
    for name in ("config.yaml", "provenance.json", "manifest.json", "report.md"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["model"]["name"] == str(micro_tiny)
    assert config["data"]["facts"] == 4 and config["transfer"]["ft"]["steps"] == 5
    prov = json.loads((out / "provenance.json").read_text())
    assert prov["seeds"]["run"] == 0 and "torch" in prov["versions"]
    assert "git_commit" in prov
    manifest = read_manifest(out)
    statuses = {k: v["status"] for k, v in manifest["stages"].items()}
    must = ("data", "model", "knowledge", "tracing", "lens", "transfer", "neurons", "restricted")
    assert all(statuses[s] == "complete" for s in (*must, "relate")), statuses
    # The manifest records the stages in the order they ran, each with its run folder.
    assert [s for s in manifest["stages"] if s in must] == list(must)
    assert set(manifest["stages"]["lens"]["runs"]) == {"lens"}
    assert set(manifest["stages"]["transfer"]["runs"]) == {"ft", "ike"}
    assert set(manifest["stages"]["restricted"]["runs"]) == {"ft[shared]", "ft[random]"}
    for rec in manifest["stages"].values():
        assert rec["seconds"] >= 0
    # Every stage's run lives in the run folder's own store.
    assert Path(manifest["stages"]["tracing"]["runs"]["tracing"]).parent.parent == out / "store"
    assert "stage" in result.summary() and "total" in result.summary()


def test_figures_and_report(complete):
    out, _ = complete
    index = json.loads((out / "figures" / "index.json").read_text())
    written = set(index["written"])
    assert EXPECTED_FIGURES <= written, EXPECTED_FIGURES - written
    for name in written:
        for fmt in ("pdf", "png"):
            path = out / "figures" / f"{name}.{fmt}"
            assert path.is_file() and path.stat().st_size > 1000, path
    assert "sweep_dose_response" in index["skipped"]
    report = (out / "report.md").read_text()
    for heading in (
        "## Stages",
        "## What the model knows",
        "## Edit transfer",
        "## Causal tracing",
        "## Latent-language lens",
        "## Neurons",
        "## Sharing against transfer (ft)",
        "## Figures",
    ):
        assert heading in report, heading
    for name in written:
        assert f"(figures/{name}.png)" in report
    # Tracing on the micro model has signal in some languages only (in most the corruption
    # barely moves p(answer)): the report says so for each language without, with the
    # numbers, and takes the recommended layer from the others alone.
    from analysis.tracing.summary import TracingResult

    tracing = TracingResult.load(read_manifest(out)["stages"]["tracing"]["runs"]["tracing"])
    section = report.split("## Causal tracing")[1].split("\n## ")[0]
    quiet = [s for s in tracing.summaries if not s.signal]
    assert quiet  # the micro model answers most questions without reading the subject
    for s in quiet:
        assert (
            f"- **{s.lang}**: tracing has no signal on this model and language: the corruption "
            f"leaves p(answer) near its clean value (p_clean {s.p_clean:.2f}, p_corrupt "
            f"{s.p_corrupt:.2f}"
        ) in section
    if tracing.signal_langs:
        assert tracing.recommended_layer is not None
        assert (
            f"Recommended edit layer: {tracing.recommended_layer}, from the languages with "
            f"signal ({', '.join(tracing.signal_langs)})."
        ) in section
    else:
        assert tracing.recommended_layer is None
        assert "Recommended edit layer: none.  Tracing has no signal on this model" in section


def test_cjk_token_labels_have_glyphs(complete):
    """The per-language fact traces label their real tokens; every CJK character in them is
    drawn by a font of the style (no empty boxes)."""
    import matplotlib.pyplot as plt

    from figures.style import missing_glyphs
    from mlake.pipeline.figures import figure_makers

    out, _ = complete
    makers = dict(figure_makers(read_manifest(out)))
    for lang in ("zh", "ja"):
        fig = makers[f"tracing_fact_{lang}"]()
        labels = [t.get_text() for ax in fig.axes for t in ax.get_yticklabels()]
        text = "".join(labels)
        assert any("\u3040" <= ch <= "\u9fff" for ch in text), labels  # kana or CJK
        assert missing_glyphs(text) == set()
        plt.close(fig)


def test_figures_command_rewrites_every_file(complete, tmp_path):
    out, _ = complete
    for png in (out / "figures").glob("*.png"):
        png.unlink()
    points = [
        {
            "fraction": f,
            "overlap": 0.1 + f / 2,
            "overlap_ci": [0.05 + f / 2, 0.15 + f / 2],
            "transfer": 0.2 * f,
            "transfer_ci": [0.1 * f, 0.3 * f],
        }
        for f in (0.0, 0.25, 0.5)
    ]
    sweep = tmp_path / "summary.json"
    sweep.write_text(json.dumps({"points": points}))
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["figures", str(out), "--sweep", str(sweep)])
    assert code == 0, err.getvalue()
    index = json.loads((out / "figures" / "index.json").read_text())
    assert EXPECTED_FIGURES | {"sweep_dose_response"} <= set(index["written"])
    for name in index["written"]:
        assert (out / "figures" / f"{name}.png").is_file()


class Stop(Exception):
    """Raised by the test's hook to stop a run mid-stage."""


#: The stages an interrupted run is checked on (the figures and the report add nothing;
#: patching stays, as relate reads its run).
RESUMED = (
    "data",
    "model",
    "knowledge",
    "tracing",
    "lens",
    "patching",
    "transfer",
    "neurons",
    "restricted",
    "probes",
    "relate",
)


#: Where the run is stopped, in turn: (stage, after how many of its facts or edits).
STOPS = (("tracing", 3), ("lens", 2), ("transfer", 5), ("neurons", 4))


def test_interrupted_run_resumes_to_the_same_results(complete, micro_tiny, tmp_path):
    """Stopped in the middle of tracing, then (restarted) of the lens, then of editing, then
    of neuron attribution, and finally run to the end: the same results as the uninterrupted
    run, and what was saved before each stop is reloaded, not recomputed."""
    out_full, _ = complete
    out = tmp_path / "run"
    config = _config(micro_tiny, run={"stages": list(RESUMED)})
    for stage, after in STOPS:
        seen = {"n": 0, "loaded": 0}

        def hook(where: str, info: dict, stage=stage, after=after, seen=seen) -> None:
            if where != stage:
                return
            seen["n"] += 1
            seen["loaded"] += bool(info.get("loaded"))
            if seen["n"] == after:
                raise Stop(f"stopped after {after} {stage} items")

        with pytest.raises(Stop):
            run_pipeline(config, out, on_item=hook)
        manifest = read_manifest(out)
        assert manifest["stages"][stage]["status"] == "failed"
        assert "Stop" in manifest["stages"][stage]["note"]
        done = [s for s in RESUMED[: RESUMED.index(stage)]]
        assert all(manifest["stages"][s]["status"] in ("complete", "skipped") for s in done)
    counted = {"transfer_loaded": 0, "tracing": 0}

    def count(where: str, info: dict) -> None:
        counted["tracing"] += where == "tracing"
        counted["transfer_loaded"] += where == "transfer" and bool(info.get("loaded"))

    run_pipeline(config, out, on_item=count)
    # Tracing reports loaded facts too; of the edits, only the one saved in the stopped
    # language comes back piece by piece (finished languages load as whole tables), and
    # the pieces are removed once a language's table is saved.
    assert counted["tracing"] >= STOPS[0][1]
    assert counted["transfer_loaded"] == 0  # the stopped language finished in the 3rd run
    assert not list((out / "store" / "transfer").glob("*/tables/edit_*.parquet"))
    resumed = _results(out)
    full = _results(out_full, RESUMED)
    assert set(resumed) == set(full)
    for key in full:
        assert resumed[key].replace(str(out), "<out>") == full[key].replace(
            str(out_full), "<out>"
        ), key


def test_stopped_edit_is_reloaded(micro_tiny, tmp_path):
    """An edit saved before a stop inside a language is reloaded with the generator state
    after it (IKE draws its demonstrations from that generator), not redone."""
    out = tmp_path / "run"
    config = _config(
        micro_tiny,
        run={"stages": ["data", "model", "knowledge", "transfer"]},
        transfer={"methods": ["ike"], "restricted": []},
    )
    full = tmp_path / "full"
    run_pipeline(config, full)
    seen = {"n": 0}

    def stop(where: str, info: dict) -> None:
        seen["n"] += where == "transfer"
        if seen["n"] == 2:
            raise Stop("second edit")

    with pytest.raises(Stop):
        run_pipeline(config, out, on_item=stop)
    loaded = []
    run_pipeline(config, out, on_item=lambda w, i: loaded.append(bool(i.get("loaded"))))
    assert loaded[:2] == [True, True] and not any(loaded[2:])
    assert _results(out).keys() == _results(full).keys()
    for key, value in _results(full).items():
        assert _results(out)[key].replace(str(out), "<out>") == value.replace(str(full), "<out>"), (
            key
        )


def test_cli_pipeline_with_config_file(micro_tiny, tmp_path):
    data = json.loads(json.dumps(SMALL))
    data["model"]["name"] = str(micro_tiny)
    data["run"] = {"stages": ["data", "model", "knowledge", "tracing", "report"]}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(data))
    out = tmp_path / "run"
    stdout, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(err):
        code = main(
            ["pipeline", "--config", str(path), "--out", str(out), "--facts", "3", "--no-bars"]
        )
    assert code == 0, err.getvalue()
    assert "tracing" in stdout.getvalue() and "total" in stdout.getvalue()
    assert yaml.safe_load((out / "config.yaml").read_text())["data"]["facts"] == 3
    assert set(read_manifest(out)["stages"]) == {"data", "model", "knowledge", "tracing", "report"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("tracing:\n  n_sample: 3\n")
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err):
        code = main(["pipeline", "--config", str(bad), "--out", str(tmp_path / "x")])
    assert code == 2 and f"{bad}: tracing.n_sample: unknown key" in err.getvalue()
