"""Causal tracing: the batched tracer against a by-hand computation with plain Hugging Face
hooks on the two-layer micro mlake-tiny, across chunk sizes and both backends, plus its units
and bad inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from analysis.tracing.causal import (
    POSITION_CLASSES,
    TraceConfig,
    _noise_patch,
    class_profile,
    embedding_noise_std,
    position_classes,
    profile_similarity,
    rows_per_pass,
    trace_prompt,
    window_layers,
)
from mlake_core.editing.base import locate_prompt
from mlake_core.errors import ConfigError
from mlake_core.models import load_adapter
from mlake_core.models.mlake_tiny import read_metadata
from mlake_core.models.prompting import get_template

QA = get_template("qa")


# -- units ---------------------------------------------------------------------------------


def test_window_layers_clip_at_the_ends():
    assert window_layers(0, 10, 48) == list(range(0, 5))
    assert window_layers(20, 10, 48) == list(range(15, 25))
    assert window_layers(47, 10, 48) == list(range(42, 48))
    assert window_layers(1, 1, 4) == [1]
    assert window_layers(2, 3, 4) == [1, 2, 3]


def test_default_window_scales_with_depth():
    cfg = TraceConfig()
    assert cfg.resolved_window(48) == 10
    assert cfg.resolved_window(12) == 3
    assert cfg.resolved_window(4) == 1
    assert cfg.resolved_window(2) == 1
    assert TraceConfig(window=5).resolved_window(4) == 5


def test_position_classes():
    # BOS, "Q", ":", subject x3, after, later, later, last
    classes = position_classes(10, [3, 4, 5])
    assert classes == [
        "before_subject",
        "before_subject",
        "before_subject",
        "first_subject",
        "middle_subject",
        "last_subject",
        "first_after",
        "later",
        "later",
        "last",
    ]
    # a one-token subject is its last token; a subject ending just before the last token
    assert position_classes(4, [1]) == ["before_subject", "last_subject", "first_after", "last"]
    assert position_classes(3, [1]) == ["before_subject", "last_subject", "last"]


def test_noise_patch_keeps_the_subject_tokens_from_the_rows_start_on():
    # 2 samples, a 3-token subject at prompt positions 3..5, d_model 4
    corrupted = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    subject = [3, 4, 5]
    (whole,) = _noise_patch(subject, corrupted, n_cells=1)
    assert whole.rows.tolist() == [0, 0, 0, 1, 1, 1]
    assert whole.positions.tolist() == [3, 4, 5, 3, 4, 5]
    assert torch.equal(whole.values, corrupted.reshape(6, 4))
    # Rows (cell, sample) holding the prompt from token 4 on: subject tokens 4 and 5 at
    # positions 0 and 1, each row with its sample's noise.
    (suffix,) = _noise_patch(subject, corrupted, n_cells=2, start=4)
    assert suffix.rows.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    assert suffix.positions.tolist() == [0, 1] * 4
    sample = [0, 0, 1, 1, 0, 0, 1, 1]
    token = [1, 2] * 4
    for i in range(8):
        assert torch.equal(suffix.values[i], corrupted[sample[i], token[i]])
    assert _noise_patch(subject, corrupted, n_cells=2, start=6) == []


def test_rows_per_pass_counts_the_cached_prefix():
    from types import SimpleNamespace

    from analysis.tracing.causal import CPU_PASS_BYTES, tracing_row_bytes

    adapter = SimpleNamespace(
        dtype=torch.float32,
        d_model=256,
        d_mlp=1024,
        n_layers=4,
        device=torch.device("cpu"),
        info=SimpleNamespace(d_vocab=8000, n_heads=4, d_head=64),
    )
    # A row continuing a cached prefix holds its copy of the prefix's keys and values and the
    # extended cache, in every block it runs (ISSUE 23 section 2: once only the activations).
    plain = tracing_row_bytes(adapter, 1)
    cached = tracing_row_bytes(adapter, 1, past_tokens=9)
    assert cached - plain >= 4 * 2 * 256 * 4 * (9 + 10)  # float32, keys+values, 4 blocks
    assert tracing_row_bytes(adapter, 1, 9, layer=2) < cached  # blocks 0-1 do not run
    # A pass of the chosen rows stays within the CPU budget, whatever the prefix.
    for past in (0, 3, 9):
        rows = rows_per_pass(adapter, 10, past_tokens=past)
        assert rows * tracing_row_bytes(adapter, 10 - past, past) <= CPU_PASS_BYTES
    # The planner's worst case (past_tokens=None) is the fewest rows over every prefix.
    worst = rows_per_pass(adapter, 10)
    assert worst == min(rows_per_pass(adapter, 10, past_tokens=p) for p in range(10))
    assert rows_per_pass(adapter, 10, past_tokens=9) >= worst >= 1
    assert rows_per_pass(adapter, 500, past_tokens=490) < rows_per_pass(adapter, 20, past_tokens=10)


def test_profile_similarity():
    a = np.array([[0.0, 1.0, 2.0], [np.nan, 3.0, 4.0]])
    assert profile_similarity(a, 2 * a + 1) == pytest.approx(1.0)
    assert profile_similarity(a, -a) == pytest.approx(-1.0)
    assert np.isnan(profile_similarity(a, np.zeros_like(a)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"kinds": "resid,neurons"}, "--kinds"),
        ({"form": "mcqa"}, "--form"),
        ({"corruption": "blur"}, "--corruption"),
        ({"n_samples": 0}, "--samples"),
        ({"noise_scale": 0.0}, "--noise-scale"),
        ({"window": 0}, "--window"),
    ],
)
def test_bad_config(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        TraceConfig(**kwargs)


# -- on the micro mlake-tiny -----------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(micro_tiny: Path):
    return {
        backend: load_adapter(str(micro_tiny), backend, device="cpu")
        for backend in ("tlens", "nnsight")
    }


@pytest.fixture(scope="module")
def prompt(adapters, micro_tiny: Path, mlake_v2411):
    meta = read_metadata(micro_tiny)
    assert meta is not None
    view = mlake_v2411.fact(meta["fact_ids"][0]).views["en"]
    loc = locate_prompt(adapters["tlens"], view, QA)
    answer = adapters["tlens"].tokenizer(
        loc.answer_prefix + view.record.o_answer, add_special_tokens=False
    )["input_ids"][0]
    return list(loc.prompt_ids), list(loc.subject_positions), int(answer)


def _by_hand(model_dir: Path, ids, subject, answer, corrupted, restore):
    """p(answer) averaged over the corrupted samples, with ``restore`` = [(module kind, layer,
    token)] set to their clean values, using nothing but HF forward hooks."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    layers = model.model.layers

    def module(kind, layer):
        return {"resid": layers[layer], "mlp": layers[layer].mlp, "attn": layers[layer].self_attn}[
            kind
        ]

    def first(out):
        return out[0] if isinstance(out, tuple) else out

    clean: dict = {}
    hooks = []
    for kind, layer, _ in restore:
        hooks.append(
            module(kind, layer).register_forward_hook(
                lambda m, i, o, key=(kind, layer): clean.__setitem__(key, first(o).detach().clone())
            )
        )
    x = torch.tensor([ids])
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    probs = []
    for sample in corrupted:

        def embed_hook(m, i, o, sample=sample):
            o = o.clone()
            o[0, subject] = sample
            return o

        hooks = [model.model.embed_tokens.register_forward_hook(embed_hook)]
        for kind, layer, t in restore:

            def put(m, i, o, key=(kind, layer), t=t):
                h = first(o).clone()
                h[0, t] = clean[key][0, t]
                return (h, *o[1:]) if isinstance(o, tuple) else h

            hooks.append(module(kind, layer).register_forward_hook(put))
        with torch.no_grad():
            logits = model(x).logits
        for h in hooks:
            h.remove()
        probs.append(float(logits[0, -1].softmax(-1)[answer]))
    return float(np.mean(probs))


