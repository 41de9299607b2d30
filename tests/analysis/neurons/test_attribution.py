"""Attribution methods against hand computations on the two-layer micro mlake-tiny (which
knows its facts): integrated gradients per neuron with plain Hugging Face hooks and autograd,
its completeness, attribution patching's formula for neurons and heads, both backends, chunked
passes; and the backends' agreement on every tiny architecture."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from analysis.neurons.activation import activation_stats
from analysis.neurons.attribution import (
    AttributionConfig,
    AttributionContext,
    AttributionPrompt,
    answer_probability,
    attribute_fact,
    attribution_patching,
    important_units,
    integrated_gradients,
)
from mlake_core.errors import ConfigError
from mlake_core.models import BACKENDS, Patch
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

pytestmark = pytest.mark.slow  # trains the micro model (session-cached)

NOISE_STD = 0.3  # any level will do: the hand computation draws the same noise


def _seq(prompt: AttributionPrompt) -> list[int]:
    return [*prompt.prompt_ids, *prompt.answer_ids[:-1]]


def _positions(prompt: AttributionPrompt, positions: str) -> list[int]:
    """The attributed positions: the one predicting the answer's first token, or every
    prompt token."""
    n = len(prompt.prompt_ids)
    return [n - 1] if positions == "last" else list(range(n))


def _p_hand(logits: torch.Tensor, prompt: AttributionPrompt) -> torch.Tensor:
    """p(answer) per row: the product of the answer tokens' teacher-forced probabilities."""
    start = len(prompt.prompt_ids) - 1
    probs = logits.double().softmax(-1)
    out = torch.ones(logits.shape[0], dtype=torch.float64)
    for i, token in enumerate(prompt.answer_ids):
        out = out * probs[:, start + i, token]
    return out


@pytest.fixture(scope="module")
def hf(micro_tiny: Path):
    """The plain Hugging Face micro model (float32, eval)."""
    model = AutoModelForCausalLM.from_pretrained(micro_tiny, attn_implementation="eager").eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="module")
def mean_activation(micro_adapters):
    """Per layer, each neuron's mean activation over some text (the ``mean`` baseline)."""
    adapter = micro_adapters["tlens"]
    texts = {
        "en": ["The capital of France is Paris.", "Q: who?\nA: me"],
        "zh": ["法国的首都是巴黎"],
    }
    mean = activation_stats(adapter, texts, batch_size=2).mean()
    return {layer: torch.as_tensor(mean[layer], dtype=torch.float32) for layer in range(2)}


def _context(seed: int = 0, mean=None) -> AttributionContext:
    return AttributionContext(torch.Generator().manual_seed(seed), NOISE_STD, mean)


def test_answer_probability_is_the_product_of_the_answer_tokens(micro_adapters, short_prompt):
    adapter = micro_adapters["tlens"]
    logits = adapter.forward(adapter.batch([_seq(short_prompt)] * 2))
    p = answer_probability(logits, short_prompt)
    assert p.shape == (2,)
    assert float(p[0]) == pytest.approx(float(_p_hand(logits, short_prompt)[0]), rel=1e-5)
    assert 0.05 < float(p[0]) < 1  # the micro model knows the answer: a meaningful scale


# -- integrated gradients ---------------------------------------------------------------------


def _hand_ig(hf, prompt, layer, positions, baseline, steps) -> np.ndarray:
    """Integrated gradients of one layer's neurons with plain HF hooks: the down-projection's
    input at ``positions`` moved along the path, autograd for the gradients."""
    ids = torch.tensor([_seq(prompt)])
    down = hf.model.layers[layer].mlp.down_proj
    clean = {}
    handle = down.register_forward_pre_hook(lambda m, args: clean.__setitem__("a", args[0]))
    with torch.no_grad():
        hf(ids)
    handle.remove()
    a = clean["a"][0, positions].double()
    b = baseline.double()[None].expand_as(a)
    total = torch.zeros_like(a)
    for k in range(1, steps + 1):
        point = (b + k / steps * (a - b)).float().requires_grad_(True)

        def put(m, args, point=point):
            x = args[0].clone()
            x[0, positions] = point
            return (x,)

        handle = down.register_forward_pre_hook(put)
        try:
            p = _p_hand(hf(ids).logits, prompt)[0]
            (grad,) = torch.autograd.grad(p, [point])
        finally:
            handle.remove()
        total += grad.double()
    return ((a - b) * total / steps).sum(0).numpy()


