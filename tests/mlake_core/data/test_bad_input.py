"""Bad input to the MLaKE data layer: every problem is a DataError/ConfigError naming what is wrong.

Each test builds a small synthetic data directory in ``tmp_path`` with the v2024-11 layout
(records 0-2 of every real single-hop file, and real multi-hop records of fact 0), corrupts one
thing and checks the exact error class and message (file path, record index, field).  The real
data is only read, never written.  The real files are found as ``$MLAKE_DATA`` or
``../shared/mlake`` beside the repository root; without them these tests are skipped.
"""

from __future__ import annotations

import copy
import http.client
import io
import json
import os
import tarfile
import urllib.error
import urllib.request
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from mlake.cli import main
from mlake_core.data import load_mlake
from mlake_core.data.paths import ENV_VAR, RELEASES, archive_url, fetch_release, repo_root
from mlake_core.errors import ConfigError, DataError
from mlake_core.languages import LANGUAGES, parse_langs

VERSION = "v2024-11"
N_FACTS = 3
URL_V2024_11 = "https://codeload.github.com/Hi-archers/MLaKE/tar.gz/40b6a3c"

Records = list[dict[str, Any]]


def real_release() -> Path:
    env = os.environ.get(ENV_VAR)
    root = Path(env) if env else repo_root().parent / "shared" / "mlake"
    return root / VERSION / "dataset"


@cache
def _real_records() -> tuple[dict[str, Records], dict[tuple[str, str], Records]]:
    """Records 0-2 of every real single-hop file; multi-hop records of those facts."""
    base = real_release()
    if not base.is_dir():
        pytest.skip(f"real MLaKE data not found at {base}")
    single: dict[str, Records] = {}
    for lang in LANGUAGES:
        with (base / "single_hop" / f"{lang}_qa.json").open(encoding="utf-8") as fh:
            single[lang] = json.load(fh)[:N_FACTS]
    edits = {r["e_prompt"] for r in single["en"]}
    multi: dict[tuple[str, str], Records] = {}
    for lang in LANGUAGES:
        for kind in ("old", "new"):
            with (base / "multi_hop" / f"{kind}_{lang}_qa.json").open(encoding="utf-8") as fh:
                recs = json.load(fh)
            if kind == "new":  # keep the chains of our three facts only
                recs = [r for r in recs if r["e_prompt"] in edits]
            multi[(kind, lang)] = recs[:2]
    return single, multi


def single_path(root: Path, lang: str) -> Path:
    return root / VERSION / "dataset" / "single_hop" / f"{lang}_qa.json"


def multi_path(root: Path, kind: str, lang: str) -> Path:
    return root / VERSION / "dataset" / "multi_hop" / f"{kind}_{lang}_qa.json"


def write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, ensure_ascii=False, indent=1), encoding="utf-8")


def edit_json(path: Path, fn: Callable[[Any], Any]) -> None:
    """Rewrite a synthetic file with ``fn(data)`` (``fn`` may mutate in place and return None)."""
    data = json.loads(path.read_text(encoding="utf-8"))
    out = fn(data)
    write_json(path, data if out is None else out)


def build_mlake(root: Path) -> Path:
    """A valid synthetic data directory: 3 parallel facts, 5 languages, v2024-11 layout."""
    single, multi = _real_records()
    for lang in LANGUAGES:
        write_json(single_path(root, lang), copy.deepcopy(single[lang]))
        for kind in ("old", "new"):
            write_json(multi_path(root, kind, lang), copy.deepcopy(multi[(kind, lang)]))
    return root


def drop_field(path: Path, index: int, field: str) -> None:
    """Remove one field from one record of a synthetic file."""

    def drop(recs: Records) -> None:
        del recs[index][field]

    edit_json(path, drop)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return build_mlake(tmp_path / "mlake")


# --- the valid synthetic directory ------------------------------------------------------------


