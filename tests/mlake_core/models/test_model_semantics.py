"""Integration tier: what each site means, checked per architecture (see ``sites.py``)."""

from __future__ import annotations

import pytest
import torch

from mlake_core.models import BACKENDS, Patch
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

pytestmark = pytest.mark.slow  # builds and runs the tiny models

ATOL = 1e-4
SEQUENTIAL_NEOX = "gpt_neox_sequential"  # built by conftest.tiny_models


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", [*ARCHS, SEQUENTIAL_NEOX])
def test_resid_pre_plus_attn_out_plus_mlp_out_is_resid_post(
    arch, backend, get_adapter, texts
) -> None:
    """Holds for sequential blocks and for GPT-NeoX's parallel ones (x + attn + mlp)."""
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    _, cache = adapter.run_with_cache(batch, adapter.sites)
    real = batch.attention_mask.bool()
    for layer in range(adapter.n_layers):
        total = cache[f"resid_pre.{layer}"] + cache[f"attn_out.{layer}"] + cache[f"mlp_out.{layer}"]
        torch.testing.assert_close(
            total[real], cache[f"resid_post.{layer}"][real], atol=ATOL, rtol=0
        )
        assert cache[f"attn_out.{layer}"][real].abs().max() > 1e-2
        assert cache[f"mlp_out.{layer}"][real].abs().max() > 1e-2
        if layer + 1 < adapter.n_layers:
            assert torch.equal(cache[f"resid_post.{layer}"], cache[f"resid_pre.{layer + 1}"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", [*ARCHS, SEQUENTIAL_NEOX])
def test_mlp_reads_attention_output_only_in_sequential_blocks(
    arch, backend, get_adapter, texts
) -> None:
    """Parallel GPT-NeoX: the MLP reads ln2(resid_pre), so patching attn_out leaves mlp_post."""
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    _, clean = adapter.run_with_cache(batch, ["mlp_post.0"])
    every = [[*range(batch.shape[1])] for _ in range(batch.shape[0])]
    zeros = [torch.zeros(batch.shape[1], adapter.d_model)] * batch.shape[0]
    _, patched = adapter.run_with_cache(
        batch, ["mlp_post.0"], patches=[Patch.per_row("attn_out.0", every, zeros)]
    )
    assert adapter.info.parallel_attn_mlp == (arch == "gpt_neox")
    if adapter.info.parallel_attn_mlp:
        assert torch.equal(patched["mlp_post.0"], clean["mlp_post.0"])
    else:
        assert (patched["mlp_post.0"] - clean["mlp_post.0"]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", [*ARCHS, SEQUENTIAL_NEOX])
def test_mlp_norm_input_matches_block_structure(arch, get_adapter, get_hf, texts) -> None:
    """ln2 is applied to resid_pre (parallel) or resid_pre + attn_out (sequential)."""
    adapter = get_adapter(arch, "nnsight")
    spec = adapter.spec
    batch = adapter.tokenize(list(texts))
    _, cache = adapter.run_with_cache(batch, ["resid_pre.0", "attn_out.0"])
    block = get_hf(arch).get_submodule(spec.sites["resid_pre"].path(0))
    seen: dict[str, torch.Tensor] = {}
    handle = block.get_submodule(spec.ln2).register_forward_pre_hook(
        lambda _m, args: seen.setdefault("ln2_in", args[0])
    )
    try:
        with torch.no_grad():
            from_hf = {
                "input_ids": batch.input_ids,
                "attention_mask": batch.attention_mask,
            }
            if spec.uses_position_ids:
                from_hf["position_ids"] = batch.position_ids
            get_hf(arch)(**from_hf)
    finally:
        handle.remove()
    expected = cache["resid_pre.0"]
    if not adapter.info.parallel_attn_mlp:
        expected = expected + cache["attn_out.0"]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(seen["ln2_in"][real], expected[real], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_mlp_post_is_the_down_projection_input(arch, backend, get_adapter, get_hf, texts) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    sites = [
        f"{kind}.{layer}" for layer in range(adapter.n_layers) for kind in ("mlp_post", "mlp_out")
    ]
    _, cache = adapter.run_with_cache(batch, sites)
    hf = get_hf(arch)
    for layer in range(adapter.n_layers):
        down = hf.get_submodule(adapter.spec.sites["mlp_out"].path(layer))
        with torch.no_grad():
            projected = down(cache[f"mlp_post.{layer}"])
        assert cache[f"mlp_post.{layer}"].shape[-1] == adapter.d_mlp
        torch.testing.assert_close(projected, cache[f"mlp_out.{layer}"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_attn_z_is_the_attention_output_projection_input(
    arch, backend, get_adapter, get_hf, texts
) -> None:
    """o_proj(attn_z) == attn_out, and attn_z is n_heads * d_head wide (the heads' outputs)."""
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    sites = [f"{k}.{layer}" for layer in range(adapter.n_layers) for k in ("attn_z", "attn_out")]
    _, cache = adapter.run_with_cache(batch, sites)
    hf = get_hf(arch)
    assert adapter.info.n_heads == hf.config.num_attention_heads
    assert adapter.info.n_heads * adapter.info.d_head == adapter.site_width("attn_z.0")
    for layer in range(adapter.n_layers):
        proj = hf.get_submodule(adapter.spec.sites["attn_out"].path(layer))
        z = cache[f"attn_z.{layer}"]
        assert z.shape[-1] == adapter.site_width(f"attn_z.{layer}")
        assert z.abs().max() > 1e-3
        with torch.no_grad():
            projected = proj(z)
        torch.testing.assert_close(projected, cache[f"attn_out.{layer}"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gated_mlp_post_is_act_gate_times_up(arch, get_adapter, get_hf, texts) -> None:
    adapter = get_adapter(arch, "tlens")
    batch = adapter.tokenize(list(texts))
    _, cache = adapter.run_with_cache(batch, ["resid_pre.0", "attn_out.0", "mlp_post.0"])
    block = get_hf(arch).get_submodule(adapter.spec.sites["resid_pre"].path(0))
    with torch.no_grad():
        x = block.get_submodule(adapter.spec.ln2)(cache["resid_pre.0"] + cache["attn_out.0"])
        neurons = block.mlp.act_fn(block.mlp.gate_proj(x)) * block.mlp.up_proj(x)
    torch.testing.assert_close(neurons, cache["mlp_post.0"], atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_embed_is_token_embeddings_and_relates_to_resid_pre_0(
    arch, backend, get_adapter, get_hf, texts
) -> None:
    adapter = get_adapter(arch, backend)
    spec = adapter.spec
    batch = adapter.tokenize(list(texts))
    _, cache = adapter.run_with_cache(batch, ["embed", "resid_pre.0"])
    hf = get_hf(arch)
    with torch.no_grad():
        token_embeddings = hf.get_input_embeddings()(batch.input_ids)
        expected = token_embeddings
        if spec.positional == "learned":
            assert spec.pos_embed is not None
            expected = expected + hf.get_submodule(spec.pos_embed)(batch.position_ids)
        if spec.embed_norm is not None:
            expected = hf.get_submodule(spec.embed_norm)(expected)
    torch.testing.assert_close(cache["embed"], token_embeddings, atol=0, rtol=0)
    torch.testing.assert_close(cache["resid_pre.0"], expected, atol=ATOL, rtol=0)
    if spec.positional != "learned" and spec.embed_norm is None:
        assert torch.equal(cache["embed"], cache["resid_pre.0"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_last_resid_post_is_before_the_final_norm(
    arch, backend, get_adapter, get_hf, texts
) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    last = f"resid_post.{adapter.n_layers - 1}"
    logits, cache = adapter.run_with_cache(batch, [last])
    hf = get_hf(arch)
    with torch.no_grad():
        relogits = hf.get_submodule(adapter.spec.unembed)(
            hf.get_submodule(adapter.spec.final_norm)(cache[last])
        )
    torch.testing.assert_close(relogits, logits, atol=ATOL, rtol=0)
