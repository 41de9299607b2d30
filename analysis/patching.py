"""Cross-lingual activation patching (Dumas et al., ACL 2025; Fierro et al., Findings ACL
2025): does a hidden state taken from a prompt in language A make the model's run on a prompt
in language B follow A's content?

**What is patched.**  The residual stream leaving block ``L`` (``resid_post.L``, the site the
lens decodes and tracing restores as ``resid``; ``resid_post.L == resid_pre.L+1``, so patching
``resid_post.L`` is patching the input of block ``L + 1``) at one position of B's prompt is
replaced by A's ``resid_post.L`` at the matching position of A's prompt, at two positions:

* ``subject_last``: the subject's last token (where subject enrichment happens and ROME
  writes);
* ``last``: the prompt's last token (where the answer is read out), after any bare space the
  answer begins with, joined to the prompt as the lens does
  (:func:`~analysis.lens.reading_tokens`).

One layer and one position are patched per run; every (position, layer) of one target prompt
is one row of a batch: the rows patching one position go through the model together, each
holding only the tokens from that position on and continuing the keys and values of the
unpatched prompt before it (:func:`patch_rows`; ``max_rows`` splits a pass, with the same
numbers).  B's output is read at
its last position: the probability and rank of the first token with content of an answer
*written in B's language* (MLaKE's answers are parallel).

**Counterfactual matrix (unedited model).**  For every ordered language pair (A, B), the
diagonal included, each fact ``f2`` known in B is paired with a different fact ``f1`` known in
A (:func:`pair_facts`: drawn with a recorded seed, among facts asking the same question about
another subject where there are any, whose answers in B begin with different tokens).  A's
state on ``f1``'s prompt is patched into B's run on ``f2``'s prompt.  B *follows A* at a
(position, layer) when ``f1``'s answer in B becomes more likely than ``f2``'s answer in B;
the *shift* is the change of ``f1``'s answer probability from the unpatched run.  The *best
layer* of a position is the one with the highest mean follow rate over the off-diagonal pairs
(on the diagonal, late layers at the last position copy the output and follow trivially).

**Edit carried.**  An edit (ROME by default) of fact ``f`` in language A.  *Forward*
(``edited_to_unedited``): the edited model's state on A's prompt is patched into the unedited
model's run on B's prompt of the same fact; the edit is *carried* when B's top token is the
first token with content of the new answer written in B.  *Reverse*
(``unedited_to_edited``): the unedited model's state on A's prompt is patched into the edited
model's run on B's prompt; recorded are the same rates (the edit's new answer kept, and the
old answer restored).  Only edits that succeed in A (the edited model's top token on A's
prompt is the new answer's) count in the rates.

Built cases (tests): a state copied from an identical prompt at the last layer and position
makes B's output A's output exactly, so an edit that succeeds in A is carried with rate 1; a
patch at ``resid_post`` of the last layer at the subject's token changes nothing (no later
block reads it); the two backends agree; batched equals unbatched.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter, PastKeyValues, Patch
from mlake_core.results.store import read_arrays, read_run

#: The positions patched, in the order of the arrays' position axis.
POSITIONS: tuple[str, ...] = ("subject_last", "last")
#: The site patched at each layer (module docstring).
SITE = "resid_post"
#: The directions of the edit-carried measurement, in the order of its arrays' first axis.
DIRECTIONS: tuple[str, ...] = ("edited_to_unedited", "unedited_to_edited")

#: The arrays every saved :class:`CounterfactualPatch` and :class:`EditPatch` has.
CF_KEYS: tuple[str, ...] = ("prob", "rank", "clean_prob", "clean_rank", "facts", "tokens")
EDIT_KEYS: tuple[str, ...] = (
    "prob",
    "rank",
    "clean_prob",
    "clean_rank",
    "target_langs",
    "tokens",
    "source_success",
)


@dataclass(frozen=True)
class PatchConfig:
    """Settings of cross-lingual patching.

    Attributes:
        form: the prompt form patched (``question``: it names the relation in every
            language).
        seed: the seed that pairs facts in the counterfactual matrix.
        method: the editing method of the edit-carried measurement (a registered method that
            changes weights), or ``none`` to measure the counterfactual matrix alone.
        edits: edits per edit language (the first of the facts known there); 0 measures the
            counterfactual matrix alone.
        max_rows: rows per forward pass; ``None``: all rows of one target prompt (every
            position and layer) in one pass.
    """

    form: str = "question"
    seed: int = 0
    method: str = "rome"
    edits: int = 10
    max_rows: int | None = None

    def __post_init__(self) -> None:
        if self.form not in ("question", "cloze"):
            raise ConfigError(f"--form {self.form!r}: choose question or cloze")
        if isinstance(self.edits, bool) or int(self.edits) < 0:
            raise ConfigError(f"--edits {self.edits}: must be 0 or more")
        if self.max_rows is not None and int(self.max_rows) < 1:
            raise ConfigError(f"--max-rows {self.max_rows}: must be at least 1")

    @property
    def measures_edits(self) -> bool:
        return self.method != "none" and self.edits > 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- the patch primitive ------------------------------------------------------------------------


def source_states(
    adapter: ModelAdapter, ids: Sequence[int], positions: Sequence[int]
) -> torch.Tensor:
    """``resid_post`` of every layer at ``positions`` of one prompt: ``[position, layer, d]``
    (one forward pass, stopped after the last block)."""
    sites = [f"{SITE}.{layer}" for layer in range(adapter.n_layers)]
    cache = adapter.activations(adapter.batch([list(ids)]), sites)
    return torch.stack([cache[s][0, list(positions)] for s in sites], dim=1).detach()


def prompt_past(adapter: ModelAdapter, ids: Sequence[int]) -> PastKeyValues | bool:
    """The attention keys and values of one unpatched prompt (for :func:`patch_rows`'s
    ``prefix``), or ``False`` where the model's cache cannot be continued from a prefix."""
    if len(ids) < 2:
        return False
    try:
        _, past = adapter.run_with_past(adapter.batch([list(ids)]), last_only=True)
    except NotImplementedError:
        return False
    return past


