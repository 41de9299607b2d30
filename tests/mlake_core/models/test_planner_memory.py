"""The per-row memory the planner reads off ``grad_rows_per_pass`` is at least what a
forward-and-backward pass really keeps for each row: the bytes of the tensors autograd saves
for the backward pass, counted with ``saved_tensors_hooks`` on every tiny architecture and
both backends, for rows that run the whole prompt and rows that continue a cached prefix (what
integrated gradients runs at its default ``positions="last"``)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from analysis.neurons.attribution import grad_rows_per_pass
from mlake_core.models.adapter import assume_free_bytes
from mlake_core.models.tiny import TINY_ARCHITECTURES

HUGE = 1 << 50


def charged_per_row(adapter, n_tokens: int, past_tokens: int) -> float:
    """What ``grad_rows_per_pass`` charges one row (read off at a huge CUDA budget)."""
    on_cuda = SimpleNamespace(
        dtype=adapter.dtype,
        info=adapter.info,
        d_model=adapter.d_model,
        d_mlp=adapter.d_mlp,
        n_layers=adapter.n_layers,
        device=torch.device("cuda"),
    )
    with assume_free_bytes(HUGE):
        rows = grad_rows_per_pass(on_cuda, n_tokens, past_tokens=past_tokens)
    return 0.25 * HUGE / rows


def saved_bytes(adapter, n_tokens: int, past_tokens: int, rows: int) -> int:
    """Bytes of the distinct storages autograd saves in one IG-like gradient pass of
    ``rows`` rows (every layer's ``mlp_post``, the answer's log-probability)."""
    seq = [5 + i % 40 for i in range(n_tokens)]
    past = None
    if past_tokens:
        _, prefix = adapter.run_with_past(adapter.batch([seq[:past_tokens]]), last_only=True)
        past = prefix.select(torch.zeros(rows, dtype=torch.long))
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        storages[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        adapter.gradients(
            adapter.batch([seq[past_tokens:]] * rows),
            [f"mlp_post.{layer}" for layer in range(adapter.n_layers)],
            lambda lp: lp.sum(),
            past=past,
            tokens=torch.tensor([7]),
        )
    return sum(storages.values())


@pytest.mark.parametrize("backend", ["tlens", "nnsight"])
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
@pytest.mark.parametrize(("n_tokens", "past_tokens"), [(12, 0), (12, 11), (20, 14)])
def test_grad_rows_charge_at_least_what_backward_keeps(
    get_adapter, arch, backend, n_tokens, past_tokens
) -> None:
    adapter = get_adapter(arch, backend)
    # The difference of two row counts: what each added row keeps (weights and the bounded
    # readout chunk are the same for both).
    kept = (
        saved_bytes(adapter, n_tokens, past_tokens, 6)
        - saved_bytes(adapter, n_tokens, past_tokens, 2)
    ) / 4
    charged = charged_per_row(adapter, n_tokens, past_tokens)
    assert kept > 0
    assert charged >= kept, f"{arch}/{backend}: charged {charged:.0f} B/row, keeps {kept:.0f}"
    # ... and not wildly more (a loose model would waste the device).
    assert charged <= 3 * kept, f"{arch}/{backend}: charged {charged:.0f} B/row, keeps {kept:.0f}"


def test_cached_rows_are_what_ig_runs_by_default(get_adapter) -> None:
    adapter = get_adapter("llama", "tlens")
    assert grad_rows_per_pass(adapter, 30) == grad_rows_per_pass(adapter, 30, past_tokens=29)
    # A longer cache costs more per row (its keys and values are attended and copied).
    assert charged_per_row(adapter, 30, 29) > charged_per_row(adapter, 10, 9)
