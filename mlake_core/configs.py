"""The one coercion of settings into the frozen config dataclasses.

Settings arrive as text (a command-line ``--set FIELD=VALUE``, an option) or as YAML values,
and YAML reads ``5e-1`` as a string.  Every config dataclass of mlake is filled through the
functions here, so a value parses the same way wherever it comes from:

* :func:`coerce_value` turns one value into its field's type (the default's type, else the
  annotation): ints (``1e3`` allowed, ``2.5`` refused), finite floats (``nan`` and ``inf``
  refused), booleans (``true``/``yes``/``on``/``1`` and their opposites), tuples (a list, or
  comma-separated text);
* :func:`coerce_given` coerces the fields a user gave, each error naming where it was given
  (``--set ft.lr``) rather than the dataclass's own option name;
* :func:`coerce_fields` applies it to a dataclass's numeric and boolean fields in
  ``__post_init__`` (so ``FtConfig(lr="0.01")`` is a float);
* :func:`build_dataclass` builds a dataclass from a mapping (a YAML section, ``--set`` pairs):
  unknown keys are errors naming the key path and the file, nested dataclasses are built
  recursively, fields not given keep a base's values;
* :func:`to_plain` turns a config back into YAML-able values.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from typing import Any

from mlake_core.errors import ConfigError

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def where(source: str | None, path: str) -> str:
    """``"file: key.path"`` (or the key path alone) for error messages."""
    return f"{source}: {path}" if source else path


def _is_union_with_str(hint: Any) -> bool:
    return str in typing.get_args(hint)


def coerce_value(value: Any, default: Any, hint: Any, at: str) -> Any:
    """``value`` as the type of a field (its default's type, else its annotation ``hint``).

    A field typed ``int | str`` with an int default (``layer: auto``) keeps strings.

    Raises:
        ConfigError: naming ``at`` (the option or key path) and the value.
    """
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if value is None:
        return None
    kind = type(default) if default is not None else None
    if kind is None and args:
        kinds = [a for a in args if a is not type(None)]
        kind = kinds[0] if len(kinds) == 1 else None
    if origin is tuple or kind is tuple:
        if isinstance(value, str):
            return tuple(v.strip() for v in value.split(",") if v.strip())
        if isinstance(value, (list, tuple)):
            return tuple(value)
        raise ConfigError(f"{at}: expected a list, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{at}: expected true or false, got {value!r}")
    if kind is int and not (isinstance(default, int) and _is_union_with_str(hint)):
        if isinstance(value, bool):
            raise ConfigError(f"{at}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{at}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{at}: expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{at}: expected a number, got {value!r}")
        try:
            number = float(value)  # YAML reads 5e-1 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{at}: expected a number, got {value!r}") from None
        if not math.isfinite(number):  # NaN and infinities would run and store NaN results
            raise ConfigError(f"{at}: expected a finite number, got {value!r}")
        return number
    if kind is str and isinstance(value, (dict, list)):
        raise ConfigError(f"{at}: expected a single value, got {value!r}")
    return value


def coerce_fields(obj: Any, *, skip: tuple[str, ...] = ()) -> None:
    """Coerce the ``int``, ``float`` and ``bool`` fields of a frozen dataclass in place
    (:func:`coerce_value`; errors name the field as an option, ``--max-iter``).

    Raises:
        ConfigError: naming the option, for a value that does not parse.
    """
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.name in skip or f.default is dataclasses.MISSING:
            continue
        if type(f.default) not in (int, float, bool):
            continue
        option = "--" + f.name.replace("_", "-")
        value = coerce_value(getattr(obj, f.name), f.default, hints.get(f.name), option)
        object.__setattr__(obj, f.name, value)


def build_dataclass(
    cls: type, data: Any, *, path: str, source: str | None = None, base: Any = None
) -> Any:
    """Build the frozen dataclass ``cls`` from a mapping: unknown keys are errors naming the
    key path (and the file ``source``), values are coerced to the fields' types, nested
    dataclasses are built recursively, and errors the dataclass raises on construction are
    prefixed with the path.  Fields not given keep ``base``'s values (default: ``cls``'s
    defaults); a field of ``cls.UNRESOLVED_DEFAULTS`` still at its default is given again
    unresolved (DataSettings' langs "all" then means the languages of the data_dir given).

    Raises:
        ConfigError: an unknown key, a value of the wrong type or one the dataclass rejects.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where(source, path)}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{where(source, f'{path}.{unknown[0]}')}: unknown key (known: {', '.join(fields)})"
        )
    # Defaults resolved on construction against other fields (a class's
    # ``UNRESOLVED_DEFAULTS``, e.g. DataSettings' langs "all": the data folder's languages)
    # are given again unresolved where the base still holds the default, so they resolve
    # against the fields given here.
    unresolved: Mapping[str, Any] = getattr(cls, "UNRESOLVED_DEFAULTS", {})
    defaults = cls() if base is None or unresolved else None
    base = base if base is not None else defaults
    kwargs: dict[str, Any] = {}
    for name in fields:
        current = getattr(base, name)
        if name not in data:
            default = name in unresolved and current == getattr(defaults, name)
            kwargs[name] = unresolved[name] if default else current
            continue
        value = data[name]
        at = where(source, f"{path}.{name}")
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            kwargs[name] = build_dataclass(
                type(current), value, path=f"{path}.{name}", source=source, base=current
            )
        else:
            kwargs[name] = coerce_value(value, current, hints.get(name), at)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{where(source, path)}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{where(source, path)}: {err}") from None


def to_plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts, lists and scalars (NaN as ``None``)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): to_plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


def coerce_given(cls: type, values: Mapping[str, Any], at: str, sep: str = ".") -> dict[str, Any]:
    """``values`` for dataclass ``cls`` with each known field coerced to its type, errors
    naming ``{at}{sep}{field}`` (``--set ft.lr``; ``--set lr`` with ``sep=" "``); unknown
    names are passed through for ``cls`` itself to refuse.

    Raises:
        ConfigError: naming where the field was given and the value.
    """
    hints = typing.get_type_hints(cls)
    defaults = {
        f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING
    }
    return {
        k: coerce_value(v, defaults[k], hints.get(k), f"{at}{sep}{k}") if k in defaults else v
        for k, v in values.items()
    }
