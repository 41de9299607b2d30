"""Results never outlive the data they were computed on: a copy of the data with one answer
changed gets its own runs (the content enters the run key), while runs on the release as
published are keyed by its located subjects alone; a trained mlake-tiny is named after the
data it was trained on in the same way."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from mlake_core.data import load_mlake
from mlake_core.data.paths import (
    RELEASES,
    content_sha256,
    data_suffix,
    release_dir,
)
from tests.conftest import real_data_dir


@pytest.fixture(scope="module")
def edited(tmp_path_factory) -> Path:
    """A copy of v2024-11 whose first English answer is changed."""
    root = real_data_dir()
    assert root is not None
    copy = tmp_path_factory.mktemp("data") / "mlake"
    shutil.copytree(root / "v2024-11", copy / "v2024-11")
    path = copy / "v2024-11" / "dataset" / "single_hop" / "en_qa.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    records[0]["o_answer"] = "Harvard University"
    records[0]["o_prompt"] = records[0]["o_prompt"].replace(
        "Cornell University", "Harvard University"
    )
    path.write_text(json.dumps(records, ensure_ascii=False, indent=4), encoding="utf-8")
    return copy


def test_the_shared_data_is_the_release_as_published(mlake_v2411) -> None:
    release = RELEASES["v2024-11"]
    assert mlake_v2411.content_sha256 == release.published_sha256
    # Runs on the published data name no data content, only the located subjects (issue 22).
    assert set(mlake_v2411.content_key) == {"subjects"}
    assert data_suffix(None, "v2024-11") == ""


def test_an_edited_copy_has_its_own_key(edited: Path, mlake_v2411) -> None:
    release = RELEASES["v2024-11"]
    digest = content_sha256(release_dir(edited, "v2024-11"), release)
    assert digest != release.published_sha256
    assert data_suffix(edited, "v2024-11") == f"-data{digest[:8]}"
    dataset = load_mlake(edited, langs="en")
    assert dataset.content_key["data_content"] == digest
    assert dataset.fact(0).views["en"].record.o_answer == "Harvard University"


@pytest.mark.slow
def test_knowledge_on_edited_data_is_measured_again(
    edited: Path, mlake_v2411, micro_tiny: Path, tmp_path: Path
) -> None:
    """The reproduction of issue 24: the same results folder, the data changed: the
    knowledge stage measures again instead of reloading the old run."""
    from mlake.stages.context import StageContext
    from mlake.stages.knowledge import knowledge_stage
    from mlake_core.metrics.knowledge import KnowledgeConfig
    from mlake_core.models import load_adapter
    from mlake_core.models.prompting import get_template

    adapter = load_adapter(str(micro_tiny), "tlens", device="cpu")
    runs = []
    for dataset in (mlake_v2411, load_mlake(edited)):
        ctx = StageContext(
            adapter,
            str(micro_tiny),
            dataset,
            (0,),
            ("en",),
            get_template("qa"),
            results_dir=tmp_path,
        )
        result, run = knowledge_stage(ctx, KnowledgeConfig(mcqa=False))
        runs.append((result, run))
    (old, old_run), (new, new_run) = runs
    assert old_run.path != new_run.path
    assert new_run.meta["data_sha256"] != old_run.meta["data_sha256"]
    q = new.table[new.table["form"] == "question"].iloc[0]
    assert q["target"] == "Harvard University"
    assert old.table[old.table["form"] == "question"].iloc[0]["target"] == "Cornell University"
