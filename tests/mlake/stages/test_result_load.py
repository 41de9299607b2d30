"""Every result class loads itself back from what its stage saved (``Cls.load(path)``).

The stages run once, for real, on the micro mlake-tiny (its six training facts, English and
Chinese): knowledge, probe activations and probes, tracing, neurons (attribution patching and
LAPE), transfer (FT on two facts) and relate.  Each result is then loaded from its run folder
(or, for the per-fact pieces, from its ``.npz`` file) and compared value by value with what
the stage returned, or with what the stage computed from the pieces (a tracing summary from the
fact traces, an overlap table from the fact attributions, LAPE from the activation
statistics).  A folder of another kind, a folder that is no run and a missing file are each
refused with a DataError that names them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pandas as pd
import pytest

from analysis.neurons.activation import ActivationStats, LapeResult, activation_stats, lape
from analysis.neurons.attribution import FactAttribution
from analysis.neurons.config import NeuronConfig, NeuronResult
from analysis.neurons.sharing import pair_rows
from analysis.relate import RelateConfig
from analysis.relate_result import RelateResult, load_relate_result
from analysis.tracing.causal import FactTrace, TraceConfig, class_profile
from analysis.tracing.summary import TracingResult, summarize_language
from analysis.transfer import TransferConfig, TransferRun, load_transfer
from mlake.stages.context import StageContext
from mlake.stages.knowledge import knowledge_stage
from mlake.stages.neurons import neurons_stage
from mlake.stages.probes import activations_stage, probe_stage
from mlake.stages.relate import relate_stage
from mlake.stages.tracing import tracing_stage
from mlake.stages.transfer import transfer_stage
from mlake_core.editing.ft import FtConfig
from mlake_core.errors import DataError
from mlake_core.metrics.knowledge import KnowledgeConfig, KnowledgeResult
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template
from probes.activations import Activations
from probes.config import ProbeConfig, ProbeResult, load_probe_result

pytestmark = pytest.mark.slow

QA = get_template("qa")
LANGS = ("en", "zh")
TRACE = TraceConfig(kinds=("resid", "mlp"), n_samples=2)
NEURONS = NeuronConfig(
    methods="atp,lape", ablation_facts=0, min_facts=1, n_random=1, text_tokens=2000
)
PROBES = ProbeConfig(folds=2, inner_folds=2, cs=(0.1,), alphas=(1.0,))
EDITED = 2  # facts edited by the transfer stage (the rest are the locality pool)


@pytest.fixture(scope="module")
def world(micro_tiny: Path, mlake_v2411, tmp_path_factory) -> SimpleNamespace:
    """Every stage run once into one results store, with what each returned."""
    meta = read_metadata(micro_tiny)
    assert meta is not None
    facts = tuple(int(f) for f in meta["fact_ids"])
    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    ctx = StageContext(
        adapter=adapter, model_path=str(micro_tiny), dataset=mlake_v2411, fact_ids=facts,
        langs=LANGS, template=QA, results_dir=tmp_path_factory.mktemp("store"), batch_size=16,
    )  # fmt: skip
    w = SimpleNamespace(ctx=ctx, facts=facts)
    w.knowledge, w.knowledge_run = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
    w.acts, _, _, w.acts_run = activations_stage(ctx)
    w.probes, w.probes_run = probe_stage(ctx, PROBES, knowledge=w.knowledge)
    w.tracing, w.tracing_run = tracing_stage(ctx, TRACE, knowledge=w.knowledge)
    w.neurons, w.neurons_run = neurons_stage(ctx, NEURONS, knowledge=w.knowledge)
    w.rows, w.transfer_run = transfer_stage(
        ctx.with_facts(facts[:EDITED]), "ft", FtConfig(layer=0, steps=2),
        TransferConfig(n_locality=1), knowledge=w.knowledge, locality_pool=facts,
        corpus=["text"], knowledge_run=w.knowledge_run.path,
    )  # fmt: skip
    w.relate, w.relate_run = relate_stage(
        w.transfer_run.path, mlake_v2411, RelateConfig(n_boot=10, n_perm=2, folds=2),
        knowledge_dir=w.knowledge_run.path, neurons_dir=w.neurons_run.path,
        tracing_dir=w.tracing_run.path, probes_dir=w.probes_run.path, unit="atp_neuron",
    )  # fmt: skip
    return w


def _assert_frames_equal(a: Any, b: Any) -> None:
    pd.testing.assert_frame_equal(a.reset_index(drop=True), b.reset_index(drop=True))


def _same(a: Any, b: Any) -> bool:
    """Equal as JSON documents (NaN equal to NaN, which ``==`` on floats is not)."""
    return json.dumps(a, sort_keys=True, default=str) == json.dumps(b, sort_keys=True, default=str)


# -- knowledge --------------------------------------------------------------------------------


def test_knowledge_result_loads_what_the_stage_returned(world) -> None:
    loaded = KnowledgeResult.load(world.knowledge_run.path)
    assert len(loaded.table) and set(loaded.table["lang"]) == set(LANGS)
    _assert_frames_equal(loaded.table, world.knowledge.table)
    assert loaded.skipped == world.knowledge.skipped
    assert loaded.langs == world.knowledge.langs == LANGS
    assert loaded.fact_ids == world.knowledge.fact_ids == world.facts
    for lang in LANGS:
        assert loaded.known(lang) == world.knowledge.known(lang)
    pd.testing.assert_frame_equal(loaded.summary(), world.knowledge.summary())


def test_knowledge_skipped_keys_are_lang_reason(world, tmp_path) -> None:
    """A language's ``skipped_<lang>.json`` comes back keyed ``lang:reason``, in the run's
    language order; a missing language table is named."""
    copy = _copy_run(world.knowledge_run.path, tmp_path)
    (copy / "skipped_zh.json").write_text(json.dumps({"cloze:no subject": 2}))
    (copy / "skipped_en.json").write_text(json.dumps({"question:empty_target": 1}))
    loaded = KnowledgeResult.load(copy)
    assert list(loaded.skipped.items()) == [("en:question:empty_target", 1), ("zh:cloze:no subject", 2)]  # fmt: skip
    (copy / "tables" / "knowledge_zh.parquet").unlink()
    with pytest.raises(DataError, match=r"knowledge_zh\.parquet: no such result table"):
        KnowledgeResult.load(copy)


# -- tracing ----------------------------------------------------------------------------------


def test_tracing_result_loads_what_the_stage_returned(world) -> None:
    result = world.tracing
    loaded = TracingResult.load(world.tracing_run.path)
    assert loaded.to_dict() == result.to_dict()
    assert loaded.run_path == result.run_path == str(world.tracing_run.path)
    assert (loaded.langs, loaded.kinds, loaded.n_layers, loaded.window) == (
        result.langs, result.kinds, result.n_layers, result.window,
    )  # fmt: skip
    assert loaded.noise_std == result.noise_std
    assert loaded.recommended_layer == result.recommended_layer
    assert loaded.counts == result.counts and loaded.skipped == result.skipped
    assert sum(s.n_facts for s in result.summaries) > 0
    for a, b in zip(loaded.summaries, result.summaries, strict=True):
        assert (a.lang, a.n_facts, a.peak_mlp_layer) == (b.lang, b.n_facts, b.peak_mlp_layer)
        assert a.p_clean == pytest.approx(b.p_clean, abs=5e-6)
        for kind in result.kinds:  # saved rounded to 5 decimals
            np.testing.assert_allclose(a.maps[kind], b.maps[kind], atol=5e-6, equal_nan=True)
    for kind, matrix in result.similarity.items():
        np.testing.assert_allclose(loaded.similarity[kind], matrix, atol=5e-6, equal_nan=True)


def test_fact_traces_load_into_the_stage_summaries(world) -> None:
    """The saved fact traces, loaded, average to exactly the stage's per-language maps."""
    result, run = world.tracing, world.tracing_run
    for summary in result.summaries:
        files = sorted(
            (run.path / "arrays").glob(f"trace_{summary.lang}_*.npz"),
            key=lambda p: world.facts.index(int(p.stem.rsplit("_", 1)[1])),
        )
        assert len(files) == summary.n_facts
        traces = [FactTrace.load(f) for f in files]
        for f, trace in zip(files, traces, strict=True):
            again = FactTrace.from_arrays(run.load_arrays(f.stem))
            assert trace.prompt_ids == again.prompt_ids and trace.tokens == again.tokens
            assert trace.p_clean == again.p_clean and trace.classes == again.classes
        profiles = {k: [class_profile(t, k) for t in traces] for k in result.kinds}
        rebuilt = summarize_language(
            summary.lang,
            profiles,
            [t.p_clean for t in traces],
            [t.p_corrupt for t in traces],
            result.n_layers,
        )
        assert rebuilt.p_clean == summary.p_clean and rebuilt.p_corrupt == summary.p_corrupt
        for kind in result.kinds:
            np.testing.assert_array_equal(rebuilt.maps[kind], summary.maps[kind])


