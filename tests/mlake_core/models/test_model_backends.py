"""Reference tier: both backends against the plain Hugging Face model and against each other.

Every architecture x backend: logits and every site's activation equal what plain PyTorch hooks
on the HF model see; patched logits and gradients agree between backends and with
``torch.autograd`` on the plain model; a padded batch equals its rows run one by one.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from mlake_core.models import BACKENDS, Patch, TokenBatch, parse_site
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

pytestmark = pytest.mark.slow  # builds and runs the tiny models

ATOL = 1e-4  # float32; observed differences are ~1e-6 (TL reimplements attention / norms)


def _metric(batch: TokenBatch, target: int = 7) -> Callable[[torch.Tensor], torch.Tensor]:
    """Summed log-probability of ``target`` after each row's last real token."""
    rows = torch.arange(batch.shape[0])

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows, batch.last_index].log_softmax(-1)[:, target].sum()

    return metric


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_logits_and_every_site_equal_plain_hf(
    arch, backend, get_adapter, get_hf, hf_reference, texts
) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    with torch.no_grad():
        ref_logits, ref_acts = hf_reference(
            get_hf(arch), adapter.spec, batch, adapter.sites, adapter.n_layers
        )
    logits, cache = adapter.run_with_cache(batch, adapter.sites)
    real = batch.attention_mask.bool()
    assert logits.shape == (len(texts), batch.shape[1], adapter.info.d_vocab)
    torch.testing.assert_close(logits[real], ref_logits[real], atol=ATOL, rtol=0)
    assert set(cache) == set(adapter.sites)
    for site, value in cache.items():
        assert value.shape == (*batch.shape, adapter.site_width(site)), site
        torch.testing.assert_close(value[real], ref_acts[site][real], atol=ATOL, rtol=0, msg=site)
    # forward() is the same computation without the cache.
    torch.testing.assert_close(adapter.forward(batch), logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_cache_the_same_activations(arch, get_adapter, texts) -> None:
    tl, nn = get_adapter(arch, "tlens"), get_adapter(arch, "nnsight")
    batch = tl.tokenize(list(texts))
    sites = ["resid_post.1", "embed", "mlp_post.0", "attn_out.1"]  # any order, any subset
    _, tl_cache = tl.run_with_cache(batch, sites)
    _, nn_cache = nn.run_with_cache(batch, sites)
    assert set(tl_cache) == set(nn_cache) == set(sites)
    for site in sites:
        torch.testing.assert_close(tl_cache[site], nn_cache[site], atol=ATOL, rtol=0, msg=site)


def _mixed_patches(adapter, batch: TokenBatch, seed: int) -> list[Patch]:
    """Per-row positions and random values on three sites (one row left untouched)."""
    gen = torch.Generator().manual_seed(seed)
    last = batch.last_index.tolist()
    positions = [[last[0]], [], [last[2], last[2] - 1], [last[3] - 2]]
    patches = []
    for site in ("embed", "mlp_post.0", "attn_out.1"):
        width = adapter.site_width(site)
        values = [torch.randn(len(p), width, generator=gen) for p in positions]
        patches.append(Patch.per_row(site, positions, values))
    return patches


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_agree_on_patched_logits(arch, get_adapter, texts) -> None:
    tl, nn = get_adapter(arch, "tlens"), get_adapter(arch, "nnsight")
    batch = tl.tokenize(list(texts))
    patches = _mixed_patches(tl, batch, seed=0)
    tl_logits = tl.run_with_patches(batch, patches)
    nn_logits = nn.run_with_patches(batch, patches)
    torch.testing.assert_close(tl_logits, nn_logits, atol=ATOL, rtol=0)
    clean = tl.forward(batch)
    assert torch.equal(tl_logits[1], clean[1]), "row 1 had no patch"
    assert (tl_logits[0] - clean[0]).abs().max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_patching_with_the_clean_value_changes_nothing(arch, backend, get_adapter, texts) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    logits, cache = adapter.run_with_cache(batch, adapter.sites)
    every = [[*range(batch.shape[1])] for _ in range(batch.shape[0])]
    patches = [Patch.from_activation(site, cache[site], every) for site in adapter.sites]
    torch.testing.assert_close(adapter.run_with_patches(batch, patches), logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize(
    "site", ["embed", "resid_pre.1", "attn_out.0", "mlp_post.0", "mlp_out.1", "resid_post.0"]
)
def test_patching_changes_the_patched_row_from_the_patched_position_on(
    arch, backend, site, get_adapter, texts
) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    clean = adapter.forward(batch)
    row, pos = 0, batch.padded_index(0, 2)
    value = torch.full((1, adapter.site_width(site)), 3.0)
    no_values = [torch.zeros(0, adapter.site_width(site))] * (batch.shape[0] - 1)
    patch = Patch.per_row(site, [[pos]] + [[]] * (batch.shape[0] - 1), [value, *no_values])
    patched, cache = adapter.run_with_cache(batch, [site], patches=[patch])
    # The cache shows the patched value.
    assert torch.equal(cache[site][row, pos], value[0])
    # Causal model: earlier real positions and other rows are untouched; later ones are not.
    # (Padding positions are excluded: a padding query has no key to attend to, and eager
    # attention then spreads it over every key, the patched one included.)
    first = int(batch.first_index[row])
    assert first < pos
    assert torch.equal(patched[row, first:pos], clean[row, first:pos])
    assert torch.equal(patched[1:], clean[1:])
    changed = (patched[row, pos:] - clean[row, pos:]).abs().amax(-1)
    assert changed[0] > 1e-3
    # A site below the last block's attention also reaches later positions.
    parsed = parse_site(site, adapter.n_layers)
    spreads = parsed.layer < adapter.n_layers - 1 or parsed.kind in ("embed", "resid_pre")
    if spreads:
        assert changed.min() > 1e-3
    else:
        assert changed[1:].max() == 0


@pytest.mark.parametrize("arch", ARCHS)
def test_gradients_agree_between_backends_and_with_autograd_on_hf(
    arch, get_adapter, get_hf, hf_reference, texts
) -> None:
    tl, nn = get_adapter(arch, "tlens"), get_adapter(arch, "nnsight")
    batch = tl.tokenize(list(texts))
    metric = _metric(batch)
    sites = list(tl.sites)
    value_tl, grads_tl = tl.gradients(batch, sites, metric)
    value_nn, grads_nn = nn.gradients(batch, sites, metric)

    hf = get_hf(arch)
    with torch.enable_grad():
        logits, acts = hf_reference(hf, tl.spec, batch, sites, tl.n_layers)
        value_hf = metric(logits)
        grads_hf = dict(
            zip(sites, torch.autograd.grad(value_hf, [acts[s] for s in sites]), strict=True)
        )

    torch.testing.assert_close(value_tl, value_hf.detach(), atol=ATOL, rtol=0)
    torch.testing.assert_close(value_nn, value_hf.detach(), atol=ATOL, rtol=0)
    for site in sites:
        assert grads_tl[site].shape == (*batch.shape, tl.site_width(site))
        torch.testing.assert_close(grads_tl[site], grads_hf[site], atol=ATOL, rtol=1e-4, msg=site)
        torch.testing.assert_close(grads_nn[site], grads_hf[site], atol=ATOL, rtol=1e-4, msg=site)
    # The metric reads the last position, so the last block's output matters there only.
    last = f"resid_post.{tl.n_layers - 1}"
    rows = torch.arange(batch.shape[0])
    assert grads_tl[last][rows, batch.last_index].abs().sum() > 0
    other = torch.ones(batch.shape, dtype=torch.bool)
    other[rows, batch.last_index] = False
    assert grads_tl[last][other].abs().max() == 0
    # Activations are differentiated, parameters are not touched.
    assert all(p.grad is None for p in hf.parameters())


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_padded_batch_equals_rows_run_alone(arch, backend, side, get_adapter, texts) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts), padding_side=side)
    assert not bool(batch.attention_mask.all()), "the batch must contain padding"
    sites = ["embed", "resid_pre.0", "mlp_post.0", "attn_out.1", "resid_post.1"]
    logits, cache = adapter.run_with_cache(batch, sites)
    for row, text in enumerate(texts):
        alone = adapter.tokenize([text])
        assert bool(alone.attention_mask.all())
        logits_alone, cache_alone = adapter.run_with_cache(alone, sites)
        real = batch.attention_mask[row].bool()
        torch.testing.assert_close(logits[row, real], logits_alone[0], atol=ATOL, rtol=0)
        for site in sites:
            torch.testing.assert_close(
                cache[site][row, real], cache_alone[site][0], atol=ATOL, rtol=0, msg=site
            )


