"""``mlake probe`` end to end on the micro mlake-tiny (its 6 facts in three languages): the
report, the run folders, the printed numbers against the saved summary, resuming, --json with
the pair matrices, --known-only, and bad options."""

from __future__ import annotations

import contextlib
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

import mlake_core.data.dataset as dataset_module
from mlake.cli import main
from probes.config import load_probe_result, pair_matrices

pytestmark = pytest.mark.slow

LANGS = ("en", "zh", "fr")


@pytest.fixture(scope="module", autouse=True)
def cached_data():
    """Each ``mlake`` call loads the data; load it once per module."""
    real = dataset_module.load_mlake
    cache: dict = {}

    def load(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in cache:
            cache[key] = real(*args, **kwargs)
        return cache[key]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(dataset_module, "load_mlake", load)
        yield


def _call(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def first(micro_tiny: Path, tmp_path_factory):
    root = tmp_path_factory.mktemp("probe_runs")
    args = ("probe", "--model", str(micro_tiny), "--langs", ",".join(LANGS), "--device", "cpu")
    args += ("--folds", "3", "--inner-folds", "2", "--cs", "0.01,1", "--results-dir", str(root))
    code, text, err = _call(*args)
    assert code == 0, err
    summary = next(root.glob("probes/*/summary.json"))
    return SimpleNamespace(root=root, args=args, text=text, err=err, run=summary.parent)


def test_report(first):
    lines = first.text.splitlines()
    assert lines[0].startswith("model ") and lines[0].endswith(f"; 6 facts; {first.run}")
    assert re.match(r"probed \(question form\): en 6 \(usable 6, known \d\), zh 6", lines[1])
    for heading in (
        "language identity per layer",
        "which-fact retrieval through a learned map: mean over ordered language pairs",
        "== subject position, layer",
        "== last position, layer",
        "representation similarity of the same facts: debiased linear CKA",
        "same-fact cosine (each language centred)",
    ):
        assert heading in first.text, heading
    # Six facts share no answer: the answer task is left out, and says why.
    assert "cross-lingual answer probe" not in first.text
    assert "left out: answer task:answer shared by fewer than 4 facts 6" in first.text
    assert "probes [transfer]: computed" in first.err


def test_printed_numbers_are_the_saved_ones(first):
    result = load_probe_result(first.run)
    assert result.langs == LANGS
    assert result.sites == ("resid_pre.0", "resid_post.0", "resid_post.1")
    rows = [ln.split() for ln in first.text.splitlines() if re.match(r"  (emb|\d) +resid_", ln)]
    assert [r[0] for r in rows] == ["emb", "1", "2"]
    lid = result.language_id
    for layer, row in enumerate(rows):
        for p, position in enumerate(("subject", "last")):
            saved = lid[(lid["position"] == position) & (lid["layer"] == layer)].iloc[0]
            printed = [float(x) for x in row[2 + 4 * p : 5 + 4 * p]]
            expected = [saved["accuracy"], saved["control"], saved["selectivity"]]
            assert printed == pytest.approx(expected, abs=0.006)
            # Then whether the probe has signal (above control and chance).
            signal = result.language_id_signal(position, layer)[0]
            assert row[5 + 4 * p] == {True: "yes", False: "no", None: "-"}[signal]
    # Layer 0 at the last token: the same ':' embedding everywhere, so exactly chance: no
    # signal.
    assert rows[0][6:10] == ["0.33", "0.33", "0.00", "no"]
    # The CKA matrix printed for the subject position is pair_matrices' one.
    cka = pair_matrices(result, "subject")["rep_similarity_cka"]
    block = first.text.split("== subject position")[1].split("debiased linear CKA\n")[1]
    printed = [ln.split()[1:] for ln in block.splitlines()[1:4]]
    assert np.allclose(np.array(printed, dtype=float), cka.to_numpy(), atol=0.006)


def test_run_folders(first):
    acts = next(first.root.glob("probe_activations/*"))
    assert sorted(p.name for p in (acts / "arrays").iterdir()) == [
        f"acts_{lang}.npz" for lang in sorted(LANGS)
    ]
    meta = json.loads((first.run / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["langs"] == list(LANGS)
    assert len(meta["fact_ids"]) == 6
    for name in ("language_id", "transfer", "similarity"):
        assert (first.run / "tables" / f"{name}.parquet").is_file()
    table = pd.read_parquet(first.run / "tables" / "transfer.parquet")
    assert set(table["task"]) == {"fact"} and len(table) == 2 * 3 * 9


def test_resume_and_json(first):
    code, text, err = _call(*first.args, "--json")
    assert code == 0, err
    assert err.count("loaded from") >= len(LANGS) + 3 + 1  # activations, tables, knowledge
    assert "computed" not in err.replace("loaded from", "")
    report = json.loads(text)
    assert report["run_path"] == str(first.run)
    saved = json.loads((first.run / "summary.json").read_text())
    for key in ("language_id", "transfer", "similarity", "counts", "skipped", "sites"):
        assert report[key] == saved[key], key
    pm = report["pair_matrices"]["subject"]
    assert set(pm) == {"fact_retrieval", "rep_similarity_cka", "rep_similarity_cosine"}
    assert pm["rep_similarity_cka"]["attrs"]["position"] == "subject"
    assert len(pm["fact_retrieval"]["matrix"]) == 3
    assert [row[i] for i, row in enumerate(pm["rep_similarity_cka"]["matrix"])] == [1.0] * 3


def test_known_only(first):
    code, text, err = _call(*first.args, "--known-only", "--folds", "2")
    known = json.loads((first.run / "summary.json").read_text())["counts"]
    n_known = {lang: c["known"] for lang, c in known.items()}
    if min(n_known.values()) < 2:
        assert code == 2 and "only" in err
        return
    assert code == 0, err
    line = text.splitlines()[1]
    for lang in LANGS:
        assert f"{lang} " in line and f"known {n_known[lang]})" in line


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--folds", "1"), "--folds 1: must be at least 2"),
        # The values reach the config as parsed lists (the one coercion): fragments.
        (("--cs", "a,b"), ("--cs ", "'a'", "'b'", ": expected comma-separated numbers")),
        (("--alphas", "-1"), ("--alphas ", "'-1'", ": expected one or more positive numbers")),
        (("--min-class-facts", "1"), "--min-class-facts 1: must be at least 2"),
        (("--langs", "en"), "--langs en: probes compare languages; give at least two"),
        (("--langs", "en,xx"), "unknown language code(s) 'xx'"),
        (("--facts", "0"), "--facts 0: must be at least 1"),
        (("--batch-size", "0"), "--batch-size 0: must be at least 1"),
        (("--folds", "7"), "--folds 7: only 6 facts can be probed"),
    ],
)
def test_bad_options(first, extra, message):
    before = sorted(p.name for p in (first.root / "probes").iterdir())
    code, out, err = _call(*first.args, *extra)
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    fragments = message if isinstance(message, tuple) else (message,)
    assert last.startswith("mlake: error:") and all(f in last for f in fragments), last
    assert out == ""
    assert sorted(p.name for p in (first.root / "probes").iterdir()) == before  # no run opened
