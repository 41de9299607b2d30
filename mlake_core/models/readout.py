"""Log-probabilities of given tokens from final hidden states, without a full logits tensor.

What tracing, attribution and the knowledge scorer measure is the log-probability of one token
(the answer's) at a few positions:

    log p(y) = z_y - logsumexp_v z_v,     z = cap(W h + b)

where ``h`` is the final norm's output, ``W`` (``[vocab, d_model]``) and ``b`` the unembedding,
and ``cap`` the final logit soft-cap (``c * tanh(z / c)``, Gemma 2; identity when the model has
none).  Only ``z_y`` and the log-sum-exp are needed.  :func:`token_logprobs` computes the
log-sum-exp over the vocabulary in chunks of columns, so the logits of a batch over Gemma 3's
262,144 tokens are never materialised at once: at most :data:`READOUT_BYTES` of logits live at
a time.  With gradients on, each chunk is recomputed in the backward pass
(``torch.utils.checkpoint``) instead of kept, so a backward pass holds no full logits either.

The numbers equal ``log_softmax`` of the full logits up to float rounding (tested on every
architecture, both backends, the soft-cap, and vocabularies that are not a multiple of the
chunk).  :meth:`~mlake_core.models.adapter.BaseAdapter.readout_logprobs` applies the model's
final norm and calls this with its unembedding.
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

#: The most bytes of float32 logits held at once by :func:`token_logprobs` (one chunk of the
#: vocabulary for every row); the chunk width follows from it and the number of rows.
READOUT_BYTES: int = 64 << 20

#: The narrowest chunk (columns), so that a large batch still runs few, efficient matmuls.
MIN_CHUNK: int = 1024


def vocab_chunk(n_rows: int, d_vocab: int, budget: int = READOUT_BYTES) -> int:
    """Columns of the vocabulary per chunk for ``n_rows`` rows: as many float32 logits as fit
    in ``budget`` bytes, at least :data:`MIN_CHUNK` (or the whole vocabulary when smaller)."""
    width = max(MIN_CHUNK, budget // (4 * max(1, n_rows)))
    return int(min(d_vocab, width))


def _capped(z: Tensor, softcap: float | None) -> Tensor:
    return softcap * torch.tanh(z / softcap) if softcap else z


def _chunk(
    h: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    softcap: float | None,
    local: Tensor,
) -> tuple[Tensor, Tensor]:
    """One chunk of columns: the log-sum-exp over them ``[n]`` (float32), and each row's
    measured logit where its token is in the chunk (``local`` is the token's column in the
    chunk, out of range elsewhere), 0 elsewhere -- read from the same logits, so the two agree
    to the bit with what the full unembedding gives."""
    z = _capped(torch.nn.functional.linear(h, weight, bias).float(), softcap)
    inside = (local >= 0) & (local < z.shape[-1])
    picked = z.gather(-1, local.clamp(0, z.shape[-1] - 1)[:, None])[:, 0]
    return torch.logsumexp(z, dim=-1), torch.where(inside, picked, torch.zeros_like(picked))


def token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    tokens: Tensor,
    *,
    bias: Tensor | None = None,
    softcap: float | None = None,
    chunk: int | None = None,
) -> Tensor:
    """``log_softmax(cap(hidden @ weight.T + bias))[..., tokens]``, float32, computed a chunk
    of the vocabulary at a time.

    Args:
        hidden: final-norm outputs ``[..., d_model]``.
        weight: the unembedding ``[vocab, d_model]``.
        tokens: the token measured at each row, integer ``[...]`` (the shape of ``hidden``
            without its last dimension, or broadcastable to it).
        bias: the unembedding's bias ``[vocab]``, if it has one.
        softcap: the final logit soft-cap ``c`` (``None`` or 0: none).
        chunk: columns per chunk (default :func:`vocab_chunk` of the number of rows).

    Returns:
        ``[...]`` log-probabilities, differentiable with respect to ``hidden`` (and the
        weights) when gradients are enabled.
    """
    if weight.ndim != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"unembedding of shape {tuple(weight.shape)} does not map width {hidden.shape[-1]}"
        )
    lead = hidden.shape[:-1]
    h = hidden.reshape(-1, hidden.shape[-1]).to(weight.dtype)
    ids = torch.as_tensor(tokens, device=h.device).long().expand(lead).reshape(-1)
    vocab = weight.shape[0]
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise IndexError(f"token id outside the vocabulary of {vocab}")
    width = chunk or vocab_chunk(h.shape[0], vocab)
    if width < 1:
        raise ValueError(f"chunk of {width} columns: must be at least 1")
    grad = torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad)
    parts, picked = [], torch.zeros(h.shape[0], device=h.device)
    for lo in range(0, vocab, width):
        w = weight[lo : lo + width]
        b = bias[lo : lo + width] if bias is not None else None
        if grad:  # recompute the chunk's logits in the backward pass instead of keeping them
            lse, mine = checkpoint(_chunk, h, w, b, softcap, ids - lo, use_reentrant=False)
        else:
            lse, mine = _chunk(h, w, b, softcap, ids - lo)
        parts.append(lse)
        picked = picked + mine
    lse = torch.logsumexp(torch.stack(parts, dim=-1), dim=-1)
    return (picked - lse).reshape(lead)
