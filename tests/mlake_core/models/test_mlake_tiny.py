"""mlake-tiny training: metadata, determinism, resume after a crash, loading by both backends,
and the default-model resolution of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import (
    METADATA_FILE,
    TinyTrainConfig,
    build_corpus,
    is_trained,
    measure_learned,
    read_metadata,
    select_facts,
    train_tiny,
)
from tests.conftest import MICRO_TINY

pytestmark = pytest.mark.slow

#: An even smaller run for the determinism and resume tests (a few seconds each).
QUICK = {**MICRO_TINY, "facts": 3, "langs": ("en", "zh"), "max_epochs": 4, "eval_every": 2}


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


def test_micro_model_folder_and_metadata(micro_tiny: Path, mlake_v2411) -> None:
    assert is_trained(micro_tiny)
    meta = read_metadata(micro_tiny)
    assert meta is not None
    config = TinyTrainConfig(**MICRO_TINY)
    assert meta["config"] == config.to_dict()
    assert meta["key"] == config.key()
    assert meta["data_version"] == "v2024-11"
    assert meta["seed"] == 0
    assert meta["template"]["name"] == "qa"
    assert meta["fact_ids"] == select_facts(mlake_v2411, config)
    assert len(meta["fact_ids"]) == 6
    n_params = sum(t.numel() for t in _weights(micro_tiny).values())
    assert meta["n_parameters"] == n_params
    assert meta["n_units"] == 6 * 5
    assert set(meta["train_accuracy_teacher_forced"]) == {"en", "zh", "ja", "fr", "de"}
    assert meta["history"] and meta["history"][-1]["epoch"] == meta["epochs"]
    assert "torch" in meta["versions"]
    # No training leftovers.
    assert not (micro_tiny / "checkpoint.pt").exists()
    assert not micro_tiny.with_name(micro_tiny.name + ".partial").exists()


def test_micro_model_memorises_its_facts(micro_tiny: Path, mlake_v2411) -> None:
    meta = read_metadata(micro_tiny)
    assert meta is not None
    # The micro run is sized to learn its 30 question-answer pairs.
    for lang, acc in meta["train_accuracy_teacher_forced"].items():
        assert acc >= 0.8, (lang, acc)


def test_fact_selection_is_fixed_and_eligible(mlake_v2411) -> None:
    a = select_facts(mlake_v2411, TinyTrainConfig(facts=300))
    b = select_facts(mlake_v2411, TinyTrainConfig(facts=300, seed=7))
    assert a == b  # the training seed does not change the facts
    assert len(a) == 300 and a == sorted(a) and len(set(a)) == 300
    for fact_id in a:
        assert all(v.question.usable for v in mlake_v2411.fact(fact_id).views.values())
    assert select_facts(mlake_v2411, TinyTrainConfig(facts="all")) == list(range(1072))


def test_corpus_joins_prompt_and_answer_by_ids(micro_tiny: Path, mlake_v2411) -> None:
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast.from_pretrained(micro_tiny)
    config = TinyTrainConfig(**MICRO_TINY)
    corpus = build_corpus(mlake_v2411, [3], tok, config)
    assert [lang for _, lang in corpus.units] == ["en", "zh", "ja", "fr", "de"]
    zh = corpus.qa[1]
    prompt, answer = corpus.pieces[1]
    assert zh.ids == prompt + answer
    assert prompt[0] == tok.bos_token_id and answer[-1] == tok.eos_token_id
    assert tok.decode(prompt[1:]) == "Q: 格温多兰·克里斯蒂是哪个国家的公民？\nA:"
    assert tok.decode(answer[:-1]) == " 英国"
    # Loss only on the answer and EOS.
    assert zh.weights == [0.0] * len(prompt) + [1.0] * len(answer)
    statement = corpus.statements[1]
    assert tok.decode(statement.ids[1:-1]) == "格温多兰·克里斯蒂是英国的公民。"
    assert statement.weights[0] == 0.0 and set(statement.weights[1:]) == {config.statement_weight}


def test_training_is_deterministic_for_a_seed(mlake_v2411, tmp_path: Path) -> None:
    a = train_tiny(TinyTrainConfig(**QUICK), mlake_v2411, tmp_path / "a", show_bar=False)
    b = train_tiny(TinyTrainConfig(**QUICK), mlake_v2411, tmp_path / "b", show_bar=False)
    c = train_tiny(TinyTrainConfig(**QUICK, seed=1), mlake_v2411, tmp_path / "c", show_bar=False)
    wa, wb, wc = _weights(a), _weights(b), _weights(c)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)
    assert (a / "tokenizer.json").read_text() == (b / "tokenizer.json").read_text()


class _Crash(Exception):
    pass


def test_interrupted_training_resumes_to_the_same_model(mlake_v2411, tmp_path: Path) -> None:
    config = TinyTrainConfig(**QUICK)
    reference = train_tiny(config, mlake_v2411, tmp_path / "ref", show_bar=False)

    def crash_after_two(line: str) -> None:
        if line.startswith("epoch 2:"):
            raise _Crash

    out = tmp_path / "resumed"
    with pytest.raises(_Crash):
        train_tiny(config, mlake_v2411, out, show_bar=False, progress=crash_after_two)
    partial = out.with_name(out.name + ".partial")
    assert not out.exists() and (partial / "checkpoint.pt").is_file()
    lines: list[str] = []
    train_tiny(config, mlake_v2411, out, show_bar=False, progress=lines.append)
    assert lines[0].startswith("resuming from epoch 2")
    assert not partial.exists()
    w_ref, w_out = _weights(reference), _weights(out)
    assert all(torch.equal(w_ref[k], w_out[k]) for k in w_ref)
    history = json.loads((out / METADATA_FILE).read_text())["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3, 4]


@pytest.mark.parametrize("backend", ["tlens", "nnsight"])
def test_both_backends_load_it_and_agree_with_training_status(
    micro_tiny: Path, mlake_v2411, backend: str
) -> None:
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast

    adapter = load_adapter(str(micro_tiny), backend, device="cpu")
    assert adapter.info.architecture == "llama"
    assert adapter.info.bos.prepend_bos  # the trained tokenizer adds <s>, Llama-style
    hf = LlamaForCausalLM.from_pretrained(micro_tiny).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(micro_tiny)
    config = TinyTrainConfig(**MICRO_TINY)
    corpus = build_corpus(mlake_v2411, select_facts(mlake_v2411, config), tok, config)
    # The adapter's logits equal the saved HF model's on a training sequence.
    ids = corpus.qa[0].ids
    batch = adapter.batch([ids])
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits
    torch.testing.assert_close(adapter.forward(batch), ref, rtol=1e-4, atol=1e-4)
    status = measure_learned(hf, corpus, int(tok.pad_token_id))
    meta = read_metadata(micro_tiny)
    assert meta is not None
    n = len(status)
    assert sum(status) / n == pytest.approx(
        sum(meta["train_accuracy_teacher_forced"].values()) / 5, abs=1e-3
    )


def test_default_model_resolves_to_the_cached_default(monkeypatch, tmp_path: Path) -> None:
    from mlake.loading import resolve_model_path
    from mlake_core.files import cache_dir

    # The located datasets stay in the real cache (the editable variant's folder names the
    # located subjects, read from the data), the models go to tmp_path.
    (cache_dir() / "data").mkdir(parents=True, exist_ok=True)
    (tmp_path / "data").symlink_to(cache_dir() / "data")
    monkeypatch.setenv("MLAKE_CACHE", str(tmp_path))
    from mlake_core.models.mlake_tiny.cache import tiny_dir

    folder = tiny_dir(TinyTrainConfig())  # names the trained facts, drawn from the data
    assert folder.parent == tmp_path / "models"
    folder.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", METADATA_FILE):
        (folder / name).write_text("{}")
    # Cached: resolved without training (training would fail on these empty files).
    assert resolve_model_path(None) == str(folder)
    assert resolve_model_path("mlake-tiny") == str(folder)
    assert resolve_model_path("/some/other/model") == "/some/other/model"
    # A named variant resolves to its own cached folder.
    from mlake_core.models.mlake_tiny import variant_config

    editable = tiny_dir(variant_config("mlake-tiny-editable"))  # names the located subjects
    assert editable != folder
    editable.mkdir(parents=True)
    for name in ("config.json", "model.safetensors", "tokenizer.json", METADATA_FILE):
        (editable / name).write_text("{}")
    assert resolve_model_path("mlake-tiny-editable") == str(editable)


def test_bilingual_document_states_the_fact_in_two_languages(micro_tiny: Path, mlake_v2411) -> None:
    from transformers import PreTrainedTokenizerFast

    from mlake_core.models.mlake_tiny.examples import _bilingual

    tok = PreTrainedTokenizerFast.from_pretrained(micro_tiny)
    config = TinyTrainConfig(**MICRO_TINY)
    corpus = build_corpus(mlake_v2411, [3], tok, config)
    doc = _bilingual(corpus, 0, 2, tok, config.max_len)  # en then ja
    assert doc.kind == "bilingual" and doc.unit == 0
    assert doc.ids[0] == tok.bos_token_id and doc.ids.count(tok.bos_token_id) == 1
    assert tok.decode(doc.ids[1:-1]) == (
        "Q: From which nation does Gwendoline Christie hold citizenship?\nA: United Kingdom\n"
        "Q: グェンドリン・クリスティーの出身国は何ですか？\nA: イギリス"
    )
    # Loss on both answers (and the final EOS), nowhere else.
    trained = tok.decode([t for t, w in zip(doc.ids, doc.weights, strict=True) if w > 0])
    assert trained == " United Kingdom イギリス</s>"


def test_bilingual_fraction_is_recorded_and_changes_training(mlake_v2411, tmp_path: Path) -> None:
    mixed = TinyTrainConfig(**{**QUICK, "bilingual_fraction": 0.5})
    path = train_tiny(mixed, mlake_v2411, tmp_path / "mixed", show_bar=False)
    meta = read_metadata(path)
    assert meta is not None and meta["config"]["bilingual_fraction"] == 0.5
    assert mixed.key() != TinyTrainConfig(**QUICK).key()
    plain = train_tiny(TinyTrainConfig(**QUICK), mlake_v2411, tmp_path / "plain", show_bar=False)
    wm, wp = _weights(path), _weights(plain)
    assert not all(torch.equal(wm[k], wp[k]) for k in wm)
