"""MEMIT (Meng et al. 2023): one or many edits spread over several MLP layers.

For requests ``i = 1..n`` with subject-last tokens:

1. Optimise a vector ``δ_i`` added to the MLP output of the *last* edited layer at the
   subject's last token so the model gives the new answer (the same optimisation as ROME,
   :func:`~mlake_core.editing.delta.optimise_output_delta`, all requests in one batch).
   The target residual there is ``z_i = h_i + δ_i``.
2. For each edited layer ``l`` in order: read the keys ``k_i`` (``mlp_post.l``) and the
   current residual ``h_i`` after the last edited layer (earlier layers' updates already in
   place); the residual still missing, ``r_i = (z_i - h_i) / (layers left)``, is written into
   layer ``l``'s output projection by the least-squares update that keeps keys frequent in text
   untouched::

       ΔW_l = R K^T (λ C_l + K K^T)^{-1}

   with ``K = [k_i]``, ``R = [r_i]``, ``C_l = E[k k^T]`` from a text corpus
   (:mod:`~mlake_core.editing.covariance`) and ``λ = mom2_weight * d_mlp`` (``kᵀC⁻¹k`` is
   about ``d_mlp`` for a typical key, so ``mom2_weight`` means the same at every model
   width; MEMIT's published 15,000 for GPT-J and 20,000 for GPT-2 XL are 0.9 and 3.1 in
   these units).

On architectures with a post-norm after the projection (Gemma 3), ``δ_i`` is a change of
the last layer's projection output, optimised through the norm (so ``z_i`` is reachable),
and each layer's share ``r_i`` -- a change of the residual stream -- is pulled back through
that layer's norm to the change of its projection's output that makes it
(:func:`~mlake_core.editing.projection.pull_back_change`; least squares where the norm
cannot make all of it, reported per layer in ``info["post_norm_missed"]``).

Each ``k_i`` is the subject's key averaged, as in the reference code, over the fact's own
text alone and behind 5 prefixes of 10 tokens the model wrote (the mean of the two groups'
means; :mod:`~mlake_core.editing.contexts`; ``contexts: none`` reads it from the edit prompt).
The residual ``h_i`` is the edit prompt's.  Difference from the reference code, a documented
choice: the solve runs in float64 on the CPU.  The model is left unchanged; the result holds one delta per edited layer.
"""

from __future__ import annotations

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
    restore_weights,
)
from mlake_core.editing.contexts import context_keys, parse_contexts, prefixes_for
from mlake_core.editing.delta import (
    check_init,
    optimise_output_delta,
    subject_means,
    teacher_forced,
)
from mlake_core.editing.layers import resolve_layers
from mlake_core.editing.projection import (
    has_post_norm,
    output_change,
    projection_output,
    pull_back_change,
)
from mlake_core.errors import ConfigError


@dataclass(frozen=True)
class MemitConfig:
    """MEMIT.

    Attributes:
        layers: ``auto`` (:func:`~mlake_core.editing.layers.default_layers`), a range
            ``"a-b"`` or a list ``"a,b,c"``.
        steps: Adam steps of the ``δ`` optimisation.
        lr: its learning rate.
        clamp_norm: ``||δ||`` is kept below this multiple of the last layer's original MLP
            output at the subject token.
        weight_decay: L2 penalty on ``δ`` relative to that norm.
        mom2_weight: ``λ / d_mlp``, the weight of the key statistics against the edits.
        stop_loss: stop once the mean new-answer NLL (nats) is below this.
        init: where ``δ`` starts, as for ROME
            (:func:`~mlake_core.editing.delta.subject_means`): ``zero`` or
            ``subject-mean``.
        restarts: further attempts from random starts, as for ROME.
        contexts: the prefixes the keys are averaged behind, ``LENGTHxCOUNT`` pairs (the
            reference: 5 of 10 tokens), or ``none`` for the edit prompt's keys.
    """

    layers: str = "auto"
    steps: int = 40
    lr: float = 0.5
    clamp_norm: float = 4.0
    weight_decay: float = 1e-3
    mom2_weight: float = 1.0
    stop_loss: float = 0.05
    init: str = "zero"
    restarts: int = 0
    contexts: str = "10x5"

    def __post_init__(self) -> None:
        if not isinstance(self.layers, str):
            object.__setattr__(self, "layers", ",".join(str(int(x)) for x in self.layers))
        coerce_fields(self, skip=("layers",))
        parse_contexts(self.contexts, "memit.contexts")
        if self.steps < 1 or self.lr <= 0 or self.clamp_norm <= 0 or self.mom2_weight <= 0:
            raise ConfigError("memit: steps, lr, clamp_norm and mom2_weight must be positive")
        check_init(self.init, "memit")
        if self.restarts < 0:
            raise ConfigError(f"memit.restarts {self.restarts}: must be >= 0")


