"""Knowledge-measurement throughput: batched versus one by one, and continued keys and values
(``kv_cache``) versus full runs, on the same model and facts.

Measures ``measure_knowledge`` (sequence scoring of every answer form, greedy generation, both
prompt forms) on mlake-tiny's training facts (or ``--model``) in one process:

* ``--batch-size`` with the KV cache (as shipped), batch size 1 with it, and ``--batch-size``
  with ``kv_cache=False`` (every sequence and every decoding step run whole);
* the same two batched runs with an in-context edit's prefix before every prompt (IKE's four
  demonstrations and the new fact, built from other facts as ``mlake edit transfer`` does),
  where the prefix is most of every sequence;
* ``--batch-size`` with the KV cache but scoring and generation each running the prompts
  (``separate_passes``: what ran before ``PromptPasses`` shared each batch's prompt pass).

``--runs`` picks some of them (a large model's full runs take long); ``--template`` sets the
prompt template (``fewshot`` for a base model).

Reports seconds, facts per second and the ratios, and checks that the runs give the same
answers (greedy text) and the same log-probabilities.

    .venv/bin/python benchmarks/knowledge_throughput.py [--model PATH] [--facts 100]
        [--template fewshot] [--langs en,fr] [--runs batched,separate_passes]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    from mlake.commands.common import log
    from mlake.loading import resolve_model_path
    from mlake_core.data.dataset import load_mlake
    from mlake_core.metrics import knowledge
    from mlake_core.metrics.knowledge import measure_knowledge
    from mlake_core.models import load_adapter
    from mlake_core.models.mlake_tiny import read_metadata, resolve_template
    from mlake_core.models.prompting import get_template

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None, help="default: mlake-tiny")
    parser.add_argument("--backend", default="tlens")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--facts", type=int, default=100, help="facts (x 5 languages)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--template", default=None, help="default: the model's, else qa")
    parser.add_argument("--langs", default=None, help="default: all five")
    parser.add_argument("--runs", default=None, help="comma-separated; default: all")
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    adapter = load_adapter(path, args.backend, device=args.device, dtype=args.dtype)
    ds = load_mlake()
    meta = read_metadata(path)
    every = meta["fact_ids"] if meta else [f.fact_id for f in ds.facts]
    ids = every[: args.facts]
    langs = args.langs.split(",") if args.langs else list(ds.langs)
    views = [ds.fact(i).views[lang] for i in ids for lang in langs]
    if args.template:
        template = get_template(args.template)
        if hasattr(template, "for_run"):  # few-shot: demonstrations from other facts
            template = template.for_run(ds, ids, langs)
    else:
        template = resolve_template(path) or get_template("qa")
    # An IKE prefix: four demonstrations of other facts' edits (first language's), then a
    # new fact, as edit_ike builds it.
    lang = views[0].lang
    demos = [ds.fact(i).views[lang].question for i in every[-5:]]
    context = (
        "".join(
            f"New fact: {d.text} {d.edit_target.text}\nQ: {d.text}\nA: {d.edit_target.text}\n\n"
            for d in demos[:4]
        )
        + f"New fact: {demos[4].text} {demos[4].edit_target.text}\n"
    )
    runs = {
        "batched": (template, args.batch_size, True),
        "batch_1": (template, 1, True),
        "batched_no_cache": (template, args.batch_size, False),
        "ike_batched": (template.with_context(context), args.batch_size, True),
        "ike_batched_no_cache": (template.with_context(context), args.batch_size, False),
        "separate_passes": (template, args.batch_size, True),
    }
    if args.runs:
        wanted = args.runs.split(",")
        unknown = sorted(set(wanted) - set(runs))
        if unknown:
            parser.error(f"--runs: unknown {unknown}; choose from {sorted(runs)}")
        runs = {name: runs[name] for name in wanted}
    shared_get = knowledge.PromptPasses.get
    results = {}
    for name, (tpl, bs, kv_cache) in runs.items():
        log(f"{name}: {len(views)} views, batch size {bs}, kv_cache {kv_cache}")
        if name == "separate_passes":  # every call runs its prompts
            knowledge.PromptPasses.get = lambda self, adapter, prompts: knowledge._prompt_pass(
                adapter, prompts
            )
        start = time.perf_counter()
        try:
            result = measure_knowledge(adapter, views, tpl, batch_size=bs, kv_cache=kv_cache)
        finally:
            knowledge.PromptPasses.get = shared_get
        seconds = time.perf_counter() - start
        results[name] = (result.table, seconds)

    def agreement(a: str, b: str) -> dict[str, float | bool] | None:
        if a not in results or b not in results:
            return None
        ta, tb = results[a][0], results[b][0]
        diff = np.nanmax(np.abs(ta["target_logp"] - tb["target_logp"]))
        return {
            "same_greedy_text": bool((ta["greedy_text"] == tb["greedy_text"]).all()),
            "max_abs_logp_difference": float(diff),
        }

    t = {name: seconds for name, (_, seconds) in results.items()}

    def ratio(slow: str, fast: str) -> float | None:
        return round(t[slow] / t[fast], 2) if slow in t and fast in t else None

    report = {
        "model": args.model or "mlake-tiny",
        "backend": args.backend,
        "device": str(adapter.device),
        "dtype": args.dtype,
        "facts": len(ids),
        "views": len(views),
        "template": template.name,
        "langs": langs,
        "rows": len(next(iter(results.values()))[0]),
        "ike_prefix_tokens": len(adapter.encode(context)),
        "seconds": {name: round(seconds, 2) for name, seconds in t.items()},
        "facts_per_second": {name: round(len(ids) / seconds, 2) for name, seconds in t.items()},
        "speedup_batched_vs_batch_1": ratio("batch_1", "batched"),
        "speedup_kv_cache": ratio("batched_no_cache", "batched"),
        "speedup_kv_cache_ike": ratio("ike_batched_no_cache", "ike_batched"),
        "speedup_shared_prompt_pass": ratio("separate_passes", "batched"),
        "batched_vs_batch_1": agreement("batched", "batch_1"),
        "kv_cache_vs_full": agreement("batched", "batched_no_cache"),
        "kv_cache_vs_full_ike": agreement("ike_batched", "ike_batched_no_cache"),
        "shared_vs_separate_passes": agreement("batched", "separate_passes"),
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
