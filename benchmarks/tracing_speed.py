"""Batched causal tracing versus a plain loop of one forward pass per cell, per MLaKE language.

The plain loop is how ROME's reference code traces: for every (kind, token, layer) cell, one
forward pass whose rows are the corrupted samples, with that cell restored, computing the
logits of every position.  The batched tracer (:func:`analysis.tracing.causal.trace_prompt`)
puts many cells' rows in one pass, skips the cells whose effect is zero by construction,
computes no logits (the answer's log-probability at the last position, the log-sum-exp over
the vocabulary a chunk at a time), runs each restoration from the restored token on after the
corrupted run's cached keys and values (the prefix cache), and from its lowest restored block
on, from the corrupted run's residual stream there (block skipping).  Both use the same noise
(same generator seed), and the benchmark checks they give the same numbers.  With
``--full-prompt`` the batched tracer is also timed without the prefix cache (every row the
whole prompt), to show what each part gains.

Prompts: MLaKE's own question prompts (``question`` form) in each language (en, zh, ja, fr,
de), with their subject positions as :func:`~mlake_core.editing.base.locate_prompt` finds them,
the answer's first token with content measured, any bare space token before it joined to the
prompt (as the tracing stage does; the numbers below were measured before that change, on the
first token).  Facts are taken in mlake-tiny's
training order, the first ``--facts`` that locate in the language (the same facts on every
model where they locate); the prompts that do not locate are counted, with the reason.  With
``--subject-at end``, the ``--facts`` of the 300 training facts whose subject ends closest to
the prompt's end instead (the table's ``after`` column: tokens after the subject's last one).

Models (``--models``, all three by default):

* ``mlake-tiny`` (4 layers, d_model 256; trained first if needed), in its own template (``qa``);
* ``gpt2-small-shape``: a random GPT-2 of GPT-2 small's shape (12 layers, d_model 768, 12
  heads, d_mlp 3072, vocabulary 50,257), with the tiny builder's byte-level BPE tokenizer (a
  few hundred tokens, so prompts are 2-4 times GPT-2's real token counts; CJK text splits into
  bytes);
* ``gemma3-270m-shape``: a random Gemma 3 of Gemma 3 270M's shape, its Hugging Face config (18
  layers, d_model 640, 4 heads, 1 key/value head, head width 256, d_mlp 2048, vocabulary
  262,144, a 512-token sliding window on 5 layers of every 6, rope, norms and tied embeddings
  as the real one), with the real Gemma 3 tokenizer copied from the packaged model's converted
  folder (so token counts are Gemma's; the tiny builder's tokenizer when the package is
  missing; the JSON says which).

The random models use the ``qa`` template (``Q: {question}\\nA:``, no demonstrations).

Per (model, language): facts per minute of the batched tracer and of the loop (the loop's
time is measured in the same process, right after the batched tracer on the same prompt), the
speed-up (loop seconds / batched seconds), forward passes and batch rows per fact, the mean
prompt length in tokens and the mean subject start (index of the first subject token, BOS
included), and the largest absolute difference between the two tracers' probabilities (and
relative to the batched tracer's probability: a random model's answer probability is about one
over its vocabulary, so its absolute differences are small whatever happens; the mean clean
and corrupted probabilities are in the JSON).

The loop on the bigger shapes: a full loop there costs 20 minutes to over an hour per prompt on
one CPU thread, so by default it runs ``--loop-cells`` cells per prompt (a seeded random
sample, the same number of each kind, among all the (kind, token, layer) cells), besides its
clean and corrupted passes, and its time is extrapolated: every loop pass of a prompt has the
same shape (the samples times the whole prompt, every position's logits), so the loop time is
the measured clean and corrupted passes plus the mean cell pass times the number of cells
(kinds x tokens x layers).  The difference is then over the cells run.  ``--loop-cells 0``
runs every cell (the default on mlake-tiny).  The JSON has the measured seconds, the cells run,
and the mean and spread of a cell pass's seconds.

**The work and the floor** (counted, not timed).  The unit is a *token-block*: one
transformer block evaluated at one position of one batch row.  The tracer's cells are
reproduced exactly (:func:`tracer_cells`: the same skip rules as ``trace_prompt``: no cell at a
token before the subject, none confined to the last block at a token other than the last), and
the batch rows this gives are checked against the tracer's own count.  With ``n`` prompt
tokens, ``L`` blocks, ``S`` noise samples:

* *current*: what the tracer ran, counted pass by pass (:class:`BlockCounter`: rows x padded
  width x the blocks from the pass's start block);
* *every block* = the clean run (``n L``) + the corrupted runs (``S n L``) + for every computed
  cell at token ``t``, ``S (n - t) L`` (rows from ``t`` on, every block: the tracer before
  issue 25's item 1); without the prefix cache every cell is ``S n L`` (``full_prompt``);
* *minimum* = the same clean and corrupted runs + for every computed cell at token ``t`` whose
  lowest restored layer is ``l``, ``S (n - t) (L - l)``: the row starts at block ``l``, since
  below it every activation from ``t`` on equals the corrupted run's;
* *ideal* (:func:`ideal_speedup`) = the loop's work over the minimum's, each position's
  readout counted as ``d_vocab d_model`` over the first block's weights token-blocks (the
  loop reads logits at every position of every row, the tracer at the last): the speed-up
  over the loop if passes had no fixed cost and a token-block cost the same in both (a model
  of counted work, not a bound: the loop's big passes cost more per token-block on CPU, so a
  measured speed-up can exceed it);
* ``work`` = current / every block (what block skipping left of the old tracer's work) and
  ``floor`` = minimum / current (1 when every row starts at its own block; below 1 where
  :func:`~analysis.tracing.causal.plan_passes` let rows of neighbouring start blocks share a
  pass because a pass's fixed cost outweighed the extra blocks, as on mlake-tiny);
  ``every_block_floor`` = minimum / every block is the old table's floor.

``--every-block`` also times ``trace_prompt(..., skip_layers=False)`` in the same process
(``skip gain`` = its seconds / the batched tracer's).  ``--cross-fact`` also times the
language's facts traced together (``trace_prompts``, their restorations sharing passes, as the
tracing stage runs a group): facts per minute, the ratio to the loop, passes per fact, the
gain over one fact at a time, the difference to it and the floor.  ``--memory`` instead
measures what every pass holds (:class:`~mlake_core.models.planner.TensorPeak`) against its
charge, the budget and the plan; ``--calibrate`` instead fits a pass's fixed cost
(:data:`~analysis.tracing.causal.PASS_OVERHEAD_TOKEN_BLOCKS`).  ``--kinds`` narrows the
restorations traced.

Run (one torch thread; ``OMP_NUM_THREADS=1``)::

    python benchmarks/tracing_speed.py [--models mlake-tiny,gpt2-small-shape,gemma3-270m-shape]
        [--langs en,zh,ja,fr,de] [--facts N] [--samples N] [--loop-cells N] [--full-prompt]
        [--every-block] [--cross-fact] [--memory] [--calibrate] [--kinds K]
        [--subject-at given|end] [--json FILE]

``--facts`` (per language and model; default 2 on mlake-tiny, 1 on the bigger shapes),
``--samples`` (noise samples; default 10 on mlake-tiny, 4 on the bigger shapes) and
``--loop-cells`` (default 0, i.e. all, on mlake-tiny, 45 on the bigger shapes) override the
per-model defaults for every model.  A table per model (rows: languages) is printed at the end,
after each model's JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.tracing.causal import (
    SITE_OF_KIND,
    PromptToTrace,
    TraceConfig,
    embedding_noise_std,
    trace_prompt,
    trace_prompts,
    window_layers,
)
from mlake_core.data import load_mlake
from mlake_core.editing.base import locate_prompt
from mlake_core.errors import MlakeError
from mlake_core.models import load_adapter
from mlake_core.models.adapter import Patch
from mlake_core.models.mlake_tiny import ensure_tiny, read_metadata
from mlake_core.models.prompting import get_template

LANGS: tuple[str, ...] = ("en", "zh", "ja", "fr", "de")


@dataclass(frozen=True)
class ModelSpec:
    """A benchmarked model and its defaults."""

    name: str
    facts: int
    samples: int
    loop_cells: int  # 0: every cell


MODELS: dict[str, ModelSpec] = {
    s.name: s
    for s in (
        ModelSpec("mlake-tiny", facts=2, samples=10, loop_cells=0),
        ModelSpec("gpt2-small-shape", facts=1, samples=4, loop_cells=45),
        ModelSpec("gemma3-270m-shape", facts=1, samples=4, loop_cells=45),
    )
}

#: Gemma 3 270M's config values the Gemma-shaped model takes (besides the TinySize ones).
GEMMA_CONFIG_KEYS: tuple[str, ...] = (
    "vocab_size",
    "head_dim",
    "query_pre_attn_scalar",
    "sliding_window",
    "layer_types",
    "rope_parameters",
    "max_position_embeddings",
    "rms_norm_eps",
    "hidden_activation",
    "final_logit_softcapping",
    "attn_logit_softcapping",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
)

#: Gemma 3 270M's shape, as in its Hugging Face config (used when the package is missing).
GEMMA_270M_CONFIG: dict[str, Any] = {
    "vocab_size": 262144,
    "head_dim": 256,
    "query_pre_attn_scalar": 256,
    "sliding_window": 512,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "rope_parameters": {
        "full_attention": {"rope_theta": 1000000.0, "rope_type": "default"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"},
    },
    "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6,
    "hidden_activation": "gelu_pytorch_tanh",
    "final_logit_softcapping": None,
    "attn_logit_softcapping": None,
}


# -- the cells and the floor ------------------------------------------------------------------


def tracer_cells(
    n_tokens: int, n_layers: int, subject: list[int], config: TraceConfig
) -> list[tuple[str, int, int, int]]:
    """The cells ``trace_prompt`` computes, ``(kind, token, layer, lowest restored layer)``,
    with its skip rules (no cell before the subject; none confined to the last block at a
    token other than the last)."""
    window = config.resolved_window(n_layers)
    first = min(subject)
    out = []
    for kind in config.kinds:
        for t in range(n_tokens):
            for layer in range(n_layers):
                layers = [layer] if kind == "resid" else window_layers(layer, window, n_layers)
                if t < first or (t < n_tokens - 1 and min(layers) == n_layers - 1):
                    continue
                out.append((kind, t, layer, min(layers)))
    return out


def token_blocks(
    n_tokens: int, n_layers: int, subject: list[int], config: TraceConfig, prefix_cache: bool
) -> dict[str, float]:
    """The batched tracer's work in token-blocks: with the prefix cache but every block (the
    tracer before issue 25's item 1), at the floor (every row from its restored block), and
    without the prefix cache (module docstring)."""
    n, big_l, s = n_tokens, n_layers, config.n_samples
    cells = tracer_cells(n, big_l, subject, config)
    base = n * big_l + s * n * big_l  # the clean run and the corrupted runs
    full = sum(s * n * big_l for _ in cells)
    now = sum(s * (n - t) * big_l for _, t, _, _ in cells) if prefix_cache else full
    low = sum(s * ((n - t) if prefix_cache else n) * (big_l - lo) for _, t, _, lo in cells)
    return {
        "cells": len(cells),
        "rows": 1 + s * (len(cells) + 1),
        "every_block": base + now,
        "minimum": base + low,
        "full_prompt": base + full,
        "restorations_every_block": now,
        "restorations_minimum": low,
    }


def ideal_speedup(
    n_tokens: int, n_layers: int, subject: list[int], config: TraceConfig, readout: float
) -> float:
    """The loop's work over the floor's, both in token-blocks with each position's readout
    counted as ``readout`` token-blocks (:func:`readout_blocks`): the speed-up over the loop
    if a token-block and a readout cost the same in both and a pass had no fixed cost.  A
    model of counted work, not a bound: on CPU the loop's passes (whole prompts, attention
    over every earlier token, every position's logits in memory) cost more per token-block
    than the tracer's, so a measured speed-up can exceed it.

    The loop runs every cell (``kinds x n x L``, zero-effect ones too), each pass ``S`` rows of
    the whole prompt through every block and the logits at every position, after its clean
    (one row) and corrupted (``S`` rows) passes, logits likewise.  The floor runs the same clean
    and corrupted passes without logits, every computed cell's rows from its restored token on
    and from its lowest restored block on (:func:`token_blocks`' ``minimum``), and one readout
    per row at the last position."""
    n, big_l, s = n_tokens, n_layers, config.n_samples
    cells = tracer_cells(n, big_l, subject, config)
    all_cells = len(config.kinds) * n * big_l
    loop = (1 + s) * n * (big_l + readout) + all_cells * s * n * (big_l + readout)
    floor = token_blocks(n, big_l, subject, config, True)["minimum"] + readout * (
        1 + s + s * len(cells)
    )
    return loop / floor


def readout_blocks(path: Path, d_model: int, d_vocab: int) -> float:
    """One position's readout (``d_vocab x d_model`` multiply-adds) in token-blocks: over the
    weights of the model's first block (its 2-D tensors in the folder's safetensors files, the
    multiply-adds a block does per token apart from attention scores)."""
    import re

    from safetensors import safe_open

    first = re.compile(r"(?:^|\.)(?:layers|h|blocks)\.0\.")
    weights = 0
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                if first.search(key):
                    shape = st.get_slice(key).get_shape()
                    if len(shape) == 2:
                        weights += int(shape[0]) * int(shape[1])
    if weights == 0:
        raise AssertionError(f"{path}: no first-block weights found in its safetensors files")
    return d_vocab * d_model / weights


class BlockCounter:
    """Counts the token-blocks an adapter's ``final_states`` passes run (rows x tokens x
    blocks from the pass's start block), by wrapping the method on the instance."""

    def __init__(self, adapter: Any) -> None:
        self.adapter, self.count = adapter, 0
        inner = adapter.final_states

        def counting(batch, *args, **kwargs):
            start = kwargs.get("start")
            first = int(start[0]) if start is not None else 0
            rows, width = batch.shape
            self.count += rows * width * (adapter.n_layers - first)
            return inner(batch, *args, **kwargs)

        adapter.final_states = counting

    def take(self) -> int:
        value, self.count = self.count, 0
        return value


