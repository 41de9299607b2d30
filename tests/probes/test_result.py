"""ProbeResult and pair_matrices on a result built from planted activations (the signal is
at layer 1, so that is the layer chosen): matrices, attributes, JSON round trip, loading a
run folder, and the errors for what a result does not hold."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest

from mlake_core.errors import ConfigError, DataError
from mlake_core.results.store import open_run
from probes.config import ProbeConfig, ProbeResult, load_probe_result, pair_matrices
from probes.crosslingual import transfer_table
from probes.language_id import language_id_table
from probes.similarity import similarity_table
from tests.probes.helpers import FAST, LANGS, planted

ONE_C = dataclasses.replace(FAST, cs=(0.1,))


@pytest.fixture(scope="module")
def result() -> ProbeResult:
    acts, classes = planted(per_class=12)
    return ProbeResult(
        langs=LANGS,
        sites=acts.sites,
        positions=acts.positions,
        language_id=language_id_table(acts, ONE_C),
        transfer=transfer_table(acts, classes, ONE_C),
        similarity=similarity_table(acts),
        counts={lang: {"facts": 48, "usable": 48, "probed": 48} for lang in LANGS},
        skipped={"ja:not usable (planted)": 0},
        classes={"class0": 12, "class1": 12, "class2": 12, "class3": 12},
        answer_lang="en",
        config=ONE_C.to_dict(),
        run_path="runs/planted",
    )


def test_pair_matrices_at_the_best_layer(result):
    assert result.best_layer("answer", "subject") == 1
    assert result.best_layer("fact", "last") == 1
    matrices = pair_matrices(result)
    assert set(matrices) == {
        "probe_transfer",
        "probe_transfer_selectivity",
        "fact_retrieval",
        "rep_similarity_cka",
        "rep_similarity_cosine",
    }
    for name, m in matrices.items():
        assert list(m.index) == list(LANGS) and list(m.columns) == list(LANGS), name
        assert m.attrs["layer"] == 1 and m.attrs["site"] == "resid_post.0"
        assert m.attrs["position"] == "subject"
        assert m.attrs["measure"]
    t = result.transfer
    cell = t[
        (t["task"] == "answer")
        & (t["position"] == "subject")
        & (t["layer"] == 1)
        & (t["train_lang"] == "zh")
        & (t["test_lang"] == "fr")
    ]["accuracy"]
    assert matrices["probe_transfer"].loc["zh", "fr"] == pytest.approx(float(cell.iloc[0]))
    assert np.allclose(np.diag(matrices["rep_similarity_cka"]), 1.0)
    assert np.allclose(matrices["rep_similarity_cka"], matrices["rep_similarity_cka"].T)
    assert (matrices["probe_transfer"].to_numpy() > 0.8).all()
    # An explicit layer: the noise layer, where the probe is near chance.
    noise = pair_matrices(result, "last", layer=0)
    assert noise["probe_transfer"].attrs["layer"] == 0
    assert abs(float(noise["probe_transfer"].to_numpy().mean()) - 0.25) < 0.1


def test_embeddings_are_never_the_best_layer(result):
    """Layer 0 is the lexical baseline: even when it transfers best it is not chosen, unless
    asked for."""
    t = result.transfer.copy()
    t.loc[t["layer"] == 0, "accuracy"] = 1.0
    lexical = dataclasses.replace(result, transfer=t)
    assert lexical.best_layer("answer") == 1
    assert lexical.best_layer("answer", embeddings=True) == 0
    assert pair_matrices(lexical)["probe_transfer"].attrs["layer"] == 1
    assert (pair_matrices(lexical, layer=0)["probe_transfer"].to_numpy() == 1.0).all()


def test_round_trip_and_load(result, tmp_path):
    data = json.loads(json.dumps(result.to_dict()))
    back = ProbeResult.from_dict(data)
    assert back.langs == result.langs and back.sites == result.sites
    assert back.classes == result.classes and back.counts == result.counts
    for name in ("language_id", "transfer", "similarity"):
        a, b = getattr(result, name), getattr(back, name)
        assert list(a.columns) == list(b.columns)
        for col in a.columns:
            if a[col].dtype.kind == "f":
                assert np.allclose(a[col], b[col], equal_nan=True), (name, col)
            else:
                assert list(a[col]) == list(b[col]), (name, col)
    run = open_run("probes", {"test": "round trip"}, root=tmp_path)
    run.write_meta(status="running")
    with pytest.raises(DataError, match="no probe summary"):
        load_probe_result(run.path)
    run.save_json("summary", data)
    loaded = load_probe_result(run.path)
    assert loaded.run_path == str(run.path)
    pm, pm2 = pair_matrices(result), pair_matrices(loaded)
    for name in pm:
        assert np.allclose(pm[name].to_numpy(), pm2[name].to_numpy(), equal_nan=True)
    with pytest.raises(DataError, match=r"no meta\.json"):
        load_probe_result(tmp_path / "missing")


def test_nan_survives_json(result):
    """Similarity of a pair with too few facts is NaN; JSON writes null, reading gives NaN."""
    sim = result.similarity.copy()
    sim.loc[0, "cka"] = math.nan
    data = dataclasses.replace(result, similarity=sim).to_dict()
    assert data["similarity"][0]["cka"] is None
    back = ProbeResult.from_dict(json.loads(json.dumps(data)))
    assert math.isnan(back.similarity.loc[0, "cka"])


def test_errors(result):
    with pytest.raises(KeyError, match="position 'middle'"):
        pair_matrices(result, "middle")
    with pytest.raises(KeyError, match="layer 9"):
        pair_matrices(result, layer=9)
    with pytest.raises(KeyError, match="measure 'nope'"):
        result.similarity_matrix("last", 0, "nope")
    no_answer = dataclasses.replace(
        result, transfer=result.transfer[result.transfer["task"] == "fact"]
    )
    assert no_answer.tasks() == ["fact"]
    with pytest.raises(KeyError, match="task 'answer'"):
        no_answer.best_layer("answer")
    assert "probe_transfer" not in pair_matrices(no_answer)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("folds", 1, "--folds 1: must be at least 2"),
        ("inner_folds", 1, "--inner-folds 1"),
        ("cs", "0.1,x", "--cs '0.1,x': expected comma-separated numbers"),
        ("cs", "0,1", "positive"),
        ("alphas", "", "--alphas"),
        ("min_class_facts", 1, "--min-class-facts 1: must be at least 2"),
        ("max_iter", "ten", "--max-iter: expected an integer, got 'ten'"),
        ("known_only", "maybe", "--known-only"),
    ],
)
def test_config_errors(field, value, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ProbeConfig(**{field: value})


def test_config_coerces_strings():
    config = ProbeConfig(folds="3", cs="10,0.1", alphas=[5, "50"], known_only="yes")
    assert config.folds == 3 and config.known_only is True
    assert config.cs == (0.1, 10.0) and config.alphas == (5.0, 50.0)
    assert config.to_dict()["cs"] == [0.1, 10.0]


# -- signal: a probe not above its control or chance ----------------------------------------


def test_probe_signal_against_the_baseline():
    from probes.config import probe_signal

    # At or below the larger of control and chance: the control equals the measurement.
    assert probe_signal(0.42, 0.42, 0.25, 12) == (False, "not_above_baseline")
    assert probe_signal(0.30, 0.20, 0.40, 60) == (False, "not_above_baseline")
    # Above it, but within what 12 examples reach by chance (7 of 12 against 0.44).
    assert probe_signal(0.583, 0.44, 0.42, 12) == (False, "not_significant")
    # Well above it on many examples.
    assert probe_signal(0.90, 0.20, 0.20, 60) == (True, None)
    # 17 of 60 against 0.2 is p = 0.08; 19 of 60 is p = 0.02.
    assert probe_signal(17 / 60, 0.12, 0.2, 60) == (False, "not_significant")
    assert probe_signal(19 / 60, 0.12, 0.2, 60) == (True, None)
    # Without a number of examples only the comparison is made; without an accuracy, nothing.
    assert probe_signal(0.5, 0.4, math.nan, None) == (True, None)
    assert probe_signal(math.nan, 0.4, 0.2, 10) == (None, None)


def test_the_planted_layers_with_and_without_signal(result):
    """Layer 0 carries only noise: no probe there has signal; layer 1 carries the language,
    the answer and the fact."""
    for position in result.positions:
        assert result.language_id_signal(position, 0)[0] is False
        assert result.language_id_signal(position, 1) == (True, None)
        for task in result.tasks():
            assert result.cross_lingual_signal(task, position, 0)[0] is False
            assert result.cross_lingual_signal(task, position, 1) == (True, None)
    assert result.language_id_signal("subject", 7) == (None, None)
    with pytest.raises(KeyError, match="position"):
        result.language_id_signal("middle", 1)
    # A saved result is judged the same (the verdict is computed from the saved rows).
    again = ProbeResult.from_dict(json.loads(json.dumps(result.to_dict())))
    assert again.cross_lingual_signal("answer", "subject", 0) == result.cross_lingual_signal(
        "answer", "subject", 0
    )
