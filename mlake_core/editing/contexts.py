"""Context templates for ROME's and MEMIT's keys (Meng et al. 2022, §3.1; 2023, §4.3).

The key ``k*`` that a rank-one or MEMIT update maps to the new value is the subject's key
*in general*, not in one prompt: the reference code averages the key at the subject's last
token over the fact's own text on its own (``"{}"``) and behind short prefixes the model
itself wrote (``"{prefix}. {}"``), sampled from a few start words with top-5 sampling.  ROME
draws 10 prefixes of 5 tokens and 10 of 10 tokens and averages all 21 keys; MEMIT draws 5
of 10 tokens and averages the key of the text alone with the mean of the prefixed ones.

Here the fact's own text is the prompt form's text *without* the run's few-shot
demonstrations (:attr:`~mlake_core.editing.base.EditRequest.text`): the demonstrations are
scaffolding for a base model, the same in every edit prompt of a language.  A key read inside
them carries that shared context, which the key statistics ``C`` (ordinary text) do not hold,
and ``C⁻¹`` amplifies it: on Gemma 3 270M (layer 5, 4 English edits, 10 locality prompts)
the update reached other subjects' keys in few-shot prompts at 9–23% of its strength (mean)
with the edit prompt's key, and at 2–3% with the averaged key.

Prefixes are drawn once per run from a seeded generator (:class:`ContextPrefixes`) so every
edit uses the same ones and a run is reproducible.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from mlake_core.editing.base import EditRequest, subject_tokens
from mlake_core.errors import ConfigError

#: ROME's start words for the sampled prefixes.
START_WORDS: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")

#: How many candidates each sampling step chooses from (the reference's top-k).
TOP_K = 5


def parse_contexts(spec: str, option: str) -> tuple[tuple[int, int], ...]:
    """``"5x10,10x10"`` (prefix length in tokens ``x`` how many) as ``((5, 10), (10, 10))``;
    ``""`` or ``"none"`` as ``()`` (keys from the edit prompt itself).

    Raises:
        ConfigError: naming ``option`` for a malformed spec.
    """
    if spec.strip().lower() in ("", "none"):
        return ()
    out = []
    for part in spec.split(","):
        length, _, count = part.strip().partition("x")
        try:
            pair = (int(length), int(count))
        except ValueError:
            raise ConfigError(
                f"{option} {spec!r}: write LENGTHxCOUNT pairs, e.g. '5x10,10x10', or 'none'"
            ) from None
        if pair[0] < 1 or pair[1] < 1:
            raise ConfigError(f"{option} {spec!r}: lengths and counts must be positive")
        out.append(pair)
    return tuple(out)


def sample_prefix_ids(
    adapter: Any, lengths: Sequence[tuple[int, int]], generator: torch.Generator
) -> list[list[int]]:
    """Token ids of the prefixes the model writes: for each ``(length, count)``, ``count``
    sequences, each a start word from :data:`START_WORDS` in turn (after BOS, when the model
    uses one) followed by ``length - 1`` tokens of top-5 sampling from ``generator``
    (``length`` tokens in all where the start word is one token, as in the reference)."""
    out: list[list[int]] = []
    for length, count in lengths:
        seqs = [adapter.encode(START_WORDS[i % len(START_WORDS)]) for i in range(count)]
        for _ in range(length - 1):
            batch = adapter.batch(seqs, padding_side="left")
            with torch.no_grad():
                logits = adapter.forward(batch)[:, -1].float().cpu()
            top = logits.topk(min(TOP_K, logits.shape[-1]), dim=-1)
            pick = torch.multinomial(top.values.softmax(-1), 1, generator=generator)[:, 0]
            chosen = top.indices[torch.arange(count), pick]
            seqs = [[*s, int(t)] for s, t in zip(seqs, chosen, strict=True)]
        out += seqs
    return out


def sample_prefixes(
    adapter: Any, lengths: Sequence[tuple[int, int]], generator: torch.Generator
) -> tuple[str, ...]:
    """The prefixes of :func:`sample_prefix_ids` as text; line breaks become spaces."""
    ids = sample_prefix_ids(adapter, lengths, generator)
    texts = (adapter.tokenizer.decode(s, skip_special_tokens=True) for s in ids)
    return tuple(" ".join(text.split()) for text in texts)


class ContextPrefixes:
    """The run's sampled prefixes, drawn once per spec from a generator seeded with
    ``seed`` (independent of the edits' own random draws)."""

    def __init__(self, adapter: Any, seed: int = 0) -> None:
        self.adapter = adapter
        self.seed = seed
        self.drawn: dict[tuple[tuple[int, int], ...], tuple[str, ...]] = {}

    def __call__(self, lengths: Sequence[tuple[int, int]]) -> tuple[str, ...]:
        key = tuple(lengths)
        if key not in self.drawn:
            generator = torch.Generator().manual_seed(self.seed)
            self.drawn[key] = sample_prefixes(self.adapter, key, generator)
        return self.drawn[key]


def context_texts(request: EditRequest, prefixes: Sequence[str]) -> list[tuple[str, int, int]]:
    """The request's own text alone and behind each prefix (``"{prefix}. {text}"``), each
    with its subject's character span."""
    if not request.text:
        raise ConfigError(
            f"fact {request.fact_id} [{request.lang}]: context-averaged keys need the "
            "request's own text (EditRequest.text; make_request sets it); or set contexts: none"
        )
    start, end = request.text_subject
    out = [(request.text, start, end)]
    for prefix in prefixes:
        shift = len(prefix) + 2
        out.append((f"{prefix}. {request.text}", start + shift, end + shift))
    return out


def context_keys(
    adapter: Any,
    requests: Sequence[EditRequest],
    layer: int,
    prefixes: Sequence[str] | None,
    groups: Sequence[int] | None = None,
) -> torch.Tensor:
    """Each request's key ``mlp_post.{layer}`` at its subject's last token (``[n, d_mlp]``,
    float64, CPU), averaged over its context texts (:func:`context_texts`); with ``prefixes``
    ``None``, read from the edit prompt itself.  The forward passes stop at ``layer``.

    ``groups`` (how many prefixes each ``(length, count)`` pair drew, in order) averages as
    MEMIT's reference does: the text alone is one group, each pair's prefixes another, and
    the key is the mean of the groups' means.  Without it (ROME), every text counts once.
    """
    site = f"mlp_post.{layer}"
    if prefixes is None:
        seqs = [list(r.prompt_ids) for r in requests]
        batch = adapter.batch(seqs, padding_side="right")
        cache = adapter.activations(batch, [site])
        rows = torch.arange(len(requests))
        positions = torch.tensor([r.subject_last for r in requests])
        return cache[site][rows, positions].double().cpu()
    if groups is not None and sum(groups) != len(prefixes):
        raise ValueError(f"groups {list(groups)} do not add up to {len(prefixes)} prefixes")
    keys: list[torch.Tensor] = []
    for request in requests:
        texts = context_texts(request, prefixes)
        encoded: list[list[int]] = []
        lasts: list[int] = []
        for i, (text, start, end) in enumerate(texts):
            where = f"fact {request.fact_id} [{request.lang}] context {i}"
            lasts.append(subject_tokens(adapter, text, start, end, where=where)[-1])
            encoded.append(adapter.encode(text))
        cache = adapter.activations(adapter.batch(encoded, padding_side="right"), [site])
        picked = cache[site][torch.arange(len(encoded)), torch.tensor(lasts)].double().cpu()
        if groups is None:
            keys.append(picked.mean(dim=0))
            continue
        bounds = [0, 1, *(1 + sum(groups[: g + 1]) for g in range(len(groups)))]
        means = [picked[a:b].mean(dim=0) for a, b in itertools.pairwise(bounds) if b > a]
        keys.append(torch.stack(means).mean(dim=0))
    return torch.stack(keys)


def prefixes_for(
    adapter: Any, lengths: Sequence[tuple[int, int]], context: Any
) -> tuple[str, ...] | None:
    """The prefixes an edit reads keys behind: ``None`` (the edit prompt itself) when
    ``lengths`` is empty, else the run's (:attr:`EditContext.context_prefixes`) or, without
    one, those a generator seeded 0 draws."""
    if not lengths:
        return None
    if context.context_prefixes is not None:
        return tuple(context.context_prefixes(lengths))
    return ContextPrefixes(adapter)(lengths)
