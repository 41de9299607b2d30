"""The ``δ`` optimisation ROME and MEMIT share: find vectors that, added to one layer's MLP
output at each request's subject last token, make the model give the new answers.  ``δ`` is
a change of the MLP output projection's output, which is the MLP output except on
architectures with a post-norm (Gemma 3), where it is optimised through that norm
(:mod:`~mlake_core.editing.projection`), so a weight edit writes it exactly.

``δ`` starts at zero (``init: zero``, as in ROME) or where the residual stream at the
subject's last token becomes the mean over the run's subjects (``init: subject-mean``,
:func:`subject_means`), and an attempt that fails may be retried from random starts
(``restarts``): in a model that reads the subject's last token through attention that opens
only for subject-like states, the gradient at ``δ = 0`` can vanish (a plateau;
mlake-tiny-editable is such a model).  The loss is the new answer's teacher-forced NLL
(:func:`teacher_forced`, :func:`nll`), also what FT minimises.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from mlake_core.editing.base import EditContext, EditRequest
from mlake_core.editing.projection import (
    has_post_norm,
    projection_output,
    pull_back_change,
    pull_back_grad,
)
from mlake_core.errors import ConfigError
from mlake_core.models.adapter import PastKeyValues, Patch, TokenBatch


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


def kept_logits(
    batch: TokenBatch, targets: Sequence[Sequence[tuple[int, int]]]
) -> tuple[int, list[list[tuple[int, int]]]]:
    """How many last positions' logits a teacher-forced loss needs (``keep_last`` of
    :meth:`~mlake_core.models.adapter.ModelAdapter.gradients`), and the targets' positions
    re-indexed into those logits: from the first position that predicts a target token on.
    The unembedding of the prompt before it (a few-shot prompt's demonstrations) is skipped,
    forward and backward.  Rows of unequal length (right padding) keep every position
    (``0``, targets unchanged)."""
    lengths = batch.lengths.tolist()
    if len(set(lengths)) != 1 or lengths[0] != batch.shape[1]:
        return 0, [list(row) for row in targets]
    first = min(p for row in targets for p, _ in row)
    return batch.shape[1] - first, [[(p - first, t) for p, t in row] for row in targets]


def nll(logits: torch.Tensor, targets: Sequence[Sequence[tuple[int, int]]]) -> torch.Tensor:
    """Mean over rows of the summed negative log-likelihood of the target tokens (nats)."""
    rows = [r for r, row in enumerate(targets) for _ in row]
    pos = [p for row in targets for p, _ in row]
    tok = [t for row in targets for _, t in row]
    logp = logits[rows, pos].float().log_softmax(-1)
    picked = logp[torch.arange(len(tok)), torch.tensor(tok, device=logp.device)]
    return -picked.sum() / len(targets)


#: Where ``δ`` starts: at zero, or where the residual becomes the run's subject mean.
DELTA_INITS: tuple[str, ...] = ("zero", "subject-mean")

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


@dataclass(frozen=True)
class _Continued:
    """The part of a teacher-forced batch that a ``δ`` step runs (see :func:`_continued`)."""

    batch: TokenBatch
    past: PastKeyValues | None
    start: int
    targets: list[list[tuple[int, int]]]
    keep_last: int


def _continued(
    adapter: Any, batch: TokenBatch, targets: Sequence[Sequence[tuple[int, int]]], start: int
) -> _Continued:
    """Split a teacher-forced batch at ``start`` (the first subject last token): ``δ`` is added
    there, so every state before it is the same at every step.  Those tokens (a few-shot
    prompt's demonstrations, the question's start) run once, and each step continues their
    keys and values with the rest (:meth:`~mlake_core.models.adapter.ModelAdapter.gradients`
    with ``past``), computing only the logits the loss reads (:func:`kept_logits`).  The
    numbers are those of whole-batch steps up to float rounding.  A model whose cache cannot be
    continued runs the whole batch each step."""
    past = None
    if start >= 1:
        try:
            _, past = adapter.run_with_past(
                adapter.batch([seq[:start] for seq in batch.sequences()]), last_only=True
            )
        except NotImplementedError:
            past = None
    if past is None:
        keep, kept = kept_logits(batch, targets)
        return _Continued(batch, None, 0, kept, keep)
    rest = adapter.batch([seq[start:] for seq in batch.sequences()], padding_side="right")
    keep, kept = kept_logits(rest, [[(p - start, t) for p, t in row] for row in targets])
    return _Continued(rest, past, start, kept, keep)


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
    """Find per-request vectors ``δ_i`` that, added to the output of layer ``L``'s MLP
    output projection at each request's subject last token, make the model give the new
    answers (shared by ROME and MEMIT); ``site`` is ``mlp_out.{L}``.

    ``δ`` lives where a weight edit can write it exactly: at the projection's output ``y``
    (:mod:`~mlake_core.editing.projection`).  Each step patches ``mlp_out.{L}`` with
    ``N(y + δ)`` (``N``: the architecture's post-norm, the identity on most, where ``y`` *is*
    ``mlp_out.{L}``) and differentiates through ``N``.

    ``δ`` starts at zero, or, with ``start_from`` (``[n, d_model]``, see
    :func:`subject_means`), where the residual stream after the block becomes ``start_from``
    (``δ_0 = start_from - h``, pulled back through ``N``:
    :func:`~mlake_core.editing.projection.pull_back_change`), clamped like every step.  When
    an attempt ends with the mean NLL above :data:`RESTART_NLL` and ``restarts`` remain, the
    next attempt starts from the first start plus random vectors as long as the residual
    stream ``h`` (drawn from ``generator``; pulled back through ``N`` too); the attempt with
    the lowest NLL is returned.

    Returns:
        ``(δ [n, width], the projection's original output there [n, width], its NLL, steps
        over all attempts)``; ``||δ||`` is at most ``clamp_norm`` times that output's norm.
    """
    batch, targets = teacher_forced(adapter, requests)
    rows, positions = torch.arange(len(requests)), torch.tensor([r.subject_last for r in requests])
    layer = int(site.rsplit(".", 1)[1])
    resid = f"resid_post.{layer}"
    key_site = f"mlp_post.{layer}"
    cache = adapter.activations(
        batch, [site, resid, key_site] if has_post_norm(adapter) else [site, resid]
    )
    base = cache[site][rows, positions].float()
    if has_post_norm(adapter):
        base = projection_output(adapter, layer, cache[key_site][rows, positions]).float()
    here = cache[resid][rows, positions].float()
    limit = clamp_norm * base.norm(dim=-1, keepdim=True).clamp(min=1e-6)

    def clamped(d: torch.Tensor) -> torch.Tensor:
        norms = d.norm(dim=-1, keepdim=True)
        return d * torch.where(norms > limit, limit / norms, torch.ones_like(norms))

    run = _continued(adapter, batch, targets, int(positions.min()))

    def loss_and_grad(d: torch.Tensor) -> tuple[float, torch.Tensor]:
        moved = base + d
        if has_post_norm(adapter):
            with torch.no_grad():
                value_at_site = adapter.sublayer_output("mlp", layer, moved)
        else:
            value_at_site = moved
        patch = Patch(site, rows, positions - run.start, value_at_site)
        value, grads = adapter.gradients(
            run.batch,
            [site],
            lambda logits: nll(logits, run.targets) * len(run.targets),
            patches=[patch],
            keep_last=run.keep_last,
            past=run.past,
        )
        g = grads[site][rows, positions - run.start].float()
        return float(value) / len(targets), pull_back_grad(adapter, layer, moved, g)

    first = torch.zeros_like(base)
    if start_from is not None:
        wanted = start_from.detach().to(base).reshape(base.shape) - here
        first = clamped(pull_back_change(adapter, layer, base, wanted)[0])
    best: tuple[float, torch.Tensor] = (math.inf, first)
    done = 0
    for attempt in range(restarts + 1):
        start = first
        if attempt:
            noise = torch.randn(base.shape, generator=generator).to(base)
            noise = noise / noise.norm(dim=-1, keepdim=True) * here.norm(dim=-1, keepdim=True)
            start = clamped(first + pull_back_change(adapter, layer, base + first, noise)[0])
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
