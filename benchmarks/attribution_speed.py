"""Attribution patching versus integrated gradients over MLP neurons: cost and agreement.

Both methods (:mod:`analysis.neurons.attribution`) score every MLP neuron of every layer for
the same prompts (question form, the answer's whole-sequence probability, the last prompt
position), in the same process:

* cost per prompt: wall seconds and this process's CPU seconds (steadier when other jobs
  share the machine), forward and backward passes (the library's count: a backward pass counts
  as one more), rows (sequences through the model), and the ratios IG / AtP;
* agreement: Spearman rank correlation (and Pearson) of the two methods' scores over all
  neurons of all layers, and the top-k overlap ``|top-k(IG) & top-k(AtP)| / k`` (largest
  positive scores, as the ``topk`` rule of the important sets) for k = 10, 50, 100: mean,
  standard deviation, minimum and maximum over prompts; for reference, each method's Spearman
  correlation with gradient x activation (IG with one step), which separates the choice of
  baseline (zero for IG, the corrupted run for AtP) from the path integral;
* validity of attribution patching against real patching (PITFALLS: "attribution patching is
  unreliable for large patches"): for the first ``--check-facts`` facts' prompts, the top
  ``--check-top`` neurons by ``|AtP|`` are patched one at a time (one batch row each) to their
  corrupted value (the mean over the noise samples AtP used) at the attributed position of the
  clean run; the real drop of the answer's probability is correlated with AtP's first-order
  estimate.  A large patch too: each layer's neurons all patched at once, against the sum of
  the layer's AtP scores.  For reference, the top neurons by ``|IG|`` are zeroed the same way
  and the drop correlated with their IG score (a neuron's share of the path integral, so not
  exactly that drop).

Integrated gradients uses 20 steps and the zero baseline (Dai et al.); attribution patching 5
noise samples at 3 times the subject-embedding std (the library's defaults).  Each prompt's
noise has its own seed, and the real-patching check reproduces AtP's corrupted values from it
(checked against AtP's own estimate).

Measured on ``mlake-tiny`` (trained first if needed) and on a GPT-2-small-sized random GPT-2
(12 layers, d_model 768, 12 heads, d_mlp 3072, vocabulary 50,257), on the question form of
MLaKE facts in English and Chinese (each fact in both).  On the random model the answer is
cut to its first token: a whole answer's probability underflows float32 there (the facts are
unknown to it), and every gradient with it.  Integrated gradients costs 20 x n_layers
forward-and-backward rows per prompt, about 2.5 CPU-minutes per prompt on the GPT-2-sized
model, hence its single default fact (two prompts).

    python benchmarks/attribution_speed.py [--facts 20] [--gpt2-facts 2] [--langs en,zh]
        [--steps 20] [--samples 5] [--check-facts 3] [--check-top 50] [--threads 1]
        [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import pearsonr, spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from analysis.neurons.attribution import (
    AttributionConfig,
    AttributionContext,
    AttributionPrompt,
    _sequence,
    answer_probability,
    attribution_patching,
    corrupted_embeddings,
    integrated_gradients,
)
from analysis.tracing.causal import embedding_noise_std
from mlake_core.data import load_mlake
from mlake_core.editing.base import locate_prompt
from mlake_core.errors import MlakeError
from mlake_core.languages import parse_langs
from mlake_core.models import load_adapter
from mlake_core.models.adapter import Patch
from mlake_core.models.mlake_tiny import ensure_tiny, read_metadata
from mlake_core.models.prompting import get_template

TOP_KS = (10, 50, 100)


def prompts(adapter, dataset, fact_ids, template, langs, n, *, first_token=False):
    """Question-form prompts of the first ``n`` facts usable in every language of ``langs``
    (the answer encoded separately and joined by ids, as the neuron stage does), the
    languages alternating.

    ``first_token``: keep only the answer's first token.  A random model gives a whole
    multi-token answer a probability that underflows float32 (about ``50257 ** -n``), and
    with it every gradient.
    """
    items = []
    for fact_id in fact_ids:
        fact = []
        for lang in langs:
            view = dataset.fact(fact_id).views.get(lang)
            if view is None:
                break
            try:
                loc = locate_prompt(adapter, view, template, "question")
            except MlakeError:
                break
            answer = adapter.tokenizer(
                loc.answer_prefix + view.form("question").target.text.strip(),
                add_special_tokens=False,
            )["input_ids"]
            if not answer:
                break
            answer = answer[:1] if first_token else answer
            prompt = AttributionPrompt(
                loc.where, loc.prompt_ids, loc.subject_positions, tuple(answer)
            )
            fact.append((fact_id, lang, prompt))
        if len(fact) == len(langs):
            items += fact
            if len(items) == n * len(langs):
                break
    return items


def top_k_overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    """``|top-k(a) & top-k(b)| / k`` over the largest scores."""
    ta = np.argpartition(-a, k - 1)[:k]
    tb = np.argpartition(-b, k - 1)[:k]
    return len(np.intersect1d(ta, tb)) / k


def real_patching(adapter, prompt, atp_scores, ig_scores, config, seed, noise_std, top):
    """Real single-neuron patches in the clean run, one batch row each, against the scores.

    AtP: the ``top`` neurons by ``|AtP|`` patched to their corrupted value (the mean over the
    noise samples, reproduced from AtP's seed), whose effect AtP estimates to first order.
    IG, for reference: the ``top`` neurons by ``|IG|`` patched to the baseline (zero); a
    neuron's IG score is its share of the path integral, not exactly this effect.
    """
    seq = _sequence(prompt)
    last = len(prompt.prompt_ids) - 1
    d_mlp = adapter.d_mlp
    sites = [f"mlp_post.{layer}" for layer in range(adapter.n_layers)]
    clean: dict[str, torch.Tensor] = {}
    p_clean, grads = adapter.gradients(
        adapter.batch([seq]),
        ["embed", *sites],
        lambda lg: answer_probability(lg, prompt).sum(),
        activations=clean,
    )
    noise = corrupted_embeddings(
        adapter,
        clean["embed"][0],
        prompt.subject_positions,
        config,
        AttributionContext(torch.Generator().manual_seed(seed), noise_std),
    )
    _, corrupt = adapter.run_with_cache(
        adapter.batch([seq] * config.samples), sites, patches=[noise]
    )
    a = torch.stack([clean[s][0, last].float() for s in sites])  # [layers, d_mlp]
    a_star = torch.stack([corrupt[s][:, last].float().mean(0) for s in sites])
    g = torch.stack([grads[s][0, last].float() for s in sites])
    atp_units = np.argsort(-np.abs(atp_scores).reshape(-1))[:top]
    ig_units = np.argsort(-np.abs(ig_scores).reshape(-1))[:top]
    # Rows: 0 clean; the AtP neurons to a*; the IG neurons to zero; then, a large patch,
    # every neuron of one layer to a* (one row per layer).
    targets = [(int(u), float(a_star.reshape(-1)[u])) for u in atp_units]
    targets += [(int(u), 0.0) for u in ig_units]
    by_layer: dict[int, list[tuple[int, torch.Tensor]]] = {}
    for row, (unit, value) in enumerate(targets, start=1):
        vector = a[unit // d_mlp].clone()
        vector[unit % d_mlp] = value
        by_layer.setdefault(unit // d_mlp, []).append((row, vector))
    first_layer_row = len(targets) + 1
    for layer in range(adapter.n_layers):
        by_layer.setdefault(layer, []).append((first_layer_row + layer, a_star[layer]))
    patches = [
        Patch(
            f"mlp_post.{layer}",
            torch.tensor([row for row, _ in rows]),
            torch.full((len(rows),), last),
            torch.stack([v for _, v in rows]).to(adapter.dtype),
        )
        for layer, rows in by_layer.items()
    ]
    n_rows = first_layer_row + adapter.n_layers
    logits = adapter.run_with_patches(adapter.batch([seq] * n_rows), patches)
    p = answer_probability(logits, prompt).double().cpu().numpy()
    real = p[0] - p[1:first_layer_row]
    real_atp, real_ig = real[: len(atp_units)], real[len(atp_units) :]
    real_layer = p[0] - p[first_layer_row:]
    estimate_layer = atp_scores.sum(-1)
    estimate = atp_scores.reshape(-1)[atp_units]
    ig = ig_scores.reshape(-1)[ig_units]
    again = ((a - a_star) * g).reshape(-1)[torch.as_tensor(atp_units)].double().cpu().numpy()
    return {
        "p_clean": float(p_clean),
        "atp_layers": np.bincount(atp_units // d_mlp, minlength=adapter.n_layers).tolist(),
        "pearson_atp": float(pearsonr(estimate, real_atp)[0]),
        "spearman_atp": float(spearmanr(estimate, real_atp)[0]),
        "sign_agreement_atp": float(np.mean(np.sign(estimate) == np.sign(real_atp))),
        "sum_atp_estimate": float(estimate.sum()),
        "sum_atp_real": float(real_atp.sum()),
        "atp_estimate_reproduced": float(np.abs(again - estimate).max()),
        # The large patch: a whole layer's neurons to a*, AtP's estimate the layer's sum.
        "layer_estimate": estimate_layer.tolist(),
        "layer_real": real_layer.tolist(),
        "ig_layers": np.bincount(ig_units // d_mlp, minlength=adapter.n_layers).tolist(),
        "pearson_ig": float(pearsonr(ig, real_ig)[0]),
        "spearman_ig": float(spearmanr(ig, real_ig)[0]),
        "sum_ig": float(ig.sum()),
        "sum_ig_real": float(real_ig.sum()),
    }


def spread(values) -> dict[str, float]:
    v = np.asarray(values, dtype=float)
    return {
        "mean": round(float(np.mean(v)), 4),
        "std": round(float(np.std(v)), 4),
        "min": round(float(np.min(v)), 4),
        "max": round(float(np.max(v)), 4),
    }


def layer_patches(checks) -> dict[str, object]:
    """AtP against real patching of whole layers (every neuron of a layer to its corrupted
    value at once): Pearson over (prompt, layer) pairs, and the median relative error
    ``|estimate - real| / |real|`` for the first layer and for the others."""
    est = np.array([c["layer_estimate"] for c in checks])
    real = np.array([c["layer_real"] for c in checks])
    rel = np.abs(est - real) / np.maximum(np.abs(real), 1e-30)
    return {
        "layer_pearson": round(float(pearsonr(est.reshape(-1), real.reshape(-1))[0]), 4),
        "layer0_relative_error": round(float(np.median(rel[:, 0])), 4),
        "later_layers_relative_error": round(float(np.median(rel[:, 1:])), 4),
        "layer_estimate_mean": est.mean(0).tolist(),
        "layer_real_mean": real.mean(0).tolist(),
    }


def timed(fn, *args):
    """``fn(*args)``, its wall seconds and this process's CPU seconds (less sensitive to other
    jobs on the machine than the wall time)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn(*args)
    return out, time.perf_counter() - wall, time.process_time() - cpu


