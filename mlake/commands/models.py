"""``mlake models check``, ``list``, ``plan`` and ``train-tiny`` (``model`` is an alias of
``models``).

``check`` loads a model through an adapter and describes it: it prints the architecture, number of layers and widths, the canonical sites with the Hugging Face
module boundary carrying each, the BOS policy, device and dtype, then runs one forward pass on a
short English and Chinese prompt to show the model works.  ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlake_core.errors import ConfigError

_PROBE_TEXTS = ("The capital of France is", "法国的首都是")


#: The :class:`~mlake_core.models.mlake_tiny.TinyTrainConfig` fields that are options of
#: ``train-tiny`` (``--set FIELD=VALUE`` reaches the others).
TRAIN_FIELDS: tuple[str, ...] = (
    "facts",
    "langs",
    "seed",
    "bilingual_fraction",
    "max_epochs",
    "data_version",
)
#: ``data_version`` is the ``--version`` option, as in every other command.
TRAIN_RENAME = {"data_version": "version"}


def register(subparsers: Any) -> None:
    """Add the ``models`` command (alias ``model``) and its sub-commands."""
    from mlake.commands.common import add_model_args, add_settings_args
    from mlake.settings import DataSettings

    parser = subparsers.add_parser(
        "models",
        aliases=["model"],
        help="inspect model adapters; list real model shapes and plan memory; train mlake-tiny",
    )
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    check = sub.add_parser(
        "check",
        help="load a model and print its architecture, sites, BOS policy, device and dtype",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(check, template=False)
    add_settings_args(
        check,
        DataSettings,
        fields=("data_dir",),
        helps={"data_dir": "MLaKE data directory (to train mlake-tiny)"},
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(func=run_check)
    _register_train_tiny(sub)
    _register_list_and_plan(sub)


def _register_train_tiny(sub: Any) -> None:
    from mlake.commands.common import add_settings_args
    from mlake.settings import DataSettings
    from mlake_core.models.mlake_tiny import TINY_NAME, VARIANTS, TinyTrainConfig
    from mlake_core.models.mlake_tiny import __doc__ as tiny_doc

    train = sub.add_parser(
        "train-tiny",
        help="train mlake-tiny, the small model trained on MLaKE (cached; default model)",
        description=tiny_doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_settings_args(
        train,
        TinyTrainConfig,
        fields=TRAIN_FIELDS,
        rename=TRAIN_RENAME,
        helps={
            "facts": "number of facts (a fixed subset) or 'all'",
            "langs": "comma-separated languages",
        },
    )
    train.add_argument(
        "--variant",
        default=TINY_NAME,
        choices=tuple(VARIANTS),
        help=f"named variant whose options to start from (default: {TINY_NAME}; "
        "mlake-tiny-editable: trained so that ROME and MEMIT can edit it)",
    )
    train.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="any other training option of TinyTrainConfig (repeatable), e.g. "
        "--set route_masking=0.5; an unknown field is an error",
    )
    add_settings_args(train, DataSettings, fields=("data_dir",))
    train.add_argument(
        "--retrain", action="store_true", help="train again even if this config is cached"
    )
    train.add_argument("--json", action="store_true", help="print the metadata as JSON")
    train.set_defaults(func=run_train_tiny)


def parse_fields(items: list[str], cls: type, *, option: str = "--set") -> dict[str, str]:
    """``--set FIELD=VALUE`` options of one config dataclass as ``{field: value}``; values
    stay text (:func:`~mlake.commands.common.settings_from_args` coerces them), after a check
    that each parses as its field's type (NaN and infinities refused).

    Raises:
        ConfigError: a malformed item, a field ``cls`` does not have (naming its fields), or
            a value that does not parse (naming ``--set FIELD``).
    """
    import dataclasses

    from mlake_core.configs import coerce_given

    names = [f.name for f in dataclasses.fields(cls)]
    out: dict[str, str] = {}
    for item in items:
        field, sep, value = item.partition("=")
        field = field.strip()
        if not sep or not field:
            raise ConfigError(f"{option} {item!r}: expected FIELD=VALUE")
        if field not in names:
            raise ConfigError(
                f"{option} {item!r}: {cls.__name__} has no field {field!r} "
                f"(fields: {', '.join(names)})"
            )
        # Checked here so a bad value names the option it came from (``--set lr``).
        coerce_given(cls, {field: value.strip()}, option, sep=" ")
        out[field] = value.strip()
    return out


def run_train_tiny(args: argparse.Namespace) -> int:
    """Entry point of ``mlake models train-tiny``."""
    import sys

    from mlake.commands.common import log, settings_from_args
    from mlake_core.models.mlake_tiny import (
        TinyTrainConfig,
        ensure_tiny,
        read_metadata,
        variant_config,
    )

    # The variant's options, then --set, then the options given (they win).
    config = settings_from_args(
        args,
        TinyTrainConfig,
        fields=TRAIN_FIELDS,
        rename=TRAIN_RENAME,
        defaults=parse_fields(args.overrides, TinyTrainConfig),
        base=variant_config(args.variant),
    )
    path = ensure_tiny(
        config,
        data_dir=args.data_dir,
        progress=log,
        show_bar=sys.stderr.isatty(),
        retrain=args.retrain,
    )
    meta = read_metadata(path) or {}
    if args.json:
        print(json.dumps({"path": str(path), **meta}, ensure_ascii=False, indent=2))
        return 0
    acc = meta.get("train_accuracy_teacher_forced", {})
    print(f"mlake-tiny   {path}")
    print(f"facts        {len(meta.get('fact_ids', []))} x {len(config.langs)} languages")
    print(
        f"parameters   {meta.get('n_parameters', 0) / 1e6:.2f} M "
        f"({meta.get('n_parameters_non_embedding', 0) / 1e6:.2f} M non-embedding)"
    )
    print(
        f"training     {meta.get('epochs')} epochs, {meta.get('steps')} steps, "
        f"{meta.get('train_seconds')} s, stopped by {meta.get('stopped')}"
    )
    print("answered     " + "  ".join(f"{k} {100 * v:.1f}%" for k, v in acc.items()))
    return 0


def describe(adapter: Any) -> dict[str, Any]:
    """Everything ``models check`` reports about a loaded adapter, as a JSON-ready dict."""
    from mlake_core.models.sites import LAYERED_KINDS, SITE_DESCRIPTIONS, SITE_KINDS

    sites = []
    for kind in SITE_KINDS:
        where = adapter.spec.sites[kind]
        sites.append(
            {
                "site": kind if kind not in LAYERED_KINDS else f"{kind}.{{L}}",
                "module": where.module,
                "port": where.port,
                "width": adapter.d_mlp if kind == "mlp_post" else adapter.d_model,
                "meaning": SITE_DESCRIPTIONS[kind],
            }
        )
    return {
        "info": adapter.info.to_dict(),
        "bos_policy": adapter.info.bos.describe(),
        "sites": sites,
    }


def probe(adapter: Any) -> dict[str, Any]:
    """Run one forward pass on :data:`_PROBE_TEXTS`; report token counts and finiteness."""
    import torch

    batch = adapter.tokenize(list(_PROBE_TEXTS))
    logits = adapter.forward(batch)
    return {
        "texts": list(_PROBE_TEXTS),
        "tokens": batch.lengths.tolist(),
        "logits_shape": list(logits.shape),
        "finite": bool(torch.isfinite(logits[batch.attention_mask.bool()]).all()),
    }


def run_check(args: argparse.Namespace) -> int:
    """Entry point of ``mlake models check``."""
    from mlake.commands.common import log, model_settings
    from mlake.loading import load_model

    settings = model_settings(args)
    adapter = load_model(settings, data_dir=args.data_dir, log=log).adapter
    report = describe(adapter)
    report["forward"] = probe(adapter)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_text(report)
    if not report["forward"]["finite"]:
        raise ConfigError(
            f"--model {settings.name!r} produced non-finite logits with --dtype "
            f"{settings.dtype} on --device {report['info']['device']}; try --dtype float32"
        )
    return 0


def _print_text(report: dict[str, Any]) -> None:
    info = report["info"]
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items())
    blocks = "parallel attention+MLP" if info["parallel_attn_mlp"] else "sequential"
    rows = [
        ("model", info["model_id"]),
        ("revision", f"{info['revision'] or '-'} (commit {info['commit_hash'] or 'unknown'})"),
        (
            "architecture",
            f"{info['architecture']} ({info['positional']} positions, {blocks} blocks)",
        ),
        ("backend", f"{info['backend']} ({versions})"),
        ("device", info["device"]),
        ("dtype", info["dtype"]),
        (
            "layers",
            f"{info['n_layers']} (d_model {info['d_model']}, d_mlp {info['d_mlp']}, "
            f"vocab {info['d_vocab']})",
        ),
        ("BOS policy", report["bos_policy"]),
    ]
    for key, value in rows:
        print(f"{key:<13} {value}")
    print("sites")
    for site in report["sites"]:
        where = f"{site['module']} ({site['port']})"
        print(f"  {site['site']:<14} {where:<44} [{site['width']}] {site['meaning']}")
    fwd = report["forward"]
    status = "ok" if fwd["finite"] else "NON-FINITE LOGITS"
    print(
        f"forward       {status}: {len(fwd['texts'])} prompts, {fwd['tokens']} tokens, "
        f"logits {fwd['logits_shape']}"
    )


# -- list and plan ----------------------------------------------------------------------------


def _register_list_and_plan(sub: Any) -> None:
    from mlake.settings import RunSettings
    from mlake_core.models import catalog, planner
    from mlake_core.models.loading import DTYPES

    listing = sub.add_parser(
        "list",
        help="the catalog of real model shapes (configs, no weights) and how each is checked",
        description=catalog.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    listing.add_argument("--json", action="store_true", help="print JSON instead of text")
    listing.set_defaults(func=run_list)
    plan = sub.add_parser(
        "plan",
        help="memory and batch sizes of each stage for a model, from its config alone",
        description=planner.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument(
        "model",
        metavar="MODEL",
        help="a catalog name or hub id (mlake models list), a local checkpoint folder, a hub "
        "id in the local Hugging Face cache, a packaged model or mlake-tiny",
    )
    plan.add_argument(
        "--gpu-memory",
        default=None,
        help="memory of one device, e.g. 80GiB, 24GiB (default: 80GiB; with --device cpu, "
        "default: this machine's available memory)",
    )
    plan.add_argument("--dtype", default="bfloat16", choices=tuple(DTYPES))
    plan.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    plan.add_argument(
        "--tokens",
        type=int,
        default=planner.DEFAULT_TOKENS,
        help=f"tokens per prompt (default {planner.DEFAULT_TOKENS}: an MLaKE question and answer)",
    )
    plan.add_argument(
        "--batch-size",
        type=int,
        default=RunSettings.batch_size,
        help=f"rows per plain forward pass, as the run's --batch-size "
        f"(default {RunSettings.batch_size})",
    )
    plan.add_argument("--json", action="store_true", help="print JSON instead of text")
    plan.set_defaults(func=run_plan)


def catalog_rows() -> list[dict[str, Any]]:
    """The catalog as JSON-ready rows (``mlake models list --json``)."""
    from mlake_core.models.catalog import CATALOG

    rows = []
    for e in CATALOG:
        cfg = e.config_dict()
        rows.append(
            {
                "name": e.name,
                "hub_id": e.hub_id,
                "family": e.family,
                "model_type": cfg["model_type"],
                "params": e.published_params,
                "n_layers": cfg.get("num_hidden_layers") or cfg.get("n_layer"),
                "d_model": cfg.get("hidden_size") or cfg.get("n_embed") or cfg.get("n_embd"),
                "checks": e.checks,
                "unsupported": e.unsupported,
                "confirmed": e.confirmed,
                "note": e.note,
            }
        )
    return rows


def run_list(args: argparse.Namespace) -> int:
    """Entry point of ``mlake models list``."""
    rows = catalog_rows()
    if args.json:
        print(json.dumps(rows, ensure_ascii=False, indent=2))
        return 0
    print(
        f"{'name':<14} {'hub id':<26} {'type':<12} {'params':>7} {'layers':>6} {'d_model':>7}  checks"
    )
    for r in rows:
        checks = r["checks"] + (f": {r['unsupported']}" if r["unsupported"] else "")
        print(
            f"{r['name']:<14} {r['hub_id']:<26} {r['model_type']:<12} "
            f"{r['params'] / 1e9:>6.2f}B {r['n_layers']:>6} {r['d_model']:>7}  {checks}"
        )
    print(
        "\nchecks: meta = built on the meta device, every site resolved at the real shape "
        "(tests/mlake_core/models/test_catalog.py); real-width = also random weights at real "
        "width, 2 layers deep, one tracing pass, one ROME edit and one IG attribution "
        "(tests/mlake_core/models/test_catalog_real_width.py); full depth: "
        "benchmarks/gpu_check.py --shape NAME"
    )
    return 0


def plan_config(model: str, data_dir: str | None = None) -> tuple[Any, str]:
    """The config of what ``model`` names, without loading weights: a catalog row, a local
    folder, mlake-tiny, a packaged model, or a hub id in the local Hugging Face cache.

    Raises:
        ConfigError: an unsupported catalog row (why), or a name that is none of these.
    """
    from pathlib import Path

    from mlake.loading import resolve_model_path
    from mlake_core.models.catalog import CATALOG, find_entry
    from mlake_core.models.gguf_weights import resolve_gguf

    entry = find_entry(model)
    if entry is not None:
        if entry.unsupported:
            raise ConfigError(
                f"{entry.name} ({entry.hub_id}) is not supported: {entry.unsupported}"
            )
        return entry.hf_config(), f"{entry.name} ({entry.hub_id})"
    from transformers import AutoConfig

    path = resolve_model_path(model, data_dir=data_dir)
    gguf = resolve_gguf(path)
    folder = Path(gguf.folder) if gguf is not None else Path(path).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").is_file():
            raise ConfigError(f"MODEL folder {str(folder)!r} has no config.json")
        return AutoConfig.from_pretrained(str(folder)), model
    try:
        return AutoConfig.from_pretrained(model, local_files_only=True), model
    except (OSError, ValueError):
        raise ConfigError(
            f"MODEL {model!r} is not in the catalog ({', '.join(e.name for e in CATALOG)}), "
            "not a local folder, not a packaged model and not in the local Hugging Face cache"
        ) from None


def key_statistics_batch() -> tuple[int, int]:
    """``(documents per pass, tokens per document)`` of the key statistics ROME and MEMIT
    need: :func:`~mlake_core.editing.covariance.key_second_moment`'s own defaults."""
    import inspect

    from mlake_core.editing.covariance import key_second_moment

    params = inspect.signature(key_second_moment).parameters
    return int(params["batch_size"].default), int(params["max_len"].default)


