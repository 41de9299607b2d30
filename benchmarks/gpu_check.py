"""GPU check: tracing, one ROME edit and integrated gradients on a random-weight model of a
real shape, with facts per minute per stage and peak memory against the plan.

For each ``--shapes`` row of the model catalog (``mlake models list``; default
``qwen2.5-1.5b,qwen2.5-7b``) the model is built from its stored config with random weights
(transformers' own initialisation, seed 0) directly on ``--device`` in ``--dtype`` (no
download: the catalog holds configs only), with the tiny builder's byte-level tokenizer (512
tokens; the model's vocabulary keeps its real size).  ``--shape tiny`` is the tiny builder's
2-layer Qwen2 (for CPU runs and the test).  On ``--facts`` MLaKE facts (question form,
``--lang``, the ``qa`` template) it times, per fact:

* causal tracing: :func:`analysis.tracing.causal.trace_prompt` with tracing's defaults
  (``resid``, ``mlp`` and ``attn``, 10 noise samples; ``--trace-kinds`` narrows it), rows per
  pass chosen by ``rows_per_pass``;
* ROME: one edit (:func:`mlake_core.editing.rome.edit_rome`, its published recipe: 40 steps,
  contexts ``5x10,10x10``) at the middle layer, after the key statistics of that layer
  (``--key-tokens`` tokens of MLaKE's text, computed once and timed apart), then the update
  is applied and the target's log-probability compared before and after;
* integrated gradients: :func:`analysis.neurons.attribution.integrated_gradients` (20 steps,
  last position, every layer), rows per pass chosen by ``grad_rows_per_pass``.

Random weights make the *answers* meaningless but not the *work*: every stage runs the same
passes with the same shapes as on the trained model (tracing's early stop on a fact with no
total effect is the one thing weights decide, so tracing runs every cell here,
``min_total_effect=0``).

Peak memory: on CUDA ``torch.cuda.max_memory_allocated`` per stage, beside the plan's
weights and per-pass memory (:mod:`mlake_core.models.planner`, the same batch-size functions
the stages call); on CPU the process's peak resident memory (``ru_maxrss``, which only
grows, so a stage's figure is the peak so far).

    python benchmarks/gpu_check.py                      # on a lent GPU: 1.5B and 7B, bf16
    python benchmarks/gpu_check.py --shapes qwen2.5-1.5b --facts 3 --json
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --dtype float32 --shape tiny
    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --device cpu --dtype float32 \\
        --shapes qwen2.5-0.5b --layers 2 --facts 1   # real width, truncated depth

``--layers N`` truncates every shape to ``N`` blocks (the tests do this at real width).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from typing import Any

import torch

GIB = 2**30


class StagePeak:
    """The peak memory a block of work adds: on CUDA ``max_memory_allocated`` minus what was
    allocated at the start; on CPU the process's resident memory, sampled every millisecond
    by a thread (torch's kernels release the GIL), minus its value at the start."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.added = 0

    def __enter__(self) -> StagePeak:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        import threading

        import psutil

        proc = psutil.Process()
        self._start = proc.memory_info().rss
        self._max = self._start
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, proc.memory_info().rss)
                self._stop.wait(0.001)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.added = int(torch.cuda.max_memory_allocated(self.device) - self._start)
            return
        self._stop.set()
        self._thread.join()
        self.added = int(self._max - self._start)


def shape_config(name: str, n_layers: int | None) -> tuple[Any, str, Any]:
    """``(config, architecture, tokenizer)`` of a catalog row or ``tiny``, truncated to
    ``n_layers`` blocks when given."""
    from mlake_core.models.catalog import get_entry
    from mlake_core.models.tiny import TinySize, build_tiny_tokenizer, tiny_config

    if name == "tiny":
        tokenizer = build_tiny_tokenizer("qwen2")
        config = tiny_config("qwen2", vocab_size=len(tokenizer), size=TinySize(n_ctx=512))
    else:
        entry = get_entry(name)
        if entry.unsupported:
            raise SystemExit(f"{name}: not supported ({entry.unsupported})")
        config = entry.hf_config()
        tokenizer = build_tiny_tokenizer(config.model_type)
    if n_layers is not None:
        config.num_hidden_layers = n_layers
        if getattr(config, "layer_types", None):
            config.layer_types = list(config.layer_types[:n_layers])
    # Read back from a folder holding the config and tokenizer (no weights), as the loader
    # gets them: TransformerLens re-reads a tokenizer that adds BOS by its name_or_path.
    import atexit
    import shutil
    import tempfile

    from transformers import AutoTokenizer

    folder = tempfile.mkdtemp(prefix="gpu-check-")
    atexit.register(shutil.rmtree, folder, True)
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    config._name_or_path = folder  # what the backends name the model by, as after loading
    return config, config.model_type, AutoTokenizer.from_pretrained(folder)


