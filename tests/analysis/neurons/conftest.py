"""Fixtures of the neuron-attribution tests: the tiny random models of every architecture
(shared with the model tests) and attribution prompts of the micro mlake-tiny, which knows its
facts, so answer probabilities are large enough for hand computations to mean something."""

from __future__ import annotations

from pathlib import Path

import pytest

from analysis.neurons.attribution import AttributionPrompt
from mlake_core.errors import MlakeError
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from tests.analysis.neurons.helpers import attribution_prompt

# The tiny checkpoints of every architecture and their session-cached adapters / HF models.
from tests.mlake_core.models.conftest import get_adapter, get_hf, tiny_models  # noqa: F401


@pytest.fixture(scope="session")
def micro_adapters(micro_tiny: Path):
    """The micro mlake-tiny (2 layers, Llama-style) under both backends."""
    return {
        backend: load_adapter(str(micro_tiny), backend, device="cpu")
        for backend in ("tlens", "nnsight")
    }


@pytest.fixture(scope="session")
def micro_prompts(micro_adapters, micro_tiny: Path, mlake_v2411):
    """Every usable (fact, lang, form) prompt of the micro model's facts in en and zh, keyed by
    ``(fact_id, lang, form)``."""
    meta = read_metadata(micro_tiny)
    assert meta is not None
    adapter = micro_adapters["tlens"]
    out = {}
    for fact_id in meta["fact_ids"]:
        for lang in ("en", "zh"):
            view = mlake_v2411.fact(fact_id).views[lang]
            for form in ("question", "cloze"):
                try:
                    out[fact_id, lang, form] = attribution_prompt(adapter, view, form)
                except MlakeError:
                    continue
    return out


@pytest.fixture(scope="session")
def short_prompt(micro_prompts) -> AttributionPrompt:
    """The shortest prompt with a multi-token answer (cheap integrated gradients)."""
    candidates = [p for p in micro_prompts.values() if len(p.answer_ids) >= 2]
    return min(candidates, key=lambda p: (len(p.prompt_ids) + len(p.answer_ids), p.where))
