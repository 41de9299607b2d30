"""Loading: provenance recorded on the adapter, BOS handling, dtypes and every expected error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import AutoModelForCausalLM, OPTConfig

from mlake_core.errors import ConfigError
from mlake_core.models import BACKENDS, ModelAdapter, load_adapter
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

pytestmark = pytest.mark.slow  # builds and runs the tiny models

EXPECTED_D_MLP = {
    "gpt2": 64,
    "llama": 64,
    "qwen2": 64,
    "bloom": 128,
    "gpt_neox": 64,
    "gemma3_text": 64,
    "gemma2": 64,
    "cohere": 64,
}
POSITIONAL = {
    "gpt2": "learned",
    "llama": "rotary",
    "qwen2": "rotary",
    "bloom": "alibi",
    "gpt_neox": "rotary",
    "gemma3_text": "rotary",
    "gemma2": "rotary",
    "cohere": "rotary",
}
#: Tokenizers that prepend BOS themselves (the tiny ones follow the real ones).
ADDS_BOS = ("llama", "gemma3_text", "gemma2", "cohere")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_info_records_provenance_shapes_and_bos_policy(
    arch, backend, get_adapter, tiny_models
) -> None:
    adapter = get_adapter(arch, backend)
    assert isinstance(adapter, ModelAdapter)
    info = adapter.info.to_dict()
    json.dumps(info)  # serialisable for meta.json
    assert info["model_id"] == str(tiny_models[arch])
    assert info["architecture"] == arch
    assert info["backend"] == backend
    assert (info["dtype"], info["device"]) == ("float32", "cpu")
    assert (info["n_layers"], info["d_model"], info["d_vocab"]) == (2, 32, 512)
    assert info["d_mlp"] == EXPECTED_D_MLP[arch]
    assert info["positional"] == POSITIONAL[arch]
    assert info["parallel_attn_mlp"] == (arch in ("gpt_neox", "cohere"))
    assert info["revision"] is None and info["commit_hash"] is None
    assert info["bos"]["prepend_bos"] == (arch in ADDS_BOS)
    assert ("transformer-lens" if backend == "tlens" else "nnsight") in info["versions"]
    assert adapter.dtype == torch.float32 and adapter.device == torch.device("cpu")
    assert len(adapter.sites) == 1 + 6 * 2


@pytest.mark.parametrize("arch", ARCHS)
def test_encode_prepends_bos_exactly_when_the_tokenizer_does(arch, get_adapter) -> None:
    adapter = get_adapter(arch, "nnsight")
    ids = adapter.encode("法国的首都是巴黎")
    plain = adapter.tokenizer("法国的首都是巴黎", add_special_tokens=False)["input_ids"]
    if arch in ADDS_BOS:
        assert ids == [adapter.tokenizer.bos_token_id, *plain]
    else:
        assert ids == plain
    # The batch helpers use the same encoding.
    assert adapter.tokenize(["法国的首都是巴黎"]).sequences() == [ids]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_info_records_the_architecture_facts(arch, backend, get_adapter, get_hf) -> None:
    """Tied embeddings, embedding scale, post-norms, sliding layers and logit soft-cap, read
    off the loaded checkpoint (Gemma 3 has all but the soft-cap)."""
    from mlake_core.models.tiny import COHERE_LOGIT_SCALE, GEMMA2_SOFTCAPS, GEMMA3_SLIDING_WINDOW

    info = get_adapter(arch, backend).info
    hf = get_hf(arch)
    tied = hf.get_output_embeddings().weight is hf.get_input_embeddings().weight
    assert info.tied_embeddings == tied
    if arch in ("gemma3_text", "gemma2", "qwen2", "cohere"):
        assert info.tied_embeddings
    if arch in ("llama", "gpt_neox"):
        assert not info.tied_embeddings
    gemma = arch in ("gemma3_text", "gemma2")
    assert info.embed_scale == pytest.approx(32**0.5 if gemma else 1.0)
    assert info.post_norms == gemma
    assert info.sliding_window == (GEMMA3_SLIDING_WINDOW if gemma else None)
    assert info.sliding_layers == ((0,) if gemma else ())
    assert info.logit_softcap == (GEMMA2_SOFTCAPS[1] if arch == "gemma2" else None)
    assert info.logit_scale == (COHERE_LOGIT_SCALE if arch == "cohere" else 1.0)
    assert info.parallel_attn_mlp == (arch in ("gpt_neox", "cohere"))
    assert json.loads(json.dumps(info.to_dict()))["sliding_layers"] == list(info.sliding_layers)


def test_gemma3_bidirectional_config_is_refused(tmp_path, tiny_models) -> None:
    folder = tmp_path / "gemma3_bidirectional"
    shutil.copytree(tiny_models["gemma3_text"], folder)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config["use_bidirectional_attention"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="use_bidirectional_attention"):
        load_adapter(str(folder), "nnsight")


def test_tlens_boots_a_config_without_architectures(tmp_path, tiny_models, get_adapter, texts):
    """Configs rebuilt from a GGUF file (the Gemma 3 270M Q4_K_M) name no architectures; the
    bridge then gets the loaded class's name."""
    folder = tmp_path / "gemma3_no_architectures"
    shutil.copytree(tiny_models["gemma3_text"], folder)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    del config["architectures"]
    config_path.write_text(json.dumps(config))
    adapter = load_adapter(str(folder), "tlens", device="cpu")
    batch = adapter.tokenize(list(texts))
    reference = get_adapter("gemma3_text", "nnsight").forward(batch)
    torch.testing.assert_close(adapter.forward(batch), reference, atol=1e-5, rtol=0)


