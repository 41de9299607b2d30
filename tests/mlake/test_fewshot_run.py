"""Few-shot prompts in a run: knowledge scoring on a tiny model on both backends, the template
built once when a session is opened (demonstrations outside the evaluated facts and the pool),
result keys that follow the seed, the default template of models without one, the whole
selection giving up its demonstration facts, and ``--template fewshot`` on the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mlake.cli import main
from mlake.loading import LoadedModel, load_model
from mlake.session import open_session, prepare_template, stage_context
from mlake.settings import DataSettings, ModelSettings, RunSettings
from mlake_core.data.selection import select_facts
from mlake_core.errors import ConfigError
from mlake_core.metrics.knowledge import KnowledgeConfig, measure_knowledge, score_sequences
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import FEWSHOT, QA, FewShotTemplate, get_template

pytestmark = pytest.mark.slow

LANGS = ("en", "zh")


def test_model_settings_accept_few_shot_names() -> None:
    assert ModelSettings(template="fewshot").template == "fewshot"
    assert ModelSettings(template="fewshot-5-seed1").template == "fewshot-5-seed1"
    with pytest.raises(ConfigError, match="fewshot-K"):
        ModelSettings(template="fewshot-five")


def test_knowledge_with_few_shot_prompts_on_both_backends(micro_tiny: Path, mlake_v2411) -> None:
    meta = read_metadata(micro_tiny)
    assert meta is not None
    fact_ids = [int(f) for f in meta["fact_ids"]][:3]
    template = FewShotTemplate.build(mlake_v2411, exclude=fact_ids, k=1, seed=0, langs=LANGS)
    views = [mlake_v2411.fact(f).views[lang] for f in fact_ids for lang in LANGS]
    config = KnowledgeConfig(mcqa=False, max_new_tokens=4)
    tables = {}
    for backend in ("tlens", "nnsight"):
        adapter = load_adapter(str(micro_tiny), backend, device="cpu")
        result = measure_knowledge(adapter, views, template, config, batch_size=4)
        one = measure_knowledge(adapter, views, template, config, batch_size=1)
        table = result.table.sort_values(["fact_id", "lang", "form"]).reset_index(drop=True)
        single = one.table.sort_values(["fact_id", "lang", "form"]).reset_index(drop=True)
        assert list(table["greedy_text"]) == list(single["greedy_text"])
        assert table["target_logp"].to_numpy() == pytest.approx(
            single["target_logp"].to_numpy(), abs=1e-3
        )
        for row in table.itertuples():
            demo = template.demos(row.lang)[0]
            assert demo.fact_id not in fact_ids
            first = demo.question if row.form == "question" else demo.cloze
            assert row.prompt.startswith(f"Q: {first}" if row.form == "question" else first)
            text = mlake_v2411.fact(row.fact_id).views[row.lang].form(row.form).text
            assert row.prompt == template.prompt(row.form, text, row.lang)[0]
        # The score is that of the few-shot prompt, joined to the answer by ids.
        row = table[(table["form"] == "question") & (table["lang"] == "en")].iloc[0]
        view = mlake_v2411.fact(int(row["fact_id"])).views["en"]
        prompt, prefix = template.prompt("question", view.question.text, "en")
        answer = adapter.tokenizer(prefix + view.question.target.text, add_special_tokens=False)
        (score,) = score_sequences(adapter, [(adapter.encode(prompt), answer["input_ids"])])
        assert int(row["prompt_tokens"]) == len(adapter.encode(prompt))
        if int(row["n_target_forms"]) == 1:
            assert float(row["target_logp"]) == pytest.approx(score.logp, abs=1e-3)
        tables[backend] = table
    assert list(tables["tlens"]["greedy_text"]) == list(tables["nnsight"]["greedy_text"])
    assert tables["tlens"]["target_logp"].to_numpy() == pytest.approx(
        tables["nnsight"]["target_logp"].to_numpy(), abs=1e-3
    )


def test_a_session_builds_the_template_once_and_keys_follow_the_seed(
    micro_tiny: Path, tmp_path: Path
) -> None:
    from mlake.stages.knowledge import knowledge_stage

    data = DataSettings(langs=LANGS, facts=3)
    run = RunSettings(results_dir=str(tmp_path))
    config = KnowledgeConfig(mcqa=False, forms=("question",), max_new_tokens=4)
    paths = {}
    for seed in (0, 1):
        model = ModelSettings(name=str(micro_tiny), template=f"fewshot-2-seed{seed}", device="cpu")
        session = open_session(model, data, run)
        t = session.ctx.template
        assert isinstance(t, FewShotTemplate) and not t.needs_build
        assert session.loaded.template is t
        assert (t.k, t.seed, [lang for lang, _ in t.demonstrations]) == (2, seed, list(LANGS))
        demo = t.demonstration_facts()
        assert not demo & set(session.ctx.fact_ids) and not demo & set(session.pool)
        assert len(session.ctx.fact_ids) == 3
        _, knowledge_run = knowledge_stage(session.ctx, config)
        meta = json.loads((knowledge_run.path / "meta.json").read_text())
        assert meta["template"] == t.to_dict()
        paths[seed] = knowledge_run.path
    assert paths[0] != paths[1]
    # The same settings give the same demonstrations, hence the same run.
    again = open_session(
        ModelSettings(name=str(micro_tiny), template="fewshot-2-seed0", device="cpu"), data, run
    )
    assert knowledge_stage(again.ctx, config)[1].path == paths[0]


def test_models_without_a_template_default_to_few_shot(micro_tiny: Path, tmp_path: Path) -> None:
    from mlake_core.models.tiny import build_tiny_model

    folder = build_tiny_model("gpt2", tmp_path / "gpt2")
    assert load_model(ModelSettings(name=str(folder), device="cpu")).template is FEWSHOT
    assert load_model(ModelSettings(name=str(micro_tiny), device="cpu")).template is QA


def _unloaded(template) -> LoadedModel:  # type: ignore[no-untyped-def]
    return LoadedModel(adapter=None, name="m", path="m", template=template, tiny_metadata=None)  # type: ignore[arg-type]


def test_the_whole_selection_gives_up_its_demonstration_facts(mlake_v2411) -> None:
    lines: list[str] = []
    loaded = _unloaded(FEWSHOT)
    data = DataSettings(langs=LANGS, facts="all")
    selection = select_facts(mlake_v2411, "all")
    kept = prepare_template(loaded, mlake_v2411, selection, data, lines.append)
    demo = loaded.template.demonstration_facts()
    assert len(demo) >= 3 and not demo & set(kept.fact_ids) and not demo & set(kept.pool)
    assert len(kept.fact_ids) == len(selection.fact_ids) - len(demo)
    assert any("demonstrations, taken out" in line for line in lines)
    assert any("3 demonstrations per language, seed 0" in line for line in lines)

    # Asked for a number of facts that leaves no room: an error naming the way out.
    n = len(mlake_v2411.facts)
    with pytest.raises(ConfigError, match=r"--facts"):
        prepare_template(
            _unloaded(FEWSHOT),
            mlake_v2411,
            select_facts(mlake_v2411, n),
            DataSettings(langs=LANGS, facts=n),
        )


def test_stage_context_refuses_demonstrations_among_the_evaluated_facts(mlake_v2411) -> None:
    built = FEWSHOT.for_run(mlake_v2411, (), LANGS)
    demo = sorted(built.demonstration_facts())
    selection = select_facts(mlake_v2411, 3)
    selection = type(selection)(pool=selection.pool, fact_ids=tuple(demo[:1]))
    with pytest.raises(ConfigError, match="both demonstrations and evaluated"):
        stage_context(
            _unloaded(built), mlake_v2411, selection, DataSettings(langs=LANGS), RunSettings()
        )
    # An unbuilt template is built for the selection it is given.
    ctx = stage_context(
        _unloaded(get_template("fewshot-2")),
        mlake_v2411,
        selection,
        DataSettings(langs=LANGS),
        RunSettings(),
    )
    assert not ctx.template.needs_build and demo[0] not in ctx.template.demonstration_facts()


def test_eval_knowledge_with_template_fewshot(micro_tiny: Path, tmp_path: Path, capsys) -> None:
    args = ("eval", "knowledge", "--model", str(micro_tiny), "--template", "fewshot")
    args += ("--facts", "2", "--langs", "en", "--forms", "question", "--max-new-tokens", "4")
    code = main([*args, "--results-dir", str(tmp_path), "--device", "cpu", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    report = json.loads(out)
    assert report["n_facts"] == 2 and report["template"]["name"] == "fewshot"
    assert report["template"]["k"] == 3 and report["template"]["seed"] == 0
    demo = [d["fact_id"] for d in report["template"]["demonstrations"]["en"]]
    trained = json.loads((micro_tiny / "mlake_tiny.json").read_text())["fact_ids"]
    assert len(demo) == 3 and not set(demo) & set(trained[:2])
    assert "3 demonstrations per language" in err