def test_tlens_hooks_are_removed_even_when_the_metric_fails(get_adapter, texts) -> None:
    adapter = get_adapter("llama", "tlens")
    batch = adapter.tokenize(list(texts))
    clean = adapter.forward(batch)

    def broken(logits: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("metric failed")

    with pytest.raises(RuntimeError, match="metric failed"):
        adapter.gradients(batch, ["mlp_post.0"], broken)
    patch = Patch.per_row("embed", [[0]] * 4, [torch.ones(1, adapter.d_model)] * 4)
    adapter.run_with_patches(batch, [patch])
    hooks_left = {
        name: len(point.fwd_hooks) + len(point.bwd_hooks)
        for name, point in adapter.bridge.hook_dict.items()
        if point.fwd_hooks or point.bwd_hooks
    }
    assert hooks_left == {}
    assert torch.equal(adapter.forward(batch), clean)


def test_nnsight_runs_clean_after_a_failed_run(get_adapter, texts) -> None:
    adapter = get_adapter("qwen2", "nnsight")
    batch = adapter.tokenize(list(texts))
    clean = adapter.forward(batch)
    bad = Patch.per_row(
        "embed",
        [[0]] + [[]] * 3,
        [torch.ones(1, adapter.d_model + 1)] + [torch.zeros(0, adapter.d_model + 1)] * 3,
    )
    with pytest.raises(Exception, match="width"):
        adapter.run_with_patches(batch, [bad])
    assert torch.equal(adapter.forward(batch), clean)


def test_tlens_own_bloom_attention_hook_includes_the_residual(get_adapter, texts) -> None:
    """TransformerLens#1639: on BLOOM the attention module's ``hook_out`` is attn + residual.

    mlake's ``attn_out`` is the attention's own output; TL 4.3's ``hook_attn_out`` alias agrees
    with it, its ``attn.hook_out`` does not.
    """
    adapter = get_adapter("bloom", "tlens")
    batch = adapter.tokenize(list(texts))
    _, ours = adapter.run_with_cache(batch, ["resid_pre.0", "attn_out.0"])
    names = ("blocks.0.attn.hook_out", "blocks.0.hook_attn_out")
    _, tl_cache = adapter.bridge.run_with_cache(
        batch.input_ids, attention_mask=batch.attention_mask, names_filter=lambda n: n in names
    )
    real = batch.attention_mask.bool()
    torch.testing.assert_close(
        tl_cache["blocks.0.attn.hook_out"][real],
        (ours["resid_pre.0"] + ours["attn_out.0"])[real],
        atol=ATOL,
        rtol=0,
    )
    torch.testing.assert_close(
        tl_cache["blocks.0.hook_attn_out"][real], ours["attn_out.0"][real], atol=ATOL, rtol=0
    )
    assert adapter.hook_name("attn_out.0") == "blocks.0.attn.o.hook_out"


def _calls(module: torch.nn.Module) -> tuple[list[int], Callable[[], None]]:
    """Count the forward calls of a module; returns the counter and the hook's remover."""
    calls: list[int] = []
    handle = module.register_forward_hook(lambda *_: calls.append(1))
    return calls, handle.remove


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_activations_equal_cached_ones_and_stop_after_the_last_site(
    arch, backend, get_adapter, texts
) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts), padding_side="right")
    sites = ["mlp_post.0", "embed", "attn_out.0"]
    patch = Patch.per_row("embed", [[1]] * 4, [torch.full((1, adapter.d_model), 0.5)] * 4)
    _, full = adapter.run_with_cache(batch, sites, patches=[patch])
    # The last block's MLP runs in a full pass and not after mlp_post.0 has been read.
    last_mlp = adapter.hf_module(adapter.spec.sites["mlp_post"].path(adapter.n_layers - 1))
    calls, remove = _calls(last_mlp)
    try:
        adapter.forward(batch)
        assert calls, "the counting hook must see a full pass"
        calls.clear()
        part = adapter.activations(batch, sites, patches=[patch])
        assert calls == []
    finally:
        remove()
    assert set(part) == set(full)
    for site in sites:
        torch.testing.assert_close(part[site], full[site], atol=0, rtol=0, msg=site)
    # A stopped pass leaves nothing behind: the next full pass is unchanged.
    _, again = adapter.run_with_cache(batch, sites, patches=[patch])
    torch.testing.assert_close(again["attn_out.0"], full["attn_out.0"], atol=0, rtol=0)
    with pytest.raises(ValueError, match="no site"):
        adapter.activations(batch, [])
