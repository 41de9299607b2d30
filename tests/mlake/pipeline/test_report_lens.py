"""The pipeline report's lens section on a synthetic run folder: one row per prompt language
with the numbers ``mlake lens`` prints (facts, median emergence layer and never, first
language counts, latent English peak and its facts), the skipped views and the figure; no
section when the lens stage did not run."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from analysis.lens import LensResult, LensSummary
from mlake.pipeline.report import build_report, latent_english_peak, lens_cells

LANGS = ["en", "zh", "fr"]


def _summary(lang: str, emergence: list[int], never: int, first: dict, latent: list) -> dict:
    n = len(emergence) + never
    rows = [[0.1, 0.2, 0.3]] * 3
    return {
        "lang": lang,
        "n_facts": n,
        "answer_langs": LANGS,
        "mean_prob": {"subject_last": rows, "last": rows},
        "decodable": {"subject_last": rows, "last": rows},
        "emergence": emergence,
        "never": never,
        "first_language": first,
        "latent_english": latent,
        "n_english_distinct": 0 if lang == "en" else max(0, n - 1),
    }


def _result() -> dict:
    return LensResult(
        langs=tuple(LANGS),
        n_layers=3,
        top_k=10,
        summaries=[
            LensSummary(**_summary("en", [2, 2, 1], 0, {"en": 3}, [])),
            LensSummary(**_summary("zh", [2, 1], 1, {"zh": 1, "en": 2}, [0.1, 0.4, 0.4])),
            LensSummary(**_summary("fr", [], 0, {}, [])),
        ],
        skipped={"fr:not known before": 4, "zh:empty answer": 1},
        run_path="store/lens/a",
    ).to_dict()


def _run_folder(tmp_path: Path, stages: dict, figures: dict | None = None) -> Path:
    out = tmp_path / "run"
    out.mkdir()
    runs = {}
    for name, summary in stages.items():
        folder = out / "store" / name / "a"
        folder.mkdir(parents=True)
        (folder / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
        runs[name] = str(folder)
    manifest = {
        "stages": {
            name: {"status": "complete", "seconds": 1.0, "runs": {name: path}}
            for name, path in runs.items()
        }
    }
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    config = {"model": {"name": "mlake-tiny"}, "data": {"version": "v", "facts": 4, "langs": LANGS}}
    (out / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if figures is not None:
        (out / "figures").mkdir()
        index = {"written": figures, "skipped": {}}
        (out / "figures" / "index.json").write_text(json.dumps(index), encoding="utf-8")
    return out


def test_the_lens_section(tmp_path: Path) -> None:
    figures = {"lens_last": ["lens_last.pdf", "lens_last.png"]}
    report = build_report(_run_folder(tmp_path, {"lens": _result()}, figures))
    section = report.split("## Latent-language lens")[1].split("\n## ")[0]
    assert (
        "| lang | facts | median emergence layer | never | first language | "
        "latent English peak | English distinct |"
    ) in section
    assert "| en | 3 | 2 | 0 | en 3 | – | – |" in section
    # Median of [2, 1]; the tie at layers 1 and 2 of the latent curve goes to the first.
    assert "| zh | 3 | 1.5 | 1 | en 2, zh 1 | layer 1, p 0.4 | 2 |" in section
    assert "| fr | 0 | – | 0 | – | – | 0 |" in section
    assert "in the top 10" in section
    assert "Not looked at: fr:not known before 4, zh:empty answer 1." in section
    assert "![lens_last](figures/lens_last.png)" in section
    assert "lens_subject_last" not in section  # not drawn: not linked


def test_no_section_without_the_stage(tmp_path: Path) -> None:
    report = build_report(_run_folder(tmp_path, {}))
    assert "Latent-language lens" not in report


def test_the_peak_and_the_cells_the_command_prints() -> None:
    zh = LensSummary(**_summary("zh", [], 2, {}, [0.3, 0.1, 0.5]))
    assert latent_english_peak(zh) == (2, 0.5)
    assert lens_cells(zh, missing="-") == ["zh", "2", "-", "2", "-", "layer 2, p 0.5", "1"]
    en = LensSummary(**_summary("en", [0], 0, {"en": 1}, []))
    assert latent_english_peak(en) is None
