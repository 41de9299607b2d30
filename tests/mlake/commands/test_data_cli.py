"""``mlake data`` on the real MLaKE releases (slow: every load takes several seconds).

Data directory: ``$MLAKE_DATA`` if set, else ``../shared/mlake`` next to the repository root;
the tests are skipped when it is absent.  Expected counts are taken from the raw json files,
independently of the loader.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from mlake.cli import main
from mlake_core.data import MlakeDataset, load_mlake
from mlake_core.data.paths import ENV_VAR, repo_root
from mlake_core.data.text import normalize
from mlake_core.languages import LANGUAGES

pytestmark = pytest.mark.slow

N_FACTS = 1072
SUBJECTS_FACT_0 = {
    "en": "Carl Sagan",
    "zh": "卡尔·萨根",
    "ja": "カール・セーガン",
    "fr": "Carl Sagan",
    "de": "Carl Sagan",
}


def data_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env) if env else repo_root().parent / "shared" / "mlake"


def require(version: str) -> Path:
    base = data_dir() / version / "dataset"
    if not base.is_dir():
        pytest.skip(f"real MLaKE {version} not found at {base}")
    return base


@cache
def raw(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as fh:
        return json.load(fh)


def run_cli(*argv: str) -> tuple[int, str, str]:
    """Run ``mlake`` in-process; return (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([*argv, "--data-dir", str(data_dir())])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def ds() -> MlakeDataset:
    require("v2024-11")
    return load_mlake(data_dir())


@pytest.fixture(scope="module")
def stats_json() -> dict[str, Any]:
    require("v2024-11")
    rc, out, err = run_cli("data", "stats", "--json")
    assert (rc, err) == (0, "")
    return json.loads(out)


def test_stats_json_counts(stats_json: dict[str, Any]) -> None:
    base = require("v2024-11")
    assert stats_json["version"] == "v2024-11"
    assert stats_json["data_dir"] == str(data_dir())
    assert stats_json["facts"] == N_FACTS
    assert list(stats_json["languages"]) == list(LANGUAGES)
    for lang, entry in stats_json["languages"].items():
        assert entry["records"] == N_FACTS, lang
        assert entry["records"] == len(raw(base / "single_hop" / f"{lang}_qa.json"))
        assert entry["subject_found"]["question"] >= 0.95 * N_FACTS, lang
        assert entry["subject_found"]["question"] <= N_FACTS
        # every fact without a question-form subject is listed, and only those
        q_missing = entry["unusable"]["question"].get("subject_not_found", {"count": 0})
        assert entry["subject_found"]["question"] + q_missing["count"] == N_FACTS, lang
        # the cloze form: well-posed plus every unusable reason covers each fact exactly once
        reasons = entry["unusable"]["cloze"]
        assert entry["cloze_well_posed"] + sum(r["count"] for r in reasons.values()) == N_FACTS
        listed = [fid for r in reasons.values() for fid in r["facts"]]
        assert len(listed) == len(set(listed)), lang
        assert all(r["count"] == len(r["facts"]) for r in reasons.values())
        # multi-hop record counts are the raw file lengths
        for kind in ("old", "new"):
            mh = entry["multi_hop"][kind]
            assert mh["records"] == len(raw(base / "multi_hop" / f"{kind}_{lang}_qa.json"))
            assert mh["linked"] + mh["ambiguous"] + mh["unlinked"] == mh["records"]
        assert "mcqa" not in entry  # v2024-11 has no multiple-choice files


def test_stats_json_new_multi_hop_all_linked(stats_json: dict[str, Any]) -> None:
    for lang, entry in stats_json["languages"].items():
        new = entry["multi_hop"]["new"]
        assert new["records"] > 0
        assert new["linked"] == new["records"], lang
        assert new["by_link"] == {"e_prompt": new["records"]}, lang


def test_new_multi_hop_linked_to_the_fact_with_that_edit(ds: MlakeDataset) -> None:
    base = require("v2024-11")
    english = raw(base / "single_hop" / "en_qa.json")
    for lang in LANGUAGES:
        new = [q for q in ds.multi_hop[lang] if q.kind == "new"]
        assert len(new) == len(raw(base / "multi_hop" / f"new_{lang}_qa.json"))
        unlinked = [q.index for q in new if not q.linked or len(q.fact_ids) != 1]
        assert unlinked == [], lang
        wrong = [
            q.index
            for q in new
            if normalize(english[q.fact_ids[0]]["e_prompt"]) != normalize(q.e_prompt or "")
        ]
        assert wrong == [], lang
        # and each linked question is attached to its fact
        for q in new[:50]:
            assert q in ds.facts[q.fact_ids[0]].multi_hop


def test_stats_table_lists_every_language() -> None:
    rc, out, err = run_cli("data", "stats")
    assert (rc, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"MLaKE v2024-11 ({data_dir()}): {N_FACTS} facts"
    assert lines[1].split() == list(LANGUAGES)
    records = next(line for line in lines if line.startswith("records "))
    assert records.split()[1:] == [str(N_FACTS)] * 5
    assert any(line.startswith("subject found, question form") for line in lines)


def test_show_fact_0_json(ds: MlakeDataset) -> None:
    base = require("v2024-11")
    rc, out, err = run_cli("data", "show", "0", "--json")
    assert (rc, err) == (0, "")
    fact = json.loads(out)
    assert fact["fact_id"] == 0
    assert list(fact["views"]) == list(LANGUAGES)
    for lang, view in fact["views"].items():
        q = view["question"]
        assert q["text"] == raw(base / "single_hop" / f"{lang}_qa.json")[0]["question"]
        subj = q["subject"]
        assert isinstance(subj["text"], str)
        assert isinstance(subj["start"], int) and isinstance(subj["end"], int)
        assert 0 <= subj["start"] < subj["end"] <= len(q["text"])
        assert q["text"][subj["start"] : subj["end"]] == subj["text"], lang
        assert subj["text"] == SUBJECTS_FACT_0[lang], lang
        assert q["usable"] is True and q["reason"] is None
        cloze = view["cloze"]
        if cloze["subject"] is not None:
            c = cloze["subject"]
            assert cloze["text"][c["start"] : c["end"]] == c["text"], lang
        # the CLI shows what the library loads
        assert q == ds.facts[0].views[lang].question.to_dict()
    en = fact["views"]["en"]["question"]
    assert en["target"]["text"] == "Cornell University"
    assert en["edit_target"]["text"] == "BBC"
    assert fact["multi_hop"], "fact 0 has linked multi-hop questions"
    assert all(0 in m["fact_ids"] for m in fact["multi_hop"])
    assert {m["lang"] for m in fact["multi_hop"]} == set(LANGUAGES)


def test_stats_v2024_04_reports_mcqa() -> None:
    base = require("v2024-04")
    rc, out, err = run_cli("data", "stats", "--version", "v2024-04", "--json")
    assert (rc, err) == (0, "")
    stats = json.loads(out)
    assert stats["version"] == "v2024-04"
    assert stats["facts"] == N_FACTS
    for lang, entry in stats["languages"].items():
        n_mh = sum(
            len(raw(base / "multi_hop" / "mcqa" / f"{kind}_{lang}_mcqa.json"))
            for kind in ("old", "new")
        )
        assert entry["mcqa"]["single_hop"] == len(
            raw(base / "single_hop" / "mcqa" / f"{lang}_mcqa.json")
        )
        assert entry["mcqa"]["multi_hop"] == n_mh
        assert entry["mcqa"]["single_hop"] == N_FACTS
        # Seven published records have an empty option: kept, counted, named.
        expected_bad = {
            "fr": ["new#54", "new#254", "new#393", "new#409"],
            "de": ["new#257", "new#350", "new#711"],
        }.get(lang, [])
        bad = [b.split(":")[0] for b in entry["mcqa"]["unusable"]["multi_hop"]]
        assert bad == expected_bad
        assert entry["mcqa"]["unusable"]["single_hop"] == []
