"""A run folder's manifest names its runs relative to the directory the pipeline ran in;
read from anywhere else (``mlake figures /elsewhere/runs/pipeline/x``), they are found."""

from __future__ import annotations

import json

from mlake.pipeline.manifest import read_manifest


def test_relative_run_folders_are_found_from_another_directory(tmp_path, monkeypatch) -> None:
    project = tmp_path / "project"
    out = project / "runs" / "pipeline" / "m-4facts"
    store_run = out / "store" / "tracing" / "abc"
    store_run.mkdir(parents=True)
    elsewhere = tmp_path / "store2" / "knowledge" / "k1"
    elsewhere.mkdir(parents=True)
    manifest = {
        "stages": {
            "tracing": {
                "status": "complete",
                "runs": {"tracing": "runs/pipeline/m-4facts/store/tracing/abc"},
            },
            "knowledge": {"status": "complete", "runs": {"knowledge": str(elsewhere)}},
            "probes": {"status": "complete", "runs": {"probes": "runs/nowhere/p"}},
            "data": {"status": "complete"},
        }
    }
    (out / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.chdir(tmp_path)  # not the directory the pipeline ran in
    stages = read_manifest(out)["stages"]
    assert stages["tracing"]["runs"]["tracing"] == str(store_run.resolve())
    assert stages["knowledge"]["runs"]["knowledge"] == str(elsewhere)  # absolute: as given
    assert stages["probes"]["runs"]["probes"] == "runs/nowhere/p"  # found nowhere: as given
    monkeypatch.chdir(project)  # where it ran: the path as given works
    again = read_manifest("runs/pipeline/m-4facts")["stages"]
    assert again["tracing"]["runs"]["tracing"] == "runs/pipeline/m-4facts/store/tracing/abc"
