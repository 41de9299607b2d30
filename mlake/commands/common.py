"""Options shared by the commands, derived from the settings dataclasses.

No default is written here: each option of :func:`add_settings_args` is a field of a frozen
config dataclass (:mod:`mlake.settings`, or an analysis's config), its help is the field's line
in the class docstring and its default the field's default.  :func:`settings_from_args` builds
the dataclass back from the options the user gave, through the one coercion of
:mod:`mlake_core.configs`, so a value parses the same way on the command line and in a pipeline
YAML file.  ``--set FIELD=VALUE`` (:func:`parse_set`) reaches any field by name.
"""

from __future__ import annotations

import argparse
import atexit
import dataclasses
import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from mlake_core.configs import build_dataclass, coerce_given
from mlake_core.errors import ConfigError


def log(message: str) -> None:
    """A progress line on stderr (stdout stays clean for tables and JSON)."""
    print(f"mlake: {message}", file=sys.stderr, flush=True)


def field_docs(cls: type) -> dict[str, str]:
    """Each field's description from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = inspect.getdoc(cls) or ""
    out: dict[str, str] = {}
    inside, current = False, None
    for line in doc.splitlines():
        if line.strip() == "Attributes:":
            inside = True
            continue
        if not inside:
            continue
        if line and not line.startswith(" "):
            break  # the next section
        match = re.match(r"^    (\w+)(?: \([^)]*\))?: (.*)$", line)
        if match:
            current = match.group(1)
            out[current] = match.group(2).strip()
        elif current and line.startswith("        "):
            out[current] += " " + line.strip()
    return {k: re.sub(r"``|:\w+:`~?|`", "", v) for k, v in out.items()}


def option_name(field: str, prefix: str = "") -> str:
    """``--prefix-field-name`` for a field."""
    return "--" + (prefix + field).replace("_", "-")


def add_settings_args(
    parser: argparse.ArgumentParser | Any,
    cls: type,
    *,
    fields: Sequence[str] | None = None,
    prefix: str = "",
    defaults: Mapping[str, Any] | None = None,
    choices: Mapping[str, Sequence[str]] | None = None,
    helps: Mapping[str, str] | None = None,
    flags: Mapping[str, Sequence[str]] | None = None,
    rename: Mapping[str, str] | None = None,
) -> None:
    """Add one option per field of the config dataclass ``cls`` (all fields, or ``fields``).

    Every option defaults to ``None`` (not given); the help shows the field's default from the
    dataclass (or the command's own default in ``defaults``, which :func:`settings_from_args`
    then applies).  Booleans that default to false become flags.

    Args:
        parser: a parser or argument group.
        cls: the dataclass.
        fields: the fields to expose (default: all).
        prefix: prepended to the option names (``attribution-``).
        defaults: the command's own defaults for some fields (e.g. ``facts`` 20).
        choices: allowed values per field.
        helps: help text per field (default: the docstring's).
        flags: extra option strings per field (e.g. ``("-n",)``).
        rename: an option name other than the field's, per field (``name`` -> ``model``);
            give the same to :func:`settings_from_args`.
    """
    docs = field_docs(cls)
    base = cls()
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        unresolved = getattr(cls, "UNRESOLVED_DEFAULTS", {})
        default = (defaults or {}).get(f.name, unresolved.get(f.name, getattr(base, f.name)))
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        text = (helps or {}).get(f.name) or docs.get(f.name, "")
        option = (rename or {}).get(f.name, f.name)
        names = [option_name(option, prefix), *(flags or {}).get(f.name, ())]
        kwargs: dict[str, Any] = {"dest": _dest(f.name, prefix, rename), "default": None}
        if isinstance(default, bool) and not default:
            kwargs["action"] = "store_const"
            kwargs["const"] = True
            kwargs["help"] = text
        else:
            kwargs["help"] = f"{text} (default: {shown})" if text else f"default: {shown}"
            if (choices or {}).get(f.name):
                kwargs["choices"] = tuple((choices or {})[f.name])
        parser.add_argument(*names, **kwargs)


def _dest(field: str, prefix: str, rename: Mapping[str, str] | None) -> str:
    return (prefix + (rename or {}).get(field, field)).replace("-", "_")


def given_settings(
    args: argparse.Namespace,
    cls: type,
    *,
    prefix: str = "",
    fields: Sequence[str] | None = None,
    rename: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """The fields of ``cls`` the user gave as options (value not ``None``)."""
    out = {}
    for f in dataclasses.fields(cls):
        if fields is not None and f.name not in fields:
            continue
        value = getattr(args, _dest(f.name, prefix, rename), None)
        if value is not None:
            out[f.name] = value
    return out


def settings_from_args(
    args: argparse.Namespace,
    cls: type,
    *,
    prefix: str = "",
    fields: Sequence[str] | None = None,
    defaults: Mapping[str, Any] | None = None,
    base: Any = None,
    rename: Mapping[str, str] | None = None,
) -> Any:
    """Build ``cls`` from the options :func:`add_settings_args` added: the options given, on
    top of the command's ``defaults``, on top of ``base`` (default: the dataclass's defaults).

    Raises:
        ConfigError: a value that does not parse or that the dataclass rejects, naming the
            option.
    """
    given = given_settings(args, cls, prefix=prefix, fields=fields, rename=rename)
    # Defaults resolved against the other options (DataSettings' langs "all": the languages
    # of the --data-dir given), not carried over resolved from the base's.
    data = {**getattr(cls, "UNRESOLVED_DEFAULTS", {}), **(defaults or {}), **given}
    try:
        return build_dataclass(cls, data, path="options", base=base)
    except ConfigError as err:
        # "options.batch_size: ..." -> "--batch-size: ..."
        text = re.sub(
            r"options\.(\w+)",
            lambda m: option_name((rename or {}).get(m.group(1), m.group(1)), prefix),
            str(err),
        ).replace("options: ", "")
        # "batch_size 0: ..." (a dataclass naming its own field) -> "--batch-size 0: ..."
        first = re.match(r"(\w+)(?=[ :])", text)
        if first and first.group(1) in {f.name for f in dataclasses.fields(cls)}:
            name = first.group(1)
            text = option_name((rename or {}).get(name, name), prefix) + text[first.end() :]
        raise ConfigError(text) from None


def parse_set(
    items: Sequence[str],
    known: Mapping[str, type],
    *,
    option: str = "--set",
    kind: str = "NAME",
    among: str = "the configurable",
) -> dict[str, dict[str, str]]:
    """``--set NAME.FIELD=VALUE`` options as ``{name: {field: value}}``; values stay text
    (the config dataclasses coerce them), after a check that each parses as its field's type
    (:func:`~mlake_core.configs.coerce_given`; NaN and infinities refused).

    Args:
        items: the options.
        known: the config dataclass of each name that may be set (e.g. each method asked for).
        option: the option's name, for errors.
        kind: what a name is (``METHOD``), for errors.
        among: where the names come from (``--methods``), for errors.

    Raises:
        ConfigError: a malformed item, an unknown name, a field the config does not have
            (naming the fields it has), or a value that does not parse (naming
            ``--set NAME.FIELD``).
    """
    out: dict[str, dict[str, str]] = {}
    for item in items:
        key, sep, value = item.partition("=")
        name, dot, field = key.strip().partition(".")
        if not sep or not dot or not name or not field:
            raise ConfigError(f"{option} {item!r}: expected {kind}.FIELD=VALUE, e.g. ft.lr=0.01")
        if name not in known:
            raise ConfigError(
                f"{option} {item!r}: {kind.lower()} {name!r} is not among {among} "
                f"({', '.join(known)})"
            )
        names = [f.name for f in dataclasses.fields(known[name])]
        if field not in names:
            raise ConfigError(
                f"{option} {item!r}: {name} has no field {field!r} (fields: {', '.join(names)})"
            )
        # Checked here so a bad value names the option it came from (``--set ft.lr``).
        coerce_given(known[name], {field: value.strip()}, f"{option} {name}")
        out.setdefault(name, {})[field] = value.strip()
    return out


# -- the model, data and run options of every model command -----------------------------------

#: ``ModelSettings.name`` is the ``--model`` option.
MODEL_RENAME = {"name": "model"}


def add_model_args(parser: argparse.ArgumentParser, *, template: bool = True) -> None:
    """Add the :class:`~mlake.settings.ModelSettings` options (``--model``, ``--backend``,
    ``--device``, ``--dtype``, ``--revision``, ``--trust-remote-code``, ``--template``)."""
    from mlake.settings import ModelSettings
    from mlake_core.models.loading import BACKENDS, DTYPES

    fields = [f.name for f in dataclasses.fields(ModelSettings)]
    if not template:
        fields.remove("template")
    add_settings_args(
        parser.add_argument_group("model"),
        ModelSettings,
        fields=fields,
        # --template is checked by ModelSettings (fewshot-K-seedS names are open-ended).
        choices={"backend": BACKENDS, "dtype": tuple(DTYPES)},
        helps={
            "name": "local checkpoint folder, Hugging Face hub id, mlake-tiny (trained on "
            "MLaKE first if it is not cached) or mlake-tiny-editable"
        },
        rename=MODEL_RENAME,
    )


def model_settings(args: argparse.Namespace) -> Any:
    """The :class:`~mlake.settings.ModelSettings` of :func:`add_model_args`' options."""
    from mlake.settings import ModelSettings

    return settings_from_args(args, ModelSettings, rename=MODEL_RENAME)