def bench(name, adapter, items, args, log):
    ig_config = AttributionConfig(steps=args.steps)
    one_step = AttributionConfig(steps=1)
    atp_config = AttributionConfig(samples=args.samples)
    noise_std = embedding_noise_std(
        adapter, [(p.prompt_ids, p.subject_positions) for *_, p in items]
    )
    langs = list(dict.fromkeys(lang for _, lang, _ in items))

    def context(seed: int) -> AttributionContext:
        return AttributionContext(torch.Generator().manual_seed(seed), noise_std)

    # Warm-up (first-call overheads), not timed.
    attribution_patching(adapter, items[0][2], atp_config, context(0))
    integrated_gradients(adapter, items[0][2], one_step, context(0))
    per_prompt = []
    for index, (fact_id, lang, prompt) in enumerate(items):
        seed = fact_id * 10 + langs.index(lang)
        ig, ig_s, ig_cpu = timed(integrated_gradients, adapter, prompt, ig_config, context(seed))
        atp, atp_s, atp_cpu = timed(
            attribution_patching, adapter, prompt, atp_config, context(seed)
        )
        # Reference: gradient x activation (IG with one step, at the clean point).
        gxa = integrated_gradients(adapter, prompt, one_step, context(seed))
        a, b = ig.scores["neuron"].reshape(-1), atp.scores["neuron"].reshape(-1)
        c = gxa.scores["neuron"].reshape(-1)
        row = {
            "fact_id": fact_id,
            "lang": lang,
            "tokens": len(_sequence(prompt)),
            "p_answer": ig.p_answer,
            "ig_seconds": ig_s,
            "atp_seconds": atp_s,
            "ig_cpu_seconds": ig_cpu,
            "atp_cpu_seconds": atp_cpu,
            "ig_passes": ig.passes,
            "atp_passes": atp.passes,
            # Sequences through the model: IG one clean forward and a forward-and-backward
            # row per (layer, step); AtP one forward-and-backward row and one forward row per
            # noise sample.
            "ig_rows": 1 + len(ig.layers) * args.steps,
            "atp_rows": 1 + args.samples,
            "spearman": float(spearmanr(a, b)[0]),
            "pearson": float(pearsonr(a, b)[0]),
            **{f"top{k}": top_k_overlap(a, b, k) for k in TOP_KS},
            "spearman_ig_gxa": float(spearmanr(a, c)[0]),
            "spearman_atp_gxa": float(spearmanr(b, c)[0]),
        }
        if index < args.check_facts * len(langs):
            row["real_patching"] = real_patching(
                adapter,
                prompt,
                atp.scores["neuron"],
                ig.scores["neuron"],
                atp_config,
                seed,
                noise_std,
                args.check_top,
            )
        per_prompt.append(row)
        check = row.get("real_patching")
        log(
            f"  {name} fact {fact_id} [{lang}] {row['tokens']} tokens, p={ig.p_answer:.3f}: "
            f"IG {ig_s:.2f} s ({ig_cpu:.2f} CPU), AtP {atp_s:.2f} s ({atp_cpu:.2f} CPU), "
            f"Spearman {row['spearman']:.3f}, top-50 {row['top50']:.2f}"
            + (
                f", vs real patching: AtP r={check['pearson_atp']:.3f}, "
                f"IG r={check['pearson_ig']:.3f}"
                if check
                else ""
            )
        )

    def mean(key, rows=per_prompt):
        return float(np.mean([r[key] for r in rows]))

    checks = [r["real_patching"] for r in per_prompt if "real_patching" in r]
    out = {
        "model": name,
        "prompts": len(per_prompt),
        "facts": len({r["fact_id"] for r in per_prompt}),
        "langs": langs,
        "n_layers": adapter.n_layers,
        "d_mlp": adapter.d_mlp,
        "neurons": adapter.n_layers * adapter.d_mlp,
        "tokens_per_prompt": mean("tokens"),
        "noise_std": noise_std,
    }
    for method, extra in (("ig", {"steps": args.steps}), ("atp", {"samples": args.samples})):
        out[method] = {
            **extra,
            "seconds_per_prompt": round(mean(f"{method}_seconds"), 3),
            "cpu_seconds_per_prompt": round(mean(f"{method}_cpu_seconds"), 3),
            "passes_per_prompt": mean(f"{method}_passes"),
            "rows_per_prompt": mean(f"{method}_rows"),
        }
    for key in ("seconds", "cpu_seconds", "passes", "rows"):
        out[f"ratio_{key}"] = round(mean(f"ig_{key}") / mean(f"atp_{key}"), 1)
    out |= {
        "spearman": spread([r["spearman"] for r in per_prompt]),
        "pearson": spread([r["pearson"] for r in per_prompt]),
        **{f"top{k}_overlap": spread([r[f"top{k}"] for r in per_prompt]) for k in TOP_KS},
        "spearman_ig_gxa": spread([r["spearman_ig_gxa"] for r in per_prompt]),
        "spearman_atp_gxa": spread([r["spearman_atp_gxa"] for r in per_prompt]),
        "by_lang": {
            lang: {
                "prompts": len(rows),
                "spearman": round(mean("spearman", rows), 4),
                **{f"top{k}_overlap": round(mean(f"top{k}", rows), 4) for k in TOP_KS},
            }
            for lang in langs
            if (rows := [r for r in per_prompt if r["lang"] == lang])
        },
        "real_patching": {
            "prompts": len(checks),
            "top": args.check_top,
            **{
                key: spread([c[key] for c in checks])
                for key in (
                    "pearson_atp",
                    "spearman_atp",
                    "sign_agreement_atp",
                    "pearson_ig",
                    "spearman_ig",
                )
            },
            **layer_patches(checks),
            "per_prompt": checks,
        }
        if checks
        else None,
        "per_prompt": per_prompt,
    }
    return out


