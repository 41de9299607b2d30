"""The logit lens (``adapter.logit_lens``): at the last layer it is the model's own output, on
every architecture and both backends; at earlier layers it decodes those layers' states."""

from __future__ import annotations

import pytest
import torch

from mlake_core.models import BACKENDS
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_the_lens_at_the_last_layer_is_the_model_output(get_adapter, texts, arch, backend) -> None:
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))
    last = f"resid_post.{adapter.n_layers - 1}"
    logits, cache = adapter.run_with_cache(batch, [last, "resid_post.0"])
    lens = adapter.logit_lens(cache[last])
    real = batch.attention_mask.bool()
    torch.testing.assert_close(lens[real], logits.float()[real], rtol=1e-4, atol=1e-4)
    # An earlier layer decodes to something else (the lens is not a copy of the output).
    early = adapter.logit_lens(cache["resid_post.0"])
    assert early.shape == lens.shape
    assert not torch.allclose(early[real], lens[real], atol=1e-3)


def test_the_soft_cap_is_applied(get_adapter) -> None:
    adapter = get_adapter("gemma3_text", "tlens")
    state = torch.randn(1, 2, adapter.d_model) * 50
    old = adapter.info.logit_softcap
    try:
        object.__setattr__(adapter.info, "logit_softcap", 0.5)
        capped = adapter.logit_lens(state)
    finally:
        object.__setattr__(adapter.info, "logit_softcap", old)
    assert float(capped.abs().max()) <= 0.5


@pytest.mark.parametrize("backend", BACKENDS)
def test_the_logit_scale_is_applied(get_adapter, texts, backend) -> None:
    """Cohere multiplies its logits by logit_scale: the lens and the log-prob readout do too."""
    from mlake_core.models.tiny import COHERE_LOGIT_SCALE

    adapter = get_adapter("cohere", backend)
    assert adapter.info.logit_scale == COHERE_LOGIT_SCALE != 1.0
    batch = adapter.tokenize(list(texts[:1]))
    last = f"resid_post.{adapter.n_layers - 1}"
    logits, cache = adapter.run_with_cache(batch, [last])
    state = cache[last][0, -1]
    with torch.no_grad():
        head = adapter.hf_module(adapter.spec.unembed)
        unscaled = head(adapter.hf_module(adapter.spec.final_norm)(state)).float()
    lens = adapter.logit_lens(state)
    torch.testing.assert_close(lens, COHERE_LOGIT_SCALE * unscaled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lens, logits[0, -1].float(), rtol=1e-4, atol=1e-4)
    tokens = torch.arange(5)
    readout = adapter.readout_logprobs(state.expand(5, -1), tokens)
    torch.testing.assert_close(readout, torch.log_softmax(lens, -1)[:5], rtol=1e-5, atol=1e-5)
    assert (readout - torch.log_softmax(unscaled, -1)[:5]).abs().max() > 1e-2
