"""ROME (Meng et al. 2022): a rank-one update of one layer's MLP output projection at the
subject's last token.

``k*`` is the subject's key (``mlp_post`` at its last token) averaged, as in the reference
code, over the fact's own text alone and behind 20 short prefixes the model wrote
(:mod:`~mlake_core.editing.contexts`; ``contexts: none`` reads it from the edit prompt only).
``v* = W k + δ`` (``k``: the key in the edit prompt) adds an optimised vector ``δ`` to
the projection's output at that position so the model gives the new answer (norm-clamped
relative to the original output; :func:`~mlake_core.editing.delta.optimise_output_delta`,
shared with MEMIT, with its ``init`` and ``restarts``).  On most architectures that output is
``mlp_out``; where a post-norm follows the projection (Gemma 3), ``mlp_out`` is the norm of
it and ``δ`` is optimised through the norm, so the edited model's ``mlp_out`` is exactly the
one the optimisation scored.  The update ``ΔW = δ u^T / (u^T k)`` with
``u = (C + λI)^{-1} k*`` maps the edit prompt's key ``k`` to ``v*`` exactly while disturbing
keys that are frequent in text (``C = E[k k^T]``, :mod:`~mlake_core.editing.covariance`)
least.  One fact at a time
(MEMIT batches); the model is left unchanged.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from mlake_core.configs import coerce_fields
from mlake_core.editing.base import (
    EditContext,
    EditRequest,
    EditResult,
    down_proj,
    register_edit_method,
)
from mlake_core.editing.contexts import context_keys, parse_contexts, prefixes_for
from mlake_core.editing.covariance import ridge_inverse_apply
from mlake_core.editing.delta import (
    check_init,
    optimise_output_delta,
    subject_means,
)
from mlake_core.editing.layers import check_not_last, resolve_layer
from mlake_core.errors import ConfigError


@dataclass(frozen=True)
class RomeConfig:
    """Rank-one model editing.

    Attributes:
        layer: layer index or ``auto``.
        steps: Adam steps of the ``δ`` optimisation.
        lr: its learning rate.
        clamp_norm: ``||δ||`` is kept below ``clamp_norm`` times the norm of the original MLP
            output at the subject's last token.
        weight_decay: L2 penalty on ``δ`` relative to that norm.
        ridge: relative ridge of the ``C`` solve.
        stop_loss: stop once the new answer's NLL (nats) is below this.
        init: where ``δ`` starts (:data:`~mlake_core.editing.delta.DELTA_INITS`): ``zero``
            or ``subject-mean``.
        restarts: further attempts from random starts when one ends with the new answer's
            NLL above :data:`~mlake_core.editing.delta.RESTART_NLL`
            (:func:`~mlake_core.editing.delta.optimise_output_delta`).
        contexts: the prefixes ``k*`` is averaged behind, ``LENGTHxCOUNT`` pairs (the
            reference's ``context_template_length_params``: 10 of 5 tokens, 10 of 10), or
            ``none`` for the edit prompt's key (:mod:`~mlake_core.editing.contexts`).
    """

    layer: int | str = "auto"
    steps: int = 40
    lr: float = 0.5
    clamp_norm: float = 4.0
    weight_decay: float = 1e-3
    ridge: float = 0.01
    stop_loss: float = 0.05
    init: str = "zero"
    restarts: int = 0
    contexts: str = "5x10,10x10"

    def __post_init__(self) -> None:
        coerce_fields(self, skip=("layer",))
        parse_contexts(self.contexts, "rome.contexts")
        if self.steps < 1 or self.lr <= 0 or self.clamp_norm <= 0 or self.ridge < 0:
            raise ConfigError("rome: steps, lr, clamp_norm must be positive and ridge >= 0")
        if self.restarts < 0:
            raise ConfigError(f"rome.restarts {self.restarts}: must be >= 0")
        check_init(self.init, "rome")


@register_edit_method("rome", RomeConfig)
def edit_rome(
    adapter: Any, requests: Sequence[EditRequest], config: RomeConfig, context: EditContext
) -> EditResult:
    """ROME (see the module docstring).  One request at a time (MEMIT batches)."""
    if len(requests) != 1:
        raise ConfigError("rome edits one fact at a time; use memit for batched edits")
    if context.second_moment is None:
        raise ConfigError("rome needs key statistics (EditContext.second_moment)")
    layer = check_not_last(adapter, resolve_layer(adapter, config.layer), "rome")
    name, weight, out_in = down_proj(adapter, layer, "rome edit")
    k_here = context_keys(adapter, requests, layer, None)[0]
    prefixes = prefixes_for(adapter, parse_contexts(config.contexts, "rome.contexts"), context)
    k_star = k_here if prefixes is None else context_keys(adapter, requests, layer, prefixes)[0]
    delta, base, loss, steps = optimise_output_delta(
        adapter,
        requests,
        f"mlp_out.{layer}",
        steps=config.steps,
        lr=config.lr,
        clamp_norm=config.clamp_norm,
        weight_decay=config.weight_decay,
        stop_loss=config.stop_loss,
        start_from=subject_means(requests, layer, config.init, context, "rome"),
        restarts=config.restarts,
        generator=context.generator,
    )
    u = ridge_inverse_apply(context.second_moment(layer), k_star, config.ridge)
    left = (delta[0].double().cpu() / float(u @ k_here))[:, None]  # [out, 1]
    update = left @ u[None, :]  # [out, in]
    if not out_in:
        update = update.T
    return EditResult(
        method="rome",
        requests=tuple(requests),
        deltas={name: update.to(dtype=weight.dtype, device=weight.device)},
        factors={name: (left.float(), u[None, :].float())},  # rank one, as the map acts
        loss=loss,
        info={
            "layer": layer,
            "steps": steps,
            "delta_norm_ratio": float(delta[0].norm() / base[0].norm().clamp(min=1e-6)),
            "contexts": 1 + len(prefixes or ()),
            "config": asdict(config),
        },
    )
