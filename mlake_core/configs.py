"""Helpers for the frozen config dataclasses: values from the CLI or YAML arrive as strings
(YAML reads ``5e-1`` as a string), so every field is coerced to its default's type."""

from __future__ import annotations

import dataclasses
from typing import Any

from mlake_core.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def coerce_fields(obj: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Coerce each string field of a frozen dataclass to the type of its default
    (``int``, ``float`` or ``bool``), in place.

    Raises:
        ConfigError: naming the option, for a value that does not parse.
    """
    for f in dataclasses.fields(obj):
        if f.name in skip or f.default is dataclasses.MISSING:
            continue
        value = getattr(obj, f.name)
        kind = type(f.default)
        if kind not in (int, float, bool):
            continue
        option = "--" + f.name.replace("_", "-")
        if isinstance(value, str):
            text = value.strip().lower()
            try:
                if kind is bool:
                    if text not in _TRUE | _FALSE:
                        raise ValueError(value)
                    value = text in _TRUE
                else:
                    value = kind(float(text)) if kind is int and "e" in text else kind(text)
            except ValueError:
                raise ConfigError(f"{option} {value!r}: expected a {kind.__name__}") from None
        elif kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise ConfigError(f"{option} {value!r}: expected a {kind.__name__}")
        object.__setattr__(obj, f.name, value)
