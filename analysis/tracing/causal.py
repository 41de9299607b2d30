"""Causal tracing (Meng et al. 2022), batched, for one fact view at a time.

The subject's token embeddings are corrupted (Gaussian noise of ``noise_scale`` times the
standard deviation of subject-token embeddings, several seeded samples; or the embeddings of
other subjects), then clean states are restored one *cell* at a time and the probability of
the correct answer's first token is read at the last prompt position:

    indirect effect(cell) = p(corrupted, cell restored) - p(corrupted)

Three kinds of cell, each at every (token, layer):

* ``resid``: the residual stream leaving block ``L`` (``resid_post.L``) at one token;
* ``mlp``: the MLP outputs (``mlp_out``) of a window of layers around ``L`` at one token;
* ``attn``: the attention outputs (``attn_out``) of the same window.

The window is ``[L - w // 2, L + w - w // 2)`` clipped to the model (ROME's convention).

Speed: the clean run and the corrupted runs are computed once; every restoration of every
noise sample is one row of a batch, and as many rows go into one forward pass as the memory
budget allows (:func:`pass_budget`, each row charged what it holds, :func:`tracing_row_bytes`:
its activations and, when it continues a cached prefix, its copy of the cached keys and values
and the extended cache in every block it runs; halved and retried on a CUDA out-of-memory
error).  Several prompts traced together (:func:`trace_prompts`, as the tracing stage does)
pool their restoration rows, so a pass that one fact's rows cannot fill takes other facts'
rows of the same width (shorter cached prefixes left-padded and masked), with the same
numbers as one fact at a time.  Each
row carries two patches through the adapter's generic patching (:class:`Patch`): the
corrupted embeddings, and the clean values at the restored sites.

Read only what is measured: no pass computes logits.  Each pass stops after the last block
(:meth:`~mlake_core.models.adapter.BaseAdapter.final_states`), and the answer's probability is
read at the last position from the final norm, the answer's logit and the log-sum-exp over the
vocabulary, a chunk at a time (:meth:`~mlake_core.models.adapter.BaseAdapter.readout_logprobs`),
so a batch's logits over Gemma 3's 262,144 tokens are never held.

Block skipping: restoring a cell whose lowest restored block is ``l`` changes nothing below
``l``, where every row equals its noise sample's corrupted run.  The corrupted runs therefore
keep the residual stream entering every block, and a row starts at block ``l`` from its
sample's ``resid_pre.l`` (``final_states(..., start=(l, resid))``: the blocks below return
their input without computing, on both backends and every architecture); the embedding patch
is then not needed (the noise is in the cached stream).  Rows of one restored token are cut
into passes by start block (:func:`plan_passes`: a pass starts at its lowest row's block, and
the fixed cost of a pass, :data:`PASS_OVERHEAD_TOKEN_BLOCKS`, decides when rows of neighbouring
start blocks share one); ``skip_layers=False`` runs every block in every row, with the same
numbers.

Prefix cache: restoring a cell at token ``t`` changes nothing at the positions before ``t``
(causal attention), so there every restored run equals its corrupted run.  The corrupted runs
therefore keep their attention keys and values (``final_states(..., keep_past=True)``), and the
rows restoring token ``t`` hold only the tokens from ``t`` on, continuing the keys and values
of their noise sample's first ``t`` tokens (``run_with_patches(..., past=...)``; positions and
the attention mask count on from the prefix, and the patch positions are shifted by ``-t``:
the noise covers the subject tokens at or after ``t``, the restoration is at the first row
position).  Rows are grouped by restored token, one prefix length per pass (several passes
when a token's rows exceed the budget); on average a row is about half the prompt.  This works
on every supported architecture and both backends (Hugging Face ``DynamicCache``); a model
whose cache cannot be cropped to a prefix (sliding-window or recurrent layers:
``NotImplementedError`` from ``run_with_past``), or ``prefix_cache=False``, runs the whole
prompt in every row instead, with the same numbers.

``benchmarks/tracing_speed.py`` compares this with a plain loop of one forward pass per cell
and checks the numbers are identical.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch

from mlake_core.errors import ConfigError
from mlake_core.models.adapter import ModelAdapter, PastKeyValues, Patch, free_bytes
from mlake_core.results.store import read_arrays

#: Kinds of restoration, and the site restored for each.
KINDS: tuple[str, ...] = ("resid", "mlp", "attn")
SITE_OF_KIND: dict[str, str] = {"resid": "resid_post", "mlp": "mlp_out", "attn": "attn_out"}

#: Token-position classes (ROME's six, plus the tokens before the subject).
POSITION_CLASSES: tuple[str, ...] = (
    "before_subject",
    "first_subject",
    "middle_subject",
    "last_subject",
    "first_after",
    "later",
    "last",
)

CORRUPTIONS: tuple[str, ...] = ("noise", "subject")


@dataclass(frozen=True)
class TraceConfig:
    """Settings of causal tracing.

    Attributes:
        kinds: which restorations to trace (``resid``, ``mlp``, ``attn``).
        window: layers restored together for ``mlp`` and ``attn``; ``None`` means 10 (ROME's
            value) for models of 40 layers or more and ``max(1, n_layers // 4)`` below, so a
            window never covers most of a small model (it would flatten every profile).
        noise_scale: noise standard deviation as a multiple of the standard deviation of
            subject-token embeddings (measured per model, :func:`embedding_noise_std`).
        n_samples: corrupted runs per fact (noise samples, or other subjects).
        seed: seed of the noise (each fact and language draws from its own stream).
        form: prompt form traced: ``question`` (states the relation in every language) or
            ``cloze`` (where well-posed).
        corruption: ``noise`` (Gaussian) or ``subject`` (the subject's embeddings replaced by
            those of other facts' subjects in the same language, cycled to the same length).
        max_rows: rows per forward pass; ``None`` adapts to the device's free memory.
        min_total_effect: a language has signal when the corruption lowers the mean answer
            probability by at least this fraction of its clean value (the total effect
            ``p_clean - p_corrupt`` at least ``min_total_effect * p_clean``; why 0.1:
            :mod:`analysis.tracing.summary`); without signal a language's maps are not read
            for peaks or a recommended edit layer.  It judges the saved traces and changes
            none of them: at its default it is left out of :meth:`to_dict` (so out of the run's
            key, which runs saved before it keep).
    """

    kinds: tuple[str, ...] = KINDS
    window: int | None = None
    noise_scale: float = 3.0
    n_samples: int = 10
    seed: int = 0
    form: str = "question"
    corruption: str = "noise"
    max_rows: int | None = None
    min_total_effect: float = 0.1

    def __post_init__(self) -> None:
        if isinstance(self.kinds, str):
            object.__setattr__(
                self, "kinds", tuple(k.strip() for k in self.kinds.split(",") if k.strip())
            )
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ConfigError(f"--kinds {','.join(self.kinds)}: choose from {', '.join(KINDS)}")
        if self.window is not None and int(self.window) < 1:
            raise ConfigError(f"--window {self.window}: must be at least 1")
        if not self.noise_scale > 0:
            raise ConfigError(f"--noise-scale {self.noise_scale}: must be positive")
        if int(self.n_samples) < 1:
            raise ConfigError(f"--samples {self.n_samples}: must be at least 1")
        if self.form not in ("question", "cloze"):
            raise ConfigError(f"--form {self.form!r}: choose question or cloze")
        if self.corruption not in CORRUPTIONS:
            raise ConfigError(f"--corruption {self.corruption!r}: choose noise or subject")
        if self.max_rows is not None and int(self.max_rows) < 1:
            raise ConfigError(f"max_rows {self.max_rows}: must be at least 1")
        if not 0 <= float(self.min_total_effect) < 1:
            raise ConfigError(
                f"--min-total-effect {self.min_total_effect}: must be in [0, 1) (a fraction of "
                "the clean probability)"
            )

    def resolved_window(self, n_layers: int) -> int:
        """The window used on a model of ``n_layers`` layers."""
        if self.window is not None:
            return int(self.window)
        return 10 if n_layers >= 40 else max(1, n_layers // 4)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["kinds"] = list(self.kinds)
        if self.min_total_effect == type(self).min_total_effect:
            del out["min_total_effect"]  # the summary's threshold; see the class docstring
        return out


def window_layers(layer: int, window: int, n_layers: int) -> list[int]:
    """Layers restored together for a window centred on ``layer`` (clipped at the ends)."""
    lo = max(0, layer - window // 2)
    hi = min(n_layers, layer + window - window // 2)
    return list(range(lo, hi))


def position_classes(n_tokens: int, subject: Sequence[int]) -> list[str]:
    """The class of each prompt position (see :data:`POSITION_CLASSES`).

    Precedence where classes meet: ``last`` (the final prompt token), then the subject's
    last, first and middle tokens, then the first token after the subject.
    """
    first, last_s = min(subject), max(subject)
    out = []
    for t in range(n_tokens):
        if t == n_tokens - 1:
            out.append("last")
        elif t == last_s:
            out.append("last_subject")
        elif t == first:
            out.append("first_subject")
        elif first < t < last_s:
            out.append("middle_subject")
        elif t < first:
            out.append("before_subject")
        elif t == last_s + 1:
            out.append("first_after")
        else:
            out.append("later")
    return out


@dataclass
class FactTrace:
    """Causal tracing of one prompt.

    Attributes:
        prompt_ids: the prompt's token ids.
        tokens: each token as text (for figure labels).
        subject_positions: the corrupted positions.
        answer_id: the token whose probability is measured (the answer's first token).
        p_clean: its probability in the clean run.
        p_corrupt: its mean probability over the corrupted runs.
        scores: per kind, ``[n_tokens, n_layers]`` mean probability with the cell restored.
        window: the window used for ``mlp`` and ``attn``.
        forward_passes: forward passes spent (the clean run and the corrupted runs
            included; a pass shared with other facts' rows, :func:`trace_prompts`, counts as
            this fact's share of its rows).
        rows: batch rows run in total (the clean run and the corrupted runs included; with
            the prefix cache most rows are shorter than the prompt).
    """

    prompt_ids: list[int]
    tokens: list[str]
    subject_positions: list[int]
    answer_id: int
    p_clean: float
    p_corrupt: float
    scores: dict[str, np.ndarray]
    window: int
    forward_passes: float = 0
    rows: int = 0
    classes: list[str] = field(default_factory=list)

    def effects(self, kind: str) -> np.ndarray:
        """Indirect effects ``[n_tokens, n_layers]`` of ``kind``."""
        return self.scores[kind] - self.p_corrupt

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Numpy arrays for the results store (:meth:`from_arrays` inverts it)."""
        return {
            "prompt_ids": np.asarray(self.prompt_ids),
            "tokens": np.asarray(self.tokens, dtype=str),
            "classes": np.asarray(self.classes, dtype=str),
            "subject_positions": np.asarray(self.subject_positions),
            "answer_id": np.asarray(self.answer_id),
            "p_clean": np.asarray(self.p_clean),
            "p_corrupt": np.asarray(self.p_corrupt),
            "window": np.asarray(self.window),
            "forward_passes": np.asarray(self.forward_passes),
            "rows": np.asarray(self.rows),
            **{f"scores_{k}": v for k, v in self.scores.items()},
        }

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> FactTrace:
        """One fact's trace as a tracing run saved it (``arrays/trace_<lang>_<fact>.npz``).

        Raises:
            DataError: no such file, or not a fact trace (the message names the file).
        """
        return cls.from_arrays(
            read_arrays(path, keys=TRACE_KEYS, what="a fact trace", finite=TRACE_FINITE)
        )

    @classmethod
    def from_arrays(cls, arrays: dict[str, Any]) -> FactTrace:
        """A trace saved with :meth:`to_arrays`."""
        return cls(
            prompt_ids=[int(x) for x in arrays["prompt_ids"]],
            tokens=[str(x) for x in arrays["tokens"]],
            subject_positions=[int(x) for x in arrays["subject_positions"]],
            answer_id=int(arrays["answer_id"]),
            p_clean=float(arrays["p_clean"]),
            p_corrupt=float(arrays["p_corrupt"]),
            scores={k[len("scores_") :]: v for k, v in arrays.items() if k.startswith("scores_")},
            window=int(arrays["window"]),
            forward_passes=_count(arrays["forward_passes"]),
            rows=int(arrays["rows"]),
            classes=[str(x) for x in arrays["classes"]],
        )


def _count(value: Any) -> float:
    """A saved pass count: an int when whole (a shared pass counts as a fraction)."""
    number = float(value)
    return int(number) if number.is_integer() else number


#: The arrays every saved :class:`FactTrace` has (the ``scores_<kind>`` ones besides).
TRACE_KEYS: tuple[str, ...] = (
    "prompt_ids",
    "tokens",
    "classes",
    "subject_positions",
    "answer_id",
    "p_clean",
    "p_corrupt",
    "window",
    "forward_passes",
    "rows",
)

#: The arrays of a saved :class:`FactTrace` that must be finite.
TRACE_FINITE: tuple[str, ...] = ("p_clean", "p_corrupt")


def subject_embeddings(
    adapter: ModelAdapter,
    prompts: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """The token embeddings (``embed`` site) at the subject positions of each prompt
    (``(prompt_ids, subject_positions)`` pairs), ``[k, d_model]`` each, read in batches."""
    out: list[torch.Tensor] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        batch = adapter.batch([list(ids) for ids, _ in chunk])
        cache = adapter.activations(batch, ["embed"])
        for row, (_, positions) in enumerate(chunk):
            first = int(batch.first_index[row])
            out.append(cache["embed"][row, [first + p for p in positions]].cpu())
    return out


def embedding_noise_std(
    adapter: ModelAdapter, prompts: Sequence[tuple[Sequence[int], Sequence[int]]]
) -> float:
    """Standard deviation of the token embeddings (``embed`` site) over the subject tokens of
    ``prompts`` (``(prompt_ids, subject_positions)`` pairs), pooled over tokens and dimensions
    (ROME measures it over the subjects of its dataset)."""
    values = subject_embeddings(adapter, prompts)
    if not values:
        raise ConfigError("no subject tokens to measure the embedding noise level on")
    return float(torch.cat(values).double().std())


#: On CPU, the most bytes one tracing pass may hold, its activations and its rows' copies of
#: the cached keys and values together (:func:`tracing_row_bytes`), whatever memory is free:
#: throughput per row falls when passes outgrow the caches (measured on mlake-tiny, 256-row
#: passes beat 1,400-row ones by 25%).
CPU_PASS_BYTES: int = 96 << 20


def tracing_row_bytes(
    adapter: ModelAdapter, n_run: int, past_tokens: int = 0, layer: int = 0
) -> int:
    """What one tracing row holds during its pass, in bytes: a row that runs ``n_run``
    tokens, continuing ``past_tokens`` cached positions, from block ``layer`` on.

    * Activations (no gradients: they live one layer at a time): about 8 ``d_model`` and 3
      ``d_mlp`` values per run token, 3 attention scores per head and attended position
      (scores, their softmax, a copy), and the keys and values of every attended position at
      full attention width (``n_heads * d_head``: grouped-query keys are repeated per head).
    * With a cached prefix, for every block from ``layer`` on: the row's own copy of the
      cached keys and values (the rows of a noise sample index-select its prefix) and the
      extended cache (the copy with the run tokens' keys and values appended), at the
      cache's width (``kv_width``: key/value heads times head width; the attention width when
      the model does not say).  The blocks below ``layer`` do not run and hold a
      one-value-wide placeholder (not counted).

    No logits: the readout holds a bounded chunk (:data:`~mlake_core.models.readout.READOUT_BYTES`).
    """
    info = getattr(adapter, "info", None)
    heads = int(getattr(info, "n_heads", 0) or max(1, adapter.d_model // 64))
    attn = heads * int(getattr(info, "d_head", 0) or max(1, adapter.d_model // heads))
    bytes_per = max(1, torch.finfo(adapter.dtype).bits // 8)
    n_run, past = max(1, int(n_run)), max(0, int(past_tokens))
    total = past + n_run
    act = n_run * (8 * adapter.d_model + 3 * adapter.d_mlp + 3 * heads * total) + 2 * attn * total
    cache = int(getattr(adapter, "kv_width", 0) or attn)
    kv = 2 * cache * (adapter.n_layers - max(0, layer)) * (past + total) if past else 0
    return bytes_per * (act + kv)


def pass_budget(adapter: ModelAdapter, fraction: float = 0.25) -> int:
    """Bytes one tracing pass may hold (its rows, each charged :func:`tracing_row_bytes`):
    ``fraction`` of CUDA's free memory; on CPU ``fraction`` of the available memory, at most
    :data:`CPU_PASS_BYTES`.  Nothing else a pass holds grows with it: measured exactly on the
    GPT-2-small shape (TransformerLens and nnsight alike) a pass of 4 rows holds 6 MiB."""
    free = free_bytes(adapter.device)
    if free is None:  # a device whose free memory is not known: the CPU cap alone
        free = 8 << 30
    room = fraction * free
    if adapter.device.type == "cuda":
        return int(room)
    return int(min(CPU_PASS_BYTES, room))


def rows_per_pass(
    adapter: ModelAdapter, n_tokens: int, fraction: float = 0.25, *, past_tokens: int | None = None
) -> int:
    """How many rows of a prompt of ``n_tokens`` tokens fit in one patched forward pass of
    :func:`pass_budget` bytes, each row charged :func:`tracing_row_bytes` (activations, and
    its copies of the cached keys and values, every block counted).

    A row runs the prompt's last ``n_tokens - past_tokens`` tokens, continuing the keys and
    values of the first ``past_tokens`` (a restoration at token ``t`` continues ``t``).
    ``past_tokens=None`` (what the planner plans) is the worst case over the restorations a
    prompt of ``n_tokens`` tokens can have, wherever its subject is: the fewest rows over
    ``past_tokens`` from 0 to ``n_tokens - 1``.  The tracer itself sizes each pass from the
    rows it holds (:func:`trace_prompts`: their widths, longest cached prefix and lowest
    block), so its passes stay within this budget.
    """
    n = max(1, int(n_tokens))
    pasts = range(n) if past_tokens is None else [min(max(0, int(past_tokens)), n - 1)]
    charge = max(tracing_row_bytes(adapter, n - p, p) for p in pasts)
    return max(1, int(pass_budget(adapter, fraction) // charge))


@dataclass(frozen=True)
class PromptToTrace:
    """One prompt for :func:`trace_prompts` (the arguments of :func:`trace_prompt` that
    differ between facts)."""

    prompt_ids: Sequence[int]
    subject_positions: Sequence[int]
    answer_id: int
    generator: torch.Generator
    swap_embeddings: Sequence[torch.Tensor] = ()


def trace_prompt(
    adapter: ModelAdapter,
    prompt_ids: Sequence[int],
    subject_positions: Sequence[int],
    answer_id: int,
    config: TraceConfig,
    generator: torch.Generator,
    *,
    noise_std: float,
    swap_embeddings: Sequence[torch.Tensor] = (),
    prefix_cache: bool = True,
    skip_layers: bool = True,
) -> FactTrace:
    """Trace one prompt (see the module docstring).

    Args:
        adapter: the model.
        prompt_ids: the prompt's token ids (BOS included when the model uses one).
        subject_positions: indices in ``prompt_ids`` of the tokens to corrupt.
        answer_id: the token whose probability is measured at the last position.
        config: tracing settings.
        generator: source of the noise (CPU generator; draws are identical on every device).
        noise_std: standard deviation of subject-token embeddings
            (:func:`embedding_noise_std`); the noise is ``config.noise_scale`` times it.
        swap_embeddings: for ``corruption="subject"``, one ``[k, d_model]`` tensor of another
            subject's token embeddings per sample.
        prefix_cache: run each restoration from the restored token on, after the corrupted
            run's keys and values of the tokens before it (same numbers, fewer tokens; see the
            module docstring).  ``False``, or a model whose cache cannot be continued from a
            prefix, runs the whole prompt in every row.
        skip_layers: start each row at the lowest block it restores, from the corrupted
            run's residual stream there (same numbers, fewer blocks; see the module
            docstring).  ``False`` runs every block in every row.

    Returns:
        The restored probabilities of every cell of every kind.
    """
    prompt = PromptToTrace(prompt_ids, subject_positions, answer_id, generator, swap_embeddings)
    return trace_prompts(
        adapter,
        [prompt],
        config,
        noise_std=noise_std,
        prefix_cache=prefix_cache,
        skip_layers=skip_layers,
    )[0]


@dataclass
class _Fact:
    """One prompt being traced: its cells, the clean and corrupted runs' caches, and the
    restored probabilities as they are read."""

    ids: list[int]
    subject: list[int]
    answer_id: int
    cells: list[tuple[str, int, int, list[str]]]
    skipped: list[tuple[str, int, int]]
    probs: torch.Tensor
    clean: dict[str, torch.Tensor]
    corrupted: torch.Tensor
    entering: dict[str, torch.Tensor]
    past: PastKeyValues | None
    p_clean: float
    passes: float = 2.0
    rows: int = 0

    @property
    def n_tokens(self) -> int:
        return len(self.ids)


def trace_prompts(
    adapter: ModelAdapter,
    prompts: Sequence[PromptToTrace],
    config: TraceConfig,
    *,
    noise_std: float,
    prefix_cache: bool = True,
    skip_layers: bool = True,
) -> list[FactTrace]:
    """Trace several prompts, their restorations sharing forward passes (issue 25's item 3):
    one :class:`FactTrace` per prompt, each equal to :func:`trace_prompt` of that prompt alone
    (float rounding; tested on every architecture and both backends).

    Each prompt's clean and corrupted runs are its own passes.  Its restoration rows are then
    pooled with the other prompts' rows of the same width (a restoration at token ``t`` of a
    prompt of ``n`` tokens runs ``n - t`` tokens with the prefix cache, ``n`` without), so no
    row is padded; in a pass, rows continuing shorter cached prefixes than the longest are
    left-padded in the cache, with their padding masked.  The pooled rows of one width are cut
    into passes by start block (:func:`plan_passes`), each pass within :func:`pass_budget`
    (rows charged :func:`tracing_row_bytes` at the width, the longest prefix and the pass's
    start block).  A fact's ``forward_passes`` counts a shared pass as its share of the pass's
    rows; its ``rows`` are its own.  Arguments as :func:`trace_prompt`.
    """
    facts = [
        _prepare(adapter, p, config, noise_std=noise_std, prefix_cache=prefix_cache)
        for p in prompts
    ]
    n_layers, n_samples = adapter.n_layers, config.n_samples
    # Rows of every fact, by width: (fact, cell, restored token, start block).
    by_width: dict[int, list[tuple[int, int, int, int]]] = {}
    for f, fact in enumerate(facts):
        for index in range(1, len(fact.cells)):
            t = fact.cells[index][1] if fact.past is not None else 0
            layer = _start_layer(fact.cells[index]) if skip_layers else 0
            by_width.setdefault(fact.n_tokens - t, []).append((f, index, t, layer))
    budget = pass_budget(adapter)
    # The last block's outputs at the last position, read out together (below): one readout
    # streams the unembedding once for many passes' rows (a pass of few rows would stream it
    # for those few).
    pending: list[tuple[list[tuple[int, int]], torch.Tensor]] = []
    for width in sorted(by_width, reverse=True):
        units = by_width[width]
        longest = max(t for _, _, t, _ in units)

        def cap(layer: int, width: int = width, longest: int = longest) -> int:
            if config.max_rows:
                return max(1, int(config.max_rows) // n_samples)
            charge = tracing_row_bytes(adapter, width, longest, layer)
            return max(1, int(budget // (n_samples * charge)))

        queue = plan_passes(
            [(k, u[3]) for k, u in enumerate(units)],
            cap,
            n_layers,
            pass_overhead_blocks(adapter, width),
        )
        while queue:
            part = queue.pop(0)
            members = [(units[k][0], units[k][1]) for k in part]
            layer = min(units[k][3] for k in part)
            try:
                states = _run_rows(adapter, facts, members, width, layer, n_samples)
            except torch.cuda.OutOfMemoryError:
                if len(part) == 1:
                    raise
                torch.cuda.empty_cache()  # halve the pass and retry both halves
                queue[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                continue
            pending.append((members, states))
            for f, _ in members:
                facts[f].rows += n_samples
                facts[f].passes += 1 / len(members)
            if sum(len(m) for m, _ in pending) * n_samples >= READOUT_ROWS:
                _read_pending(adapter, pending, facts)
    _read_pending(adapter, pending, facts)
    return [_finish(adapter, fact, config) for fact in facts]


def _prepare(
    adapter: ModelAdapter,
    prompt: PromptToTrace,
    config: TraceConfig,
    *,
    noise_std: float,
    prefix_cache: bool,
) -> _Fact:
    """One prompt's cells, its clean run and its corrupted runs (see :func:`trace_prompt`)."""
    prompt_ids = [int(i) for i in prompt.prompt_ids]
    n_layers, n_tokens = adapter.n_layers, len(prompt_ids)
    subject = sorted(int(p) for p in prompt.subject_positions)
    if not subject or subject[0] < 0 or subject[-1] >= n_tokens:
        raise ConfigError(f"subject positions {subject} outside a prompt of {n_tokens} tokens")
    window = config.resolved_window(n_layers)
    n_samples = config.n_samples
    answer_id = int(prompt.answer_id)
    # Sites whose clean values are restored, in execution order.
    sites = ["embed"] + [
        f"{SITE_OF_KIND[k]}.{layer}" for k in config.kinds for layer in range(n_layers)
    ]
    clean_batch = adapter.batch([prompt_ids])
    final, clean, _ = adapter.final_states(clean_batch, sites=sites)
    p_clean = float(_answer_probs(adapter, final, answer_id)[0])
    # Clean embedding at the subject, and the corrupted values per sample.
    base = clean["embed"][0, subject].float().cpu()
    if config.corruption == "noise":
        noise = torch.randn(n_samples, len(subject), base.shape[-1], generator=prompt.generator)
        corrupted = base[None] + config.noise_scale * noise_std * noise
    else:
        swaps = prompt.swap_embeddings
        if len(swaps) < n_samples:
            raise ConfigError(
                f"subject corruption needs {n_samples} other subjects, got {len(swaps)}"
            )
        corrupted = torch.stack(
            [e.float().cpu()[torch.arange(len(subject)) % e.shape[0]] for e in swaps[:n_samples]]
        )
    corrupted = corrupted.to(adapter.dtype)

    # Cells: (kind, token, layer) -> the sites restored.  The first "cell" is no restoration
    # (the corrupted run itself).  Two kinds of cell are not run because their effect is
    # exactly zero (their score is the corrupted probability): tokens before the subject
    # (causal attention: their states are the same in the clean and corrupted runs), and
    # restorations confined to the last block at a token other than the last (no later
    # layer reads them, and only the last position's logits are measured).
    cells: list[tuple[str, int, int, list[str]]] = [("none", -1, -1, [])]
    skipped: list[tuple[str, int, int]] = []
    for kind in config.kinds:
        site = SITE_OF_KIND[kind]
        for t in range(n_tokens):
            for layer in range(n_layers):
                if kind == "resid":
                    layers = [layer]
                else:
                    layers = window_layers(layer, window, n_layers)
                if t < subject[0] or (t < n_tokens - 1 and min(layers) == n_layers - 1):
                    skipped.append((kind, t, layer))
                    continue
                cells.append((kind, t, layer, [f"{site}.{lo}" for lo in layers]))

    probs = torch.empty(len(cells), n_samples)
    # The corrupted runs: one pass of their own, which keeps the residual stream entering every
    # block (rows restoring at layer l start there, ``skip_layers``) and, with the prefix
    # cache, the keys and values (rows restoring token t hold the tokens from t on).
    probs[0], entering, past = _corrupted_run(
        adapter, prompt_ids, subject, answer_id, corrupted, keep_past=prefix_cache
    )
    return _Fact(
        ids=prompt_ids,
        subject=subject,
        answer_id=answer_id,
        cells=cells,
        skipped=skipped,
        probs=probs,
        clean=clean,
        corrupted=corrupted,
        entering=entering,
        past=past,
        p_clean=p_clean,
        rows=1 + n_samples,
    )


def _finish(adapter: ModelAdapter, fact: _Fact, config: TraceConfig) -> FactTrace:
    """A prepared fact's trace, once every restoration is read."""
    n_layers, n_tokens = adapter.n_layers, fact.n_tokens
    mean = fact.probs.mean(-1).double().numpy()
    scores: dict[str, np.ndarray] = {}
    for kind in config.kinds:
        scores[kind] = np.zeros((n_tokens, n_layers))
    for (kind, t, layer, _), value in zip(fact.cells[1:], mean[1:], strict=True):
        scores[kind][t, layer] = value
    for kind, t, layer in fact.skipped:
        scores[kind][t, layer] = mean[0]
    tok = adapter.tokenizer
    passes = round(fact.passes, 6)
    return FactTrace(
        prompt_ids=list(fact.ids),
        tokens=[tok.decode([i]) for i in fact.ids],
        subject_positions=fact.subject,
        answer_id=fact.answer_id,
        p_clean=fact.p_clean,
        p_corrupt=float(mean[0]),
        scores=scores,
        window=config.resolved_window(n_layers),
        forward_passes=int(passes) if passes == int(passes) else passes,
        rows=fact.rows,
        classes=position_classes(n_tokens, fact.subject),
    )


def _noise_patch(
    subject: list[int], corrupted: torch.Tensor, n_cells: int, start: int = 0
) -> list[Patch]:
    """The corrupted subject embeddings of rows ``(cell, sample)`` (``n_cells`` x samples,
    sample fastest), for rows holding the prompt from token ``start`` on: only the subject
    tokens at or after ``start`` are in them, at positions shifted by ``-start``.  No patch
    when none is."""
    n_samples, _, d = corrupted.shape
    keep = [i for i, p in enumerate(subject) if p >= start]
    if not keep:
        return []
    n_rows = n_cells * n_samples
    return [
        Patch(
            "embed",
            torch.arange(n_rows).repeat_interleave(len(keep)),
            torch.tensor([subject[i] - start for i in keep]).repeat(n_rows),
            corrupted[:, keep].repeat(n_cells, 1, 1).reshape(n_rows * len(keep), d),
        )
    ]


def _answer_probs(adapter: ModelAdapter, final: torch.Tensor, answer_id: int) -> torch.Tensor:
    """The answer's probability at the last position of each row ``[rows]`` (CPU, float32),
    from the last block's outputs: the final norm, the answer's logit and the log-sum-exp over
    the vocabulary a chunk at a time (no ``[rows, vocab]`` logits)."""
    answer = torch.full((final.shape[0],), int(answer_id))
    return adapter.readout_logprobs(final[:, -1], answer).exp().cpu()


#: Rows of last-position states read out together (:func:`_read_pending`).
READOUT_ROWS: int = 4096


def _read_pending(
    adapter: ModelAdapter,
    pending: list[tuple[list[tuple[int, int]], torch.Tensor]],
    facts: Sequence[_Fact],
) -> None:
    """Read out the answer's probability for the passes in ``pending`` (``((fact, cell) of
    each row group, last-position states [groups x samples, d_model])``) in one readout, into
    each fact's ``probs[cell]``; empties it."""
    if not pending:
        return
    states = torch.cat([s for _, s in pending])
    n_samples = facts[0].probs.shape[1]
    answers = torch.tensor(
        [facts[f].answer_id for members, _ in pending for f, _ in members]
    ).repeat_interleave(n_samples)
    p = adapter.readout_logprobs(states, answers).exp().cpu()
    at = 0
    for members, _ in pending:
        for f, cell in members:
            facts[f].probs[cell] = p[at : at + n_samples]
            at += n_samples
    pending.clear()


def _start_layer(cell: tuple[str, int, int, list[str]]) -> int:
    """The lowest block a cell restores: nothing below it differs from the corrupted run."""
    return min(int(site.rsplit(".", 1)[1]) for site in cell[3])


#: The fixed cost of one forward pass on CUDA (launch latency, hooks, masks, cache set-up) in
#: floating-point operations of block work it is worth: a few milliseconds at tens of TFLOP/s
#: (an estimate, not measured: no GPU was lent).  It only decides which rows share a pass
#: (:func:`plan_passes`), never a number.  On CPU the cost is measured in token-blocks
#: instead (:data:`PASS_OVERHEAD_TOKEN_BLOCKS`), the unit in which it holds across models.
PASS_OVERHEAD_FLOPS: dict[str, float] = {"cuda": 2e11}

#: The fixed cost of one forward pass on CPU, in token-blocks (one block at one position of
#: one row), fitted from the tracer's own passes (pass seconds = fixed + per token-block x
#: rows x tokens x blocks, weighted least squares over passes of 1-32 cells, one process):
#: ``OMP_NUM_THREADS=1 python benchmarks/tracing_speed.py --models mlake-tiny,gpt2-small-shape
#: --langs en --calibrate`` (session 15, load average 10-12): mlake-tiny 96 token-blocks
#: (73 ms fixed, 1.6e8 operations), GPT-2-small shape 120 (0.31 s, 2.3e9 operations).  In
#: operations the two differ 14 times, in token-blocks by a quarter (the cost grows with the
#: blocks and their width, as hooks and weight reads do), so the CPU value is in token-blocks:
#: 110, their mean.  The
#: constant it replaces, 1e8 operations, was 5.3 token-blocks on the GPT-2 shape (59 on
#: mlake-tiny): passes were cut far too finely there.
PASS_OVERHEAD_TOKEN_BLOCKS: dict[str, float] = {"cpu": 110.0}


def pass_overhead_blocks(adapter: ModelAdapter, n_tokens: int) -> float:
    """A pass's fixed cost in blocks run by one row of ``n_tokens`` tokens: on CPU
    :data:`PASS_OVERHEAD_TOKEN_BLOCKS` over ``n_tokens``; elsewhere
    :data:`PASS_OVERHEAD_FLOPS` over the operations of one such block (about ``2 (4
    d_model^2 + 3 d_model d_mlp)`` per token)."""
    n_tokens = max(1, n_tokens)
    device = adapter.device.type
    if device in PASS_OVERHEAD_TOKEN_BLOCKS:
        return PASS_OVERHEAD_TOKEN_BLOCKS[device] / n_tokens
    d, d_mlp = adapter.d_model, adapter.d_mlp
    per_block = 2.0 * (4 * d * d + 3 * d * d_mlp) * n_tokens
    return PASS_OVERHEAD_FLOPS.get(device, PASS_OVERHEAD_FLOPS["cuda"]) / per_block


def plan_passes(
    items: Sequence[tuple[int, int]],
    max_cells: int | Callable[[int], int],
    n_layers: int,
    overhead: float,
) -> list[list[int]]:
    """Group cells into passes.  ``items`` are ``(cell, start layer)``; a pass runs from the
    lowest start layer of its cells, so each of its rows costs ``n_layers`` minus that layer in
    blocks, and a pass costs ``overhead`` blocks of one row besides (its fixed cost,
    :func:`pass_overhead_blocks`).  Cells sorted by start layer are cut into runs of at most
    ``max_cells`` cells (a number, or a function of the run's start layer: rows starting
    higher hold fewer blocks' keys and values, so more fit) that minimise the total (dynamic
    programming over the cut points).  Returns the cells of each pass, lowest start layer
    first."""
    order = sorted(items, key=lambda item: item[1])
    limit = max_cells if callable(max_cells) else (lambda _layer: int(max_cells))
    caps: dict[int, int] = {}
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j - 1, -1, -1):
            layer = order[i][1]
            if layer not in caps:
                caps[layer] = max(1, int(limit(layer)))
            if j - i > caps[layer]:
                break  # lower start layers allow no more cells
            cost = best[i] + overhead + (j - i) * (n_layers - layer)
            if cost <= best[j]:  # ties: the longer pass
                best[j], cut[j] = cost, i
    out: list[list[int]] = []
    j = n
    while j > 0:
        out.append([index for index, _ in order[cut[j] : j]])
        j = cut[j]
    return out[::-1]


def _corrupted_run(
    adapter: ModelAdapter,
    prompt_ids: Sequence[int],
    subject: list[int],
    answer_id: int,
    corrupted: torch.Tensor,
    *,
    keep_past: bool = True,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], PastKeyValues | None]:
    """The corrupted runs (one row per sample): the answer's probability ``[n_samples]``, the
    residual stream entering every block (``resid_pre.L``, ``[n_samples, n_tokens, d_model]``)
    and, with ``keep_past`` on a model whose cache can be continued from a prefix, the keys
    and values of every position (else ``None``)."""
    n_samples = corrupted.shape[0]
    batch = adapter.batch([list(prompt_ids)] * n_samples)
    sites = [f"resid_pre.{layer}" for layer in range(adapter.n_layers)]
    noise = _noise_patch(subject, corrupted, 1)
    past = None
    try:
        final, entering, past = adapter.final_states(batch, noise, sites=sites, keep_past=keep_past)
    except NotImplementedError:
        final, entering, _ = adapter.final_states(batch, noise, sites=sites)
    return _answer_probs(adapter, final, answer_id), entering, past


def _rows_past(past: PastKeyValues, rows: torch.Tensor, layer: int) -> PastKeyValues:
    """``past.select(rows)`` for rows that start at block ``layer``: the blocks below never
    run, so their keys and values are not copied: placeholders one value wide that keep the
    prefix's length, which the model reads off the first block's cache (a zero-width one
    would read as an empty cache)."""
    keys, values = [], []
    for block, (k, v) in enumerate(zip(past.keys, past.values, strict=True)):
        if block < layer:
            shape = (len(rows), k.shape[1], k.shape[2], 1)
            keys.append(k.new_zeros(shape))
            values.append(v.new_zeros(shape))
        else:
            keys.append(k.index_select(0, rows.to(k.device)))
            values.append(v.index_select(0, rows.to(v.device)))
    mask = past.attention_mask.index_select(0, rows.to(past.attention_mask.device))
    return PastKeyValues(tuple(keys), tuple(values), mask)


def _left_pad(past: PastKeyValues, length: int) -> PastKeyValues:
    """``past`` with masked zero positions prepended up to ``length`` positions."""
    extra = length - past.length
    if extra <= 0:
        return past

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.cat([t.new_zeros((t.shape[0], t.shape[1], extra, t.shape[3])), t], dim=2)

    mask = past.attention_mask
    return PastKeyValues(
        tuple(pad(k) for k in past.keys),
        tuple(pad(v) for v in past.values),
        torch.cat([mask.new_zeros((mask.shape[0], extra)), mask], dim=1),
    )


def _empty_past(like: PastKeyValues, n_rows: int, length: int) -> PastKeyValues:
    """A past of ``n_rows`` rows and ``length`` masked positions, shaped like ``like``'s
    blocks (for rows with nothing cached in a pass whose other rows continue a prefix)."""

    def zeros(t: torch.Tensor) -> torch.Tensor:
        return t.new_zeros((n_rows, t.shape[1], length, t.shape[3]))

    mask = like.attention_mask
    return PastKeyValues(
        tuple(zeros(k) for k in like.keys),
        tuple(zeros(v) for v in like.values),
        mask.new_zeros((n_rows, length)),
    )


def _cat_pasts(pasts: Sequence[PastKeyValues]) -> PastKeyValues:
    """Rows of several pasts of one length, stacked."""
    if len(pasts) == 1:
        return pasts[0]
    n_blocks = len(pasts[0].keys)
    return PastKeyValues(
        tuple(torch.cat([p.keys[b] for p in pasts]) for b in range(n_blocks)),
        tuple(torch.cat([p.values[b] for p in pasts]) for b in range(n_blocks)),
        torch.cat([p.attention_mask for p in pasts]),
    )


def _run_rows(
    adapter: ModelAdapter,
    facts: Sequence[_Fact],
    members: Sequence[tuple[int, int]],
    width: int,
    layer: int,
    n_samples: int,
) -> torch.Tensor:
    """The last block's output at the last position ``[len(members) * n_samples, d_model]``
    (row ``m * n_samples + s``: member ``m = (fact, cell)``, the cell restored in sample
    ``s``'s corrupted run of that fact), for the answer's probability (:func:`_read_pending`):
    one forward pass.

    Every row holds its prompt's last ``width`` tokens (a fact whose rows continue a cached
    prefix restores tokens at ``n_tokens - width``: its rows continue that many positions of
    its noise sample's corrupted keys and values, left-padded to the pass's longest prefix;
    a fact without a cache holds its whole prompt).  With ``layer`` above 0 the rows start at
    block ``layer`` from their sample's corrupted residual stream there (the blocks below do
    not run; every cell must restore at that block or above); else the subject's corrupted
    embeddings are patched in.
    """
    seqs: list[list[int]] = []
    resid_parts: list[torch.Tensor] = []
    noise: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    by_site: dict[str, tuple[list[int], list[int], list[torch.Tensor]]] = {}
    pasts: list[tuple[PastKeyValues | None, int]] = []
    row = 0
    for f, index in members:
        fact = facts[f]
        _, t, _, restored = fact.cells[index]
        start = fact.n_tokens - width
        if start < 0 or (fact.past is None and start > 0):
            raise ValueError(f"a row of {width} tokens in a prompt of {fact.n_tokens}")
        if t < start:
            raise ValueError(f"cell at token {t} in rows that start at token {start}")
        if layer > 0 and _start_layer(fact.cells[index]) < layer:
            raise ValueError(f"cell restoring {restored} in rows that start at block {layer}")
        seqs.extend([fact.ids[start:]] * n_samples)
        for site in restored:
            r, ts, vals = by_site.setdefault(site, ([], [], []))
            r.extend(range(row, row + n_samples))
            ts.extend([t - start] * n_samples)
            vals.append(fact.clean[site][0, t][None].expand(n_samples, -1))
        if layer > 0:
            # Sample s's corrupted residual stream entering block `layer`, at the rows' tokens
            # (the noise is in it already: no embedding patch).
            resid_parts.append(fact.entering[f"resid_pre.{layer}"][:, start:])
        else:
            for patch in _noise_patch(fact.subject, fact.corrupted, 1, start):
                noise.append((patch.rows + row, patch.positions, patch.values))
        prefix = None
        if fact.past is not None and start > 0:
            prefix = _rows_past(fact.past.crop(start), torch.arange(n_samples), layer)
        pasts.append((prefix, n_samples))
        row += n_samples
    batch = adapter.batch(seqs)
    patches: list[Patch] = []
    if noise:
        patches.append(
            Patch(
                "embed",
                torch.cat([r for r, _, _ in noise]),
                torch.cat([p for _, p, _ in noise]),
                torch.cat([v for _, _, v in noise]),
            )
        )
    for site, (r, ts, vals) in by_site.items():
        patches.append(Patch(site, torch.tensor(r), torch.tensor(ts), torch.cat(vals)))
    rows_past = None
    known = [p for p, _ in pasts if p is not None]
    if known:
        length = max(p.length for p in known)
        rows_past = _cat_pasts(
            [
                _left_pad(p, length) if p is not None else _empty_past(known[0], n, length)
                for p, n in pasts
            ]
        )
    begin = (layer, torch.cat(resid_parts)) if layer > 0 else None
    final, _, _ = adapter.final_states(batch, patches, past=rows_past, start=begin)
    return final[:, -1]


# -- aggregation --------------------------------------------------------------------------------


def class_profile(trace: FactTrace, kind: str) -> np.ndarray:
    """Mean indirect effect ``[len(POSITION_CLASSES), n_layers]`` per position class (NaN for
    classes the prompt does not have), so languages with different token counts compare."""
    effects = trace.effects(kind)
    out = np.full((len(POSITION_CLASSES), effects.shape[1]), np.nan)
    classes = np.array(trace.classes)
    for i, name in enumerate(POSITION_CLASSES):
        sel = classes == name
        if sel.any():
            out[i] = effects[sel].mean(0)
    return out


def profile_similarity(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation of two profiles over the entries both define (NaN if fewer than
    three or either is constant)."""
    x, y = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    ok = ~(np.isnan(x) | np.isnan(y))
    if ok.sum() < 3 or np.std(x[ok]) == 0 or np.std(y[ok]) == 0:
        return math.nan
    return float(np.corrcoef(x[ok], y[ok])[0, 1])
