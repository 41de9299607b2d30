"""Coverage statistics of a loaded MLaKE dataset (``mlake data stats``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from mlake_core.data.dataset import MlakeDataset


def dataset_stats(ds: MlakeDataset) -> dict[str, Any]:
    """Per-language coverage of subjects, cloze prompts and multi-hop links.

    Returns:
        A JSON-serialisable dict: ``version``, ``data_dir``, ``facts`` and ``languages``
        (one entry per language).  Every unusable view is listed under ``unusable`` with
        its reason and fact ids, so no record is dropped silently.
    """
    langs: dict[str, Any] = {}
    for lang in ds.langs:
        views = ds.views(lang)
        q_reasons: dict[str, list[int]] = {}
        c_reasons: dict[str, list[int]] = {}
        for v in views:
            if not v.question.usable:
                q_reasons.setdefault("subject_not_found", []).append(v.fact_id)
            if not v.cloze.usable:
                c_reasons.setdefault(v.cloze.reason or "unknown", []).append(v.fact_id)
        mh = ds.multi_hop.get(lang, [])
        links = {kind: Counter(q.link for q in mh if q.kind == kind) for kind in ("old", "new")}
        entry: dict[str, Any] = {
            "records": len(views),
            "subject_found": {
                "question": sum(v.question.subject is not None for v in views),
                "cloze": sum(v.cloze.subject is not None for v in views),
            },
            "cloze_well_posed": sum(v.cloze.usable for v in views),
            "answer_located": sum(v.answer is not None for v in views),
            "answer_at_end": sum(v.answer_at_end for v in views),
            "answer_method": dict(Counter(v.answer_method or "not_found" for v in views)),
            "prefix_is_question_start": sum(v.prefix_is_question_start for v in views),
            "multi_hop": {
                kind: {
                    "records": sum(c.values()),
                    "linked": sum(q.linked for q in mh if q.kind == kind),
                    "ambiguous": c.get("ambiguous", 0),
                    "unlinked": c.get("unlinked", 0),
                    "by_link": dict(c),
                }
                for kind, c in links.items()
            },
            "facts_with_multi_hop": len({fid for q in mh if q.linked for fid in q.fact_ids}),
            "unusable": {
                "question": {r: {"count": len(ids), "facts": ids} for r, ids in q_reasons.items()},
                "cloze": {
                    r: {"count": len(ids), "facts": ids} for r, ids in sorted(c_reasons.items())
                },
            },
        }
        if any(v.mcqa for v in views):
            entry["mcqa"] = {
                "single_hop": sum(v.mcqa is not None for v in views),
                "multi_hop": sum(bool(q.options) for q in mh),
                "unusable": {
                    "single_hop": [v.fact_id for v in views if v.mcqa and not v.mcqa.usable],
                    "multi_hop": [
                        f"{q.kind}#{q.index}: {q.mcqa_problem}" for q in mh if q.mcqa_problem
                    ],
                },
            }
        entry["multi_hop_with_triples"] = sum(bool(q.triples) for q in mh)
        langs[lang] = entry
    return {
        "version": ds.version,
        "data_dir": str(ds.root),
        "facts": len(ds.facts),
        "languages": langs,
    }


def _mcqa_cell(s: dict[str, Any]) -> str:
    if "mcqa" not in s:
        return "-"
    m = s["mcqa"]
    bad = len(m["unusable"]["single_hop"]) + len(m["unusable"]["multi_hop"])
    return f"{m['single_hop']}/{m['multi_hop']}" + (f" ({bad} unusable)" if bad else "")


def format_stats(stats: dict[str, Any]) -> str:
    """A human-readable table of :func:`dataset_stats` output."""
    langs = list(stats["languages"])
    rows: list[tuple[str, list[str]]] = []

    def add(label: str, fn: Any) -> None:
        rows.append((label, [str(fn(stats["languages"][lang])) for lang in langs]))

    def pct(n: int, d: int) -> str:
        return f"{n} ({100 * n / d:.1f}%)" if d else str(n)

    add("records", lambda s: s["records"])
    add("subject found, question form", lambda s: pct(s["subject_found"]["question"], s["records"]))
    add("subject found, cloze form", lambda s: pct(s["subject_found"]["cloze"], s["records"]))
    add("answer located in o_prompt", lambda s: pct(s["answer_located"], s["records"]))
    add("answer at end of o_prompt", lambda s: pct(s["answer_at_end"], s["records"]))
    add("cloze well-posed", lambda s: pct(s["cloze_well_posed"], s["records"]))
    add("cloze prefix = question start", lambda s: s["prefix_is_question_start"])
    for kind in ("old", "new"):
        add(
            f"multi-hop {kind}: linked/ambig./unlinked",
            lambda s, k=kind: "{linked}/{ambiguous}/{unlinked}".format(**s["multi_hop"][k]),
        )
    add("facts with linked multi-hop", lambda s: s["facts_with_multi_hop"])
    if any("mcqa" in stats["languages"][lang] for lang in langs):
        add("mcqa single-hop / multi-hop", _mcqa_cell)
    reasons = sorted({r for lang in langs for r in stats["languages"][lang]["unusable"]["cloze"]})
    for r in reasons:
        add(
            f"  cloze unusable: {r}",
            lambda s, r=r: s["unusable"]["cloze"].get(r, {"count": 0})["count"],
        )
    q_reasons = sorted(
        {r for lang in langs for r in stats["languages"][lang]["unusable"]["question"]}
    )
    for r in q_reasons:
        add(
            f"  question unusable: {r}",
            lambda s, r=r: s["unusable"]["question"].get(r, {"count": 0})["count"],
        )
    width = max(len(label) for label, _ in rows)
    colw = [max(len(lang), *(len(vals[i]) for _, vals in rows)) for i, lang in enumerate(langs)]
    lines = [
        f"MLaKE {stats['version']} ({stats['data_dir']}): {stats['facts']} facts",
        " " * width + "  " + "  ".join(lang.rjust(w) for lang, w in zip(langs, colw, strict=True)),
    ]
    for label, vals in rows:
        cells = "  ".join(v.rjust(w) for v, w in zip(vals, colw, strict=True))
        lines.append(f"{label.ljust(width)}  {cells}")
    return "\n".join(lines)
