"""mlake-tiny's cache folder names the located subjects when its training reads them."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest

from mlake_core.models.mlake_tiny import TINY_NAME, TinyTrainConfig, variant_config
from mlake_core.models.mlake_tiny.cache import (
    model_dir,
    reads_subjects,
    tiny_dir,
    trained_facts_sha256,
)

SUBJECTS = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("options", "reads"),
    [
        ({}, False),
        ({"subject_prompts": True}, True),
        ({"entity_text": True}, True),
        ({"enrichment_layer": 1}, True),
        ({"enrichment_layer": 1, "enrichment_weight": 0.0}, False),
        ({"route_masking": 0.5}, True),
        ({"interchange": 1.0}, True),
        ({"context_dropout": 0.1}, True),
        ({"name_entities": True}, False),
        ({"answer_continuations": True}, False),
        ({"bilingual_fraction": 0.5}, False),
    ],
)
def test_reads_subjects(options: dict[str, object], reads: bool) -> None:
    assert reads_subjects(TinyTrainConfig(**options)) is reads  # type: ignore[arg-type]


def test_default_keeps_its_name(tmp_path: Path) -> None:
    config = TinyTrainConfig()
    expected = tmp_path / "models" / f"{TINY_NAME}-{config.key()}"
    assert model_dir(config, tmp_path) == expected
    # subjects are ignored for a config that does not read them: cached copies stay valid
    assert model_dir(config, tmp_path, subjects=SUBJECTS) == expected


def test_subject_reader_names_the_subjects(tmp_path: Path) -> None:
    config = variant_config("mlake-tiny-editable")
    assert reads_subjects(config)
    path = model_dir(config, tmp_path, "-data1a2b3c4d", SUBJECTS)
    assert path.name == f"{TINY_NAME}-{config.key()}-data1a2b3c4d-subj01234567"
    other = model_dir(config, tmp_path, "-data1a2b3c4d", "f" * 64)
    assert other != path
    with pytest.raises(ValueError, match="reads subject spans"):
        model_dir(config, tmp_path)


def test_tiny_dir_uses_the_dataset_subjects(mlake_v2411, tmp_path: Path) -> None:
    config = replace(TinyTrainConfig(), subject_prompts=True)
    path = tiny_dir(config, mlake_v2411.root, tmp_path, mlake_v2411)
    assert path.name.endswith(f"-subj{mlake_v2411.subjects_sha256[:8]}")
    plain = tiny_dir(TinyTrainConfig(), mlake_v2411.root, tmp_path)
    facts = trained_facts_sha256(mlake_v2411, TinyTrainConfig())
    assert plain == tmp_path / "models" / f"{TINY_NAME}-{TinyTrainConfig().key()}-facts{facts[:8]}"


def test_the_folder_names_the_trained_facts(mlake_v2411, tmp_path: Path) -> None:
    """The facts are drawn among those whose subject is located in every language: a locator
    that places one subject differently draws other facts, and that model gets another folder
    (a copy cached before the change was reused, trained on other facts)."""
    import hashlib

    from mlake_core.models.mlake_tiny.corpus import select_facts

    config = TinyTrainConfig()
    ids = select_facts(mlake_v2411, config)
    expected = hashlib.sha256(",".join(map(str, ids)).encode()).hexdigest()
    assert trained_facts_sha256(mlake_v2411, config) == expected
    here = tiny_dir(config, mlake_v2411.root, tmp_path, mlake_v2411)
    assert here.name.endswith(f"-facts{expected[:8]}")
    # One eligible fact less (its subject no longer located in en): another draw, another folder.
    fact = mlake_v2411.fact(ids[0])
    view = fact.views["en"]
    lost = replace(view, question=replace(view.question, subject=None, usable=False))
    changed = copy.copy(mlake_v2411)
    changed.facts = [
        replace(f, views={**f.views, "en": lost}) if f.fact_id == fact.fact_id else f
        for f in mlake_v2411.facts
    ]
    assert select_facts(changed, config) != ids
    assert tiny_dir(config, mlake_v2411.root, tmp_path, changed) != here
