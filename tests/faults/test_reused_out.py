"""Reusing a pipeline run folder (``--out``) with another config (issue 24, item 7): the old
run's report, figures and records are set aside, never left beside the new config, and the
command prints a report's path only when the report is this config's."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlake.pipeline import PipelineConfig, config_from_dict, dump_config
from mlake.pipeline.run import set_aside_other_run


def _old_run(out: Path, config: PipelineConfig) -> None:
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "tracing.png").write_bytes(b"png")
    (out / "report.md").write_text("# old report\n")
    (out / "manifest.json").write_text("{}")
    (out / "store" / "knowledge").mkdir(parents=True)
    (out / "store" / "knowledge" / "meta.json").write_text("{}")
    (out / "config.yaml").write_text(dump_config(config))


def test_another_config_sets_the_old_run_aside(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _old_run(out, config_from_dict({"data": {"facts": 4}}))
    new = config_from_dict({"data": {"facts": 8}})
    aside = set_aside_other_run(out, new, out / "store")
    assert aside is not None and aside.parent == out and aside.name.startswith("replaced-")
    assert sorted(p.name for p in out.iterdir()) == sorted([aside.name, "store"])
    assert (aside / "report.md").read_text() == "# old report\n"
    assert (aside / "figures" / "tracing.png").is_file()
    assert (aside / "config.yaml").is_file()
    assert (out / "store" / "knowledge" / "meta.json").is_file()  # results are kept


@pytest.mark.parametrize(
    "same",
    [
        {"data": {"facts": 4}},
        {"data": {"facts": 4}, "run": {"stages": ["data", "figures"], "batch_size": 4}},
    ],
)
def test_the_same_config_continues(tmp_path: Path, same: dict) -> None:
    out = tmp_path / "run"
    _old_run(out, config_from_dict({"data": {"facts": 4}}))
    assert set_aside_other_run(out, config_from_dict(same), out / "store") is None
    assert (out / "report.md").is_file()


def test_an_unreadable_old_config_counts_as_another(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _old_run(out, PipelineConfig())
    (out / "config.yaml").write_text("data: [unclosed\n")
    aside = set_aside_other_run(out, PipelineConfig(), out / "store")
    assert aside is not None and (aside / "report.md").is_file()


def test_a_store_elsewhere_below_out_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _old_run(out, config_from_dict({"data": {"facts": 4}}))
    (out / "results" / "deep").mkdir(parents=True)
    aside = set_aside_other_run(
        out, config_from_dict({"data": {"facts": 8}}), out / "results" / "deep"
    )
    assert aside is not None
    assert (out / "results" / "deep").is_dir()
    assert (out / "store").is_dir()  # the default store an earlier config used stays too


def test_a_config_that_is_not_utf8_counts_as_another(tmp_path: Path) -> None:
    out = tmp_path / "run"
    _old_run(out, PipelineConfig())
    (out / "config.yaml").write_bytes(b"data: \xff\xfe\n")
    aside = set_aside_other_run(out, PipelineConfig(), out / "store")
    assert aside is not None and (aside / "config.yaml").is_file()


@pytest.mark.slow
def test_the_command_prints_only_its_own_report(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from mlake import cli

    out = tmp_path / "run"
    _old_run(out, config_from_dict({"data": {"facts": 4}}))
    assert cli.main(["pipeline", "--facts", "2", "--stages", "data", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "report:" not in printed.out
    assert "held a run of another config" in printed.err
    assert not (out / "report.md").exists()
    assert not (out / "figures").exists()
    # The same config again, with its own stages: a continuation, nothing set aside.
    (out / "report.md").write_text("# this config's report\n")
    assert cli.main(["pipeline", "--facts", "2", "--stages", "data", "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert "held a run of another config" not in printed.err
    assert "written by an earlier run of this config" in printed.out
    assert len(list(out.glob("replaced-*"))) == 1
