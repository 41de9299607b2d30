"""The model catalog: every row's real config, built on the ``meta`` device (no weights),
resolves every site of its site table with the shape the published model has."""

from __future__ import annotations

from importlib import resources

import pytest

from mlake_core.errors import ConfigError
from mlake_core.models.catalog import CATALOG, find_entry, get_entry, meta_model
from mlake_core.models.planner import resolve_sites, shape_from_config
from mlake_core.models.sites import LAYERED_KINDS, get_spec

SUPPORTED = [e for e in CATALOG if not e.unsupported]

#: The published shapes: layers, d_model, d_mlp, heads, kv heads, head width, vocab, tied.
EXPECTED = {
    "qwen2.5-0.5b": (24, 896, 4864, 14, 2, 64, 151936, True),
    "qwen2.5-1.5b": (28, 1536, 8960, 12, 2, 128, 151936, True),
    "qwen2.5-7b": (28, 3584, 18944, 28, 4, 128, 152064, False),
    "qwen2.5-72b": (80, 8192, 29568, 64, 8, 128, 152064, False),
    "llama-3.1-8b": (32, 4096, 14336, 32, 8, 128, 128256, False),
    "llama-3.1-70b": (80, 8192, 28672, 64, 8, 128, 128256, False),
    "llama-3.2-1b": (16, 2048, 8192, 32, 8, 64, 128256, True),
    "bloom-560m": (24, 1024, 4096, 16, 16, 64, 250880, True),
    "bloom-7b1": (30, 4096, 16384, 32, 32, 128, 250880, True),
    "mgpt": (24, 2048, 8192, 16, 16, 128, 100000, True),
    "gemma-3-270m": (18, 640, 2048, 4, 1, 256, 262144, True),
    "gemma-3-1b": (26, 1152, 6912, 4, 1, 256, 262144, True),
    "gemma-3-4b": (34, 2560, 10240, 8, 4, 256, 262208, True),
    "gemma-3-12b": (48, 3840, 15360, 16, 8, 256, 262208, True),
    "gemma-3-27b": (62, 5376, 21504, 32, 16, 128, 262208, True),
    "gemma-2-2b": (26, 2304, 9216, 8, 4, 256, 256000, True),
    "gemma-2-9b": (42, 3584, 14336, 16, 8, 256, 256000, True),
    "aya-23-8b": (32, 4096, 14336, 32, 8, 128, 256000, True),
}

#: Rope scaling per row (the full-attention layers' on Gemma 3): (type, factor).
ROPE = {
    "llama-3.1-8b": ("llama3", 8.0),
    "llama-3.1-70b": ("llama3", 8.0),
    "llama-3.2-1b": ("llama3", 32.0),
    "gemma-3-4b": ("linear", 8.0),
    "gemma-3-12b": ("linear", 8.0),
    "gemma-3-27b": ("linear", 8.0),
}

#: Sliding window of the Gemma 3 rows (every sixth layer attends fully).
WINDOW = {"gemma-3-270m": 512, "gemma-3-1b": 512, "gemma-3-4b": 1024}


def test_every_json_file_is_a_row_and_every_row_has_its_file() -> None:
    files = {
        p.name.removesuffix(".json")
        for p in resources.files("mlake_core.models.catalog").iterdir()
        if p.name.endswith(".json")
    }
    assert files == {e.name for e in CATALOG}
    assert set(EXPECTED) == {e.name for e in SUPPORTED}


def test_rows_are_found_by_name_and_hub_id() -> None:
    assert get_entry("Qwen/Qwen2.5-7B").name == "qwen2.5-7b"
    assert find_entry("QWEN2.5-7B") is get_entry("qwen2.5-7b")
    with pytest.raises(ConfigError, match=r"catalog names: qwen2\.5-0\.5b"):
        get_entry("no-such-model")


