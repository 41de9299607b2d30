"""Editing mechanics on the micro mlake-tiny: deltas restore exactly, FT changes the target's
probability, and bad inputs give clear errors.  (Method efficacy targets are issue 4's.)"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from mlake_core.editing import EditContext, get_method, make_request
from mlake_core.editing.covariance import key_second_moment, mlake_corpus
from mlake_core.errors import ConfigError, DataError
from mlake_core.metrics.knowledge import score_sequences
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template

pytestmark = pytest.mark.slow
QA = get_template("qa")


@pytest.fixture(scope="module")
def view(micro_tiny: Path, mlake_v2411):
    meta = read_metadata(micro_tiny)
    assert meta is not None
    return mlake_v2411.fact(meta["fact_ids"][0]).views["en"]


def _context(adapter, mlake_v2411):
    docs = mlake_corpus(mlake_v2411)[:200]
    return EditContext(
        torch.Generator().manual_seed(0),
        lambda layer: key_second_moment(adapter, layer, docs, n_tokens=2000)[0],
        {"en": [("A is B.", "What is A?", "B")] * 4},
    )


def test_request_points_at_the_subject_last_token(adapter, view) -> None:
    req = make_request(adapter, view, QA)
    last = adapter.tokenizer.decode([req.prompt_ids[req.subject_last]]).strip()
    assert last and view.question.subject.text.endswith(last)
    assert req.prompt.startswith("Q: ") and req.target_new == view.question.edit_target.text


@pytest.mark.parametrize("method", ["ft", "rome"])
def test_edit_restores_bitwise_and_ft_raises_the_new_target(
    adapter, view, mlake_v2411, method
) -> None:
    entry = get_method(method)
    req = make_request(adapter, view, QA)
    before = {n: p.detach().clone() for n, p in adapter.hf_module("model").named_parameters()}
    result = entry.fn(adapter, [req], entry.config_cls(layer=0), _context(adapter, mlake_v2411))
    after_compute = dict(adapter.hf_module("model").named_parameters())
    assert all(torch.equal(before[n], p) for n, p in after_compute.items())  # untouched
    assert result.deltas and all(float(d.abs().sum()) > 0 for d in result.deltas.values())
    pair = [(list(req.prompt_ids), list(req.target_new_ids))]
    p0 = score_sequences(adapter, pair)[0].logp
    with result.applied(adapter):
        p1 = score_sequences(adapter, pair)[0].logp
        changed = dict(adapter.hf_module("model").named_parameters())
        assert not all(torch.equal(before[n], p) for n, p in changed.items())
    assert all(torch.equal(before[n], p) for n, p in after_compute.items())  # restored exactly
    if method == "ft":
        assert p1 > p0 + 1.0


def test_bad_inputs(adapter, view, mlake_v2411) -> None:
    with pytest.raises(ConfigError, match="--method 'nope'"):
        get_method("nope")
    entry = get_method("rome")
    req = make_request(adapter, view, QA)
    with pytest.raises(ConfigError, match="--layer 9"):
        entry.fn(adapter, [req], entry.config_cls(layer=9), _context(adapter, mlake_v2411))
    no_subject = dataclasses.replace(
        view, question=dataclasses.replace(view.question, subject=None, usable=False)
    )
    with pytest.raises(DataError, match=rf"fact {view.fact_id} \[en\] question form"):
        make_request(adapter, no_subject, QA)
    with pytest.raises(ConfigError, match="one fact at a time"):
        entry.fn(adapter, [req, req], entry.config_cls(), _context(adapter, mlake_v2411))
    # A published quirk: the French new answer of fact 4 is its original answer.
    noops = [
        (f.fact_id, v.lang) for f in mlake_v2411.facts for v in f.views.values() if v.edit_is_noop
    ]
    assert (4, "fr") in noops and len(noops) == 3
    with pytest.raises(DataError, match=r"fact 4 \[fr\] question form: the new answer is a form"):
        make_request(adapter, mlake_v2411.fact(4).views["fr"], QA)


def test_evaluation_of_a_null_edit(adapter, micro_tiny: Path, mlake_v2411) -> None:
    """An edit that changes nothing: no efficacy, no transfer, full locality among the
    locality facts known before, and known_before taken from the pre-edit measurement."""
    from analysis.transfer import TransferConfig, evaluate_edit
    from mlake_core.editing import EditResult
    from mlake_core.metrics.knowledge import measure_knowledge

    meta = read_metadata(micro_tiny)
    assert meta is not None
    ids, langs = meta["fact_ids"], ("en", "zh")
    pre = measure_knowledge(adapter, [mlake_v2411.fact(i).views[b] for i in ids for b in langs], QA)
    q = pre.table[pre.table["form"] == "question"]
    known = {
        (int(f), b): m == "original"
        for f, b, m in zip(q["fact_id"], q["lang"], q["greedy_match"], strict=True)
    }
    req = make_request(adapter, mlake_v2411.fact(ids[0]).views["en"], QA)
    rows = evaluate_edit(
        adapter,
        EditResult("none", (req,)),
        mlake_v2411,
        langs,
        QA,
        TransferConfig(),
        locality_ids=ids[1:],
        known_before=known,
    )
    by = {(r["kind"], r["test_lang"], r["form"]): r for r in rows}
    eff = by[("efficacy", "en", "question")]
    assert eff["success_greedy"] == 0.0 and eff["success_prob"] == 0.0
    assert eff["known_before"] == known[(ids[0], "en")]
    assert by[("transfer", "zh", "question")]["success_greedy"] == 0.0
    for b in langs:
        loc = by[("locality", b, "question")]
        assert loc["success_greedy"] == 1.0
        assert loc["n"] == sum(known[(i, b)] for i in ids[1:])
    # Stopping each continuation once its verdict is decided changes no verdict (and stays
    # out of the run key while off).
    early = evaluate_edit(
        adapter,
        EditResult("none", (req,)),
        mlake_v2411,
        langs,
        QA,
        TransferConfig(stop_when_decided=True),
        locality_ids=ids[1:],
        known_before=known,
    )
    verdicts = ["kind", "test_lang", "form", "success_greedy", "n"]
    assert [[r.get(k) for k in verdicts] for r in early] == [
        [r.get(k) for k in verdicts] for r in rows
    ]
    assert "stop_when_decided" not in TransferConfig().to_dict()
    assert TransferConfig(stop_when_decided=True).to_dict()["stop_when_decided"] is True
