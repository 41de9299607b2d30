"""The run-level settings every command and the pipeline share: which model, which data, how
the run goes.

Each is a frozen dataclass whose defaults are the only copy: the command-line options are
derived from these fields (:mod:`mlake.commands.common`) and the pipeline's YAML sections are
built from them (:mod:`mlake.pipeline.config`), both through the one coercion of
:mod:`mlake_core.configs`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mlake_core.data.paths import DEFAULT_VERSION
from mlake_core.errors import ConfigError
from mlake_core.models.mlake_tiny import TINY_NAME


@dataclass(frozen=True)
class ModelSettings:
    """Which model, and how it is loaded.

    Attributes:
        name: ``mlake-tiny`` (trained first when not cached) or another of its variants
            (``mlake-tiny-editable``), a local checkpoint folder or a Hugging Face hub id.
        backend: ``tlens`` (TransformerLens) or ``nnsight``.
        device: ``auto`` (CUDA when present; a model whose weights take more than 80 percent of
            the first GPU's free memory is spread over all GPUs with accelerate's
            ``device_map="auto"``), ``cpu``, ``cuda:N``.
        dtype: ``float32``, ``bfloat16`` or ``float16``.
        revision: hub branch, tag or commit.
        trust_remote_code: allow modelling code shipped with a checkpoint.
        template: prompt template: qa (Q:/A: frame), bare, fewshot (qa after 3 worked examples
            in the prompt's language, facts outside the evaluated ones drawn with seed 0, the
            same for every prompt of the run; fewshot-K-seedS in a pipeline file: K examples,
            seed S); none given: the one a mlake-tiny was trained with, fewshot for every
            other model.
        edit_apply: how every stage that evaluates an edited model applies a weight edit
            (ROME, MEMIT, FT): weights (added to the parameters, restored bitwise after) or
            intervention (added at the edited projection's output in every pass, no weight
            written: what a read-only backend such as nnsight's remote execution needs; the
            same outputs up to rounding).
        remote: run every forward pass on NDIF (nnsight's ``remote=True``; nnsight backend,
            a hub id NDIF hosts, network and an NDIF API key in ``NDIF_API_KEY``): the weights
            are still loaded here (the logit lens, read-outs and editing methods use them);
            passes that need gradients (attribution patching, integrated gradients, computing
            an edit) are refused, and edits must be applied as interventions.  Not exercised
            in mlake's tests (no network); nnsight's local dry run of it is.
    """

    name: str = TINY_NAME
    backend: str = "tlens"
    device: str = "auto"
    dtype: str = "float32"
    revision: str | None = None
    trust_remote_code: bool = False
    template: str | None = None
    edit_apply: str = "weights"
    remote: bool = False

    def __post_init__(self) -> None:
        from mlake_core.editing.intervention import check_edit_apply
        from mlake_core.models.loading import BACKENDS, DTYPES
        from mlake_core.models.prompting import TEMPLATES, get_template

        check_edit_apply(self.edit_apply, "edit_apply")
        if self.remote and self.backend != "nnsight":
            raise ConfigError("remote: runs on NDIF through nnsight; add --backend nnsight")
        if self.remote and self.edit_apply != "intervention":
            raise ConfigError(
                "remote: a weight written here is not the NDIF copy's weight, so an edit "
                "would not be seen; add --edit-apply intervention"
            )

        if self.backend not in BACKENDS:
            raise ConfigError(f"backend {self.backend!r}: choose {', '.join(BACKENDS)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype {self.dtype!r}: choose {', '.join(DTYPES)}")
        if self.template is not None:
            try:
                get_template(self.template)
            except ConfigError:
                raise ConfigError(
                    f"template {self.template!r}: choose {', '.join(TEMPLATES)}, "
                    "fewshot-K or fewshot-K-seedS"
                ) from None


@dataclass(frozen=True)
class DataSettings:
    """Which data.

    Attributes:
        langs: languages (comma-separated codes), or all: every language of the data
            folder (MLaKE's five, en,zh,ja,fr,de, in the published releases; a folder in
            MLaKE's format may hold others, see :mod:`mlake_core.data.paths`).
        facts: the first N facts of the default selection (mlake-tiny's training facts, else
            all facts), ``trained`` (the training facts), ``all`` (every fact), or ``None``
            (the whole default selection); see :mod:`mlake_core.data.selection`.
        version: MLaKE release (v2024-11, or v2024-04 with the multiple-choice files).
        data_dir: MLaKE data directory (default: ``$MLAKE_DATA``, then ``../shared/mlake``);
            for another dataset, the folder holding its files (required).
        dataset: mlake, or another multilingual editing dataset: mzsre, bmike53-zsre,
            bmike53-counterfact, bmike53-wfd (README, Other datasets); its name enters run
            keys as the data version.
    """

    langs: tuple[str, ...] = ("all",)
    #: Field defaults resolved on construction against the other fields (langs all: the
    #: data folder's languages), given again wherever settings are built on a base.
    UNRESOLVED_DEFAULTS: ClassVar[dict[str, Any]] = {"langs": ("all",)}
    facts: int | str | None = None
    version: str = DEFAULT_VERSION
    data_dir: str | None = None
    dataset: str = "mlake"

    def __post_init__(self) -> None:
        from mlake_core.data.paths import folder_languages, get_release
        from mlake_core.data.selection import parse_facts
        from mlake_core.data.sources import get_source
        from mlake_core.languages import LANGUAGES, parse_codes, parse_langs

        get_release(self.version)  # an unknown version: one error listing the known ones
        codes = parse_codes(self.langs)  # malformed codes fail before the data is looked for
        source = get_source(self.dataset)  # an unknown name: one error listing the known ones
        # The languages the data folder holds (a missing folder: loading it reports that);
        # another dataset's are its own (mlake_core.data.sources).
        present = source.languages or folder_languages(self.data_dir, self.version)
        if present is not None:
            langs = parse_langs(codes, present)
        else:
            langs = codes if codes is not None else LANGUAGES
        object.__setattr__(self, "langs", langs)
        object.__setattr__(self, "facts", parse_facts(self.facts, option="facts"))


@dataclass(frozen=True)
class RunSettings:
    """How a run goes (nothing here changes a result but ``seed``).

    Attributes:
        seed: seed of the editing methods and of restricted editing's random unit set (the
            analyses' own seeds are in their configs).
        batch_size: sequences per forward pass.
        results_dir: the results store (default: ``$MLAKE_RESULTS``, else ``./runs``; the
            pipeline's default is ``<out>/store``).
        executor: where the per-fact stages run: local (this process, in order) or ray
            (shards on the workers of a Ray cluster, one model each, into the one results
            store, which must be a path every worker reaches).
        address: the Ray cluster to join, e.g. auto or HOST:6379 (ray executor; none given:
            $RAY_ADDRESS, else a new cluster on this machine).
        gpus_per_worker: GPUs each Ray worker holds (0: CPU workers).
        workers: Ray workers to start (none given: the cluster's GPUs over gpus_per_worker,
            or its CPUs for CPU workers).
        shard_facts: facts per shard (ray executor); every shard is saved piece by piece.
    """

    seed: int = 0
    batch_size: int = 32
    results_dir: str | None = None
    executor: str = "local"
    address: str | None = None
    gpus_per_worker: float = 1.0
    workers: int | None = None
    shard_facts: int = 32

    def __post_init__(self) -> None:
        if isinstance(self.batch_size, bool) or self.batch_size < 1:
            raise ConfigError(f"batch_size {self.batch_size}: must be at least 1")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"executor {self.executor!r}: choose {', '.join(EXECUTORS)}")
        if self.gpus_per_worker < 0:
            raise ConfigError(f"gpus_per_worker {self.gpus_per_worker}: must be at least 0")
        if self.workers is not None and self.workers < 1:
            raise ConfigError(f"workers {self.workers}: must be at least 1")
        if self.shard_facts < 1:
            raise ConfigError(f"shard_facts {self.shard_facts}: must be at least 1")


#: The executors of :attr:`RunSettings.executor` (:mod:`mlake.executors`).
EXECUTORS: tuple[str, ...] = ("local", "ray")
