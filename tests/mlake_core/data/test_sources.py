"""The dataset registry and the guards of the stages that need a subject or an original
answer."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlake_core.data.external import (
    EditRecord,
    build_dataset,
    require_original_answers,
    require_subjects,
    subject_span,
)
from mlake_core.data.sources import DATASETS, get_source, load_dataset
from mlake_core.errors import ConfigError

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def test_registry_names_and_errors() -> None:
    assert DATASETS[0] == "mlake"
    for name in DATASETS:
        assert get_source(name).name == name
    assert get_source("mlake").languages == ()  # MLaKE's come from its folder
    assert len(get_source("bmike53-wfd").languages) == 53
    with pytest.raises(ConfigError, match="choose bmike53-zsre, bmike53-counterfact"):
        get_source("bmike53")
    with pytest.raises(ConfigError, match="unknown dataset 'mquake'; choose mlake, mzsre"):
        get_source("mquake")


def test_load_dataset_dispatches() -> None:
    mz = load_dataset("mzsre", FIXTURES / "mzsre", "v2024-11", "en,zh")
    assert mz.version == "mzsre" and len(mz.facts) == 3
    bm = load_dataset("bmike53-counterfact", FIXTURES / "bmike53", "v2024-11", ["en", "de"])
    assert bm.version == "bmike53-counterfact" and bm.langs == ("en", "de")


def test_subject_span() -> None:
    span = subject_span("Where is Lake Baikal?", "Lake Baikal")
    assert span is not None and span.start == 9
    span = subject_span("where is lake baikal?", "Lake Baikal")  # case ignored as a fallback
    assert span is not None and span.text == "lake baikal"
    assert subject_span("Wo liegt der Baikalsee?", "Baikal-See") is None
    assert subject_span("Where?", None) is None and subject_span("Where?", " ") is None


def _no_subject_dataset():
    rec = EditRecord(
        prompt="Which sea does the Danube flow into?",
        new_answer="Adriatic Sea",
        old_answer=None,
        subject=None,
        rephrase=None,
        locality_prompt=None,
        locality_answer=None,
        portability_prompt=None,
        portability_answer=None,
    )
    return build_dataset(
        name="nosubj",
        title="NoSubj",
        provenance="test",
        root=FIXTURES,
        langs=("en",),
        records={"en": {0: rec}},
        n_records=1,
        skipped={},
        files=[FIXTURES / "mzsre" / "mzsre_test_duplicate_enzh.json"],
        with_subjects=False,
        with_original_answers=False,
    )


def test_no_subject_path_refuses_subject_stages() -> None:
    ds = _no_subject_dataset()
    assert not ds.has_subjects
    view = ds.view(0, "en")
    assert view.question.subject is None and str(view.question.reason).startswith("no_subject")
    assert ds.subject_not_in_prompt == {"en": []}  # no subject given: nothing to find
    with pytest.raises(ConfigError, match="causal tracing needs each fact's subject, and NoSubj"):
        require_subjects(ds, "causal tracing")
    with pytest.raises(ConfigError, match=r"the knowledge stage scores .* NoSubj gives none"):
        require_original_answers(ds, "the knowledge stage")


def test_guards_pass_datasets_with_subjects_and_answers() -> None:
    bm = load_dataset("bmike53-counterfact", FIXTURES / "bmike53", "v2024-11", "en")
    require_subjects(bm, "causal tracing")
    require_original_answers(bm, "the knowledge stage")
    mz = load_dataset("mzsre", FIXTURES / "mzsre", "v2024-11", "en")
    require_subjects(mz, "ROME edits")
    with pytest.raises(ConfigError, match="MzsRE gives none"):
        require_original_answers(mz, "the knowledge stage")


def test_default_dataset_is_mlake_as_before(mlake_v2411) -> None:
    """``--dataset`` left at ``mlake``: the same dataset, version and run-key content as
    load_mlake (run keys unchanged)."""
    from mlake.settings import DataSettings

    assert DataSettings().dataset == "mlake"
    ds = load_dataset("mlake", mlake_v2411.root, "v2024-11", None)
    assert type(ds) is type(mlake_v2411) and ds.version == "v2024-11"
    assert ds.langs == mlake_v2411.langs and ds.content_key == mlake_v2411.content_key
    assert len(ds.facts) == len(mlake_v2411.facts)
