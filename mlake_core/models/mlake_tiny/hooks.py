"""The forward hooks of training: subject-route masking and interchange swaps.

Both change a forward pass of the Llama model only inside a context manager that removes its
hooks on exit; inference and every measurement use the plain model.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from mlake_core.models.mlake_tiny.corpus import Corpus


def route_masks(
    mask: torch.Tensor, routes: Sequence[tuple[int, tuple[int, int]]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The two boolean attention masks ``[batch, 1, query, key]`` (True: may attend) of
    subject-route masking, early blocks first: causal attention over the non-padding tokens,
    minus, for each ``(row, (first, last))``, attention from the positions after ``last`` to
    the subject's tokens ``first..last`` (early blocks) or ``first..last - 1`` (later blocks).
    """
    width = mask.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    base = causal[None, None] & mask.bool()[:, None, None, :]
    early, late = base.clone(), base.clone()
    for row, (first, last) in routes:
        early[row, 0, last + 1 :, first : last + 1] = False
        late[row, 0, last + 1 :, first:last] = False
    return early, late


class _Captured(Exception):
    """Ends a source pass of interchange training once the swapped site is computed."""


class _swapped:
    """Context in which block ``layer``'s output at each swap's position is replaced by the
    same block's output at the source prompt's position (interchange training); the source
    prompts run here, in one batch, with gradients.  Does nothing without swaps."""

    def __init__(
        self,
        model: Any,
        swaps: Sequence[tuple[int, tuple[int, int, int]]],
        corpus: Corpus | None,
        pad_id: int,
        layer: int,
        site: str = "resid",
    ) -> None:
        self.handle: Any = None
        if not swaps:
            return
        if corpus is None:
            raise ValueError("interchange examples need the corpus of their sources")
        block = model.model.layers[layer]
        if site == "mlp":
            block = block.mlp
        sources = [corpus.pieces[source][0] for _, (_, source, _) in swaps]
        width = max(len(p) for p in sources)
        src_ids = torch.full((len(sources), width), pad_id, dtype=torch.long)
        src_mask = torch.zeros((len(sources), width), dtype=torch.long)
        for i, prompt in enumerate(sources):
            src_ids[i, : len(prompt)] = torch.as_tensor(prompt)
            src_mask[i, : len(prompt)] = 1
        captured: list[torch.Tensor] = []

        def capture(module: Any, args: Any, out: Any) -> None:
            captured.append(out[0] if isinstance(out, tuple) else out)
            raise _Captured  # the blocks after ``layer`` are not needed

        handle = block.register_forward_hook(capture)
        try:
            model.model(input_ids=src_ids, attention_mask=src_mask)
        except _Captured:
            pass
        finally:
            handle.remove()
        src_pos = torch.tensor([pos for _, (_, _, pos) in swaps])
        values = captured[0][torch.arange(len(swaps)), src_pos]
        rows = torch.tensor([row for row, _ in swaps])
        cols = torch.tensor([pos for _, (pos, _, _) in swaps])

        def replace_out(module: Any, args: Any, out: Any) -> Any:
            hidden = out[0] if isinstance(out, tuple) else out
            hidden = hidden.index_put((rows, cols), values.to(hidden.dtype))
            return (hidden, *out[1:]) if isinstance(out, tuple) else hidden

        self.handle = block.register_forward_hook(replace_out)

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        if self.handle is not None:
            self.handle.remove()


class _route_masks:
    """Context in which the attention of ``model``'s blocks uses the subject-route masks
    (:func:`route_masks`); does nothing without routes."""

    def __init__(
        self,
        model: Any,
        mask: torch.Tensor,
        routes: Sequence[tuple[int, tuple[int, int]]],
        route_layer: int,
    ) -> None:
        self.handles: list[Any] = []
        if not routes:
            return
        early, late = route_masks(mask, routes)
        for index, block in enumerate(model.model.layers):
            chosen = early if index < route_layer else late

            def hook(module: Any, args: Any, kwargs: dict[str, Any], chosen: Any = chosen) -> Any:
                kwargs["attention_mask"] = chosen
                return args, kwargs

            self.handles.append(block.self_attn.register_forward_pre_hook(hook, with_kwargs=True))

    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
