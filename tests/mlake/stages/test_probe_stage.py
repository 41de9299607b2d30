"""probe_stage on the micro mlake-tiny and 40 facts (four answers shared by at least two of
them, so the answer task runs): the run folders, the tables equal the pure functions applied to
the saved activations, a rerun loads everything, known_only counts what it leaves out."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mlake.stages import probes as stage_module
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.prompting import get_template
from probes.activations import Activations
from probes.config import ProbeConfig, load_probe_result, pair_matrices
from probes.crosslingual import transfer_table
from probes.language_id import language_id_table
from probes.similarity import similarity_table

pytestmark = pytest.mark.slow

QA = get_template("qa")
LANGS = ("en", "zh", "fr")
FACTS = list(range(40))
CONFIG = ProbeConfig(folds=3, inner_folds=2, cs=(0.1,), min_class_facts=2)


def _ctx(adapter, model, dataset, facts, langs, root, log=None, batch_size=32):
    from mlake.stages.context import StageContext

    return StageContext(
        adapter, str(model), dataset, tuple(facts), tuple(langs), QA, root, batch_size, log=log
    )


@pytest.fixture(scope="module")
def adapter(micro_tiny: Path):
    return load_adapter(str(micro_tiny), "tlens", device="cpu")


@pytest.fixture(scope="module")
def first(adapter, micro_tiny, mlake_v2411, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_stage")
    messages: list[str] = []
    ctx = _ctx(adapter, micro_tiny, mlake_v2411, FACTS, LANGS, root, messages.append, 16)
    result, run = stage_module.probe_stage(ctx, CONFIG)
    return SimpleNamespace(root=root, result=result, run=run, messages=messages)


def test_answer_task_runs_with_its_classes(first):
    result = first.result
    assert result.classes == {
        "united states of america": 5,
        "american broadcasting company": 2,
        "catholic church": 2,
        "united kingdom": 2,
    }
    assert result.answer_lang == "en"
    assert result.tasks() == ["answer", "fact"]
    assert result.skipped == {"answer task:answer shared by fewer than 2 facts": 40 - 11}
    assert result.counts == {lang: {"facts": 40, "usable": 40, "probed": 40} for lang in LANGS}
    answer = result.transfer[result.transfer["task"] == "answer"]
    assert set(answer["n_test"]) == {11}
    assert set(answer["chance"]) == {0.25}
    assert len(answer) == 2 * 3 * 9  # positions x layers x ordered pairs


def test_tables_equal_the_functions_on_saved_activations(first, mlake_v2411):
    acts_runs = list((first.root / "probe_activations").iterdir())
    assert len(acts_runs) == 1
    saved = Activations.concat(
        [
            Activations.from_arrays(dict(np.load(acts_runs[0] / "arrays" / f"acts_{lang}.npz")))
            for lang in LANGS
        ]
    )
    assert saved.sites == ("resid_pre.0", "resid_post.0", "resid_post.1")
    classes = {
        f: c
        for f, c in ((f, mlake_v2411.fact(f).views["en"].record.o_answer.casefold()) for f in FACTS)
        if c in first.result.classes
    }
    pd.testing.assert_frame_equal(first.result.language_id, language_id_table(saved, CONFIG))
    pd.testing.assert_frame_equal(first.result.similarity, similarity_table(saved))
    pd.testing.assert_frame_equal(
        first.result.transfer, transfer_table(saved, classes, CONFIG, ("answer", "fact"))
    )


def test_rerun_loads_and_summary_matches(first, adapter, micro_tiny, mlake_v2411, monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(stage_module, "collect_activations", fail)
    messages: list[str] = []
    ctx = _ctx(adapter, micro_tiny, mlake_v2411, FACTS, LANGS, first.root, messages.append)
    again, run = stage_module.probe_stage(ctx, CONFIG)
    assert run.path == first.run.path
    assert sum("loaded from" in m for m in messages) == len(LANGS) + 3
    assert again.to_dict() == first.result.to_dict()
    loaded = load_probe_result(run.path)
    assert loaded.to_dict() == first.result.to_dict()
    assert run.complete
    m1, m2 = pair_matrices(first.result), pair_matrices(loaded)
    assert all(np.allclose(m1[k], m2[k], equal_nan=True) for k in m1)


def test_known_only_counts_what_it_leaves_out(first, adapter, micro_tiny, mlake_v2411):
    known = {"en": set(FACTS[:30]), "zh": set(FACTS[5:40]), "fr": set(FACTS)}
    knowledge = SimpleNamespace(known=lambda lang: known[lang])
    config = dataclasses.replace(CONFIG, known_only=True)
    ctx = _ctx(adapter, micro_tiny, mlake_v2411, FACTS, LANGS, first.root)
    result, run = stage_module.probe_stage(ctx, config, knowledge=knowledge)
    assert run.path != first.run.path
    assert {lang: c["probed"] for lang, c in result.counts.items()} == dict.fromkeys(LANGS, 25)
    assert {lang: c["known"] for lang, c in result.counts.items()} == {
        "en": 30,
        "zh": 35,
        "fr": 40,
    }
    assert {k: v for k, v in result.skipped.items() if "not known" in k} == {
        f"{lang}:not known in every language": 15 for lang in LANGS
    }
    assert set(result.language_id["n"]) == {25 * 3}
    with pytest.raises(ConfigError, match="known_only needs"):
        stage_module.probe_stage(
            _ctx(adapter, micro_tiny, mlake_v2411, FACTS, LANGS, first.root), config
        )


def test_too_few_facts_or_languages(first, adapter, micro_tiny, mlake_v2411):
    with pytest.raises(ConfigError, match="--folds 3: only 2 facts can be probed"):
        stage_module.probe_stage(
            _ctx(adapter, micro_tiny, mlake_v2411, [0, 1], LANGS, first.root), CONFIG
        )
    with pytest.raises(ConfigError, match="at least two languages"):
        stage_module.probe_stage(
            _ctx(adapter, micro_tiny, mlake_v2411, FACTS, ("en",), first.root), CONFIG
        )