@pytest.mark.parametrize("entry", CATALOG, ids=lambda e: e.name)
def test_parameter_count_is_the_published_one(entry) -> None:
    model = meta_model(entry.hf_config())
    n = sum(p.numel() for p in model.parameters())
    assert n == pytest.approx(entry.published_params, rel=0.015)
    assert all(p.device.type == "meta" for p in model.parameters())


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.name)
def test_every_site_resolves_with_the_real_shape(entry) -> None:
    layers, d_model, d_mlp, heads, kv, d_head, vocab, tied = EXPECTED[entry.name]
    config = entry.hf_config()
    shape = shape_from_config(config, entry.name)
    assert (shape.n_layers, shape.d_model, shape.d_mlp) == (layers, d_model, d_mlp)
    assert (shape.n_heads, shape.n_kv_heads, shape.d_head) == (heads, kv, d_head)
    assert (shape.d_vocab, shape.tied_embeddings) == (vocab, tied)
    model = meta_model(config)
    spec = get_spec(config.model_type)
    widths = resolve_sites(model, spec, layers)
    assert len(widths) == 1 + layers * len(LAYERED_KINDS)
    want = {
        "embed": d_model,
        "resid_pre": d_model,
        "attn_z": heads * d_head,
        "attn_out": d_model,
        "mlp_post": d_mlp,
        "mlp_out": d_model,
        "resid_post": d_model,
    }
    for name, width in widths.items():
        assert width == want[name.split(".")[0]], name
    assert model.get_output_embeddings().weight.shape == (vocab, d_model)
    if kv < heads:  # grouped-query attention
        attn = model.get_submodule(f"{spec.layers}.{layers - 1}.self_attn")
        assert attn.k_proj.out_features == attn.v_proj.out_features == kv * d_head


@pytest.mark.parametrize("entry", SUPPORTED, ids=lambda e: e.name)
def test_rope_scaling_and_layer_types(entry) -> None:
    shape = shape_from_config(entry.hf_config(), entry.name)
    rope = shape.rope or {}
    if shape.architecture == "gemma3_text":
        rope = rope["full_attention"]
        assert shape.sliding_layers == tuple(i for i in range(shape.n_layers) if (i + 1) % 6 != 0)
        assert shape.sliding_window == WINDOW.get(entry.name, 1024)
    elif shape.architecture == "gemma2":
        # Gemma 2 alternates sliding and full layers, with a 4096-token window.
        assert shape.sliding_layers == tuple(range(0, shape.n_layers, 2))
        assert shape.sliding_window == 4096
    else:
        assert shape.sliding_layers == () and shape.sliding_window is None
    if entry.name in ROPE:
        assert (rope["rope_type"], rope["factor"]) == ROPE[entry.name]
    elif shape.positional == "rotary":
        assert rope["rope_type"] == "default"
    else:
        assert shape.positional in ("learned", "alibi")


def test_every_row_is_supported_and_an_unsupported_architecture_is_refused() -> None:
    assert [e.name for e in CATALOG if e.checks == "not supported"] == []
    from transformers import AutoConfig

    with pytest.raises(ConfigError, match="unsupported architecture 'opt'"):
        shape_from_config(AutoConfig.for_model("opt"), "opt")


def test_gemma2_and_aya_rows_carry_their_architecture_facts() -> None:
    """Gemma 2's soft-caps and scaled embeddings, Aya 23's parallel blocks and logit scale."""
    gemma2 = get_entry("gemma-2-2b").hf_config()
    spec = get_spec(gemma2.model_type)
    assert spec.logit_softcap(gemma2) == 30.0 and gemma2.attn_logit_softcapping == 50.0
    assert spec.embed_scale(gemma2) == pytest.approx(2304**0.5) and spec.post_norms
    aya = get_entry("aya-23-8b").hf_config()
    spec = get_spec(aya.model_type)
    assert spec.is_parallel(aya) and spec.logit_scale(aya) == 0.0625
    assert spec.ln1 == spec.ln2 == "input_layernorm"
    model = meta_model(aya)
    assert not hasattr(model.model.layers[0], "post_attention_layernorm")
    assert model.get_submodule(f"{spec.layers}.0.{spec.ln1}").weight.shape == (4096,)


def test_multimodal_gemma_rows_say_so() -> None:
    for name in ("gemma-3-4b", "gemma-3-12b", "gemma-3-27b"):
        assert "multimodal" in get_entry(name).note
    assert get_entry("qwen2.5-1.5b").checks == "meta + real-width"
    assert get_entry("qwen2.5-7b").checks == "meta"