def test_valid_synthetic_dir_loads(root: Path) -> None:
    single, _ = _real_records()
    ds = load_mlake(root)
    assert ds.version == VERSION
    assert ds.root == root
    assert ds.langs == LANGUAGES
    assert len(ds) == 3
    assert [f.fact_id for f in ds.facts] == [0, 1, 2]
    for fact in ds.facts:
        assert tuple(fact.views) == LANGUAGES
    en = ds.facts[0].views["en"]
    assert en.question.text == "Where did Carl Sagan work during his career?"
    assert en.question.subject_text == "Carl Sagan"
    assert (en.question.subject.start, en.question.subject.end) == (10, 20)
    assert en.question.target.text == "Cornell University"
    assert en.question.target.aliases == ("Cornell", "CUI", "cornell.edu", "CU", "Cornell Univ.")
    assert en.question.edit_target.text == "BBC"
    assert en.question.edit_target.aliases == ()
    assert ds.facts[0].views["zh"].question.subject_text == "卡尔·萨根"
    assert ds.facts[0].views["ja"].question.subject_text == "カール・セーガン"
    assert [f.views["en"].question.subject_text for f in ds.facts] == [
        "Carl Sagan",
        "Brandon Jennings",
        "Philip Pullman",
    ]
    # every located subject is the text at its span, in every language
    for fact in ds.facts:
        for lang, view in fact.views.items():
            assert view.record.question == single[lang][fact.fact_id]["question"]
            span = view.question.subject
            assert span is not None, (fact.fact_id, lang)
            assert view.question.text[span.start : span.end] == span.text
    # the English 'new' chains carry fact 0's edit sentence and are linked to it
    en_new = [q for q in ds.multi_hop["en"] if q.kind == "new"]
    assert [(q.index, q.link, q.fact_ids) for q in en_new] == [
        (0, "e_prompt", (0,)),
        (1, "e_prompt", (0,)),
    ]
    assert all(q.e_prompt == "Carl Sagan worked at BBC during his career." for q in en_new)
    assert {q.index for q in ds.facts[0].multi_hop if q.lang == "en" and q.kind == "new"} == {0, 1}


def test_subset_of_languages_loads(root: Path) -> None:
    ds = load_mlake(root, langs="de,en")
    assert ds.langs == ("de", "en")
    assert tuple(ds.facts[2].views) == ("de", "en")
    assert ds.facts[2].views["de"].question.subject_text == "Philip Pullman"
    assert set(ds.multi_hop) == {"de", "en"}


def test_mlake_data_env_var_is_used(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(root))
    ds = load_mlake(langs="en")
    assert ds.root == root
    assert len(ds) == 3


def test_data_dir_takes_precedence_over_env(
    root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "does-not-exist"))
    ds = load_mlake(root, langs="en")
    assert ds.root == root


# --- malformed files ---------------------------------------------------------------------------


def test_malformed_json_names_file_line_and_column(root: Path) -> None:
    path = single_path(root, "en")
    path.write_text('[\n {"question": "Where did Carl Sagan work?",\n  "o_prompt": ,\n')
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: malformed JSON at line 3 column 15: Expecting value"


def test_not_utf8_names_file_and_byte(root: Path) -> None:
    path = single_path(root, "zh")
    path.write_bytes(b'[{"question": "\xff"}]')
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: not UTF-8 text (invalid start byte at byte 15)"


def test_file_that_is_not_a_list(root: Path) -> None:
    path = single_path(root, "ja")
    edit_json(path, lambda recs: {"records": recs})
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: expected a JSON list of records, found dict"


def test_record_that_is_not_an_object(root: Path) -> None:
    path = single_path(root, "zh")

    def corrupt(recs: Records) -> None:
        recs[2] = "菲利普·普尔曼是哪个知名学府的雇员？"

    edit_json(path, corrupt)
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: record 2: expected an object, found str"


# --- bad records -------------------------------------------------------------------------------


def test_missing_field(root: Path) -> None:
    path = single_path(root, "fr")
    drop_field(path, 1, "o_answer")
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: record 1: missing field 'o_answer'"


def test_missing_field_in_unrequested_language_is_still_reported(root: Path) -> None:
    # All five languages are read whatever is asked (subjects use every language).
    path = single_path(root, "fr")
    drop_field(path, 1, "o_answer")
    with pytest.raises(DataError) as exc:
        load_mlake(root, langs="en")
    assert str(exc.value) == f"{path}: record 1: missing field 'o_answer'"


