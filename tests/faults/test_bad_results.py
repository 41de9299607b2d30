"""Results that are not what they should be (issue 24, items 6 and 7): pieces of the wrong
schema or with NaN where a result must be finite are refused naming the file and what is
wrong; result files get the mode the umask gives.  (Unreadable, truncated and malformed
pieces: tests/mlake_core/results/test_store.py.)"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlake_core.errors import DataError
from mlake_core.results.store import open_run


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_result_files_follow_the_umask(tmp_path: Path, umask: int, mode: int) -> None:
    """Pieces are written through a 0600 temporary file; the saved file has the mode the
    process's umask gives, so a shared results folder stays readable by the group."""
    import os

    old = os.umask(umask)
    try:
        run = open_run("kind", {"umask": umask}, root=tmp_path)
        run.save_table("t", pd.DataFrame({"a": [1]}))
        run.save_arrays("a", {"x": np.zeros(2)})
        run.write_meta(status="complete")
    finally:
        os.umask(old)
    for path in (run.table_path("t"), run.arrays_path("a"), run.json_path("meta")):
        assert path.stat().st_mode & 0o777 == mode, path


def test_results_of_the_wrong_schema_are_refused_naming_the_file(tmp_path: Path) -> None:
    """A table without the expected columns, arrays without the expected keys, or arrays
    with NaN where a result must be finite: a DataError naming the file and what is wrong,
    never a KeyError or a silent read."""
    run = open_run("kind", {"schema": 1}, root=tmp_path)
    run.save_table("t", pd.DataFrame({"fact_id": [1], "lang": ["en"]}))
    assert list(run.load_table("t", columns=("fact_id",)).columns) == ["fact_id", "lang"]
    with pytest.raises(DataError, match=r"t\.parquet: not a knowledge table \(no column greedy"):
        run.load_table("t", columns=("fact_id", "greedy_match"), what="a knowledge table")
    with pytest.raises(DataError, match=r"no column greedy_match"):
        run.load_or_compute_table("t", lambda: None, columns=("greedy_match",))
    run.save_arrays("a", {"mean": np.array([1.0, np.nan]), "other": np.zeros(2)})
    with pytest.raises(DataError, match=r"a\.npz: not a subject mean \(no generator array\)"):
        run.load_arrays("a", keys=("generator",), what="a subject mean")
    with pytest.raises(DataError, match=r"a\.npz: a subject mean with NaN .* in mean"):
        run.load_arrays("a", keys=("mean",), what="a subject mean", finite=("mean",))
    assert set(run.load_arrays("a", finite=("other",))) == {"mean", "other"}


def test_a_fact_trace_with_nan_probabilities_is_refused(tmp_path: Path) -> None:
    from analysis.tracing.causal import TRACE_KEYS, FactTrace

    arrays = {k: np.array([1]) for k in TRACE_KEYS}
    arrays["tokens"] = np.array(["a"])
    arrays["classes"] = np.array(["last"])
    arrays["p_clean"] = np.array(np.nan)
    path = tmp_path / "trace_en_0.npz"
    np.savez(path, **arrays)
    with pytest.raises(DataError, match=r"trace_en_0\.npz: a fact trace with NaN .* p_clean"):
        FactTrace.load(path)


def test_the_shared_recommendations_file_follows_the_umask(tmp_path: Path) -> None:
    """The file every tracing run of a results root registers in (it was 0600)."""
    import os
    from types import SimpleNamespace

    from mlake.stages.tracing import register_recommended_layer

    result = SimpleNamespace(
        recommended_layer=3, recommended_by_lang={"en": 3}, summaries=[], run_path="r"
    )
    old = os.umask(0o022)
    try:
        path = register_recommended_layer({"model": "m"}, result, tmp_path)
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


def test_a_folder_renamed_into_place_follows_the_umask(tmp_path: Path) -> None:
    import os
    import tempfile

    from mlake_core.files import follow_umask

    folder = Path(tempfile.mkdtemp(dir=tmp_path))  # 0700
    (folder / "sub").mkdir(mode=0o700)
    fd, name = tempfile.mkstemp(dir=folder / "sub")  # 0600
    os.close(fd)
    old = os.umask(0o022)
    try:
        follow_umask(folder)
    finally:
        os.umask(old)
    assert folder.stat().st_mode & 0o777 == 0o755
    assert (folder / "sub").stat().st_mode & 0o777 == 0o755
    assert Path(name).stat().st_mode & 0o777 == 0o644


@pytest.mark.slow
def test_a_trained_mlake_tiny_follows_the_umask(micro_tiny: Path) -> None:
    """Its weights were 0600 (the safetensors writer's mode), unreadable in a shared cache."""
    from mlake_core.files import file_mode

    modes = {p.name: p.stat().st_mode & 0o777 for p in micro_tiny.iterdir() if p.is_file()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {file_mode()}, modes
