"""One model over several devices (``--device auto`` with an accelerate device map).

This machine has no GPU, and torch has one CPU device (``cpu:1`` is ``cpu``), so two real
devices cannot be tested here.  What is tested is what torch and accelerate allow on a CPU:

* the decision ``--device auto`` makes (several GPUs, weights over a share of the first one's
  free memory), with the GPU count and free memory stood in for;
* a device map that keeps one layer **offloaded** (``"disk"``: accelerate holds its weights on
  ``meta`` between passes and an ``AlignDevicesHook`` loads them to its execution device for
  the forward).  That is the per-layer machinery a multi-GPU map uses (hooks that move inputs,
  weights that are not where ``model.device`` says), so the per-layer device lookup
  (:meth:`~mlake_core.models.adapter.BaseAdapter.module_device`), the read-outs, patches,
  caches and gradients, the refusal to write an offloaded weight, and edits applied as
  interventions on the offloaded layer are all exercised, on both backends.

What needs two GPUs and is not tested: tensors of different layers on different CUDA devices
(a patch's values or an edit's term moved to a layer's device, caches gathered on the first
device, the final norm and unembedding on the last one), and the TransformerLens bridge over
a model accelerate split across GPUs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mlake_core.editing import EditContext, get_method
from mlake_core.editing.base import EditRequest, down_proj_name, subject_last_token
from mlake_core.editing.covariance import key_second_moment
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError
from mlake_core.models import Patch, load_adapter, loading
from mlake_core.models.tiny import TRAINING_TEXT, TinySize, build_tiny_model

BACKENDS = ("tlens", "nnsight")
TEXTS = ("The capital of France is", "法国的首都是巴黎", "Hi")
GIB = 2**30


def test_device_auto_spreads_a_model_only_when_one_gpu_cannot_hold_it() -> None:
    assert not loading.device_map_needed(10 * GIB, [80 * GIB, 80 * GIB])
    assert loading.device_map_needed(70 * GIB, [80 * GIB, 80 * GIB])  # over 80% of GPU 0
    assert not loading.device_map_needed(140 * GIB, [80 * GIB])  # one GPU: nothing to spread
    assert not loading.device_map_needed(0, [])


def test_weight_bytes_from_the_config(tmp_path: Path) -> None:
    """Counted on the meta device: the loaded model's parameters times the dtype's size (the
    tied embedding of Qwen2 once)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path = build_tiny_model("qwen2", tmp_path / "qwen2", seed=0)
    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    n = sum(p.numel() for p in model.parameters())
    assert loading.weight_bytes(config, torch.float32) == 4 * n
    assert loading.weight_bytes(config, torch.bfloat16) == 2 * n


def test_device_auto_asks_for_a_device_map_on_two_small_gpus(monkeypatch, tmp_path) -> None:
    """With two GPUs stood in (count and free memory), ``--device auto`` chooses
    ``device_map="auto"`` when the weights exceed 80% of the first one's free memory, and
    one device otherwise."""
    from transformers import AutoConfig

    from mlake_core.models import adapter as adapter_module

    config = AutoConfig.from_pretrained(build_tiny_model("llama", tmp_path / "llama", seed=0))
    need = loading.weight_bytes(config, torch.float32)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    free = {"bytes": need}
    monkeypatch.setattr(adapter_module, "free_bytes", lambda device: free["bytes"])
    assert loading._auto_device_map(config, torch.float32) == "auto"
    free["bytes"] = 2 * need
    assert loading._auto_device_map(config, torch.float32) is None
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    free["bytes"] = need // 10
    assert loading._auto_device_map(config, torch.float32) is None


def _device_map(arch: str) -> dict[str, str]:
    """Every top-level module on the CPU, block 1 offloaded to disk."""
    if arch == "gpt2":
        return {
            "transformer.wte": "cpu",
            "transformer.wpe": "cpu",
            "transformer.h.0": "cpu",
            "transformer.h.1": "disk",
            "transformer.h.2": "cpu",
            "transformer.ln_f": "cpu",
            "lm_head": "cpu",
        }
    return {
        "model.embed_tokens": "cpu",
        "model.layers.0": "cpu",
        "model.layers.1": "disk",
        "model.layers.2": "cpu",
        "model.norm": "cpu",
        "model.rotary_emb": "cpu",
        "lm_head": "cpu",
    }


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("device_map_models")
    return {
        arch: build_tiny_model(arch, root / arch, seed=0, size=TinySize(n_layers=3))
        for arch in ("llama", "gpt2", "gemma3_text")
    }