# -- the loop -----------------------------------------------------------------------------------


def loop_trace(
    adapter,
    prompt_ids,
    subject,
    answer_id,
    config,
    generator,
    noise_std,
    only: set[tuple[str, int, int]] | None = None,
):
    """Plain tracing: one forward pass (all positions' logits) per cell; with ``only``, just
    those cells (the others' scores NaN).  Returns the corrupted probability, the scores, the
    seconds of the clean and corrupted passes, and the seconds of each cell pass."""
    n_layers, n_tokens = adapter.n_layers, len(prompt_ids)
    window = config.resolved_window(n_layers)
    sites = ["embed"] + [
        f"{SITE_OF_KIND[k]}.{layer}" for k in config.kinds for layer in range(n_layers)
    ]
    start = time.perf_counter()
    _, clean = adapter.run_with_cache(adapter.batch([list(prompt_ids)]), sites)
    base = clean["embed"][0, subject].float().cpu()
    noise = torch.randn(config.n_samples, len(subject), base.shape[-1], generator=generator)
    corrupted = (base[None] + config.noise_scale * noise_std * noise).to(adapter.dtype)
    n = config.n_samples
    batch = adapter.batch([list(prompt_ids)] * n)
    embed = Patch(
        "embed",
        torch.arange(n).repeat_interleave(len(subject)),
        torch.tensor(subject).repeat(n),
        corrupted.reshape(-1, corrupted.shape[-1]),
    )

    def prob(patches):
        logits = adapter.run_with_patches(batch, [embed, *patches])
        return float(logits[:, -1].float().softmax(-1)[:, answer_id].mean())

    p_corrupt = prob([])
    setup_s = time.perf_counter() - start
    cell_s: list[float] = []
    scores = {}
    for kind in config.kinds:
        site = SITE_OF_KIND[kind]
        out = np.full((n_tokens, n_layers), np.nan)
        for t in range(n_tokens):
            for layer in range(n_layers):
                if only is not None and (kind, t, layer) not in only:
                    continue
                start = time.perf_counter()
                layers = [layer] if kind == "resid" else window_layers(layer, window, n_layers)
                patches = [
                    Patch(
                        f"{site}.{lo}",
                        torch.arange(n),
                        torch.full((n,), t),
                        clean[f"{site}.{lo}"][0, t][None].expand(n, -1),
                    )
                    for lo in layers
                ]
                out[t, layer] = prob(patches)
                cell_s.append(time.perf_counter() - start)
        scores[kind] = out
    return p_corrupt, scores, setup_s, cell_s


