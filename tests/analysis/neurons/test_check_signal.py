"""The neuron ablation check's verdict on synthetic summaries: an attribution whose sets hurt
the answer no more than random sets of the same sizes (or not reliably more) has no signal;
the verdict is saved with the summary and recomputed from the check on load."""

from __future__ import annotations

import json
import math

import pytest

from analysis.neurons.config import (
    CHECK_ALPHA,
    MethodSummary,
    NeuronResult,
    ablation_signal,
)

LANGS = ("en", "zh")


def method(check: dict, name: str = "atp", unit: str = "head") -> MethodSummary:
    nan2 = [[math.nan] * 2 for _ in range(2)]
    return MethodSummary(
        method=name,
        unit=unit,
        n_facts={"en": 3, "zh": 3},
        set_size={"en": 2.0, "zh": 2.0},
        jaccard=[[1.0, 0.2], [0.2, 1.0]],
        overlap=[[1.0, 0.3], [0.3, 1.0]],
        n_pairs=[[3, 3], [3, 3]],
        counts=[{"layer": 0, "specific_en": 1, "specific_zh": 0, "shared": 1, "neither": 5}],
        ablation=nan2,
        ablation_random=nan2,
        check=check,
    )


@pytest.mark.parametrize(
    "check, expected",
    [
        # mlake-tiny's demo: ig neurons, and atp heads (sets hurt more on average, p = 0.216).
        (
            {"n": 51, "drop": 0.0331, "drop_random": -0.0003, "wilcoxon_p": 2.2e-9},
            (True, None),
        ),
        (
            {"n": 36, "drop": 0.143, "drop_random": 0.120, "wilcoxon_p": 0.216},
            (False, "not_significant"),
        ),
        (
            {"n": 20, "drop": 0.01, "drop_random": 0.02, "wilcoxon_p": 0.9},
            (False, "not_above_random"),
        ),
        (
            {"n": 20, "drop": 0.01, "drop_random": 0.01, "wilcoxon_p": math.nan},
            (False, "not_above_random"),
        ),
        ({"n": 3, "drop": 0.2, "drop_random": 0.0, "wilcoxon_p": math.nan}, (False, "untested")),
        (
            {"n": 9, "drop": 0.2, "drop_random": 0.0, "wilcoxon_p": CHECK_ALPHA},
            (False, "not_significant"),
        ),
        ({"n": 0}, (None, None)),
        ({}, (None, None)),  # LAPE: no per-fact sets, no check
    ],
)
def test_ablation_signal(check, expected) -> None:
    assert ablation_signal(check) == expected
    assert (method(check).check_signal, method(check).check_no_signal_reason) == expected


def test_the_verdict_is_saved_and_recomputed_on_load() -> None:
    quiet = method({"n": 36, "drop": 0.143, "drop_random": 0.120, "wilcoxon_p": 0.216})
    loud = method({"n": 51, "drop": 0.03, "drop_random": 0.0, "wilcoxon_p": 1e-9}, "ig", "neuron")
    result = NeuronResult(langs=LANGS, n_layers=2, methods=[loud, quiet], skipped={}, run_path="")
    data = result.to_dict()
    assert [(m["check_signal"], m["check_no_signal_reason"]) for m in data["methods"]] == [
        (True, None),
        (False, "not_significant"),
    ]
    loaded = NeuronResult.from_dict(json.loads(json.dumps(data)))
    assert loaded.to_dict() == data
    assert loaded.get("atp", "head").check_signal is False
    # A summary saved before the verdict (no such keys) loads and is judged from its check.
    for m in data["methods"]:
        del m["check_signal"], m["check_no_signal_reason"]
    old = NeuronResult.from_dict(data)
    assert [m.check_signal for m in old.methods] == [True, False]
