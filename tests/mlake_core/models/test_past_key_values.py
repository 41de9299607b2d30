"""Continuing a run from its keys and values (``run_with_past``, ``run_with_patches(past=)``).

Units: cropping and row selection of :class:`PastKeyValues`, and the HF inputs built for a
continued batch (mask prefixed, positions counted on).  On every tiny architecture x backend:
continuing a (padded, patched) run from any prefix gives the logits of the whole run, and
causal tracing with the prefix cache gives the numbers of tracing without it.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from analysis.tracing.causal import TraceConfig, trace_prompt
from mlake_core.models import BACKENDS, Patch, TokenBatch
from mlake_core.models.adapter import BaseAdapter, BosPolicy, ModelInfo, PastKeyValues
from mlake_core.models.sites import BLOOM, LLAMA
from mlake_core.models.tiny import TINY_ARCHITECTURES as ARCHS

ATOL = 1e-5  # float32 logits of order 1-10; observed differences ~1e-6


def _past(n: int = 3, pos: int = 5, n_layers: int = 2) -> PastKeyValues:
    def tensor(layer: int, kind: int) -> torch.Tensor:
        # value = 1000 * row + 100 * layer + 10 * kind + position
        rows = torch.arange(n).view(n, 1, 1, 1) * 1000
        positions = torch.arange(pos).view(1, 1, pos, 1)
        return (rows + positions + 100 * layer + 10 * kind).float().expand(n, 2, pos, 4)

    return PastKeyValues(
        tuple(tensor(layer, 0) for layer in range(n_layers)),
        tuple(tensor(layer, 1) for layer in range(n_layers)),
        torch.ones(n, pos, dtype=torch.long),
    )


# -- units ---------------------------------------------------------------------------------


def test_crop_keeps_the_first_positions_and_select_takes_rows_in_order() -> None:
    past = _past()
    cropped = past.crop(2)
    assert (cropped.length, cropped.n_rows) == (2, 3)
    assert cropped.keys[1][:, 0, :, 0].tolist() == [[100, 101], [1100, 1101], [2100, 2101]]
    assert cropped.values[0][2, 1, :, 3].tolist() == [2010, 2011]
    picked = cropped.select(torch.tensor([2, 0, 0]))
    assert picked.n_rows == 3
    assert picked.keys[0][:, 0, 0, 0].tolist() == [2000, 0, 0]
    assert picked.attention_mask.shape == (3, 2)
    assert past.crop(5).keys[0].shape == past.keys[0].shape


def test_past_key_values_reject_bad_shapes_and_crops() -> None:
    past = _past()
    with pytest.raises(ValueError, match="crop"):
        past.crop(0)
    with pytest.raises(ValueError, match="crop"):
        past.crop(6)
    with pytest.raises(ValueError, match="matching the mask"):
        PastKeyValues(past.keys, past.values, torch.ones(3, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="one key and one value"):
        PastKeyValues(past.keys, past.values[:1], past.attention_mask)
    with pytest.raises(NotImplementedError, match="DynamicCache"):
        PastKeyValues.from_hf(((past.keys[0], past.values[0]),), past.attention_mask)


def test_round_trip_through_a_hugging_face_cache_copies() -> None:
    past = _past()
    hf = past.to_hf()
    assert hf.get_seq_length() == 5
    back = PastKeyValues.from_hf(hf, past.attention_mask)
    for a, b in zip(past.keys + past.values, back.keys + back.values, strict=True):
        assert torch.equal(a, b)
    hf.layers[0].keys.zero_()  # the forward pass extends its own copy, never ours
    assert past.keys[0].abs().sum() > 0


def _adapter(spec, sliding_window: int | None = None) -> BaseAdapter:
    info = ModelInfo(
        model_id="unit",
        revision=None,
        commit_hash=None,
        architecture=spec.model_type,
        backend="none",
        dtype="float32",
        device="cpu",
        n_layers=2,
        d_model=8,
        d_mlp=16,
        d_vocab=10,
        parallel_attn_mlp=False,
        positional=spec.positional,
        bos=BosPolicy(None, None, False, False, False),
        sliding_window=sliding_window,
    )
    return BaseAdapter(SimpleNamespace(pad_token_id=0, eos_token_id=0), spec, info)


def test_continued_inputs_prefix_the_mask_and_count_positions_on() -> None:
    # Past: row 0 has 1 padding position then 2 real tokens; row 1 three real tokens.
    past = _past(n=2, pos=3)
    past = PastKeyValues(past.keys, past.values, torch.tensor([[0, 1, 1], [1, 1, 1]]))
    new = TokenBatch(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.long))
    inputs = _adapter(LLAMA)._model_inputs(new, last_only=True, past=past)
    assert inputs["attention_mask"].tolist() == [[0, 1, 1, 1, 1], [1, 1, 1, 1, 1]]
    assert inputs["position_ids"].tolist() == [[2, 3], [3, 4]]
    assert inputs["use_cache"] is True
    assert inputs["past_key_values"].get_seq_length() == 3
    plain = _adapter(LLAMA)._model_inputs(new)
    assert plain["use_cache"] is False and "past_key_values" not in plain
    assert plain["position_ids"].tolist() == [[0, 1], [0, 1]]
    # ALiBi (BLOOM) reads positions off the mask: no position_ids.
    assert "position_ids" not in _adapter(BLOOM)._model_inputs(new, past=past)


def test_left_aligned_moves_each_rows_real_positions_to_its_end() -> None:
    past = _past(n=2, pos=4)
    mask = torch.tensor([[1, 0, 1, 1], [0, 1, 1, 1]])  # row 0: padding between real tokens
    past = PastKeyValues(past.keys, past.values, mask)
    aligned = past.left_aligned()
    assert aligned.attention_mask.tolist() == [[0, 1, 1, 1], [0, 1, 1, 1]]
    # Row 0's real positions 0, 2, 3 keep their order, after its padding (position 1).
    assert aligned.keys[1][0, 0, :, 0].tolist() == [101, 100, 102, 103]
    assert aligned.values[0][1, 1, :, 0].tolist() == [1010, 1011, 1012, 1013]
    assert aligned.left_aligned() is aligned  # already left-aligned: unchanged


def test_sliding_window_continuations_are_checked_against_the_window() -> None:
    """Window 4: a continuation is exact when everything lies within the window, or when each
    row's real tokens are contiguous once the past is left-aligned; otherwise it is refused."""
    sliding = _adapter(LLAMA, sliding_window=4)
    base = _past(n=2, pos=3)

    def past(mask: list[list[int]]) -> PastKeyValues:
        return PastKeyValues(base.keys, base.values, torch.tensor(mask))

    right_padded = past([[1, 1, 0], [1, 1, 1]])
    one = TokenBatch(torch.tensor([[5], [6]]), torch.ones(2, 1, dtype=torch.long))
    two = TokenBatch(torch.tensor([[5, 6], [7, 8]]), torch.ones(2, 2, dtype=torch.long))
    gap = TokenBatch(torch.tensor([[0, 6], [7, 8]]), torch.tensor([[0, 1], [1, 1]]))
    # 3 + 1 positions fit the window: continued as is, padding between tokens or not.
    assert sliding._check_past(one, right_padded) is right_padded
    # 3 + 2 do not: the past is left-aligned, after which every row is contiguous.
    aligned = sliding._check_past(two, right_padded)
    assert aligned.attention_mask.tolist() == [[0, 1, 1], [1, 1, 1]]
    # A left-padded batch leaves padding between row 0's tokens over 5 > 4 positions ...
    with pytest.raises(NotImplementedError, match="sliding window"):
        sliding._check_past(gap, past([[1, 1, 1], [1, 1, 1]]))
    # ... which is fine when the row is short enough (past row 0 holds one real token).
    assert sliding._check_past(gap, past([[0, 0, 1], [1, 1, 1]])) is not None
    # Without sliding layers nothing is checked or moved.
    full = _adapter(LLAMA)
    assert full._check_past(gap, right_padded) is right_padded