@pytest.fixture(scope="module")
def pair(paths, tmp_path_factory):
    """``pair(arch, backend)``: (the model on one device, the same model with block 1
    offloaded to disk), cached."""
    cache: dict[tuple[str, str], tuple[Any, Any]] = {}

    def get(arch: str, backend: str) -> tuple[Any, Any]:
        if (arch, backend) not in cache:
            plain = load_adapter(str(paths[arch]), backend, device="cpu")
            mapped = load_adapter(
                str(paths[arch]),
                backend,
                device="cpu",
                device_map=_device_map(arch),
                offload_folder=str(tmp_path_factory.mktemp("offload")),
            )
            cache[arch, backend] = (plain, mapped)
        return cache[arch, backend]

    return get


def _request(adapter: Any) -> EditRequest:
    prompt, subject = "The capital of France", "France"
    start = prompt.index(subject)
    new = tuple(adapter.tokenizer(" Berlin", add_special_tokens=False)["input_ids"][:2])
    return EditRequest(
        fact_id=0,
        lang="en",
        form="question",
        prompt=prompt,
        prompt_ids=tuple(adapter.encode(prompt)),
        subject=subject,
        subject_last=subject_last_token(adapter, prompt, start, start + len(subject), where="t"),
        target_new="Berlin",
        target_new_ids=new,
        target_old="Paris",
        text=prompt,
        text_subject=(start, start + len(subject)),
    )


def _rome(adapter: Any, layer: int):
    moment = key_second_moment(adapter, layer, TRAINING_TEXT, n_tokens=2000)[0]
    context = EditContext(torch.Generator().manual_seed(0), lambda _layer: moment)
    config = RomeConfig(layer=layer, steps=4, contexts="none")
    return get_method("rome").fn(adapter, [_request(adapter)], config, context)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ["llama", "gpt2", "gemma3_text"])
def test_an_offloaded_layer_reads_patches_and_differentiates_as_on_one_device(
    arch, backend, pair
) -> None:
    plain, mapped = pair(arch, backend)
    path = plain.spec.sites["mlp_post"].path(1)
    assert mapped.hf_module(path).weight.device.type == "meta"  # offloaded between passes
    assert mapped.module_device(path) == torch.device("cpu")  # where its hook computes
    assert mapped.info.device == "cpu"
    batch = plain.tokenize(list(TEXTS))
    sites = ["mlp_post.1", "mlp_out.1", "resid_post.2"]
    patch = Patch(
        "mlp_out.1", torch.tensor([1, 1]), torch.tensor([0, 2]), torch.ones(2, plain.d_model)
    )
    for adapter_pass in (
        lambda a: {"logits": a.forward(batch)},
        lambda a: a.run_with_cache(batch, sites, patches=[patch])[1],
        lambda a: a.activations(batch, ["mlp_out.1"]),
        lambda a: {
            "lens": a.logit_lens(a.run_with_cache(batch, ["resid_post.1"])[1]["resid_post.1"])
        },
        lambda a: a.gradients(batch, ["mlp_out.1"], lambda lg: lg[:, -1].logsumexp(-1).sum())[1],
        lambda a: {
            "readout": a.readout_logprobs(
                a.run_with_cache(batch, ["resid_post.2"])[1]["resid_post.2"][:, -1],
                torch.tensor([3, 4, 5]),
            )
        },
    ):
        want, got = adapter_pass(plain), adapter_pass(mapped)
        for key in want:
            torch.testing.assert_close(got[key], want[key], atol=1e-6, rtol=1e-6)
    y = torch.randn(2, plain.d_model, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(
        mapped.sublayer_output("mlp", 1, y), plain.sublayer_output("mlp", 1, y)
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_edits_on_a_device_map(backend, pair) -> None:
    """ROME computed on a kept layer of the device-mapped model is the one-device model's;
    an offloaded layer's weight cannot be written (clear error), but its edit applied as an
    intervention gives the one-device weight edit's logits."""
    plain, mapped = pair("gemma3_text", backend)
    batch = plain.tokenize(list(TEXTS))
    kept = _rome(mapped, 0)
    reference = _rome(plain, 0)
    name = down_proj_name(plain, 0)
    torch.testing.assert_close(kept.deltas[name], reference.deltas[name], atol=1e-6, rtol=1e-5)
    with kept.applied(mapped):
        edited = mapped.forward(batch)
    with reference.applied(plain):
        torch.testing.assert_close(edited, plain.forward(batch), atol=1e-5, rtol=1e-5)

    with pytest.raises(ConfigError, match=r"offloaded.*--edit-apply intervention"):
        _rome(mapped, 1)
    offloaded = _rome(plain, 1)
    with pytest.raises(ConfigError, match="offloaded"), offloaded.applied(mapped, "weights"):
        pass
    with offloaded.applied(plain, "weights"):
        wanted = plain.forward(batch)
    with offloaded.applied(mapped, "intervention"):
        got = mapped.forward(batch)
    torch.testing.assert_close(got, wanted, atol=1e-4, rtol=1e-4)
    assert float((wanted - plain.forward(batch)).abs().max()) > 1e-2