def test_tlens_does_not_change_the_adapters_tokenizer(get_adapter) -> None:
    """TL's setup_tokenizer gives BOS-less tokenizers a fake BOS; the adapter keeps its own."""
    adapter = get_adapter("qwen2", "tlens")
    assert adapter.tokenizer.bos_token is None
    assert adapter.bridge.tokenizer.bos_token is not None
    assert adapter.info.bos.bos_token_id is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_bfloat16_loads_and_runs_close_to_float32(backend, tiny_models, get_adapter, texts) -> None:
    adapter = load_adapter(str(tiny_models["llama"]), backend, device="cpu", dtype="bfloat16")
    assert adapter.info.dtype == "bfloat16" and adapter.dtype == torch.bfloat16
    batch = adapter.tokenize(list(texts))
    logits, cache = adapter.run_with_cache(batch, ["mlp_post.1"])
    assert cache["mlp_post.1"].dtype == torch.bfloat16
    reference = get_adapter("llama", backend).forward(batch)
    real = batch.attention_mask.bool()
    torch.testing.assert_close(logits.float()[real], reference[real], atol=0.3, rtol=0.05)


def test_unsupported_architecture_is_a_config_error(tmp_path) -> None:
    OPTConfig(
        hidden_size=16,
        num_hidden_layers=1,
        ffn_dim=32,
        num_attention_heads=2,
        vocab_size=50,
        word_embed_proj_dim=16,
    ).save_pretrained(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_adapter(str(tmp_path), "nnsight")
    message = str(err.value)
    assert "'opt'" in message and str(tmp_path) in message
    for arch in ARCHS:
        assert arch in message


def test_unknown_hub_id_offline_says_how_to_provide_weights(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ConfigError) as err:
        load_adapter("mlake-test/no-such-model", "tlens")
    message = str(err.value)
    assert "'mlake-test/no-such-model'" in message
    assert "--model /path/to/folder" in message
    assert "HF_HOME" in message and "HF_HUB_OFFLINE=1" in message
    assert "models--mlake-test--no-such-model" in message


def test_hub_id_in_the_local_cache_loads_offline_with_its_commit(
    monkeypatch, tmp_path, tiny_models
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--mlake-test--tiny-gpt2"
    shutil.copytree(tiny_models["gpt2"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    adapter = load_adapter("mlake-test/tiny-gpt2", "nnsight", local_files_only=True)
    assert adapter.info.model_id == "mlake-test/tiny-gpt2"
    assert adapter.info.commit_hash == commit
    assert adapter.info.architecture == "gpt2"


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"backend": "pyvene"}, "--backend 'pyvene'"),
        ({"dtype": "int8"}, "--dtype 'int8'"),
        ({"device": "tpu:x"}, "--device 'tpu:x'"),
        ({"revision": "main"}, "--revision 'main' applies to hub ids only"),
    ],
)
def test_bad_options_are_config_errors(kwargs, match, tiny_models) -> None:
    with pytest.raises(ConfigError, match=match):
        load_adapter(str(tiny_models["gpt2"]), **kwargs)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_cuda_is_a_config_error(tiny_models) -> None:
    with pytest.raises(ConfigError, match="CUDA is not available"):
        load_adapter(str(tiny_models["gpt2"]), device="cuda")


def test_missing_folder_and_folder_without_config(tmp_path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_adapter(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match=r"no config\.json"):
        load_adapter(str(tmp_path))


def test_pickle_only_checkpoint_is_refused(tmp_path, tiny_models) -> None:
    folder = tmp_path / "bin_only"
    shutil.copytree(tiny_models["gpt2"], folder)
    (folder / "model.safetensors").unlink()
    model = AutoModelForCausalLM.from_pretrained(tiny_models["gpt2"])
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    with pytest.raises(ConfigError, match="safetensors"):
        load_adapter(str(folder), "nnsight")


def test_bloom_config_that_changes_site_meaning_is_refused(tmp_path, tiny_models) -> None:
    folder = tmp_path / "bloom_post_ln"
    shutil.copytree(tiny_models["bloom"], folder)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config["apply_residual_connection_post_layernorm"] = True
    config_path.write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="apply_residual_connection_post_layernorm"):
        load_adapter(str(folder), "tlens")


def test_bloom_slow_but_exact_is_switched_off_so_hooks_fire(tmp_path, tiny_models, texts) -> None:
    folder = tmp_path / "bloom_tp"
    shutil.copytree(tiny_models["bloom"], folder)
    config_path = Path(folder) / "config.json"
    config = json.loads(config_path.read_text())
    config.update({"pretraining_tp": 2, "slow_but_exact": True})
    config_path.write_text(json.dumps(config))
    adapter = load_adapter(str(folder), "nnsight")
    batch = adapter.tokenize(list(texts))
    _, cache = adapter.run_with_cache(batch, ["attn_out.0", "mlp_post.0"])
    assert set(cache) == {"attn_out.0", "mlp_post.0"}
