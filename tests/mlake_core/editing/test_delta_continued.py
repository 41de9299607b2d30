"""ROME's and MEMIT's ``δ`` steps run the prompt before the subject's last token once and
continue its keys and values, computing only the logits the loss reads; FT keeps only those
logits.  Both give the numbers of whole-batch steps (micro mlake-tiny, a few-shot prompt whose
demonstrations are most of the tokens)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mlake_core.editing import EditContext, get_method, make_request
from mlake_core.editing import delta as delta_module
from mlake_core.editing.delta import kept_logits, optimise_output_delta, teacher_forced
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def requests(adapter, micro_tiny: Path, mlake_v2411):
    meta = read_metadata(micro_tiny)
    assert meta is not None
    ids = meta["fact_ids"]
    template = get_template("fewshot-1-seed0").for_run(mlake_v2411, ids[:4], ["en"])
    return [make_request(adapter, mlake_v2411.fact(f).views["en"], template) for f in ids[:3]]


def _whole(monkeypatch) -> None:
    """Make every ``δ`` step run the whole teacher-forced batch, all logits (the old way)."""
    original = delta_module._continued

    def whole(adapter, batch, targets, start):
        run = original(adapter, batch, targets, 0)
        return dataclasses.replace(run, targets=[list(r) for r in targets], keep_last=0)

    monkeypatch.setattr(delta_module, "_continued", whole)


@pytest.mark.parametrize("n", [1, 3])
def test_delta_steps_continue_the_prefix_with_the_same_numbers(adapter, requests, n, monkeypatch):
    reqs = requests[:n]
    batch, targets = teacher_forced(adapter, reqs)
    run = delta_module._continued(adapter, batch, targets, min(r.subject_last for r in reqs))
    assert run.past is not None and run.start >= 10  # the demonstrations are not rerun
    assert run.batch.shape[1] == batch.shape[1] - run.start
    assert (run.keep_last > 0) == (n == 1)  # equal lengths only for one request
    settings = dict(steps=5, lr=0.5, clamp_norm=4.0, weight_decay=1e-3, stop_loss=0.0)
    site = "mlp_out.0"
    fast = optimise_output_delta(adapter, reqs, site, **settings)
    _whole(monkeypatch)
    slow = optimise_output_delta(adapter, reqs, site, **settings)
    torch.testing.assert_close(fast[0], slow[0], atol=1e-4, rtol=1e-4)
    assert abs(fast[2] - slow[2]) < 1e-4 and fast[3] == slow[3] == 5


def test_kept_logits_reindex_targets(adapter, requests) -> None:
    batch, targets = teacher_forced(adapter, requests[:1])
    keep, kept = kept_logits(batch, targets)
    first = targets[0][0][0]
    assert keep == batch.shape[1] - first and kept[0][0] == (0, targets[0][0][1])
    ragged, ragged_targets = teacher_forced(adapter, requests)
    assert len(set(ragged.lengths.tolist())) > 1  # right padding: every position is kept
    assert kept_logits(ragged, ragged_targets) == (0, ragged_targets)


def test_ft_with_kept_logits_moves_the_weights_as_before(
    adapter, requests, mlake_v2411, monkeypatch
) -> None:
    entry = get_method("ft")
    config = entry.config_cls(layer=0, steps=5, lr=0.01, max_rel_norm=0.3)
    context = EditContext(torch.Generator().manual_seed(0), lambda layer: None, {})
    fast = entry.fn(adapter, requests[:1], config, context)
    monkeypatch.setattr("mlake_core.editing.ft.kept_logits", lambda b, t: (0, [list(r) for r in t]))
    slow = entry.fn(adapter, requests[:1], config, context)
    for name, d in fast.deltas.items():
        torch.testing.assert_close(d, slow.deltas[name], atol=1e-5, rtol=1e-4)
