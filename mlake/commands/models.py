"""``mlake models check`` and ``mlake models train-tiny`` (``model`` is an alias of ``models``).

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
        "models", aliases=["model"], help="inspect model adapters; train mlake-tiny"
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
