"""The MLP output projection as weight edits see it, on every architecture.

FT, ROME and MEMIT change the weight ``W`` of one MLP's output projection (``down_proj``,
GPT-2's ``c_proj``), whose input is the key ``k`` (``mlp_post.{L}``).  What the block adds to
the residual stream (``mlp_out.{L}``) is that projection's output ``y = W k + b`` itself, or,
on architectures with sublayer post-norms (Gemma 3's ``post_feedforward_layernorm``), the
norm of it: ``mlp_out = N(y)`` (:meth:`BaseAdapter.sublayer_output
<mlake_core.models.adapter.BaseAdapter.sublayer_output>` applies ``N``; the identity
elsewhere).  A weight edit solves for ``y``, so what the methods compute at ``mlp_out`` is
carried to ``y`` here:

* :func:`projection_output` -- ``y`` for given keys (the projection module itself, bias
  included);
* :func:`pull_back_grad` -- ``d loss / d y = J_N(y)^T d loss / d mlp_out`` (FT's gradient,
  and ROME's and MEMIT's ``δ`` optimisation, which optimises ``δ`` at ``y``:
  :func:`~mlake_core.editing.delta.optimise_output_delta`);
* :func:`output_change` -- the change of ``mlp_out`` that a change of ``y`` makes
  (``N(y + Δy) - N(y)``);
* :func:`pull_back_change` -- the converse: a change of ``y`` that makes a wanted change of
  ``mlp_out`` (MEMIT spreads a residual-stream change over several layers; ``init:
  subject-mean`` starts from a residual-stream state).

Without a post-norm every function returns its input unchanged (the same tensor), so the
methods compute bit for bit what they computed before post-norms were supported.

The one approximation is in :func:`pull_back_change`.  A post-norm is not onto: an RMS norm
``N(y) = γ ⊙ y / sqrt(mean(y²) + ε)`` gives outputs whose ``γ``-scaled RMS is (up to ``ε``)
one, whatever ``y``, so a wanted change of ``mlp_out`` that leaves that shell cannot be made by
any weight.  The pull-back returns the change of ``y`` whose image is closest (least
squares, found by L-BFGS from ``Δy = 0``, the small-step direction along the shell) and
reports how far it stays from the wanted change.  ROME is exact: its ``δ`` is optimised at
``y`` itself.  MEMIT's targets are reachable at its last layer (also optimised at ``y``); the
share of the residual it asks of each earlier layer is pulled back, and each layer's step
re-measures the residual stream, so what one layer cannot make is asked of the next.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def has_post_norm(adapter: Any) -> bool:
    """Whether the MLP output passes a norm before joining the residual stream."""
    return adapter.spec.post_norm("mlp") is not None


def projection_output(adapter: Any, layer: int, keys: Tensor) -> Tensor:
    """The output of layer ``layer``'s MLP output projection for ``keys`` (``[..., d_mlp]``,
    values of ``mlp_post.{layer}``), with the model's current weights, bias included; in the
    model's dtype, on the projection's device (its layer's, under a device map), without
    gradient."""
    path = adapter.spec.sites["mlp_post"].path(layer)
    module = adapter.hf_module(path)
    with torch.no_grad():
        return module(keys.to(device=adapter.module_device(path), dtype=adapter.dtype))


def pull_back_grad(adapter: Any, layer: int, projected: Tensor, grad: Tensor) -> Tensor:
    """The gradient with respect to the projection's output ``y`` (``projected``), given the
    gradient ``grad`` with respect to ``mlp_out.{layer} = N(y)``: ``J_N(y)^T grad`` (float32,
    ``grad``'s shape).  Without a post-norm, ``grad`` itself."""
    if not has_post_norm(adapter):
        return grad
    with torch.enable_grad():
        y = projected.detach().float().requires_grad_(True)
        out = adapter.sublayer_output("mlp", layer, y)
        (g,) = torch.autograd.grad(out, y, grad_outputs=grad.to(out))
    return g.to(grad.device)


def output_change(adapter: Any, layer: int, projected: Tensor, change: Tensor) -> Tensor:
    """The change of ``mlp_out.{layer}`` when the projection's output moves from ``y``
    (``projected``) to ``y + change``: ``N(y + change) - N(y)`` (float32, ``change``'s device).
    Without a post-norm, ``change`` itself."""
    if not has_post_norm(adapter):
        return change
    with torch.no_grad():
        y = projected.float()
        moved = adapter.sublayer_output("mlp", layer, y + change.to(y))
        return (moved - adapter.sublayer_output("mlp", layer, y)).to(change.device)


#: L-BFGS iterations of :func:`pull_back_change` (each a few evaluations of the norm).
PULL_BACK_ITERATIONS = 200


def pull_back_change(
    adapter: Any, layer: int, projected: Tensor, change: Tensor
) -> tuple[Tensor, Tensor]:
    """A change ``Δy`` of the projection's output that moves ``mlp_out.{layer}`` by
    ``change`` (rows ``[n, d_model]``): the least-squares solution of
    ``N(y + Δy) = N(y) + change`` nearest ``Δy = 0`` (see the module docstring: with an RMS
    norm only changes along its output shell are reachable).

    Args:
        adapter: the model.
        layer: the MLP's block.
        projected: ``y``, the projection's output at the rows (``[n, d_model]``).
        change: the wanted change of ``mlp_out`` (``[n, d_model]``).

    Returns:
        ``Δy`` (float32 unless no post-norm: then ``change`` itself) and, per row, the norm of
        what is missed, ``||N(y + Δy) - N(y) - change||`` (zeros without a post-norm).
    """
    if not has_post_norm(adapter):
        return change, torch.zeros(change.shape[:-1], dtype=change.dtype, device=change.device)
    y = projected.detach().float()
    wanted = (adapter.sublayer_output("mlp", layer, y) + change.to(y)).detach()
    # Solve in units of each row's RMS: the norm is scale-invariant, so its Jacobian scales as
    # 1 / ||y|| and the problem is equally conditioned whatever the projection's scale.
    scale = y.pow(2).mean(-1, keepdim=True).sqrt().clamp(min=1e-12)
    weight = wanted.pow(2).sum().clamp(min=1e-12)
    x = torch.zeros_like(y, requires_grad=True)
    opt = torch.optim.LBFGS(
        [x],
        lr=1.0,
        max_iter=PULL_BACK_ITERATIONS,
        tolerance_grad=1e-10,
        tolerance_change=1e-14,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure() -> Tensor:
        missed = adapter.sublayer_output("mlp", layer, y + scale * x) - wanted
        loss = missed.pow(2).sum() / weight
        # Only x is differentiated: the norm's own weight gets no .grad.
        (x.grad,) = torch.autograd.grad(loss, x)
        return loss.detach()

    with torch.enable_grad():
        opt.step(closure)
    delta = (scale * x).detach()
    with torch.no_grad():
        missed = adapter.sublayer_output("mlp", layer, y + delta) - wanted
    return delta.to(change.device), missed.norm(dim=-1).to(change.device)
