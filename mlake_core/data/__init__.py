"""The MLaKE data layer: files -> validated records -> :class:`Fact` with per-language views."""

from mlake_core.data.dataset import (
    Fact,
    FactView,
    MlakeDataset,
    PromptForm,
    Span,
    Target,
    load_mlake,
)
from mlake_core.data.multihop import MultiHopQuestion
from mlake_core.data.paths import DEFAULT_VERSION, RELEASES, resolve_data_dir

__all__ = [
    "DEFAULT_VERSION",
    "RELEASES",
    "Fact",
    "FactView",
    "MlakeDataset",
    "MultiHopQuestion",
    "PromptForm",
    "Span",
    "Target",
    "load_mlake",
    "resolve_data_dir",
]
