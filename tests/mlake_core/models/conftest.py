"""Fixtures for the model adapter tests: tiny checkpoints, adapters and plain HF references.

The tiny models (2 layers, d_model 32, vocab 512) are built once per session into a temporary
folder.  Adapters and plain Hugging Face models are cached per session too; tests must not
modify them (patches and hooks are temporary by design, which some tests check).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from transformers import AutoModelForCausalLM

from mlake_core.models import BaseAdapter, TokenBatch, load_adapter, parse_site
from mlake_core.models.sites import ArchitectureSpec
from mlake_core.models.tiny import TINY_ARCHITECTURES, build_tiny_model

#: Prompts of different lengths and scripts (CJK text is split into byte-level tokens).
TEXTS: tuple[str, ...] = (
    "The capital of France is",
    "法国的首都是巴黎",
    "Hi",
    "フランスの首都はパリです。",
)

#: A sequential GPT-NeoX variant (``use_parallel_residual=False``) for the parallel-block tests.
NEOX_SEQUENTIAL = "gpt_neox_sequential"


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folder of each tiny checkpoint, by architecture (plus :data:`NEOX_SEQUENTIAL`)."""
    root = tmp_path_factory.mktemp("tiny_models")
    paths = {arch: build_tiny_model(arch, root / arch, seed=0) for arch in TINY_ARCHITECTURES}
    paths[NEOX_SEQUENTIAL] = build_tiny_model(
        "gpt_neox",
        root / NEOX_SEQUENTIAL,
        seed=1,
        config_overrides={"use_parallel_residual": False},
    )
    return paths


@pytest.fixture(scope="session")
def get_adapter(tiny_models: dict[str, Path]) -> Callable[[str, str], BaseAdapter]:
    """``get_adapter(arch, backend)``: a session-cached float32 CPU adapter."""
    cache: dict[tuple[str, str], BaseAdapter] = {}

    def get(arch: str, backend: str) -> BaseAdapter:
        if (arch, backend) not in cache:
            cache[arch, backend] = load_adapter(str(tiny_models[arch]), backend, device="cpu")
        return cache[arch, backend]

    return get


@pytest.fixture(scope="session")
def get_hf(tiny_models: dict[str, Path]) -> Callable[[str], Any]:
    """``get_hf(arch)``: the plain Hugging Face model (eager attention, eval mode)."""
    cache: dict[str, Any] = {}

    def get(arch: str) -> Any:
        if arch not in cache:
            cache[arch] = AutoModelForCausalLM.from_pretrained(
                tiny_models[arch], attn_implementation="eager"
            ).eval()
        return cache[arch]

    return get


@pytest.fixture(scope="session")
def texts() -> tuple[str, ...]:
    """Prompts of different lengths in English, Chinese and Japanese."""
    return TEXTS


@pytest.fixture(scope="session")
def hf_reference() -> Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """The plain-PyTorch reference :func:`hf_run`."""
    return hf_run


def hf_inputs(batch: TokenBatch, spec: ArchitectureSpec) -> dict[str, torch.Tensor]:
    """Keyword arguments for a plain HF forward equivalent to what the adapters pass."""
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    if spec.uses_position_ids:
        kwargs["position_ids"] = batch.position_ids
    return kwargs


def hf_run(
    model: Any,
    spec: ArchitectureSpec,
    batch: TokenBatch,
    sites: Sequence[str],
    n_layers: int,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Plain PyTorch reference: logits and the live (graph-attached) tensors at ``sites``.

    Reads each site with ``register_forward_pre_hook`` / ``register_forward_hook`` on the HF
    module named by the site table -- no TransformerLens, no nnsight.
    """
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for name in sites:
        parsed = parse_site(name, n_layers)
        where = spec.sites[parsed.kind]
        module = model.get_submodule(where.path(parsed.layer))

        def pre_hook(_module: Any, args: tuple, name: str = name) -> None:
            captured[name] = args[0]

        def post_hook(_module: Any, _args: tuple, output: Any, name: str = name) -> None:
            captured[name] = output[0] if isinstance(output, tuple) else output

        if where.port == "input":
            handles.append(module.register_forward_pre_hook(pre_hook))
        else:
            handles.append(module.register_forward_hook(post_hook))
    try:
        logits = model(**hf_inputs(batch, spec)).logits
    finally:
        for handle in handles:
            handle.remove()
    return logits, captured