def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Give every parameter random values fast: one seeded Gaussian block of a prime length
    (so no two rows of a matrix repeat in step), tiled over each parameter, scaled by ``std``
    for matrices and biases; norm gains get ``1 + noise``.  Drawing a real vocabulary's
    embedding with transformers' initialisation takes seconds on a CPU; this takes a copy."""
    block = torch.randn(1_000_003, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        for offset, (name, param) in enumerate(model.named_parameters()):
            flat = param.data.view(-1)
            n = flat.numel()
            start = (offset * 7919) % block.numel()
            reps = (start + n) // block.numel() + 1
            values = block.repeat(reps)[start : start + n] if reps > 1 else block[start : start + n]
            gain = param.ndim == 1 and not name.endswith("bias")
            flat.copy_((1.0 + std * values) if gain else std * values)


def random_adapter(
    name: str,
    config: Any,
    tokenizer: Any,
    device: str,
    dtype: str,
    backend: str = "tlens",
    *,
    init: str = "hf",
) -> tuple[Any, Any, int]:
    """A model of ``config`` with random weights (seed 0), built on ``device`` in ``dtype``,
    behind an adapter whose ``info`` is what the loader would record for it; returns
    ``(adapter, the Hugging Face model, the model's parameter bytes before the backend wraps
    it)``.  ``init``: ``hf`` (transformers' own
    initialisation) or ``fast`` (:func:`fill_random`, for CPU tests at real width)."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from mlake_core.models.adapter import BosPolicy, architecture_facts
    from mlake_core.models.loading import _check_config, resolve_dtype
    from mlake_core.models.planner import PlannedModel, shape_from_config
    from mlake_core.models.sites import get_spec

    spec = get_spec(config.model_type)
    _check_config(spec, config, name)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(0)
        if init == "fast":
            with no_init_weights():
                hf = AutoModelForCausalLM.from_config(
                    config, dtype=resolve_dtype(dtype), attn_implementation="eager"
                )
            hf.tie_weights()
            fill_random(hf)
        else:
            hf = AutoModelForCausalLM.from_config(
                config, dtype=resolve_dtype(dtype), attn_implementation="eager"
            )
    hf.eval()
    own_bytes = sum(p.numel() * p.element_size() for p in hf.parameters())
    info = replace(
        PlannedModel(shape_from_config(config, name), dtype, device).info,
        backend=backend,
        bos=BosPolicy.from_tokenizer(tokenizer),
        **architecture_facts(spec, config, hf),
    )
    if backend == "tlens":
        from mlake_core.models.tlens_backend import TLensAdapter

        return TLensAdapter(hf, tokenizer, spec, info), hf, own_bytes
    from mlake_core.models.nnsight_backend import NNsightAdapter

    return NNsightAdapter(hf, tokenizer, spec, info), hf, own_bytes


def fact_inputs(adapter: Any, dataset: Any, n: int, lang: str) -> list[dict[str, Any]]:
    """The first ``n`` facts whose question prompt locates in ``lang``, as the tracing stage
    builds them, with their edit request."""
    from mlake_core.editing import make_request
    from mlake_core.editing.base import locate_prompt
    from mlake_core.errors import MlakeError
    from mlake_core.models.prompting import get_template

    template = get_template("qa")
    out: list[dict[str, Any]] = []
    for fact in dataset.facts:
        view = fact.views[lang]
        try:
            loc = locate_prompt(adapter, view, template)
            request = make_request(adapter, view, template)
        except MlakeError:
            continue
        lead, answer = loc.answer_start(adapter, view.form("question").target.text)
        if answer is None:
            continue
        out.append(
            {
                "fact_id": fact.fact_id,
                "prompt_ids": [*loc.prompt_ids, *lead],
                "subject": sorted(loc.subject_positions),
                "answer": int(answer),
                "request": request,
            }
        )
        if len(out) == n:
            break
    return out


def _target_logprob(adapter: Any, request: Any) -> float:
    ids = [*request.prompt_ids, *request.target_new_ids]
    logits = adapter.forward(adapter.batch([ids]))[0].float().log_softmax(-1)
    n = len(request.target_new_ids)
    picked = logits[-n - 1 : -1].gather(-1, torch.tensor(request.target_new_ids)[:, None])
    return float(picked.sum())


def check_shape(
    name: str,
    *,
    device: str,
    dtype: str,
    n_facts: int,
    lang: str,
    n_layers: int | None,
    key_tokens: int,
    trace_kinds: tuple[str, ...] | None = None,
    trace_samples: int | None = None,
    ig_steps: int | None = None,
    rome_steps: int | None = None,
    rome_contexts: str | None = None,
    dataset: Any = None,
    init: str = "hf",
    backend: str = "tlens",
) -> dict[str, Any]:
    """Build one shape and run the three stages on ``n_facts`` facts (module docstring);
    the ``trace_*``, ``ig_steps`` and ``rome_*`` arguments override the stages' defaults
    (the tests make them small)."""
    from analysis.neurons.attribution import (
        AttributionConfig,
        AttributionContext,
        AttributionPrompt,
        integrated_gradients,
    )
    from analysis.tracing.causal import (
        TraceConfig,
        embedding_noise_std,
        trace_prompt,
    )
    from mlake.commands.models import key_statistics_batch, stage_batchers
    from mlake_core.data import load_mlake
    from mlake_core.editing.base import EditContext, edited_parameter
    from mlake_core.editing.covariance import key_second_moment, mlake_corpus
    from mlake_core.editing.rome import RomeConfig, edit_rome
    from mlake_core.models.adapter import free_bytes
    from mlake_core.models.planner import plan_model, shape_from_config

    dev = torch.device(device)
    config, arch, tokenizer = shape_config(name, n_layers)
    start = time.perf_counter()
    adapter, hf, own_bytes = random_adapter(
        name, config, tokenizer, device, dtype, backend, init=init
    )
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    build_s = time.perf_counter() - start
    # The backend's resident weights: TransformerLens adds split Q/K/V copies of a fused
    # projection (BLOOM), which the plan's parameter count does not include.
    weights_measured = (
        int(torch.cuda.memory_allocated(dev))
        if dev.type == "cuda"
        else sum(p.numel() * p.element_size() for p in hf.parameters())
    )
    free = free_bytes(dev) or 0
    plan = plan_model(
        shape_from_config(config, name),
        batchers=stage_batchers(),
        dtype=dtype,
        device=dev.type,
        device_memory=free + weights_measured,
        key_statistics=key_statistics_batch(),
    )
    dataset = dataset if dataset is not None else load_mlake()
    facts = fact_inputs(adapter, dataset, n_facts, lang)
    if not facts:
        raise SystemExit(f"{name}: no fact of {lang} locates with this tokenizer")
    generator = torch.Generator().manual_seed(0)
    stages: dict[str, dict[str, Any]] = {}

    def timed(stage: str, fn: Any) -> list[Any]:
        with StagePeak(dev) as peak:
            t = time.perf_counter()
            out = [fn(f) for f in facts]
            seconds = time.perf_counter() - t
        stages[stage] = {
            "facts": len(facts),
            "seconds": round(seconds, 3),
            "facts_per_minute": round(60 * len(facts) / seconds, 2),
            "peak_added_bytes": peak.added,
        }
        return out

    noise = embedding_noise_std(adapter, [(f["prompt_ids"], f["subject"]) for f in facts])
    trace_overrides: dict[str, Any] = {}
    if trace_kinds:
        trace_overrides["kinds"] = trace_kinds
    if trace_samples:
        trace_overrides["n_samples"] = trace_samples
    trace_config = replace(TraceConfig(min_total_effect=0.0), **trace_overrides)
    traces = timed(
        "causal tracing",
        lambda f: trace_prompt(
            adapter,
            f["prompt_ids"],
            f["subject"],
            f["answer"],
            trace_config,
            generator,
            noise_std=3.0 * noise,
        ),
    )
    layer = max(0, adapter.n_layers // 2 - 1) if adapter.n_layers > 1 else 0
    with StagePeak(dev) as peak:
        t = time.perf_counter()
        moment, counted = key_second_moment(
            adapter, layer, mlake_corpus(dataset)[:4000], n_tokens=key_tokens
        )
        seconds = time.perf_counter() - t
    stages["ROME key statistics (once per layer)"] = {
        "tokens": counted,
        "seconds": round(seconds, 3),
        "peak_added_bytes": peak.added,
    }
    rome_overrides: dict[str, Any] = {}
    if rome_steps:
        rome_overrides["steps"] = rome_steps
    if rome_contexts is not None:
        rome_overrides["contexts"] = rome_contexts
    rome = replace(RomeConfig(layer=layer), **rome_overrides)
    gains: list[float] = []

    def edit(f: dict[str, Any]) -> Any:
        before = _target_logprob(adapter, f["request"])
        result = edit_rome(
            adapter, [f["request"]], rome, EditContext(generator, lambda _layer: moment)
        )
        originals = {}
        with torch.no_grad():
            for pname, delta in result.deltas.items():
                param = edited_parameter(adapter, pname, "gpu_check")
                originals[pname] = param.detach().clone()
                param.add_(delta)
            gains.append(_target_logprob(adapter, f["request"]) - before)
            for pname, value in originals.items():
                edited_parameter(adapter, pname, "gpu_check").copy_(value)
        return result

    edits = timed("ROME edit", edit)
    ig_overrides: dict[str, Any] = {"steps": ig_steps} if ig_steps else {}
    ig_config = replace(AttributionConfig(), **ig_overrides)
    attributions = timed(
        "integrated gradients",
        lambda f: integrated_gradients(
            adapter,
            AttributionPrompt(
                f"fact {f['fact_id']}", tuple(f["prompt_ids"]), tuple(f["subject"]), (f["answer"],)
            ),
            ig_config,
            AttributionContext(generator),
        ),
    )
    planned = {s.stage: s for s in plan.stages}
    for stage, key in (
        ("causal tracing", "causal tracing"),
        ("integrated gradients", "attribution (IG)"),
    ):
        stages[stage]["planned_rows"] = planned[key].rows
        stages[stage]["planned_row_bytes"] = planned[key].row_bytes
        stages[stage]["planned_pass_bytes"] = planned[key].device_bytes
    key_plan = planned["ROME/MEMIT key statistics"]
    stages["ROME key statistics (once per layer)"]["planned_pass_bytes"] = (
        key_plan.device_bytes + key_plan.host_bytes
    )
    return {
        "shape": name,
        "architecture": arch,
        "n_layers": adapter.n_layers,
        "d_model": adapter.d_model,
        "d_mlp": adapter.d_mlp,
        "d_vocab": adapter.info.d_vocab,
        "device": device,
        "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "dtype": dtype,
        "build_seconds": round(build_s, 2),
        "backend": backend,
        "weights_bytes_model": own_bytes,
        "weights_bytes_measured": weights_measured,
        "weights_bytes_planned": plan.weights_bytes,
        "stages": stages,
        "rome_layer": layer,
        "rome_target_logprob_gain": [round(g, 3) for g in gains],
        "trace_tokens": [len(f["prompt_ids"]) for f in facts],
        "trace_cells": [sum(int(v.size) for v in tr.scores.values()) for tr in traces],
        "ig_units": [sum(int(v.size) for v in a.scores.values()) for a in attributions],
        "edits": len(edits),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shapes", default="qwen2.5-1.5b,qwen2.5-7b")
    parser.add_argument("--shape", default=None, help="one shape (overrides --shapes): tiny")
    parser.add_argument("--layers", type=int, default=None, help="truncate to N blocks")
    parser.add_argument("--facts", type=int, default=3)
    parser.add_argument("--lang", default="en")
    parser.add_argument("--key-tokens", type=int, default=20_000)
    parser.add_argument("--trace-kinds", default=None, help="e.g. resid (default: all three)")
    parser.add_argument(
        "--init",
        default="hf",
        choices=("hf", "fast"),
        help="hf: transformers' own random initialisation; fast: a tiled seeded block "
        "(seconds faster at real width on a CPU)",
    )
    parser.add_argument("--backend", default="tlens", choices=("tlens", "nnsight"))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu --shape tiny")
    names = [args.shape] if args.shape else args.shapes.split(",")
    reports = []
    for name in names:
        report = check_shape(
            name,
            device=args.device,
            dtype=args.dtype,
            n_facts=args.facts,
            lang=args.lang,
            n_layers=args.layers,
            key_tokens=args.key_tokens,
            trace_kinds=tuple(args.trace_kinds.split(",")) if args.trace_kinds else None,
            init=args.init,
            backend=args.backend,
        )
        reports.append(report)
        if not args.json:
            _print(report)
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    if args.json:
        print(json.dumps(reports, indent=2))
    return 0


def _print(r: dict[str, Any]) -> None:
    print(
        f"{r['shape']} ({r['architecture']}, {r['n_layers']} layers, d_model {r['d_model']}, "
        f"vocab {r['d_vocab']}) on {r['device_name']}, {r['dtype']}: built in "
        f"{r['build_seconds']} s; weights {r['weights_bytes_model'] / GIB:.2f} GiB "
        f"(planned {r['weights_bytes_planned'] / GIB:.2f} GiB; resident behind "
        f"{r['backend']}: {r['weights_bytes_measured'] / GIB:.2f} GiB)"
    )
    for stage, s in r["stages"].items():
        rate = f"{s['facts_per_minute']:>8.2f} facts/min" if "facts_per_minute" in s else ""
        plan = (
            f"; planned {s.get('planned_rows', '-')} rows/pass, "
            f"{s['planned_pass_bytes'] / GIB:.3f} GiB"
            if "planned_pass_bytes" in s
            else ""
        )
        print(
            f"  {stage:<38} {s['seconds']:>8.2f} s {rate}  peak added "
            f"{s['peak_added_bytes'] / GIB:.3f} GiB{plan}"
        )
    print(f"  ROME target log-prob gain per edit: {r['rome_target_logprob_gain']}")


if __name__ == "__main__":
    sys.exit(main())
