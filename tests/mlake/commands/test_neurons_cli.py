"""``mlake neurons`` end to end on the micro mlake-tiny: the report's sections, the run folder
(summary, per-fact attributions with their ablation checks, overlap tables, specific units)
checked against what its own arrays say, resuming without recomputing, a lost attribution
recomputed alone, skipped views counted, facts the model does not know, and bad options."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import mlake_core.data.dataset as dataset_module
from analysis.neurons.ablation import ablated_probability, unit_patches
from analysis.neurons.activation import mlake_texts
from analysis.neurons.attribution import (
    AttributionConfig,
    FactAttribution,
    answer_probability,
    important_units,
)
from analysis.neurons.sharing import classify_units, pair_rows
from mlake.cli import main
from mlake_core.editing.base import locate_prompt
from mlake_core.errors import MlakeError
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from tests.analysis.neurons.helpers import attribution_prompt

pytestmark = pytest.mark.slow

LANGS = ("en", "zh")
N_FACTS = 3
SECTIONS = ("== ig (neurons)", "== atp (neurons)", "== atp (heads)", "== lape (neurons)")


@pytest.fixture(scope="module")
def micro_adapters(micro_tiny: Path):
    """The micro mlake-tiny, keyed by backend like ``tests/analysis/neurons``' fixture (whose
    conftest this folder does not see); these tests use TransformerLens."""
    return {"tlens": load_adapter(str(micro_tiny), "tlens", device="cpu")}


@pytest.fixture(scope="module", autouse=True)
def cached_data():
    """Each ``mlake`` call loads the data; load it once per module (the same object the real
    loader returns for the same arguments)."""
    real = dataset_module.load_mlake
    cache: dict = {}

    def load(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_module, "load_mlake", load)
        yield


def _call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first(micro_tiny: Path, tmp_path_factory):
    """The first run (everything computed), in text mode."""
    root = tmp_path_factory.mktemp("neurons_runs")
    args = ("neurons", "--model", str(micro_tiny), "--langs", ",".join(LANGS))
    args += ("--facts", str(N_FACTS), "--steps", "4", "--samples", "2", "--n-random", "2")
    args += ("--min-facts", "1", "--text-tokens", "400", "--ablation-facts", "2")
    args += ("--results-dir", str(root), "--device", "cpu")
    code, text, err = _call(*args)
    assert code == 0, err
    summary_path = next(root.glob("neurons/*/summary.json"))
    return SimpleNamespace(
        root=root, args=args, text=text, err=err, run=summary_path.parent,
        summary=json.loads(summary_path.read_text(encoding="utf-8")),
    )  # fmt: skip


@pytest.fixture(scope="module")
def fact_ids(micro_tiny: Path) -> list[int]:
    meta = read_metadata(micro_tiny)
    assert meta is not None
    return meta["fact_ids"][:N_FACTS]


def test_report_sections(first):
    text = first.text
    head = text.splitlines()[0]
    assert head.startswith("model ") and head.endswith(f"; {N_FACTS} facts; {first.run}")
    positions = [text.index(s) for s in SECTIONS]
    assert positions == sorted(positions)  # in this order
    assert text.count("same-fact overlap of important sets (mean Jaccard)") == 3
    assert text.count("units per layer: specific to each language, shared, neither") == 4
    # One check per per-fact method and unit, over its views with a random control (the
    # count is the summary's).
    checks = [m["check"] for m in first.summary["methods"] if m.get("check", {}).get("n")]
    assert len(checks) == 3
    assert text.count("ablation check (") == 3
    for c in checks:
        assert f"ablation check ({c['n']} facts)" in text
    # The ablation matrix of neurons only (ig, atp, lape), with its random control.
    assert text.count("ablation matrix: knowledge-accuracy drop") == 3
    assert text.count("same with random units") == 3
    assert "LAPE: " in text and "text tokens en 400, zh 400" in text
    assert "facts attributed: en 3, zh 3" in text
    assert "neurons: activation statistics on en 400 tokens, zh 400 tokens" in first.err
    # Per-layer rows (layer, specific per language, shared, neither) add up to the layer's
    # units: 128 neurons or 2 heads, in the sections' order.
    rows = [r for r in (ln.split() for ln in text.splitlines()) if r and r[0].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1] * 4
    assert [sum(int(x) for x in r[1:]) for r in rows] == [128, 128, 128, 128, 2, 2, 128, 128]


def _arrays(run: Path, name: str) -> dict:
    with np.load(run / "arrays" / f"{name}.npz", allow_pickle=False) as data:
        return dict(data)


def test_run_folder_matches_its_arrays(first, fact_ids, micro_adapters, mlake_v2411):
    run, summary = first.run, first.summary
    assert json.loads((run / "meta.json").read_text())["status"] == "complete"
    assert summary["langs"] == list(LANGS) and summary["n_layers"] == 2
    by = {(m["method"], m["unit"]): m for m in summary["methods"]}
    assert list(by) == [("ig", "neuron"), ("atp", "neuron"), ("atp", "head"), ("lape", "neuron")]
    adapter = micro_adapters["tlens"]
    config = AttributionConfig()  # the run's rule: threshold 0.2
    for method, units in (("ig", ("neuron",)), ("atp", ("neuron", "head"))):
        sets = {u: {lang: {} for lang in LANGS} for u in units}
        checks = {u: [] for u in units}
        passes = []
        for lang in LANGS:
            for fid in fact_ids:
                arrays = _arrays(run, f"{method}_{lang}_{fid}")
                fa = FactAttribution.from_arrays(arrays)
                assert fa.method == method and fa.forms[0] == "question"
                # The saved answer probability and ablation check are those of the model.
                view = mlake_v2411.fact(fid).views[lang]
                prompt = attribution_prompt(adapter, view, "question")
                seq = [*prompt.prompt_ids, *prompt.answer_ids[:-1]]
                p = float(answer_probability(adapter.forward(adapter.batch([seq])), prompt)[0])
                assert fa.p_answer[0] == pytest.approx(p, abs=1e-5)
                passes.append(fa.passes)
                for unit in units:
                    n_units = 128 if unit == "neuron" else 2
                    assert fa.scores[unit].shape == (len(fa.forms), 2, n_units)
                    # The set: units important in every prompt (agreement 0.7), by the rule.
                    important = [set(important_units(s, config).tolist()) for s in fa.scores[unit]]
                    assert set(fa.sets[unit].tolist()) == set.intersection(*important)
                    sets[unit][lang][fid] = fa.sets[unit]
                    # The ablation check: clean and with the set ablated (zero), by hand.
                    c = arrays[f"check_{unit}"]
                    assert c[0] == pytest.approx(p, abs=1e-5)
                    patches = unit_patches(adapter, fa.sets[unit], unit)
                    assert c[1] == pytest.approx(
                        ablated_probability(adapter, prompt, patches), abs=1e-5
                    )
                    assert np.isnan(c[2]) == (len(fa.sets[unit]) == 0)
                    checks[unit].append(c)
        for unit in units:
            m = by[method, unit]
            n_units = 128 if unit == "neuron" else 2
            assert m["n_facts"] == {lang: N_FACTS for lang in LANGS}
            assert min(passes) >= 3 and m["passes_per_fact"] == pytest.approx(np.mean(passes))
            for lang in LANGS:
                sizes = [len(s) for s in sets[unit][lang].values()]
                assert m["set_size"][lang] == pytest.approx(np.mean(sizes))
            # The overlap table: one row per fact, recomputed from the saved sets.
            table = pd.read_parquet(run / "tables" / f"overlap_{method}_{unit}.parquet")
            assert table["fact_id"].tolist() == fact_ids
            for row in table.to_dict("records"):
                fid = row["fact_id"]
                (want,) = pair_rows(
                    {lang: sets[unit][lang][fid] for lang in LANGS}, LANGS, 2, n_units
                )
                for key, value in want.items():
                    same = value == row[key] or (
                        isinstance(value, float) and math.isnan(value) and math.isnan(row[key])
                    )
                    assert same, (method, unit, fid, key)
            jac = table["jaccard"].dropna()
            got = m["jaccard"][0][1]
            assert (got is None and jac.empty) or got == pytest.approx(jac.mean())
            assert m["n_pairs"][0][1] == len(jac)
            # Specific units: classified from the saved sets with the run's rules.
            classes = classify_units(
                {lang: list(sets[unit][lang].values()) for lang in LANGS}, LANGS, 2, n_units,
                min_rate=0.05, min_facts=1,
            )  # fmt: skip
            specific = json.loads((run / f"specific_{method}_{unit}.json").read_text())
            want = {k: v.tolist() for k, v in classes.specific_sets().items()}
            assert specific == {**want, "shared": classes.shared_units().tolist()}
            assert m["counts"] == classes.counts()
            # The ablation check summary: mean drops over facts.
            c = np.array(checks[unit])
            valid = ~np.isnan(c[:, 2])
            assert m["check"]["n"] == int(valid.sum())
            if valid.any():
                assert m["check"]["drop"] == pytest.approx(
                    float((c[valid, 0] - c[valid, 1]).mean())
                )
                diff = (c[valid, 0] - c[valid, 1]) - (c[valid, 0] - c[valid, 2])
                assert m["check"]["fraction_above_random"] == pytest.approx(
                    float((diff > 0).mean())
                )
            if unit == "neuron":
                matrix = pd.read_parquet(run / "tables" / f"ablation_{method}_{unit}.parquet")
                assert len(matrix) == 4 and set(matrix["n_facts"]) == {2}
                for r in matrix.to_dict("records"):
                    i, j = LANGS.index(r["ablated_lang"]), LANGS.index(r["measured_lang"])
                    assert m["ablation"][i][j] == pytest.approx(r["drop"])
                    assert r["n_units"] == len(specific[r["ablated_lang"]])
            else:
                assert not (run / "tables" / f"ablation_{method}_{unit}.parquet").exists()
    lape = by["lape", "neuron"]
    saved = _arrays(run, "lape")
    assert summary["lape"]["selected"] == len(saved["selected"]) == round(0.01 * 256)
    only = saved["assignment"].sum(1) == 1  # assigned to one language: specific to it
    assert lape["set_size"] == {
        lang: float((only & saved["assignment"][:, i]).sum()) for i, lang in enumerate(LANGS)
    }
    specific = json.loads((run / "specific_lape_neuron.json").read_text())
    assert specific["shared"] == saved["selected"][saved["assignment"].sum(1) >= 2].tolist()
    stats = _arrays(run, "activations")
    assert stats["n_tokens"].tolist() == [400, 400]


def _no_recomputation(monkeypatch) -> None:
    import analysis.neurons.activation as activation
    import analysis.neurons.attribution as attribution

    def boom(*a, **k):
        raise AssertionError("a saved result was recomputed")

    monkeypatch.setattr(attribution, "attribute_fact", boom)
    monkeypatch.setattr(activation, "activation_stats", boom)


def _json_report(out: str) -> dict:
    report = json.loads(out)
    assert report.pop("seconds") >= 0
    assert report.pop("n_facts") == N_FACTS and report.pop("model")
    return report


def test_resume_recomputes_nothing(first, monkeypatch):
    _no_recomputation(monkeypatch)
    code, out, err = _call(*first.args, "--json")
    assert code == 0, err
    report = _json_report(out)
    summary = copy.deepcopy(first.summary)
    report.pop("skipped"), summary.pop("skipped")  # see the next test
    assert report == summary
    code, text, err = _call(*first.args)
    assert code == 0, err
    assert text.split("\nskipped: ")[0] == first.text.split("\nskipped: ")[0]


def test_resume_reports_the_same_skipped_counts(first, monkeypatch):
    _no_recomputation(monkeypatch)
    code, text, err = _call(*first.args)
    assert code == 0, err
    assert text == first.text
    code, out, err = _call(*first.args, "--json")
    assert _json_report(out) == first.summary


def test_a_lost_attribution_is_recomputed_alone(first, fact_ids, monkeypatch):
    import analysis.neurons.attribution as attribution

    # A fact with important neurons: its ablation check draws random sets.
    lang, fid = next(
        (lang, fid)
        for lang in ("zh", "en")
        for fid in fact_ids
        if len(_arrays(first.run, f"atp_{lang}_{fid}")["set_neuron"]) > 0
    )
    lost = first.run / "arrays" / f"atp_{lang}_{fid}.npz"
    before = _arrays(first.run, lost.stem)
    assert not np.isnan(before["check_neuron"]).any()
    lost.unlink()
    real = attribution.attribute_fact
    calls = []

    def counted(adapter, method, prompts, config, context):
        calls.append((method, prompts[0][1].where))
        return real(adapter, method, prompts, config, context)

    monkeypatch.setattr(attribution, "attribute_fact", counted)
    code, out, err = _call(*first.args, "--json")
    assert code == 0, err
    assert calls == [("atp", f"fact {fid} [{lang}] question form")]
    again = _arrays(first.run, lost.stem)
    # The per-fact seeds (noise, random control sets) make the recomputation identical.
    for key in (
        "scores_neuron",
        "scores_head",
        "set_neuron",
        "set_head",
        "check_neuron",
        "check_head",
    ):
        assert np.array_equal(again[key], before[key], equal_nan=True), key
    report = _json_report(out)
    summary = copy.deepcopy(first.summary)
    for m, m0 in zip(report["methods"], summary["methods"], strict=True):
        m.pop("seconds_per_fact"), m0.pop("seconds_per_fact")
    assert report == summary


def test_skipped_views_are_counted(first, fact_ids, micro_adapters, mlake_v2411):
    """Every fact is attributed in each language or counted; a fact whose cloze form is not
    usable is attributed on its question alone, and the cloze form is counted."""
    adapter = micro_adapters["tlens"]
    qa = get_template("qa")
    want: dict[str, int] = {}
    no_cloze = set()
    for lang in LANGS:
        for fid in fact_ids:
            try:
                locate_prompt(adapter, mlake_v2411.fact(fid).views[lang], qa, "cloze")
            except MlakeError as err:
                no_cloze.add((lang, fid))
                reason = "cloze form: " + str(err).split(": ", 1)[-1]
                for method in ("ig", "atp"):
                    key = f"{method}:{lang}:{reason}"
                    want[key] = want.get(key, 0) + 1
    assert want, "the micro model's first facts have no unusable cloze form any more"
    assert first.summary["skipped"] == want
    assert "skipped: " + ", ".join(f"{k} {v}" for k, v in sorted(want.items())) in first.text
    for lang in LANGS:
        for fid in fact_ids:
            forms = [str(f) for f in _arrays(first.run, f"ig_{lang}_{fid}")["forms"]]
            assert forms == (["question"] if (lang, fid) in no_cloze else ["question", "cloze"])


def test_facts_not_known_are_skipped(micro_adapters, micro_tiny, mlake_v2411, fact_ids, tmp_path):
    """Called as a stage with a knowledge result that says one fact is not known in zh."""
    from analysis.neurons.config import NeuronConfig
    from mlake.stages.context import StageContext
    from mlake.stages.neurons import neurons_stage

    known = {"en": set(fact_ids), "zh": set(fact_ids[1:])}
    knowledge = SimpleNamespace(known=lambda lang: known[lang])
    (tmp_path / "text").mkdir()
    for lang, line in (("en", "The capital of France is Paris."), ("zh", "法国的首都是巴黎。")):
        (tmp_path / "text" / f"{lang}.txt").write_text(f"{line}\n{line}\n", encoding="utf-8")
    config = NeuronConfig(methods="atp", ablation_facts=0, min_facts=1)
    ctx = StageContext(
        adapter=micro_adapters["tlens"], model_path=str(micro_tiny), dataset=mlake_v2411,
        fact_ids=tuple(fact_ids), langs=LANGS, template=get_template("qa"),
        results_dir=tmp_path / "runs",
    )  # fmt: skip
    result, run = neurons_stage(ctx, config, knowledge=knowledge, text_folder=tmp_path / "text")
    assert result.skipped["atp:zh:not known before"] == 1
    assert "atp:en:not known before" not in result.skipped
    assert result.get("atp", "neuron").n_facts == {"en": N_FACTS, "zh": N_FACTS - 1}
    assert result.get("atp", "head").n_facts == {"en": N_FACTS, "zh": N_FACTS - 1}
    assert not run.has_arrays(f"atp_zh_{fact_ids[0]}") and run.has_arrays(f"atp_zh_{fact_ids[1]}")
    assert all(math.isnan(v) for row in result.get("atp").ablation for v in row)  # not asked
    stats = run.load_arrays("activations")
    tokens = micro_adapters["tlens"].encode("法国的首都是巴黎。")
    assert int(stats["n_tokens"][1]) == 2 * len(tokens)  # read from the text folder
    assert not result.lape  # not asked for


def test_mlake_texts(mlake_v2411):
    texts = mlake_texts(mlake_v2411, ["en", "zh"])
    fact = mlake_v2411.facts[0]
    assert texts["en"][:2] == [fact.views["en"].record.o_prompt, fact.views["en"].record.question]
    assert len(texts["zh"]) == 2 * sum("zh" in f.views for f in mlake_v2411.facts)


@pytest.mark.parametrize(
    "extra, message",
    [
        (("--methods", "ig,xyz"), "--methods ig,xyz: unknown xyz"),
        (("--layers", "0,5"), "--layers 0,5: out of range for a model with 2 layers"),
        (("--threshold", "2"), "--threshold 2.0: must be in (0, 1)"),
        (("--agreement", "0"), "--agreement 0.0: must be in (0, 1]"),
        (("--text", "MISSING"), "is not a folder"),
        (("--text", "ONLY_EN"), "no text for zh (expected zh.txt or zh/)"),
    ],
)
def test_bad_options(first, tmp_path: Path, extra, message) -> None:
    only_en = tmp_path / "only_en"
    only_en.mkdir()
    (only_en / "en.txt").write_text("Some text.\n", encoding="utf-8")
    paths = {"MISSING": str(tmp_path / "missing"), "ONLY_EN": str(only_en)}
    extra = tuple(paths.get(x, x) for x in extra)
    before = sorted(p.name for p in (first.root / "neurons").iterdir())
    code, out, err = _call(*first.args, *extra)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlake: error:") and message in last
    assert out == ""
    assert sorted(p.name for p in (first.root / "neurons").iterdir()) == before  # no run opened
