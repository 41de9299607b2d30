"""Prompt batching for cached passes: prompts sharing a few-shot prefix run together, so the
prefix runs once per batch (no model needed)."""

from __future__ import annotations

from mlake_core.metrics.knowledge import MIN_SHARED_PREFIX, prompt_batches


def _prefix(start: int) -> list[int]:
    return list(range(start, start + MIN_SHARED_PREFIX + 4))


def test_groups_by_shared_prefix_not_by_length() -> None:
    # Two few-shot frames (question and cloze demonstrations) whose prompts interleave in
    # length: sorting by length alone would mix them and share no prefix in any batch.
    question, cloze = _prefix(100), _prefix(500)
    prompts = []
    for n in range(12):
        prompts.append([*question, *range(900, 900 + n % 5 + 1)])
        prompts.append([*cloze, *range(950, 950 + n % 4 + 1)])
    batches = prompt_batches(prompts, batch_size=8)
    assert sorted(i for b in batches for i in b) == list(range(len(prompts)))
    for batch in batches:
        heads = {tuple(prompts[i][:MIN_SHARED_PREFIX]) for i in batch}
        assert len(heads) == 1, batch
        lengths = [len(prompts[i]) for i in batch]
        assert lengths == sorted(lengths)
    assert all(len(b) <= 8 for b in batches)


def test_prompts_without_shared_prefix_are_pooled_by_length() -> None:
    prompts = [[7, k, *range(n)] for k, n in enumerate([5, 1, 9, 3, 2, 8])]
    batches = prompt_batches(prompts, batch_size=4)
    assert [[len(prompts[i]) for i in b] for b in batches] == [[3, 4, 5, 7], [10, 11]]


def test_small_groups_get_their_own_batches_and_single_prompts_are_pooled() -> None:
    # An edit's evaluation: a few prompts per language, each language its demonstrations.
    en = [[*_prefix(100), k] for k in range(3)]
    fr = [[*_prefix(300), 1], [*_prefix(300), 2, 3]]
    alone = [[5, 6], [9, 9, 9]]
    batches = prompt_batches([*en, *fr, *alone], batch_size=32)
    assert batches == [[0, 1, 2], [3, 4], [5, 6]]
