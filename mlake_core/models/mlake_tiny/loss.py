"""The training loss of a batch of mlake-tiny examples, and the measurement of which units are
learned (the stopping criterion)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mlake_core.models.mlake_tiny.corpus import Corpus, Example
from mlake_core.models.mlake_tiny.hooks import _route_masks, _swapped


def _pad(batch: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, ...]:
    """Right-pad a batch: ids, attention mask, targets and weights for next-token loss."""
    width = max(len(ex.ids) for ex in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    weights = torch.zeros((len(batch), width), dtype=torch.float32)
    for row, ex in enumerate(batch):
        ids[row, : len(ex.ids)] = torch.as_tensor(ex.ids)
        mask[row, : len(ex.ids)] = 1
        weights[row, : len(ex.ids)] = torch.as_tensor(ex.weights)
    return ids, mask, weights


def _batch_loss(
    model: Any,
    batch: Sequence[Example],
    pad_id: int,
    *,
    lens_layer: int = -1,
    lens_weight: float = 0.0,
    route_layer: int = 0,
    corpus: Corpus | None = None,
    interchange_site: str = "resid",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted next-token loss of a batch, and per row whether every weighted token is the
    argmax (exact teacher-forced answer).

    The unembedding runs only at positions that carry loss, which is most of the saving of
    answer-only training.  With ``lens_layer >= 0`` and a positive ``lens_weight``, the
    examples' logit-lens targets (:attr:`Example.lens`) add ``lens_weight`` times their mean
    cross-entropy, read after block ``lens_layer`` through the final norm and unembedding.
    Examples marked :attr:`Example.masked` get subject-route masking with ``route_layer``
    (:attr:`TinyTrainConfig.route_masking`); interchange examples (:attr:`Example.swap`) get
    their source's residual after block ``route_layer - 1``, computed from ``corpus``.
    """
    ids, mask, weights = _pad(batch, pad_id)
    lens = [(row, pos, tok) for row, ex in enumerate(batch) for pos, tok in ex.lens]
    use_lens = lens_layer >= 0 and lens_weight > 0 and bool(lens)
    routes = [(row, ex.route) for row, ex in enumerate(batch) if ex.masked and ex.route]
    swaps = [(row, ex.swap) for row, ex in enumerate(batch) if ex.swap]
    # The sources run first, with plain attention, before the masks are installed.
    swapped = _swapped(model, swaps, corpus, pad_id, route_layer - 1, interchange_site)
    with swapped, _route_masks(model, mask, routes, route_layer):
        out = model.model(input_ids=ids, attention_mask=mask, output_hidden_states=use_lens)
    hidden = out.last_hidden_state
    # Position i predicts token i + 1.
    w = weights[:, 1:]
    rows, cols = torch.nonzero(w > 0, as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])
    targets = ids[rows, cols + 1]
    losses = torch.nn.functional.cross_entropy(logits.float(), targets, reduction="none")
    loss = (losses * w[rows, cols]).sum() / w.sum().clamp(min=1.0)
    if use_lens:
        # hidden_states[0] is the embedding output, [L + 1] the residual after block L.
        mid = out.hidden_states[lens_layer + 1]
        l_rows, l_pos, l_tok = (torch.tensor(v) for v in zip(*lens, strict=True))
        l_logits = model.lm_head(model.model.norm(mid[l_rows, l_pos]))
        loss = loss + lens_weight * torch.nn.functional.cross_entropy(l_logits.float(), l_tok)
    correct = (logits.argmax(-1) == targets).float()
    wrong_per_row = torch.zeros(len(batch)).index_add_(0, rows, 1.0 - correct)
    return loss, wrong_per_row == 0


@torch.no_grad()
def measure_learned(model: Any, corpus: Corpus, pad_id: int, batch_size: int = 128) -> list[bool]:
    """For every unit, whether its question is answered exactly (teacher-forced argmax of
    every answer token and EOS), which is what greedy decoding produces."""
    model.eval()
    status = [False] * len(corpus.units)
    ordered = sorted(corpus.qa, key=lambda ex: len(ex.ids))
    for start in range(0, len(ordered), batch_size):
        chunk = ordered[start : start + batch_size]
        _, exact = _batch_loss(model, chunk, pad_id)
        for ex, ok in zip(chunk, exact.tolist(), strict=True):
            status[ex.unit] = bool(ok)
    model.train()
    return status


def per_language(corpus: Corpus, status: Sequence[bool]) -> dict[str, float]:
    """Fraction of learned units per language."""
    totals: dict[str, list[int]] = {}
    for (_, lang), ok in zip(corpus.units, status, strict=True):
        totals.setdefault(lang, []).append(int(ok))
    return {lang: sum(v) / len(v) for lang, v in totals.items()}