@pytest.mark.slow
def test_indirect_effects_match_a_by_hand_computation(adapters, prompt, micro_tiny):
    ids, subject, answer = prompt
    adapter = adapters["tlens"]
    config = TraceConfig(n_samples=3, window=2)
    std = embedding_noise_std(adapter, [(ids, subject)])
    trace = trace_prompt(
        adapter, ids, subject, answer, config, torch.Generator().manual_seed(7), noise_std=std
    )
    # The same noise, drawn the same way.
    _, cache = adapter.run_with_cache(adapter.batch([ids]), ["embed"])
    base = cache["embed"][0, subject]
    noise = torch.randn(3, len(subject), base.shape[-1], generator=torch.Generator().manual_seed(7))
    corrupted = base[None] + config.noise_scale * std * noise

    last, s_last, n = len(ids) - 1, subject[-1], adapter.n_layers
    p_corrupt = _by_hand(micro_tiny, ids, subject, answer, corrupted, [])
    assert trace.p_corrupt == pytest.approx(p_corrupt, abs=1e-5)
    cases = [
        ("resid", s_last, 0, [("resid", 0, s_last)]),
        ("resid", last, 1, [("resid", 1, last)]),
        # window 2 around layer 1 of 2 layers: layers 0 and 1
        ("mlp", s_last, 1, [("mlp", 0, s_last), ("mlp", 1, s_last)]),
        ("attn", last, 0, [("attn", 0, last)]),
    ]
    for kind, t, layer, restore in cases:
        expected = _by_hand(micro_tiny, ids, subject, answer, corrupted, restore)
        assert trace.scores[kind][t, layer] == pytest.approx(expected, abs=1e-5), (kind, t, layer)
    # The clean residual at the last token after the last layer gives the clean probability.
    assert trace.scores["resid"][last, n - 1] == pytest.approx(trace.p_clean, abs=1e-5)
    # Tokens before the subject are not affected by the corruption: zero effect.
    assert np.allclose(trace.effects("resid")[: subject[0]], 0.0)
    assert trace.p_clean > trace.p_corrupt  # the micro model knows its fact


