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
budget allows (:func:`rows_per_pass`; halved and retried on a CUDA out-of-memory error).  Each
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
the fixed cost of a pass, :data:`PASS_OVERHEAD_FLOPS`, decides when rows of neighbouring
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
from collections.abc import Sequence
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
        forward_passes: forward passes spent (the clean run included; with the prefix cache
            the corrupted runs are a pass of their own, without it they share the first
            restoration pass).
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
    forward_passes: int = 0
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
            forward_passes=int(arrays["forward_passes"]),
            rows=int(arrays["rows"]),
            classes=[str(x) for x in arrays["classes"]],
        )


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


def rows_per_pass(
    adapter: ModelAdapter, n_tokens: int, fraction: float = 0.25, *, past_tokens: int = 0
) -> int:
    """How many rows of ``n_tokens`` tokens fit in one patched forward pass.

    The passes run without gradients, so activations live one layer at a time: the estimate
    counts about 8 ``d_model`` and 3 ``d_mlp`` vectors per token (residual, attention and MLP
    intermediates) and the attention scores; no logits (the answer's log-probability is read a
    chunk of the vocabulary at a time, :data:`~mlake_core.models.readout.READOUT_BYTES` at
    most).  Rows that
    continue ``past_tokens`` cached positions attend over those too, and hold the keys and
    values of every block for the whole pass (the cached ones, copied into the pass, and the
    extended ones).  It uses ``fraction`` of CUDA's free memory.  On CPU it uses ``fraction``
    of the available memory, and caps the activations (not the keys and values, which each
    layer reads once) at 96 MiB: throughput per row falls when passes outgrow the caches
    (measured on mlake-tiny, 256-row passes beat 1,400-row ones by 25%).
    """
    bytes_per = max(1, torch.finfo(adapter.dtype).bits // 8)
    n_heads = max(1, adapter.d_model // 64)
    n_tokens = max(1, n_tokens)
    total = n_tokens + max(0, past_tokens)
    per_token = bytes_per * (8 * adapter.d_model + 3 * adapter.d_mlp + 2 * n_heads * total)
    per_row = n_tokens * per_token  # no logits: the readout holds a bounded chunk
    kv_row = 0
    if past_tokens > 0:
        kv_row = bytes_per * 2 * adapter.n_layers * adapter.d_model * (past_tokens + total)
    free = free_bytes(adapter.device)
    if free is None:  # a device whose free memory is not known: the CPU cap alone
        free = 8 << 30
    if adapter.device.type == "cuda":
        return max(1, int(fraction * free // (per_row + kv_row)))
    rows = min((96 << 20) // per_row, fraction * free // (per_row + kv_row))
    return max(1, int(rows))


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
    n_layers, n_tokens = adapter.n_layers, len(prompt_ids)
    subject = sorted(int(p) for p in subject_positions)
    if not subject or subject[0] < 0 or subject[-1] >= n_tokens:
        raise ConfigError(f"subject positions {subject} outside a prompt of {n_tokens} tokens")
    window = config.resolved_window(n_layers)
    n_samples = config.n_samples
    # Sites whose clean values are restored, in execution order.
    sites = ["embed"] + [
        f"{SITE_OF_KIND[k]}.{layer}" for k in config.kinds for layer in range(n_layers)
    ]
    clean_batch = adapter.batch([list(prompt_ids)])
    final, clean, _ = adapter.final_states(clean_batch, sites=sites)
    p_clean = float(_answer_probs(adapter, final, answer_id)[0])
    # Clean embedding at the subject, and the corrupted values per sample.
    base = clean["embed"][0, subject].float().cpu()
    if config.corruption == "noise":
        noise = torch.randn(n_samples, len(subject), base.shape[-1], generator=generator)
        corrupted = base[None] + config.noise_scale * noise_std * noise
    else:
        if len(swap_embeddings) < n_samples:
            raise ConfigError(
                f"subject corruption needs {n_samples} other subjects, got {len(swap_embeddings)}"
            )
        corrupted = torch.stack(
            [
                e.float().cpu()[torch.arange(len(subject)) % e.shape[0]]
                for e in swap_embeddings[:n_samples]
            ]
        )
    corrupted = corrupted.to(adapter.dtype)
    width_of = {s: adapter.site_width(s) for s in sites}

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
    passes, rows = 2, 1 + n_samples
    starts = {i: _start_layer(cells[i]) if skip_layers else 0 for i in range(1, len(cells))}
    by_token: dict[int, list[int]] = {}
    for index in range(1, len(cells)):
        t = cells[index][1] if past is not None else 0
        by_token.setdefault(t, []).append(index)
    # The last block's outputs at the last position, read out together (below): one readout
    # streams the unembedding once for many passes' rows (a pass of few rows would stream it
    # for those few).
    pending: list[tuple[list[int], torch.Tensor]] = []
    for start, members in sorted(by_token.items()):
        # Rows hold the prompt from token `start` on (0 without the prefix cache, or when the
        # subject starts the prompt: nothing to continue).
        prefix = past.crop(start) if past is not None and start > 0 else None
        budget = config.max_rows or rows_per_pass(adapter, n_tokens - start, past_tokens=start)
        width = n_tokens - start
        queue = plan_passes(
            [(i, starts[i]) for i in members],
            max(1, budget // n_samples),
            n_layers,
            pass_overhead_blocks(adapter, width),
        )
        while queue:
            part = queue.pop(0)
            try:
                states = _run_cells(
                    adapter,
                    prompt_ids,
                    subject,
                    answer_id,
                    [cells[i] for i in part],
                    corrupted,
                    clean,
                    width_of,
                    start=start,
                    past=prefix,
                    layer=min(starts[i] for i in part),
                    entering=entering,
                )
            except torch.cuda.OutOfMemoryError:
                if len(part) == 1:
                    raise
                torch.cuda.empty_cache()  # halve the pass and retry both halves
                queue[:0] = [part[: len(part) // 2], part[len(part) // 2 :]]
                continue
            pending.append((part, states))
            passes += 1
            rows += len(part) * n_samples
            if sum(len(c) for c, _ in pending) * n_samples >= READOUT_ROWS:
                _read_pending(adapter, pending, answer_id, probs)
    _read_pending(adapter, pending, answer_id, probs)
    mean = probs.mean(-1).double().numpy()
    scores: dict[str, np.ndarray] = {}
    for kind in config.kinds:
        scores[kind] = np.zeros((n_tokens, n_layers))
    for (kind, t, layer, _), value in zip(cells[1:], mean[1:], strict=True):
        scores[kind][t, layer] = value
    for kind, t, layer in skipped:
        scores[kind][t, layer] = mean[0]
    tok = adapter.tokenizer
    return FactTrace(
        prompt_ids=list(prompt_ids),
        tokens=[tok.decode([i]) for i in prompt_ids],
        subject_positions=subject,
        answer_id=int(answer_id),
        p_clean=p_clean,
        p_corrupt=float(mean[0]),
        scores=scores,
        window=window,
        forward_passes=passes,
        rows=rows,
        classes=position_classes(n_tokens, subject),
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
    pending: list[tuple[list[int], torch.Tensor]],
    answer_id: int,
    probs: torch.Tensor,
) -> None:
    """Read out the answer's probability for the passes in ``pending`` (``(cells, last-position
    states [cells x samples, d_model])``) in one readout, into ``probs[cells]``; empties it."""
    if not pending:
        return
    states = torch.cat([s for _, s in pending])
    p = _answer_probs(adapter, states[:, None], answer_id)
    n_samples = probs.shape[1]
    at = 0
    for cells, s in pending:
        probs[cells] = p[at : at + s.shape[0]].reshape(len(cells), n_samples)
        at += s.shape[0]
    pending.clear()


def _start_layer(cell: tuple[str, int, int, list[str]]) -> int:
    """The lowest block a cell restores: nothing below it differs from the corrupted run."""
    return min(int(site.rsplit(".", 1)[1]) for site in cell[3])


#: The fixed cost of one forward pass (hooks, masks, cache set-up, kernel launches) in
#: floating-point operations of block work it is worth, by device type.  It only decides which
#: rows share a pass (:func:`plan_passes`), never a number.  CPU: a few milliseconds at the
#: ~10-20 GFLOP/s of one core; CUDA: a few milliseconds of launch latency at tens of TFLOP/s
#: (an estimate, not measured here).
PASS_OVERHEAD_FLOPS: dict[str, float] = {"cpu": 1e8, "cuda": 2e11}


def pass_overhead_blocks(adapter: ModelAdapter, n_tokens: int) -> float:
    """A pass's fixed cost (:data:`PASS_OVERHEAD_FLOPS`) in blocks run by one row of
    ``n_tokens`` tokens (a block: about ``2 (4 d_model^2 + 3 d_model d_mlp)`` operations per
    token)."""
    d, d_mlp = adapter.d_model, adapter.d_mlp
    per_block = 2.0 * (4 * d * d + 3 * d * d_mlp) * max(1, n_tokens)
    return PASS_OVERHEAD_FLOPS.get(adapter.device.type, PASS_OVERHEAD_FLOPS["cuda"]) / per_block


def plan_passes(
    items: Sequence[tuple[int, int]], max_cells: int, n_layers: int, overhead: float
) -> list[list[int]]:
    """Group cells into passes.  ``items`` are ``(cell, start layer)``; a pass runs from the
    lowest start layer of its cells, so each of its rows costs ``n_layers`` minus that layer in
    blocks, and a pass costs ``overhead`` blocks of one row besides (its fixed cost,
    :func:`pass_overhead_blocks`).  Cells sorted by start layer are cut into runs of at most
    ``max_cells`` cells that minimise the total (dynamic programming over the cut points).
    Returns the cells of each pass, lowest start layer first."""
    order = sorted(items, key=lambda item: item[1])
    n = len(order)
    best = [0.0] + [math.inf] * n
    cut = [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(max(0, j - max(1, max_cells)), j):
            cost = best[i] + overhead + (j - i) * (n_layers - order[i][1])
            if cost < best[j]:
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


def _run_cells(
    adapter: ModelAdapter,
    prompt_ids: Sequence[int],
    subject: list[int],
    answer_id: int,
    cells: Sequence[tuple[str, int, int, list[str]]],
    corrupted: torch.Tensor,
    clean: dict[str, torch.Tensor],
    width: dict[str, int],
    *,
    start: int = 0,
    past: PastKeyValues | None = None,
    layer: int = 0,
    entering: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The last block's output at the last position ``[len(cells) * n_samples, d_model]``
    (row ``c * n_samples + s``: cell ``c`` restored in sample ``s``'s corrupted run), for the
    answer's probability (:func:`_read_pending`): one forward pass, one row per (cell,
    sample).

    With ``past`` (the corrupted runs' keys and values of the first ``start`` tokens, one row
    per sample), the rows hold only the tokens from ``start`` on and continue the past row of
    their sample; every cell must then restore tokens at or after ``start``.  With ``layer``
    above 0 and ``entering`` (the corrupted runs' ``resid_pre`` states), the rows start at
    block ``layer`` from their sample's corrupted residual stream there (the blocks below do
    not run); every cell must then restore at that block or above.
    """
    n_samples = corrupted.shape[0]
    n_rows = len(cells) * n_samples
    batch = adapter.batch([list(prompt_ids[start:])] * n_rows)
    by_site: dict[str, tuple[list[int], list[int]]] = {}
    for c, (_, t, _, restored) in enumerate(cells):
        if restored and t < start:
            raise ValueError(f"cell at token {t} in rows that start at token {start}")
        if restored and layer > 0 and _start_layer(cells[c]) < layer:
            raise ValueError(f"cell restoring {restored} in rows that start at block {layer}")
        for site in restored:
            r, ts = by_site.setdefault(site, ([], []))
            r.extend(range(c * n_samples, (c + 1) * n_samples))
            ts.extend([t] * n_samples)
    begin = None
    patches: list[Patch] = []
    if layer > 0 and entering is not None:
        # Sample s's corrupted residual stream entering block `layer`, at the rows' tokens
        # (the noise is in it already: no embedding patch).
        resid = entering[f"resid_pre.{layer}"][:, start:]
        begin = (layer, resid.repeat(len(cells), 1, 1))
    else:
        patches = _noise_patch(subject, corrupted, len(cells), start)
    for site, (r, ts) in by_site.items():
        values = clean[site][0, torch.tensor(ts)]
        patches.append(
            Patch(site, torch.tensor(r), torch.tensor(ts) - start, values.reshape(-1, width[site]))
        )
    rows_past = None
    if past is not None:
        rows_past = _rows_past(past, torch.arange(n_rows) % n_samples, layer if begin else 0)
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
