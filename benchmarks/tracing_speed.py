"""Batched causal tracing versus a plain loop of one forward pass per cell.

The plain loop is how ROME's reference code traces: for every (kind, token, layer) cell, one
forward pass whose rows are the corrupted samples, with that cell restored, computing the
logits of every position.  The batched tracer (:func:`analysis.tracing.causal.trace_prompt`)
puts many cells' rows in one pass, skips the cells whose effect is zero by construction,
computes the last position's logits only, and runs each restoration from the restored token on
after the corrupted run's cached keys and values (the prefix cache).  Both use the same noise
(same generator seed), and the benchmark checks they give the same numbers.  With
``--full-prompt`` the batched tracer is also timed without the prefix cache (every row the
whole prompt), to show what each part gains.

Measured on ``mlake-tiny`` (trained first if needed) and on a GPT-2-small-sized random GPT-2
(12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50,257), in the same process:
forward passes per fact, facts per minute, the speed-up, and the largest difference between
the two tracers' restored probabilities.

    python benchmarks/tracing_speed.py [--facts 4] [--gpt2-facts 2] [--samples 10] [--full-prompt]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.tracing.causal import (
    SITE_OF_KIND,
    TraceConfig,
    embedding_noise_std,
    trace_prompt,
    window_layers,
)
from mlake_core.data import load_mlake
from mlake_core.editing.base import locate_prompt
from mlake_core.errors import MlakeError
from mlake_core.models import load_adapter
from mlake_core.models.adapter import Patch
from mlake_core.models.mlake_tiny import ensure_tiny, read_metadata
from mlake_core.models.prompting import get_template


def loop_trace(adapter, prompt_ids, subject, answer_id, config, generator, noise_std):
    """Plain tracing: one forward pass (all positions' logits) per cell."""
    n_layers, n_tokens = adapter.n_layers, len(prompt_ids)
    window = config.resolved_window(n_layers)
    sites = ["embed"] + [
        f"{SITE_OF_KIND[k]}.{layer}" for k in config.kinds for layer in range(n_layers)
    ]
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

    passes = 1
    p_corrupt = prob([])
    passes += 1
    scores = {}
    for kind in config.kinds:
        site = SITE_OF_KIND[kind]
        out = np.zeros((n_tokens, n_layers))
        for t in range(n_tokens):
            for layer in range(n_layers):
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
                passes += 1
        scores[kind] = out
    return p_corrupt, scores, passes


def bench(name, adapter, items, config, noise_std, full_prompt=False):
    batched_s = loop_s = full_s = 0.0
    diffs, passes_b, passes_l, rows_b = [], [], [], []
    full_diffs, passes_f, rows_f = [], [], []
    for fact_id, lang, ids, subject, answer in items:
        seed = fact_id * 10 + len(lang)
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
            full_diffs.append(abs(full.p_corrupt - tr.p_corrupt))
            for kind in config.kinds:
                full_diffs.append(float(np.abs(full.scores[kind] - tr.scores[kind]).max()))
            passes_f.append(full.forward_passes)
            rows_f.append(full.rows)
        t = time.perf_counter()
        p_corrupt, scores, passes = loop_trace(
            adapter, ids, subject, answer, config, torch.Generator().manual_seed(seed), noise_std
        )
        loop_s += time.perf_counter() - t
        diffs.append(abs(p_corrupt - tr.p_corrupt))
        for kind in config.kinds:
            diffs.append(float(np.abs(scores[kind] - tr.scores[kind]).max()))
        passes_b.append(tr.forward_passes)
        rows_b.append(tr.rows)
        passes_l.append(passes)
    n = len(items)
    extra = {}
    if full_prompt:
        extra["batched_full_prompt"] = {
            "seconds": round(full_s, 2),
            "facts_per_minute": round(60 * n / full_s, 2),
            "forward_passes_per_fact": float(np.mean(passes_f)),
            "rows_per_fact": float(np.mean(rows_f)),
            "prefix_cache_speedup": round(full_s / batched_s, 2),
            "max_abs_difference_to_batched": float(max(full_diffs)),
        }
    return {
        "model": name,
        "facts": n,
        "tokens_per_prompt": float(np.mean([len(i[2]) for i in items])),
        "samples": config.n_samples,
        "window": config.resolved_window(adapter.n_layers),
        "batched": {
            "seconds": round(batched_s, 2),
            "facts_per_minute": round(60 * n / batched_s, 2),
            "forward_passes_per_fact": float(np.mean(passes_b)),
            "rows_per_fact": float(np.mean(rows_b)),
        },
        "loop": {
            "seconds": round(loop_s, 2),
            "facts_per_minute": round(60 * n / loop_s, 2),
            "forward_passes_per_fact": float(np.mean(passes_l)),
        },
        **extra,
        "speedup": round(loop_s / batched_s, 2),
        "max_abs_difference": float(max(diffs)),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def prompts(adapter, dataset, fact_ids, template, langs, n):
    items = []
    for fact_id in fact_ids:
        for lang in langs:
            view = dataset.fact(fact_id).views[lang]
            try:
                loc = locate_prompt(adapter, view, template)
            except MlakeError:
                continue
            answer = adapter.tokenizer(
                loc.answer_prefix + view.record.o_answer, add_special_tokens=False
            )["input_ids"]
            items.append(
                (fact_id, lang, list(loc.prompt_ids), list(loc.subject_positions), answer[0])
            )
            if len(items) == n:
                return items
    return items


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=4, help="prompts traced on mlake-tiny")
    parser.add_argument(
        "--gpt2-facts", type=int, default=2, help="prompts on the GPT-2-sized model"
    )
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--full-prompt",
        action="store_true",
        help="also time the batched tracer without the prefix cache",
    )
    args = parser.parse_args()
    config = TraceConfig(n_samples=args.samples)
    dataset = load_mlake()
    results = []

    tiny = ensure_tiny()
    adapter = load_adapter(str(tiny), "tlens", device=args.device)
    template = get_template(read_metadata(tiny)["config"]["template"])
    ids = read_metadata(tiny)["fact_ids"]
    items = prompts(adapter, dataset, ids, template, ("en", "zh", "ja", "fr", "de"), args.facts)
    std = embedding_noise_std(adapter, [(i[2], i[3]) for i in items])
    results.append(bench("mlake-tiny", adapter, items, config, std, args.full_prompt))
    print(json.dumps(results[-1], indent=2), flush=True)

    from mlake_core.models.tiny import TinySize, build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
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
        path = build_tiny_model(
            "gpt2", Path(tmp) / "gpt2-small", size=size, config_overrides={"vocab_size": 50257}
        )
        adapter = load_adapter(str(path), "tlens", device=args.device)
        items = prompts(adapter, dataset, ids, get_template("qa"), ("en", "zh"), args.gpt2_facts)
        std = embedding_noise_std(adapter, [(i[2], i[3]) for i in items])
        results.append(
            bench("gpt2-small-sized random", adapter, items, config, std, args.full_prompt)
        )
        print(json.dumps(results[-1], indent=2), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
