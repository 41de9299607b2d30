"""Weight edits on an architecture whose MLP output passes a norm before the residual stream
(Gemma 3's ``post_feedforward_layernorm``): ``mlp_out = N(down_proj(mlp_post))``, so a
change of ``mlp_out`` is not a change of the projection's output.

On the tiny Gemma 3 (3 layers, so MEMIT can spread over two): ROME's update maps ``k*`` to
the projection output its ``δ`` optimisation scored and the edited model's ``mlp_out`` is the
norm of that; FT's step follows the true gradient of the loss with respect to the weight
(checked against autograd on the plain Hugging Face model); FT, ROME and MEMIT raise the
new answer; the pull-back of a change of ``mlp_out`` is exact where the norm can make it and
reports what it misses elsewhere; and no edit can write the (tied) embedding.  Requests are
built by hand from token ids (no dataset needed).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from mlake_core.editing import EditContext, get_method
from mlake_core.editing.base import (
    EditRequest,
    EditResult,
    down_proj_name,
    restore_weights,
    subject_last_token,
)
from mlake_core.editing.covariance import key_second_moment
from mlake_core.editing.delta import nll, optimise_output_delta, teacher_forced
from mlake_core.editing.ft import FtConfig
from mlake_core.editing.memit import MemitConfig
from mlake_core.editing.projection import (
    output_change,
    projection_output,
    pull_back_change,
    pull_back_grad,
)
from mlake_core.editing.rome import RomeConfig
from mlake_core.errors import ConfigError
from mlake_core.models import Patch, load_adapter
from mlake_core.models.tiny import TRAINING_TEXT, TinySize, build_tiny_model

BACKENDS = ("tlens", "nnsight")


@pytest.fixture(scope="module")
def gemma_path(tmp_path_factory) -> Path:
    return build_tiny_model(
        "gemma3_text", tmp_path_factory.mktemp("gemma3_3"), seed=0, size=TinySize(n_layers=3)
    )


@pytest.fixture(scope="module", params=BACKENDS)
def adapter(request, gemma_path: Path):
    return load_adapter(str(gemma_path), request.param, device="cpu")


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    path = build_tiny_model("llama", tmp_path_factory.mktemp("llama"), seed=0)
    return load_adapter(str(path), "tlens", device="cpu")


def _request(adapter) -> EditRequest:
    """ "The capital of France" -> " Berlin" (first token), edited at "France"."""
    prompt, subject = "The capital of France", "France"
    start = prompt.index(subject)
    new = tuple(adapter.tokenizer(" Berlin", add_special_tokens=False)["input_ids"][:1])
    return EditRequest(
        fact_id=0,
        lang="en",
        form="question",
        prompt=prompt,
        prompt_ids=tuple(adapter.encode(prompt)),
        subject=subject,
        subject_last=subject_last_token(adapter, prompt, start, start + len(subject), where="test"),
        target_new="Berlin",
        target_new_ids=new,
        target_old="Paris",
        text=prompt,
        text_subject=(start, start + len(subject)),
    )


def _context(adapter) -> EditContext:
    moments: dict[int, torch.Tensor] = {}

    def second_moment(layer: int) -> torch.Tensor:
        if layer not in moments:
            moments[layer] = key_second_moment(adapter, layer, TRAINING_TEXT, n_tokens=5000)[0]
        return moments[layer]

    return EditContext(torch.Generator().manual_seed(0), second_moment)


def _nll(adapter, request: EditRequest, patches=()) -> float:
    batch, targets = teacher_forced(adapter, [request])
    return float(nll(adapter.run_with_patches(batch, list(patches)), targets))


def _at_subject(adapter, request: EditRequest, sites: list[str]) -> dict[str, torch.Tensor]:
    batch, _ = teacher_forced(adapter, [request])
    _, cache = adapter.run_with_cache(batch, sites)
    return {site: cache[site][0, request.subject_last].float() for site in sites}


def _weights(adapter) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in adapter.hf_module("").named_parameters()}


def _unchanged(adapter, saved: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(saved[n], p) for n, p in adapter.hf_module("").named_parameters())


def test_the_tiny_gemma_has_post_norms(adapter) -> None:
    assert adapter.info.post_norms and adapter.spec.post_norm("mlp") is not None
    assert adapter.n_layers == 3 and adapter.info.tied_embeddings


def test_rome_maps_k_star_to_the_value_its_optimisation_scored(adapter) -> None:
    """After the edit, the projection maps ``k*`` to ``y + δ`` and ``mlp_out`` at the
    subject is ``N(y + δ)`` -- the value the δ optimisation patched in and scored -- not
    ``mlp_out + δ`` (what writing ``δ`` as if there were no norm assumes)."""
    request = _request(adapter)
    config = RomeConfig(layer=0, steps=20)
    # The same optimisation ROME runs (deterministic): the value it intends to write.
    delta, base, loss, _ = optimise_output_delta(
        adapter,
        [request],
        "mlp_out.0",
        steps=config.steps,
        lr=config.lr,
        clamp_norm=config.clamp_norm,
        weight_decay=config.weight_decay,
        stop_loss=config.stop_loss,
    )
    intended = base[0] + delta[0]
    before = _at_subject(adapter, request, ["mlp_post.0", "mlp_out.0"])
    assert torch.allclose(projection_output(adapter, 0, before["mlp_post.0"]).float(), base[0])
    saved = _weights(adapter)
    result = get_method("rome").fn(adapter, [request], config, _context(adapter))
    assert _unchanged(adapter, saved)
    assert result.loss == pytest.approx(loss, rel=1e-6)
    assert list(result.deltas) == [down_proj_name(adapter, 0)]
    with result.applied(adapter):
        after = _at_subject(adapter, request, ["mlp_post.0", "mlp_out.0"])
        projected = projection_output(adapter, 0, after["mlp_post.0"]).float()
    assert _unchanged(adapter, saved)
    assert torch.equal(after["mlp_post.0"], before["mlp_post.0"])  # k* is upstream of the edit
    torch.testing.assert_close(projected, intended, atol=1e-4, rtol=1e-4)
    wanted_out = adapter.sublayer_output("mlp", 0, intended).detach()
    torch.testing.assert_close(after["mlp_out.0"], wanted_out, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(
        after["mlp_out.0"] - before["mlp_out.0"],
        output_change(adapter, 0, base[0], delta[0]),
        atol=1e-4,
        rtol=1e-4,
    )
    # The norm matters: adding δ to mlp_out would have been something else.
    naive = before["mlp_out.0"] + delta[0]
    assert float((after["mlp_out.0"] - naive).norm()) > 0.1 * float(delta[0].norm())
    # The reported loss is the NLL of the model with exactly that mlp_out at the subject.
    at = torch.tensor([request.subject_last])
    patch = Patch("mlp_out.0", torch.tensor([0]), at, wanted_out[None])
    assert _nll(adapter, request, [patch]) == pytest.approx(result.loss, rel=1e-4)


@pytest.mark.parametrize(
    ("method", "config"),
    [
        ("ft", FtConfig(layer=0, lr=1e-2, max_rel_norm=0.3)),
        ("rome", RomeConfig(layer=0)),
        ("memit", MemitConfig(layers="0-1")),
    ],
    ids=["ft", "rome", "memit"],
)
def test_edits_raise_the_new_answer(adapter, method: str, config) -> None:
    request = _request(adapter)
    saved = _weights(adapter)
    before = _nll(adapter, request)
    result = get_method(method).fn(adapter, [request], config, _context(adapter))
    assert _unchanged(adapter, saved)
    with result.applied(adapter):
        after = _nll(adapter, request)
    assert _unchanged(adapter, saved)
    assert before > 5.0  # a new answer the random model does not give
    assert after < 0.5 * before
    # The edited model scores what the method's optimisation reported, up to the update's
    # effect on other positions (ROME, MEMIT) -- not the wide gap of an edit written as if
    # mlp_out were the projection's output.
    assert after == pytest.approx(result.loss, abs=0.5)
    if method == "memit":
        norms = result.info["residual_norms"]
        assert len(norms) == 3 and norms[-1] < 0.5 * norms[0]
        assert len(result.info["post_norm_missed"]) == 2


def test_ft_follows_the_gradient_with_respect_to_the_weight(adapter, gemma_path: Path) -> None:
    """FT's first Adam step is ``-lr * sign(dL/dW)`` (elementwise, up to Adam's ε); the sign
    is that of the gradient autograd computes on the plain Hugging Face model, where the loss
    reaches ``W`` through the post-norm."""
    request = _request(adapter)
    lr = 1e-4
    result = get_method("ft").fn(
        adapter, [request], FtConfig(layer=0, steps=1, lr=lr, max_rel_norm=10.0), _context(adapter)
    )
    step = result.deltas[down_proj_name(adapter, 0)]
    hf = AutoModelForCausalLM.from_pretrained(gemma_path, attn_implementation="eager").eval()
    batch, targets = teacher_forced(adapter, [request])
    weight = hf.get_submodule(adapter.spec.sites["mlp_post"].path(0)).weight
    logits = hf(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
    ).logits
    (grad,) = torch.autograd.grad(nll(logits, targets), weight)
    clear = grad.abs() > 1e-3 * grad.abs().max()
    assert int(clear.sum()) > 0.5 * grad.numel()
    assert torch.equal(torch.sign(step[clear]), -torch.sign(grad[clear]))
    torch.testing.assert_close(
        step[clear].abs(), torch.full_like(step[clear], lr), rtol=1e-3, atol=0
    )


def test_pull_back_grad_is_the_chain_rule(adapter) -> None:
    request = _request(adapter)
    key = _at_subject(adapter, request, ["mlp_post.1"])["mlp_post.1"]
    y = projection_output(adapter, 1, key).float().requires_grad_(True)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    (expected,) = torch.autograd.grad(adapter.sublayer_output("mlp", 1, y), y, g)
    torch.testing.assert_close(pull_back_grad(adapter, 1, y.detach(), g), expected)


def test_pull_back_change(adapter) -> None:
    """Exact for a change the norm can make; least squares, with what is missed reported,
    for one it cannot (an RMS norm cannot rescale its output)."""
    request = _request(adapter)
    keys = torch.stack(
        [
            _at_subject(adapter, request, ["mlp_post.0"])["mlp_post.0"],
            _at_subject(adapter, request, ["mlp_post.1"])["mlp_post.1"],
        ]
    )
    y = projection_output(adapter, 0, keys).float()
    out = adapter.sublayer_output("mlp", 0, y)
    # Reachable: the change a known move of y makes.
    move = (
        0.3
        * y.norm(dim=-1, keepdim=True)
        * torch.nn.functional.normalize(
            torch.randn(y.shape, generator=torch.Generator().manual_seed(1)), dim=-1
        )
    )
    change = output_change(adapter, 0, y, move)
    pulled, missed = pull_back_change(adapter, 0, y, change)
    assert pulled.shape == y.shape and missed.shape == (2,)
    assert bool((missed < 1e-4 * change.norm(dim=-1)).all())
    torch.testing.assert_close(output_change(adapter, 0, y, pulled), change, atol=1e-4, rtol=0)
    # Unreachable: doubling the output.
    pulled, missed = pull_back_change(adapter, 0, y, out)
    achieved = output_change(adapter, 0, y, pulled)
    torch.testing.assert_close(missed, (achieved - out).norm(dim=-1), atol=1e-5, rtol=1e-4)
    assert bool((missed > 0.5 * out.norm(dim=-1)).all())


def test_without_a_post_norm_nothing_is_converted(llama) -> None:
    """On the other architectures the projection's output is ``mlp_out``: every conversion
    returns its input (the methods compute what they computed before post-norms)."""
    x = torch.randn(3, llama.d_model)
    assert llama.spec.post_norm("mlp") is None
    assert pull_back_grad(llama, 0, x, x) is x
    assert output_change(llama, 0, x, x) is x
    pulled, missed = pull_back_change(llama, 0, x, x)
    assert pulled is x and torch.equal(missed, torch.zeros(3))


@pytest.mark.parametrize("arch", ["gemma3", "llama"])
def test_an_edit_cannot_write_the_embedding(arch, adapter, llama) -> None:
    """A delta naming the token embedding or the unembedding is refused before anything is
    written (tied on Gemma 3: one tensor for both); so is a name the model lacks."""
    model = adapter if arch == "gemma3" else llama
    embed = model.spec.sites["embed"].path(None) + ".weight"
    unembed = model.spec.unembed + ".weight"
    saved = _weights(model)
    shape = model.hf_module(model.spec.unembed).weight.shape
    down = down_proj_name(model, 0)
    for name in (embed, unembed):
        result = EditResult(
            method="rome",
            requests=(),
            deltas={down: torch.ones_like(model.mlp_down(0)[0]), name: torch.ones(shape)},
        )
        with pytest.raises(ConfigError, match=r"rome edit: .*token embedding or the unembedding"):
            result.apply(model)
        with pytest.raises(ConfigError, match="token embedding"), result.applied(model):
            pass
        with pytest.raises(ConfigError, match=r"restore: .*token embedding"):
            restore_weights(model, {name: torch.zeros(shape)})
        assert _unchanged(model, saved)
    if model.info.tied_embeddings:
        with pytest.raises(ConfigError, match="tied"):
            EditResult("ft", (), {embed: torch.ones(shape)}).apply(model)
    with pytest.raises(ConfigError, match=r"ft edit: .* has no parameter .model\.nowhere\.weight."):
        EditResult("ft", (), {"model.nowhere.weight": torch.ones(1)}).apply(model)
    assert _unchanged(model, saved)
