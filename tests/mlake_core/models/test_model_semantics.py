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
    """Parallel GPT-NeoX and Cohere: the MLP reads ln2(resid_pre), so patching attn_out leaves
    mlp_post."""
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    _, clean = adapter.run_with_cache(batch, ["mlp_post.0"])
    every = [[*range(batch.shape[1])] for _ in range(batch.shape[0])]
    zeros = [torch.zeros(batch.shape[1], adapter.d_model)] * batch.shape[0]
    _, patched = adapter.run_with_cache(
        batch, ["mlp_post.0"], patches=[Patch.per_row("attn_out.0", every, zeros)]
    )
    assert adapter.info.parallel_attn_mlp == (arch in ("gpt_neox", "cohere"))
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
        down = hf.get_submodule(adapter.spec.sites["mlp_post"].path(layer))
        with torch.no_grad():
            projected = down(cache[f"mlp_post.{layer}"])
            contribution = adapter.sublayer_output("mlp", layer, projected)
        assert cache[f"mlp_post.{layer}"].shape[-1] == adapter.d_mlp
        torch.testing.assert_close(contribution, cache[f"mlp_out.{layer}"], atol=ATOL, rtol=0)
        # With a post-norm (Gemma 3) the projection's own output is not the contribution.
        if adapter.spec.mlp_post_norm is None:
            assert torch.equal(contribution, projected)
        else:
            assert (projected - cache[f"mlp_out.{layer}"]).abs().max() > 1e-2


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
        proj = hf.get_submodule(adapter.spec.sites["attn_z"].path(layer))
        z = cache[f"attn_z.{layer}"]
        assert z.shape[-1] == adapter.site_width(f"attn_z.{layer}")
        assert z.abs().max() > 1e-3
        with torch.no_grad():
            projected = proj(z)
            contribution = adapter.sublayer_output("attn", layer, projected)
        torch.testing.assert_close(contribution, cache[f"attn_out.{layer}"], atol=ATOL, rtol=0)
        if adapter.spec.attn_post_norm is not None:
            assert (projected - cache[f"attn_out.{layer}"]).abs().max() > 1e-2


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma3_text", "gemma2", "cohere"])
def test_gated_mlp_post_is_act_gate_times_up(arch, get_adapter, get_hf, texts) -> None:
    """Cohere's parallel MLP reads the one shared input_layernorm of resid_pre."""
    adapter = get_adapter(arch, "tlens")
    batch = adapter.tokenize(list(texts))
    _, cache = adapter.run_with_cache(batch, ["resid_pre.0", "attn_out.0", "mlp_post.0"])
    block = get_hf(arch).get_submodule(adapter.spec.sites["resid_pre"].path(0))
    mlp_in = cache["resid_pre.0"]
    if not adapter.info.parallel_attn_mlp:
        mlp_in = mlp_in + cache["attn_out.0"]
    with torch.no_grad():
        x = block.get_submodule(adapter.spec.ln2)(mlp_in)
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
        # The embedding module's output: W_E[token] times its scale (sqrt(d_model) on Gemma 3).
        token_embeddings = hf.get_input_embeddings()(batch.input_ids)
        table = hf.get_input_embeddings().weight[batch.input_ids]
        torch.testing.assert_close(
            token_embeddings, table * adapter.info.embed_scale, atol=1e-6, rtol=1e-6
        )
        expected = token_embeddings
        if spec.positional == "learned":
            assert spec.pos_embed is not None
            expected = expected + hf.get_submodule(spec.pos_embed)(batch.position_ids)
        if spec.embed_norm is not None:
            expected = hf.get_submodule(spec.embed_norm)(expected)
    torch.testing.assert_close(cache["embed"], token_embeddings, atol=0, rtol=0)
    torch.testing.assert_close(cache["resid_pre.0"], expected, atol=ATOL, rtol=0)
    if spec.positional != "learned" and spec.embed_norm is None:
        # What the first block receives, scale included.
        assert torch.equal(cache["embed"], cache["resid_pre.0"])
    if spec.scaled_embed:
        assert adapter.info.embed_scale == pytest.approx(adapter.d_model**0.5)
        assert (cache["embed"] - table).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_embed_with_its_own_value_changes_nothing(arch, backend, get_adapter, texts):
    """Causal tracing writes ``embed + noise`` into ``embed``: with zero noise the run must be
    the clean one (a site taken before a scale the model applies afterwards would fail)."""
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    logits, cache = adapter.run_with_cache(batch, ["embed"])
    every = [[*range(batch.shape[1])] for _ in range(batch.shape[0])]
    patched = adapter.run_with_patches(
        batch, [Patch.from_activation("embed", cache["embed"], every)]
    )
    torch.testing.assert_close(patched, logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_tracing_noise_is_measured_on_what_the_first_block_receives(
    arch, get_adapter, get_hf, texts
) -> None:
    """The noise level of causal tracing is the std of ``embed`` over subject tokens: on Gemma 3
    ``sqrt(d_model)`` times the std of the raw table rows, the units noise is added in."""
    from analysis.tracing.causal import embedding_noise_std

    adapter = get_adapter(arch, "nnsight")
    prompts = [(ids, [1, 2]) for ids in map(adapter.encode, texts) if len(ids) > 2]
    measured = embedding_noise_std(adapter, prompts)
    table = get_hf(arch).get_input_embeddings().weight.detach()
    rows = torch.cat([table[[ids[p] for p in positions]] for ids, positions in prompts])
    assert measured == pytest.approx(
        adapter.info.embed_scale * float(rows.double().std()), rel=1e-5
    )
    if arch != "bloom" and adapter.spec.positional != "learned":
        _, cache = adapter.run_with_cache(adapter.batch([prompts[0][0]]), ["resid_pre.0"])
        first_block = cache["resid_pre.0"][0, prompts[0][1]]
        torch.testing.assert_close(
            first_block, table[[prompts[0][0][p] for p in prompts[0][1]]] * adapter.info.embed_scale
        )


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
        ) * getattr(hf.config, "logit_scale", 1.0)  # Cohere scales its logits
        cap = adapter.info.logit_softcap
        if cap is not None:
            relogits = cap * torch.tanh(relogits / cap)
    torch.testing.assert_close(relogits, logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_leave_tied_embeddings_bitwise_intact(backend, get_adapter, texts) -> None:
    """Gemma 3 ties the unembedding to the embedding: an edit (FT here; every method writes MLP
    down projections only) must leave that tensor bitwise unchanged, applied or restored, and
    the adapter refuses to hand it out for writing."""
    from mlake_core.editing import EditContext, EditRequest, get_method
    from mlake_core.editing.base import down_proj_name
    from mlake_core.errors import ConfigError

    adapter = get_adapter("gemma3_text", backend)
    assert adapter.info.tied_embeddings
    embed_name = adapter.spec.sites["embed"].path(None) + ".weight"
    unembed_name = adapter.spec.unembed + ".weight"
    embed = adapter.hf_module(adapter.spec.sites["embed"].path(None)).weight
    assert embed.data_ptr() == adapter.hf_module(adapter.spec.unembed).weight.data_ptr()
    root = adapter.hf_module("")
    before = {name: p.detach().clone() for name, p in root.named_parameters()}
    embed_before = embed.detach().clone()

    ids = tuple(adapter.encode(texts[0]))
    new = tuple(adapter.tokenizer(" Berlin", add_special_tokens=False)["input_ids"])
    request = EditRequest(
        0, "en", "question", texts[0], ids, "France", len(ids) - 1, "Berlin", new, "Paris"
    )
    entry = get_method("ft")
    result = entry.fn(
        adapter,
        [request],
        entry.config_cls(layer=0, steps=3, lr=1e-2),
        EditContext(torch.Generator().manual_seed(0)),
    )
    assert set(result.deltas) == {down_proj_name(adapter, 0)}
    batch = adapter.tokenize(list(texts))
    clean = adapter.forward(batch)
    weight, _ = adapter.mlp_down(0)
    with result.applied(adapter):
        changed = [p for n, p in root.named_parameters() if not torch.equal(p, before[n])]
        assert [p.data_ptr() for p in changed] == [weight.data_ptr()]
        assert torch.equal(embed, embed_before)
        assert (adapter.forward(batch) - clean).abs().max() > 0
    for name, p in root.named_parameters():
        assert torch.equal(p, before[name]), name
    assert torch.equal(adapter.forward(batch), clean)

    for name in (embed_name, unembed_name):
        with pytest.raises(ConfigError, match="tied"):
            adapter.editable_parameter(name)
    assert adapter.editable_parameter(down_proj_name(adapter, 0)) is weight


@pytest.mark.parametrize("backend", BACKENDS)
def test_gemma2_soft_caps_are_the_models_own(backend, get_adapter, tiny_models, texts) -> None:
    """Gemma 2 caps attention scores inside HF attention and the logits at the end: both
    backends give the capped model's logits (the tiny caps are low enough to bite)."""
    from transformers import AutoModelForCausalLM

    from mlake_core.models.tiny import GEMMA2_SOFTCAPS

    adapter = get_adapter("gemma2", backend)
    batch = adapter.tokenize(list(texts))
    logits = adapter.forward(batch).float()
    real = batch.attention_mask.bool()
    assert float(logits[real].abs().max()) <= GEMMA2_SOFTCAPS[1]
    uncapped = AutoModelForCausalLM.from_pretrained(
        tiny_models["gemma2"], attn_implementation="eager", attn_logit_softcapping=None
    ).eval()
    with torch.no_grad():
        plain = uncapped(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
        ).logits
    assert (plain[real] - logits[real]).abs().max() > 1e-2