def add_data_args(
    parser: argparse.ArgumentParser, *, facts_default: str | None, facts_help: str
) -> None:
    """Add the :class:`~mlake.settings.DataSettings` options (``--langs``, ``--facts``,
    ``--version``, ``--data-dir``); ``facts_default`` is the command's own default."""
    from mlake.settings import DataSettings

    add_settings_args(
        parser.add_argument_group("data"),
        DataSettings,
        defaults={"facts": facts_default},
        helps={
            "facts": facts_help,
            "langs": "comma-separated language codes, or all: the languages come from the "
            "data folder (MLaKE's five, en,zh,ja,fr,de, in the published releases; a folder "
            "in MLaKE's format may hold others: README, Other languages)",
        },
    )
    parser.set_defaults(facts_default=facts_default)


def data_settings(args: argparse.Namespace) -> Any:
    """The :class:`~mlake.settings.DataSettings` of :func:`add_data_args`' options."""
    from mlake.settings import DataSettings

    return settings_from_args(
        args, DataSettings, defaults={"facts": getattr(args, "facts_default", None)}
    )


def add_run_args(parser: argparse.ArgumentParser, *, seed: bool = False) -> None:
    """Add the :class:`~mlake.settings.RunSettings` options (``--batch-size``,
    ``--results-dir``; ``--seed`` where the command has one), ``--json`` and the executor
    options (:func:`add_executor_args`)."""
    from mlake.settings import RunSettings

    group = parser.add_argument_group("run")
    fields = ["batch_size", "results_dir", *(["seed"] if seed else [])]
    add_settings_args(group, RunSettings, fields=fields)
    group.add_argument("--json", action="store_true", help="print JSON instead of a table")
    add_executor_args(parser)


