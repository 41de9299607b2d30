"""Standing ablations (``UnitPatch`` held by ``adapter.intervening``) on every tiny
architecture and both backends, against edits of the weights they stand for: zeroing MLP
neurons is zeroing those input columns of the MLP down-projection, zeroing a head's
``attn_z`` columns is zeroing those input columns of the attention output projection."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch

from mlake_core.errors import ConfigError
from mlake_core.models import BACKENDS, Patch
from mlake_core.models.adapter import UnitPatch, apply_patches
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

pytestmark = pytest.mark.slow  # builds and runs the tiny models

ATOL = 1e-5
TEXTS = ["The capital of France is", "法国的首都是巴黎", "Hi"]
# Neurons per layer and heads per layer (the tiny models have d_mlp >= 64 and 4 heads).
NEURONS = {0: [1, 5, 17], 1: [0, 3, 30]}
HEADS = {0: [1], 1: [0, 3]}


def _neuron_patches() -> list[UnitPatch]:
    return [UnitPatch.zero(f"mlp_post.{layer}", units) for layer, units in NEURONS.items()]


def _head_columns(adapter, heads: list[int]) -> list[int]:
    d = adapter.info.d_head
    return [h * d + i for h in heads for i in range(d)]


def _head_patches(adapter) -> list[UnitPatch]:
    return [
        UnitPatch.zero(f"attn_z.{layer}", _head_columns(adapter, heads))
        for layer, heads in HEADS.items()
    ]


@contextmanager
def _zeroed_inputs(weight: torch.Tensor, out_in: bool, columns: list[int]) -> Iterator[None]:
    """Zero the input columns ``columns`` of a projection's weight; restore it afterwards."""
    saved = weight.detach().clone()
    with torch.no_grad():
        if out_in:  # torch Linear: [out, in]
            weight[:, columns] = 0
        else:  # GPT-2 Conv1D: [in, out]
            weight[columns, :] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            weight.copy_(saved)


@contextmanager
def _zeroed_neurons(adapter) -> Iterator[None]:
    weights = [(adapter.mlp_down(layer), units) for layer, units in NEURONS.items()]
    with (
        _zeroed_inputs(*weights[0][0], weights[0][1]),
        _zeroed_inputs(*weights[1][0], weights[1][1]),
    ):
        yield


def _o_proj(adapter, layer: int) -> tuple[torch.Tensor, bool]:
    module = adapter.hf_module(adapter.spec.sites["attn_z"].path(layer))
    return module.weight, type(module).__name__ != "Conv1D"


@contextmanager
def _zeroed_heads(adapter) -> Iterator[None]:
    (w0, o0), (w1, o1) = _o_proj(adapter, 0), _o_proj(adapter, 1)
    with (
        _zeroed_inputs(w0, o0, _head_columns(adapter, HEADS[0])),
        _zeroed_inputs(w1, o1, _head_columns(adapter, HEADS[1])),
    ):
        yield


def _real(logits: torch.Tensor, batch) -> torch.Tensor:
    return logits[batch.attention_mask.bool()]


def _close(a: torch.Tensor, b: torch.Tensor, batch) -> None:
    torch.testing.assert_close(_real(a, batch), _real(b, batch), atol=ATOL, rtol=0)


