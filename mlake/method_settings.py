"""The one resolution of an editing method's settings, used by ``mlake edit transfer``, the
pipeline and the sweep alike.

A method's config (:mod:`mlake_core.editing`) is filled, in rising precedence, from:

1. the method dataclass's defaults (the library's, sized for large pretrained models);
2. for ``layer`` / ``layers`` left at ``auto``: the edit layer causal tracing recommended for
   this model (``mlake trace`` or the pipeline's tracing stage registered it; MEMIT: a run of
   layers ending there), else the documented default per model size
   (:func:`~mlake_core.editing.layers.default_layer`, :func:`default_layers`);
3. the settings the model was trained for, when it brings its own
   (:func:`~mlake_core.models.mlake_tiny.recommended_edit_settings`: mlake-tiny's FT settings,
   mlake-tiny-editable's layers and ``δ`` settings);
4. what the user set: ``--layer`` and ``--set METHOD.FIELD=VALUE`` on the command line, or
   the fields a pipeline or sweep config sets to a value other than the default.

``auto`` is resolved here, once: the config handed to the method names its layers, and
``layer_source`` says where they came from (``explicit``, ``model``, ``tracing``,
``default``).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mlake_core.editing import get_method
from mlake_core.models.adapter import ModelAdapter

#: The config fields that name edit layers.
LAYER_FIELDS: tuple[str, ...] = ("layer", "layers")


@dataclass(frozen=True)
class ResolvedMethod:
    """A method's config and where its settings came from.

    Attributes:
        name: the method.
        config: its config dataclass, layers resolved.
        layer_source: ``explicit``, ``model``, ``tracing``, ``default``, or ``None`` for a
            method without layers (IKE).
        model_fields: the settings the model's own recommendation set.
        tracing_run: the tracing run whose recommendation was used, if any.
    """

    name: str
    config: Any
    layer_source: str | None
    model_fields: dict[str, str]
    tracing_run: str | None = None


def set_fields(config: Any, base: Any = None) -> dict[str, Any]:
    """The fields of ``config`` whose value differs from ``base`` (default: its dataclass's
    defaults), compared as text so that a config dumped to YAML and read back counts the
    same."""
    base = base if base is not None else type(config)()
    return {
        f.name: getattr(config, f.name)
        for f in dataclasses.fields(config)
        if str(getattr(config, f.name)) != str(getattr(base, f.name))
    }


def resolve_method(
    name: str,
    adapter: ModelAdapter,
    model_path: str | os.PathLike[str],
    *,
    given: Mapping[str, Any] | None = None,
    model_settings: bool = True,
    results_dir: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> ResolvedMethod:
    """Resolve method ``name``'s config (module docstring).

    Args:
        name: a registered editing method.
        adapter: the model (its layer count bounds the layers).
        model_path: what was loaded (its tracing recommendation and own settings are looked
            up by it).
        given: the fields the user set (values as text or typed).
        model_settings: apply the settings the model was trained for.
        results_dir: the results store where tracing registered its recommendation.
        log: receives one line per source used.

    Raises:
        ConfigError: an unknown method or field, or a value the config rejects.
    """
    from mlake.stages.tracing import lookup_recommended_layer
    from mlake_core.editing.layers import default_layer, default_layers
    from mlake_core.models.mlake_tiny import recommended_edit_settings

    say = log or (lambda _m: None)
    entry = get_method(name)
    given = {str(k): v for k, v in (given or {}).items()}
    fields = {f.name for f in dataclasses.fields(entry.config_cls)}
    model = recommended_edit_settings(model_path).get(name, {}) if model_settings else {}
    model_fields = {k: str(v) for k, v in model.items() if k not in given}
    kept = {k: given[k] for k in model if k in given}
    if model_fields:
        say(
            f"{name}: settings this model was trained for: "
            + ", ".join(f"{k}={v}" for k, v in model_fields.items())
            + (
                "; set here instead: " + ", ".join(f"{k}={v}" for k, v in kept.items())
                if kept
                else ""
            )
        )
    values: dict[str, Any] = {**model_fields, **given}
    config = entry.config_cls(**values)
    wants = [n for n in LAYER_FIELDS if n in fields]
    if not wants:
        return ResolvedMethod(name, config, None, model_fields)
    if any(n in given for n in wants):
        source = "explicit"
    elif any(n in model_fields for n in wants):
        source = "model"
    else:
        source = "default"
    tracing_run = None
    if all(str(getattr(config, n)) == "auto" for n in wants):
        traced = lookup_recommended_layer(adapter, model_path, results_dir)
        if traced is not None and traced.get("layer") is not None:
            end, source, tracing_run = int(traced["layer"]), "tracing", traced.get("run")
        else:
            end = default_layer(adapter)
        resolved = {
            "layer": str(end),
            "layers": ",".join(str(x) for x in default_layers(adapter, end=end)),
        }
        config = dataclasses.replace(config, **{n: resolved[n] for n in wants})
        say(
            f"{name}: layer auto -> "
            + ", ".join(f"{n} {resolved[n]}" for n in wants)
            + (f" (causal tracing, {tracing_run})" if tracing_run else " (documented default)")
        )
    return ResolvedMethod(name, config, source, model_fields, tracing_run)
