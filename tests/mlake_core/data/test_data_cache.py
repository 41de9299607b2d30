"""The located-dataset cache (mlake_core/data/cache.py): keyed by the data's content and the
code version, written atomically, rebuilt with a warning when corrupt, read (never written)
from a read-only folder; and the run key's subject digest, which changes with any subject.

Each test loads a synthetic 3-fact copy of the real data (tests/mlake_core/data/
test_bad_input.py) with ``MLAKE_CACHE`` in ``tmp_path``.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import time
import warnings
from pathlib import Path

import pytest

from mlake_core.data import cache as data_cache
from mlake_core.data import load_mlake
from tests.mlake_core.data.test_bad_input import build_mlake, edit_json, single_path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_mlake(tmp_path / "mlake")


@pytest.fixture
def cache_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(data_cache.CACHE_ENV, str(folder))
    return folder


def cached_files(cache_root: Path) -> list[Path]:
    return sorted((cache_root / "data").glob("located-*.pkl"))


def spans(ds):
    return [
        (v.question.subject, v.cloze.subject, v.cloze.text)
        for f in ds.facts
        for v in f.views.values()
    ]


def test_second_load_reads_the_cache_and_equals_a_fresh_build(root, cache_root, monkeypatch):
    first = load_mlake(root)
    files = cached_files(cache_root)
    assert len(files) == 1
    assert first.content_sha256[:16] in files[0].name
    assert data_cache.code_version()[:16] in files[0].name

    def no_build(*args, **kwargs):
        raise AssertionError("a cached dataset was built again")

    monkeypatch.setattr("mlake_core.data.dataset._build", no_build)
    warm = load_mlake(root)
    assert spans(warm) == spans(first)
    assert [f.to_dict() for f in warm.facts] == [f.to_dict() for f in first.facts]
    assert warm.content_key == first.content_key


def test_no_cache_builds_and_writes_nothing(root, cache_root):
    ds = load_mlake(root, cache=False)
    assert len(ds) == 3
    assert cached_files(cache_root) == []


def test_changed_data_gets_its_own_entry(root, cache_root):
    before = load_mlake(root)

    def change(recs):
        recs[0]["o_answer"] = "Harvard University"
        recs[0]["o_prompt"] = recs[0]["o_prompt"].replace(
            "Cornell University", "Harvard University"
        )

    edit_json(single_path(root, "en"), change)
    after = load_mlake(root)
    assert after.facts[0].views["en"].record.o_answer == "Harvard University"
    assert before.content_sha256 != after.content_sha256
    assert len(cached_files(cache_root)) == 2


def test_changed_code_gets_its_own_entry(root, cache_root, monkeypatch):
    load_mlake(root)
    monkeypatch.setattr(data_cache, "code_version", lambda: "f" * 64)
    load_mlake(root)
    assert len(cached_files(cache_root)) == 2


def test_code_version_covers_every_data_module_and_the_analyzers():
    version = data_cache.code_version()
    assert len(version) == 64
    data_cache.code_version.cache_clear()
    assert data_cache.code_version() == version  # stable
    assert set(data_cache.ANALYZERS) == {"jieba", "fugashi", "unidic-lite"}


def test_languages_asked_for_are_part_of_the_key(root, cache_root):
    load_mlake(root, langs="en")
    load_mlake(root, langs="en,zh")
    names = [p.name for p in cached_files(cache_root)]
    assert len(names) == 2 and any("-en-zh-" in n for n in names)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "other_key"])
def test_a_corrupt_cache_is_rebuilt_with_a_warning(root, cache_root, damage):
    first = load_mlake(root)
    (path,) = cached_files(cache_root)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:100])
    elif damage == "garbage":
        path.write_bytes(b"not a pickle")
    else:
        path.write_bytes(pickle.dumps(("another-key", first)))
    with pytest.warns(data_cache.CacheWarning, match=str(path)):
        again = load_mlake(root)
    assert spans(again) == spans(first)
    # ... and written again, whole: the next load reads it without a warning.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spans(load_mlake(root)) == spans(first)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_a_read_only_cache_folder_is_read_and_never_written(root, cache_root):
    first = load_mlake(root)  # cached while writable
    folder = cache_root / "data"
    folder.chmod(0o555)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert spans(load_mlake(root)) == spans(first)  # read back, no warning
        with pytest.warns(data_cache.CacheWarning, match="cannot cache"):
            other = load_mlake(root, langs="en")  # missing: built, not written
        assert len(other) == 3
        assert len(cached_files(cache_root)) == 1
    finally:
        folder.chmod(0o755)


def test_an_unwritable_cache_still_loads(root, cache_root, monkeypatch):
    """As root ignores folder modes, the write failure is injected too (EROFS)."""

    def refuse(path, write):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(data_cache, "atomic_write", refuse)
    with pytest.warns(data_cache.CacheWarning, match="Read-only file system"):
        ds = load_mlake(root)
    assert len(ds) == 3
    assert cached_files(cache_root) == []


def test_no_partial_file_is_left_when_the_write_fails(root, cache_root, monkeypatch):
    def fail(obj, fh, protocol=None):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(data_cache.pickle, "dump", fail)
    with pytest.warns(data_cache.CacheWarning):
        load_mlake(root)
    assert list((cache_root / "data").iterdir()) == []


def test_the_cached_dataset_names_the_folder_it_was_read_from(root, cache_root, tmp_path):
    load_mlake(root)
    twin = build_mlake(tmp_path / "twin")
    assert load_mlake(twin).root == twin


def test_subject_digest_enters_the_run_key_and_follows_every_subject(root, cache_root):
    ds = load_mlake(root)
    key = ds.content_key
    assert len(key["subjects"]) == 16
    assert key["data_content"] == ds.content_sha256  # a copy that differs from the release
    view = ds.facts[0].views["en"]
    moved = dataclasses.replace(
        view.question,
        subject=dataclasses.replace(view.question.subject, end=view.question.subject.end - 1),
    )
    ds.facts[0] = dataclasses.replace(
        ds.facts[0], views={**ds.facts[0].views, "en": dataclasses.replace(view, question=moved)}
    )
    assert ds.content_key["subjects"] != key["subjects"]


def test_reading_leaves_garbage_collection_as_it_was(root, cache_root):
    import gc

    load_mlake(root)
    assert gc.isenabled()
    load_mlake(root)  # read back
    assert gc.isenabled()
    gc.disable()
    try:
        load_mlake(root)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_entries_of_other_code_versions_are_pruned_after_a_day(root, cache_root, monkeypatch):
    load_mlake(root)
    (current,) = cached_files(cache_root)
    stem = current.name.rsplit("-", 1)[0]
    stale = current.with_name(f"{stem}-{'a' * 16}.pkl")
    recent = current.with_name(f"{stem}-{'b' * 16}.pkl")
    other_data = current.with_name(f"located-v2024-11-en-{'c' * 16}-{'a' * 16}.pkl")
    for p in (stale, recent, other_data):
        p.write_bytes(b"x")
    week_ago = time.time() - data_cache.PRUNE_AFTER_S - 60
    os.utime(stale, (week_ago, week_ago))
    os.utime(other_data, (week_ago, week_ago))
    monkeypatch.setattr(data_cache, "code_version", lambda: "d" * 64)
    load_mlake(root)  # a new code version writes its entry and prunes
    names = {p.name for p in cached_files(cache_root)}
    assert stale.name not in names
    assert {current.name, recent.name, other_data.name} <= names
