"""Reading one layer's activations: a pass that stops after the site read
(``ModelAdapter.activations``) versus a full pass that computes every position's logits
(``run_with_cache``), on the same documents in one process.

This is the read behind ROME's and MEMIT's key covariance (``mlp_post.L`` over a text corpus),
LAPE's activation rates and probes' hidden states.  On Gemma 3 270M the 262k-token unembedding
costs more per token than the 18 blocks, so a read of an early layer was mostly wasted work.
Measures :func:`mlake_core.editing.covariance.key_second_moment` both ways (the same
statistic, checked equal) on ``--model`` (default: the packaged Gemma 3 270M, converted first
if needed), for a few layers: seconds, tokens per second and the ratio.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/read_activations.py [--docs 64] [--layers 0,6,12,17]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


class FullPass:
    """An adapter whose ``activations`` runs the whole model (the previous way)."""

    def __init__(self, adapter):
        self._adapter = adapter

    def __getattr__(self, name):
        return getattr(self._adapter, name)

    def activations(self, batch, sites):
        return self._adapter.run_with_cache(batch, sites)[1]


def main() -> int:
    from mlake.loading import resolve_model_path
    from mlake_core.data.dataset import load_mlake
    from mlake_core.editing.covariance import key_second_moment, mlake_corpus
    from mlake_core.models import load_adapter

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="gemma-3-270m")
    parser.add_argument("--backend", default="tlens")
    parser.add_argument("--docs", type=int, default=64, help="corpus documents per layer")
    parser.add_argument("--layers", default="0,6,12,17")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()

    path = resolve_model_path(args.model)
    adapter = load_adapter(path, args.backend, device="cpu")
    docs = mlake_corpus(load_mlake(None))[: args.docs]
    rows = []
    for layer in [int(x) for x in args.layers.split(",")]:
        t = time.perf_counter()
        stopped, n = key_second_moment(adapter, layer, docs)
        t_stop = time.perf_counter() - t
        t = time.perf_counter()
        full, n_full = key_second_moment(FullPass(adapter), layer, docs)
        t_full = time.perf_counter() - t
        assert n == n_full
        diff = float((stopped - full).abs().max() / full.abs().max())
        rows.append(
            {
                "layer": layer,
                "tokens": n,
                "stopped_s": round(t_stop, 2),
                "full_pass_s": round(t_full, 2),
                "speedup": round(t_full / t_stop, 2),
                "max_rel_difference": diff,
            }
        )
        print(json.dumps(rows[-1]), flush=True)
    out = {
        "model": adapter.info.model_id,
        "n_layers": adapter.n_layers,
        "d_vocab": adapter.info.d_vocab,
        "docs": len(docs),
        "torch_threads": torch.get_num_threads(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "layers": rows,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