@register_edit_method("memit", MemitConfig, batched=True)
def edit_memit(
    adapter: Any, requests: Sequence[EditRequest], config: MemitConfig, context: EditContext
) -> EditResult:
    """MEMIT (see the module docstring); any number of requests at once."""
    if not requests:
        raise ConfigError("memit: no edit requests")
    if context.second_moment is None:
        raise ConfigError("memit needs key statistics (EditContext.second_moment)")
    layers = resolve_layers(adapter, config.layers)
    last = layers[-1]
    delta, base, loss, steps = optimise_output_delta(
        adapter,
        requests,
        f"mlp_out.{last}",
        steps=config.steps,
        lr=config.lr,
        clamp_norm=config.clamp_norm,
        weight_decay=config.weight_decay,
        stop_loss=config.stop_loss,
        start_from=subject_means(requests, last, config.init, context, "memit"),
        restarts=config.restarts,
        generator=context.generator,
    )
    lengths = parse_contexts(config.contexts, "memit.contexts")
    prefixes = prefixes_for(adapter, lengths, context)
    groups = [count for _, count in lengths]
    batch, _ = teacher_forced(adapter, requests)
    rows = torch.arange(len(requests))
    positions = torch.tensor([r.subject_last for r in requests])
    resid = f"resid_post.{last}"
    # The residual-stream change δ makes at the last layer (δ itself without a post-norm).
    shift = output_change(adapter, last, base, delta).double().cpu()
    target = torch.empty(0)  # set from the first layer's pass (no update applied yet)

    deltas: dict[str, torch.Tensor] = {}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    originals: dict[str, torch.Tensor] = {}
    residual_norms: list[float] = []
    missed_norms: list[float] = []
    try:
        for i, layer in enumerate(layers):
            key_site = f"mlp_post.{layer}"
            cache = adapter.activations(batch, [key_site, resid])
            raw_keys = cache[key_site][rows, positions]
            keys = raw_keys.double().cpu()  # [n, d_mlp]
            if prefixes is not None:  # the subject's key in general, this layer's inputs as edited
                keys = context_keys(adapter, requests, layer, prefixes, groups)
            current = cache[resid][rows, positions].double().cpu()  # [n, d_model]
            if i == 0:
                target = current + shift
            missing = (target - current) / (len(layers) - i)
            residual_norms.append(float((target - current).norm(dim=-1).mean()))
            if has_post_norm(adapter):
                # The change of the projection's output that makes this change of mlp_out.
                pulled, missed = pull_back_change(
                    adapter, layer, projection_output(adapter, layer, raw_keys), missing
                )
                missing = pulled.double().cpu()
                missed_norms.append(float(missed.double().mean()))
            moment = context.second_moment(layer).double()
            lam = config.mom2_weight * keys.shape[1]
            system = lam * moment + keys.T @ keys  # [d_mlp, d_mlp], symmetric
            solved = torch.linalg.solve(system, keys.T)  # [d_mlp, n]
            update = missing.T @ solved.T  # [d_model, d_mlp]
            name, weight, out_in = down_proj(adapter, layer, "memit edit")
            change = (update if out_in else update.T).to(dtype=weight.dtype, device=weight.device)
            originals[name] = weight.detach().clone()
            with torch.no_grad():
                weight.add_(change)
            deltas[name] = change
            factors[name] = (missing.T.float(), solved.T.float())  # rank <= len(requests)
        cache = adapter.activations(batch, [resid])
        final = cache[resid][rows, positions].double().cpu()
        residual_norms.append(float((target - final).norm(dim=-1).mean()))
    finally:
        restore_weights(adapter, originals)
    return EditResult(
        method="memit",
        requests=tuple(requests),
        deltas=deltas,
        factors=factors,
        loss=loss,
        info={
            "layers": list(layers),
            "steps": steps,
            "delta_norm_ratio": float(
                (delta.norm(dim=-1) / base.norm(dim=-1).clamp(min=1e-6)).mean()
            ),
            # Mean distance to the target residual before each layer's update and at the end.
            "residual_norms": residual_norms,
            # With a post-norm: per layer, the mean part of that layer's share of the
            # residual its projection cannot make (projection.pull_back_change); else empty.
            "post_norm_missed": missed_norms,
            "contexts": 1 + len(prefixes or ()),
            "config": asdict(config),
        },
    )