@pytest.mark.parametrize(
    "aliases",
    ["Cornell University", ["Cornell", 3], {"Cornell": 1}],
    ids=["string", "list-with-int", "object"],
)
def test_aliases_not_a_list_of_strings(root: Path, aliases: Any) -> None:
    path = single_path(root, "de")

    def corrupt(recs: Records) -> None:
        recs[0]["o_answer_aliases"] = aliases

    edit_json(path, corrupt)
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == (
        f"{path}: record 0: field 'o_answer_aliases' must be a list of strings"
    )


def test_text_field_of_wrong_type(root: Path) -> None:
    path = single_path(root, "en")

    def corrupt(recs: Records) -> None:
        recs[2]["question"] = 42

    edit_json(path, corrupt)
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: record 2: field 'question' must be a string, found int"


def test_empty_answer(root: Path) -> None:
    path = single_path(root, "ja")

    def corrupt(recs: Records) -> None:
        recs[1]["e_answer"] = "  "

    edit_json(path, corrupt)
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: record 1: field 'e_answer' is empty"


def test_multi_hop_record_missing_edit_sentence(root: Path) -> None:
    path = multi_path(root, "new", "zh")
    drop_field(path, 0, "e_prompt")
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: record 0: missing field 'e_prompt'"


def test_multi_hop_malformed_triples(root: Path) -> None:
    path = multi_path(root, "old", "en")

    def corrupt(recs: Records) -> None:
        recs[1]["triples"] = [["Q410", "P108"]]

    edit_json(path, corrupt)
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: record 1: malformed triple ['Q410', 'P108']"


# --- inconsistent or missing files -------------------------------------------------------------


def test_language_files_of_different_lengths(root: Path) -> None:
    edit_json(single_path(root, "de"), lambda recs: recs[:2])
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    msg = str(exc.value)
    assert msg.startswith("single-hop files are not parallel (record counts differ): ")
    counts = {"en": 3, "zh": 3, "ja": 3, "fr": 3, "de": 2}
    detail = ", ".join(f"{single_path(root, lang)}: {n}" for lang, n in counts.items())
    assert msg.endswith(detail)


def test_missing_language_file(root: Path) -> None:
    path = single_path(root, "ja")
    path.unlink()
    with pytest.raises(DataError) as exc:
        load_mlake(root, langs="en")
    assert str(exc.value) == f"{path}: file not found"


def test_missing_multi_hop_file(root: Path) -> None:
    path = multi_path(root, "old", "de")
    path.unlink()
    with pytest.raises(DataError) as exc:
        load_mlake(root)
    assert str(exc.value) == f"{path}: file not found"


def test_missing_release_folder(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError) as exc:
        load_mlake(empty)
    msg = str(exc.value)
    assert msg.startswith(f"{empty / VERSION / 'dataset'}: release {VERSION} not found ")
    assert f"under data directory {empty}" in msg
    assert f"`mlake data fetch --version {VERSION}`" in msg


def test_other_release_missing(root: Path) -> None:
    with pytest.raises(DataError) as exc:
        load_mlake(root, version="v2024-04")
    msg = str(exc.value)
    assert msg.startswith(f"{root / 'v2024-04' / 'dataset'}: release v2024-04 not found ")
    assert "`mlake data fetch --version v2024-04`" in msg


# --- bad options -------------------------------------------------------------------------------