# -- on every tiny architecture and backend --------------------------------------------------


def _noise(batch: TokenBatch, width: int, seed: int) -> Patch:
    """Noise on the embeddings of each row's first two real tokens."""
    n = batch.shape[0]
    first = batch.first_index
    rows = torch.arange(n).repeat_interleave(2)
    positions = torch.stack([first, first + 1], -1).reshape(-1)
    values = torch.randn(2 * n, width, generator=torch.Generator().manual_seed(seed))
    return Patch("embed", rows, positions, values)


def _shifted(patch: Patch, start: int, rows: torch.Tensor) -> Patch:
    """``patch`` for a batch of ``rows`` of the original holding its positions from
    ``start`` on (entries before ``start`` dropped)."""
    keep_rows, keep_pos, keep_val = [], [], []
    for new_row, old_row in enumerate(rows.tolist()):
        sel = (patch.rows == old_row) & (patch.positions >= start)
        keep_rows.append(torch.full((int(sel.sum()),), new_row))
        keep_pos.append(patch.positions[sel] - start)
        keep_val.append(patch.values[sel])
    return Patch(patch.site, torch.cat(keep_rows), torch.cat(keep_pos), torch.cat(keep_val))


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_continuing_from_any_prefix_equals_the_whole_run(arch, backend, get_adapter, texts):
    adapter = get_adapter(arch, backend)
    batch = adapter.tokenize(list(texts))  # left-padded: pasts with padding are exercised
    noise = _noise(batch, adapter.d_model, seed=0)
    whole = adapter.run_with_patches(batch, [noise])
    logits, past = adapter.run_with_past(batch, [noise])
    torch.testing.assert_close(logits, whole, atol=ATOL, rtol=0)
    assert past.length == batch.shape[1] and past.n_rows == batch.shape[0]
    assert len(past.keys) == adapter.n_layers
    last_only, _ = adapter.run_with_past(batch, [noise], last_only=True)
    torch.testing.assert_close(last_only[:, -1], whole[:, -1], atol=ATOL, rtol=0)

    # Continue rows (repeated and reordered) from every prefix, with a restoration patch at
    # the first continued token; compare with the whole run patched the same way.
    n_pos = batch.shape[1]
    rows = torch.tensor([3, 0, 3, 1])
    for start in range(1, n_pos):
        resid = Patch(
            "resid_post.0",
            torch.arange(len(rows)),
            torch.full((len(rows),), start),
            torch.linspace(-1, 1, len(rows) * adapter.d_model).reshape(len(rows), -1),
        )
        full_batch = TokenBatch(batch.input_ids[rows], batch.attention_mask[rows])
        expected = adapter.run_with_patches(
            full_batch, [_shifted(noise, 0, rows), resid], past=None
        )
        new = TokenBatch(batch.input_ids[rows, start:], batch.attention_mask[rows, start:])
        resid_new = Patch(resid.site, resid.rows, resid.positions - start, resid.values)
        got = adapter.run_with_patches(
            new,
            [_shifted(noise, start, rows), resid_new],
            past=past.crop(start).select(rows),
        )
        real = new.attention_mask.bool()
        torch.testing.assert_close(
            got[real], expected[:, start:][real], atol=ATOL, rtol=0, msg=f"start {start}"
        )


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("arch", ARCHS)
def test_tracing_with_the_prefix_cache_equals_tracing_without(arch, backend, get_adapter, texts):
    adapter = get_adapter(arch, backend)
    ids = adapter.encode(texts[0])
    subject = [1, 2]
    config = TraceConfig(n_samples=3)
    traces = {}
    for prefix_cache, max_rows in ((False, None), (True, None), (True, 4)):
        traces[prefix_cache, max_rows] = trace_prompt(
            adapter,
            ids,
            subject,
            7,
            TraceConfig(n_samples=3, max_rows=max_rows),
            torch.Generator().manual_seed(5),
            noise_std=1.0,
            prefix_cache=prefix_cache,
        )
    ref = traces[False, None]
    # Clean run, corrupted runs, then one pass per restored token (tokens from the subject's
    # first on) when every token's rows fit in a pass.
    n_restored = len(ids) - subject[0]
    assert traces[True, None].forward_passes == 2 + n_restored
    assert traces[True, 4].forward_passes > traces[True, None].forward_passes
    for trace in traces.values():
        assert trace.p_corrupt == pytest.approx(ref.p_corrupt, abs=1e-6)
        assert trace.p_clean == ref.p_clean
        for kind in config.kinds:
            np.testing.assert_allclose(trace.scores[kind], ref.scores[kind], atol=1e-6, rtol=0)
    # The noise does something (relative: the tiny Cohere's p is near 1/vocab, and moves ~2%).
    assert ref.p_clean != pytest.approx(ref.p_corrupt, rel=1e-2)
    # Restoring the last block's residual at the last token gives back the clean run.
    assert ref.scores["resid"][-1, -1] == pytest.approx(ref.p_clean, abs=1e-6)


