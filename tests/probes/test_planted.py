"""The probes on planted activations (tests/probes/helpers.py) with a known answer: a class
signal shared by every language must transfer; one written differently per language must not;
no signal gives chance and no selectivity; a language offset is found by the language-ID
probe; a linear map between languages is recovered by retrieval."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from probes.crosslingual import answer_classes, answer_transfer, fact_retrieval, transfer_table
from probes.language_id import language_id_table
from probes.linear import fact_folds
from probes.similarity import similarity_table
from tests.probes.helpers import FAST, LANGS, planted, rotation


def _matrix(rows, value="accuracy"):
    index = {lang: i for i, lang in enumerate(LANGS)}
    out = np.full((len(LANGS), len(LANGS)), np.nan)
    for r in rows:
        out[index[r["train_lang"]], index[r["test_lang"]]] = r[value]
    return out


def _off(m):
    return m[~np.eye(len(m), dtype=bool)]


def _answer(acts, classes, config=FAST, layer=1):
    folds = fact_folds(list(classes), config.folds, config.seed, strata=classes)
    return answer_transfer(acts.by_lang("subject", layer), classes, folds, config)


def test_shared_signal_transfers():
    acts, classes = planted(shared=True)
    rows = _answer(acts, classes)
    acc, ctrl, sel = (_matrix(rows, v) for v in ("accuracy", "control", "selectivity"))
    assert np.all(_off(acc) > 0.9)
    assert np.all(np.diag(acc) > 0.9)
    assert abs(np.mean(ctrl) - 0.25) < 0.08  # control at chance (4 classes)
    assert np.all(sel > 0.5)
    assert {r["chance"] for r in rows} == {0.25}
    assert {r["n_test"] for r in rows} == {96}


def test_language_specific_signal_does_not_transfer():
    """The same classes, written by a different rotation in each language: every language
    alone decodes them, no probe carries over."""
    acts, classes = planted(shared=False)
    acc = _matrix(_answer(acts, classes))
    assert np.all(np.diag(acc) > 0.9)
    assert np.mean(_off(acc)) < 0.45


def test_no_signal_is_chance_and_not_selective():
    acts, classes = planted(class_signal=0.0, per_class=30)
    rows = _answer(acts, classes)
    acc, sel = _matrix(rows), _matrix(rows, "selectivity")
    assert abs(np.mean(acc) - 0.25) < 0.05
    assert abs(np.mean(sel)) < 0.06
    # Layer 0 of the planted data is noise too.
    rows0 = _answer(*planted(), layer=0)
    assert abs(np.mean(_matrix(rows0)) - 0.25) < 0.06


def test_centering_removes_language_offsets():
    """A large language offset pushes every test language off the training language's scale;
    centring each language on its training-fact mean removes it."""
    acts, classes = planted(lang_offset=40.0, class_signal=2.0)
    centred = _off(_matrix(_answer(acts, classes)))
    raw = _off(_matrix(_answer(acts, classes, dataclasses.replace(FAST, center=False))))
    assert np.mean(centred) > 0.85
    assert np.mean(raw) < np.mean(centred) - 0.3


def test_answer_classes_need_min_facts():
    answers = {1: "Paris", 2: "paris ", 3: "ＰＡＲＩＳ", 4: "Rome", 5: "Rome", 6: "Oslo"}
    assert answer_classes(answers, 3) == {1: "paris", 2: "paris", 3: "paris"}
    assert answer_classes(answers, 2) == {1: "paris", 2: "paris", 3: "paris", 4: "rome", 5: "rome"}


def test_fact_retrieval_recovers_a_linear_map():
    """Each language is a rotation of the same fact vectors (plus noise): a map learned on
    training facts retrieves held-out facts; the map learned on shuffled pairs does not."""
    rng = np.random.default_rng(0)
    n, d = 100, 16
    base = rng.normal(size=(n, d))
    ids = np.arange(n)
    by_lang = {
        lang: (ids, base @ rotation(d, rng) + 0.1 * rng.normal(size=(n, d))) for lang in LANGS
    }
    folds = fact_folds(ids, 4, seed=0)
    rows = fact_retrieval(by_lang, folds, FAST)
    acc, ctrl = _matrix(rows), _matrix(rows, "control")
    assert np.all(acc > 0.95)
    assert np.mean(ctrl) < 0.15
    assert [r["chance"] for r in rows] == pytest.approx([1 / 25] * 25)
    # Independent languages: nothing to retrieve.
    noise = {lang: (ids, rng.normal(size=(n, d))) for lang in LANGS}
    assert np.mean(_off(_matrix(fact_retrieval(noise, folds, FAST)))) < 0.15


def test_language_id_finds_the_offset():
    acts, _ = planted(lang_offset=3.0, class_signal=1.0)
    table = language_id_table(acts, FAST)
    assert len(table) == 4  # 2 positions x 2 layers
    signal = table[table["layer"] == 1]
    noise = table[table["layer"] == 0]
    assert np.all(signal["accuracy"] > 0.95)
    assert np.all(signal["selectivity"] > 0.7)
    assert np.all(np.abs(noise["accuracy"] - 0.2) < 0.08)
    assert np.all(np.abs(noise["selectivity"]) < 0.1)
    assert np.all(np.abs(table["control"] - 0.2) < 0.08)
    assert set(table["chance"]) == {0.2}
    assert set(table["n"]) == {5 * 96}
    assert {f"recall_{lang}" for lang in LANGS} <= set(table.columns)


def test_tables_cover_every_position_layer_and_pair():
    acts, classes = planted(per_class=12)
    one_c = dataclasses.replace(FAST, cs=(0.1,))  # no inner search: this test is about coverage
    transfer = transfer_table(acts, classes, one_c)
    assert len(transfer) == 2 * 2 * 2 * 25  # tasks x positions x layers x pairs
    sim = similarity_table(acts)
    assert len(sim) == 2 * 2 * 25
    diag = sim[sim["lang_a"] == sim["lang_b"]]
    assert np.allclose(diag["cka"], 1.0) and np.allclose(diag["cos_same"], 1.0)
    shared = sim[(sim["layer"] == 1) & (sim["lang_a"] != sim["lang_b"])]
    noise = sim[(sim["layer"] == 0) & (sim["lang_a"] != sim["lang_b"])]
    assert shared["cka"].min() > 0.5
    assert noise["cka"].abs().max() < 0.15
    assert shared["cos_same"].min() > shared["cos_diff"].max() + 0.3
    # Fewer than two classes: the answer task is left out.
    one = {f: "x" for f in classes}
    assert set(transfer_table(acts, one, one_c)["task"]) == {"fact"}
    with pytest.raises(ValueError, match="unknown task"):
        transfer_table(acts, classes, one_c, tasks=("nope",))
