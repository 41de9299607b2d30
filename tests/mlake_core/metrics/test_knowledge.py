"""Knowledge measurement on the micro mlake-tiny: reference values computed by hand from the
plain Hugging Face model, batched versus one by one, both backends, MCQA, and agreement with
what training measured."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from mlake_core.data.records import McqaRecord
from mlake_core.metrics.knowledge import (
    KnowledgeConfig,
    greedy_generate,
    measure_knowledge,
    score_sequences,
)
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template

pytestmark = pytest.mark.slow

QA = get_template("qa")


@pytest.fixture(scope="module")
def adapters(micro_tiny: Path):
    return {b: load_adapter(str(micro_tiny), b, device="cpu") for b in ("tlens", "nnsight")}


@pytest.fixture(scope="module")
def hf(micro_tiny: Path):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(micro_tiny).eval()


@pytest.fixture(scope="module")
def trained_views(micro_tiny: Path, mlake_v2411):
    meta = read_metadata(micro_tiny)
    assert meta is not None
    return [
        mlake_v2411.fact(i).views[lang]
        for i in meta["fact_ids"]
        for lang in meta["config"]["langs"]
    ]


def _reference_logp(hf, prompt: list[int], target: list[int]) -> float:
    """Summed log-probability of ``target`` after ``prompt``, one sequence, no padding."""
    ids = torch.tensor([prompt + target])
    with torch.no_grad():
        logp = hf(ids).logits[0].log_softmax(-1)
    return float(sum(logp[len(prompt) - 1 + k, t] for k, t in enumerate(target)))


def test_score_sequences_matches_hand_computed_reference(adapters, hf) -> None:
    adapter = adapters["tlens"]
    tok = adapter.tokenizer
    pairs = [
        (
            adapter.encode("Q: 法国的首都是哪里？\nA:"),
            tok(" 巴黎", add_special_tokens=False)["input_ids"],
        ),
        (
            adapter.encode("The capital of France is"),
            tok(" Paris", add_special_tokens=False)["input_ids"],
        ),
        (adapter.encode("Hi"), tok(" there friend", add_special_tokens=False)["input_ids"]),
    ]
    expected = [_reference_logp(hf, p, t) for p, t in pairs]
    for batch_size in (1, 2, 3):
        scores = score_sequences(adapter, pairs, batch_size=batch_size)
        for score, ref, (_, target) in zip(scores, expected, pairs, strict=True):
            assert score.logp == pytest.approx(ref, abs=1e-4)
            assert score.n_tokens == len(target)
            assert score.mean == pytest.approx(ref / len(target), abs=1e-4)


def test_greedy_generation_batched_equals_one_by_one(adapters, hf) -> None:
    adapter = adapters["tlens"]
    prompts = [
        adapter.encode(t) for t in ("Q: Hello\nA:", "フランスの首都は", "Die Hauptstadt von")
    ]
    batched = greedy_generate(adapter, prompts, max_new_tokens=6, stop=(), batch_size=3)
    for prompt, got in zip(prompts, batched, strict=True):
        ids = list(prompt)
        for _ in range(6):  # plain HF greedy loop
            with torch.no_grad():
                nxt = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            if nxt == adapter.tokenizer.eos_token_id:
                break
            ids.append(nxt)
        assert got == ids[len(prompt) :]


def test_known_facts_are_those_training_answered_exactly(
    adapters, trained_views, micro_tiny
) -> None:
    """Greedy alias match in the question form equals the teacher-forced exact answer that
    training measured: the prompt, the separator and the answer tokens are joined the same
    way in both."""
    result = measure_knowledge(adapters["tlens"], trained_views, QA, KnowledgeConfig())
    meta = read_metadata(micro_tiny)
    assert meta is not None
    summary = result.summary()
    for lang, acc in meta["train_accuracy_teacher_forced"].items():
        assert summary.loc[lang, "greedy"] == pytest.approx(acc, abs=1e-9), lang
        assert summary.loc[lang, "facts"] == 6
    assert sum(len(result.known(lang)) for lang in result.langs) >= 24
    q = result.table[result.table["form"] == "question"]
    # A known fact's greedy text is its answer, and its answer outscores the edit.
    known = q[q["greedy_match"] == "original"]
    assert (known["greedy_text"].str.strip() == known["target"]).all()
    assert known["prefers_original"].mean() > 0.9
    # Without scoring (edit evaluation's locality check): the same greedy answers, no
    # probabilities.
    greedy_only = measure_knowledge(
        adapters["tlens"], trained_views, QA, KnowledgeConfig(), scored=False
    ).table
    assert greedy_only["greedy_text"].tolist() == result.table["greedy_text"].tolist()
    assert greedy_only["greedy_match"].tolist() == result.table["greedy_match"].tolist()
    assert greedy_only["target_logp"].isna().all()
    assert greedy_only["edit_alias_logp"].isna().all()


def test_alias_probability_is_the_sum_over_aliases(adapters, hf, trained_views) -> None:
    adapter = adapters["tlens"]
    view = next(v for v in trained_views if v.lang == "en" and len(v.question.target.forms) > 2)
    result = measure_knowledge(adapter, [view], QA, KnowledgeConfig(forms=("question",)))
    row = result.table.iloc[0]
    prompt_text, prefix = QA.question_prompt(view.question.text)
    prompt = adapter.encode(prompt_text)
    seqs = {
        tuple(adapter.tokenizer(prefix + f, add_special_tokens=False)["input_ids"])
        for f in view.question.target.forms
    }
    probs = [math.exp(_reference_logp(hf, prompt, list(s))) for s in seqs]
    assert row["n_target_forms"] == len(seqs)
    assert row["target_alias_logp"] == pytest.approx(math.log(sum(probs)), abs=1e-4)
    assert row["target_alias_logp"] >= row["target_logp"]


def test_batched_equals_one_by_one_and_backends_agree(adapters, trained_views) -> None:
    views = trained_views[:10]
    one = measure_knowledge(adapters["tlens"], views, QA, batch_size=1).table
    many = measure_knowledge(adapters["tlens"], views, QA, batch_size=7).table
    nn = measure_knowledge(adapters["nnsight"], views, QA, batch_size=4).table
    for other in (many, nn):
        _assert_same_measures(other, one)


def _assert_same_measures(a, b) -> None:
    """Two knowledge tables give the same answers and (within 1e-4) the same scores."""
    assert list(a["greedy_text"]) == list(b["greedy_text"])
    assert list(a["greedy_match"]) == list(b["greedy_match"])
    for col in ("target_logp", "edit_logp", "target_alias_logp", "edit_alias_logp"):
        torch.testing.assert_close(
            torch.tensor(a[col].to_numpy()), torch.tensor(b[col].to_numpy()), rtol=0, atol=1e-4
        )


def test_cloze_form_only_where_well_posed(adapters, trained_views) -> None:
    result = measure_knowledge(adapters["tlens"], trained_views, QA)
    t = result.table
    cloze = t[t["form"] == "cloze"]
    usable = [v for v in trained_views if v.cloze.usable]
    assert len(cloze) == len(usable)
    n_skipped = sum(n for k, n in result.skipped.items() if k.startswith("cloze:"))
    assert n_skipped == len(trained_views) - len(usable)
    # zh/ja cloze prompts join the answer without a space; en with one.
    zh = cloze[cloze["lang"] == "zh"]
    assert all(not p.endswith(" ") for p in zh["prompt"])


def test_mcqa_prediction_is_the_best_scored_option(adapters, hf, trained_views) -> None:
    adapter = adapters["tlens"]
    view = next(v for v in trained_views if v.lang == "en")
    options = (view.question.edit_target.text, view.question.target.text, "Mars", "a")
    mcqa = McqaRecord(view.question.text, options, answer_index=1, edit_index=0)
    v = dataclasses.replace(view, mcqa=mcqa)
    row = measure_knowledge(adapter, [v], QA, KnowledgeConfig(forms=("question",))).table.iloc[0]
    prompt = adapter.encode(QA.question_prompt(view.question.text)[0])
    ids = [adapter.tokenizer(" " + o, add_special_tokens=False)["input_ids"] for o in options]
    logps = [_reference_logp(hf, prompt, i) for i in ids]
    best = max(range(4), key=lambda k: logps[k])
    best_norm = max(range(4), key=lambda k: logps[k] / len(ids[k]))
    assert row["mcqa_correct"] == (best == 1)
    assert row["mcqa_correct_norm"] == (best_norm == 1)
    # Without options the columns stay empty.
    plain = measure_knowledge(adapter, [view], QA, KnowledgeConfig(forms=("question",))).table
    assert plain.iloc[0]["mcqa_correct"] is None


def test_cached_measurement_equals_full_runs_with_an_in_context_prefix(
    adapters, trained_views
) -> None:
    # An IKE-style context shared by every prompt: scored and generated with the prompts' keys
    # and values continued (the shared prefix once per batch) and without, on both backends.
    views = trained_views[:12]
    demo = views[-1].question
    context = f"New fact: {demo.text} {demo.edit_target.text}\nQ: {demo.text}\nA: {demo.edit_target.text}\n\n"
    for adapter in adapters.values():
        cached = {}
        for name, template in (("plain", QA), ("context", QA.with_context(context))):
            full = measure_knowledge(adapter, views, template, batch_size=5, kv_cache=False)
            cached[name] = measure_knowledge(adapter, views, template, batch_size=5).table
            _assert_same_measures(cached[name], full.table)
        # The context changes what the model says: the comparison above is not vacuous.
        assert not cached["plain"]["target_logp"].equals(cached["context"]["target_logp"])


def test_scoring_and_generation_share_each_batch_prompt_pass(
    adapters, trained_views, mlake_v2411, monkeypatch
) -> None:
    """Each batch of distinct prompts runs once for both scoring and generation
    (``PromptPasses``), with the same table as full runs; a few-shot template, so prompts
    share their demonstrations and batch by them."""
    from mlake_core.metrics import knowledge

    adapter = adapters["tlens"]
    ids = sorted({v.fact_id for v in trained_views})
    template = get_template("fewshot-1-seed0").for_run(mlake_v2411, ids, ["en", "fr"])
    views = [v for v in trained_views if v.lang in ("en", "fr")]
    calls: list[int] = []
    original = knowledge._prompt_pass

    def counted(adapter, prompts):
        calls.append(len(prompts))
        return original(adapter, prompts)

    monkeypatch.setattr(knowledge, "_prompt_pass", counted)
    cached = measure_knowledge(adapter, views, template, KnowledgeConfig(), batch_size=4)
    rows = len(cached.table)
    distinct = cached.table["prompt"].nunique()
    # One pass per batch of distinct prompts; with separate passes it would be about twice.
    assert sum(calls) == distinct and len(calls) >= rows / 4
    full = measure_knowledge(adapter, views, template, KnowledgeConfig(), kv_cache=False)
    assert cached.table["greedy_text"].tolist() == full.table["greedy_text"].tolist()
    for column in ("target_logp", "edit_alias_logp", "target_alias_logp"):
        assert cached.table[column].to_numpy() == pytest.approx(
            full.table[column].to_numpy(), abs=1e-4, nan_ok=True
        )


def test_stopping_when_decided_keeps_every_verdict(adapters, trained_views, mlake_v2411) -> None:
    """``stop_when_decided``: the same greedy verdict in every row, the text cut where it was
    decided (a prefix of the whole text), and some rows stop early."""
    adapter = adapters["tlens"]
    ids = sorted({v.fact_id for v in trained_views})
    template = get_template("fewshot-1-seed0").for_run(mlake_v2411, ids, ["en", "zh"])
    views = [v for v in trained_views if v.lang in ("en", "zh")]
    full = measure_knowledge(adapter, views, template, KnowledgeConfig(max_new_tokens=12)).table
    config = KnowledgeConfig(max_new_tokens=12, stop_when_decided=True)
    early = measure_knowledge(adapter, views, template, config).table
    assert early["greedy_match"].tolist() == full["greedy_match"].tolist()
    pairs = list(zip(early["greedy_text"], full["greedy_text"], strict=True))
    assert all(whole.startswith(cut) for cut, whole in pairs)
    assert sum(len(cut) < len(whole) for cut, whole in pairs) >= 1
    # Probabilities do not depend on it.
    assert early["target_logp"].tolist() == pytest.approx(full["target_logp"].tolist(), abs=1e-5)
    # Left out of the run key while off (earlier runs stay valid).
    assert "stop_when_decided" not in KnowledgeConfig().to_dict()
    assert config.to_dict()["stop_when_decided"] is True