@pytest.mark.parametrize(
    "positions, baseline",
    [("last", "zero"), ("all", "mean")],
)
def test_integrated_gradients_per_neuron_by_hand(
    hf, micro_adapters, short_prompt, mean_activation, positions, baseline
):
    cfg = AttributionConfig(steps=4, positions=positions, baseline=baseline)
    got = integrated_gradients(
        micro_adapters["tlens"], short_prompt, cfg, _context(0, mean_activation)
    )
    assert got.method == "ig" and got.layers == (0, 1)
    assert got.scores["neuron"].shape == (2, 128)
    pos = _positions(short_prompt, positions)
    for layer in (0, 1):
        base = mean_activation[layer] if baseline == "mean" else torch.zeros(128)
        want = _hand_ig(hf, short_prompt, layer, pos, base, steps=4)
        assert np.abs(want).max() > 1e-3
        np.testing.assert_allclose(got.scores["neuron"][layer], want, atol=2e-6, rtol=1e-4)


def _p_at_baseline(adapter, prompt, layer, positions, values) -> float:
    n = len(positions)
    patch = Patch(
        f"mlp_post.{layer}",
        torch.zeros(n, dtype=torch.long),
        torch.tensor(positions),
        values[None].expand(n, -1).clone(),
    )
    logits = adapter.run_with_patches(adapter.batch([_seq(prompt)]), [patch])
    return float(answer_probability(logits, prompt)[0])


@pytest.mark.parametrize("positions", ["last", "all"])
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_integrated_gradients_completeness(
    micro_adapters, short_prompt, mean_activation, baseline, positions
):
    """A layer's attributions sum to p(answer) - p(answer with that layer's neurons at the
    baseline).  The method is a right Riemann sum (error ~ 1/steps): 300 steps come within
    1%, and the Richardson extrapolation of 100 and 300 steps within 1e-4."""
    adapter = micro_adapters["tlens"]
    context = _context(0, mean_activation)
    runs = {
        steps: integrated_gradients(
            adapter,
            short_prompt,
            AttributionConfig(steps=steps, baseline=baseline, positions=positions),
            context,
        )
        for steps in (100, 300)
    }
    p = runs[300].p_answer
    assert p == pytest.approx(runs[100].p_answer, abs=1e-7)
    pos = _positions(short_prompt, positions)
    for layer in (0, 1):
        base = mean_activation[layer] if baseline == "mean" else torch.zeros(adapter.d_mlp)
        delta = p - _p_at_baseline(adapter, short_prompt, layer, pos, base)
        assert abs(delta) > 0.01  # a real change to account for
        s100, s300 = (runs[m].scores["neuron"][layer].sum() for m in (100, 300))
        assert s300 == pytest.approx(delta, rel=0.01)
        assert (300 * s300 - 100 * s100) / 200 == pytest.approx(delta, abs=1e-4)


def test_integrated_gradients_chunks_layers_and_bad_input(micro_adapters, short_prompt):
    adapter = micro_adapters["tlens"]
    cfg = AttributionConfig(steps=5)
    whole = integrated_gradients(adapter, short_prompt, cfg, _context())
    chunked = integrated_gradients(
        adapter, short_prompt, AttributionConfig(steps=5, max_rows=3), _context()
    )
    # 10 rows (2 layers x 5 steps): one chunk, or four of at most 3 rows; each chunk is a
    # forward and a backward pass.
    assert chunked.passes - whole.passes == 2 * 3
    np.testing.assert_allclose(
        chunked.scores["neuron"], whole.scores["neuron"], atol=1e-7, rtol=1e-5
    )
    # One candidate layer: the same numbers there, zeros elsewhere, half the rows.
    one = integrated_gradients(
        adapter, short_prompt, AttributionConfig(steps=5, layers="1"), _context()
    )
    assert one.layers == (1,) and not one.scores["neuron"][0].any()
    np.testing.assert_allclose(
        one.scores["neuron"][1], whole.scores["neuron"][1], atol=1e-7, rtol=1e-5
    )
    with pytest.raises(ConfigError, match="--baseline mean needs"):
        integrated_gradients(adapter, short_prompt, AttributionConfig(baseline="mean"), _context())
    with pytest.raises(ConfigError, match="--layers 2"):
        integrated_gradients(adapter, short_prompt, AttributionConfig(layers="2"), _context())


# -- attribution patching ---------------------------------------------------------------------