# -- neurons ----------------------------------------------------------------------------------


def test_neuron_result_loads_what_the_stage_returned(world) -> None:
    loaded = NeuronResult.load(world.neurons_run.path)
    assert loaded.to_dict() == world.neurons.to_dict()
    assert [(m.method, m.unit) for m in loaded.methods] == [
        ("atp", "neuron"), ("atp", "head"), ("lape", "neuron"),
    ]  # fmt: skip
    atp = loaded.get("atp")
    assert atp.n_facts == world.neurons.get("atp").n_facts and sum(atp.n_facts.values()) > 0
    np.testing.assert_array_equal(atp.jaccard, world.neurons.get("atp").jaccard)


def test_fact_attributions_load_into_the_stage_overlap_table(world) -> None:
    """The saved fact attributions, loaded, give exactly the stage's overlap table."""
    run, adapter = world.neurons_run, world.ctx.adapter
    for unit, width in (("neuron", adapter.d_mlp), ("head", adapter.info.n_heads)):
        rows = []
        for fact_id in world.facts:
            sets = {}
            for lang in LANGS:
                path = run.arrays_path(f"atp_{lang}_{fact_id}")
                if path.is_file():
                    fa = FactAttribution.load(path)
                    assert fa.method == "atp" and fa.forms[0] == "question"
                    assert fa.passes == int(run.load_arrays(path.stem)["passes"])
                    sets[lang] = fa.sets[unit]
            for row in pair_rows(sets, LANGS, adapter.n_layers, width):
                rows.append({"fact_id": fact_id, **row})
        saved = run.load_table(f"overlap_atp_{unit}")
        assert len(saved)
        _assert_frames_equal(pd.DataFrame.from_records(rows), saved)