# -- sliding-window layers (the tiny Gemma 3: window GEMMA3_SLIDING_WINDOW, layer 0 slides) ----


def _whole(adapter, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Logits of each sequence run alone, no cache: the reference."""
    return [adapter.forward(adapter.batch([seq]))[0] for seq in sequences]


def _split(adapter, sequences: list[list[int]], heads: list[int]):
    """Left-padded batches of each sequence's first ``heads[i]`` tokens and of the rest."""
    head = adapter.batch([seq[:k] for seq, k in zip(sequences, heads, strict=True)])
    tail = adapter.batch([seq[k:] for seq, k in zip(sequences, heads, strict=True)])
    return head, tail


def _assert_tail_logits(tail: TokenBatch, logits, sequences, heads, whole) -> None:
    for row, (seq, k) in enumerate(zip(sequences, heads, strict=True)):
        real = tail.attention_mask[row].bool()
        torch.testing.assert_close(logits[row, real], whole[row][k : len(seq)], atol=ATOL, rtol=0)


def test_the_tiny_gemma3_window_changes_long_sequences(get_hf, tiny_models, texts) -> None:
    """The tests below are not vacuous: the window changes positions past it (and only those)."""
    from transformers import AutoModelForCausalLM

    from mlake_core.models.tiny import GEMMA3_SLIDING_WINDOW as W

    hf = get_hf("gemma3_text")
    assert hf.config.layer_types[0] == "sliding_attention" and hf.config.sliding_window == W
    wide = AutoModelForCausalLM.from_pretrained(
        tiny_models["gemma3_text"], attn_implementation="eager", sliding_window=64
    ).eval()
    ids = torch.tensor([[1, *range(300, 310)]])
    with torch.no_grad():
        narrow_logits, wide_logits = hf(input_ids=ids).logits, wide(input_ids=ids).logits
    assert torch.equal(narrow_logits[0, :W], wide_logits[0, :W])
    assert (narrow_logits[0, W:] - wide_logits[0, W:]).abs().amax(-1).min() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_prefix_cache_within_the_window_equals_whole_runs(backend, get_adapter, texts):
    """Rows of different lengths, both halves left-padded (so padding lies between a row's
    past and its new tokens), all positions within the window: the cache is used and exact."""
    from mlake_core.models.tiny import GEMMA3_SLIDING_WINDOW as W

    adapter = get_adapter("gemma3_text", backend)
    assert adapter.info.sliding_window == W
    ids = [adapter.encode(t) for t in texts]
    sequences, heads = [ids[0][:5], ids[2][:3], ids[1][:4]], [2, 1, 2]
    head, tail = _split(adapter, sequences, heads)
    assert head.shape[1] + tail.shape[1] <= W
    assert not bool(tail.attention_mask.all())  # padding between tokens in row 1
    whole = _whole(adapter, sequences)
    _, past = adapter.run_with_past(head)
    logits, after = adapter.run_with_past(tail, past=past)
    _assert_tail_logits(tail, logits, sequences, heads, whole)
    torch.testing.assert_close(
        adapter.run_with_patches(tail, [], past=past), logits, atol=ATOL, rtol=0
    )
    # Continuing beyond the window: the past (padding between tokens) is left-aligned, the new
    # tokens are not padded, so the keys in every window are those of the whole sequence.
    more = [[300 + row, 310 + row] for row in range(len(sequences))]
    longer = [seq + extra for seq, extra in zip(sequences, more, strict=True)]
    new = adapter.batch(more)
    assert after.length + new.shape[1] > W
    logits, last = adapter.run_with_past(new, past=after)
    _assert_tail_logits(new, logits, longer, [len(s) for s in sequences], _whole(adapter, longer))
    assert last.attention_mask[1].tolist() == [0, 0, 1, 1, 1, 1, 1]


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_sliding_prefix_cache_beyond_the_window_is_refused_only_when_inexact(
    backend, get_adapter, texts
):
    from mlake_core.models.tiny import GEMMA3_SLIDING_WINDOW as W

    adapter = get_adapter("gemma3_text", backend)
    ids = [adapter.encode(t) for t in texts]
    # Row 1's last three tokens are left-padded after its three-token past: seven positions
    # between its first and last token, one of them padding, over a window of six.
    sequences, heads = [ids[3][:7], ids[1][:6]], [3, 3]
    head, tail = _split(adapter, sequences, heads)
    assert head.shape[1] + tail.shape[1] > W
    _, past = adapter.run_with_past(head)
    with pytest.raises(NotImplementedError, match="sliding window"):
        adapter.run_with_past(tail, past=past)
    with pytest.raises(NotImplementedError, match="sliding window"):
        adapter.run_with_patches(tail, [], past=past)
    # Right padding keeps every row's tokens contiguous: exact beyond the window too.
    tail = adapter.batch([seq[k:] for seq, k in zip(sequences, heads, strict=True)], "right")
    logits = adapter.run_with_patches(tail, [], past=past)
    _assert_tail_logits(tail, logits, sequences, heads, _whole(adapter, sequences))