@pytest.mark.slow
def test_chunking_and_backends_give_the_same_numbers(adapters, prompt):
    ids, subject, answer = prompt
    std = embedding_noise_std(adapters["tlens"], [(ids, subject)])
    results = {}
    runs = (("tlens", None, True), ("tlens", 7, True), ("nnsight", None, True))
    runs += (("tlens", None, False), ("tlens", 7, False), ("nnsight", None, False))
    for backend, max_rows, prefix_cache in runs:
        config = TraceConfig(n_samples=4, max_rows=max_rows)
        results[(backend, max_rows, prefix_cache)] = trace_prompt(
            adapters[backend],
            ids,
            subject,
            answer,
            config,
            torch.Generator().manual_seed(3),
            noise_std=std,
            prefix_cache=prefix_cache,
        )
    ref = results[("tlens", None, True)]
    assert results[("tlens", 7, True)].forward_passes > ref.forward_passes
    # With the prefix cache: the clean run, the corrupted runs, then one pass per token from
    # the subject's first on (all of a token's rows fit in one pass).
    assert ref.forward_passes == 2 + len(ids) - subject[0]
    for other in results.values():
        assert other.p_corrupt == pytest.approx(ref.p_corrupt, abs=1e-6)
        for kind in ref.scores:
            assert np.allclose(other.scores[kind], ref.scores[kind], atol=1e-6)
    # Seeded: the same seed gives the same numbers, another seed other noise.
    again = trace_prompt(
        adapters["tlens"],
        ids,
        subject,
        answer,
        TraceConfig(n_samples=4),
        torch.Generator().manual_seed(4),
        noise_std=std,
    )
    assert again.p_corrupt != pytest.approx(ref.p_corrupt, abs=1e-9)


@pytest.mark.slow
def test_class_profile_and_subject_corruption(adapters, prompt):
    ids, subject, answer = prompt
    adapter = adapters["tlens"]
    others = [torch.randn(2, adapter.d_model) * 0.05 for _ in range(3)]
    trace = trace_prompt(
        adapter,
        ids,
        subject,
        answer,
        TraceConfig(n_samples=3, corruption="subject"),
        torch.Generator().manual_seed(0),
        noise_std=1.0,
        swap_embeddings=others,
    )
    profile = class_profile(trace, "mlp")
    assert profile.shape == (len(POSITION_CLASSES), adapter.n_layers)
    last = POSITION_CLASSES.index("last")
    assert np.allclose(profile[last], trace.effects("mlp")[-1])
    with pytest.raises(ConfigError, match="other subjects"):
        trace_prompt(
            adapter,
            ids,
            subject,
            answer,
            TraceConfig(n_samples=5, corruption="subject"),
            torch.Generator(),
            noise_std=1.0,
            swap_embeddings=others,
        )
    with pytest.raises(ConfigError, match="outside a prompt"):
        trace_prompt(
            adapter, ids, [len(ids) + 3], answer, TraceConfig(), torch.Generator(), noise_std=1.0
        )


@pytest.mark.slow
def test_batched_subject_embeddings_match_single_prompts(adapters, micro_tiny, mlake_v2411):
    from analysis.tracing.causal import subject_embeddings

    adapter = adapters["tlens"]
    meta = read_metadata(micro_tiny)
    assert meta is not None
    prompts = []
    for fact_id in meta["fact_ids"][:3]:
        for lang in ("en", "zh"):
            loc = locate_prompt(adapter, mlake_v2411.fact(fact_id).views[lang], QA)
            prompts.append((list(loc.prompt_ids), list(loc.subject_positions)))
    assert len({len(ids) for ids, _ in prompts}) > 1  # padding is exercised
    batched = subject_embeddings(adapter, prompts, batch_size=4)
    for (ids, positions), got in zip(prompts, batched, strict=True):
        _, cache = adapter.run_with_cache(adapter.batch([ids]), ["embed"])
        assert torch.equal(got, cache["embed"][0, positions].cpu())
    values = torch.cat([e.double() for e in batched])
    assert embedding_noise_std(adapter, prompts) == pytest.approx(float(values.std()))
