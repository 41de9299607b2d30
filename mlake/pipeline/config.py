"""The pipeline's config: one frozen dataclass section per stage, read from YAML.

:class:`PipelineConfig` is a tree of frozen dataclasses, one section per stage, reusing each
stage's own config dataclass.  :func:`load_config` reads it from YAML through the one coercion
of :mod:`mlake_core.configs` (unknown keys are errors naming the key path and the file).  The
defaults are documented in ``mlake/pipeline/pipeline_default.yaml``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from analysis.lens import LensConfig
from analysis.neurons.attribution import AttributionConfig
from analysis.neurons.config import NeuronConfig
from analysis.patching import PatchConfig
from analysis.tracing.causal import TraceConfig
from mlake.settings import DataSettings, ModelSettings, RunSettings
from mlake_core.configs import build_dataclass, to_plain, where
from mlake_core.errors import ConfigError
from mlake_core.metrics.knowledge import KnowledgeConfig

#: Stages in the order they run.
STAGES: tuple[str, ...] = (
    "data",
    "model",
    "knowledge",
    "tracing",
    "lens",
    "patching",
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
class PipelineData(DataSettings):
    """Which data (:class:`~mlake.settings.DataSettings`); the pipeline's default is the first
    12 facts, which run every stage on mlake-tiny within 15 minutes on two CPU cores."""

    facts: int | str | None = 12


@dataclass(frozen=True)
class PipelineRun(RunSettings):
    """How the pipeline runs (:class:`~mlake.settings.RunSettings`, with the results store
    defaulting to ``<out>/store``) and which stages.

    Attributes:
        stages: the stages to run (default: all, :data:`STAGES`).
    """

    stages: tuple[str, ...] = STAGES

    def __post_init__(self) -> None:
        super().__post_init__()
        stages = self.stages
        if isinstance(stages, str):
            stages = tuple(s.strip() for s in stages.split(",") if s.strip())
        object.__setattr__(self, "stages", tuple(stages))
        bad = [s for s in self.stages if s not in STAGES]
        if bad:
            raise ConfigError(f"stages: unknown {', '.join(bad)}; choose from {', '.join(STAGES)}")


def _default_method_configs() -> dict[str, Any]:
    """The pipeline's own method settings: IKE's demonstrations are the locality facts, so no
    more than ``n_locality``.  (A model's own edit settings, such as mlake-tiny's FT
    settings, come from the model: ``model_settings``.)"""
    from mlake_core.editing import get_method

    return {"ike": get_method("ike").config_cls(n_demonstrations=3)}


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
        stop_when_decided: stop each greedy answer of the evaluation once its verdict is
            decided (:class:`~analysis.transfer.TransferConfig`): the same results, shorter
            stored texts, faster.
        model_settings: apply the edit settings a model brings
            (:func:`~mlake_core.models.mlake_tiny.recommended_edit_settings`: mlake-tiny's FT
            settings, mlake-tiny-editable's layers and δ settings) to the method fields this
            config leaves at the dataclass's defaults, as ``mlake edit transfer`` does
            (:func:`mlake.method_settings.resolve_method`); a field set to another value keeps
            it, one set to the default value itself counts as left at it (the config as
            dumped and reloaded resolves the same way).  What was applied is logged.
        protocol: ``free-form`` or ``mlake`` (also multiple choice after every edit in every
            test language, both ways; needs data version v2024-04), as
            ``mlake edit transfer --protocol`` (:class:`~analysis.transfer.TransferConfig`).
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
    stop_when_decided: bool = False
    protocol: str = "free-form"

    def __post_init__(self) -> None:
        from mlake_core.editing import get_method
        from mlake_core.editing.ft import UNIT_CHOICES

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
        self.transfer_config(24)  # validates edit_form, n_locality and protocol
        if "ike" in self.methods:
            wanted = self.method_config("ike").n_demonstrations
            if wanted > self.n_locality:
                raise ConfigError(
                    f"ike.n_demonstrations {wanted}: IKE's demonstrations are the locality facts, "
                    f"so at most n_locality ({self.n_locality})"
                )

    def method_config(self, name: str) -> Any:
        """The config of method ``name`` (its section, else its dataclass's defaults)."""
        from mlake_core.editing import get_method

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
            stop_when_decided=self.stop_when_decided,
            protocol=self.protocol,
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


def _default_patching() -> PatchConfig:
    """FT edits for the edit-carried measurement: ROME and MEMIT cannot edit the default
    mlake-tiny (0% efficacy); a model's own FT settings apply (``transfer.model_settings``)."""
    return PatchConfig(method="ft", edits=3)


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
    data: PipelineData = field(default_factory=PipelineData)
    run: PipelineRun = field(default_factory=PipelineRun)
    knowledge: KnowledgeConfig = field(default_factory=_default_knowledge)
    tracing: TraceConfig = field(default_factory=_default_tracing)
    lens: LensConfig = field(default_factory=LensConfig)
    patching: PatchConfig = field(default_factory=_default_patching)
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
                    k.name: to_plain(getattr(value, k.name))
                    for k in dataclasses.fields(value)
                    if k.name != "method_configs"
                }
                for name, cfg in value.method_configs.items():
                    section[name] = to_plain(cfg)
                out[f.name] = section
            elif f.name == "relate":
                out[f.name] = {"unit": value.unit, **to_plain(value.stats)}
            else:
                out[f.name] = to_plain(value)
        return out

    def seeds(self) -> dict[str, Any]:
        """Every seed of the run, by where it is used."""
        seeds: dict[str, Any] = {
            "run": self.run.seed,
            "tracing": self.tracing.seed,
            "patching": self.patching.seed,
            "neurons": self.neurons.attribution.seed,
            "transfer_locality": self.transfer.locality_seed,
            "relate": self.relate.stats.seed,
        }
        if self.probes is not None and hasattr(self.probes, "seed"):
            seeds["probes"] = self.probes.seed
        return seeds


def config_from_dict(data: Any, source: str | None = None) -> PipelineConfig:
    """A :class:`PipelineConfig` from a mapping (a parsed YAML file), on top of the defaults.

    Raises:
        ConfigError: naming the key path (and ``source``) of the first problem.
    """
    from mlake_core.editing import get_method

    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source or 'config'}: expected a mapping of sections, got {data!r}")
    defaults = PipelineConfig()
    sections = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = [k for k in data if k not in sections]
    if unknown:
        raise ConfigError(
            f"{where(source, unknown[0])}: unknown section (known: {', '.join(sorted(sections))})"
        )
    kwargs: dict[str, Any] = {}
    for name in ("model", "data", "run", "knowledge", "tracing", "lens", "patching", "neurons"):
        current = getattr(defaults, name)
        kwargs[name] = build_dataclass(
            type(current), data.get(name), path=name, source=source, base=current
        )
    # transfer: its own fields plus one section per editing method.
    raw = data.get("transfer") or {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where(source, 'transfer')}: expected a mapping, got {raw!r}")
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
                f"{where(source, f'transfer.{key}')}: unknown key (known: "
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
