"""Weight edits applied as forward interventions (``EditResult.applied(adapter,
"intervention")``, :mod:`mlake_core.editing.intervention`): on every architecture, for ROME,
MEMIT (two layers) and FT, on both backends, the edited model's logits, activations,
gradients and cached continuations equal the weight edit's (float32 rounding); no weight is
written, not even during the block; the hooks are gone after the block, also after an
exception in it or in a pass; Conv1D and bias changes, tied weights and bad deltas.

Each edit is computed once per architecture (TransformerLens backend, a few optimisation
steps on a 3-layer tiny random model: the comparison needs a non-trivial change, not a
successful edit) and applied on both backends' adapters of the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from mlake_core.editing import EditContext, get_method
from mlake_core.editing.base import EditRequest, EditResult, down_proj_name, subject_last_token
from mlake_core.editing.covariance import key_second_moment
from mlake_core.editing.ft import FtConfig
from mlake_core.editing.intervention import output_deltas
from mlake_core.editing.memit import MemitConfig
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.adapter import OutputDelta
from mlake_core.models.tiny import TINY_ARCHITECTURES, TRAINING_TEXT, TinySize, build_tiny_model

BACKENDS = ("tlens", "nnsight")
METHODS = ("rome", "memit", "ft")
TEXTS = ("The capital of France is", "法国的首都是巴黎", "Hi there")
#: Logit tolerance: W x + ΔW x against (W + ΔW) x in float32.
ATOL = 1e-4


def _configs() -> dict[str, Any]:
    return {
        "rome": RomeConfig(layer=1, steps=4, contexts="none"),
        "memit": MemitConfig(layers="0,1", steps=4, contexts="none"),
        # A learning rate that moves the weight visibly in 4 steps.
        "ft": FtConfig(layer=1, steps=4, lr=0.05, max_rel_norm=0.5),
    }


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("intervention_models")
    return {
        arch: build_tiny_model(arch, root / arch, seed=0, size=TinySize(n_layers=3))
        for arch in TINY_ARCHITECTURES
    }


@pytest.fixture(scope="module")
def get_adapter(paths: dict[str, Path]) -> Callable[[str, str], Any]:
    cache: dict[tuple[str, str], Any] = {}

    def get(arch: str, backend: str) -> Any:
        if (arch, backend) not in cache:
            cache[arch, backend] = load_adapter(str(paths[arch]), backend, device="cpu")
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


def _context(adapter: Any) -> EditContext:
    moments: dict[int, torch.Tensor] = {}

    def second_moment(layer: int) -> torch.Tensor:
        if layer not in moments:
            moments[layer] = key_second_moment(adapter, layer, TRAINING_TEXT, n_tokens=2000)[0]
        return moments[layer]

    return EditContext(torch.Generator().manual_seed(0), second_moment)


@pytest.fixture(scope="module")
def get_edit(get_adapter: Callable[[str, str], Any]) -> Callable[[str, str], EditResult]:
    cache: dict[tuple[str, str], EditResult] = {}

    def get(arch: str, method: str) -> EditResult:
        if (arch, method) not in cache:
            adapter = get_adapter(arch, "tlens")
            cache[arch, method] = get_method(method).fn(
                adapter, [_request(adapter)], _configs()[method], _context(adapter)
            )
        return cache[arch, method]

    return get


def _params(adapter: Any) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter.hf_module("").named_parameters()}


def _same_bytes(adapter: Any, saved: dict[str, torch.Tensor]) -> bool:
    now = dict(adapter.hf_module("").named_parameters())
    return now.keys() == saved.keys() and all(
        now[n].dtype == saved[n].dtype and torch.equal(_bytes(now[n]), _bytes(saved[n]))
        for n in saved
    )


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.detach().contiguous().view(torch.uint8).flatten()


def _torch_hooks(adapter: Any) -> int:
    return sum(
        len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
        for m in adapter.hf_module("").modules()
    )


def _tl_hooks(adapter: Any) -> int:
    bridge = getattr(adapter, "bridge", None)
    if bridge is None:
        return 0
    return sum(len(hp.fwd_hooks) + len(hp.bwd_hooks) for hp in bridge.hook_dict.values())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", TINY_ARCHITECTURES)
def test_intervention_equals_the_weight_edit(arch, method, backend, get_adapter, get_edit) -> None:
    """Logits and every edited layer's ``mlp_out`` (and ``resid_post`` after it) with the edit
    added at the projection's output equal those with the weights written; the weights stay
    byte-identical throughout; the hooks are gone after."""
    adapter = get_adapter(arch, backend)
    result = get_edit(arch, method)
    layers = result.info.get("layers", [result.info.get("layer")])
    assert result.deltas and all(float(d.abs().max()) > 0 for d in result.deltas.values())
    changes = output_deltas(adapter, result.deltas, "test", result.factors)
    assert len(changes) == len(layers)
    for change, delta in zip(changes, result.deltas.values(), strict=True):
        if method == "ft":  # dense
            assert change.factors is None and change.weight is not None
            continue
        assert change.factors is not None and change.weight is None  # low rank
        left, right = change.factors
        assert left.shape[1] == 1  # one request: rank one, on every edited layer
        dense = delta.T if arch == "gpt2" else delta  # GPT-2's Conv1D stores [in, out]
        torch.testing.assert_close((left @ right).to(dense.dtype), dense, atol=1e-6, rtol=1e-4)
    sites = [f"mlp_out.{layer}" for layer in layers] + [f"resid_post.{adapter.n_layers - 1}"]
    batch = adapter.tokenize([*TEXTS, result.requests[0].prompt])
    saved = _params(adapter)
    hooks = (_torch_hooks(adapter), _tl_hooks(adapter))
    base = adapter.forward(batch)
    with result.applied(adapter, "weights"):
        w_logits, w_cache = adapter.run_with_cache(batch, sites)
    assert _same_bytes(adapter, saved)
    with result.applied(adapter, "intervention"):
        assert _same_bytes(adapter, saved)  # nothing written, even inside the block
        i_logits, i_cache = adapter.run_with_cache(batch, sites)
        i_forward = adapter.forward(batch)
        assert _same_bytes(adapter, saved)
    assert _same_bytes(adapter, saved)
    assert float((w_logits - base).abs().max()) > 100 * ATOL  # the edit changes the outputs
    torch.testing.assert_close(i_logits, w_logits, atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(i_forward, w_logits, atol=ATOL, rtol=1e-4)
    for site in sites:
        torch.testing.assert_close(i_cache[site], w_cache[site], atol=ATOL, rtol=1e-4)
    assert adapter._deltas == ()
    assert (_torch_hooks(adapter), _tl_hooks(adapter)) == hooks
    torch.testing.assert_close(adapter.forward(batch), base, atol=0, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_stops_and_continuations_follow_the_intervention(
    backend, get_adapter, get_edit
) -> None:
    """MEMIT's two-layer edit on Llama: gradients at a site after the edited layers, an
    ``activations`` pass that stops at the edited layer's output, and a continuation from
    cached keys and values are the weight edit's."""
    from mlake_core.editing.delta import nll, teacher_forced

    adapter = get_adapter("llama", backend)
    result = get_edit("llama", "memit")
    request = result.requests[0]
    batch, targets = teacher_forced(adapter, [request])
    prefix = adapter.tokenize(["The capital of France is"])
    follow = adapter.batch([adapter.tokenizer(" Paris", add_special_tokens=False)["input_ids"]])
    out = {}
    for how in ("weights", "intervention"):
        with result.applied(adapter, how):
            value, grads = adapter.gradients(
                batch, ["resid_post.0", "mlp_post.1"], lambda lg: nll(lg, targets)
            )
            acts = adapter.activations(batch, ["mlp_out.0"])
            _, past = adapter.run_with_past(prefix)
            continued = adapter.run_with_patches(follow, [], past=past)
        out[how] = (value, grads, acts, continued)
    (wv, wg, wa, wc), (iv, ig, ia, ic) = out["weights"], out["intervention"]
    torch.testing.assert_close(iv, wv, atol=1e-5, rtol=1e-5)
    for site in wg:
        torch.testing.assert_close(ig[site], wg[site], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ia["mlp_out.0"], wa["mlp_out.0"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ic, wc, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_conv1d_weight_and_bias_changes(backend, get_adapter) -> None:
    """GPT-2's ``Conv1D`` (weight stored ``[in, out]``) with a weight and a bias change on two
    layers, and an attention output projection: the intervention equals writing them."""
    adapter = get_adapter("gpt2", backend)
    g = torch.Generator().manual_seed(1)
    names = [down_proj_name(adapter, 0), down_proj_name(adapter, 1)]
    names += [n[: -len("weight")] + "bias" for n in names]
    names.append("transformer.h.2.attn.c_proj.weight")
    deltas = {
        n: 0.05 * torch.randn(adapter.editable_parameter(n).shape, generator=g) for n in names
    }
    result = EditResult("ft", (), deltas)
    (first, *_) = output_deltas(adapter, deltas, "test")
    assert first.weight is not None and first.bias is not None
    # Conv1D: stored [in, out], applied as [out, in].
    assert first.weight.shape == deltas[names[0]].T.shape
    batch = adapter.tokenize(list(TEXTS))
    saved = _params(adapter)
    with result.applied(adapter, "weights"):
        wanted = adapter.forward(batch)
    with result.applied(adapter, "intervention"):
        got = adapter.forward(batch)
    assert _same_bytes(adapter, saved)
    torch.testing.assert_close(got, wanted, atol=ATOL, rtol=1e-4)
    assert float((wanted - adapter.forward(batch)).abs().max()) > 100 * ATOL


@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_are_removed_after_an_exception(backend, get_adapter, get_edit) -> None:
    """An exception in the block, or in a pass (a delta of the wrong width), leaves no delta
    and no hook behind: the next pass is the unedited model's, bitwise."""
    adapter = get_adapter("qwen2", backend)
    result = get_edit("qwen2", "rome")
    batch = adapter.tokenize(list(TEXTS))
    base = adapter.forward(batch)
    hooks = (_torch_hooks(adapter), _tl_hooks(adapter))
    with pytest.raises(KeyError, match="boom"), result.applied(adapter, "intervention"):
        adapter.forward(batch)
        raise KeyError("boom")
    assert adapter._deltas == ()
    path = down_proj_name(adapter, 0).rpartition(".")[0]
    bad = OutputDelta(path, torch.ones(adapter.d_model, adapter.d_mlp + 1))
    with pytest.raises(Exception), adapter.adding([bad]):  # noqa: B017 (the backend's error)
        adapter.forward(batch)
    assert adapter._deltas == ()
    assert (_torch_hooks(adapter), _tl_hooks(adapter)) == hooks
    torch.testing.assert_close(adapter.forward(batch), base, atol=0, rtol=0)


def test_the_adapter_setting_chooses_how_an_edit_is_applied(get_adapter, get_edit) -> None:
    """``applied(adapter)`` follows ``adapter.edit_apply`` (``--edit-apply``, set by the
    loader): with ``intervention`` no weight is written; an unknown value is refused."""
    adapter = get_adapter("bloom", "tlens")
    result = get_edit("bloom", "ft")
    batch = adapter.tokenize(list(TEXTS))
    saved = _params(adapter)
    with result.applied(adapter):
        wanted = adapter.forward(batch)
        assert not _same_bytes(adapter, saved)  # the default writes the weights
    try:
        adapter.edit_apply = "intervention"
        with result.applied(adapter):
            assert _same_bytes(adapter, saved)
            got = adapter.forward(batch)
    finally:
        adapter.edit_apply = "weights"
    torch.testing.assert_close(got, wanted, atol=ATOL, rtol=1e-4)
    with pytest.raises(ConfigError, match="apply 'remote'"), result.applied(adapter, "remote"):
        pass


def test_refusals(paths, get_adapter) -> None:
    """A tied weight, a non-linear module, a shape mismatch and a module that is not an output
    projection are refused with the parameter's name."""
    adapter = get_adapter("llama", "tlens")
    name = down_proj_name(adapter, 0)
    shape = adapter.editable_parameter(name).shape
    with pytest.raises(ConfigError, match="has shape"):
        output_deltas(adapter, {name: torch.zeros(shape[0], shape[1] + 1)}, "test")
    norm = "model.layers.0.input_layernorm.weight"
    with pytest.raises(ConfigError, match="not a linear projection"):
        output_deltas(adapter, {norm: torch.zeros(adapter.d_model)}, "test")
    up = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ConfigError, match="not an MLP or attention output projection"):
        output_deltas(adapter, {up: torch.zeros(adapter.editable_parameter(up).shape)}, "test")
    with pytest.raises(ConfigError, match="embedding"):
        output_deltas(adapter, {"model.embed_tokens.weight": torch.zeros(1)}, "test")
    # Tie layer 1's down projection to layer 0's on a fresh adapter (not the shared one).
    tied = load_adapter(str(paths["llama"]), "nnsight", device="cpu")
    layers: Any = tied.hf_module("model.layers")
    layers[1].mlp.down_proj.weight = layers[0].mlp.down_proj.weight
    with pytest.raises(ConfigError, match="tied"):
        output_deltas(tied, {name: torch.zeros(shape)}, "test")


@pytest.mark.parametrize("arch", ["gpt2", "gemma3_text"])
def test_the_intervention_survives_nnsights_remote_serialization(arch, paths, get_edit) -> None:
    """With ``remote="local"`` (nnsight's dry run of ``remote=True``: each pass is serialized
    and deserialized, with mlake's modules hidden, as an NDIF server would receive it, then run
    here), MEMIT applied as an intervention gives the weight edit's logits and activations.
    On GPT-2 the delta joins the ``mlp_out`` site (the projection's output); on Gemma 3 it is
    added before the post-norm.  Real NDIF execution is not exercised (no network here)."""
    adapter: Any = load_adapter(str(paths[arch]), "nnsight", device="cpu")
    result = get_edit(arch, "memit")
    batch = adapter.tokenize(list(TEXTS))
    sites = [f"mlp_out.{layer}" for layer in result.info["layers"]]
    with result.applied(adapter, "weights"):
        wanted, w_cache = adapter.run_with_cache(batch, sites)
    saved = _params(adapter)
    adapter.remote = "local"
    with result.applied(adapter, "intervention"):
        got, g_cache = adapter.run_with_cache(batch, sites)
        acts = adapter.activations(batch, sites[:1])
    assert _same_bytes(adapter, saved)
    torch.testing.assert_close(got, wanted, atol=ATOL, rtol=1e-4)
    for site in sites:
        torch.testing.assert_close(g_cache[site], w_cache[site], atol=ATOL, rtol=1e-4)
    torch.testing.assert_close(acts[sites[0]], w_cache[sites[0]], atol=ATOL, rtol=1e-4)
    assert float((wanted - adapter.forward(batch)).abs().max()) > 100 * ATOL


def test_remote_settings_refuse_what_cannot_work(paths) -> None:
    """``--remote`` needs the nnsight backend and edits applied as interventions (a weight
    written here is not the NDIF copy's); a remote adapter refuses gradients before any
    request is made (the values come back without a graph)."""
    from mlake.settings import ModelSettings

    with pytest.raises(ConfigError, match="--backend nnsight"):
        ModelSettings(remote=True, edit_apply="intervention")
    with pytest.raises(ConfigError, match="--edit-apply intervention"):
        ModelSettings(remote=True, backend="nnsight")
    assert ModelSettings(remote=True, backend="nnsight", edit_apply="intervention").remote
    with pytest.raises(ConfigError, match="apply 'x'"):
        ModelSettings(edit_apply="x")
    adapter: Any = load_adapter(str(paths["qwen2"]), "nnsight", device="cpu")
    adapter.remote = True
    batch = adapter.tokenize(list(TEXTS))
    with pytest.raises(ConfigError, match="cannot be taken from a remote"):
        adapter.gradients(batch, ["mlp_out.0"], lambda logits: logits.sum())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pass_started_above_an_edited_layer(backend, get_adapter, get_edit) -> None:
    """A pass that starts at block 2 from a cached residual (``final_states(start=...)``, as
    causal tracing's restorations do) skips MEMIT's edited blocks 0-1: their change is in the
    residual it starts from, and the pass equals the whole one."""
    adapter = get_adapter("llama", backend)
    result = get_edit("llama", "memit")
    batch = adapter.tokenize(list(TEXTS))
    with result.applied(adapter, "intervention"):
        _, cache = adapter.run_with_cache(batch, ["resid_pre.2"])
        whole, _, _ = adapter.final_states(batch)
        started, _, _ = adapter.final_states(batch, start=(2, cache["resid_pre.2"]))
    with result.applied(adapter, "weights"):
        weights, _, _ = adapter.final_states(batch)
    torch.testing.assert_close(started, whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(whole, weights, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("command", [["trace"], ["edit", "transfer"], ["eval", "knowledge"]])
def test_the_model_options_help_renders(command, capsys) -> None:
    """``--edit-apply``, ``--remote`` and ``--device`` are described in every model command's
    help (their text comes from ModelSettings' docstring; a ``%`` there broke argparse)."""
    from mlake.cli import build_parser

    with pytest.raises(SystemExit) as done:
        build_parser().parse_args([*command, "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--edit-apply" in text and "--remote" in text and "device_map" in text