def stage_batchers() -> dict[str, Any]:
    """The stages' own batch-size functions, by stage (what the planner calls)."""
    from analysis.neurons.attribution import grad_rows_per_pass
    from analysis.tracing.causal import rows_per_pass

    return {"causal tracing": rows_per_pass, "attribution (IG)": grad_rows_per_pass}


def run_plan(args: argparse.Namespace) -> int:
    """Entry point of ``mlake models plan``."""
    import psutil

    from mlake_core.models.planner import parse_memory, plan_model, shape_from_config

    if args.tokens < 1 or args.batch_size < 1:
        raise ConfigError("--tokens and --batch-size must be at least 1")
    config, label = plan_config(args.model)
    if args.gpu_memory is not None:
        memory = parse_memory(args.gpu_memory)
    elif args.device == "cpu":
        memory = int(psutil.virtual_memory().available)
    else:
        memory = parse_memory("80GiB")
    plan = plan_model(
        shape_from_config(config, label),
        batchers=stage_batchers(),
        dtype=args.dtype,
        device=args.device,
        device_memory=memory,
        n_tokens=args.tokens,
        forward_rows=args.batch_size,
        key_statistics=key_statistics_batch(),
    )
    if args.json:
        print(json.dumps(plan.to_dict(), ensure_ascii=False, indent=2))
    else:
        _print_plan(plan)
    return 0


