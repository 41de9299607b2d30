"""Scoring and greedy decoding that continue keys and values (``kv_cache``) give the results
of full runs, on every tiny architecture and backend.

``run_with_past(..., past=)`` continues a past and returns the whole past; ``last_only=k``
keeps the last ``k`` positions' logits.  :func:`score_sequences` runs each distinct prompt once
and a prefix shared by a batch once; :func:`greedy_generate` decodes a token per pass.  Models
whose cache cannot be continued fall back to full runs.
"""

from __future__ import annotations

import pytest
import torch

from mlake_core.metrics import knowledge
from mlake_core.metrics.knowledge import greedy_generate, score_sequences
from mlake_core.models import BACKENDS, TokenBatch
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

pytestmark = pytest.mark.slow

ATOL = 1e-4  # summed float32 log-probabilities of a few tokens; observed ~1e-6

#: An in-context edit's prefix (IKE): shared by many prompts, longer than MIN_SHARED_PREFIX.
SHARED = "New fact: The capital of France is Rome.\nQ: What is the capital of France?\nA: Rome\n\n"


def _prompts(adapter, texts) -> list[list[int]]:
    return [adapter.encode(SHARED + t) for t in texts] + [adapter.encode(t) for t in texts]


def _pairs(adapter, texts) -> list[tuple[list[int], list[int]]]:
    tok = adapter.tokenizer
    targets = [
        tok(" Paris", add_special_tokens=False)["input_ids"][:1],  # one token
        tok(" 巴黎 and Rome", add_special_tokens=False)["input_ids"],
        tok(" ローマ", add_special_tokens=False)["input_ids"],
    ]
    prompts = _prompts(adapter, texts)
    # Every prompt with every target: prompts repeat, targets of one and several tokens.
    return [(p, t) for p in prompts for t in targets]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_run_with_past_continues_a_past(arch, backend, get_adapter, texts) -> None:
    adapter = get_adapter(arch, backend)
    # Left padding: the first columns hold padding.
    batch = adapter.tokenize([SHARED[:20] + t for t in texts])
    whole, whole_past = adapter.run_with_past(batch)
    n_pos = batch.shape[1]
    first = int(batch.first_index.max()) + 1  # every row has a real token before the split
    assert first < n_pos - 1
    for split in (first, (first + n_pos) // 2, n_pos - 1):
        head = TokenBatch(batch.input_ids[:, :split], batch.attention_mask[:, :split])
        tail = TokenBatch(batch.input_ids[:, split:], batch.attention_mask[:, split:])
        _, past = adapter.run_with_past(head)
        logits, past = adapter.run_with_past(tail, last_only=2, past=past)
        keep = min(2, n_pos - split)
        assert logits.shape[1] == keep
        torch.testing.assert_close(logits, whole[:, -keep:], atol=1e-5, rtol=0)
        assert past.length == n_pos
        assert torch.equal(past.attention_mask.cpu(), batch.attention_mask.cpu())
        real = batch.attention_mask.bool()
        for got, expected in zip(past.keys, whole_past.keys, strict=True):
            torch.testing.assert_close(
                got.transpose(1, 2)[real], expected.transpose(1, 2)[real], atol=1e-5, rtol=0
            )
    with pytest.raises(ValueError, match="one past row per batch row"):
        adapter.run_with_past(batch, past=whole_past.select(torch.tensor([0])))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_scores_equal_full_runs(arch, backend, get_adapter, texts) -> None:
    adapter = get_adapter(arch, backend)
    pairs = _pairs(adapter, texts)
    full = score_sequences(adapter, pairs, batch_size=7, kv_cache=False)
    for batch_size in (1, 4, 64):
        cached = score_sequences(adapter, pairs, batch_size=batch_size, kv_cache=True)
        for i, (a, b) in enumerate(zip(cached, full, strict=True)):
            assert a.n_tokens == b.n_tokens == len(pairs[i][1])
            assert a.logp == pytest.approx(b.logp, abs=ATOL), f"pair {i}, batch {batch_size}"
    assert len({round(s.logp, 3) for s in full}) > len(pairs) // 2  # scores differ


class _WithEos:
    """A tokenizer whose EOS id is ``eos``; everything else is the wrapped tokenizer's."""

    def __init__(self, tokenizer, eos: int) -> None:
        self._tokenizer, self.eos_token_id = tokenizer, eos

    def __getattr__(self, name):
        return getattr(self._tokenizer, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_cached_generation_equals_full_runs(arch, backend, get_adapter, texts, monkeypatch) -> None:
    adapter = get_adapter(arch, backend)
    prompts = _prompts(adapter, texts)
    free = greedy_generate(adapter, prompts, max_new_tokens=7, stop=(), kv_cache=False)
    assert all(len(g) == 7 for g in free)  # random weights: no EOS by chance
    decode = adapter.tokenizer.decode
    # Stop strings taken from the rows' own output, so rows stop at different steps (row 0 at
    # its 2nd token, row 1 at its 4th, unless the text shows up earlier elsewhere) ...
    stops = [(), (decode(free[0][1:2]), decode(free[1][3:4]))]
    for stop in stops:
        for max_new in (1, 7):
            full = greedy_generate(
                adapter, prompts, max_new_tokens=max_new, stop=stop, batch_size=5, kv_cache=False
            )
            for batch_size in (1, 3, 64):
                cached = greedy_generate(
                    adapter, prompts, max_new_tokens=max_new, stop=stop, batch_size=batch_size
                )
                assert cached == full, (stop, max_new, batch_size)
            assert all(len(g) <= max_new for g in full)
    assert len({len(g) for g in full}) > 1 and len(full[0]) <= 2  # rows stopped apart
    # ... and EOS: make the EOS id the token row 2 generates third.
    eos = free[2][2]
    monkeypatch.setattr(adapter, "tokenizer", _WithEos(adapter.tokenizer, eos))
    full = greedy_generate(adapter, prompts, max_new_tokens=7, stop=(), kv_cache=False)
    assert len(full[2]) <= 2 and eos not in full[2]
    assert greedy_generate(adapter, prompts, max_new_tokens=7, stop=(), batch_size=3) == full


def _recording(adapter, monkeypatch) -> list[tuple[int, int, bool]]:
    """Record (rows, width, continues a past) of every ``run_with_past`` call."""
    calls: list[tuple[int, int, bool]] = []
    original = adapter.run_with_past

    def wrapper(batch, *args, **kwargs):
        calls.append((batch.shape[0], batch.shape[1], kwargs.get("past") is not None))
        return original(batch, *args, **kwargs)

    monkeypatch.setattr(adapter, "run_with_past", wrapper)
    return calls


def test_a_prefix_shared_by_the_batch_runs_once(get_adapter, texts, monkeypatch) -> None:
    adapter = get_adapter("llama", "tlens")
    prompts = [adapter.encode(SHARED + t) for t in texts]
    shared = knowledge._common_prefix_length(prompts)
    assert shared >= knowledge.MIN_SHARED_PREFIX
    pairs = [
        (p, adapter.tokenizer(" Rome", add_special_tokens=False)["input_ids"]) for p in prompts
    ]
    full = score_sequences(adapter, pairs, kv_cache=False)
    calls = _recording(adapter, monkeypatch)
    cached = score_sequences(adapter, pairs)
    # The shared prefix alone (one row), then every prompt's rest continuing it.
    assert calls[0] == (1, shared, False)
    assert calls[1][0] == len(prompts) and calls[1][2]
    assert calls[1][1] == max(len(p) for p in prompts) - shared
    for a, b in zip(cached, full, strict=True):
        assert a.logp == pytest.approx(b.logp, abs=ATOL)

    # Prompts sharing less than MIN_SHARED_PREFIX tokens run whole, each prompt once.
    calls.clear()
    plain = [(adapter.encode(t), target) for t in texts for _, target in pairs[:2]]
    score_sequences(adapter, plain)
    assert calls == [(len(texts), max(len(adapter.encode(t)) for t in texts), False)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_window_models_continue_within_the_window_and_fall_back_beyond(
    backend, get_adapter, texts, monkeypatch
) -> None:
    """Gemma 3 (tiny window of 6): prompts, then targets and decoding steps, continue the
    cache exactly past the window (no padding between a row's tokens); a shared prefix
    continued by left-padded rests would put padding between tokens over more than the window,
    so it is not split off (the prompts run whole, left-padded) and the cache stays in use;
    a continuation that is inexact anyway is refused and scoring falls back to full runs, with
    the same scores."""
    adapter = get_adapter("gemma3_text", backend)
    monkeypatch.setattr(adapter, "_no_kv_cache", False, raising=False)  # restored afterwards
    calls = _recording(adapter, monkeypatch)
    pairs = _pairs(adapter, texts)  # half share a prefix longer than the window
    full = score_sequences(adapter, pairs, kv_cache=False)
    cached = score_sequences(adapter, pairs)
    assert calls and not adapter._no_kv_cache  # the cache was used
    assert not any(continues for _, _, continues in calls)  # prompts run whole
    for a, b in zip(cached, full, strict=True):
        assert a.logp == pytest.approx(b.logp, abs=ATOL)
    # A past with padding between a row's tokens, over more than the window: refused, and
    # scoring falls back to full runs (remembered for the adapter).
    prompts = [adapter.encode(SHARED + t) for t in texts]
    assert knowledge._common_prefix_length(prompts) > adapter.info.sliding_window
    target = adapter.tokenizer(" Rome", add_special_tokens=False)["input_ids"]
    shared_pairs = [(p, target) for p in prompts]
    expected = score_sequences(adapter, shared_pairs, kv_cache=False)
    monkeypatch.setattr(knowledge, "_prompt_pass", _padded_between(adapter))
    scores = score_sequences(adapter, shared_pairs)
    assert adapter._no_kv_cache  # refused once, remembered
    for a, b in zip(scores, expected, strict=True):
        assert a.logp == pytest.approx(b.logp, abs=ATOL)


def _padded_between(adapter):
    """A prompt pass that continues a shared prefix with left-padded rests whatever the
    window (what :func:`knowledge._prompt_pass` did before it checked the window)."""

    def prompt_pass(adapter_, prompts):
        shared = min(knowledge._common_prefix_length(prompts), min(map(len, prompts)) - 1)
        _, one = adapter.run_with_past(adapter.batch([prompts[0][:shared]]), last_only=True)
        past = one.select(torch.zeros(len(prompts), dtype=torch.long))
        rests = adapter.batch([p[shared:] for p in prompts], padding_side="left")
        logits, past = adapter.run_with_past(rests, last_only=True, past=past)
        return logits[:, -1], past

    return prompt_pass


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_models_whose_cache_cannot_be_continued_fall_back(
    arch, get_adapter, texts, monkeypatch
) -> None:
    adapter = get_adapter(arch, "tlens")
    pairs = _pairs(adapter, texts)
    prompts = _prompts(adapter, texts)
    expected_scores = score_sequences(adapter, pairs)
    expected_text = greedy_generate(adapter, prompts, max_new_tokens=5, stop=())

    forwards: list[int] = []  # whole runs: scoring reads the last block's states
    original = adapter.final_states

    def counting(batch, *args, **kwargs):
        forwards.append(batch.shape[0])
        return original(batch, *args, **kwargs)

    tried: list[int] = []

    def refuse(*args, **kwargs):
        tried.append(1)
        raise NotImplementedError("a sliding-window cache")

    monkeypatch.setattr(adapter, "_no_kv_cache", False, raising=False)  # restored afterwards
    monkeypatch.setattr(adapter, "run_with_past", refuse)
    monkeypatch.setattr(adapter, "final_states", counting)
    done: list[int] = []
    scores = score_sequences(adapter, pairs, batch_size=8, progress=done.append)
    assert len(forwards) == -(-len(pairs) // 8)  # full runs, 8 sequences each
    assert sum(done) == len(pairs)  # progress counted once
    for a, b in zip(scores, expected_scores, strict=True):
        assert a.logp == pytest.approx(b.logp, abs=ATOL)
    assert greedy_generate(adapter, prompts, max_new_tokens=5, stop=()) == expected_text
    assert len(tried) == 1  # found once, remembered for the adapter


# -- sequences longer than the model is made for ------------------------------------------------


def test_max_positions_come_from_the_config_or_the_training(
    get_adapter, tiny_models, micro_tiny
) -> None:
    from transformers import AutoConfig

    from mlake_core.models import load_adapter
    from mlake_core.models.mlake_tiny import read_metadata

    for arch in ("gpt2", "llama"):
        config = AutoConfig.from_pretrained(tiny_models[arch])
        table = getattr(config, "n_positions", None) or config.max_position_embeddings
        assert get_adapter(arch, "tlens").info.max_positions == table
    tiny = load_adapter(str(micro_tiny), "tlens", device="cpu")
    meta = read_metadata(micro_tiny)
    assert meta is not None
    assert tiny.info.max_positions == meta["config"]["max_len"]


def test_too_long_sequences_fail_with_learned_positions_and_warn_otherwise(
    get_adapter, texts, monkeypatch
) -> None:
    import dataclasses

    from mlake_core.errors import ConfigError
    from mlake_core.models.adapter import LongSequenceWarning

    prompts = {arch: _prompts(get_adapter(arch, "tlens"), texts) for arch in ("gpt2", "llama")}
    longest = {arch: max(len(p) for p in ps) for arch, ps in prompts.items()}

    gpt2 = get_adapter("gpt2", "tlens")
    assert gpt2.info.positional == "learned"
    monkeypatch.setattr(gpt2, "info", dataclasses.replace(gpt2.info, max_positions=longest["gpt2"]))
    greedy_generate(gpt2, prompts["gpt2"], max_new_tokens=1, stop=())  # fits exactly
    with pytest.raises(ConfigError, match=f"longer than the {longest['gpt2']} positions"):
        greedy_generate(gpt2, prompts["gpt2"], max_new_tokens=3, stop=())  # continues past it
    with pytest.raises(ConfigError, match=r"ike\.n_demonstrations"):
        score_sequences(gpt2, [(max(prompts["gpt2"], key=len), [5, 6])])

    llama = get_adapter("llama", "tlens")
    assert llama.info.positional == "rotary"
    monkeypatch.setattr(
        llama, "info", dataclasses.replace(llama.info, max_positions=longest["llama"] - 1)
    )
    monkeypatch.setattr(llama, "_warned_length", False, raising=False)
    with pytest.warns(LongSequenceWarning, match="rotary positions run it") as caught:
        full = greedy_generate(llama, prompts["llama"], max_new_tokens=3, stop=())
        greedy_generate(llama, prompts["llama"], max_new_tokens=3, stop=())
    assert len([w for w in caught if w.category is LongSequenceWarning]) == 1  # once per model
    monkeypatch.setattr(llama, "info", dataclasses.replace(llama.info, max_positions=None))
    assert greedy_generate(llama, prompts["llama"], max_new_tokens=3, stop=()) == full