def _hand_atp(hf, prompt, positions, samples, noise_scale, seed):
    """(a_clean - mean a_corrupt) . grad for neurons and heads, with plain HF hooks."""
    layers = hf.model.layers
    ids = torch.tensor([_seq(prompt)])
    subject = list(prompt.subject_positions)
    modules = {
        (unit, layer): (
            layers[layer].mlp.down_proj if unit == "neuron" else layers[layer].self_attn.o_proj
        )
        for unit in ("neuron", "head")
        for layer in range(len(layers))
    }

    def capture(store):
        return [
            m.register_forward_pre_hook(lambda mod, args, key=key: store.__setitem__(key, args[0]))
            for key, m in modules.items()
        ]

    clean: dict = {}
    embed: dict = {}
    handles = capture(clean)
    handles.append(
        hf.model.embed_tokens.register_forward_hook(lambda m, i, o: embed.__setitem__("e", o))
    )
    with torch.enable_grad():
        hf.model.embed_tokens.weight.requires_grad_(True)  # a graph to differentiate
        try:
            p = _p_hand(hf(ids).logits, prompt)[0]
            keys = list(clean)
            grads = dict(zip(keys, torch.autograd.grad(p, [clean[k] for k in keys]), strict=True))
        finally:
            hf.model.embed_tokens.weight.requires_grad_(False)
            for h in handles:
                h.remove()
    # The corrupted run: the same noise, drawn the same way, one sample per row.
    base = embed["e"][0, subject].detach()
    noise = torch.randn(
        samples, len(subject), base.shape[-1], generator=torch.Generator().manual_seed(seed)
    )
    values = base[None] + noise_scale * NOISE_STD * noise

    def corrupt(m, i, o):
        o = o.clone()
        o[:, subject] = values
        return o

    corrupted: dict = {}
    handles = capture(corrupted)
    handles.append(hf.model.embed_tokens.register_forward_hook(corrupt))
    with torch.no_grad():
        hf(ids.repeat(samples, 1))
    for h in handles:
        h.remove()
    n_heads = hf.config.num_attention_heads
    out = {}
    for (unit, layer), g in grads.items():
        diff = clean[unit, layer][0, positions].detach() - corrupted[unit, layer][
            :, positions
        ].mean(0)
        attr = (diff * g[0, positions]).sum(0)
        if unit == "head":
            attr = attr.reshape(n_heads, -1).sum(-1)
        out[unit, layer] = attr.double().numpy()
    return float(p.detach()), out


@pytest.mark.parametrize("positions", ["last", "all"])
def test_attribution_patching_by_hand(hf, micro_adapters, micro_prompts, positions):
    prompt = micro_prompts[min(micro_prompts)]  # a question prompt, subject inside
    cfg = AttributionConfig(positions=positions, samples=3, noise_scale=2.0)
    got = attribution_patching(micro_adapters["tlens"], prompt, cfg, _context(seed=11))
    assert got.method == "atp" and got.passes == 3
    assert got.scores["neuron"].shape == (2, 128) and got.scores["head"].shape == (2, 2)
    p, want = _hand_atp(hf, prompt, _positions(prompt, positions), 3, 2.0, seed=11)
    assert got.p_answer == pytest.approx(p, rel=1e-5)
    for (unit, layer), w in want.items():
        assert np.abs(w).max() > 1e-4, (unit, layer)
        np.testing.assert_allclose(got.scores[unit][layer], w, atol=1e-6, rtol=1e-4)
    # Another seed is other noise, hence other scores.
    other = attribution_patching(micro_adapters["tlens"], prompt, cfg, _context(seed=12))
    assert not np.allclose(other.scores["neuron"], got.scores["neuron"], atol=1e-6)


def test_attribution_patching_needs_the_noise_level(micro_adapters, short_prompt):
    context = AttributionContext(torch.Generator(), noise_std=0.0)
    with pytest.raises(ConfigError, match="noise level"):
        attribution_patching(micro_adapters["tlens"], short_prompt, AttributionConfig(), context)


# -- both backends ----------------------------------------------------------------------------


