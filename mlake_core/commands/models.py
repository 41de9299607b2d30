"""``mlake models check``: load a model through an adapter and describe it.

Prints the architecture, number of layers and widths, the canonical sites with the Hugging Face
module boundary carrying each, the BOS policy, device and dtype, then runs one forward pass on a
short English and Chinese prompt to show the model works.  ``--json`` prints the same as JSON.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from mlake_core.errors import ConfigError

_PROBE_TEXTS = ("The capital of France is", "法国的首都是")


def register(subparsers: Any) -> None:
    """Add the ``models`` command and its ``check`` sub-command."""
    from mlake_core.models.loading import BACKENDS, DTYPES

    parser = subparsers.add_parser("models", help="inspect model adapters")
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND")
    sub.required = True
    check = sub.add_parser(
        "check",
        help="load a model and print its architecture, sites, BOS policy, device and dtype",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    check.add_argument(
        "--model", required=True, help="local checkpoint folder or Hugging Face hub id"
    )
    check.add_argument("--backend", default="tlens", choices=BACKENDS, help="default: tlens")
    check.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda:N")
    check.add_argument("--dtype", default="float32", choices=tuple(DTYPES), help="default: float32")
    check.add_argument("--revision", default=None, help="hub branch, tag or commit")
    check.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="allow modelling code shipped with the checkpoint",
    )
    check.add_argument("--json", action="store_true", help="print JSON instead of text")
    check.set_defaults(func=run_check)


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
    from mlake_core.models.loading import load_adapter

    adapter = load_adapter(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        trust_remote_code=args.trust_remote_code,
        revision=args.revision,
    )
    report = describe(adapter)
    report["forward"] = probe(adapter)
    if args.json:
        print(json.dumps(report, ensure_ascii=False, indent=2))
    else:
        _print_text(report)
    if not report["forward"]["finite"]:
        raise ConfigError(
            f"--model {args.model!r} produced non-finite logits with --dtype {args.dtype} "
            f"on --device {report['info']['device']}; try --dtype float32"
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
