"""The pipeline: every stage on one model, one run folder.

``mlake pipeline`` (and :func:`run_pipeline`) runs, in order:

1. ``data``: load MLaKE, check it (:func:`~mlake_core.data.stats.dataset_stats`: subjects
   located, cloze prompts well-posed, multi-hop links) and select the facts;
2. ``model``: load the model (mlake-tiny is trained first when it is not cached);
3. ``knowledge``: what the model knows in each language, on the selected facts and the
   transfer stage's locality sample;
4. ``tracing``: causal tracing of the selected facts (it runs before editing so that an edit
   layer ``auto`` can take the layer tracing recommends);
5. ``transfer``: edit transfer, one run per editing method;
6. ``neurons``: neuron attribution, language-specific and shared units, ablation matrix;
7. ``restricted``: FT restricted to the shared / random neurons found in step 6;
8. ``probes``: language-identity and cross-lingual probes (skipped, with a note, when the
   ``probes`` package is not installed);
9. ``relate``: sharing against transfer, for each transfer method;
10. ``figures`` and ``report``: every figure (PDF and PNG) and ``report.md``.

Every stage is one of :mod:`mlake.stages`' stage functions (or
:func:`mlake.stages.relate.relate_stage`), which cache their result in the results store keyed by
everything that determines it and save each fact as it finishes: a stopped pipeline, run
again with the same config, reloads the finished stages and facts and computes only the rest.

The run folder (``--out``)::

    config.yaml      the resolved config (every setting, defaults filled in)
    provenance.json  package versions, git commit, seeds, command line, machine
    manifest.json    per stage: status, seconds, the stage's run folder in the store
    store/           the results store (unless ``run.results_dir`` points elsewhere)
    figures/         every figure as PDF and PNG (``mlake figures`` redraws them)
    report.md        the key tables and the figures

The config (:class:`PipelineConfig`) is a tree of frozen dataclasses, one section per stage,
reusing each stage's own config dataclass.  :func:`load_config` reads it from YAML, rejecting
unknown keys (naming the key path and the file) and coercing values through the dataclasses.
The defaults (``mlake/pipeline_default.yaml`` documents them) are chosen so that the
default pipeline on mlake-tiny finishes within 15 minutes on two CPU cores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from analysis.neurons.attribution import AttributionConfig
from analysis.neurons.config import NeuronConfig
from analysis.tracing.causal import TraceConfig
from mlake.progress import Bars, LogBar
from mlake_core.errors import ConfigError, MlakeError
from mlake_core.metrics.knowledge import KnowledgeConfig

#: Stages in the order they run.
STAGES: tuple[str, ...] = (
    "data",
    "model",
    "knowledge",
    "tracing",
    "transfer",
    "neurons",
    "restricted",
    "probes",
    "relate",
    "figures",
    "report",
)
#: The YAML file documenting the default config (shipped in the package).
DEFAULT_CONFIG_FILE = Path(__file__).with_name("pipeline_default.yaml")


# -- config sections --------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelSettings:
    """Which model, and how it is loaded (the options of every model command).

    Attributes:
        name: ``mlake-tiny`` (trained first when not cached), a local folder or a hub id.
        backend: ``tlens`` or ``nnsight``.
        device: ``auto`` (CUDA when present), ``cpu``, ``cuda:N``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        revision: hub branch, tag or commit.
        trust_remote_code: allow modelling code shipped with a checkpoint.
        template: prompt template (``None``: the one the model was trained with, else ``qa``).
    """

    name: str = "mlake-tiny"
    backend: str = "tlens"
    device: str = "auto"
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    template: str | None = None

    def __post_init__(self) -> None:
        from mlake_core.models.loading import BACKENDS, DTYPES
        from mlake_core.models.prompting import TEMPLATES

        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose {', '.join(DTYPES)}")
        if self.template is not None and self.template not in TEMPLATES:
            raise ConfigError(f"template {self.template!r}: choose {', '.join(TEMPLATES)}")


@dataclass(frozen=True)
class DataSettings:
    """Which data.

    Attributes:
        langs: languages.
        facts: the first N facts of the default selection (mlake-tiny's training facts, else
            all facts), or ``all``.
        version: MLaKE release.
        data_dir: MLaKE data directory (default: ``$MLAKE_DATA``, then ``../shared/mlake``).
    """

    langs: tuple[str, ...] = ("en", "zh", "ja", "fr", "de")
    facts: int | str = 12
    version: str = "v2024-11"
    data_dir: str | None = None

    def __post_init__(self) -> None:
        from mlake_core.data.paths import RELEASES
        from mlake_core.languages import parse_langs

        object.__setattr__(self, "langs", parse_langs(self.langs))
        facts = self.facts
        if isinstance(facts, str) and facts not in ("all", "trained"):
            try:
                facts = int(facts)
            except ValueError:
                raise ConfigError(f"facts {facts!r}: a number or 'all'") from None
        if isinstance(facts, bool) or (isinstance(facts, int) and facts < 1):
            raise ConfigError(f"facts {facts!r}: must be at least 1")
        object.__setattr__(self, "facts", facts)
        if self.version not in RELEASES:
            raise ConfigError(f"version {self.version!r}: choose {', '.join(RELEASES)}")


@dataclass(frozen=True)
class RunSettings:
    """How the pipeline runs (nothing here changes a result but ``seed``).

    Attributes:
        seed: seed of the editing methods and of restricted editing's random unit set (the
            stages' own seeds are in their sections).
        batch_size: sequences per forward pass.
        results_dir: the results store (default: ``<out>/store``).
        stages: the stages to run (default: all, :data:`STAGES`).
    """

    seed: int = 0
    batch_size: int = 32
    results_dir: str | None = None
    stages: tuple[str, ...] = STAGES

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size {self.batch_size}: must be at least 1")
        stages = self.stages
        if isinstance(stages, str):
            stages = tuple(s.strip() for s in stages.split(",") if s.strip())
        object.__setattr__(self, "stages", tuple(stages))
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown {', '.join(bad)}; choose from {', '.join(STAGES)}")


def _default_method_configs() -> dict[str, Any]:
    """FT tuned for mlake-tiny: with the library defaults (lr 1e-3, 40 steps, norm 0.05) FT
    changes nothing on it; these settings reach about 90% efficacy at layer 0."""
    from mlake_core.editing.base import get_method

    return {
        "ft": get_method("ft").config_cls(layer=0, lr=0.01, steps=100, max_rel_norm=0.3),
        # IKE's demonstrations are the locality facts: no more than n_locality.
        "ike": get_method("ike").config_cls(n_demonstrations=3),
    }


@dataclass(frozen=True)
class TransferSettings:
    """Edit transfer (:func:`~mlake.stages.transfer.transfer_stage`) and restricted editing.

    In YAML, each method's settings are a mapping under the method's name (``ft:``,
    ``rome:``, ...; the fields of its config dataclass in :mod:`mlake_core.editing`).  A
    method without one uses its dataclass's defaults.  ``layer: auto`` takes the layer the
    pipeline's own tracing recommends (as ``mlake edit transfer --layer auto``).

    Attributes:
        methods: editing methods to run.
        edit_form: prompt form the edit is requested in.
        n_locality: unrelated facts per language for locality.
        locality_seed: seed of that sample.
        corpus: text file or folder for ROME/MEMIT key statistics (default: MLaKE text).
        method_configs: per method, its config (YAML: the method's own section).
        restricted: FT restricted to these neuron classes of the neuron stage (``shared``,
            ``random``, ``specific``), each compared with unrestricted FT by ``relate``.
        units_method: which attribution method's classes restricted editing takes.
        model_settings: apply the edit settings a model was trained for
            (:func:`~mlake_core.models.mlake_tiny.recommended_edit_settings`, as ``mlake edit
            transfer`` does) to the method fields this config leaves at their defaults (the
            pipeline's defaults, else the dataclass's); a field set to another value keeps
            it, one set to the default value itself counts as left at it (the config as
            dumped and reloaded resolves the same way).  What was applied is logged and
            recorded in the transfer run's meta.
    """

    # IKE is left out by default: on mlake-tiny it reaches 0% efficacy (the model does not
    # learn in context), so it would only add about a second per edit; add it with
    # methods: [ft, ike].
    methods: tuple[str, ...] = ("ft",)
    edit_form: str = "question"
    n_locality: int = 3
    locality_seed: int = 0
    corpus: str | None = None
    method_configs: Mapping[str, Any] = field(default_factory=_default_method_configs)
    restricted: tuple[str, ...] = ("shared", "random")
    units_method: str = "ig"
    model_settings: bool = True

    def __post_init__(self) -> None:
        from mlake_core.editing.base import get_method
        from mlake_core.editing.methods import UNIT_CHOICES

        for name in (*self.methods, *self.method_configs):
            get_method(name)  # raises ConfigError naming the registered methods
        bad = [u for u in self.restricted if u not in UNIT_CHOICES or u == "all"]
        if bad:
            raise ConfigError(
                f"restricted {', '.join(bad)}: choose from "
                f"{', '.join(u for u in UNIT_CHOICES if u != 'all')}"
            )
        if self.restricted and "ft" not in self.methods:
            raise ConfigError(
                "restricted editing restricts FT: add ft to methods or set restricted: []"
            )
        self.transfer_config(24)  # validates edit_form and n_locality
        if "ike" in self.methods:
            wanted = self.method_config("ike").n_demonstrations
            if wanted > self.n_locality:
                raise ConfigError(
                    f"ike.n_demonstrations {wanted}: IKE's demonstrations are the locality facts, "
                    f"so at most n_locality ({self.n_locality})"
                )

    def method_config(self, name: str) -> Any:
        """The config of method ``name`` (its section, else its dataclass's defaults)."""
        from mlake_core.editing.base import get_method

        return self.method_configs.get(name) or get_method(name).config_cls()

    def transfer_config(self, max_new_tokens: int) -> Any:
        """The :class:`~analysis.transfer.TransferConfig` (generation length: the
        knowledge stage's, which the pre-edit measurement used)."""
        from analysis.transfer import TransferConfig

        return TransferConfig(
            edit_form=self.edit_form,
            n_locality=self.n_locality,
            locality_seed=self.locality_seed,
            max_new_tokens=max_new_tokens,
        )


def _default_relate() -> Any:
    from analysis.relate import RelateConfig

    return RelateConfig(n_boot=200, n_perm=100)


@dataclass(frozen=True)
class RelateSettings:
    """The relation analysis (:func:`mlake.stages.relate.relate_stage`), one per transfer method.

    In YAML the fields of :class:`~analysis.relate.RelateConfig` sit beside ``unit``.

    Attributes:
        unit: the neuron overlap used at fact level (``<method>_<unit>``, e.g. ``ig_neuron``).
        stats: the statistics' settings.
    """

    unit: str = "ig_neuron"
    stats: Any = field(default_factory=_default_relate)


def _default_knowledge() -> KnowledgeConfig:
    return KnowledgeConfig(mcqa=False)


def _default_tracing() -> TraceConfig:
    return TraceConfig(n_samples=5)


def _default_neurons() -> NeuronConfig:
    return NeuronConfig(
        methods=("ig", "atp", "lape"),
        attribution=AttributionConfig(steps=10),
        text_tokens=20_000,
        ablation_facts=20,
        n_random=2,
    )


def probe_config_class() -> type | None:
    """The probes package's config dataclass, or ``None`` when it is not installed."""
    try:
        from probes.config import ProbeConfig
    except ImportError:
        return None
    return ProbeConfig


def _default_probes() -> Any:
    cls = probe_config_class()
    return cls() if cls is not None else None


@dataclass(frozen=True)
class PipelineConfig:
    """Everything a pipeline run depends on: one section per stage (see the module docstring).

    ``probes`` is ``None`` when the probes package is not installed (the stage is skipped).
    """

    model: ModelSettings = field(default_factory=ModelSettings)
    data: DataSettings = field(default_factory=DataSettings)
    run: RunSettings = field(default_factory=RunSettings)
    knowledge: KnowledgeConfig = field(default_factory=_default_knowledge)
    tracing: TraceConfig = field(default_factory=_default_tracing)
    transfer: TransferSettings = field(default_factory=TransferSettings)
    neurons: NeuronConfig = field(default_factory=_default_neurons)
    probes: Any = field(default_factory=_default_probes)
    relate: RelateSettings = field(default_factory=RelateSettings)

    def to_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able values, in the shape :func:`config_from_dict` reads."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "transfer":
                section = {
                    k.name: _plain(getattr(value, k.name))
                    for k in dataclasses.fields(value)
                    if k.name != "method_configs"
                }
                for name, cfg in value.method_configs.items():
                    section[name] = _plain(cfg)
                out[f.name] = section
            elif f.name == "relate":
                out[f.name] = {"unit": value.unit, **_plain(value.stats)}
            else:
                out[f.name] = _plain(value)
        return out

    def seeds(self) -> dict[str, Any]:
        """Every seed of the run, by where it is used."""
        seeds: dict[str, Any] = {
            "run": self.run.seed,
            "tracing": self.tracing.seed,
            "neurons": self.neurons.attribution.seed,
            "transfer_locality": self.transfer.locality_seed,
            "relate": self.relate.stats.seed,
        }
        if self.probes is not None and hasattr(self.probes, "seed"):
            seeds["probes"] = self.probes.seed
        return seeds


def _plain(value: Any) -> Any:
    """Dataclasses, tuples and mappings as plain dicts, lists and scalars."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, float) and math.isnan(value):
        return None
    return value


# -- reading a config -------------------------------------------------------------------------


def _where(source: str | None, path: str) -> str:
    return f"{source}: {path}" if source else path


def _coerce(value: Any, default: Any, hint: Any, where: str) -> Any:
    """``value`` as the type of the field (its default's type, else its annotation)."""
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
        raise ConfigError(f"{where}: expected a list, got {value!r}")
    if kind is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("true", "yes", "on", "1"):
            return True
        if text in ("false", "no", "off", "0"):
            return False
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if kind is int and not (isinstance(default, int) and _is_union_with_str(hint)):
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(number)
    if kind is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        try:
            return float(value)  # YAML reads 5e-1 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if kind is str and isinstance(value, (dict, list)):
        raise ConfigError(f"{where}: expected a single value, got {value!r}")
    return value


def _is_union_with_str(hint: Any) -> bool:
    return str in typing.get_args(hint)


def build_dataclass(
    cls: type, data: Any, *, path: str, source: str | None = None, base: Any = None
) -> Any:
    """Build the frozen dataclass ``cls`` from a mapping: unknown keys are errors naming the
    key path (and the file ``source``), values are coerced to the fields' types, nested
    dataclasses are built recursively, and errors the dataclass raises on construction are
    prefixed with the path.  Fields not given keep ``base``'s values (default: ``cls``'s
    defaults).

    Raises:
        ConfigError: an unknown key, a value of the wrong type or one the dataclass rejects.
    """
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{_where(source, path)}: expected a mapping of settings, got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    unknown = [k for k in data if k not in fields]
    if unknown:
        raise ConfigError(
            f"{_where(source, f'{path}.{unknown[0]}')}: unknown key (known: {', '.join(fields)})"
        )
    base = base if base is not None else cls()
    kwargs: dict[str, Any] = {}
    for name in fields:
        current = getattr(base, name)
        if name not in data:
            kwargs[name] = current
            continue
        value = data[name]
        where = _where(source, f"{path}.{name}")
        if dataclasses.is_dataclass(current) and not isinstance(current, type):
            kwargs[name] = build_dataclass(
                type(current), value, path=f"{path}.{name}", source=source, base=current
            )
        else:
            kwargs[name] = _coerce(value, current, hints.get(name), where)
    try:
        return cls(**kwargs)
    except ConfigError as err:
        raise ConfigError(f"{_where(source, path)}: {err}") from None
    except (TypeError, ValueError) as err:
        raise ConfigError(f"{_where(source, path)}: {err}") from None


def config_from_dict(data: Any, source: str | None = None) -> PipelineConfig:
    """A :class:`PipelineConfig` from a mapping (a parsed YAML file), on top of the defaults.

    Raises:
        ConfigError: naming the key path (and ``source``) of the first problem.
    """
    from mlake_core.editing.base import get_method

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {data!r}")
    defaults = PipelineConfig()
    sections = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = [k for k in data if k not in sections]
    if unknown:
        raise ConfigError(
            f"{_where(source, unknown[0])}: unknown section (known: {', '.join(sorted(sections))})"
        )
    kwargs: dict[str, Any] = {}
    for name in ("model", "data", "run", "knowledge", "tracing", "neurons"):
        current = getattr(defaults, name)
        kwargs[name] = build_dataclass(
            type(current), data.get(name), path=name, source=source, base=current
        )
    # transfer: its own fields plus one section per editing method.
    raw = data.get("transfer") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{_where(source, 'transfer')}: expected a mapping, got {raw!r}")
    own = {f.name for f in dataclasses.fields(TransferSettings)} - {"method_configs"}
    method_configs = dict(defaults.transfer.method_configs)
    plain: dict[str, Any] = {}
    for key, value in raw.items():
        if key in own:
            plain[key] = value
            continue
        try:
            entry = get_method(str(key))
        except ConfigError:
            raise ConfigError(
                f"{_where(source, f'transfer.{key}')}: unknown key (known: "
                f"{', '.join(sorted(own))}, or an editing method's section)"
            ) from None
        base = method_configs.get(entry.name) or entry.config_cls()
        method_configs[entry.name] = build_dataclass(
            entry.config_cls, value, path=f"transfer.{key}", source=source, base=base
        )
    transfer = build_dataclass(
        TransferSettings,
        plain,
        path="transfer",
        source=source,
        # Not a TransferSettings yet: validated once, with the file's own values.
        base=SimpleNamespace(
            **{
                f.name: getattr(defaults.transfer, f.name)
                for f in dataclasses.fields(defaults.transfer)
            }
            | {"method_configs": method_configs}
        ),
    )
    kwargs["transfer"] = transfer
    # relate: unit beside the RelateConfig fields.
    raw = dict(data.get("relate") or {})
    unit = raw.pop("unit", defaults.relate.unit)
    stats = build_dataclass(
        type(defaults.relate.stats),
        raw,
        path="relate",
        source=source,
        base=defaults.relate.stats,
    )
    kwargs["relate"] = RelateSettings(unit=str(unit), stats=stats)
    # probes: only when the probes package is installed.
    probe_cls = probe_config_class()
    if probe_cls is None:
        kwargs["probes"] = None
    else:
        kwargs["probes"] = build_dataclass(
            probe_cls, data.get("probes"), path="probes", source=source, base=defaults.probes
        )
    return PipelineConfig(**kwargs)


def load_config(path: str | os.PathLike[str] | None) -> PipelineConfig:
    """Read a pipeline config from a YAML file (``None``: the defaults).

    Raises:
        ConfigError: the file is missing or not valid YAML, or a key or value is wrong
            (the message names the file and the key path).
    """
    import yaml

    if path is None:
        return PipelineConfig()
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as err:
        raise ConfigError(f"{file}: cannot read the config ({err.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ConfigError(f"{file}: not valid YAML ({err})") from None
    return config_from_dict(data, source=str(file))


def dump_config(config: PipelineConfig) -> str:
    """The config as YAML text (what ``config.yaml`` holds; :func:`load_config` reads it)."""
    import yaml

    return yaml.safe_dump(config.to_dict(), sort_keys=False, allow_unicode=True)


def with_overrides(
    config: PipelineConfig,
    *,
    model: str | None = None,
    facts: int | str | None = None,
    results_dir: str | None = None,
    stages: Sequence[str] | None = None,
) -> PipelineConfig:
    """The config with the command line's options applied (they win over the file)."""
    if model is not None:
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, name=model))
    if facts is not None:
        config = dataclasses.replace(config, data=dataclasses.replace(config.data, facts=facts))
    if results_dir is not None or stages is not None:
        run = config.run
        if results_dir is not None:
            run = dataclasses.replace(run, results_dir=results_dir)
        if stages is not None:
            run = dataclasses.replace(run, stages=tuple(stages))
        config = dataclasses.replace(config, run=run)
    return config


# -- running ----------------------------------------------------------------------------------


class StageSkipped(Exception):
    """A stage that cannot run here (e.g. an optional package missing): noted, not fatal."""


@dataclass
class StageRecord:
    """One stage's entry in ``manifest.json``."""

    status: str  # complete, skipped, failed, interrupted, running
    seconds: float = 0.0  # wall clock
    cpu_seconds: float = 0.0  # this process's CPU time (all threads): the cost on a quiet machine
    runs: dict[str, str] = field(default_factory=dict)  # label -> run folder
    note: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if v not in (None, {})}


def _write_json(path: Path, obj: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n", "utf-8")
    tmp.replace(path)


def read_manifest(out: str | os.PathLike[str]) -> dict[str, Any]:
    """A pipeline run folder's ``manifest.json``.

    Raises:
        DataError: no manifest there (not a pipeline run folder).
    """
    from mlake_core.errors import DataError

    path = Path(out) / "manifest.json"
    if not path.is_file():
        raise DataError(f"{out}: no manifest.json; give a run folder of `mlake pipeline`")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise DataError(f"{path}: malformed JSON ({err})") from None


@dataclass
class PipelineResult:
    """What :func:`run_pipeline` returns: the run folder and each stage's record."""

    out: Path
    stages: dict[str, StageRecord]
    seconds: float

    def summary(self) -> str:
        """The table printed at the end of a run."""
        lines = [f"{'stage':<11}{'status':<10}{'seconds':>9}{'cpu s':>9}  result"]
        for name, rec in self.stages.items():
            where = "; ".join(f"{k}: {v}" for k, v in rec.runs.items()) or (rec.note or "")
            lines.append(
                f"{name:<11}{rec.status:<10}{rec.seconds:>9.1f}{rec.cpu_seconds:>9.1f}  {where}"
            )
        cpu = sum(r.cpu_seconds for r in self.stages.values())
        lines.append(f"{'total':<21}{self.seconds:>9.1f}{cpu:>9.1f}  {self.out}")
        return "\n".join(lines)


def run_pipeline(
    config: PipelineConfig,
    out: str | os.PathLike[str],
    *,
    log: Callable[[str], None] | None = None,
    bars: bool | None = None,
    on_item: Callable[[str, dict[str, Any]], None] | None = None,
    argv: Sequence[str] | None = None,
) -> PipelineResult:
    """Run every stage of ``config.run.stages`` on one model into the run folder ``out``
    (module docstring).  Stages already computed (in the results store) are reloaded.

    Args:
        config: the pipeline config.
        out: the run folder.
        log: receives progress lines (default: none).
        bars: progress bars on stderr (``None``: when stderr is a terminal; otherwise
            progress goes to ``log`` every 10%).
        on_item: called with ``(stage, info)`` after every fact or edit a stage finishes (for
            tests that stop a run mid-stage, and for callers' own progress).
        argv: the command line, recorded in ``provenance.json``.

    Returns:
        The run folder and the stages' records (also in ``manifest.json``).
    """
    import platform

    from mlake_core.provenance import provenance

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda _m: None)
    store = Path(config.run.results_dir) if config.run.results_dir else out / "store"
    (out / "config.yaml").write_text(dump_config(config), encoding="utf-8")
    _write_json(
        out / "provenance.json",
        {
            **provenance(),
            "seeds": config.seeds(),
            "command": list(argv) if argv is not None else None,
            "python": sys.version.split()[0],
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
            "results_dir": str(store),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        },
    )
    manifest_path = out / "manifest.json"
    previous = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    records: dict[str, StageRecord] = {}
    bar = Bars(bars, say)
    state = _State(config=config, out=out, store=store, log=say, bar=bar, on_item=on_item)
    started = time.perf_counter()

    def save_manifest() -> None:
        _write_json(
            manifest_path,
            {
                "out": str(out),
                "results_dir": str(store),
                "resumed": bool(previous),
                "stages": {k: v.to_dict() for k, v in records.items()},
                "seconds": round(time.perf_counter() - started, 1),
            },
        )

    for name in STAGES:
        if name not in config.run.stages:
            continue
        record = StageRecord(status="running")
        records[name] = record
        save_manifest()
        t0, c0 = time.perf_counter(), time.process_time()
        say(f"stage {name}")
        try:
            record.runs = STAGE_FUNCTIONS[name](state) or {}
            record.status = "complete"
        except StageSkipped as why:
            record.status, record.note = "skipped", str(why)
            say(f"stage {name} skipped: {why}")
        except BaseException as err:
            record.status = "failed" if isinstance(err, Exception) else "interrupted"
            record.note = f"{type(err).__name__}: {err}"
            record.seconds = round(time.perf_counter() - t0, 1)
            record.cpu_seconds = round(time.process_time() - c0, 1)
            save_manifest()
            raise
        record.seconds = round(time.perf_counter() - t0, 1)
        record.cpu_seconds = round(time.process_time() - c0, 1)
        save_manifest()
    return PipelineResult(out, records, round(time.perf_counter() - started, 1))


@dataclass
class _State:
    """What the stages pass on to each other."""

    config: PipelineConfig
    out: Path
    store: Path
    log: Callable[[str], None]
    bar: Bars
    on_item: Callable[[str, dict[str, Any]], None] | None
    dataset: Any = None
    pool: list[int] = field(default_factory=list)
    fact_ids: list[int] = field(default_factory=list)
    loaded: Any = None
    knowledge: Any = None
    runs: dict[str, str] = field(default_factory=dict)  # label -> run folder

    def item(self, stage: str, info: dict[str, Any]) -> None:
        if self.on_item:
            self.on_item(stage, info)

    def need(self, *what: str) -> None:
        for name in what:
            if getattr(self, name) is None:
                raise ConfigError(f"this stage needs the {name} stage (add it to run.stages)")


def _stage_data(s: _State) -> dict[str, str]:
    from mlake_core.data.dataset import load_mlake
    from mlake_core.data.stats import dataset_stats

    c = s.config.data
    s.dataset = load_mlake(c.data_dir, version=c.version, langs=c.langs)
    stats = dataset_stats(s.dataset)
    _write_json(s.out / "data_stats.json", stats)
    usable = {
        lang: sum(v.question.usable for v in s.dataset.views(lang)) for lang in s.dataset.langs
    }
    s.log(
        f"data: MLaKE {s.dataset.version}, {len(s.dataset.facts)} facts; question form usable: "
        + ", ".join(f"{k} {v}" for k, v in usable.items())
    )
    if not any(usable.values()):
        raise ConfigError(f"data: no usable question in {', '.join(c.langs)}")
    return {"stats": str(s.out / "data_stats.json")}


def _stage_model(s: _State) -> dict[str, str]:
    import argparse

    from mlake.commands.common import load_model
    from mlake.stages.context import select_fact_ids

    m = s.config.model
    args = argparse.Namespace(
        model=m.name,
        backend=m.backend,
        device=m.device,
        dtype=m.dtype,
        revision=m.revision,
        trust_remote_code=m.trust_remote_code,
        template=m.template,
        data_dir=s.config.data.data_dir,
    )
    s.loaded = load_model(args)
    if s.dataset is not None:
        trained = s.loaded.tiny_metadata["fact_ids"] if s.loaded.tiny_metadata else None
        s.pool = select_fact_ids(s.dataset, "trained" if trained else "all", trained)
        facts = s.config.data.facts
        s.fact_ids = s.pool if facts in ("all", "trained") else s.pool[: int(facts)]
        s.log(f"model: {s.loaded.path}; {len(s.fact_ids)} facts of a pool of {len(s.pool)}")
    return {"model": str(s.loaded.path)}


def _stage_knowledge(s: _State) -> dict[str, str]:
    from analysis.transfer import locality_facts
    from mlake.stages.knowledge import knowledge_stage

    s.need("dataset", "loaded")
    c = s.config
    # The selected facts and the locality sample of the transfer stage (which needs to know
    # which of them the model knew), not the whole pool: on mlake-tiny, 300 facts x 5
    # languages would take most of the default pipeline's time.
    loc_ids = locality_facts(
        s.dataset, s.fact_ids, c.transfer.transfer_config(c.knowledge.max_new_tokens), s.pool
    )
    measured = list(s.fact_ids) + [f for f in loc_ids if f not in set(s.fact_ids)]
    bar = s.bar("knowledge", None, "seq")

    def progress(stage: str, n: int, total: int) -> None:
        # Counts restart with every language's measurement.
        if bar.total != total or n < bar.n:
            bar.reset(total=total)
        bar.update(n - bar.n)

    try:
        s.knowledge, run = knowledge_stage(
            s.loaded.adapter,
            s.loaded.path,
            s.dataset,
            measured,
            c.data.langs,
            s.loaded.template,
            c.knowledge,
            batch_size=c.run.batch_size,
            results_dir=s.store,
            log=s.log,
            # As log lines, the stage's own line per language is enough.
            progress=None if isinstance(bar, LogBar) else progress,
        )
    finally:
        bar.close()
    s.runs["knowledge"] = str(run.path)
    return {"knowledge": str(run.path)}


def _known_total(s: _State) -> int:
    wanted = set(s.fact_ids)
    return sum(len(s.knowledge.known(lang) & wanted) for lang in s.config.data.langs)


def _stage_tracing(s: _State) -> dict[str, str]:
    from mlake.stages.tracing import tracing_stage

    s.need("dataset", "loaded", "knowledge")
    bar = s.bar("tracing", _known_total(s), "fact")

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(info["lang"], refresh=False)
        bar.update(1)
        s.item("tracing", info)

    try:
        _, run = tracing_stage(
            s.loaded.adapter,
            s.loaded.path,
            s.dataset,
            s.fact_ids,
            s.config.data.langs,
            s.loaded.template,
            s.config.tracing,
            knowledge=s.knowledge,
            results_dir=s.store,
            log=s.log,
            on_fact=on_fact,
        )
    finally:
        bar.close()
    s.runs["tracing"] = str(run.path)
    return {"tracing": str(run.path)}


def _resolved_method_config(s: _State, name: str) -> Any:
    """The method's config as ``mlake edit transfer`` resolves it: the settings the model was
    trained for (``transfer.model_settings``) on the fields the config leaves at their
    defaults, then ``layer(s): auto`` from tracing's recommendation for this model, else the
    method's documented default."""
    from mlake.stages.tracing import lookup_recommended_layer
    from mlake_core.editing.base import get_method
    from mlake_core.editing.memit import default_layers
    from mlake_core.models.mlake_tiny import recommended_edit_settings

    cfg = s.config.transfer.method_config(name)
    if s.config.transfer.model_settings:
        model = recommended_edit_settings(s.loaded.path).get(name, {})
        baseline = _default_method_configs().get(name) or get_method(name).config_cls()
        applied = {
            k: v for k, v in model.items() if str(getattr(cfg, k)) == str(getattr(baseline, k))
        }
        kept = {k: str(getattr(cfg, k)) for k in model if k not in applied}
        if applied:
            s.log(
                f"transfer [{name}]: settings this model was trained for: "
                + ", ".join(f"{k}={v}" for k, v in applied.items())
                + (
                    "; the config's own " + ", ".join(f"{k}={v}" for k, v in kept.items())
                    if kept
                    else ""
                )
                + " (transfer.model_settings: false turns them off)"
            )
            cfg = dataclasses.replace(cfg, **applied)
    names = {f.name for f in dataclasses.fields(cfg)}
    wants = [n for n in ("layer", "layers") if n in names and str(getattr(cfg, n)) == "auto"]
    if not wants:
        return cfg
    traced = lookup_recommended_layer(s.loaded.adapter, s.loaded.path, s.store)
    if traced is None or traced.get("layer") is None:
        s.log(f"transfer [{name}]: layer auto: not traced; the documented default")
        return cfg
    layer = int(traced["layer"])
    values = {
        "layer": str(layer),
        "layers": ",".join(str(x) for x in default_layers(s.loaded.adapter, end=layer)),
    }
    s.log(f"transfer [{name}]: layer auto -> {values['layer']} (tracing)")
    return dataclasses.replace(cfg, **{n: values[n] for n in wants})


def _transfer(
    s: _State,
    name: str,
    method_config: Any,
    label: str,
    unit_sets: Any = None,
    unit_source: str | None = None,
) -> str:
    from mlake.stages.transfer import transfer_stage
    from mlake_core.editing.covariance import mlake_corpus, read_corpus

    c = s.config
    corpus = read_corpus(c.transfer.corpus) if c.transfer.corpus else mlake_corpus(s.dataset)
    bar = s.bar(label, len(s.fact_ids) * len(c.data.langs), "edit")

    def on_edit(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['lang']} loss {info['loss']:.3f}", refresh=False)
        bar.update(1)
        s.item("transfer", {"label": label, **info})

    try:
        _, run = transfer_stage(
            s.loaded.adapter,
            s.loaded.path,
            s.dataset,
            s.fact_ids,
            c.data.langs,
            s.loaded.template,
            name,
            method_config,
            c.transfer.transfer_config(c.knowledge.max_new_tokens),
            knowledge=s.knowledge,
            locality_pool=s.pool,
            corpus=corpus,
            seed=c.run.seed,
            batch_size=c.run.batch_size,
            results_dir=s.store,
            log=s.log,
            on_edit=on_edit,
            unit_sets=unit_sets,
            unit_source=unit_source,
            knowledge_run=s.runs.get("knowledge"),
        )
    finally:
        bar.close()
    s.runs[f"transfer:{label}"] = str(run.path)
    return str(run.path)


def _stage_transfer(s: _State) -> dict[str, str]:
    s.need("dataset", "loaded", "knowledge")
    out = {}
    for name in s.config.transfer.methods:
        out[name] = _transfer(s, name, _resolved_method_config(s, name), name)
    return out


def _stage_neurons(s: _State) -> dict[str, str]:
    from mlake.stages.neurons import neurons_stage

    s.need("dataset", "loaded", "knowledge")
    c = s.config
    bar = s.bar("neurons", _known_total(s) * len(c.neurons.fact_methods), "fact")

    def on_fact(info: dict[str, Any]) -> None:
        bar.set_postfix_str(f"{info['method']} {info['lang']}", refresh=False)
        bar.update(1)
        s.item("neurons", info)

    try:
        _, run = neurons_stage(
            s.loaded.adapter,
            s.loaded.path,
            s.dataset,
            s.fact_ids,
            c.data.langs,
            s.loaded.template,
            c.neurons,
            knowledge=s.knowledge,
            batch_size=c.run.batch_size,
            results_dir=s.store,
            log=s.log,
            on_fact=on_fact,
        )
    finally:
        bar.close()
    s.runs["neurons"] = str(run.path)
    return {"neurons": str(run.path)}


def _stage_restricted(s: _State) -> dict[str, str]:
    from mlake.commands.edit import read_unit_sets

    t = s.config.transfer
    if not t.restricted:
        raise StageSkipped("no restricted editing asked for (transfer.restricted is empty)")
    if "neurons" not in s.runs:
        raise StageSkipped("needs the neurons stage")
    if t.units_method not in s.config.neurons.methods:
        raise StageSkipped(f"the neuron stage did not run {t.units_method} (transfer.units_method)")
    unit_sets = read_unit_sets(s.runs["neurons"], t.units_method, seed=s.config.run.seed)
    source = f"{s.runs['neurons']} ({t.units_method})"
    base = _resolved_method_config(s, "ft")
    out = {}
    for units in t.restricted:
        label = f"ft[{units}]"
        cfg = dataclasses.replace(base, units=units)
        out[label] = _transfer(s, "ft", cfg, label, unit_sets, source)
    return out


def _stage_probes(s: _State) -> dict[str, str]:
    s.need("dataset", "loaded", "knowledge")
    if s.config.probes is None:
        raise StageSkipped("the probes package is not installed")
    try:
        from mlake.stages.probes import probe_stage
    except ImportError as err:
        raise StageSkipped(f"the probes package cannot be imported ({err})") from None
    c = s.config
    n_views = len(s.fact_ids) * len(c.data.langs)
    bar = s.bar("probes", n_views, "prompt")

    def progress(n: int) -> None:
        bar.update(n)
        s.item("probes", {"prompts": n})

    try:
        _, run = probe_stage(
            s.loaded.adapter,
            s.loaded.path,
            s.dataset,
            s.fact_ids,
            c.data.langs,
            s.loaded.template,
            c.probes,
            knowledge=s.knowledge,
            batch_size=c.run.batch_size,
            results_dir=s.store,
            log=s.log,
            progress=progress,
        )
    finally:
        bar.close()
    s.runs["probes"] = str(run.path)
    return {"probes": str(run.path)}


def _stage_relate(s: _State) -> dict[str, str]:
    from mlake.stages.relate import relate_stage

    s.need("dataset")
    if "neurons" not in s.runs:
        raise StageSkipped("needs the neurons stage")
    mains = [k.split(":", 1)[1] for k in s.runs if k.startswith("transfer:") and "[" not in k]
    if not mains:
        raise StageSkipped("needs the transfer stage")
    restricted = [v for k, v in s.runs.items() if k.startswith("transfer:ft[")]
    out = {}
    for label in mains:
        _, run = relate_stage(
            s.runs[f"transfer:{label}"],
            s.dataset,
            s.config.relate.stats,
            knowledge_dir=s.runs.get("knowledge"),
            neurons_dir=s.runs["neurons"],
            tracing_dir=s.runs.get("tracing"),
            probes_dir=s.runs.get("probes"),
            restricted=restricted if label == "ft" else [],
            unit=s.config.relate.unit,
            results_dir=s.store,
            log=s.log,
        )
        out[label] = str(run.path)
        s.item("relate", {"method": label})
    return out


def _stage_figures(s: _State) -> dict[str, str]:
    from mlake.report_figures import write_figures

    written = write_figures(s.out, log=s.log)
    return {"figures": f"{len(written)} files in {s.out / 'figures'}"}


def _stage_report(s: _State) -> dict[str, str]:
    from mlake.report import write_report

    path = write_report(s.out)
    return {"report": str(path)}


STAGE_FUNCTIONS: dict[str, Callable[[_State], dict[str, str] | None]] = {
    "data": _stage_data,
    "model": _stage_model,
    "knowledge": _stage_knowledge,
    "tracing": _stage_tracing,
    "transfer": _stage_transfer,
    "neurons": _stage_neurons,
    "restricted": _stage_restricted,
    "probes": _stage_probes,
    "relate": _stage_relate,
    "figures": _stage_figures,
    "report": _stage_report,
}

#: Settings of :func:`notebook_run`: small enough for a few facts and seconds per stage.
NOTEBOOK_SETTINGS: dict[str, Any] = {
    "tracing": {"n_samples": 3},
    "transfer": {"n_locality": 4, "ike": {"n_demonstrations": 2}},
    "neurons": {
        "attribution": {"steps": 5, "samples": 2},
        "text_tokens": 2000,
        "ablation_facts": 5,
        "min_facts": 1,
        "n_random": 1,
    },
    "probes": {"folds": 2, "inner_folds": 2, "min_class_facts": 2, "max_iter": 100},
    "relate": {"n_boot": 50, "n_perm": 20, "folds": 2},
}


def notebook_run(
    stages: Sequence[str],
    *,
    facts: int | None = None,
    model: str | None = None,
    out: str | os.PathLike[str] | None = None,
    log: Callable[[str], None] | None = None,
) -> PipelineResult:
    """The pipeline's ``stages`` (after ``data``, ``model`` and ``knowledge``) on a small
    subset, for the notebooks: ``facts`` (default ``$MLAKE_NB_FACTS``, else 10) of ``model``
    (default ``$MLAKE_NB_MODEL``, else mlake-tiny) into ``out`` (default ``$MLAKE_NB_OUT``,
    else ``runs/notebooks`` of the project the working directory is in), with
    :data:`NOTEBOOK_SETTINGS`.  The notebooks share one run folder and store, so each reuses
    what the others computed.
    """
    data = json.loads(json.dumps(NOTEBOOK_SETTINGS))
    n = facts or int(os.environ.get("MLAKE_NB_FACTS", "10"))
    data["data"] = {"facts": n}
    data["model"] = {"name": model or os.environ.get("MLAKE_NB_MODEL", "mlake-tiny")}
    wanted = ["data", "model", "knowledge", *stages]
    data["run"] = {"stages": [s for s in STAGES if s in wanted]}
    config = config_from_dict(data, source="notebook settings")
    folder = out or os.environ.get("MLAKE_NB_OUT") or _project_root() / "runs" / "notebooks"
    return run_pipeline(config, folder, log=log, bars=False)


def _project_root() -> Path:
    """The nearest folder at or above the working directory with a ``pyproject.toml`` (a
    notebook's kernel starts in ``notebooks/``), else the working directory."""
    here = Path.cwd()
    for folder in (here, *here.parents):
        if (folder / "pyproject.toml").is_file():
            return folder
    return here


__all__ = [
    "STAGES",
    "MlakeError",
    "PipelineConfig",
    "PipelineResult",
    "build_dataclass",
    "config_from_dict",
    "dump_config",
    "load_config",
    "notebook_run",
    "read_manifest",
    "run_pipeline",
]