def _size(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} B"


def _print_plan(plan: Any) -> None:
    s = plan.shape
    print(f"model        {s.name}: {s.architecture}, {s.n_params / 1e9:.2f} B parameters")
    print(
        f"shape        {s.n_layers} layers, d_model {s.d_model}, d_mlp {s.d_mlp}, "
        f"{s.n_heads} heads ({s.n_kv_heads} kv) x {s.d_head}, vocab {s.d_vocab}, "
        f"{'tied' if s.tied_embeddings else 'untied'} embeddings"
    )
    print(f"device       {plan.device}, {_size(plan.device_memory)} each, {plan.dtype}")
    where = (
        f"needs several devices: at least {plan.devices_needed}"
        if plan.several_devices
        else "fits one device"
    )
    print(
        f"weights      {_size(plan.weights_bytes)}; {where}; free for activations: "
        f"{_size(plan.free_bytes)} per device"
    )
    print(f"{'stage':<32} {'tokens':>6} {'per row':>10} {'rows':>6} {'per pass':>10} {'host':>9}")
    for st in plan.stages:
        host = _size(st.host_bytes) if st.host_bytes else "-"
        print(
            f"{st.stage:<32} {st.tokens:>6} {_size(st.row_bytes):>10} {st.rows:>6} "
            f"{_size(st.device_bytes):>10} {host:>9}"
        )
    print(
        "rows: what the stage's own batch-size function chooses with that free memory "
        "(tracing: rows_per_pass; IG: grad_rows_per_pass; key statistics: fixed batch); "
        "not counted: CUDA's context (~0.5 GiB per device) and fragmentation"
    )
