"""The lens and patching predictors of the relation analysis (issue 21 part 4): read from a
lens-edit run and a patching run written with the real results store and the real result
classes, into the same statistics as the neuron overlap.

The world is test_relate_stage's (30 facts, en/de/zh, a transfer run, its knowledge and neuron
runs), plus:

* a lens-edit run of FT edits of the first 20 facts in every language, whose lens makes the
  new answer decodable at B's subject exactly where the transfer succeeded (a predictor equal
  to the outcome) and at B's last position in a latent layer on a shuffled copy of it (a
  predictor unrelated to it); rows of facts 20-29 have no lens (missing, counted);
* a patching run whose counterfactual patches follow at layer 2 of the subject position
  exactly where the transfer succeeded (0 at every other layer, so layer 2 is the best layer
  by the patching rule) and at layer 1 of the last position on the shuffled copy; its edit
  patches carry the edit by a planted rule, and five edits fail in their own language (no
  carried value: missing);
* distractors: a lens-edit run of ROME edits, which the lookup must not pick.

Every expected number is computed here from the planted values, not from the stage's tables.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis.failures import latent_layers
from analysis.lens import (
    EDIT_KINDS,
    PHASES,
    EditLens,
    EditLensResult,
    summarize_edit_lens,
)
from analysis.lens import POSITIONS as LENS_POSITIONS
from analysis.patching import (
    CounterfactualPatch,
    EditPatch,
    PatchingResult,
    summarize_counterfactual,
    summarize_edits,
)
from analysis.relate import (
    INTERVENTION_PREDICTORS,
    RelateConfig,
    fact_level,
    join_measures,
    lens_measures,
    measure_matrices,
    pair_level,
)
from mlake.cli import main as cli_main
from mlake.stages.relate import relate_stage
from mlake_core.errors import DataError
from tests.mlake.stages.test_relate_stage import (
    FACTS,
    LANGS,
    NOOP,
    UNKNOWN,
    World,
    _build_world,
    _dataset,
    _make_run,
)

CONFIG = RelateConfig(n_boot=50, n_perm=30)
N_LAYERS = 4
EDITED = FACTS[:20]  # the facts edited in every language by the lens and patching runs
#: Edits that fail in their own language: the patching run says nothing about them.
OWN_FAILED = {("en", 3), ("de", 5), ("zh", 7), ("zh", 8), ("en", 11)}
SUBJECT_LAYER, LAST_LAYER = 2, 1  # where the planted follows are (the best layers)


def _outcome(world: World) -> dict[tuple[int, str, str], float]:
    """The planted transfer success per (fact, A, B) (question form, A != B)."""
    rows = world.transfer_rows
    sel = rows[(rows["kind"] == "transfer") & (rows["form"] == "question")]
    return {
        (int(r.fact_id), r.edit_lang, r.test_lang): float(r.success_greedy)
        for r in sel.itertuples()
    }


def _shuffled(outcome: dict[tuple[int, str, str], float]) -> dict[tuple[int, str, str], float]:
    keys = sorted(outcome)
    values = np.array([outcome[k] for k in keys])
    return dict(zip(keys, np.random.default_rng(7).permutation(values).tolist(), strict=True))


def _carried(f: int, a: str, b: str) -> bool:
    return (f + len(a) + 2 * len(b) + LANGS.index(b)) % 3 == 0


# -- the lens-edit run ------------------------------------------------------------------------


def _edit_lens(f: int, a: str, world: World, at_subject: dict, at_last: dict) -> EditLens:
    k, n = len(LANGS), N_LAYERS
    rank = np.full((k, len(PHASES), len(LENS_POSITIONS), n, len(EDIT_KINDS), k), 500)
    prob = np.full(rank.shape, 1e-4)
    # token ids: new answer 100 + language, old answer 200 + language; a no-op pair shares it
    ids = np.zeros((k, len(EDIT_KINDS), k), dtype=np.int64)
    after, subject, last = PHASES.index("after"), 0, 1
    new = EDIT_KINDS.index("new")
    known = []
    for t, b in enumerate(LANGS):
        ids[t, 0] = [100 + j for j in range(k)]
        ids[t, 1] = [200 + j for j in range(k)]
        if (f, a, b) in NOOP:
            ids[t, 1, t] = ids[t, 0, t]  # new and old answer share a first token in B
        known.append((f, a, b) not in UNKNOWN)
        if b == a:
            rank[t, after, last, -1, new, t] = 0  # the edit succeeds in its own language
            continue
        if at_subject[(f, a, b)]:
            rank[t, after, subject, 1, new, (t + 1) % k] = 3  # another form, rank < top_k
        if at_last[(f, a, b)]:
            rank[t, after, last, 0, new, t] = 2
        # always decodable in the output layer, which is not latent: it must not count
        rank[t, after, last, n - 1, new, (t + 2) % k] = 1
    return EditLens(
        prob=prob,
        rank=rank,
        answer_ids=ids,
        answer_langs=list(LANGS),
        test_langs=list(LANGS),
        positions=np.tile([3, 6], (k, 1)),
        known_before=known,
        edit_lang=a,
        fact_id=f,
    )


def _save_lens_run(root: Path, world: World, method: str, at_subject, at_last) -> Path:
    run = _make_run(
        root,
        "lens_edits",
        model=world.model,
        fact_ids=FACTS,
        extra_key={"config": {"method": method, "edits": len(EDITED), "top_k": 10}},
    )
    lenses = {a: [_edit_lens(f, a, world, at_subject, at_last) for f in EDITED] for a in LANGS}
    for a, items in lenses.items():
        for lens in items:
            run.save_arrays(f"edit_{a}_{lens.fact_id}", lens.to_arrays())
    result = EditLensResult(
        langs=tuple(LANGS),
        method=method,
        n_layers=N_LAYERS,
        top_k=10,
        lens="logit",
        pairs={a: {b: summarize_edit_lens(a, b, lenses[a], 10) for b in LANGS} for a in LANGS},
        edits={a: list(EDITED) for a in LANGS},
        skipped={},
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", fact_ids=FACTS, langs=LANGS)
    return run.path


# -- the patching run -------------------------------------------------------------------------


def _cf(f: int, a: str, b: str, follow_subject: bool, follow_last: bool) -> CounterfactualPatch:
    prob = np.zeros((2, N_LAYERS, 2))
    prob[..., 1] = 0.2  # the target's own answer
    prob[..., 0] = 0.1  # the source fact's answer: below it, so B does not follow
    if follow_subject:
        prob[0, SUBJECT_LAYER, 0] = 0.5
    if follow_last:
        prob[1, LAST_LAYER, 0] = 0.5
    return CounterfactualPatch(
        prob=prob,
        rank=np.ones((2, N_LAYERS, 2), dtype=np.int64),
        clean_prob=np.array([0.1, 0.2]),
        clean_rank=np.array([1, 0]),
        facts=((f + 1) % len(FACTS), f),
        tokens=(11, 12),
    )


def _edit_patch(f: int, a: str) -> EditPatch:
    k = len(LANGS)
    rank = np.full((k, 2, 2, N_LAYERS, 2), 5, dtype=np.int64)
    for t, b in enumerate(LANGS):
        if _carried(f, a, b):
            rank[t, 0, 0, 3, 0] = 0  # forward, subject position, the last layer
        rank[t, 0, 1, :, 0] = 0  # at the last position it always is: never read
        rank[t, 1, 0, :, 0] = 0  # nor is the reverse direction
    return EditPatch(
        prob=np.full(rank.shape, 0.1),
        rank=rank,
        clean_prob=np.full((k, 2, 2), 0.1),
        clean_rank=np.full((k, 2, 2), 3, dtype=np.int64),
        target_langs=list(LANGS),
        tokens=np.tile([100, 200], (k, 1)),
        source_success=(a, f) not in OWN_FAILED,
    )


def _save_patching_run(root: Path, world: World, at_subject, at_last) -> Path:
    run = _make_run(
        root,
        "patching",
        model=world.model,
        fact_ids=FACTS,
        extra_key={"config": {"method": "ft", "edits": len(EDITED), "seed": 0}},
    )
    pairs: dict[tuple[str, str], list[CounterfactualPatch]] = {}
    for a in LANGS:
        for b in LANGS:
            for f in FACTS:
                key = (f, a, b)
                patch = _cf(f, a, b, at_subject.get(key, 0.0) > 0, at_last.get(key, 0.0) > 0)
                run.save_arrays(f"cf_{a}_{b}_{f}", patch.to_arrays())
                pairs.setdefault((a, b), []).append(patch)
    edits = {a: [_edit_patch(f, a) for f in EDITED] for a in LANGS}
    for a, items in edits.items():
        for f, edit_patch in zip(EDITED, items, strict=True):
            run.save_arrays(f"edit_{a}_{f}", edit_patch.to_arrays())
    result = PatchingResult(
        langs=tuple(LANGS),
        n_layers=N_LAYERS,
        config={"method": "ft", "edits": len(EDITED)},
        counterfactual=summarize_counterfactual(LANGS, pairs, N_LAYERS),
        edits=summarize_edits(LANGS, edits, N_LAYERS),
        skipped={},
        run_path=str(run.path),
    )
    run.save_json("summary", result.to_dict())
    run.write_meta(status="complete", fact_ids=FACTS, langs=LANGS)
    return run.path


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("relate_interventions") / "runs"
    world = _build_world(root)
    outcome = _outcome(world)
    shuffled = _shuffled(outcome)
    lens = _save_lens_run(root, world, "ft", outcome, shuffled)
    rome = _save_lens_run(root, world, "rome", shuffled, shuffled)  # must never be picked
    patching = _save_patching_run(root, world, outcome, shuffled)
    return {
        "world": world,
        "outcome": outcome,
        "shuffled": shuffled,
        "lens": lens,
        "rome": rome,
        "patching": patching,
    }


@pytest.fixture(scope="module")
def related2(world2):
    world = world2["world"]
    result, run = relate_stage(
        world.transfer,
        _dataset(),
        CONFIG,
        lens_dir=world2["lens"],
        patching_dir=world2["patching"],
    )
    return result, run


def _base_rows(world: World) -> list[tuple[int, str, str]]:
    """The fact-level rows before the overlap's drop: transfer rows (question form) not a
    no-op, known in B, with a pre-edit measurement in B."""
    pre = {
        (int(r.fact_id), r.lang) for r in world.knowledge_rows.itertuples() if r.form == "question"
    }
    out = []
    rows = world.transfer_rows
    sel = rows[(rows["kind"] == "transfer") & (rows["form"] == "question")]
    for r in sel.itertuples():
        key = (int(r.fact_id), r.edit_lang, r.test_lang)
        if r.n == 0 or not r.known_before or (key[0], key[2]) not in pre:
            continue
        out.append(key)
    return out


# -- the stage --------------------------------------------------------------------------------


def test_inputs_record_the_runs_and_the_best_layers(world2, related2) -> None:
    result, _ = related2
    assert result.inputs["lens_edits"] == str(world2["lens"])
    assert result.inputs["patching"] == str(world2["patching"])
    read = result.inputs["patching_read"]
    assert read["best_layer"] == {"subject_last": SUBJECT_LAYER, "last": LAST_LAYER}
    assert read["counterfactual_patches"] == len(LANGS) ** 2 * len(FACTS)
    assert read["edit_patches"] == len(LANGS) * len(EDITED)
    lens_read = result.inputs["lens_edits_read"]
    assert lens_read["method"] == "ft" and lens_read["top_k"] == 10
    assert lens_read["edits"] == len(LANGS) * len(EDITED)
    assert lens_read["latent_layers"] == list(latent_layers(N_LAYERS)) == [0, 1, 2]
    assert set(result.predictor_fits) == set(INTERVENTION_PREDICTORS)


def test_missing_rows_are_counted(world2, related2) -> None:
    result, _ = related2
    base = _base_rows(world2["world"])
    lens_missing = sum(f not in EDITED for f, _, _ in base)
    carried_missing = sum(f not in EDITED or (a, f) in OWN_FAILED for f, a, _ in base)
    assert result.missing == {
        "patch_follow_subject": 0,  # every fact has its counterfactual patches
        "patch_follow_last": 0,
        "patch_carried": carried_missing,
        "lens_new_at_subject": lens_missing,
        "lens_new_at_last_latent": lens_missing,
    }
    for name, n_missing in result.missing.items():
        for fit in result.predictor_fits[name].values():
            assert fit.n_rows == len(base) - n_missing


def test_a_predictor_equal_to_the_outcome_is_found_and_a_shuffled_one_is_not(related2) -> None:
    result, _ = related2
    for name in ("lens_new_at_subject", "patch_follow_subject"):
        fit = result.predictor_fits[name]["logistic"]
        assert not fit.note
        term = fit.term(name)
        assert term["estimate"] > 2 and term["ci_low"] > 0
        assert term["p"] == pytest.approx(1 / (CONFIG.n_perm + 1))  # the permutation floor
        assert fit.auc == pytest.approx(1.0) and fit.auc_gain > 0
    for name in ("lens_new_at_last_latent", "patch_follow_last"):
        term = result.predictor_fits[name]["logistic"].term(name)
        assert term["p"] > 0.1 and term["ci_low"] < 0 < term["ci_high"]


def test_pair_level_matrices_by_hand(world2, related2) -> None:
    result, _ = related2
    outcome = world2["outcome"]
    # The lens predictor equal to the outcome, over the rows the lens reads (facts known in B,
    # new and old answers told apart): the transfer matrix restricted to the edited facts.
    lens = result.predictors["lens_new_at_subject"]
    for a in LANGS:
        for b in LANGS:
            if a == b:
                continue
            keys = [(f, a, b) for f in EDITED if (f, a, b) not in NOOP and (f, a, b) not in UNKNOWN]
            assert lens.loc[a, b] == pytest.approx(np.mean([outcome[k] for k in keys]))
            carried = [
                _carried(f, a, b) for f in EDITED if (a, f) not in OWN_FAILED
            ]  # every target, known or not: the patching run's own rule
            assert result.predictors["patch_carried"].loc[a, b] == pytest.approx(np.mean(carried))
    # The run's own counterfactual matrix at its best layer is the follow predictor's.
    patched = PatchingResult.load(world2["patching"])
    np.testing.assert_allclose(
        result.predictors["patch_follow_subject"].to_numpy(),
        patched.matrix("follows", "subject_last"),
        atol=1e-6,
    )
    rows = {(r["predictor"], r["outcome"]): r for r in result.pair_level.to_dict("records")}
    for name in INTERVENTION_PREDICTORS:
        assert (name, "transfer") in rows and rows[(name, "transfer")]["exact"]


def test_mantel_of_a_predictor_equal_to_the_outcome_is_at_its_floor() -> None:
    """The pair-level statistics take the new matrices as they take the overlap's: one equal
    to the outcome gives rho 1 and p 1/n!; a shuffled one does not."""
    rng = np.random.default_rng(3)
    recs = []
    for f in range(40):
        for a in LANGS:
            for b in LANGS:
                if a != b:
                    recs.append(
                        {
                            "fact_id": f,
                            "edit_lang": a,
                            "test_lang": b,
                            "lens_new_at_subject": float(
                                rng.random() < 0.1 + 0.2 * LANGS.index(b) + 0.1 * LANGS.index(a)
                            ),
                        }
                    )
    table = pd.DataFrame.from_records(recs)
    matrices = measure_matrices(table, LANGS)
    outcome = {"transfer": matrices["lens_new_at_subject"].copy()}
    shuffled = matrices["lens_new_at_subject"].copy()
    shuffled.loc[:, :] = shuffled.to_numpy()[[2, 0, 1]][:, [1, 2, 0]]
    res = pair_level({**matrices, "shuffled": shuffled}, outcome, LANGS)
    same = res[res["predictor"] == "lens_new_at_subject"].iloc[0]
    assert same["rho"] == pytest.approx(1.0) and same["p"] == pytest.approx(1 / math.factorial(3))
    other = res[res["predictor"] == "shuffled"].iloc[0]
    assert other["rho"] < 1 and other["p"] > 1 / math.factorial(3)


def test_fact_level_on_a_named_predictor_matches_the_overlap_path() -> None:
    """fact_level with ``predictor=`` is the overlap's model on another column: renaming the
    column gives the same numbers."""
    rng = np.random.default_rng(5)
    n = 240
    x = rng.normal(size=n)
    rows = pd.DataFrame(
        {
            "fact_id": np.repeat(np.arange(n // 4), 4),
            "edit_lang": rng.choice(LANGS, n),
            "test_lang": rng.choice(LANGS, n),
            "success": (rng.random(n) < 1 / (1 + np.exp(-2 * x))).astype(float),
            "gain": x + rng.normal(size=n),
            "overlap": x,
            "same_subject": 0.0,
            "subject_token_jaccard": rng.random(n),
            "same_answer": 0.0,
            "answer_token_jaccard": rng.random(n),
            "known_before": 1.0,
        }
    )
    rows["pair"] = rows["edit_lang"] + "->" + rows["test_lang"]
    config = RelateConfig(n_boot=20, n_perm=10)
    by_overlap = fact_level(rows, config)
    renamed = rows.rename(columns={"overlap": "patch_follow_last"})
    by_name = fact_level(renamed, config, predictor="patch_follow_last")
    for kind in ("logistic", "linear"):
        a, b = by_overlap[kind].term("overlap"), by_name[kind].term("patch_follow_last")
        for field_name in ("estimate", "ci_low", "ci_high", "p"):
            assert a[field_name] == pytest.approx(b[field_name])
    constant = fact_level(renamed.assign(patch_follow_last=0.0), config, "patch_follow_last")
    assert constant["logistic"].note == "the patch_follow_last does not vary"


def test_lens_measures_apply_the_failure_rules(world2) -> None:
    world = world2["world"]
    outcome, shuffled = world2["outcome"], world2["shuffled"]
    # facts 0-9 edited in en: (1, en, de) and (8, en, zh) are no-op pairs: not read
    lenses = [_edit_lens(f, "en", world, outcome, shuffled) for f in EDITED[:10]]
    table = lens_measures(lenses, top_k=10)
    got = {
        (int(r.fact_id), r.edit_lang, r.test_lang): (
            r.lens_new_at_subject,
            r.lens_new_at_last_latent,
        )
        for r in table.itertuples()
    }
    want = {}
    for f in EDITED[:10]:
        for b in LANGS:
            key = (f, "en", b)
            if key in NOOP or key in UNKNOWN:
                continue
            want[key] = (0.0, 0.0) if b == "en" else (outcome[key], shuffled[key])
    assert got == want and (1, "en", "de") not in got and (8, "en", "zh") not in got
    joined = join_measures(table, table.rename(columns=lambda c: c.replace("lens_", "x_")))
    assert len(joined) == len(table)


def test_lookup_by_model_picks_the_same_method(world2) -> None:
    world = world2["world"]
    result, _ = relate_stage(world.transfer, _dataset(), RelateConfig(n_boot=10, n_perm=0))
    assert result.inputs["lens_edits"] == str(world2["lens"])  # not the ROME one
    assert result.inputs["patching"] == str(world2["patching"])


def test_a_run_of_another_method_or_kind_is_refused_naming_the_option(world2) -> None:
    world = world2["world"]
    with pytest.raises(DataError, match=r"--lens-run .*rome edits.*edits with ft"):
        relate_stage(world.transfer, _dataset(), CONFIG, lens_dir=world2["rome"])
    with pytest.raises(DataError, match=r"--patching-run .*a neurons run, expected a patching"):
        relate_stage(world.transfer, _dataset(), CONFIG, patching_dir=world.neurons)
    with pytest.raises(DataError, match=r"--lens-run .*no meta.json"):
        relate_stage(world.transfer, _dataset(), CONFIG, lens_dir=world.root / "nowhere")


def test_cli_prints_the_predictors_beside_the_overlap(world2, related2, capsys, monkeypatch):
    world = world2["world"]
    monkeypatch.setattr("mlake_core.data.dataset.load_mlake", lambda *a, **k: _dataset())
    args = [
        "relate",
        str(world.transfer),
        "--n-boot",
        "50",
        "--n-perm",
        "30",
        "--lens-run",
        str(world2["lens"]),
        "--patching-run",
        str(world2["patching"]),
    ]
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert any(line.startswith(f"lens_edits run: {world2['lens']}") for line in lines)
    assert any(line.startswith(f"patching run: {world2['patching']}") for line in lines)
    start = next(i for i, line in enumerate(lines) if line.startswith("fact level, lens and"))
    table = lines[start + 2 : start + 2 + 1 + len(INTERVENTION_PREDICTORS)]
    assert [line.split()[0] for line in table] == ["overlap", *INTERVENTION_PREDICTORS]
    result, _ = related2
    fit = result.predictor_fits["lens_new_at_subject"]["logistic"]
    row = next(line for line in table if line.split()[0] == "lens_new_at_subject")
    assert row.split()[1:4] == [
        str(fit.n_rows),
        str(fit.n_facts),
        str(result.missing["lens_new_at_subject"]),
    ]
    assert f"{fit.term('lens_new_at_subject')['estimate']:.2f} [" in row
    for name in INTERVENTION_PREDICTORS:  # beside the neuron overlap in the pair-level table
        assert any(line.strip().startswith(f"{name} ") for line in lines[:start])

    assert cli_main([*args, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["missing"] == result.missing
    assert set(data["predictor_fits"]) == set(INTERVENTION_PREDICTORS)
    got = data["predictor_fits"]["lens_new_at_subject"]["logistic"]
    assert got["n_rows"] == fit.n_rows
    assert {r["predictor"] for r in data["pair_level"]} >= set(INTERVENTION_PREDICTORS)


@pytest.mark.parametrize(("lens_method", "patch_method"), [("ft", "ft"), ("none", "rome")])
def test_the_pipeline_passes_its_lens_and_patching_runs(monkeypatch, lens_method, patch_method):
    """The pipeline's relate stage hands relate_stage the lens-edit and patching runs it made,
    when they edited with the transfer run's method (else None: looked up, or left out)."""
    from types import SimpleNamespace

    import mlake.stages.relate as relate_module
    from mlake.pipeline import steps

    seen: dict[str, Any] = {}

    def fake(transfer, dataset, config, **kw):
        seen.update(kw, transfer=transfer)
        return None, SimpleNamespace(path=Path("store/relate/x"))

    monkeypatch.setattr(relate_module, "relate_stage", fake)
    state = SimpleNamespace(
        need=lambda *a: None,
        runs={
            "transfer:ft": "store/transfer/t",
            "neurons": "store/neurons/n",
            "lens_edits": "store/lens_edits/l",
            "patching": "store/patching/p",
        },
        dataset=None,
        config=SimpleNamespace(
            relate=SimpleNamespace(stats=CONFIG, unit="ig_neuron"),
            lens=SimpleNamespace(method=lens_method),
            patching=SimpleNamespace(method=patch_method),
        ),
        store="store",
        log=None,
        item=lambda *a: None,
    )
    assert steps._stage_relate(state) == {"ft": "store/relate/x"}  # type: ignore[arg-type]
    assert seen["transfer"] == "store/transfer/t"
    assert seen["lens_dir"] == ("store/lens_edits/l" if lens_method == "ft" else None)
    assert seen["patching_dir"] == ("store/patching/p" if patch_method == "ft" else None)