#: The :class:`~mlake.settings.RunSettings` fields of the executor options
#: (:func:`add_executor_args`).
EXECUTOR_FIELDS: tuple[str, ...] = (
    "executor",
    "address",
    "gpus_per_worker",
    "workers",
    "shard_facts",
)


def add_executor_args(parser: argparse.ArgumentParser) -> None:
    """Add the executor options of :class:`~mlake.settings.RunSettings` (``--executor``,
    ``--address``, ``--gpus-per-worker``, ``--workers``, ``--shard-facts``;
    :mod:`mlake.executors`)."""
    from mlake.settings import EXECUTORS, RunSettings

    add_settings_args(
        parser.add_argument_group("executor (sharded runs)"),
        RunSettings,
        fields=EXECUTOR_FIELDS,
        choices={"executor": EXECUTORS},
    )


def executor_settings(args: argparse.Namespace, base: Any) -> Any:
    """``base`` (a :class:`~mlake.settings.RunSettings`, or a subclass such as the pipeline's)
    with the executor options given (:func:`add_executor_args`)."""
    return settings_from_args(args, type(base), fields=EXECUTOR_FIELDS, base=base)


def run_settings(args: argparse.Namespace) -> Any:
    """The :class:`~mlake.settings.RunSettings` of :func:`add_run_args`' options."""
    from mlake.settings import RunSettings

    return settings_from_args(args, RunSettings)


def open_session(args: argparse.Namespace, *, log: Callable[[str], None] = log) -> Any:
    """Check the model, data and run options, then load the model and the data and select
    the facts (:func:`mlake.session.open_session`)."""
    from mlake.executors import make_executor
    from mlake.session import open_session as open_

    model, data, run = model_settings(args), data_settings(args), run_settings(args)
    session = open_(model, data, run, log=log)
    # --executor ray: the sharded stages (knowledge, tracing, transfer) run on Ray workers.
    executor = make_executor(run, model, data, log=log)
    if executor is not None:
        session.ctx = dataclasses.replace(session.ctx, executor=executor)
        atexit.register(executor.close)
    return session
