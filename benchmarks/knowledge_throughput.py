"""Knowledge-measurement throughput: batched versus one by one, on the same model and facts.

Measures ``measure_knowledge`` (sequence scoring of every answer form, greedy generation, both
prompt forms) on mlake-tiny's training facts (or ``--model``), with ``--batch-size`` and with
batch size 1, in the same process, and reports facts per second and the ratio.  It also checks
that the two runs give the same answers (greedy text) and the same log-probabilities.

    .venv/bin/python benchmarks/knowledge_throughput.py [--model PATH] [--facts 100]
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def main() -> int:
    from mlake_core.commands.common import log, resolve_model_path
    from mlake_core.data.dataset import load_mlake
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
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    adapter = load_adapter(path, args.backend, device=args.device, dtype=args.dtype)
    template = resolve_template(path) or get_template("qa")
    ds = load_mlake()
    meta = read_metadata(path)
    ids = (meta["fact_ids"] if meta else [f.fact_id for f in ds.facts])[: args.facts]
    views = [ds.fact(i).views[lang] for i in ids for lang in ds.langs]
    results = {}
    for bs in (args.batch_size, 1):
        log(f"measuring {len(views)} views with batch size {bs}")
        start = time.perf_counter()
        result = measure_knowledge(adapter, views, template, batch_size=bs)
        seconds = time.perf_counter() - start
        results[bs] = (result, seconds)
    (big, t_big), (one, t_one) = results[args.batch_size], results[1]
    same_text = bool((big.table["greedy_text"] == one.table["greedy_text"]).all())
    max_diff = float(np.nanmax(np.abs(big.table["target_logp"] - one.table["target_logp"])))
    report = {
        "model": args.model or "mlake-tiny",
        "backend": args.backend,
        "device": str(adapter.device),
        "dtype": args.dtype,
        "facts": len(ids),
        "views": len(views),
        "rows": len(big.table),
        f"seconds_batch_{args.batch_size}": round(t_big, 2),
        "seconds_batch_1": round(t_one, 2),
        f"facts_per_second_batch_{args.batch_size}": round(len(ids) / t_big, 2),
        "facts_per_second_batch_1": round(len(ids) / t_one, 2),
        "views_per_second_batched": round(len(views) / t_big, 2),
        "views_per_second_one_by_one": round(len(views) / t_one, 2),
        "speedup": round(t_one / t_big, 2),
        "same_greedy_text": same_text,
        "max_abs_logp_difference": max_diff,
    }
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
