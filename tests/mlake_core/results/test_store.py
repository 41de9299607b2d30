"""The results store: run folders, keys, atomic writes, round-trips and corrupted files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from mlake_core.errors import ConfigError, DataError
from mlake_core.results import store
from mlake_core.results.store import RESULTS_ENV, Run, _atomic_write, open_run, results_root

KEY = {"model": "mlake-tiny", "data": "v2024-11", "facts": [1, 2, 3], "seed": 0}


@pytest.fixture
def run(tmp_path: Path) -> Run:
    return open_run("knowledge", KEY, root=tmp_path)


def _leftovers(folder: Path) -> list[str]:
    """Temporary files of :func:`_atomic_write` anywhere under ``folder``."""
    return sorted(p.name for p in folder.rglob("*") if p.name.endswith(".tmp"))


# -- folders and keys ------------------------------------------------------------------------


def test_open_run_creates_kind_key_folder_with_key_json(tmp_path: Path) -> None:
    run = open_run("knowledge", KEY, root=tmp_path)
    assert run.kind == "knowledge"
    assert run.path == tmp_path / "knowledge" / run.key
    assert len(run.key) == 16
    assert all(c in "0123456789abcdef" for c in run.key)
    key_json = run.path / "key.json"
    assert key_json.is_file()
    assert json.loads(key_json.read_text(encoding="utf-8")) == KEY


def test_same_key_parts_in_any_order_give_same_folder(tmp_path: Path) -> None:
    first = open_run("knowledge", KEY, root=tmp_path)
    reordered = dict(reversed(list(KEY.items())))
    assert list(reordered) != list(KEY)
    second = open_run("knowledge", reordered, root=tmp_path)
    assert second.path == first.path
    assert second.key == first.key
    assert [p.name for p in (tmp_path / "knowledge").iterdir()] == [first.key]


def test_different_key_parts_give_different_folders(tmp_path: Path) -> None:
    a = open_run("knowledge", KEY, root=tmp_path)
    b = open_run("knowledge", {**KEY, "seed": 1}, root=tmp_path)
    c = open_run("tracing", KEY, root=tmp_path)
    assert a.key != b.key
    assert a.path != b.path
    assert c.key == a.key  # the kind is a folder, not part of the hash
    assert c.path == tmp_path / "tracing" / a.key
    assert json.loads((b.path / "key.json").read_text(encoding="utf-8"))["seed"] == 1


def test_reopen_with_mismatching_key_json_is_a_config_error(tmp_path: Path) -> None:
    run = open_run("knowledge", KEY, root=tmp_path)
    (run.path / "key.json").write_text(json.dumps({**KEY, "seed": 99}), encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key\.json"):
        open_run("knowledge", KEY, root=tmp_path)


def test_reopen_with_unchanged_key_json_keeps_saved_pieces(tmp_path: Path) -> None:
    run = open_run("knowledge", KEY, root=tmp_path)
    run.save_json("summary", {"n": 3})
    again = open_run("knowledge", KEY, root=tmp_path)
    assert again.load_json("summary") == {"n": 3}


@pytest.mark.parametrize("kind", ["../x", "", ".hidden", "a/b"])
def test_open_run_rejects_bad_kind(tmp_path: Path, kind: str) -> None:
    with pytest.raises(ValueError, match="bad result name"):
        open_run(kind, KEY, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


# -- results root ----------------------------------------------------------------------------


def test_results_root_explicit_beats_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "from_env"))
    assert results_root(tmp_path / "explicit") == tmp_path / "explicit"
    assert results_root(str(tmp_path / "explicit")) == tmp_path / "explicit"


def test_results_root_env_beats_default(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path / "from_env"))
    assert results_root() == tmp_path / "from_env"
    assert results_root(None) == tmp_path / "from_env"


def test_results_root_default_is_runs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(RESULTS_ENV, raising=False)
    assert results_root() == Path("runs")
    monkeypatch.setenv(RESULTS_ENV, "")
    assert results_root() == Path("runs")


def test_results_root_expands_user(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv(RESULTS_ENV, "~/res")
    assert results_root() == tmp_path / "res"
    assert results_root("~/other") == tmp_path / "other"


def test_open_run_uses_env_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(RESULTS_ENV, str(tmp_path))
    run = open_run("knowledge", KEY)
    assert run.path == tmp_path / "knowledge" / run.key
    assert (run.path / "key.json").is_file()


# -- tables ----------------------------------------------------------------------------------


def test_table_round_trip_keeps_values(run: Run) -> None:
    table = pd.DataFrame(
        {
            "fact_id": [3, 1, 2],
            "lang": ["zh", "ja", "en"],
            "text": ["法国的首都是巴黎", "フランスの首都はパリです", "Paris"],
            "logp": [-1.25, float("nan"), 0.0],
            "mcqa_correct": [True, None, False],
        }
    )
    path = run.save_table("en", table)
    assert path == run.path / "tables" / "en.parquet"
    assert run.has_table("en")
    back = run.load_table("en")
    assert list(back.columns) == list(table.columns)
    assert back["fact_id"].tolist() == [3, 1, 2]
    assert back["lang"].tolist() == ["zh", "ja", "en"]
    assert back["text"].tolist() == ["法国的首都是巴黎", "フランスの首都はパリです", "Paris"]
    logp = back["logp"].tolist()
    assert logp[0] == -1.25 and np.isnan(logp[1]) and logp[2] == 0.0
    assert back["mcqa_correct"].tolist() == [True, None, False]
    assert back.index.tolist() == [0, 1, 2]  # the index is not saved as a column


def test_missing_table_is_a_data_error(run: Run) -> None:
    assert not run.has_table("nope")
    with pytest.raises(DataError, match=r"nope\.parquet"):
        run.load_table("nope")


@pytest.mark.parametrize("damage", ["garbage", "truncate"])
def test_corrupted_table_is_a_data_error_naming_the_file(run: Run, damage: str) -> None:
    path = run.save_table("t", pd.DataFrame({"a": list(range(50))}))
    data = path.read_bytes()
    path.write_bytes(b"not parquet at all" if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        run.load_table("t")
    assert str(path) in str(info.value)


def test_load_or_compute_table_computes_once(run: Run) -> None:
    calls = []

    def compute() -> pd.DataFrame:
        calls.append(1)
        return pd.DataFrame({"x": [1, 2], "y": ["巴黎", "パリ"]})

    first, computed = run.load_or_compute_table("piece", compute)
    assert computed is True
    assert len(calls) == 1
    assert first["x"].tolist() == [1, 2]
    assert run.has_table("piece")

    second, computed = run.load_or_compute_table("piece", compute)
    assert computed is False
    assert len(calls) == 1
    assert second["x"].tolist() == [1, 2]
    assert second["y"].tolist() == ["巴黎", "パリ"]

    # A reopened run (a resumed computation) finds the piece as well.
    again = open_run("knowledge", KEY, root=run.path.parent.parent)
    third, computed = again.load_or_compute_table("piece", compute)
    assert computed is False
    assert len(calls) == 1
    assert third["x"].tolist() == [1, 2]


def test_load_or_compute_table_does_not_save_when_compute_fails(run: Run) -> None:
    def compute() -> pd.DataFrame:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run.load_or_compute_table("piece", compute)
    assert not run.has_table("piece")


# -- arrays ----------------------------------------------------------------------------------


def test_arrays_round_trip_numpy_and_torch(run: Run) -> None:
    a = np.arange(12, dtype=np.float32).reshape(3, 4) / 7
    b = torch.tensor([[1.5, -2.0], [0.25, 3.0]], dtype=torch.float64, requires_grad=True)
    c = np.array([True, False, True])
    path = run.save_arrays("fact_7", {"a": a, "b": b, "c": c})
    assert path == run.path / "arrays" / "fact_7.npz"
    assert run.has_arrays("fact_7")
    back = run.load_arrays("fact_7")
    assert sorted(back) == ["a", "b", "c"]
    assert back["a"].dtype == np.float32
    np.testing.assert_array_equal(back["a"], a)
    assert isinstance(back["b"], np.ndarray)
    assert back["b"].dtype == np.float64
    np.testing.assert_array_equal(back["b"], [[1.5, -2.0], [0.25, 3.0]])
    np.testing.assert_array_equal(back["c"], [True, False, True])


def test_missing_arrays_is_a_data_error(run: Run) -> None:
    with pytest.raises(DataError, match=r"nope\.npz"):
        run.load_arrays("nope")


def test_garbage_arrays_is_a_data_error_naming_the_file(run: Run) -> None:
    path = run.save_arrays("x", {"a": np.arange(10)})
    path.write_bytes(b"not an npz file")
    with pytest.raises(DataError) as info:
        run.load_arrays("x")
    assert str(path) in str(info.value)


def test_truncated_arrays_is_a_data_error_naming_the_file(run: Run) -> None:
    path = run.save_arrays("x", {"a": np.random.default_rng(0).normal(size=1000)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as info:
        run.load_arrays("x")
    assert str(path) in str(info.value)


# -- json and meta ---------------------------------------------------------------------------


def test_json_round_trip(run: Run) -> None:
    doc = {"counts": {"en": 3, "zh": 2}, "langs": ["en", "zh", "ja"], "ok": True, "x": None}
    doc["text"] = "法国的首都是巴黎 / パリ"
    path = run.save_json("summary", doc)
    assert path == run.path / "summary.json"
    assert run.has_json("summary")
    assert run.load_json("summary") == doc
    # Saved as readable UTF-8, not \u escapes.
    assert "巴黎" in path.read_text(encoding="utf-8")


def test_json_non_serialisable_values_are_saved_as_strings(run: Run) -> None:
    run.save_json("paths", {"p": Path("/a/b")})
    assert run.load_json("paths") == {"p": "/a/b"}


def test_missing_json_is_a_data_error(run: Run) -> None:
    with pytest.raises(DataError, match=r"nope\.json"):
        run.load_json("nope")


def test_malformed_json_is_a_data_error_naming_the_file(run: Run) -> None:
    path = run.save_json("summary", {"a": 1})
    path.write_text('{"a": 1', encoding="utf-8")
    with pytest.raises(DataError) as info:
        run.load_json("summary")
    assert str(path) in str(info.value)


def test_non_utf8_json_is_a_data_error_naming_the_file(run: Run) -> None:
    path = run.save_json("summary", {"a": 1})
    path.write_bytes(b'\xff\xfe{"a": 1}')
    with pytest.raises(DataError) as info:
        run.load_json("summary")
    assert str(path) in str(info.value)


def test_meta_is_empty_before_write_meta(run: Run) -> None:
    assert run.meta == {}
    assert run.complete is False


def test_write_meta_adds_provenance_and_merges_fields(run: Run) -> None:
    run.write_meta(status="running", model={"name": "mlake-tiny"})
    meta = run.meta
    assert meta["kind"] == "knowledge"
    assert meta["key"] == run.key
    assert "versions" in meta and isinstance(meta["versions"], dict)
    assert "git_commit" in meta
    assert meta["status"] == "running"
    assert meta["model"] == {"name": "mlake-tiny"}

    run.write_meta(status="complete", langs=["en"])
    merged = run.meta
    assert merged["status"] == "complete"
    assert merged["model"] == {"name": "mlake-tiny"}
    assert merged["langs"] == ["en"]
    assert merged["versions"] == meta["versions"]
    assert merged["git_commit"] == meta["git_commit"]


def test_write_meta_computes_provenance_only_on_first_write(
    run: Run, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []

    def fake_provenance() -> dict:
        calls.append(1)
        return {"versions": {"mlake": f"v{len(calls)}"}, "git_commit": f"c{len(calls)}"}

    monkeypatch.setattr(store, "provenance", fake_provenance)
    run.write_meta(a=1)
    run.write_meta(b=2)
    run.write_meta(a=3)
    assert len(calls) == 1
    meta = run.load_json("meta")
    assert meta == {
        "kind": "knowledge",
        "key": run.key,
        "versions": {"mlake": "v1"},
        "git_commit": "c1",
        "a": 3,
        "b": 2,
    }


def test_complete_flag(run: Run) -> None:
    run.write_meta(status="running")
    assert run.complete is False
    run.write_meta(status="complete")
    assert run.complete is True
    again = open_run("knowledge", KEY, root=run.path.parent.parent)
    assert again.complete is True
    run.write_meta(status="failed")
    assert run.complete is False


# -- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../x", "", ".hidden", "a/b", "a\\b"])
def test_bad_names_are_rejected(run: Run, name: str) -> None:
    for method in (run.table_path, run.arrays_path, run.json_path):
        with pytest.raises(ValueError, match="bad result name"):
            method(name)
    with pytest.raises(ValueError):
        run.save_json(name, {"a": 1})
    with pytest.raises(ValueError):
        run.save_table(name, pd.DataFrame({"a": [1]}))
    with pytest.raises(ValueError):
        run.save_arrays(name, {"a": np.zeros(2)})
    assert not (run.path.parent / "x.json").exists()


# -- atomic writes ---------------------------------------------------------------------------


def test_saves_leave_no_temporary_files(run: Run) -> None:
    run.save_table("t", pd.DataFrame({"a": [1, 2]}))
    run.save_table("t", pd.DataFrame({"a": [3]}))
    run.save_arrays("x", {"a": np.arange(3)})
    run.save_json("s", {"a": 1})
    run.write_meta(status="complete")
    assert _leftovers(run.path) == []
    names = sorted(p.relative_to(run.path).as_posix() for p in run.path.rglob("*") if p.is_file())
    assert names == ["arrays/x.npz", "key.json", "meta.json", "s.json", "tables/t.parquet"]
    assert run.load_table("t")["a"].tolist() == [3]


def test_atomic_write_creates_parent_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er" / "file.txt"
    _atomic_write(target, lambda tmp: tmp.write_text("one", encoding="utf-8"))
    assert target.read_text(encoding="utf-8") == "one"
    _atomic_write(target, lambda tmp: tmp.write_text("two", encoding="utf-8"))
    assert target.read_text(encoding="utf-8") == "two"
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.txt"]


def test_atomic_write_writes_to_a_temp_file_in_the_same_folder(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    seen: list[Path] = []

    def write(tmp: Path) -> None:
        seen.append(tmp)
        assert not target.exists()  # the target appears only at the rename
        tmp.write_text("done", encoding="utf-8")

    _atomic_write(target, write)
    assert seen[0].parent == tmp_path
    assert seen[0] != target
    assert not seen[0].exists()
    assert target.read_text(encoding="utf-8") == "done"


def test_failed_atomic_write_keeps_previous_content(tmp_path: Path) -> None:
    target = tmp_path / "file.txt"
    target.write_text("previous", encoding="utf-8")

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as fh:
            fh.write("partial")
        raise RuntimeError("writer crashed")

    with pytest.raises(RuntimeError, match="writer crashed"):
        _atomic_write(target, write)
    assert target.read_text(encoding="utf-8") == "previous"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_failed_atomic_write_of_new_file_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "new.txt"

    def write(tmp: Path) -> None:
        tmp.write_text("partial", encoding="utf-8")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        _atomic_write(target, write)
    assert list(tmp_path.iterdir()) == []


def test_failed_table_save_keeps_previous_table(run: Run) -> None:
    run.save_table("t", pd.DataFrame({"a": [1, 2, 3]}))

    class Broken:
        def to_parquet(self, path: Path, index: bool = False) -> None:
            Path(path).write_bytes(b"PAR1 half a file")
            raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        run.save_table("t", Broken())
    assert run.load_table("t")["a"].tolist() == [1, 2, 3]
    assert _leftovers(run.path) == []