def test_unknown_language_in_load_mlake(root: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_mlake(root, langs="en,xx")
    assert str(exc.value) == "unknown language code(s) 'xx'; MLaKE languages are en, zh, ja, fr, de"


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("en,xx", "unknown language code(s) 'xx'; MLaKE languages are en, zh, ja, fr, de"),
        (["EN", "zh", "jp"], "unknown language code(s) 'EN', 'jp'; MLaKE languages are"),
        ("all,en", "unknown language code(s) 'all'; MLaKE languages are"),
        ("", "empty language list; choose from en, zh, ja, fr, de"),
        (" , ", "empty language list; choose from en, zh, ja, fr, de"),
        ([], "empty language list; choose from en, zh, ja, fr, de"),
    ],
)
def test_parse_langs_rejects(value: Any, message: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_langs(value)
    assert str(exc.value).startswith(message)


def test_parse_langs_accepts() -> None:
    assert parse_langs(None) == LANGUAGES
    assert parse_langs("all") == LANGUAGES
    assert parse_langs(" zh , en,zh,") == ("zh", "en")
    assert parse_langs(("de", "fr")) == ("de", "fr")


def test_unknown_version(root: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        load_mlake(root, version="v2025-01")
    assert str(exc.value) == "unknown MLaKE version 'v2025-01'; known versions: v2024-11, v2024-04"


def test_data_dir_that_does_not_exist(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir"
    with pytest.raises(DataError) as exc:
        load_mlake(missing)
    assert str(exc.value) == f"--data-dir {missing}: no such directory"


def test_data_dir_that_is_a_file(root: Path) -> None:
    path = single_path(root, "en")
    with pytest.raises(DataError) as exc:
        load_mlake(path)
    assert str(exc.value) == f"--data-dir {path}: no such directory"


def test_env_var_pointing_nowhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    missing = str(tmp_path / "nowhere")
    monkeypatch.setenv(ENV_VAR, missing)
    with pytest.raises(DataError) as exc:
        load_mlake()
    assert str(exc.value) == f"MLAKE_DATA={missing}: no such directory"


# --- the command line --------------------------------------------------------------------------


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(rc: int, out: str, err: str, expected: str) -> None:
    assert rc == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.count("\n") == 1 and err.endswith("\n")
    assert err.startswith("mlake: error: ")
    assert expected in err


def test_cli_bad_data_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no-such-dir"
    rc, out, err = run_cli(capsys, "data", "stats", "--data-dir", str(missing))
    assert_one_line_error(rc, out, err, f"--data-dir {missing}: no such directory")
    assert err == f"mlake: error: --data-dir {missing}: no such directory\n"


def test_cli_bad_env_var(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = str(tmp_path / "nowhere")
    monkeypatch.setenv(ENV_VAR, missing)
    rc, out, err = run_cli(capsys, "data", "show", "0")
    assert_one_line_error(rc, out, err, f"MLAKE_DATA={missing}: no such directory")


def test_cli_unknown_language(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "data", "show", "0", "--langs", "en,xx", "--data-dir", str(root))
    assert_one_line_error(rc, out, err, "unknown language code(s) 'xx'")


def test_cli_unknown_version(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "data", "stats", "--version", "v1999", "--data-dir", str(root))
    assert_one_line_error(rc, out, err, "unknown MLaKE version 'v1999'")


@pytest.mark.parametrize("fact_id", ["3", "-1", "1000000"])
def test_cli_fact_id_out_of_range(
    root: Path, capsys: pytest.CaptureFixture[str], fact_id: str
) -> None:
    rc, out, err = run_cli(capsys, "data", "show", fact_id, "--data-dir", str(root))
    assert_one_line_error(rc, out, err, f"fact id {fact_id} out of range: v2024-11 has facts 0..2")


def test_cli_corrupt_file(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = single_path(root, "fr")
    drop_field(path, 1, "o_answer")
    rc, out, err = run_cli(capsys, "data", "stats", "--data-dir", str(root))
    assert_one_line_error(rc, out, err, f"{path}: record 1: missing field 'o_answer'")


def test_cli_show_valid_synthetic(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = run_cli(capsys, "data", "show", "1", "--json", "--data-dir", str(root))
    assert rc == 0 and err == ""
    fact = json.loads(out)
    assert fact["fact_id"] == 1
    assert list(fact["views"]) == list(LANGUAGES)
    en = fact["views"]["en"]["question"]
    assert en["subject"] == {"start": 23, "end": 39, "text": "Brandon Jennings"}
    assert en["target"] == {"text": "point guard", "aliases": []}
    assert en["edit_target"] == {"text": "cornerback", "aliases": ["CB", "corner"]}


# --- mlake data fetch --------------------------------------------------------------------------


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        dirs = sorted({str(Path(name).parent) for name in files} - {"."})
        for d in dirs:
            info = tarfile.TarInfo(d)
            info.type = tarfile.DIRTYPE
            info.mode = 0o755
            tar.addfile(info)
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _offline(url: str, timeout: float | None = None) -> Any:
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


def test_archive_url_is_pinned() -> None:
    assert archive_url(RELEASES[VERSION]) == URL_V2024_11


def test_fetch_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    dest = tmp_path / "mlake_data"
    with pytest.raises(DataError) as exc:
        fetch_release(VERSION, dest)
    msg = str(exc.value)
    assert msg.startswith(f"could not download MLaKE {VERSION} from {URL_V2024_11}: ")
    assert "Temporary failure in name resolution" in msg
    assert str(dest / VERSION / "dataset") in msg
    assert not dest.exists()  # nothing half-written


def test_cli_fetch_without_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    dest = tmp_path / "mlake_data"
    rc, out, err = run_cli(capsys, "data", "fetch", "--dest", str(dest))
    assert_one_line_error(rc, out, err, f"from {URL_V2024_11}:")


def test_fetch_writes_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    en = json.dumps(_real_records()[0]["en"], ensure_ascii=False).encode()
    payload = _tar_gz(
        {
            "MLaKE-abc/README.md": b"# MLaKE\n",
            "MLaKE-abc/dataset/single_hop/en_qa.json": en,
        }
    )
    calls: list[tuple[str, float | None]] = []

    def fake_urlopen(url: str, timeout: float | None = None) -> io.BytesIO:
        calls.append((url, timeout))
        return io.BytesIO(payload)

    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    dest = tmp_path / "mlake_data"
    target = fetch_release(VERSION, dest, timeout=5.0)
    assert calls == [(URL_V2024_11, 5.0)]
    assert target == dest / VERSION / "dataset"
    written = dest / VERSION / "dataset" / "single_hop" / "en_qa.json"
    assert written.read_bytes() == en
    assert sorted(p.name for p in (dest / VERSION).iterdir()) == ["dataset"]  # no temp left
    assert not list(dest.rglob("README.md"))  # only dataset/ is extracted


def test_fetch_keeps_existing_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", _offline)
    target = tmp_path / VERSION / "dataset"
    target.mkdir(parents=True)
    assert fetch_release(VERSION, tmp_path) == target  # no download attempted


def test_fetch_force_replaces_release(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _tar_gz({"MLaKE-abc/dataset/single_hop/en_qa.json": b"[]"})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    stale = tmp_path / VERSION / "dataset" / "stale.json"
    stale.parent.mkdir(parents=True)
    stale.write_text("[]")
    fetch_release(VERSION, tmp_path, force=True)
    assert not stale.exists()
    assert (tmp_path / VERSION / "dataset" / "single_hop" / "en_qa.json").read_text() == "[]"


def test_cli_fetch_writes_release(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = _tar_gz({"MLaKE-abc/dataset/single_hop/en_qa.json": b"[]"})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    dest = tmp_path / "mlake_data"
    rc, out, err = run_cli(capsys, "data", "fetch", "--dest", str(dest), "--version", VERSION)
    assert rc == 0 and err == ""
    assert out.splitlines()[0] == f"MLaKE {VERSION}: {dest / VERSION / 'dataset'}"
    assert (dest / VERSION / "dataset" / "single_hop" / "en_qa.json").is_file()
    assert not (dest / "v2024-04").exists()


def test_fetch_archive_without_dataset(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    payload = _tar_gz({"MLaKE-abc/README.md": b"# MLaKE\n"})
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(payload))
    with pytest.raises(DataError) as exc:
        fetch_release(VERSION, tmp_path)
    assert str(exc.value) == f"{URL_V2024_11}: archive has no dataset/ folder"
    assert not (tmp_path / VERSION / "dataset").exists()


def test_fetch_payload_not_an_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: io.BytesIO(b"<html>429</html>")
    )
    with pytest.raises(DataError, match=URL_V2024_11):
        fetch_release(VERSION, tmp_path)


class _TruncatedResponse(io.BytesIO):
    def read(self, *args: Any) -> bytes:
        raise http.client.IncompleteRead(b"\x1f\x8b", 1000)


def test_fetch_connection_dropped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout=None: _TruncatedResponse())
    with pytest.raises(DataError, match=URL_V2024_11):
        fetch_release(VERSION, tmp_path)