def test_activation_stats_and_lape_load(world) -> None:
    """The activation statistics equal a fresh measurement on the same text; LAPE loaded
    equals LAPE recomputed from them, with the bar the stage reported."""
    from analysis.neurons.activation import mlake_texts

    ctx = world.ctx
    stats = ActivationStats.load(world.neurons_run.path)
    fresh = activation_stats(
        ctx.adapter,
        mlake_texts(ctx.dataset, LANGS),
        max_tokens=NEURONS.text_tokens,
        batch_size=8 * ctx.batch_size,
    )
    assert stats.langs == fresh.langs == LANGS
    for name in ("n_tokens", "positive", "total", "n_texts"):
        np.testing.assert_array_equal(getattr(stats, name), getattr(fresh, name))
    by_file = ActivationStats.load(world.neurons_run.arrays_path("activations"))
    np.testing.assert_array_equal(by_file.total, stats.total)

    loaded = LapeResult.load(world.neurons_run.path)
    expected = lape(
        stats,
        top_rate=NEURONS.lape_top_rate,
        filter_rate=NEURONS.lape_filter_rate,
        bar_rate=NEURONS.lape_bar_rate,
    )
    assert loaded.langs == expected.langs and loaded.bar == expected.bar
    assert loaded.bar == world.neurons.lape["bar"] and len(loaded.selected) > 0
    for name in ("selected", "assignment", "entropy"):
        np.testing.assert_array_equal(getattr(loaded, name), getattr(expected, name))
    assert loaded.selected.dtype == np.int64 and loaded.assignment.dtype == bool


