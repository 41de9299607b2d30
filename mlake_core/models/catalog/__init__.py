"""Real model shapes, without weights: the Hugging Face configs of the multilingual models
researchers edit and trace, stored as small JSON files beside this module.

Each :class:`CatalogEntry` names one checkpoint (its hub id), the file holding its
``config.json`` (for the multimodal Gemma 3 4B/12B/27B checkpoints: their ``text_config``, with
the ``Gemma3TextConfig`` defaults those checkpoints rely on written out), the published
parameter count, and where the config's values were confirmed in this repository's session
(no hub access here: values were read from public repositories that vendor these configs, and
every row's parameter count, computed from a model built on the ``meta`` device, is checked
against the published count by the tests).

How each row is checked (:attr:`CatalogEntry.checks`):

* ``meta``: the model is built on the ``meta`` device (no memory, no weights) and every site of
  the architecture's site table resolves with the shape the config implies (d_model, d_mlp,
  heads x head width for ``attn_z``, vocabulary, key/value heads, tied embeddings, rope
  scaling, layer types): ``tests/mlake_core/models/test_catalog.py``.
* ``real-width``: rows up to :data:`REAL_WIDTH_MAX_PARAMS` also get random weights on CPU at
  their real widths, *depth truncated to 2 layers* in the tests (to stay fast), and run one
  tracing pass, one ROME edit and one integrated-gradients attribution
  (``tests/mlake_core/models/test_catalog_real_width.py``); ``benchmarks/gpu_check.py
  --shape NAME`` runs the same at full depth.
* ``not supported``: the architecture has no site table (:data:`CatalogEntry.unsupported`
  says why); the tests check that mlake refuses it.

``mlake models list`` prints the table; ``mlake models plan NAME`` plans memory and batch sizes
from it (:mod:`mlake_core.models.planner`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

from mlake_core.errors import ConfigError

#: Rows with at most this many parameters are also run with random weights at real width.
REAL_WIDTH_MAX_PARAMS = 1.6e9


@dataclass(frozen=True)
class CatalogEntry:
    """One model of the catalog.

    Attributes:
        name: short name (``qwen2.5-7b``); also the JSON file's stem.
        hub_id: the Hugging Face repository whose ``config.json`` this is.
        family: model family, for the table.
        published_params: parameter count the model's card or paper gives (text model only),
            checked against the count of the model built from the config.
        confirmed: where the config's values were confirmed (public repositories that vendor
            the config; the parameter-count check applies to every row).
        unsupported: why mlake cannot run this architecture, or ``None``.
        note: anything else a user should know (e.g. a multimodal checkpoint).
    """

    name: str
    hub_id: str
    family: str
    published_params: float
    confirmed: str
    unsupported: str | None = None
    note: str = ""

    def config_dict(self) -> dict[str, Any]:
        """The stored ``config.json`` (a fresh copy)."""
        text = resources.files(__name__).joinpath(f"{self.name}.json").read_text("utf-8")
        data: dict[str, Any] = json.loads(text)
        return data

    def hf_config(self, **overrides: Any) -> Any:
        """The ``transformers`` config built from the stored JSON (``overrides`` replace keys,
        e.g. ``num_hidden_layers=2`` for a depth-truncated model)."""
        from transformers import AutoConfig

        data = {**self.config_dict(), **overrides}
        model_type = data.pop("model_type")
        return AutoConfig.for_model(model_type, **data)

    @property
    def model_type(self) -> str:
        """``config.model_type``."""
        return str(self.config_dict()["model_type"])

    @property
    def checks(self) -> str:
        """How the row is checked: ``meta``, ``meta + real-width`` or ``not supported``."""
        if self.unsupported:
            return "not supported"
        if self.published_params <= REAL_WIDTH_MAX_PARAMS:
            return "meta + real-width"
        return "meta"


_GEMMA3_TEXT = (
    "text_config of the multimodal checkpoint (model_type gemma3) with the "
    "Gemma3TextConfig defaults of transformers 4.50 it relies on written out"
)
_MULTIMODAL = (
    "the hub checkpoint is multimodal (Gemma3ForConditionalGeneration, model_type gemma3), "
    "which mlake's loader refuses; its text model has this shape"
)

#: The catalog, in table order.
CATALOG: tuple[CatalogEntry, ...] = (
    CatalogEntry(
        "qwen2.5-0.5b",
        "Qwen/Qwen2.5-0.5B",
        "Qwen2.5",
        0.49e9,
        "rwth-i6/i6_experiments qwen2_configs.py (Qwen2-0.5B, same shape); parameter count",
    ),
    CatalogEntry(
        "qwen2.5-1.5b",
        "Qwen/Qwen2.5-1.5B",
        "Qwen2.5",
        1.54e9,
        "shape fields in several vendored Qwen2-1.5B/Qwen2.5-1.5B profiles (hidden 1536, "
        "intermediate 8960, 28 layers, 12 heads, 2 kv heads, vocab 151936, tied); "
        "parameter count",
    ),
    CatalogEntry(
        "qwen2.5-7b",
        "Qwen/Qwen2.5-7B",
        "Qwen2.5",
        7.61e9,
        "verl-style flops test (config of Qwen/Qwen2.5-7B-Instruct) and a Go test quoting "
        "Qwen2.5-7B's config.json; parameter count",
    ),
    CatalogEntry(
        "qwen2.5-72b",
        "Qwen/Qwen2.5-72B",
        "Qwen2.5",
        72.7e9,
        "full config.json of Qwen2.5-72B-Instruct in a public model report (same shape); "
        "parameter count",
    ),
    CatalogEntry(
        "llama-3.1-8b",
        "meta-llama/Llama-3.1-8B",
        "Llama 3",
        8.03e9,
        "citsjtu2020/LLM-Prof sglang/Model_Config.md (full config.json, llama3 rope scaling); "
        "parameter count",
    ),
    CatalogEntry(
        "llama-3.1-70b",
        "meta-llama/Llama-3.1-70B",
        "Llama 3",
        70.6e9,
        "vulkomilev/oumi configs/recipes/llama3_1/README.md (shape table); parameter count",
    ),
    CatalogEntry(
        "llama-3.2-1b",
        "meta-llama/Llama-3.2-1B",
        "Llama 3",
        1.24e9,
        "a vendored llama_3_2_1b config dict (head_dim 64, tied, rope factor 32); parameter count",
    ),
    CatalogEntry(
        "bloom-560m",
        "bigscience/bloom-560m",
        "BLOOM",
        0.559e9,
        "config constraints of bigscience/bloomz-560m (same shape) in a public repository; "
        "parameter count",
    ),
    CatalogEntry(
        "bloom-7b1",
        "bigscience/bloom-7b1",
        "BLOOM",
        7.07e9,
        "parameter count only (hidden 4096, 30 layers, 32 heads; not confirmed against a "
        "vendored copy in this session)",
    ),
    CatalogEntry(
        "mgpt",
        "ai-forever/mGPT",
        "mGPT",
        1.42e9,
        "parameter count only (GPT-2 architecture, 24 layers, d_model 2048, vocab 100000; not "
        "confirmed against a vendored copy in this session)",
    ),
    CatalogEntry(
        "gemma-2-2b",
        "google/gemma-2-2b",
        "Gemma 2",
        2.61e9,
        "full config.json of google/gemma-2-2b(-it) vendored in two public repositories; "
        "parameter count",
    ),
    CatalogEntry(
        "gemma-2-9b",
        "google/gemma-2-9b",
        "Gemma 2",
        9.24e9,
        "parameter count only (not confirmed against a vendored copy in this session)",
    ),
    CatalogEntry(
        "gemma-3-270m",
        "google/gemma-3-270m",
        "Gemma 3",
        0.268e9,
        "the packaged gemma-3-270m's converted config (same shape and layer types); "
        "parameter count",
    ),
    CatalogEntry(
        "gemma-3-1b",
        "google/gemma-3-1b-pt",
        "Gemma 3",
        1.0e9,
        "parameter count only (hidden 1152, 26 layers, 4 heads, 1 kv head, head_dim 256; not "
        "confirmed against a vendored copy in this session)",
    ),
    CatalogEntry(
        "gemma-3-4b",
        "google/gemma-3-4b-pt",
        "Gemma 3",
        3.88e9,
        f"{_GEMMA3_TEXT}; hidden 2560 / 34 layers in a vendored table; parameter count",
        note=_MULTIMODAL,
    ),
    CatalogEntry(
        "gemma-3-12b",
        "google/gemma-3-12b-pt",
        "Gemma 3",
        11.77e9,
        f"{_GEMMA3_TEXT}; hidden 3840 / 48 layers in a vendored table; parameter count",
        note=_MULTIMODAL,
    ),
    CatalogEntry(
        "gemma-3-27b",
        "google/gemma-3-27b-pt",
        "Gemma 3",
        27.0e9,
        f"{_GEMMA3_TEXT}; hidden 5376 / 62 layers in a vendored table; parameter count",
        note=_MULTIMODAL,
    ),
    CatalogEntry(
        "aya-23-8b",
        "CohereForAI/aya-23-8B",
        "Aya 23",
        8.03e9,
        "parameter count only (not confirmed against a vendored copy in this session)",
    ),
)

_BY_NAME = {e.name: e for e in CATALOG}
_BY_HUB = {e.hub_id.lower(): e for e in CATALOG}


def find_entry(model: str) -> CatalogEntry | None:
    """The catalog row a name or hub id (case-insensitive) names, else ``None``."""
    return _BY_NAME.get(model.lower()) or _BY_HUB.get(model.lower())


def get_entry(model: str) -> CatalogEntry:
    """The catalog row a name or hub id names.

    Raises:
        ConfigError: naming the catalog's rows.
    """
    entry = find_entry(model)
    if entry is None:
        raise ConfigError(
            f"{model!r} is not in the model catalog; catalog names: "
            f"{', '.join(e.name for e in CATALOG)}"
        )
    return entry


def meta_model(config: Any) -> Any:
    """A ``*ForCausalLM`` built from ``config`` on the ``meta`` device: every module and
    parameter shape, no memory and no weights (eager attention, as mlake loads models)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, attn_implementation="eager")