def patch_rows(
    adapter: ModelAdapter,
    ids: Sequence[int],
    rows: Sequence[tuple[int, int, torch.Tensor] | None],
    tokens: Sequence[int],
    max_rows: int | None = None,
    *,
    prefix_cache: bool = True,
    prefix: PastKeyValues | bool | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Run one target prompt once per row, each row with one patch, and read ``tokens`` at
    its last position.

    Prefix cache: a patch at position ``p`` changes nothing before ``p`` (causal attention),
    so the prompt is run once and its attention keys and values kept
    (:meth:`~mlake_core.models.adapter.ModelAdapter.run_with_past`); a row patching ``p``
    holds only the tokens from ``p`` on and continues the keys and values of the first ``p``
    (the unpatched row: the last token alone).  Rows are grouped by position, one pass per
    group (``max_rows`` splits it).  A model whose cache cannot be continued from a prefix
    (sliding-window layers: ``NotImplementedError``), or ``prefix_cache=False``, runs the
    whole prompt in every row, with the same numbers (tested).

    Args:
        ids: the target prompt.
        rows: per row, ``(layer, position, value)``: ``resid_post.{layer}`` at ``position``
            of ``ids`` is set to ``value`` (``[d_model]``); ``None``: the unpatched run.
        tokens: the tokens read.
        max_rows: rows per forward pass (``None``: all of a group in one).
        prefix: the prompt's keys and values, when the caller runs several patch sets on one
            prompt (:func:`prompt_past`; ``False``: the model has none); ``None``: computed
            here.

    Returns:
        ``(prob, rank)``, each ``[row, token]``: the probability of each token at the last
        position, and how many tokens of the vocabulary are more likely (0: the top token).
    """
    n = len(ids)
    given = prompt_past(adapter, ids) if prefix_cache and prefix is None else prefix
    past = given if prefix_cache and isinstance(given, PastKeyValues) else None
    groups: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        begin = 0 if past is None else (n - 1 if row is None else int(row[1]))
        groups.setdefault(begin, []).append(i)
    prob = np.zeros((len(rows), len(tokens)))
    rank = np.zeros((len(rows), len(tokens)), dtype=np.int64)
    picked_ids = torch.tensor(list(tokens), dtype=torch.long)
    for begin, members in sorted(groups.items()):
        kept = past.crop(begin) if past is not None and begin > 0 else None
        step = max_rows or len(members)
        for first in range(0, len(members), step):
            chunk = members[first : first + step]
            batch = adapter.batch([list(ids[begin:])] * len(chunk))
            by_layer: dict[int, list[tuple[int, int, torch.Tensor]]] = {}
            for r, i in enumerate(chunk):
                row = rows[i]
                if row is not None:
                    layer, pos, value = row
                    by_layer.setdefault(int(layer), []).append((r, int(pos) - begin, value))
            patches = [
                Patch(
                    f"{SITE}.{layer}",
                    torch.tensor([r for r, _, _ in entries], dtype=torch.long),
                    torch.tensor([p for _, p, _ in entries], dtype=torch.long),
                    torch.stack([v.reshape(-1) for _, _, v in entries]),
                )
                for layer, entries in sorted(by_layer.items())
            ]
            rows_past = (
                kept.select(torch.zeros(len(chunk), dtype=torch.long)) if kept is not None else None
            )
            logits = adapter.run_with_patches(batch, patches, last_only=True, past=rows_past)
            logits = logits[:, -1].float()
            answer = picked_ids.to(logits.device)
            picked = logits[:, answer]
            where = torch.tensor(chunk)
            prob[where] = logits.log_softmax(-1)[:, answer].exp().double().cpu().numpy()
            rank[where] = (logits[:, None, :] > picked[:, :, None]).sum(-1).long().cpu().numpy()
    return prob, rank


def patch_all_layers(
    adapter: ModelAdapter,
    source: torch.Tensor,
    target_ids: Sequence[int],
    target_positions: Sequence[int],
    tokens: Sequence[int],
    max_rows: int | None = None,
    *,
    prefix_cache: bool = True,
    prefix: PastKeyValues | bool | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Patch ``source`` (``[position, layer, d]``, :func:`source_states`) into the target
    prompt at every position and layer, one at a time, and read ``tokens``.

    Returns:
        ``(prob, rank, clean_prob, clean_rank)``: ``[position, layer, token]`` after each
        patch, and ``[token]`` of the unpatched run.
    """
    return patch_sources(
        adapter,
        [(source, tokens)],
        target_ids,
        target_positions,
        max_rows,
        prefix_cache=prefix_cache,
        prefix=prefix,
    )[0]


def patch_sources(
    adapter: ModelAdapter,
    sources: Sequence[tuple[torch.Tensor, Sequence[int]]],
    target_ids: Sequence[int],
    target_positions: Sequence[int],
    max_rows: int | None = None,
    *,
    prefix_cache: bool = True,
    prefix: PastKeyValues | bool | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """:func:`patch_all_layers` for several sources into one target prompt at once: each
    ``(states, tokens)`` gets its rows, and the rows of every source that patch one position
    share a pass.

    Returns:
        Per source, ``(prob, rank, clean_prob, clean_rank)`` as :func:`patch_all_layers`.
    """
    union = sorted({int(t) for _, tokens in sources for t in tokens})
    rows: list[tuple[int, int, torch.Tensor] | None] = [None]
    for source, _ in sources:
        n_pos, n_layers = source.shape[0], source.shape[1]
        if len(target_positions) != n_pos:
            raise ValueError("patch_all_layers: one target position per source position")
        for i, pos in enumerate(target_positions):
            rows += [(layer, int(pos), source[i, layer]) for layer in range(n_layers)]
    prob, rank = patch_rows(
        adapter, target_ids, rows, union, max_rows, prefix_cache=prefix_cache, prefix=prefix
    )
    out, start = [], 1
    for source, tokens in sources:
        n_pos, n_layers = source.shape[0], source.shape[1]
        cols = [union.index(int(t)) for t in tokens]
        end = start + n_pos * n_layers
        shape = (n_pos, n_layers, len(cols))
        out.append(
            (
                prob[start:end][:, cols].reshape(shape),
                rank[start:end][:, cols].reshape(shape),
                prob[0, cols],
                rank[0, cols],
            )
        )
        start = end
    return out


# -- fact pairing -------------------------------------------------------------------------------


def pair_facts(
    targets: Sequence[int],
    sources: Sequence[int],
    *,
    seed: int,
    key: str,
    relation: Callable[[int], str],
    usable: Callable[[int, int], bool],
) -> dict[int, int]:
    """For each target fact, a different source fact (the counterfactual matrix's pairs).

    Drawn with ``random.Random(f"{seed}:{key}:{target}")`` (the same pairs on every run, and
    a target's pair does not depend on the others), first among the sources with the same
    ``relation`` key (MLaKE has no relation labels; :func:`relation_key` approximates one),
    else among all; only sources with ``usable(source, target)`` qualify.  A target without
    one is left out.
    """
    out: dict[int, int] = {}
    ordered = sorted(set(sources))
    for target in targets:
        others = [s for s in ordered if s != target]
        same = [s for s in others if relation(s) == relation(target)]
        rest = [s for s in others if relation(s) != relation(target)]
        rng = random.Random(f"{seed}:{key}:{target}")
        # Uniform among the usable ones of a group: the first usable one of the group in a
        # seeded order (``usable`` is asked about as few sources as that takes).
        for group in (same, rest):
            rng.shuffle(group)
            picked = next((s for s in group if usable(s, target)), None)
            if picked is not None:
                out[target] = picked
                break
    return out


def relation_key(question: str, subject: tuple[int, int]) -> str:
    """A stand-in for a fact's relation: its question with the subject cut out, lowercased
    (``"what is the capital of {}?"``).  Facts asking the same question about different
    subjects share it."""
    start, end = subject
    return (question[:start] + "{}" + question[end:]).strip().lower()


# -- per-fact results ---------------------------------------------------------------------------


@dataclass
class CounterfactualPatch:
    """One counterfactual pair: fact ``facts[0]`` in ``source_lang`` patched into fact
    ``facts[1]`` in ``target_lang``.

    Attributes:
        prob: ``[position, layer, 2]`` probability at B's output of the source fact's answer
            in B and of the target fact's answer in B (positions: :data:`POSITIONS`).
        rank: the same shape: tokens more likely (0: the top token).
        clean_prob: ``[2]`` the same in B's unpatched run.
        clean_rank: ``[2]``.
        facts: ``(source fact, target fact)``.
        tokens: the two tokens read.
    """

    prob: np.ndarray
    rank: np.ndarray
    clean_prob: np.ndarray
    clean_rank: np.ndarray
    facts: tuple[int, int]
    tokens: tuple[int, int]

    def follows(self) -> np.ndarray:
        """``[position, layer]``: whether the source fact's answer became more likely than
        the target fact's."""
        return self.prob[..., 0] > self.prob[..., 1]

    def shift(self) -> np.ndarray:
        """``[position, layer]``: the change of the source fact's answer probability."""
        return self.prob[..., 0] - self.clean_prob[0]

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "prob": self.prob.astype(np.float32),
            "rank": self.rank.astype(np.int64),
            "clean_prob": self.clean_prob.astype(np.float32),
            "clean_rank": self.clean_rank.astype(np.int64),
            "facts": np.asarray(self.facts, dtype=np.int64),
            "tokens": np.asarray(self.tokens, dtype=np.int64),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> CounterfactualPatch:
        f = [int(x) for x in arrays["facts"]]
        t = [int(x) for x in arrays["tokens"]]
        return cls(
            prob=np.asarray(arrays["prob"], dtype=np.float64),
            rank=np.asarray(arrays["rank"], dtype=np.int64),
            clean_prob=np.asarray(arrays["clean_prob"], dtype=np.float64),
            clean_rank=np.asarray(arrays["clean_rank"], dtype=np.int64),
            facts=(f[0], f[1]),
            tokens=(t[0], t[1]),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CounterfactualPatch:
        """A pair as a patching run saved it (``arrays/cf_<A>_<B>_<fact>.npz``).

        Raises:
            DataError: no such file, or not a counterfactual patch (naming the file).
        """
        return cls.from_arrays(read_arrays(path, keys=CF_KEYS, what="a counterfactual patch"))


@dataclass
class EditPatch:
    """One edit (fact ``fact_id`` edited in ``edit_lang``), patched into each target
    language.

    Attributes:
        prob: ``[target language, direction, position, layer, 2]`` probability at B's output
            of the new answer and the old answer written in B (directions
            :data:`DIRECTIONS`, positions :data:`POSITIONS`).
        rank: the same shape.
        clean_prob: ``[target language, direction, 2]`` in B's unpatched run (the unedited
            model for ``edited_to_unedited``, the edited one for ``unedited_to_edited``).
        clean_rank: the same shape.
        target_langs: the target languages B.
        tokens: ``[target language, 2]`` the new and the old answer's token in B.
        source_success: whether the edited model's top token on A's prompt is the new
            answer's (only such edits count in the rates).
    """

    prob: np.ndarray
    rank: np.ndarray
    clean_prob: np.ndarray
    clean_rank: np.ndarray
    target_langs: list[str]
    tokens: np.ndarray
    source_success: bool

    def carried(self) -> np.ndarray:
        """``[target language, direction, position, layer]``: B's top token is the new
        answer's."""
        return self.rank[..., 0] == 0

    def restored(self) -> np.ndarray:
        """The same shape: B's top token is the old answer's."""
        return self.rank[..., 1] == 0

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "prob": self.prob.astype(np.float32),
            "rank": self.rank.astype(np.int64),
            "clean_prob": self.clean_prob.astype(np.float32),
            "clean_rank": self.clean_rank.astype(np.int64),
            "target_langs": np.asarray(self.target_langs, dtype=str),
            "tokens": np.asarray(self.tokens, dtype=np.int64),
            "source_success": np.asarray(self.source_success),
        }

    @classmethod
    def from_arrays(cls, arrays: Mapping[str, Any]) -> EditPatch:
        return cls(
            prob=np.asarray(arrays["prob"], dtype=np.float64),
            rank=np.asarray(arrays["rank"], dtype=np.int64),
            clean_prob=np.asarray(arrays["clean_prob"], dtype=np.float64),
            clean_rank=np.asarray(arrays["clean_rank"], dtype=np.int64),
            target_langs=[str(x) for x in arrays["target_langs"]],
            tokens=np.asarray(arrays["tokens"], dtype=np.int64),
            source_success=bool(np.asarray(arrays["source_success"])),
        )

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> EditPatch:
        """An edit's patches as a patching run saved them (``arrays/edit_<A>_<fact>.npz``).

        Raises:
            DataError: no such file, or not an edit patch (naming the file).
        """
        return cls.from_arrays(read_arrays(path, keys=EDIT_KEYS, what="an edit patch"))


def patch_edit(
    adapter: ModelAdapter,
    applied: Callable[[], Any],
    source: tuple[Sequence[int], Sequence[int]],
    targets: Sequence[tuple[str, Sequence[int], Sequence[int], tuple[int, int]]],
    new_source_token: int,
    max_rows: int | None = None,
) -> EditPatch:
    """Patch one edit's states across languages, both directions (module docstring).

    Args:
        applied: a context manager factory that applies the edit for a ``with`` block
            (:meth:`~mlake_core.editing.base.EditResult.applied` bound to the adapter).
        source: A's prompt ids and its ``(subject_last, last)`` positions.
        targets: per target language B: ``(lang, ids, (subject_last, last), (new token, old
            token))``.
        new_source_token: the new answer's token in A (to check the edit succeeds there).
    """
    src_ids, src_pos = source
    plain = source_states(adapter, src_ids, src_pos)
    with applied():
        edited = source_states(adapter, src_ids, src_pos)
        out_edited = adapter.logit_lens(edited[-1, -1][None])[0]
        success = bool(int(out_edited.argmax()) == int(new_source_token))
        reverse = [
            patch_all_layers(adapter, plain, ids, pos, tok, max_rows)
            for _, ids, pos, tok in targets
        ]
    forward = [
        patch_all_layers(adapter, edited, ids, pos, tok, max_rows) for _, ids, pos, tok in targets
    ]
    parts = [(f, r) for f, r in zip(forward, reverse, strict=True)]
    return EditPatch(
        prob=np.stack([np.stack([f[0], r[0]]) for f, r in parts]),
        rank=np.stack([np.stack([f[1], r[1]]) for f, r in parts]),
        clean_prob=np.stack([np.stack([f[2], r[2]]) for f, r in parts]),
        clean_rank=np.stack([np.stack([f[3], r[3]]) for f, r in parts]),
        target_langs=[t[0] for t in targets],
        tokens=np.asarray([list(t[3]) for t in targets], dtype=np.int64),
        source_success=success,
    )


# -- summaries ----------------------------------------------------------------------------------


def _grid(n_layers: int, n: int) -> list[list[list[float | None]]]:
    return [[[None] * n for _ in range(n)] for _ in range(n_layers)]


def summarize_counterfactual(
    langs: Sequence[str],
    pairs: Mapping[tuple[str, str], Sequence[CounterfactualPatch]],
    n_layers: int,
) -> dict[str, Any]:
    """The counterfactual matrices: per position, ``follows`` and ``shift`` as
    ``[layer][A][B]`` (``None`` where a pair has no facts), ``n`` as ``[A][B]``, the best
    layer (the highest mean follow rate off the diagonal; module docstring) and the
    unpatched follow rate ``[A][B]`` (the baseline: the source answer already above the
    target's)."""
    langs = list(langs)
    k = len(langs)
    out: dict[str, Any] = {"n": [[len(pairs.get((a, b), ())) for b in langs] for a in langs]}
    out["clean_follows"] = [
        [
            float(np.mean([p.clean_prob[0] > p.clean_prob[1] for p in ps])) if ps else None
            for b in langs
            for ps in [pairs.get((a, b), ())]
        ]
        for a in langs
    ]
    for i, pos in enumerate(POSITIONS):
        follows, shift = _grid(n_layers, k), _grid(n_layers, k)
        for ia, a in enumerate(langs):
            for ib, b in enumerate(langs):
                ps = pairs.get((a, b), ())
                if not ps:
                    continue
                f = np.mean([p.follows()[i] for p in ps], axis=0)
                s = np.mean([p.shift()[i] for p in ps], axis=0)
                for layer in range(n_layers):
                    follows[layer][ia][ib] = round(float(f[layer]), 6)
                    shift[layer][ia][ib] = round(float(s[layer]), 6)
        out[pos] = {"follows": follows, "shift": shift, "best_layer": best_layer(follows)}
    return out


def best_layer(follows: Sequence[Sequence[Sequence[float | None]]]) -> int | None:
    """The layer with the highest mean of the off-diagonal cells (``None`` when every
    off-diagonal cell is empty; the earliest layer wins a tie)."""
    best: tuple[float, int] | None = None
    for layer, grid in enumerate(follows):
        cells = [
            v for a, row in enumerate(grid) for b, v in enumerate(row) if a != b and v is not None
        ]
        if not cells:
            continue
        score = float(np.mean(cells))
        if best is None or score > best[0]:
            best = (score, layer)
    return None if best is None else best[1]


def summarize_edits(
    langs: Sequence[str], edits: Mapping[str, Sequence[EditPatch]], n_layers: int
) -> dict[str, Any]:
    """The edit-carried rates over the edits that succeed in their edit language: per
    direction and position, ``carried`` (B's top token is the new answer's) and
    ``restored`` (the old answer's) as ``[layer][A][B]``; ``n_cells`` ``[A][B]`` the edits
    behind each cell (a target whose new and old answer begin with the same token is left
    out); ``clean_carried`` per direction
    ``[A][B]`` (the unpatched target run: the edit's own transfer for ``unedited_to_edited``);
    ``n`` (edits counted) and ``n_failed`` (edits that fail in A) per edit language; the best
    layer per position (the highest mean forward carried rate off the diagonal)."""
    langs = list(langs)
    k = len(langs)
    good = {a: [e for e in edits.get(a, ()) if e.source_success] for a in langs}
    out: dict[str, Any] = {
        "n": {a: len(good[a]) for a in langs},
        "n_failed": {a: len(edits.get(a, ())) - len(good[a]) for a in langs},
        "n_cells": [[sum(b in e.target_langs for e in good[a]) for b in langs] for a in langs],
    }
    clean: dict[str, list[list[float | None]]] = {}
    for d, direction in enumerate(DIRECTIONS):
        grid: list[list[float | None]] = [[None] * k for _ in range(k)]
        section: dict[str, Any] = {}
        for i, pos in enumerate(POSITIONS):
            carried, restored = _grid(n_layers, k), _grid(n_layers, k)
            for ia, a in enumerate(langs):
                if not good[a]:
                    continue
                for ib, b in enumerate(langs):
                    rows = [e for e in good[a] if b in e.target_langs]
                    if not rows:
                        continue
                    j = [e.target_langs.index(b) for e in rows]
                    c = np.mean([e.carried()[jj, d, i] for e, jj in zip(rows, j, strict=True)], 0)
                    r = np.mean([e.restored()[jj, d, i] for e, jj in zip(rows, j, strict=True)], 0)
                    grid[ia][ib] = round(
                        float(
                            np.mean(
                                [e.clean_rank[jj, d, 0] == 0 for e, jj in zip(rows, j, strict=True)]
                            )
                        ),
                        6,
                    )
                    for layer in range(n_layers):
                        carried[layer][ia][ib] = round(float(c[layer]), 6)
                        restored[layer][ia][ib] = round(float(r[layer]), 6)
            section[pos] = {"carried": carried, "restored": restored}
            if direction == DIRECTIONS[0]:
                section[pos]["best_layer"] = best_layer(carried)
        clean[direction] = grid
        out[direction] = section
    out["clean_carried"] = clean
    return out


@dataclass
class PatchingResult:
    """What ``mlake patch`` reports (saved as the run's ``summary.json``).

    Attributes:
        langs: the languages (A and B range over them).
        n_layers: layers of the model.
        config: the :class:`PatchConfig` as a dict.
        counterfactual: :func:`summarize_counterfactual`.
        edits: :func:`summarize_edits` (empty without edits).
        skipped: views or edits not measured, keyed ``what:lang:reason``.
        run_path: the run folder.
    """

    langs: tuple[str, ...]
    n_layers: int
    config: dict[str, Any]
    counterfactual: dict[str, Any]
    edits: dict[str, Any]
    skipped: dict[str, int]
    run_path: str

    def matrix(self, what: str, position: str, layer: int | None = None) -> np.ndarray:
        """A language × language matrix ``[A][B]`` (NaN where empty): ``what`` is ``follows`` or ``shift``
        (counterfactual) or ``carried`` (forward edit-carried rate); ``layer`` defaults to
        the position's best layer."""
        if what in ("follows", "shift"):
            section = self.counterfactual[position]
        elif what == "carried":
            section = self.edits[DIRECTIONS[0]][position]
        else:
            raise KeyError(what)
        if layer is None:
            layer = section["best_layer"]
        if layer is None:
            return np.full((len(self.langs), len(self.langs)), np.nan)
        grid = section[what][layer]
        return np.array([[np.nan if v is None else v for v in row] for row in grid], dtype=float)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["langs"] = list(self.langs)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PatchingResult:
        return cls(
            langs=tuple(data["langs"]),
            n_layers=int(data["n_layers"]),
            config=dict(data["config"]),
            counterfactual=dict(data["counterfactual"]),
            edits=dict(data["edits"]),
            skipped=dict(data["skipped"]),
            run_path=str(data["run_path"]),
        )

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> PatchingResult:
        """The result a patching run saved (its ``summary.json``), with :attr:`run_path` the
        folder it was read from.

        Raises:
            DataError: not a patching run, or one that did not finish (naming it).
        """
        run = read_run(run_dir, "patching")
        result = cls.from_dict(run.load_summary("patching summary"))
        result.run_path = str(run.path)
        return result
