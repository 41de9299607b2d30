"""Where transfer fails (analysis/failures.py): each rule on built edit lenses, its
boundaries, the counts, and the saved result."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from analysis.failures import (
    LOST_AT_OUTPUT,
    NOT_ENRICHED,
    NOT_EXTRACTED,
    NOT_KNOWN,
    NOT_READ,
    OUTCOMES,
    SAME_TOKEN,
    TRANSFERRED,
    FailureResult,
    carried_at_subject,
    classify_edits,
    classify_failure,
    combine,
    latent_layers,
    summarize_failures,
)
from analysis.lens import EditLens
from analysis.patching import EditPatch
from mlake_core.errors import ConfigError, DataError

LANGS = ["en", "zh"]
N_LAYERS = 4  # latent layers 0-2, output layer 3
TOP_K = 10
FAR = 500  # a rank far from decodable


def built(
    *,
    subject: dict[tuple[int, str], int] | None = None,
    last: dict[tuple[int, str], int] | None = None,
    edit_lang: str = "en",
    known: tuple[bool, bool] = (True, True),
    same_token: bool = False,
    tests: tuple[str, ...] = ("en", "zh"),
    en_succeeds: bool = True,
) -> EditLens:
    """An edit lens of one edit made in ``edit_lang``: every rank far, except the new answer
    after the edit in test language zh at ``subject``/``last`` ``{(layer, form): rank}``; in
    en the edit succeeds (``en_succeeds``) or not."""
    shape = (len(tests), 2, 2, N_LAYERS, 2, len(LANGS))
    rank = np.full(shape, FAR, dtype=np.int64)
    prob = np.full(shape, 1e-4)
    if "zh" in tests:
        t = tests.index("zh")
        for pos, cells in ((0, subject or {}), (1, last or {})):
            for (layer, form), r in cells.items():
                rank[t, 1, pos, layer, 0, LANGS.index(form)] = r
    if "en" in tests and en_succeeds:
        rank[tests.index("en"), 1, 1, -1, 0, 0] = 0
    ids = np.array([[[10, 20], [11, 21]] for _ in tests])  # [test, kind(new, old), form]
    if same_token:
        ids[:, 1, :] = ids[:, 0, :]
    return EditLens(
        prob=prob,
        rank=rank,
        answer_ids=ids,
        answer_langs=list(LANGS),
        test_langs=list(tests),
        positions=np.zeros((len(tests), 2), dtype=np.int64),
        known_before=[known[LANGS.index(b)] for b in tests],
        edit_lang=edit_lang,
        fact_id=7,
    )


def outcome(lens: EditLens, test: str = "zh") -> str:
    return classify_failure(lens, test, TOP_K).outcome


def test_latent_layers_leave_the_last_quarter_out() -> None:
    assert list(latent_layers(4)) == [0, 1, 2]
    assert list(latent_layers(18)) == list(range(13))  # Gemma 3 270M: the last 5 are output
    assert list(latent_layers(2)) == [0]
    with pytest.raises(ConfigError, match="no latent layers"):
        latent_layers(1)


def test_transferred_when_the_b_form_is_the_final_top_token() -> None:
    assert outcome(built(last={(3, "zh"): 0})) == TRANSFERRED
    assert outcome(built(), "en") == TRANSFERRED


def test_not_enriched_when_no_form_is_decodable_at_the_subject() -> None:
    lens = built(last={(1, "en"): 0, (3, "zh"): 1})  # at the last position, not the subject
    assert outcome(lens) == NOT_ENRICHED
    assert outcome(built(subject={(2, "zh"): TOP_K})) == NOT_ENRICHED  # rank top_k: not decodable


@pytest.mark.parametrize("layer", [0, 3])  # any layer at the subject counts, the last one too
@pytest.mark.parametrize("form", ["en", "zh"])  # any form counts
def test_enriched_at_any_layer_and_form(layer: int, form: str) -> None:
    assert outcome(built(subject={(layer, form): TOP_K - 1})) == NOT_EXTRACTED


def test_not_extracted_when_it_appears_at_the_last_position_only_in_the_output_layers() -> None:
    lens = built(subject={(1, "zh"): 3}, last={(3, "zh"): 1})  # layer 3 is an output layer
    assert outcome(lens) == NOT_EXTRACTED


@pytest.mark.parametrize("form", ["en", "zh"])
def test_lost_at_the_output_when_present_in_a_latent_layer(form: str) -> None:
    lens = built(subject={(0, "zh"): 0}, last={(2, form): TOP_K - 1, (3, "zh"): 1})
    c = classify_failure(lens, "zh", TOP_K)
    assert c.outcome == LOST_AT_OUTPUT
    assert not c.other_form_at_output and not c.own_failed


def test_lost_at_the_output_in_another_languages_form() -> None:
    lens = built(subject={(0, "zh"): 0}, last={(1, "en"): 0, (3, "en"): 0})
    c = classify_failure(lens, "zh", TOP_K)
    assert (c.outcome, c.other_form_at_output) == (LOST_AT_OUTPUT, True)


def test_another_form_with_the_b_forms_token_is_not_another_form() -> None:
    lens = built(subject={(0, "zh"): 0}, last={(1, "en"): 0, (3, "en"): 0})
    lens.answer_ids[:, 0, 0] = lens.answer_ids[:, 0, 1]  # en's new form begins like zh's
    assert not classify_failure(lens, "zh", TOP_K).other_form_at_output


def test_a_failure_records_that_the_edit_failed_in_its_own_language() -> None:
    assert classify_failure(built(en_succeeds=False), "zh", TOP_K).own_failed
    assert not classify_failure(built(), "zh", TOP_K).own_failed


def test_old_at_subject_reads_the_old_answer_before_the_edit() -> None:
    lens = built()
    assert not classify_failure(lens, "zh", TOP_K).old_at_subject
    lens.rank[1, 0, 0, 2, 1, 0] = TOP_K - 1  # zh prompt, before, subject, layer 2, old, en form
    c = classify_failure(lens, "zh", TOP_K)
    assert (c.outcome, c.old_at_subject) == (NOT_ENRICHED, True)
    lens.rank[1, 1, 0, 2, 1, 0] = 0  # the old answer after the edit does not count
    lens.rank[1, 0, 0, 2, 1, 0] = TOP_K
    assert not classify_failure(lens, "zh", TOP_K).old_at_subject
    s = summarize_failures("ft", "en", "zh", [built(), lens, _readable()], TOP_K)
    assert s.old_at_subject == 1


def _readable() -> EditLens:
    lens = built()
    lens.rank[1, 0, 0, 0, 1, 1] = 0
    return lens


def test_not_applicable_cases_come_first() -> None:
    good = {"subject": {(0, "zh"): 0}, "last": {(3, "zh"): 0}}
    assert outcome(built(**good, tests=("en",))) == NOT_READ  # type: ignore[arg-type]
    assert outcome(built(**good, known=(True, False))) == NOT_KNOWN  # type: ignore[arg-type]
    assert outcome(built(**good, same_token=True)) == SAME_TOKEN  # type: ignore[arg-type]


def test_counts_add_up_and_rates_are_over_the_applicable() -> None:
    lenses = [
        built(last={(3, "zh"): 0}),  # transferred
        built(),  # not enriched
        built(subject={(0, "zh"): 0}),  # not extracted
        built(subject={(0, "zh"): 0}, last={(1, "en"): 0, (3, "en"): 0}),  # lost, other form
        built(known=(True, False)),  # not applicable
    ]
    s = summarize_failures("ft", "en", "zh", lenses, TOP_K)
    assert s.n_edits == 5 == sum(s.counts.values())
    assert s.counts == {
        TRANSFERRED: 1,
        NOT_ENRICHED: 1,
        NOT_EXTRACTED: 1,
        LOST_AT_OUTPUT: 1,
        NOT_READ: 0,
        NOT_KNOWN: 1,
        SAME_TOKEN: 0,
    }
    assert (s.n_applicable, s.n_failed, s.other_form_at_output) == (4, 3, 1)
    assert s.rate(TRANSFERRED) == 0.25 and s.share_of_failures(NOT_ENRICHED) == pytest.approx(1 / 3)
    empty = summarize_failures("ft", "en", "zh", [], TOP_K)
    assert math.isnan(empty.rate(TRANSFERRED)) and math.isnan(empty.share_of_failures(NOT_ENRICHED))


def test_result_per_pair_totals_round_trip_and_combine(tmp_path: Path) -> None:
    lenses = {"en": [built(), built(last={(3, "zh"): 0})], "zh": [built(edit_lang="zh")]}
    ft = classify_edits("ft", lenses, LANGS, N_LAYERS, TOP_K, source="runs/x")
    assert len(ft.summaries) == 4 and ft.latent == [0, 1, 2]
    assert ft.summary("ft", "en", "zh").counts[NOT_ENRICHED] == 1
    assert ft.summary("ft", "en", "en").counts[TRANSFERRED] == 2
    assert sum(ft.totals("ft").values()) == 6  # 3 edits x 2 test languages
    rome = classify_edits("rome", {"en": [built()]}, LANGS, N_LAYERS, TOP_K)
    both = combine([ft, rome])
    assert both.methods == ["ft", "rome"] and both.totals("rome")[NOT_ENRICHED] == 1
    path = tmp_path / "failures.json"
    both.save(path)
    back = FailureResult.load(path)
    assert back == both and set(back.totals("ft")) == set(OUTCOMES)
    rates = both.to_dict()["summaries"][1]["rates"]  # ft, en edits read in zh: 1 of 2 fail
    assert rates == {TRANSFERRED: 0.5, NOT_ENRICHED: 0.5, NOT_EXTRACTED: 0.0, LOST_AT_OUTPUT: 0.0}
    assert both.to_dict()["summaries"][6]["rates"][TRANSFERRED] is None  # rome: no zh edits
    with pytest.raises(ConfigError, match="twice"):
        combine([ft, ft])
    (tmp_path / "bad.json").write_text("{}", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad\.json"):
        FailureResult.load(tmp_path / "bad.json")


def patch_of(carried_layer: int | None, *, success: bool = True, position: int = 0) -> EditPatch:
    """A built edit patch into zh and en: B's top token is the new answer only where the
    edited subject state (``position`` 0) is patched at ``carried_layer``."""
    rank = np.full((2, 2, 2, N_LAYERS, 2), FAR, dtype=np.int64)
    if carried_layer is not None:
        rank[0, 0, position, carried_layer, 0] = 0
    rank[0, 1, 0, :, 0] = 0  # the other direction never counts
    return EditPatch(
        prob=np.zeros(rank.shape),
        rank=rank,
        clean_prob=np.zeros((2, 2, 2)),
        clean_rank=np.full((2, 2, 2), FAR),
        target_langs=["zh", "en"],
        tokens=np.array([[10, 11], [20, 21]]),
        source_success=success,
    )


def test_carried_at_subject_reads_the_edited_subject_state_only() -> None:
    assert carried_at_subject(patch_of(2), "zh") is True
    assert carried_at_subject(patch_of(None), "zh") is False
    assert carried_at_subject(patch_of(2, position=1), "zh") is False  # the last position
    assert carried_at_subject(patch_of(2, success=False), "zh") is None
    assert carried_at_subject(patch_of(2), "ja") is None


def test_failures_count_the_carried_edits() -> None:
    lens = built()  # not enriched in zh
    assert classify_failure(lens, "zh", TOP_K).carried is None
    assert classify_failure(lens, "zh", TOP_K, patch_of(3)).carried is True
    assert classify_failure(built(last={(3, "zh"): 0}), "zh", TOP_K, patch_of(3)).carried is None
    other = built()
    other.fact_id = 8
    s = summarize_failures("ft", "en", "zh", [lens, other, built()], TOP_K, {7: patch_of(1)})
    assert s.counts[NOT_ENRICHED] == 3
    assert s.patched[NOT_ENRICHED] == 2 and s.carried[NOT_ENRICHED] == 2  # facts 7, 7; not 8
    r = classify_edits(
        "ft", {"en": [lens]}, LANGS, N_LAYERS, TOP_K, patches={"en": {7: patch_of(0)}}
    )
    assert r.summary("ft", "en", "zh").carried[NOT_ENRICHED] == 1
    assert FailureResult.from_dict(r.to_dict()) == r
