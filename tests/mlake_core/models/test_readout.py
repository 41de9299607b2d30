"""Issue 25: reading only what is measured.  ``readout_logprobs`` (the final norm, then the
log-sum-exp over the vocabulary a chunk at a time) equals ``log_softmax`` of the model's own
logits on every architecture and both backends; ``final_states`` stops after the last block,
keeps the same keys and values as ``run_with_past`` and can start at any block."""

from __future__ import annotations

import pytest
import torch

from mlake_core.models import BACKENDS
from mlake_core.models.readout import MIN_CHUNK, token_logprobs, vocab_chunk
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS


def _full(hidden, weight, tokens, bias=None, softcap=None):
    z = torch.nn.functional.linear(hidden, weight, bias).double()
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    return z.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]


@pytest.mark.parametrize("vocab,chunk", [(1000, 7), (1000, 1000), (1000, 999), (1001, 100), (5, 3)])
@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunks_equal_the_full_softmax(vocab, chunk, softcap) -> None:
    gen = torch.Generator().manual_seed(vocab + chunk)
    hidden = torch.randn(3, 4, 16, generator=gen) * 3
    weight = torch.randn(vocab, 16, generator=gen)
    bias = torch.randn(vocab, generator=gen)
    tokens = torch.randint(0, vocab, (3, 4), generator=gen)
    got = token_logprobs(hidden, weight, tokens, bias=bias, softcap=softcap, chunk=chunk)
    want = _full(hidden, weight, tokens, bias, softcap)
    assert got.shape == (3, 4) and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    if softcap:  # the cap changes the numbers (the case is not vacuous)
        assert not torch.allclose(got.double(), _full(hidden, weight, tokens, bias), atol=1e-2)


def test_gradients_through_the_chunks_equal_the_full_softmax() -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(777, 8, generator=gen)
    tokens = torch.randint(0, 777, (5,), generator=gen)
    base = torch.randn(5, 8, generator=gen)
    h1 = base.clone().requires_grad_(True)
    h2 = base.clone().requires_grad_(True)
    token_logprobs(h1, weight, tokens, softcap=3.0, chunk=100).sum().backward()
    _full(h2, weight, tokens, softcap=3.0).sum().backward()
    torch.testing.assert_close(h1.grad.double(), h2.grad.double(), rtol=1e-5, atol=1e-6)


def test_chunk_width_follows_the_memory_budget() -> None:
    assert vocab_chunk(1, 262_144) == 262_144  # one row: the whole vocabulary fits
    wide = vocab_chunk(512, 262_144, budget=64 << 20)
    assert wide == (64 << 20) // (4 * 512) and 512 * wide * 4 <= 64 << 20
    assert vocab_chunk(10**7, 262_144) == MIN_CHUNK
    assert vocab_chunk(10**7, 100) == 100
    with pytest.raises(IndexError, match="outside the vocabulary"):
        token_logprobs(torch.zeros(1, 4), torch.zeros(10, 4), torch.tensor([10]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_readout_equals_the_model_logits(get_adapter, texts, arch, backend) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    logits = adapter.forward(batch).float()
    last = f"resid_pre.{adapter.n_layers - 1}"
    final, cache, past = adapter.final_states(batch, sites=[last], keep_past=True)
    tokens = torch.randint(0, adapter.info.d_vocab, final.shape[:2], generator=torch.Generator())
    got = adapter.readout_logprobs(final, tokens)
    want = logits.log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    real = batch.attention_mask.bool()
    torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5)
    assert not got.requires_grad
    # The same keys and values as run_with_past.
    _, reference = adapter.run_with_past(batch)
    assert past is not None
    for mine, theirs in zip(
        past.keys + past.values, reference.keys + reference.values, strict=True
    ):
        torch.testing.assert_close(mine, theirs)
    # Starting at the last block from the cached residual stream gives the same outputs, with
    # and without a past to continue.
    begun, _, _ = adapter.final_states(batch, start=(adapter.n_layers - 1, cache[last]))
    torch.testing.assert_close(begun[real], final[real])
    more = adapter.batch([[5, 6, 7]] * batch.shape[0])
    whole, more_cache, _ = adapter.final_states(more, past=past, sites=["resid_pre.1"])
    begun, _, _ = adapter.final_states(more, past=past, start=(1, more_cache["resid_pre.1"]))
    torch.testing.assert_close(begun, whole)


def test_the_soft_cap_is_read(get_adapter) -> None:
    adapter = get_adapter("gemma3_text", "nnsight")
    state = torch.randn(2, 3, adapter.d_model) * 50
    tokens = torch.randint(0, adapter.info.d_vocab, (2, 3))
    old = adapter.info.logit_softcap
    try:
        object.__setattr__(adapter.info, "logit_softcap", 0.5)
        capped = adapter.readout_logprobs(state, tokens)
        lens = adapter.logit_lens(state).log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    finally:
        object.__setattr__(adapter.info, "logit_softcap", old)
    torch.testing.assert_close(capped, lens, rtol=1e-5, atol=1e-5)
    # Capped at 0.5, every log-probability is within 1 of log(1 / vocab).
    assert float((capped + torch.log(torch.tensor(adapter.info.d_vocab))).abs().max()) <= 1.0


def test_a_start_below_a_patch_is_refused(get_adapter, texts) -> None:
    from mlake_core.models import Patch

    adapter = get_adapter("llama", "tlens")
    batch = adapter.tokenize(list(texts[:1]))
    _, cache, _ = adapter.final_states(batch, sites=["resid_pre.1"])
    patch = Patch(
        "mlp_out.0", torch.tensor([0]), torch.tensor([0]), torch.zeros(1, adapter.d_model)
    )
    with pytest.raises(ValueError, match="below it"):
        adapter.final_states(batch, [patch], start=(1, cache["resid_pre.1"]))
    with pytest.raises(ValueError, match="resid must be"):
        adapter.final_states(batch, start=(1, cache["resid_pre.1"][:, :1]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_of_token_logprobs_equal_those_of_logits(get_adapter, texts, backend) -> None:
    adapter = get_adapter("gpt2", backend)
    batch = adapter.tokenize(list(texts[:2]))
    ids = torch.tensor([3, 9])
    site = "mlp_post.0"
    v1, g1 = adapter.gradients(
        batch,
        [site],
        lambda lg: lg.float().log_softmax(-1)[:, torch.arange(2), ids].sum(),
        keep_last=2,
    )
    v2, g2 = adapter.gradients(batch, [site], lambda lp: lp.sum(), tokens=ids)
    torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1[site], g2[site], rtol=1e-4, atol=1e-6)
    assert float(g2[site].abs().max()) > 0