# -- probes -----------------------------------------------------------------------------------


def test_probe_result_loads_what_the_stage_returned(world) -> None:
    result = world.probes
    loaded = ProbeResult.load(world.probes_run.path)
    assert loaded.to_dict() == result.to_dict()
    for name in ("language_id", "transfer", "similarity"):
        a, b = getattr(loaded, name), getattr(result, name)
        assert len(b)
        pd.testing.assert_frame_equal(a, b, check_dtype=False)
    assert load_probe_result(world.probes_run.path).to_dict() == result.to_dict()


def test_activations_load_what_the_stage_returned(world) -> None:
    acts, run = world.acts, world.acts_run
    for loaded in (
        Activations.load(run.path),
        Activations.concat([Activations.load(run.arrays_path(f"acts_{lang}")) for lang in LANGS]),
    ):
        assert loaded.sites == acts.sites and loaded.positions == acts.positions
        np.testing.assert_array_equal(loaded.fact_ids, acts.fact_ids)
        np.testing.assert_array_equal(loaded.langs, acts.langs)
        for p in acts.positions:
            np.testing.assert_array_equal(loaded.values[p], acts.values[p])
            np.testing.assert_array_equal(loaded.tokens[p], acts.tokens[p])
    assert list(dict.fromkeys(acts.langs.tolist())) == list(LANGS)


# -- transfer and relate ----------------------------------------------------------------------


def test_transfer_run_loads_the_stage_rows(world) -> None:
    """The same rows as the stage returned (it concatenates them in the run's language order,
    the load in language-code order), with the run's meta and key."""
    rows, run = world.rows, world.transfer_run
    loaded = TransferRun.load(run.path)
    assert len(rows) and set(rows["edit_lang"]) == set(LANGS)
    expected = pd.concat([rows[rows["edit_lang"] == lang] for lang in sorted(LANGS)])
    _assert_frames_equal(loaded.rows, expected)
    assert loaded.path == run.path
    assert loaded.meta == run.meta and loaded.key == run.load_json("key")
    assert loaded.method == "ft" and loaded.label == "ft"
    assert load_transfer(run.path).rows.equals(loaded.rows)


def test_relate_result_loads_what_the_stage_returned(world) -> None:
    result = world.relate
    loaded = RelateResult.load(world.relate_run.path)
    assert _same(loaded.to_dict(), result.to_dict())
    assert loaded.method == "ft" and loaded.unit == "atp_neuron" and loaded.langs == list(LANGS)
    assert loaded.inputs["transfer"] == str(world.transfer_run.path)
    # A matrix of the stage may hold None where a language pair has no value (a tracing
    # similarity saved as null): NaN once loaded.
    for attr in ("predictors", "outcomes"):
        matrices, back = getattr(result, attr), getattr(loaded, attr)
        assert list(back) == list(matrices) and len(matrices)
        for name, matrix in matrices.items():
            assert list(back[name].index) == list(matrix.index) == list(LANGS)
            assert list(back[name].columns) == list(matrix.columns)
            np.testing.assert_array_equal(back[name].to_numpy(), matrix.to_numpy(dtype=float))
    assert loaded.n_rows == result.n_rows and loaded.dropped == result.dropped
    assert _same(load_relate_result(world.relate_run.path).to_dict(), result.to_dict())
    for kind, fit in result.fits.items():
        assert (loaded.fits[kind].n_rows, loaded.fits[kind].note) == (fit.n_rows, fit.note)


# -- wrong folders and files ------------------------------------------------------------------