def _ms(d: dict[str, float]) -> str:
    return f"{d['mean']:.3f} +- {d['std']:.3f} [{d['min']:.3f}, {d['max']:.3f}]"


def table(results) -> str:
    """A plain-text table, one column per model."""
    rows = [("", [r["model"] for r in results])]

    def add(label, fn):
        rows.append((label, [fn(r) for r in results]))

    add("prompts (facts x langs)", lambda r: f"{r['prompts']} ({r['facts']} x {len(r['langs'])})")
    add("tokens per prompt", lambda r: f"{r['tokens_per_prompt']:.1f}")
    add("neurons", lambda r: f"{r['n_layers']} x {r['d_mlp']} = {r['neurons']:,}")
    for m, label in (("ig", "IG"), ("atp", "AtP")):
        add(f"{label} s / prompt (wall)", lambda r, m=m: f"{r[m]['seconds_per_prompt']:.3f}")
        add(f"{label} s / prompt (CPU)", lambda r, m=m: f"{r[m]['cpu_seconds_per_prompt']:.3f}")
        add(
            f"{label} passes / rows per prompt",
            lambda r, m=m: f"{r[m]['passes_per_prompt']:.1f} / {r[m]['rows_per_prompt']:.0f}",
        )
    add(
        "IG / AtP: wall, CPU, passes, rows",
        lambda r: ", ".join(
            f"{r[f'ratio_{k}']}x" for k in ("seconds", "cpu_seconds", "passes", "rows")
        ),
    )
    add("Spearman(IG, AtP)", lambda r: _ms(r["spearman"]))
    add("Pearson(IG, AtP)", lambda r: _ms(r["pearson"]))
    for k in TOP_KS:
        add(f"top-{k} overlap", lambda r, k=k: _ms(r[f"top{k}_overlap"]))
    add("Spearman(IG, grad x act)", lambda r: _ms(r["spearman_ig_gxa"]))
    add("Spearman(AtP, grad x act)", lambda r: _ms(r["spearman_atp_gxa"]))

    def real(key):
        return lambda r: _ms(r["real_patching"][key]) if r["real_patching"] else "-"

    add("AtP vs real patch: Pearson", real("pearson_atp"))
    add("AtP vs real patch: Spearman", real("spearman_atp"))
    add("AtP vs real patch: same sign", real("sign_agreement_atp"))
    add(
        "AtP vs whole-layer patch: Pearson",
        lambda r: f"{r['real_patching']['layer_pearson']:.3f}" if r["real_patching"] else "-",
    )
    add(
        "  median rel. error: layer 0, later",
        lambda r: (
            f"{r['real_patching']['layer0_relative_error']:.2f}, "
            f"{r['real_patching']['later_layers_relative_error']:.2f}"
            if r["real_patching"]
            else "-"
        ),
    )
    add("IG vs real zeroing: Pearson", real("pearson_ig"))
    add("IG vs real zeroing: Spearman", real("spearman_ig"))
    width = max(len(label) for label, _ in rows)
    cols = [max(len(row[1][i]) for row in rows) for i in range(len(results))]
    return "\n".join(
        f"{label:<{width}}  " + "  ".join(f"{v:<{c}}" for v, c in zip(values, cols, strict=True))
        for label, values in rows
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--facts", type=int, default=20, help="facts on mlake-tiny")
    parser.add_argument("--gpt2-facts", type=int, default=2, help="facts on the GPT-2-sized model")
    parser.add_argument("--langs", default="en,zh", help="languages of every fact")
    parser.add_argument("--steps", type=int, default=20, help="integrated-gradients steps")
    parser.add_argument("--samples", type=int, default=5, help="attribution-patching noise samples")
    parser.add_argument("--check-facts", type=int, default=3, help="facts checked by real patching")
    parser.add_argument("--check-top", type=int, default=50, help="neurons patched per check")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (0: torch's default, one per core); with other jobs on the "
        "machine, more than one thread stalls small passes (10x slower measured)",
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    langs = parse_langs(args.langs)
    if args.threads:
        torch.set_num_threads(args.threads)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.perf_counter()
    load_before = os.getloadavg()
    dataset = load_mlake()
    results = []

    tiny = ensure_tiny()
    adapter = load_adapter(str(tiny), "tlens", device=args.device)
    metadata = read_metadata(tiny) or {}
    template = get_template(metadata["config"]["template"])
    ids = metadata["fact_ids"]
    if args.facts:
        items = prompts(adapter, dataset, ids, template, langs, args.facts)
        results.append(bench("mlake-tiny", adapter, items, args, log))
        log(table(results[-1:]))

    if args.gpt2_facts:
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
            items = prompts(
                adapter, dataset, ids, get_template("qa"), langs, args.gpt2_facts, first_token=True
            )
            results.append(bench("gpt2-small-sized random", adapter, items, args, log))
            log(table(results[-1:]))
    meta: dict[str, Any] = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in os.getloadavg()],
        "total_seconds": round(time.perf_counter() - started, 1),
    }
    print(table(results), flush=True)
    print(
        f"\ntorch {meta['torch']}, {meta['threads']} threads on {meta['cpus']} CPUs; load average "
        f"{meta['load_average_before'][0]} before, {meta['load_average_after'][0]} after; "
        f"{meta['total_seconds']} s in all",
        flush=True,
    )
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