def loop_sample(
    n_tokens: int, n_layers: int, config: TraceConfig, k: int, seed: int
) -> set[tuple[str, int, int]] | None:
    """A seeded random sample of ``k`` loop cells, the same number of each kind (``None``:
    every cell, when ``k`` is 0 or covers them all)."""
    per_kind = -(-k // len(config.kinds)) if k > 0 else 0
    if per_kind == 0 or per_kind >= n_tokens * n_layers:
        return None
    rng = np.random.default_rng(seed)
    out = set()
    for kind in config.kinds:
        for i in rng.choice(n_tokens * n_layers, size=per_kind, replace=False):
            out.add((kind, int(i) // n_layers, int(i) % n_layers))
    return out


# -- one model, one language --------------------------------------------------------------------


def bench_language(
    adapter,
    items,
    config,
    noise_std,
    loop_cells,
    full_prompt=False,
    every_block=False,
    counter=None,
    cross_fact=False,
    readout=None,
):
    """Time both tracers on ``items`` (one language's prompts) and count their work; with
    ``cross_fact``, also the batched tracer on all the items at once (``trace_prompts``: their
    restorations sharing passes, as the tracing stage runs a group of facts)."""
    n_layers = adapter.n_layers
    counter = counter or BlockCounter(adapter)
    batched_s = loop_s = loop_measured_s = full_s = every_s = 0.0
    every_diffs, passes_e, counted = [], [], 0
    diffs, passes_b, passes_l, rows_b, cells_run, cell_pass_s = [], [], [], [], [], []
    rel_diffs, p_clean, p_corrupt_b = [], [], []
    full_diffs, passes_f = [], []
    work: dict[str, float] = {}
    prefix_used = []
    singles = []
    for fact_id, lang, ids, subject, answer in items:
        seed = fact_id * 10 + LANGS.index(lang)
        t = time.perf_counter()
        tr = trace_prompt(
            adapter,
            ids,
            subject,
            answer,
            config,
            torch.Generator().manual_seed(seed),
            noise_std=noise_std,
        )
        batched_s += time.perf_counter() - t
        counted += counter.take()
        singles.append(tr)
        if every_block:
            t = time.perf_counter()
            every = trace_prompt(
                adapter,
                ids,
                subject,
                answer,
                config,
                torch.Generator().manual_seed(seed),
                noise_std=noise_std,
                skip_layers=False,
            )
            every_s += time.perf_counter() - t
            counter.take()
            every_diffs.append(abs(every.p_corrupt - tr.p_corrupt))
            for kind in config.kinds:
                every_diffs.append(float(np.abs(every.scores[kind] - tr.scores[kind]).max()))
            passes_e.append(every.forward_passes)
        if full_prompt:
            t = time.perf_counter()
            full = trace_prompt(
                adapter,
                ids,
                subject,
                answer,
                config,
                torch.Generator().manual_seed(seed),
                noise_std=noise_std,
                prefix_cache=False,
            )
            full_s += time.perf_counter() - t
            counter.take()
            full_diffs.append(abs(full.p_corrupt - tr.p_corrupt))
            for kind in config.kinds:
                full_diffs.append(float(np.abs(full.scores[kind] - tr.scores[kind]).max()))
            passes_f.append(full.forward_passes)
        only = loop_sample(len(ids), n_layers, config, loop_cells, seed)
        t = time.perf_counter()
        p_corrupt, scores, setup_s, cell_s = loop_trace(
            adapter,
            ids,
            subject,
            answer,
            config,
            torch.Generator().manual_seed(seed),
            noise_std,
            only,
        )
        measured = time.perf_counter() - t
        total_cells = len(config.kinds) * len(ids) * n_layers
        loop_measured_s += measured
        loop_s += measured if only is None else setup_s + float(np.mean(cell_s)) * total_cells
        cells_run.append(len(cell_s))
        cell_pass_s.extend(cell_s)
        diffs.append(abs(p_corrupt - tr.p_corrupt))
        rel_diffs.append(abs(p_corrupt - tr.p_corrupt) / tr.p_corrupt)
        for kind in config.kinds:
            gap = np.abs(scores[kind] - tr.scores[kind])
            diffs.append(float(np.nanmax(gap)))
            rel_diffs.append(float(np.nanmax(gap / tr.scores[kind])))
        p_clean.append(tr.p_clean)
        p_corrupt_b.append(tr.p_corrupt)
        passes_b.append(tr.forward_passes)
        rows_b.append(tr.rows)
        passes_l.append(2 + total_cells)
        # Did the tracer continue the corrupted run's cache (as trace_prompt decides)?
        try:
            adapter.run_with_past(adapter.batch([list(ids)]), [], last_only=True)
            prefix_used.append(True)
        except NotImplementedError:
            prefix_used.append(False)
        w = token_blocks(len(ids), n_layers, subject, config, prefix_used[-1])
        if w["rows"] != tr.rows:
            raise AssertionError(
                f"fact {fact_id} [{lang}]: the reproduced cells give {w['rows']} rows, the "
                f"tracer ran {tr.rows}"
            )
        for key, value in w.items():
            work[key] = work.get(key, 0) + value
    n = len(items)
    cross: dict[str, Any] | None = None
    if cross_fact:
        group = [
            PromptToTrace(
                ids, subject, answer, torch.Generator().manual_seed(fact_id * 10 + LANGS.index(lg))
            )
            for fact_id, lg, ids, subject, answer in items
        ]
        t = time.perf_counter()
        together = trace_prompts(adapter, group, config, noise_std=noise_std)
        cross_s = time.perf_counter() - t
        cross_counted = counter.take()
        gaps = [abs(a.p_corrupt - b.p_corrupt) for a, b in zip(together, singles, strict=True)]
        for a, b in zip(together, singles, strict=True):
            gaps.extend(float(np.abs(a.scores[k] - b.scores[k]).max()) for k in config.kinds)
        cross = {
            "seconds": round(cross_s, 2),
            "facts_per_minute": round(60 * n / cross_s, 3),
            "forward_passes_per_fact": float(np.mean([x.forward_passes for x in together])),
            "rows_per_fact": float(np.mean([x.rows for x in together])),
            "speedup": round(loop_s / cross_s, 2),
            "gain_over_one_fact": round(batched_s / cross_s, 2),
            "max_abs_difference_to_one_fact": float(max(gaps)),
            "token_blocks_per_fact": cross_counted / n,
            "floor": round(work["minimum"] / cross_counted, 4),
        }
    out: dict[str, Any] = {
        "facts": n,
        "fact_ids": [i[0] for i in items],
        "tokens_per_prompt": float(np.mean([len(i[2]) for i in items])),
        "subject_start": float(np.mean([min(i[3]) for i in items])),
        "subject_tokens": float(np.mean([len(i[3]) for i in items])),
        "prefix_cache": all(prefix_used),
        "batched": {
            "seconds": round(batched_s, 2),
            "facts_per_minute": round(60 * n / batched_s, 3),
            "forward_passes_per_fact": float(np.mean(passes_b)),
            "rows_per_fact": float(np.mean(rows_b)),
        },
        "loop": {
            "seconds": round(loop_s, 2),
            "measured_seconds": round(loop_measured_s, 2),
            "extrapolated": any(c < p - 2 for c, p in zip(cells_run, passes_l, strict=True)),
            "cells_run_per_fact": float(np.mean(cells_run)),
            "cell_pass_seconds_mean": round(float(np.mean(cell_pass_s)), 4),
            "cell_pass_seconds_std": round(float(np.std(cell_pass_s)), 4),
            "facts_per_minute": round(60 * n / loop_s, 3),
            "forward_passes_per_fact": float(np.mean(passes_l)),
        },
        "speedup": round(loop_s / batched_s, 2),
        "max_abs_difference": float(max(diffs)),
        "max_rel_difference": float(max(rel_diffs)),
        "p_clean": float(np.mean(p_clean)),
        "p_corrupt": float(np.mean(p_corrupt_b)),
        "floor": {
            "current_token_blocks_per_fact": counted / n,
            "every_block_token_blocks_per_fact": work["every_block"] / n,
            "minimum_token_blocks_per_fact": work["minimum"] / n,
            "full_prompt_token_blocks_per_fact": work["full_prompt"] / n,
            "work_vs_every_block": round(counted / work["every_block"], 4),
            "floor": round(work["minimum"] / counted, 4),
            "headroom": round(counted / work["minimum"], 3),
            "every_block_floor": round(work["minimum"] / work["every_block"], 4),
        },
    }
    if readout is not None:
        out["readout_token_blocks"] = round(readout, 2)
        out["ideal_speedup"] = round(
            float(
                np.mean([ideal_speedup(len(i[2]), n_layers, i[3], config, readout) for i in items])
            ),
            2,
        )
    if cross is not None:
        out["batched_cross_fact"] = cross
    if every_block:
        out["batched_every_block"] = {
            "seconds": round(every_s, 2),
            "facts_per_minute": round(60 * n / every_s, 3),
            "forward_passes_per_fact": float(np.mean(passes_e)),
            "skip_speedup": round(every_s / batched_s, 2),
            "max_abs_difference_to_batched": float(max(every_diffs)),
        }
    if full_prompt:
        out["batched_full_prompt"] = {
            "seconds": round(full_s, 2),
            "facts_per_minute": round(60 * n / full_s, 3),
            "forward_passes_per_fact": float(np.mean(passes_f)),
            "prefix_cache_speedup": round(full_s / batched_s, 2),
            "max_abs_difference_to_batched": float(max(full_diffs)),
        }
    return out


def prompts(adapter, dataset, fact_ids, template, lang, n, subject_at="given"):
    """The first ``n`` facts of ``fact_ids`` whose question prompt locates in ``lang``:
    ``(fact_id, lang, prompt_ids, subject_positions, answer_id)``, and the reasons of the
    others (counts).

    ``subject_at="end"`` instead takes, among all of ``fact_ids`` that locate, the ``n`` whose
    subject ends closest to the prompt's end (fewest tokens after the subject's last token;
    ties in ``fact_ids`` order): MLaKE's own questions with the subject at the end (issue 25's
    40x target), rather than a prompt written for it."""
    items, skipped = [], {}
    for fact_id in fact_ids:
        view = dataset.fact(fact_id).views[lang]
        try:
            loc = locate_prompt(adapter, view, template)
        except MlakeError as err:
            reason = str(err).split(": ", 1)[-1]
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        # As the tracing stage: the answer's first token with content, any bare space before
        # it joined to the prompt (LocatedPrompt.answer_start).
        lead, answer = loc.answer_start(adapter, view.form("question").target.text)
        if answer is None:
            skipped["empty answer"] = skipped.get("empty answer", 0) + 1
            continue
        items.append(
            (fact_id, lang, [*loc.prompt_ids, *lead], sorted(loc.subject_positions), int(answer))
        )
        if len(items) == n and subject_at == "given":
            break
    if subject_at == "end":
        order = sorted(range(len(items)), key=lambda i: (tokens_after_subject(items[i]), i))
        items = [items[i] for i in order[:n]]
    return items, skipped


def tokens_after_subject(item) -> int:
    """Prompt tokens after the subject's last token (0: the subject ends the prompt)."""
    _, _, ids, subject, _ = item
    return len(ids) - 1 - max(subject)


# -- the models ---------------------------------------------------------------------------------


def build_model(name: str, folder: Path) -> tuple[Path, str, dict[str, Any]]:
    """The model's folder, its template name and a description of it."""
    from mlake_core.models.tiny import TinySize, build_tiny_model

    if name == "mlake-tiny":
        path = ensure_tiny()
        meta = read_metadata(path)
        return path, meta["config"]["template"], {"tokenizer": "mlake-tiny's own"}
    if name == "gpt2-small-shape":
        size = TinySize(
            n_layers=12,
            d_model=768,
            n_heads=12,
            n_kv_heads=12,
            d_mlp=3072,
            n_ctx=1024,
            vocab_size=2000,
            init_std=0.02,
            noise_std=0.0,
        )
        path = build_tiny_model("gpt2", folder, size=size, config_overrides={"vocab_size": 50257})
        return path, "qa", {"tokenizer": "tiny builder's byte-level BPE"}
    real = _gemma_folder()
    config = dict(GEMMA_270M_CONFIG)
    if real is not None:
        packaged = json.loads((real / "config.json").read_text(encoding="utf-8"))
        shape = tuple(
            packaged[k]
            for k in (
                "num_hidden_layers",
                "hidden_size",
                "num_attention_heads",
                "num_key_value_heads",
                "intermediate_size",
            )
        )
        if shape != (18, 640, 4, 1, 2048):
            raise AssertionError(f"{real}/config.json is not Gemma 3 270M's shape: {shape}")
        config = {k: packaged[k] for k in GEMMA_CONFIG_KEYS if k in packaged}
    size = TinySize(
        n_layers=18,
        d_model=640,
        n_heads=4,
        n_kv_heads=1,
        d_mlp=2048,
        n_ctx=config["max_position_embeddings"],
        vocab_size=2000,
        init_std=0.02,
        noise_std=0.0,
    )
    path = build_tiny_model("gemma3_text", folder, size=size, config_overrides=config)
    if real is None:
        return path, "qa", {"tokenizer": "tiny builder's byte-level BPE (Gemma package missing)"}
    # The real tokenizer: the tiny one's files out, the packaged model's in.
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (path / f).unlink(missing_ok=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(real / f, path / f)
    return path, "qa", {"tokenizer": f"real Gemma 3 tokenizer (from {real})"}


def _gemma_folder() -> Path | None:
    """The packaged Gemma 3 270M's converted folder (its config and tokenizer), if any."""
    try:
        from mlake_core.models.gguf_weights import resolve_gguf

        weights = resolve_gguf("gemma-3-270m")
    except MlakeError:
        return None
    return None if weights is None else Path(weights.folder)


def bench_model(name, spec, args, dataset, fact_ids, langs):
    config = TraceConfig(n_samples=spec.samples, kinds=args.kinds or TraceConfig.kinds)
    with tempfile.TemporaryDirectory(prefix="tracing-speed-") as tmp:
        t = time.perf_counter()
        path, template_name, about = build_model(name, Path(tmp) / name)
        adapter = load_adapter(str(path), "tlens", device=args.device)
        readout = readout_blocks(path, adapter.d_model, adapter.info.d_vocab)
        build_s = time.perf_counter() - t
        if hasattr(adapter.tokenizer, "model_max_length"):
            adapter.tokenizer.model_max_length = int(1e9)  # the tiny tokenizer says 64
        template = get_template(template_name)
        counter = BlockCounter(adapter)
        by_lang, skipped = {}, {}
        for lang in langs:
            by_lang[lang], skipped[lang] = prompts(
                adapter, dataset, fact_ids, template, lang, spec.facts, args.subject_at
            )
        everything = [i for items in by_lang.values() for i in items]
        std = embedding_noise_std(adapter, [(i[2], i[3]) for i in everything])
        result: dict[str, Any] = {
            "model": name,
            **about,
            "template": template_name,
            "n_layers": adapter.n_layers,
            "d_model": adapter.d_model,
            "d_vocab": adapter.info.d_vocab,
            "samples": spec.samples,
            "window": config.resolved_window(adapter.n_layers),
            "loop_cells": spec.loop_cells,
            "subject_at": args.subject_at,
            "noise_std": std,
            "build_and_load_seconds": round(build_s, 1),
            "languages": {},
        }
        if args.memory:
            result["memory"] = {}
            for lang in langs:
                if by_lang[lang]:
                    result["memory"][lang] = measure_memory(adapter, by_lang[lang], config, std)
                    print(f"[{name} {lang}] {json.dumps(result['memory'][lang])}", flush=True)
            langs = []
        if args.calibrate:
            first = next(items[0] for items in by_lang.values() if items)
            result["pass_overhead"] = calibrate_overhead(adapter, first, config)
            print(f"[{name}] {json.dumps(result['pass_overhead'])}", flush=True)
            langs = []
        for lang in langs:
            items = by_lang[lang]
            entry: dict[str, Any] = {"skipped": skipped[lang]}
            if items:
                t = time.perf_counter()
                entry.update(
                    bench_language(
                        adapter,
                        items,
                        config,
                        std,
                        spec.loop_cells,
                        args.full_prompt,
                        args.every_block,
                        counter,
                        args.cross_fact,
                        readout,
                    )
                )
                entry["wall_seconds"] = round(time.perf_counter() - t, 1)
                entry["tokens_after_subject"] = float(
                    np.mean([tokens_after_subject(i) for i in items])
                )
            else:
                entry["facts"] = 0
            result["languages"][lang] = entry
            print(f"[{name} {lang}] {json.dumps(entry)}", flush=True)
        result["torch_threads"] = torch.get_num_threads()
        result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        del adapter
    return result


# -- memory: what passes hold against what they were charged ----------------------------------


def measure_memory(adapter, items, config, noise_std):
    """Trace ``items`` together (``trace_prompts``), measuring what each forward pass holds at
    once (:class:`~mlake_core.models.planner.TensorPeak`: the tensor storage it allocates,
    counted exactly) against what the tracer charged it (rows x ``tracing_row_bytes`` at the
    pass's width, longest cached prefix and start block) and the pass budget, and the plan's
    tracing row (``rows_per_pass``'s worst case over the restored tokens, at the longest
    prompt)."""
    from analysis.tracing.causal import pass_budget, rows_per_pass, tracing_row_bytes
    from mlake_core.models.planner import TensorPeak

    passes, setup = [], []
    inner = adapter.final_states

    def measuring(batch, *args, **kwargs):
        with TensorPeak() as peak:
            out = inner(batch, *args, **kwargs)
        past, start = kwargs.get("past"), kwargs.get("start")
        rows, width = batch.shape
        if past is None and start is None and kwargs.get("sites"):
            setup.append(peak.peak)  # a clean or corrupted run (keeps per-fact caches)
            return out
        layer = int(start[0]) if start is not None else 0
        length = past.length if past is not None else 0
        charge = rows * tracing_row_bytes(adapter, width, length, layer)
        passes.append((peak.peak, charge, rows))
        return out

    group = [
        PromptToTrace(ids, subject, answer, torch.Generator().manual_seed(fact_id))
        for fact_id, _, ids, subject, answer in items
    ]
    adapter.final_states = measuring
    try:
        with TensorPeak() as whole:
            trace_prompts(adapter, group, config, noise_std=noise_std)
    finally:
        del adapter.final_states
    n = max(len(i[2]) for i in items)
    plan_rows = rows_per_pass(adapter, n)
    plan_row = max(tracing_row_bytes(adapter, n - p, p) for p in range(n))
    ratios = [peak / charge for peak, charge, _ in passes]
    mib = 2**20
    return {
        "facts": len(items),
        "tokens": [len(i[2]) for i in items],
        "passes": len(passes),
        "budget_mib": round(pass_budget(adapter) / mib, 2),
        "plan_rows_per_pass": plan_rows,
        "plan_row_kib": round(plan_row / 1024, 1),
        "plan_pass_mib": round(plan_rows * plan_row / mib, 2),
        "max_pass_charge_mib": round(max(c for _, c, _ in passes) / mib, 2),
        "max_pass_peak_mib": round(max(p for p, _, _ in passes) / mib, 2),
        "peak_over_charge_min": round(min(ratios), 3),
        "peak_over_charge_median": round(float(np.median(ratios)), 3),
        "peak_over_charge_max": round(max(ratios), 3),
        "clean_and_corrupted_runs_peak_mib": round(max(setup) / mib, 2),
        "whole_trace_peak_mib": round(whole.peak / mib, 2),
    }


# -- the fixed cost of a pass ----------------------------------------------------------------


def calibrate_overhead(adapter, item, config, sizes=(1, 2, 4, 8, 16, 32), repeats=5):
    """Time the tracer's own restoration passes (``_run_rows``: one fact's cells at one token,
    rows from block 0) of ``k`` cells for each ``k`` in ``sizes``, and fit ``seconds = a + b *
    token_blocks`` by least squares on each size's median: ``a / b`` token-blocks is the fixed
    cost of a pass (the fit weighted by ``1 / seconds``), ``a / b`` times a token-block's operations (``2 (4 d^2 + 3 d d_mlp)``) the
    value of :data:`~analysis.tracing.causal.PASS_OVERHEAD_FLOPS` on this device (``a / b``
    itself: :data:`~analysis.tracing.causal.PASS_OVERHEAD_TOKEN_BLOCKS`)."""
    from analysis.tracing.causal import _prepare, _run_rows

    fact_id, lang, ids, subject, answer = item
    fact = _prepare(
        adapter,
        PromptToTrace(ids, subject, answer, torch.Generator().manual_seed(0)),
        config,
        noise_std=0.02,
        prefix_cache=True,
    )
    t = fact.cells[-1][1]  # the last token: the cells there, from block 0
    cells = [i for i, c in enumerate(fact.cells) if i and c[1] == t]
    width = len(ids) - (t if fact.past is not None else 0)
    seconds, work = [], []
    for k in sizes:
        members = [(0, cells[i % len(cells)]) for i in range(k)]
        runs = []
        for _ in range(repeats + 1):
            start = time.perf_counter()
            _run_rows(adapter, [fact], members, width, 0, config.n_samples)
            runs.append(time.perf_counter() - start)
        seconds.append(float(np.median(runs[1:])))  # the first warms up
        work.append(k * config.n_samples * width * adapter.n_layers)
    # Weighted by 1 / seconds: relative errors, so the big passes do not decide the intercept.
    y = np.asarray(seconds, float)
    b, a = np.polyfit(np.asarray(work, float), y, 1, w=1 / y)
    per_block = 2.0 * (4 * adapter.d_model**2 + 3 * adapter.d_model * adapter.d_mlp)
    return {
        "fact_id": fact_id,
        "lang": lang,
        "width": width,
        "samples": config.n_samples,
        "cells": list(sizes),
        "seconds": [round(x, 5) for x in seconds],
        "token_blocks": work,
        "fixed_seconds": float(a),
        "seconds_per_token_block": float(b),
        "overhead_token_blocks": float(a / b),
        "overhead_flops": float(a / b * per_block),
        "flops_per_second": float(per_block / b),
    }


# -- the report ---------------------------------------------------------------------------------


def table(result: dict[str, Any]) -> str:
    """A readable table of one model's result (rows: languages)."""
    head = (
        f"{result['model']} ({result['n_layers']} layers, d_model {result['d_model']}, "
        f"vocabulary {result['d_vocab']}; {result['samples']} samples, window "
        f"{result['window']}; tokenizer: {result['tokenizer']}; template {result['template']})"
    )
    cols = [
        ("lang", 4),
        ("facts", 5),
        ("tokens", 6),
        ("subj@", 5),
        ("after", 5),
        ("batched f/min", 13),
        ("loop f/min", 10),
        ("speed-up", 8),
        ("ideal", 6),
        ("passes b/l", 11),
        ("rows/fact", 9),
        ("max |diff|", 10),
        ("(relative)", 10),
        ("work", 6),
        ("floor", 6),
        ("skip gain", 9),
        ("x-fact f/min", 12),
        ("x-fact speed-up", 15),
        ("x-fact passes", 13),
        ("x-fact floor", 12),
    ]
    lines = [
        head,
        "  ".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}" for i, (c, w) in enumerate(cols)),
    ]
    extrapolated = False
    for lang, e in result["languages"].items():
        if not e.get("facts"):
            lines.append(f"{lang:<4}  no prompt located: {e['skipped']}")
            continue
        extrapolated |= e["loop"]["extrapolated"]
        star = "*" if e["loop"]["extrapolated"] else ""
        values = [
            lang,
            str(e["facts"]),
            f"{e['tokens_per_prompt']:.1f}",
            f"{e['subject_start']:.1f}",
            f"{e['tokens_after_subject']:.1f}" if "tokens_after_subject" in e else "-",
            f"{e['batched']['facts_per_minute']:.3g}",
            f"{e['loop']['facts_per_minute']:.3g}{star}",
            f"{e['speedup']:.2f}x",
            f"{e['ideal_speedup']:.1f}x" if "ideal_speedup" in e else "-",
            f"{e['batched']['forward_passes_per_fact']:.0f}/"
            f"{e['loop']['forward_passes_per_fact']:.0f}",
            f"{e['batched']['rows_per_fact']:.0f}",
            f"{e['max_abs_difference']:.1e}",
            f"{e['max_rel_difference']:.1e}",
            f"{e['floor']['work_vs_every_block']:.3f}",
            f"{e['floor']['floor']:.3f}",
            f"{e['batched_every_block']['skip_speedup']:.2f}x"
            if "batched_every_block" in e
            else "-",
        ]
        x = e.get("batched_cross_fact")
        values += (
            [
                f"{x['facts_per_minute']:.3g}",
                f"{x['speedup']:.2f}x",
                f"{x['forward_passes_per_fact']:.1f}",
                f"{x['floor']:.3f}",
            ]
            if x
            else ["-"] * 4
        )
        lines.append(
            "  ".join(
                f"{v:<{w}}" if i == 0 else f"{v:>{w}}"
                for i, (v, (_, w)) in enumerate(zip(values, cols, strict=True))
            )
        )
    if extrapolated:
        lines.append(
            f"  * loop time extrapolated from {result['loop_cells']} cells per prompt (plus its "
            "clean and corrupted passes); the difference is over those cells"
        )
    skips = {lang: e["skipped"] for lang, e in result["languages"].items() if e["skipped"]}
    if skips:
        lines.append(f"  prompts skipped before the first located ones: {skips}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--models",
        default=",".join(MODELS),
        help=f"comma-separated subset of {', '.join(MODELS)}",
    )
    parser.add_argument("--langs", default=",".join(LANGS), help="comma-separated languages")
    parser.add_argument(
        "--facts",
        type=int,
        default=None,
        help="prompts per language and model (default: 2 on mlake-tiny, 1 on the others)",
    )
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="noise samples (default: 10 on mlake-tiny, 4 on the others)",
    )
    parser.add_argument(
        "--loop-cells",
        type=int,
        default=None,
        help="loop cells run per prompt, the loop's time extrapolated; 0: all "
        "(default: all on mlake-tiny, 45 on the others)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--full-prompt",
        action="store_true",
        help="also time the batched tracer without the prefix cache",
    )
    parser.add_argument(
        "--every-block",
        action="store_true",
        help="also time the batched tracer running every block in every row (skip_layers=False:"
        " the tracer before issue 25's item 1)",
    )
    parser.add_argument(
        "--cross-fact",
        action="store_true",
        help="also time the batched tracer on each language's facts at once (trace_prompts: "
        "restorations of several facts sharing passes, issue 25's item 3)",
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="only fit the fixed cost of a pass (pass seconds against rows, one process): "
        "PASS_OVERHEAD_TOKEN_BLOCKS (CPU) and PASS_OVERHEAD_FLOPS on this device",
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="only measure what each tracing pass holds (exact tensor bytes) against what it "
        "was charged, the pass budget and the plan (issue 23 section 2)",
    )
    parser.add_argument(
        "--subject-at",
        choices=("given", "end"),
        default="given",
        help="given: the first facts that locate, subjects where MLaKE's questions put them; "
        "end: among mlake-tiny's training facts, those whose subject ends closest to the "
        "prompt's end (issue 25's 40x target)",
    )
    parser.add_argument(
        "--kinds",
        default=None,
        help="restorations traced, e.g. resid (default: all three)",
    )
    args = parser.parse_args()
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    langs = [x.strip() for x in args.langs.split(",") if x.strip()]
    bad = [m for m in names if m not in MODELS] + [x for x in langs if x not in LANGS]
    if bad:
        parser.error(f"unknown model or language: {', '.join(bad)}")
    dataset = load_mlake()
    fact_ids = read_metadata(ensure_tiny())["fact_ids"]
    results = []
    started = time.perf_counter()
    for name in names:
        spec = MODELS[name]
        spec = ModelSpec(
            name,
            facts=spec.facts if args.facts is None else args.facts,
            samples=spec.samples if args.samples is None else args.samples,
            loop_cells=spec.loop_cells if args.loop_cells is None else args.loop_cells,
        )
        t = time.perf_counter()
        results.append(bench_model(name, spec, args, dataset, fact_ids, langs))
        results[-1]["wall_seconds"] = round(time.perf_counter() - t, 1)
        print(json.dumps(results[-1], indent=2), flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwall time {time.perf_counter() - started:.0f} s\n")
    for result in results:
        if result["languages"]:
            print(table(result) + f"\n  wall {result['wall_seconds']:.0f} s\n")


if __name__ == "__main__":
    main()