def test_backends_agree_on_the_micro_model(micro_adapters, micro_prompts, mean_activation):
    prompt = micro_prompts[min(micro_prompts)]
    results = {}
    for backend in BACKENDS:
        adapter = micro_adapters[backend]
        results[backend] = (
            integrated_gradients(
                adapter,
                prompt,
                AttributionConfig(steps=6, baseline="mean", positions="all"),
                _context(0, mean_activation),
            ),
            attribution_patching(adapter, prompt, AttributionConfig(samples=2), _context(5)),
        )
    for ref, other in zip(results["tlens"], results["nnsight"], strict=True):
        assert other.p_answer == pytest.approx(ref.p_answer, abs=1e-6)
        for unit, scores in ref.scores.items():
            assert np.abs(scores).max() > 1e-3
            np.testing.assert_allclose(other.scores[unit], scores, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_backends_agree_on_every_architecture(arch, get_adapter):
    """The random tiny models give tiny probabilities: the agreement is relative."""
    tl, nn = get_adapter(arch, "tlens"), get_adapter(arch, "nnsight")
    ids = tuple(tl.encode("The capital of France is"))
    answer = tuple(tl.tokenizer(" Paris", add_special_tokens=False)["input_ids"])
    prompt = AttributionPrompt("tiny", ids, (len(ids) - 3, len(ids) - 2), answer)
    for method, cfg in (
        (integrated_gradients, AttributionConfig(steps=3, positions="all")),
        (attribution_patching, AttributionConfig(samples=2)),
    ):
        a = method(tl, prompt, cfg, _context(3))
        b = method(nn, prompt, cfg, _context(3))
        assert b.p_answer == pytest.approx(a.p_answer, rel=1e-4)
        for unit, scores in a.scores.items():
            scale = np.abs(scores).max()
            assert scale > 0
            assert np.abs(b.scores[unit] - scores).max() <= 1e-4 * scale, (method.__name__, unit)


# -- a fact's prompts -------------------------------------------------------------------------


def test_attribute_fact_on_question_and_cloze(micro_adapters, micro_prompts):
    adapter = micro_adapters["tlens"]
    fact = next(k for k in sorted(micro_prompts) if (k[0], k[1], "cloze") in micro_prompts)
    prompts = [(form, micro_prompts[fact[0], fact[1], form]) for form in ("question", "cloze")]
    cfg = AttributionConfig(samples=2, agreement=0.7)
    fa = attribute_fact(adapter, "atp", prompts, cfg, _context(1))
    assert fa.forms == ["question", "cloze"] and fa.passes == 6
    # The same as attributing each prompt in turn with the same noise generator.
    context = _context(1)
    singles = [attribution_patching(adapter, prompt, cfg, context) for _, prompt in prompts]
    assert fa.p_answer == [s.p_answer for s in singles]
    for unit in ("neuron", "head"):
        assert np.array_equal(fa.scores[unit], np.stack([s.scores[unit] for s in singles]))
    for unit in ("neuron", "head"):
        sets = [set(important_units(s, cfg).tolist()) for s in fa.scores[unit]]
        assert set(fa.sets[unit].tolist()) == sets[0] & sets[1]
    assert len(fa.sets["neuron"]) > 0


# -- activation statistics --------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_activation_stats_stream_what_single_texts_give(arch, get_adapter):
    """Counts and sums over real tokens only (padding excluded), the same for any batch size,
    and the first ``max_tokens`` tokens of a language in document order."""
    from mlake_core.errors import ConfigError

    adapter = get_adapter(arch, "tlens")
    texts = {
        "en": ["The capital of France is Paris.", "Hi", "", "The Eiffel Tower is in Paris."],
        "zh": ["法国的首都是巴黎。", "巴黎"],
    }
    limit = len(adapter.encode(texts["en"][0])) + 1  # the first text and one token of "Hi"

    def by_hand(docs, max_tokens):
        positive = np.zeros((2, adapter.d_mlp), dtype=np.int64)
        total = np.zeros((2, adapter.d_mlp))
        n = n_texts = 0
        for doc in docs:
            ids = adapter.encode(doc)[: max_tokens - n] if doc.strip() else []
            if not ids:
                continue
            n += len(ids)
            n_texts += 1
            _, cache = adapter.run_with_cache(adapter.batch([ids]), ["mlp_post.0", "mlp_post.1"])
            for layer in (0, 1):
                acts = cache[f"mlp_post.{layer}"][0].double()
                positive[layer] += (acts > 0).sum(0).numpy()
                total[layer] += acts.sum(0).numpy()
        return n, n_texts, positive, total

    for max_tokens in (10_000, limit):
        runs = [
            activation_stats(adapter, texts, max_tokens=max_tokens, batch_size=b) for b in (1, 3)
        ]
        for i, lang in enumerate(texts):
            n, n_texts, positive, total = by_hand(texts[lang], max_tokens)
            for stats in runs:
                assert stats.langs == ("en", "zh")
                assert (int(stats.n_tokens[i]), int(stats.n_texts[i])) == (n, n_texts)
                assert np.array_equal(stats.positive[i], positive)
                np.testing.assert_allclose(stats.total[i], total, atol=1e-4, rtol=1e-5)
    assert (int(runs[0].n_tokens[0]), int(runs[0].n_texts[0])) == (limit, 2)  # "Hi" cut short
    with pytest.raises(ConfigError, match="no text in zh"):
        activation_stats(adapter, {"en": ["Hi"], "zh": ["", "  "]})
