"""The built-in editing methods: FT, ROME, IKE (MEMIT in :mod:`mlake_core.editing.memit`).

Every method works through the :class:`~mlake_core.models.adapter.ModelAdapter` alone
(activations, patches, gradients with respect to activations), so it runs on both backends
and every supported architecture; weights are reached through
:meth:`~mlake_core.models.adapter.BaseAdapter.mlp_down`.  All return an
:class:`~mlake_core.editing.base.EditResult` and leave the model unchanged.

* **FT** (constrained fine-tuning, Zhu et al. 2020; the FT-L baseline of Meng et al. 2022):
  Adam on the MLP output projection of one layer to maximise the new answer's likelihood
  after the edit prompt, with the weight change kept inside a Frobenius-norm ball
  (``max_rel_norm * ||W||``).  The gradient of a linear map is ``sum_t g_t k_t^T`` with
  ``g = d loss / d mlp_out`` and ``k = mlp_post``, both read through the adapter.
* **ROME** (Meng et al. 2022): a rank-one update of one layer's MLP output projection at the
  subject's last token.  ``k*`` is the key (``mlp_post``) there; ``v*`` adds an optimised
  vector ``δ`` to ``mlp_out`` at that position so the model gives the new answer (norm-clamped
  relative to the original output); the update ``ΔW = δ u^T / (u^T k*)`` with
  ``u = (C + λI)^{-1} k*`` maps ``k*`` to ``v*`` exactly while disturbing keys that are
  frequent in text (``C = E[k k^T]``) least.  ``δ`` starts at zero (``init: zero``, as in
  ROME) or where the residual stream at the subject's last token becomes the mean over the
  run's subjects (``init: subject-mean``, :func:`subject_means`), and an attempt that fails
  may be retried from random starts (``restarts``): in a model that reads the subject's last
  token through attention that opens only for subject-like states, the gradient at ``δ = 0``
  can vanish (a plateau; mlake-tiny-editable is such a model).
* **IKE** (Zheng et al. 2023): no weight change; the new fact and demonstrations of other
  edits are put before every prompt.  The ceiling weight edits are compared with.
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
    check_layer,
    check_not_last,
    default_layer,
    down_proj_name,
    register_edit_method,
)
from mlake_core.editing.covariance import ridge_inverse_apply
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import Patch, TokenBatch


def resolve_layer(adapter: Any, layer: int | str) -> int:
    """``auto`` (the documented default, :func:`~mlake_core.editing.base.default_layer`) or
    an explicit index."""
    if layer == "auto":
        return default_layer(adapter)
    try:
        value = int(layer)
    except (TypeError, ValueError):
        raise ConfigError(f"--layer {layer!r}: expected a layer index or 'auto'") from None
    return check_layer(adapter, value)


def teacher_forced(
    adapter: Any, requests: Sequence[EditRequest]
) -> tuple[TokenBatch, list[list[tuple[int, int]]]]:
    """Batch of ``prompt + new target`` sequences (right padded) and, per row, the
    ``(position, token)`` pairs whose log-probability the edit raises."""
    seqs = [[*r.prompt_ids, *r.target_new_ids] for r in requests]
    batch = adapter.batch(seqs, padding_side="right")
    targets = [
        [(len(r.prompt_ids) - 1 + k, t) for k, t in enumerate(r.target_new_ids)] for r in requests
    ]
    return batch, targets


def nll(logits: torch.Tensor, targets: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
    """Mean over rows of the summed negative log-likelihood of the target tokens (nats)."""
    rows = [r for r, row in enumerate(targets) for _ in row]
    pos = [p for row in targets for p, _ in row]
    tok = [t for row in targets for _, t in row]
    logp = logits[rows, pos].float().log_softmax(-1)
    picked = logp[torch.arange(len(tok)), torch.tensor(tok, device=logp.device)]
    return -picked.sum() / len(targets)


def _config_dict(config: Any) -> dict[str, Any]:
    return asdict(config)


# -- FT ---------------------------------------------------------------------------------------


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
    weight, out_in = adapter.mlp_down(layer)
    original = weight.detach().clone()
    bound = config.max_rel_norm * float(original.norm())
    batch, targets = teacher_forced(adapter, requests)
    _, cache = adapter.run_with_cache(batch, [f"mlp_post.{layer}"])
    keys = cache[f"mlp_post.{layer}"].float()  # unaffected by this layer's projection
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
                batch, [f"mlp_out.{layer}"], lambda logits: nll(logits, targets)
            )
            loss = float(value)
            if loss < config.stop_loss:
                break
            g = grads[f"mlp_out.{layer}"].float()
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
        deltas={down_proj_name(adapter, layer): delta.detach().to(original.dtype)},
        loss=loss,
        info={
            "layer": layer,
            "steps": steps,
            "rel_norm": float(delta.detach().norm()) / float(original.norm()),
            "units": int(mask.sum()) if mask is not None else int(keys.shape[-1]),
            "config": _config_dict(config),
        },
    )


# -- ROME -------------------------------------------------------------------------------------


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
        init: where ``δ`` starts (:data:`DELTA_INITS`): ``zero`` or ``subject-mean``.
        restarts: further attempts from random starts when one ends with the new answer's
            NLL above :data:`RESTART_NLL` (:func:`optimise_output_delta`).
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

    def __post_init__(self) -> None:
        coerce_fields(self, skip=("layer",))
        if self.steps < 1 or self.lr <= 0 or self.clamp_norm <= 0 or self.ridge < 0:
            raise ConfigError("rome: steps, lr, clamp_norm must be positive and ridge >= 0")
        if self.restarts < 0:
            raise ConfigError(f"rome.restarts {self.restarts}: must be >= 0")
        check_init(self.init, "rome")


DELTA_INITS = ("zero", "subject-mean")

RESTART_NLL = 1.0
"""An attempt of the ``δ`` optimisation that ends with the new answer's NLL above this (nats;
probability below ``1/e``) is retried from another start when ``restarts`` allows."""


def check_init(init: str, method: str) -> None:
    """Raise :class:`ConfigError` naming ``{method}.init`` unless ``init`` is known."""
    if init not in DELTA_INITS:
        raise ConfigError(f"{method}.init {init!r}: choose one of {', '.join(DELTA_INITS)}")


def subject_means(
    requests: Sequence[EditRequest],
    layer: int,
    init: str,
    context: EditContext,
    method: str,
) -> torch.Tensor | None:
    """The residual each request's ``δ`` optimisation starts from: ``None`` for ``init:
    zero``; for ``subject-mean``, the mean of ``resid_post.{layer}`` at the subject's last
    token over the run's subjects in the request's language (:attr:`EditContext.subject_mean`,
    ``[n, d_model]``).

    Raises:
        ConfigError: an unknown ``init``; ``subject-mean`` without ``context.subject_mean``.
    """
    check_init(init, method)
    if init == "zero":
        return None
    if context.subject_mean is None:
        raise ConfigError(
            f"{method}.init subject-mean needs the run's subject statistics "
            "(EditContext.subject_mean; mlake edit transfer provides them)"
        )
    return torch.stack([context.subject_mean(layer, r.lang).float() for r in requests])


def optimise_output_delta(
    adapter: Any,
    requests: Sequence[EditRequest],
    site: str,
    *,
    steps: int,
    lr: float,
    clamp_norm: float,
    weight_decay: float,
    stop_loss: float,
    start_from: torch.Tensor | None = None,
    restarts: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float, int]:
    """Find per-request vectors ``δ_i`` that, added to ``site`` (``mlp_out.{layer}``) at each
    request's subject last token, make the model give the new answers (shared by ROME and
    MEMIT).

    ``δ`` starts at zero, or, with ``start_from`` (``[n, d_model]``, see
    :func:`subject_means`), where the residual stream after the block becomes ``start_from``
    (``δ_0 = start_from - h``), clamped like every step.  When an attempt ends with the mean
    NLL above :data:`RESTART_NLL` and ``restarts`` remain, the next attempt starts from the
    first start plus random vectors as long as the residual stream ``h`` (drawn from
    ``generator``); the attempt with the lowest NLL is returned.

    Returns:
        ``(δ [n, width], original activation there [n, width], its NLL, steps over all
        attempts)``.
    """
    batch, targets = teacher_forced(adapter, requests)
    rows, positions = torch.arange(len(requests)), torch.tensor([r.subject_last for r in requests])
    resid = "resid_post." + site.rsplit(".", 1)[1]
    _, cache = adapter.run_with_cache(batch, [site, resid])
    base = cache[site][rows, positions].float()
    here = cache[resid][rows, positions].float()
    limit = clamp_norm * base.norm(dim=-1, keepdim=True).clamp(min=1e-6)

    def clamped(d: torch.Tensor) -> torch.Tensor:
        norms = d.norm(dim=-1, keepdim=True)
        return d * torch.where(norms > limit, limit / norms, torch.ones_like(norms))

    def loss_and_grad(d: torch.Tensor) -> tuple[float, torch.Tensor]:
        patch = Patch(site, rows, positions, base + d)
        value, grads = adapter.gradients(
            batch, [site], lambda logits: nll(logits, targets) * len(targets), patches=[patch]
        )
        return float(value) / len(targets), grads[site][rows, positions].float()

    first = torch.zeros_like(base)
    if start_from is not None:
        first = clamped(start_from.detach().to(base).reshape(base.shape) - here)
    best: tuple[float, torch.Tensor] = (math.inf, first)
    done = 0
    for attempt in range(restarts + 1):
        start = first
        if attempt:
            noise = torch.randn(base.shape, generator=generator).to(base)
            start = clamped(
                first + noise / noise.norm(dim=-1, keepdim=True) * here.norm(dim=-1, keepdim=True)
            )
        delta = start.clone().requires_grad_(True)
        opt = torch.optim.Adam([delta], lr=lr)
        for step in range(steps + 1):  # the last pass only measures the final δ
            loss, g = loss_and_grad(delta.detach())
            if loss < best[0]:
                best = (loss, delta.detach().clone())
            if loss < stop_loss or step == steps:
                break
            done += 1
            delta.grad = g + weight_decay * delta.detach() / limit
            opt.step()
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                delta.copy_(clamped(delta))
        if best[0] <= RESTART_NLL:
            break
    return best[1], base, best[0], done


@register_edit_method("rome", RomeConfig)
def edit_rome(
    adapter: Any, requests: Sequence[EditRequest], config: RomeConfig, context: EditContext
) -> EditResult:
    """ROME (see the module docstring).  One request at a time (MEMIT batches)."""
    if len(requests) != 1:
        raise ConfigError("rome edits one fact at a time; use memit for batched edits")
    if context.second_moment is None:
        raise ConfigError("rome needs key statistics (EditContext.second_moment)")
    (request,) = requests
    layer = check_not_last(adapter, resolve_layer(adapter, config.layer), "rome")
    weight, out_in = adapter.mlp_down(layer)
    batch, _ = teacher_forced(adapter, requests)
    _, cache = adapter.run_with_cache(batch, [f"mlp_post.{layer}"])
    k_star = cache[f"mlp_post.{layer}"][0, request.subject_last].double().cpu()
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
    update = torch.outer(delta[0].double().cpu(), u) / float(u @ k_star)  # [out, in]
    if not out_in:
        update = update.T
    return EditResult(
        method="rome",
        requests=tuple(requests),
        deltas={
            down_proj_name(adapter, layer): update.to(dtype=weight.dtype, device=weight.device)
        },
        loss=loss,
        info={
            "layer": layer,
            "steps": steps,
            "delta_norm_ratio": float(delta[0].norm() / base[0].norm().clamp(min=1e-6)),
            "config": _config_dict(config),
        },
    )


# -- IKE --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IkeConfig:
    """In-context editing.

    Attributes:
        n_demonstrations: example edits (other facts, same language) before the new fact.
    """

    n_demonstrations: int = 4

    def __post_init__(self) -> None:
        coerce_fields(self)
        if self.n_demonstrations < 0:
            raise ConfigError("ike: n_demonstrations must be >= 0")


@register_edit_method("ike", IkeConfig)
def edit_ike(
    adapter: Any, requests: Sequence[EditRequest], config: IkeConfig, context: EditContext
) -> EditResult:
    """IKE: a prompt prefix with demonstrations and the new fact; no weights change."""
    if len(requests) != 1:
        raise ConfigError("ike edits one fact at a time")
    (request,) = requests
    demos = [
        d for d in context.demonstrations.get(request.lang, []) if d[0] != request.statement_new
    ]
    if len(demos) < config.n_demonstrations:
        raise ConfigError(
            f"ike: {config.n_demonstrations} demonstrations wanted, {len(demos)} available in "
            f"{request.lang}"
        )
    picks = torch.randperm(len(demos), generator=context.generator)[: config.n_demonstrations]
    parts = [
        f"New fact: {demos[i][0]}\nQ: {demos[i][1]}\nA: {demos[i][2]}\n\n" for i in picks.tolist()
    ]
    prefix = "".join(parts) + f"New fact: {request.statement_new}\n"
    return EditResult(
        method="ike",
        requests=tuple(requests),
        prefix=prefix,
        info={"n_demonstrations": len(parts), "config": _config_dict(config)},
    )
