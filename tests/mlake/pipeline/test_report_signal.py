"""The pipeline report where an analysis has no signal, on a synthetic run folder: tracing
languages the corruption does not move (from a summary saved before the signal criterion),
an attribution whose sets are indistinguishable from random sets, and probes not above their
control or chance."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import yaml

from analysis.neurons.config import NeuronResult
from mlake.pipeline.report import build_report
from probes.config import ProbeResult
from tests.analysis.neurons.test_check_signal import method
from tests.analysis.tracing.test_summary import _old_summary

LANGS = ["en", "zh"]


def _write(path: Path, data: dict) -> str:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps(data), encoding="utf-8")
    return str(path)


def _probes() -> dict:
    lid = pd.DataFrame.from_records(
        [
            # The best layer per position: "last" far above control, "subject" at chance.
            {"position": "last", "layer": 1, "accuracy": 0.9, "control": 0.2, "chance": 0.5, "n": 60},
            {"position": "subject", "layer": 1, "accuracy": 0.52, "control": 0.5, "chance": 0.5, "n": 60},
        ]
    )  # fmt: skip
    transfer = pd.DataFrame.from_records(
        [
            {"task": "fact", "position": p, "layer": 1, "train_lang": a, "test_lang": b,
             "accuracy": acc, "control": 0.4, "chance": 0.42, "n_test": 12}
            for p, acc in (("last", 0.58), ("subject", 0.40))
            for a in LANGS
            for b in LANGS
        ]
    )  # fmt: skip
    return ProbeResult(
        langs=tuple(LANGS),
        sites=("resid_pre.0", "resid_post.0"),
        positions=("subject", "last"),
        language_id=lid,
        transfer=transfer,
        similarity=pd.DataFrame(),
    ).to_dict()


def _run_folder(tmp_path: Path, tracing: dict) -> Path:
    out = tmp_path / "run"
    store = out / "store"
    neurons = NeuronResult(
        langs=tuple(LANGS),
        n_layers=1,
        methods=[
            method({"n": 51, "drop": 0.033, "drop_random": 0.0, "wilcoxon_p": 2e-9}, "ig", "neuron"),
            method({"n": 36, "drop": 0.143, "drop_random": 0.120, "wilcoxon_p": 0.216}),
        ],
        skipped={},
        run_path="",
    )  # fmt: skip
    runs = {
        "tracing": _write(store / "tracing" / "a", tracing),
        "neurons": _write(store / "neurons" / "b", neurons.to_dict()),
        "probes": _write(store / "probes" / "c", _probes()),
    }
    manifest = {
        "stages": {
            name: {"status": "complete", "seconds": 1.0, "runs": {name: path}}
            for name, path in runs.items()
        }
    }
    (out / "manifest.json").write_text(json.dumps(manifest), encoding="utf-8")
    config = {
        "model": {"name": "mlake-tiny"},
        "data": {"version": "v", "facts": 12, "langs": LANGS},
    }
    (out / "config.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    return out


def test_tracing_without_signal_anywhere(tmp_path: Path) -> None:
    # As the demo saved it before the criterion: p(answer) 1.00 -> 1.00 and 1.00 -> 0.95, and
    # "recommended edit layer 0".
    out = _run_folder(tmp_path, _old_summary({"en": 0.94674, "zh": 0.99999}))
    report = build_report(out)
    section = report.split("## Causal tracing")[1].split("## Neurons")[0]
    assert "| en | 1 | 1.00 | 0.95 | 5.3 | **no** | – | – |" in section
    assert "| zh | 1 | 1.00 | 1.00 | 0.0 | **no** | – | – |" in section
    assert (
        "- **en**: tracing has no signal on this model and language: the corruption leaves "
        "p(answer) near its clean value (p_clean 1.00, p_corrupt 0.95, a drop of 5.3% of "
        "p_clean, under 10%)"
    ) in section
    assert "Recommended edit layer: none.  Tracing has no signal on this model" in section
    assert "Recommended edit layer: 0" not in section
    assert "en, zh have no signal, so their rows compare noise" in section


def test_tracing_with_signal_in_one_language(tmp_path: Path) -> None:
    out = _run_folder(tmp_path, _old_summary({"en": 0.5, "zh": 0.99999}))
    section = build_report(out).split("## Causal tracing")[1].split("## Neurons")[0]
    assert "| en | 1 | 1.00 | 0.50 | 50.0 | yes | 0 | 0.2 |" in section
    assert "Recommended edit layer: 0, from the languages with signal (en)." in section
    assert "- **zh**: tracing has no signal" in section and "- **en**" not in section


def test_neurons_and_probes_without_signal(tmp_path: Path) -> None:
    report = build_report(_run_folder(tmp_path, _old_summary({"en": 0.5, "zh": 0.5})))
    neurons = report.split("## Neurons")[1].split("## Probes")[0]
    ig, atp = neurons.split("**atp (heads)**")
    assert "The attributed sets hurt the answer more than random sets do." in ig
    assert "sets indistinguishable from random sets: see the ablation check" in atp
    assert (
        "**No signal**: the attribution's sets are indistinguishable from random sets of the "
        "same sizes (they lower the answer's probability a little more than random sets on "
        "average, but not reliably: Wilcoxon p >= 0.05)."
    ) in atp
    probes = report.split("## Probes")[1]
    assert "| last | 1 | 90.0 | 20.0 | 50.0 | yes |" in probes
    assert "| subject | 1 | 52.0 | 50.0 | 50.0 | **no** (within chance of the baseline) |" in probes
    assert "| fact | last | 1 | 58.0 | 40.0 | 42.0 | **no** (within chance of the baseline) |" in (
        probes
    )
    assert "| fact | subject | 1 | 40.0 | 40.0 | 42.0 | **no** (not above control/chance) |" in (
        probes
    )
    assert "No signal for the cross-lingual probes (fact at the last position; fact at the" in (
        probes
    )