#: (loader, the kind of run it reads) of every run-folder loader.
RUN_LOADERS = [
    (KnowledgeResult.load, "knowledge"),
    (TracingResult.load, "tracing"),
    (NeuronResult.load, "neurons"),
    (ActivationStats.load, "neurons"),
    (LapeResult.load, "neurons"),
    (ProbeResult.load, "probes"),
    (load_probe_result, "probes"),
    (Activations.load, "probe_activations"),
    (TransferRun.load, "transfer"),
    (load_transfer, "transfer"),
    (RelateResult.load, "relate"),
    (load_relate_result, "relate"),
]


def _run_of(world, kind: str) -> Path:
    return {
        "knowledge": world.knowledge_run,
        "tracing": world.tracing_run,
        "neurons": world.neurons_run,
        "probes": world.probes_run,
        "probe_activations": world.acts_run,
        "transfer": world.transfer_run,
        "relate": world.relate_run,
    }[kind].path


@pytest.mark.parametrize(("load", "kind"), RUN_LOADERS, ids=lambda x: getattr(x, "__qualname__", x))
def test_a_run_of_another_kind_is_refused_by_name(world, tmp_path, load, kind) -> None:
    other = _run_of(world, "knowledge" if kind != "knowledge" else "tracing")
    with pytest.raises(DataError, match=rf"run, expected a {kind} run") as err:
        load(other)
    assert str(other) in str(err.value)
    with pytest.raises(DataError, match=r"no meta\.json") as err:
        load(tmp_path)
    assert str(tmp_path) in str(err.value)
    with pytest.raises(DataError, match=r"no meta\.json") as err:
        load(tmp_path / "missing")
    assert str(tmp_path / "missing") in str(err.value)


@pytest.mark.parametrize(
    ("kind", "load", "needs"),
    [
        ("tracing", TracingResult.load, "summary.json"),
        ("neurons", NeuronResult.load, "summary.json"),
        ("neurons", LapeResult.load, "summary.json"),
        ("neurons", ActivationStats.load, "arrays/activations.npz"),
        ("neurons", LapeResult.load, "arrays/lape.npz"),
        ("probes", ProbeResult.load, "summary.json"),
        ("probe_activations", Activations.load, "arrays/acts_zh.npz"),
        ("transfer", TransferRun.load, "tables/edits_en.parquet,tables/edits_zh.parquet"),
        ("relate", RelateResult.load, "summary.json"),
    ],
)
def test_a_run_without_its_file_is_refused_by_name(world, tmp_path, kind, load, needs) -> None:
    copy = _copy_run(_run_of(world, kind), tmp_path)
    for name in needs.split(","):
        (copy / name).unlink()
    with pytest.raises(DataError) as err:
        load(copy)
    assert str(copy) in str(err.value)


@pytest.mark.parametrize(
    ("load", "what"),
    [
        (FactTrace.load, "a fact trace"),
        (FactAttribution.load, "a fact attribution"),
        (ActivationStats.load, "activation statistics"),
        (Activations.load, "probe activations"),
    ],
)
def test_a_per_fact_file_of_another_kind_is_refused_by_name(world, tmp_path, load, what):
    other = world.neurons_run.arrays_path("lape")  # no loader here reads LAPE's file
    with pytest.raises(DataError, match=f"not {what}") as err:
        load(other)
    assert str(other) in str(err.value)
    with pytest.raises(DataError, match="no such result arrays") as err:
        load(tmp_path / "missing.npz")
    assert "missing.npz" in str(err.value)


def _copy_run(folder: Path, tmp_path: Path) -> Path:
    import shutil

    copy = tmp_path / "copy" / folder.name
    shutil.copytree(folder, copy)
    return copy


def test_lape_bar_may_be_nan(world, tmp_path) -> None:
    """JSON keeps a NaN bar as null; it loads as NaN."""
    copy = _copy_run(world.neurons_run.path, tmp_path)
    summary = json.loads((copy / "summary.json").read_text())
    summary["lape"]["bar"] = None
    (copy / "summary.json").write_text(json.dumps(summary))
    assert math.isnan(LapeResult.load(copy).bar)
