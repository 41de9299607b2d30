"""The other datasets' own scorers (:mod:`mlake_core.metrics.paper_scores`), on hand-computed
cases: the papers' F1/EM, and teacher-forced argmax and token accuracy on a tiny random
GPT-2 whose argmax is read first."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mlake_core.metrics.paper_scores import (
    BMIKE53,
    REMAKE,
    f1_em,
    paper_scorer,
    teacher_forced_argmax,
    teacher_forced_scores,
)


def words(text: str) -> list[str]:
    return text.split()


def test_f1_is_precision_times_recall_of_tokens() -> None:
    # 2 shared words of 3 and 2: (2 * 2) / (3 * 2), not the harmonic F1 (0.8).
    f1, em = f1_em("the big cat", "big cat", words)
    assert f1 == pytest.approx(2 / 3) and em == 0.0
    assert f1_em("big cat", "big cat", words) == (1.0, 1.0)
    # A repeated token counts once per occurrence in both (multiset intersection).
    assert f1_em("cat cat", "cat", words)[0] == pytest.approx(1 * 1 / (2 * 1))
    assert f1_em("a b", "c", words) == (0.0, 0.0)
    # Empty: both empty is a match, one empty is not.
    assert f1_em("", "", words) == (1.0, 1.0)
    assert f1_em("", "cat", words) == (0.0, 0.0)
    # No normalisation: case and punctuation count.
    assert f1_em("Big cat.", "big cat", words) == (0.0, 0.0)


def test_scorers_are_registered_per_dataset() -> None:
    class Named:
        def __init__(self, version: str) -> None:
            self.version = version

    assert paper_scorer(Named("mzsre")) is REMAKE
    assert paper_scorer(Named("bmike53-zsre")) is BMIKE53
    # CounterFact and WikiFactDiff add BMIKE-53's perplexity comparison (icl.py's branches).
    cf, wfd = paper_scorer(Named("bmike53-counterfact")), paper_scorer(Named("bmike53-wfd"))
    assert cf is not None and wfd is not None and cf.name == wfd.name == "bmike53"
    assert cf.ppl == ("reliability", "generalization", "locality")
    assert wfd.ppl == ("reliability", "generalization") and BMIKE53.ppl == ()
    assert cf.key == "bmike53;locality=loc_ans;ppl=reliability,generalization,locality"
    assert paper_scorer(Named("v2024-11")) is None  # MLaKE: greedy alias match only
    assert "f2f9d5a" in REMAKE.source and "a9b7cac" in BMIKE53.source
    # ReMaKE's locality is the unedited model's answer kept; BMIKE-53's is loc_ans.
    assert (REMAKE.locality, BMIKE53.locality) == ("unedited", "loc_ans")
    assert REMAKE.key == "remake;locality=unedited"


@pytest.fixture(scope="module")
def adapter(tmp_path_factory):
    from mlake_core.models import load_adapter
    from mlake_core.models.tiny import TinySize, build_tiny_model

    folder = tmp_path_factory.mktemp("tiny") / "gpt2"
    return load_adapter(
        str(build_tiny_model("gpt2", folder, size=TinySize(n_ctx=64))), device="cpu"
    )


def _argmax_after(adapter, ids: list[int]) -> int:
    with torch.no_grad():
        return int(adapter.forward(adapter.batch([ids]))[0, -1].argmax())


def test_teacher_forced_argmax_is_the_models_next_token(adapter) -> None:
    prompt = adapter.encode("The capital of France is")
    # The model's own greedy continuation, read token by token: every token is the argmax.
    greedy: list[int] = []
    for _ in range(3):
        greedy.append(_argmax_after(adapter, prompt + greedy))
    other = (greedy[1] + 1) % adapter.tokenizer.vocab_size
    forced = [greedy[0], other, greedy[2]]
    got = teacher_forced_argmax(adapter, [(prompt, greedy), (prompt, forced)], batch_size=2)
    assert got[0] == greedy
    # Teacher forcing feeds the given token: after ``other`` the argmax is read afresh.
    expected = [greedy[0], greedy[1], _argmax_after(adapter, prompt + greedy[:1] + [other])]
    assert got[1] == expected
    # One sequence per pass gives the same (right padding does not change the reading).
    assert teacher_forced_argmax(adapter, [(prompt, forced)], batch_size=1) == [expected]

    text = adapter.tokenizer.decode(greedy)
    full, half = teacher_forced_scores(
        adapter, [(prompt, greedy, text), (prompt, forced, adapter.tokenizer.decode(forced))]
    )
    assert full.acc == 1.0 and full.em == 1.0 and full.f1 == 1.0
    assert full.text == text.strip()
    # Token accuracy: 2 of 3 forced tokens are the argmax when expected[2] == greedy[2], else
    # 1 of 3 (the middle token is never the argmax: it differs from greedy[1]).
    hits = 1 + int(expected[2] == forced[2])
    assert half.acc == pytest.approx(hits / 3)
    assert half.em == 0.0 and 0.0 <= half.f1 < 1.0


def test_a_reference_prediction_replaces_the_answer(adapter) -> None:
    """ReMaKE's locality: the prediction is compared with the unedited model's."""
    prompt = adapter.encode("Who wrote Hamlet?")
    answer = adapter.encode(" William Shakespeare")
    (plain,) = teacher_forced_scores(adapter, [(prompt, answer, " William Shakespeare")])
    pred = list(plain.tokens)
    assert len(pred) == len(answer)
    (same,) = teacher_forced_scores(
        adapter, [(prompt, answer, " William Shakespeare")], references=[pred]
    )
    assert (same.acc, same.f1, same.em) == (1.0, 1.0, 1.0)
    changed = [*pred[:-1], (pred[-1] + 1) % adapter.tokenizer.vocab_size]
    (moved,) = teacher_forced_scores(
        adapter, [(prompt, answer, " William Shakespeare")], references=[changed]
    )
    assert moved.acc == pytest.approx((len(pred) - 1) / len(pred)) and moved.em == 0.0
    with pytest.raises(ValueError, match="a reference of 1 tokens"):
        teacher_forced_scores(adapter, [(prompt, answer, "x")], references=[[1]])


def test_empty_pairs_are_refused(adapter) -> None:
    with pytest.raises(ValueError, match="pair 0: empty"):
        teacher_forced_argmax(adapter, [([1, 2], [])])


def test_paths_cited_exist_in_module_docstring() -> None:
    import mlake_core.metrics.paper_scores as mod

    doc = mod.__doc__ or ""
    for cited in ("test_prediction_acc", "obtain_f1_and_em", "icl_lm_eval", "search/icl.py"):
        assert cited in doc
    assert Path(mod.__file__).is_file()
