"""A fact's tracing heatmap leaves out the tokens far before the subject (a few-shot prompt's
demonstrations), whose restoration has no effect by construction, and says so."""

from __future__ import annotations

import numpy as np

from analysis.tracing.causal import FactTrace
from figures.tracing import SHOWN_BEFORE_SUBJECT, trace_heatmap


def _trace(n_tokens: int, subject: list[int]) -> FactTrace:
    rng = np.random.default_rng(0)
    scores = {k: rng.uniform(0.1, 0.6, (n_tokens, 4)) for k in ("resid", "mlp", "attn")}
    for value in scores.values():
        value[: subject[0]] = 0.1  # before the subject: the corrupted probability
    return FactTrace(
        prompt_ids=list(range(n_tokens)),
        tokens=[f"t{i}" for i in range(n_tokens)],
        subject_positions=subject,
        answer_id=7,
        p_clean=0.6,
        p_corrupt=0.1,
        scores=scores,
        window=2,
    )


def test_tokens_far_before_the_subject_are_left_out_and_counted() -> None:
    trace = _trace(60, [50, 51, 52])
    fig = trace_heatmap(trace)
    first = 50 - SHOWN_BEFORE_SUBJECT
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels[0] == f"t{first}" and len(labels) == 60 - first
    assert labels[SHOWN_BEFORE_SUBJECT] == "t50 *"
    assert f"the {first} before it" in fig.axes[0].get_ylabel()
    # The image holds the rows shown, from `first` on.
    shown = fig.axes[0].images[0].get_array()
    assert shown.shape == (60 - first, 4)
    np.testing.assert_allclose(np.asarray(shown), trace.scores["resid"][first:])


def test_a_subject_near_the_start_shows_every_token() -> None:
    fig = trace_heatmap(_trace(12, [2, 3]))
    assert len(fig.axes[0].get_yticklabels()) == 12 and fig.axes[0].get_ylabel() == ""


def test_layer_ticks_thin_out_on_deep_models() -> None:
    from figures.style import layer_ticks

    assert layer_ticks(4) == [0, 1, 2, 3]
    assert layer_ticks(18) == list(range(0, 18, 2))
    assert layer_ticks(18, max_labels=6) == [0, 3, 6, 9, 12, 15]
    fig = trace_heatmap(_trace(60, [50, 51, 52]))
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["0", "1", "2", "3"]