def _differ(a: torch.Tensor, b: torch.Tensor, batch) -> float:
    return float((_real(a, batch) - _real(b, batch)).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_neuron_ablation_equals_zeroed_down_projection_columns(arch, backend, get_adapter):
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(TEXTS)
    clean = adapter.forward(batch)
    with adapter.intervening(_neuron_patches()):
        ablated = adapter.forward(batch)
        _, cache = adapter.run_with_cache(batch, ["mlp_post.0", "mlp_post.1", "mlp_out.1"])
    assert _differ(ablated, clean, batch) > 1e-3  # the ablation does something
    for layer, units in NEURONS.items():
        assert not cache[f"mlp_post.{layer}"][..., units].any()
        others = [u for u in range(adapter.d_mlp) if u not in units]
        assert cache[f"mlp_post.{layer}"][..., others].abs().amax() > 0
    # Outside the block, the model is untouched (exactly).
    assert torch.equal(adapter.forward(batch), clean)
    with _zeroed_neurons(adapter):
        by_weights = adapter.forward(batch)
        _, cache_w = adapter.run_with_cache(batch, ["mlp_out.1"])
    _close(ablated, by_weights, batch)
    torch.testing.assert_close(cache["mlp_out.1"], cache_w["mlp_out.1"], atol=ATOL, rtol=0)
    assert torch.equal(adapter.forward(batch), clean)  # the weights were restored
    # The same with per-call patches of every row and position, layer by layer.
    rows, positions = torch.meshgrid(
        torch.arange(batch.shape[0]), torch.arange(batch.shape[1]), indexing="ij"
    )
    patches: list[Patch] = []
    for layer, units in NEURONS.items():
        _, acts = adapter.run_with_cache(batch, [f"mlp_post.{layer}"], patches=patches)
        values = acts[f"mlp_post.{layer}"].clone()
        values[..., units] = 0
        patches.append(
            Patch(
                f"mlp_post.{layer}", rows.reshape(-1), positions.reshape(-1), values.flatten(0, 1)
            )
        )
    _close(adapter.run_with_patches(batch, patches), ablated, batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_head_ablation_equals_zeroed_output_projection_columns(arch, backend, get_adapter):
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(TEXTS)
    clean = adapter.forward(batch)
    with adapter.intervening(_head_patches(adapter)):
        ablated = adapter.forward(batch)
        _, cache = adapter.run_with_cache(batch, ["attn_z.1"])
    assert _differ(ablated, clean, batch) > 1e-3
    assert not cache["attn_z.1"][..., _head_columns(adapter, HEADS[1])].any()
    with _zeroed_heads(adapter):
        by_weights = adapter.forward(batch)
    _close(ablated, by_weights, batch)
    assert torch.equal(adapter.forward(batch), clean)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bloom"])
def test_nested_blocks_add_and_leave_cleanly(arch, backend, get_adapter):
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(TEXTS)
    clean = adapter.forward(batch)
    with adapter.intervening(_neuron_patches()):
        outer = adapter.forward(batch)
        with adapter.intervening(_head_patches(adapter)):
            both = adapter.forward(batch)
        assert torch.equal(adapter.forward(batch), outer)  # the inner patches are gone
    assert torch.equal(adapter.forward(batch), clean)
    with _zeroed_neurons(adapter), _zeroed_heads(adapter):
        by_weights = adapter.forward(batch)
    _close(both, by_weights, batch)
    assert _differ(both, outer, batch) > 1e-3
    # One block holding both is the same as the nested pair.
    with adapter.intervening([*_neuron_patches(), *_head_patches(adapter)]):
        assert torch.equal(adapter.forward(batch), both)
    # An exception inside a nested block leaves exactly the outer patches, then none.
    with pytest.raises(RuntimeError, match="boom"):
        with adapter.intervening(_neuron_patches()):
            try:
                with adapter.intervening(_head_patches(adapter)):
                    raise RuntimeError("boom")
            finally:
                assert torch.equal(adapter.forward(batch), outer)
    assert adapter._standing == ()
    assert torch.equal(adapter.forward(batch), clean)


@pytest.mark.parametrize("backend", BACKENDS)
def test_call_patches_apply_after_standing_ones(backend, get_adapter):
    """A call's own patches come after the standing ablations: restoring the clean values of
    an ablated site at every position undoes the ablation."""
    adapter = get_adapter("qwen2", backend)
    batch = adapter.tokenize(TEXTS)
    clean = adapter.forward(batch)
    _, acts = adapter.run_with_cache(batch, ["mlp_post.0"])
    rows, positions = torch.meshgrid(
        torch.arange(batch.shape[0]), torch.arange(batch.shape[1]), indexing="ij"
    )
    restore = Patch(
        "mlp_post.0", rows.reshape(-1), positions.reshape(-1), acts["mlp_post.0"].flatten(0, 1)
    )
    with adapter.intervening([UnitPatch.zero("mlp_post.0", NEURONS[0])]):
        assert _differ(adapter.forward(batch), clean, batch) > 1e-3
        _close(adapter.run_with_patches(batch, [restore]), clean, batch)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_gradients_return_activations_and_see_the_ablation(arch, backend, get_adapter):
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(TEXTS)
    rows = torch.arange(batch.shape[0])
    sites = ["mlp_post.0", "attn_z.1", "mlp_post.1", "resid_post.1"]

    def metric(logits: torch.Tensor) -> torch.Tensor:
        return logits[rows, batch.last_index].log_softmax(-1)[:, 7].sum()

    acts: dict[str, torch.Tensor] = {}
    value, grads = adapter.gradients(batch, sites, metric, activations=acts)
    logits, cache = adapter.run_with_cache(batch, sites)
    assert set(acts) == set(sites)
    for site in sites:
        assert not acts[site].requires_grad
        torch.testing.assert_close(acts[site], cache[site], atol=1e-6, rtol=0)
    assert float(value) == pytest.approx(float(metric(logits)), abs=1e-5)
    # Inside a block, gradients run ablated: activations, value and downstream gradients
    # equal those of the model with the down-projection columns zeroed.
    patches = [UnitPatch.zero("mlp_post.0", NEURONS[0])]
    ablated: dict[str, torch.Tensor] = {}
    with adapter.intervening(patches):
        v_abl, g_abl = adapter.gradients(batch, sites, metric, activations=ablated)
        _, cache_abl = adapter.run_with_cache(batch, sites)
    assert not ablated["mlp_post.0"][..., NEURONS[0]].any()
    for site in sites:
        torch.testing.assert_close(ablated[site], cache_abl[site], atol=1e-6, rtol=0)
    weight, out_in = adapter.mlp_down(0)
    with _zeroed_inputs(weight, out_in, NEURONS[0]):
        v_w, g_w = adapter.gradients(batch, sites, metric)
    assert float(v_abl) == pytest.approx(float(v_w), abs=1e-5)
    assert abs(float(v_abl) - float(value)) > 1e-4
    for site in sites[1:]:
        torch.testing.assert_close(g_abl[site], g_w[site], atol=ATOL, rtol=0)
        assert not torch.allclose(g_abl[site], grads[site], atol=1e-6)


def test_intervening_refuses_what_does_not_fit(get_adapter):
    adapter = get_adapter("llama", "tlens")
    batch = adapter.tokenize(TEXTS)
    patch = Patch("mlp_post.0", torch.tensor([0]), torch.tensor([0]), torch.zeros(1, adapter.d_mlp))
    with pytest.raises(TypeError, match="UnitPatch"):
        with adapter.intervening([patch]):
            pass
    with pytest.raises(ConfigError):
        with adapter.intervening([UnitPatch.zero("mlp_post.9", [0])]):
            pass
    assert adapter._standing == ()
    with adapter.intervening([UnitPatch.zero("mlp_post.0", [adapter.d_mlp])]):
        with pytest.raises(IndexError, match="width"):
            adapter.forward(batch)
    assert adapter._standing == ()
    # apply_patches itself: out of place, later patches win.
    x = torch.ones(2, 3, 4)
    out = apply_patches(
        x,
        [UnitPatch.zero("s", [1]), UnitPatch("s", torch.tensor([1, 3]), torch.tensor([5.0, 7.0]))],
    )
    assert x.eq(1).all()
    assert out[..., 1].eq(5).all() and out[..., 3].eq(7).all() and out[..., [0, 2]].eq(1).all()
