"""Model adapters: one interface over Hugging Face causal LMs, two hooking backends.

* :mod:`~mlake_core.models.sites` -- canonical site names and one table per architecture.
* :mod:`~mlake_core.models.adapter` -- the :class:`ModelAdapter` protocol, :class:`TokenBatch`,
  :class:`Patch`, :class:`PastKeyValues`, :class:`BosPolicy`, :class:`ModelInfo`.
* :mod:`~mlake_core.models.loading` -- :func:`load_adapter`.
* :mod:`~mlake_core.models.tlens_backend` / :mod:`~mlake_core.models.nnsight_backend` -- the
  only modules that import TransformerLens / nnsight (imported lazily by :func:`load_adapter`).
* :mod:`~mlake_core.models.tiny` -- tiny random-init checkpoints for tests, built offline.
"""

from mlake_core.models.adapter import (
    BaseAdapter,
    BosPolicy,
    Metric,
    ModelAdapter,
    ModelInfo,
    PastKeyValues,
    Patch,
    TokenBatch,
    UnitPatch,
    apply_patches,
)
from mlake_core.models.loading import BACKENDS, DTYPES, load_adapter
from mlake_core.models.sites import (
    ARCHITECTURES,
    SITE_DESCRIPTIONS,
    SITE_KINDS,
    ArchitectureSpec,
    ModuleSite,
    Site,
    all_sites,
    execution_order,
    get_spec,
    parse_site,
)

__all__ = [
    "ARCHITECTURES",
    "BACKENDS",
    "DTYPES",
    "SITE_DESCRIPTIONS",
    "SITE_KINDS",
    "ArchitectureSpec",
    "BaseAdapter",
    "BosPolicy",
    "Metric",
    "ModelAdapter",
    "ModelInfo",
    "ModuleSite",
    "PastKeyValues",
    "Patch",
    "Site",
    "TokenBatch",
    "UnitPatch",
    "all_sites",
    "apply_patches",
    "execution_order",
    "get_spec",
    "load_adapter",
    "parse_site",
]
