"""FT: constrained fine-tuning of one MLP output projection (Zhu et al. 2020; the FT-L
baseline of Meng et al. 2022), optionally restricted to a set of neurons.

Adam on the MLP output projection of one layer maximises the new answer's likelihood after
the edit prompt, with the weight change kept inside a Frobenius-norm ball
(``max_rel_norm * ||W||``).  The gradient of a linear map is ``sum_t g_t k_t^T`` with
``g = d loss / d (W k_t)`` and ``k = mlp_post``, read through the
:class:`~mlake_core.models.adapter.ModelAdapter`, so FT runs on both backends and every
supported architecture: ``g`` is the gradient at ``mlp_out``, carried back through the
post-norm on architectures that have one (Gemma 3;
:func:`~mlake_core.editing.projection.pull_back_grad`).  Restricted editing (``units``)
zeroes the keys of the neurons outside a set, so no gradient reaches their output weights.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch

from mlake_core.configs import coerce_fields
from mlake_core.editing.base import (
    EditContext,
    EditRequest,
    EditResult,
    down_proj,
    register_edit_method,
)
from mlake_core.editing.delta import kept_logits, nll, teacher_forced
from mlake_core.editing.layers import resolve_layer
from mlake_core.editing.projection import has_post_norm, projection_output, pull_back_grad
from mlake_core.errors import ConfigError


@dataclass(frozen=True)
class FtConfig:
    """Constrained fine-tuning of one MLP output projection.

    Attributes:
        layer: layer index or ``auto``.
        steps: Adam steps.
        lr: Adam learning rate.
        max_rel_norm: bound on ``||ΔW||_F / ||W||_F``.
        stop_loss: stop once the new answer's NLL (nats, per request) is below this.
        units: which MLP neurons' output weights may change (restricted editing, issue 7):
            ``all``; ``shared`` (the neurons a neuron-attribution run classed as shared: used
            by at least two languages); ``specific`` (those specific to the edit language); ``random``
            (a random set with the shared set's per-layer sizes, the control).  The sets come
            from :attr:`~mlake_core.editing.base.EditContext.unit_sets`; an empty set in the
            edited layer gives an edit that changes nothing (reported, not an error).
    """

    layer: int | str = "auto"
    steps: int = 40
    lr: float = 1e-3
    max_rel_norm: float = 0.05
    stop_loss: float = 0.05
    units: str = "all"

    def __post_init__(self) -> None:
        coerce_fields(self, skip=("layer",))
        if self.steps < 1 or self.lr <= 0 or self.max_rel_norm <= 0:
            raise ConfigError("ft: steps, lr and max_rel_norm must be positive")
        if self.units not in UNIT_CHOICES:
            raise ConfigError(f"ft units {self.units!r}: choose {', '.join(UNIT_CHOICES)}")


#: Values of :attr:`FtConfig.units`.
UNIT_CHOICES: tuple[str, ...] = ("all", "shared", "specific", "random")


def unit_mask(
    requests: Sequence[EditRequest], units: str, context: EditContext, layer: int, width: int
) -> torch.Tensor | None:
    """The ``[width]`` 0/1 mask of the neurons of ``layer`` an FT edit may change (None: all).

    Sets in ``context.unit_sets`` hold flat indices ``layer * width + neuron``, as neuron
    attribution writes them.

    Raises:
        ConfigError: restricted editing without unit sets, or ``specific`` for a batch that
            mixes edit languages.
    """
    if units == "all":
        return None
    name = units
    if units == "specific":
        langs = {r.lang for r in requests}
        if len(langs) != 1:
            raise ConfigError("ft units=specific: a batch must have one edit language")
        (name,) = langs
    if name not in context.unit_sets:
        raise ConfigError(
            f"ft units={units}: no {name!r} unit set; give a neuron-attribution run "
            "(mlake edit transfer --units-from RUN_DIR)"
        )
    mask = torch.zeros(width)
    for flat in context.unit_sets[name]:
        if int(flat) // width == layer:
            mask[int(flat) % width] = 1.0
    return mask


@register_edit_method("ft", FtConfig, batched=True)
def edit_ft(
    adapter: Any, requests: Sequence[EditRequest], config: FtConfig, context: EditContext
) -> EditResult:
    """FT (see the module docstring)."""
    layer = resolve_layer(adapter, config.layer)
    name, weight, out_in = down_proj(adapter, layer, "ft edit")
    original = weight.detach().clone()
    bound = config.max_rel_norm * float(original.norm())
    batch, targets = teacher_forced(adapter, requests)
    keep, kept = kept_logits(batch, targets)  # the prompt's logits are not needed
    cache = adapter.activations(batch, [f"mlp_post.{layer}"])
    raw_keys = cache[f"mlp_post.{layer}"]  # unaffected by this layer's projection
    keys = raw_keys.float()
    mask = unit_mask(requests, config.units, context, layer, keys.shape[-1])
    if mask is not None:
        keys = keys * mask.to(keys.device)  # no gradient reaches the other neurons' weights
    delta = torch.zeros_like(original, dtype=torch.float32, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=config.lr)
    loss = math.nan
    steps = 0
    try:
        for step in range(1, config.steps + 1):
            steps = step
            with torch.no_grad():
                weight.copy_(original + delta.detach().to(original.dtype))
            value, grads = adapter.gradients(
                batch,
                [f"mlp_out.{layer}"],
                lambda logits: nll(logits, kept),
                keep_last=keep,
            )
            loss = float(value)
            if loss < config.stop_loss:
                break
            g = grads[f"mlp_out.{layer}"].float()
            if has_post_norm(adapter):
                # d loss / d (W k) through the post-norm, at the current weight's outputs.
                g = pull_back_grad(adapter, layer, projection_output(adapter, layer, raw_keys), g)
            grad_w = torch.einsum("btd,btm->dm", g, keys)  # [out, in]
            delta.grad = (grad_w if out_in else grad_w.T).to(delta.device)
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                norm = float(delta.norm())
                if norm > bound:
                    delta.mul_(bound / norm)
    finally:
        with torch.no_grad():
            weight.copy_(original)
    return EditResult(
        method="ft",
        requests=tuple(requests),
        deltas={name: delta.detach().to(original.dtype)},
        loss=loss,
        info={
            "layer": layer,
            "steps": steps,
            "rel_norm": float(delta.detach().norm()) / float(original.norm()),
            "units": int(mask.sum()) if mask is not None else int(keys.shape[-1]),
            "config": asdict(config),
        },
    )
