"""Knowledge without original answers (MzsRE, BMIKE-53 zsRE) is "not measurable": the
summary gives NaN, never a number, for every original-answer column, also for tables saved
before ``prefers_original`` was left unset there; rows with original answers keep theirs;
``mlake eval knowledge``'s text says so (issue 22 §3)."""

from __future__ import annotations

import math

import pandas as pd

from mlake.commands.eval import format_summary
from mlake_core.metrics.knowledge import COLUMNS, KnowledgeResult


def _rec(fact, lang, target, prefers, match, logp):
    rec = dict.fromkeys(COLUMNS)
    rec.update(
        fact_id=fact,
        lang=lang,
        form="question",
        target=target,
        edit_target="new",
        target_logp=logp,
        target_logp_mean=logp,
        prefers_original=prefers,
        greedy_match=match,
        mcqa_correct=None,
        mcqa_correct_norm=None,
    )
    return rec


def _summary(records, langs):
    table = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    return KnowledgeResult(table, {}, langs, tuple({r["fact_id"] for r in records})).summary()


def test_no_original_answers_give_nan_not_zero() -> None:
    records = [
        # en: an original answer, known, prefers it.
        _rec(0, "en", "Paris", True, "original", -1.0),
        _rec(1, "en", "Rome", False, "none", -3.0),
        # zh: no original answer (prefers_original unset, as measure_knowledge leaves it).
        _rec(0, "zh", "", None, "edit", math.nan),
        _rec(1, "zh", "", None, "none", math.nan),
        # de: a table saved before: False and an empty target.
        _rec(0, "de", "", False, "none", math.nan),
    ]
    s = _summary(records, ("en", "zh", "de"))
    en = s.loc["en"]
    assert (en["facts"], en["known"], en["greedy"], en["prefers_original"]) == (2, 1, 0.5, 0.5)
    assert en["target_logp"] == -2.0 and bool(en["measurable"])
    for lang in ("zh", "de"):
        row = s.loc[lang]
        assert row["facts"] == (2 if lang == "zh" else 1)
        for col in ("known", "greedy", "prefers_original", "target_logp", "target_logp_mean"):
            assert math.isnan(row[col]), (lang, col)
        assert not bool(row["measurable"])


def test_eval_knowledge_text_says_not_measurable() -> None:
    s = _summary(
        [_rec(0, "en", "Paris", True, "original", -1.0), _rec(0, "zh", "", None, "none", math.nan)],
        ("en", "zh"),
    )
    languages = {
        lang: {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        for lang, row in s.to_dict(orient="index").items()
    }
    report = {
        "model": "m",
        "backend": "tlens",
        "dtype": "float32",
        "device": "cpu",
        "template": {"name": "qa"},
        "data_version": "mzsre",
        "dataset": "MzsRE",
        "n_facts": 1,
        "facts": 1,
        "skipped": {},
        "results": "r",
        "seconds": 0.1,
        "languages": languages,
    }
    text = format_summary(report)
    assert "; MzsRE (--dataset mzsre); 1 facts" in text.splitlines()[0]
    zh = next(line for line in text.splitlines() if line.startswith("zh "))
    assert zh.split()[:4] == ["zh", "1", "-", "-"]  # facts, known, greedy%, p(o)>p(e)%
    en = next(line for line in text.splitlines() if line.startswith("en "))
    assert en.split()[:4] == ["en", "1", "1", "100.0"]
    assert "zh: known, greedy%, p(o)>p(e)% and logp not measurable (no original answers)" in text
    assert "en:" not in text
