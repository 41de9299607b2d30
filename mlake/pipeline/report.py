"""The Markdown report of a pipeline run folder (``report.md``): what ran and how long it
took, the key tables of every stage read back from the results store, and the figures
(``figures/*.png``, as written by :func:`mlake.pipeline.figures.write_figures`).

Tables: knowledge per language; the edit-transfer matrix of each method with efficacy,
transfer and locality; causal tracing's peak layers and recommended edit layer; the
latent-language lens per prompt language (emergence layer, first language, latent English
peak: :data:`LENS_COLUMNS`, also what ``mlake lens`` prints) and its figure; cross-lingual
patching's 5x5 matrices at the best layer (what ``mlake patch`` prints) and figures; the neuron
overlap matrix and ablation check; the relation analysis (pair-level Mantel tests, the
fact-level overlap coefficient, restricted editing); probes (best layers).  A stage that did
not run is named with the reason.

Where an analysis's control equals its measurement the report says so instead of reading
results from it (each criterion is the result object's): a language where causal tracing has
no signal (:func:`analysis.tracing.summary.tracing_signal`), an attribution method whose sets
hurt no more than random ones (:meth:`analysis.neurons.config.MethodSummary.check_signal`), a
probe not above its control or chance (:func:`probes.config.probe_signal`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def _f(value: Any, digits: int = 2, pct: bool = False) -> str:
    if value is None:
        return "–"
    try:
        v = float(value)
    except (TypeError, ValueError):
        return str(value)
    if math.isnan(v):
        return "–"
    text = f"{100 * v:.1f}" if pct else f"{v:.{digits}f}"
    return text.lstrip("-") if text.lstrip("-").strip("0.") == "" else text  # no "-0.0"


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(str(h) for h in header) + " |"]
    lines.append("|" + "|".join("---" for _ in header) + "|")
    for row in rows:
        lines.append("| " + " | ".join(str(c) for c in row) + " |")
    return lines


def _matrix(frame: Any, langs: Sequence[str], *, pct: bool = False, digits: int = 2) -> list[str]:
    rows = []
    for a in langs:
        cells = []
        for b in langs:
            try:
                cells.append(_f(frame.loc[a, b], digits, pct))
            except KeyError:
                cells.append("–")
        rows.append([f"**{a}**", *cells])
    return _table(["", *langs], rows)


def _protocol_lines(rows: Any, langs: Sequence[str]) -> list[str]:
    """A transfer run's multi-hop and multiple-choice tables (the MLaKE protocol,
    :func:`analysis.transfer.protocol_cells`): each cell the % answered with the edit, the
    unedited model's % (``b``), the questions (``n``) and the edited facts they come from,
    then the facts with no question and why.  Multiple choice only where the run measured it (``--protocol mlake``)."""
    from analysis.transfer import PROTOCOL_TABLES, missing_reasons, protocol_cells

    cells = protocol_cells(rows, langs)
    out: list[str] = []
    unmeasured = not (rows["kind"] == "mcqa").any()
    for hop, fmt, what in PROTOCOL_TABLES:
        if (hop, fmt) == ("single-hop", "free-form"):
            continue  # the matrix above
        sel = cells[(cells["hop"] == hop) & (cells["format"] == fmt)]
        if fmt != "free-form" and unmeasured:
            continue
        if not (sel["n"] > 0).any():
            out += ["", f"{hop}, {fmt}: no question in any cell (see the facts missing below)."]
            continue
        by = {(c["edit_lang"], c["test_lang"]): c for c in sel.to_dict(orient="records")}
        table = [
            [
                f"**{a}**",
                *(
                    "–"
                    if not by[a, b]["n"]
                    else f"{by[a, b]['pct']:.1f} (b {_f(by[a, b]['before_pct'] / 100, pct=True)}; "
                    f"n {by[a, b]['n']} in {by[a, b]['facts']} of {by[a, b]['edits']} facts)"
                    for b in langs
                ),
            ]
            for a in langs
        ]
        out += ["", f"{hop}, {fmt} ({what}; % of questions, all edited facts):", ""]
        out += _table(["", *langs], table)
    reasons = missing_reasons(rows)
    if len(reasons):
        listed = "; ".join(
            f"{r['hop']} [{r['test_lang']}] {r['missing']}: {r['facts']}"
            for r in reasons.to_dict(orient="records")
        )
        out += ["", f"Facts with no question in a test language: {listed}."]
    if unmeasured:
        out += [
            "",
            "Multiple choice: not measured (the transfer stage ran the free-form protocol; "
            "`mlake edit transfer --protocol mlake --version v2024-04` measures it).",
        ]
    return out


def _list_matrix(values: Any, langs: Sequence[str], *, pct: bool = False) -> list[str]:
    rows = [
        [f"**{a}**", *(_f(v, 2, pct) for v in row)] for a, row in zip(langs, values, strict=False)
    ]
    return _table(["", *langs], rows)


def ablation_check_text(m: Any) -> str:
    """The verdict of one method's ablation check
    (:attr:`~analysis.neurons.config.MethodSummary.check_signal`), for the report and
    ``mlake neurons``; empty without a check."""
    from analysis.neurons.config import CHECK_ALPHA

    signal, reason = m.check_signal, m.check_no_signal_reason
    if signal is None:
        return ""
    if signal:
        return "The attributed sets hurt the answer more than random sets do."
    why = {
        "not_above_random": "they lower the answer's probability no more than random sets",
        "not_significant": "they lower the answer's probability a little more than random "
        f"sets on average, but not reliably: Wilcoxon p >= {CHECK_ALPHA:g}",
        "untested": "too few facts to test them against random sets",
    }.get(reason or "", "no test")
    return (
        "**No signal**: the attribution's sets are indistinguishable from random sets of the "
        f"same sizes ({why}).  Their overlap and the language-specific units describe the "
        "attribution scores, not units the answer depends on."
    )


#: The lens table's columns, one row per prompt language (``mlake lens`` and the report).
LENS_COLUMNS: tuple[str, ...] = (
    "lang",
    "facts",
    "median emergence layer",
    "never",
    "first language",
    "latent English peak",
    "English distinct",
)


def latent_english_peak(s: Any) -> tuple[int, float] | None:
    """Where one prompt language's latent English curve
    (:attr:`~analysis.lens.LensSummary.latent_english`) peaks: its layer and the mean
    probability there (the first such layer on a tie); ``None`` without a curve (English
    prompts, or no fact whose English token differs from the prompt language's)."""
    if not s.latent_english:
        return None
    layer = max(range(len(s.latent_english)), key=lambda i: (s.latent_english[i], -i))
    return layer, float(s.latent_english[layer])


def lens_cells(s: Any, missing: str = "–") -> list[str]:
    """One prompt language's row of the lens table (:data:`LENS_COLUMNS`; ``s``: a
    :class:`~analysis.lens.LensSummary`): the facts looked at, the median emergence layer and
    how many facts never emerge, how often each answer language is the first decodable one
    (most often first), and the latent English curve's peak (layer, mean probability) with the
    number of facts it is over."""
    median = s.median_emergence
    first = sorted(s.first_language.items(), key=lambda kv: (-kv[1], kv[0]))
    peak = latent_english_peak(s)
    return [
        s.lang,
        str(s.n_facts),
        missing if math.isnan(median) else f"{median:g}",
        str(s.never),
        ", ".join(f"{lang} {n}" for lang, n in first) or missing,
        missing if peak is None else f"layer {peak[0]}, p {peak[1]:.3g}",
        missing if s.lang == "en" else str(s.n_english_distinct),
    ]


def lens_notes(top_k: int) -> str:
    """What the lens table's columns mean (:mod:`analysis.lens`), for the report and
    ``mlake lens``."""
    return (
        "Read at the last position through the logit lens, on the facts the model answers "
        "correctly in the prompt language.  Emergence layer: the first layer where the prompt "
        f"language's answer ranks in the top {top_k}; never: facts where it does at no layer.  "
        "First language: the answer language decodable earliest (answer languages whose first "
        "token is the prompt language's are left out).  Latent English peak: the layer where the "
        "English answer's mean probability is highest, over the facts whose English first token "
        "differs from the prompt language's (English distinct)."
    )


def _probe_verdict(verdict: tuple[bool | None, str | None]) -> str:
    """A probe's :func:`~probes.config.probe_signal` in a table cell."""
    signal, reason = verdict
    if signal is None:
        return "–"
    if signal:
        return "yes"
    return {
        "not_above_baseline": "**no** (not above control/chance)",
        "not_significant": "**no** (within chance of the baseline)",
    }.get(reason or "", "**no**")


def _read(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _figure_index(out: Path) -> dict[str, Any]:
    """The run folder's ``figures/index.json`` (empty before the figures stage)."""
    path = out / "figures" / "index.json"
    return _read(path) if path.is_file() else {}


def knowledge_rows(summary: Any) -> list[list[Any]]:
    """The report's knowledge table rows (lang, facts, known, accuracy %, cloze accuracy %)
    from a knowledge run's summary; a language whose views have no original answer (another
    dataset, ``measurable`` false) is "not measurable", never a count."""
    return [
        [
            r["lang"],
            r["facts"],
            "not measurable" if r.get("measurable") is False else _f(r["known"], 0),
            _f(r["greedy"], pct=True),
            _f(r.get("cloze_greedy"), pct=True),
        ]
        for r in summary.to_dict(orient="records")
    ]


def _stage_runs(manifest: dict[str, Any], stage: str) -> dict[str, str]:
    entry = (manifest.get("stages") or {}).get(stage) or {}
    return dict(entry.get("runs") or {}) if entry.get("status") == "complete" else {}


def build_report(out: str | os.PathLike[str]) -> str:
    """The report's Markdown text for the pipeline run folder ``out``."""
    import pandas as pd
    import yaml

    from mlake.pipeline.manifest import read_manifest

    out = Path(out)
    manifest = read_manifest(out)
    config = yaml.safe_load((out / "config.yaml").read_text(encoding="utf-8"))
    prov = _read(out / "provenance.json") if (out / "provenance.json").is_file() else {}
    langs = list(config["data"]["langs"])
    lines = [
        "# mlake pipeline report",
        "",
        f"Model **{config['model']['name']}**, MLaKE {config['data']['version']}, "
        f"{config['data']['facts']} facts, languages {', '.join(langs)}.  "
        f"git {prov.get('git_commit') or 'unknown'}; seeds "
        + ", ".join(f"{k} {v}" for k, v in (prov.get("seeds") or {}).items())
        + ".  Settings: [config.yaml](config.yaml); versions: [provenance.json](provenance.json).",
        "",
        "## Stages",
        "",
    ]
    rows = []
    total = 0.0
    for name, rec in (manifest.get("stages") or {}).items():
        if name == "report" and rec.get("status") == "running":
            continue  # this report, being written
        total += float(rec.get("seconds") or 0)
        where = ", ".join(f"`{k}`" for k in (rec.get("runs") or {})) or rec.get("note") or ""
        rows.append(
            [
                name,
                rec.get("status"),
                _f(rec.get("seconds"), 1),
                _f(rec.get("cpu_seconds"), 1),
                where,
            ]
        )
    cpu = sum(float(r.get("cpu_seconds") or 0) for r in (manifest.get("stages") or {}).values())
    rows.append(["**total**", "", _f(manifest.get("seconds", total), 1), _f(cpu, 1), ""])
    lines += _table(["stage", "status", "seconds", "CPU seconds", "results"], rows)

    # Data checks.
    stats_path = out / "data_stats.json"
    if stats_path.is_file():
        stats = _read(stats_path)
        lines += ["", "## Data", "", f"MLaKE {stats['version']}: {stats['facts']} facts."]
        rows = []
        for lang, e in stats["languages"].items():
            linked = sum(int(m.get("linked", 0)) for m in (e.get("multi_hop") or {}).values())
            records = sum(int(m.get("records", 0)) for m in (e.get("multi_hop") or {}).values())
            rows.append(
                [
                    lang,
                    e["records"],
                    e["subject_found"]["question"],
                    e["cloze_well_posed"],
                    f"{linked}/{records}",
                ]
            )
        lines += [
            "",
            *_table(
                [
                    "lang",
                    "records",
                    "subject located (question)",
                    "cloze well-posed",
                    "multi-hop linked",
                ],
                rows,
            ),
        ]

    # Knowledge.
    k_dir = _stage_runs(manifest, "knowledge").get("knowledge")
    if k_dir and (Path(k_dir) / "tables" / "summary.parquet").is_file():
        summary = pd.read_parquet(Path(k_dir) / "tables" / "summary.parquet")
        lines += [
            "",
            "## What the model knows",
            "",
            "Question form, greedy alias match; the selected facts and the transfer stage's "
            "locality sample.",
        ]
        lines += [
            "",
            *_table(
                ["lang", "facts", "known", "accuracy %", "cloze accuracy %"],
                knowledge_rows(summary),
            ),
        ]

    # Transfer.
    t_runs = {**_stage_runs(manifest, "transfer"), **_stage_runs(manifest, "restricted")}
    if t_runs:
        from analysis.transfer import load_transfer, transfer_matrix

        lines += [
            "",
            "## Edit transfer",
            "",
            "Rows: edit language; columns: test language; success by greedy alias match of the "
            "new answer (%), question form, facts known in the test language before the edit.  "
            "The diagonal is efficacy.",
        ]
        overview = []
        for label, path in t_runs.items():
            run = load_transfer(path)
            m = transfer_matrix(run.rows)
            lines += ["", f"**{label}**", "", *_matrix(m, langs, pct=True)]
            lines += _protocol_lines(run.rows, langs)
            q = run.rows[run.rows["form"] == "question"]
            eff = q[(q["kind"] == "efficacy")]["success_greedy"].mean()
            tr = q[(q["kind"] == "transfer") & q["known_before"].astype(bool)][
                "success_greedy"
            ].mean()
            loc = run.rows[run.rows["kind"] == "locality"]["success_greedy"].mean()
            overview.append([label, _f(eff, pct=True), _f(tr, pct=True), _f(loc, pct=True)])
        lines += [
            "",
            "Overview (%):",
            "",
            *_table(["method", "efficacy", "transfer", "locality"], overview),
        ]

    # Tracing.
    tr_dir = _stage_runs(manifest, "tracing").get("tracing")
    if tr_dir and (Path(tr_dir) / "summary.json").is_file():
        from analysis.tracing.summary import TracingResult
        from mlake.stages.tracing import no_signal_text

        tr = TracingResult.from_dict(_read(Path(tr_dir) / "summary.json"))
        threshold = f"{100 * tr.min_total_effect:g}%"
        lines += ["", "## Causal tracing", ""]
        lines += [
            "Drop: p clean − p corrupted, as % of p clean.  A language has signal when the "
            f"corruption takes at least {threshold} of the answer's probability; without it the "
            "corrupted run is the clean run, the maps hold noise, and no peak is read from them.",
            "",
        ]
        lines += _table(
            [
                "lang",
                "traced",
                "p clean",
                "p corrupted",
                "drop %",
                "signal",
                "peak MLP layer",
                "peak effect (pp)",
            ],
            [
                [
                    x.lang,
                    x.n_facts,
                    _f(x.p_clean),
                    _f(x.p_corrupt),
                    _f(x.relative_effect, pct=True),
                    "yes" if x.signal else "**no**",
                    x.peak_mlp_layer if x.signal else "–",
                    _f(x.peak_mlp_effect, pct=True) if x.signal else "–",
                ]
                for x in tr.summaries
            ],
        )
        quiet = [x for x in tr.summaries if not x.signal]
        if quiet:
            lines += [""]
            lines += [f"- **{x.lang}**: {no_signal_text(x, tr.min_total_effect)}." for x in quiet]
        lines += [""]
        if tr.recommended_layer is not None:
            lines += [
                f"Recommended edit layer: {tr.recommended_layer}, from the languages with signal "
                f"({', '.join(tr.signal_langs)})."
            ]
        elif not tr.signal_langs:
            lines += [
                "Recommended edit layer: none.  Tracing has no signal on this model in any "
                "language traced, so editing's `layer: auto` takes the documented default."
            ]
        else:
            lines += [
                "Recommended edit layer: none (MLP not traced, or a one-layer model); editing's "
                "`layer: auto` takes the documented default."
            ]
        lines += [
            "",
            "Profile similarity (Pearson r of the average maps, all kinds)"
            + (
                f"; {', '.join(x.lang for x in quiet)} have no signal, so their rows compare noise:"
                if quiet
                else ":"
            ),
            "",
        ]
        lines += _list_matrix(tr.similarity["all"], tr.langs)

    # Latent-language lens.
    lens_dir = _stage_runs(manifest, "lens").get("lens")
    if lens_dir and (Path(lens_dir) / "summary.json").is_file():
        from analysis.lens import LensResult

        lens = LensResult.from_dict(_read(Path(lens_dir) / "summary.json"))
        lines += ["", "## Latent-language lens", "", lens_notes(lens.top_k), ""]
        lines += _table(LENS_COLUMNS, [lens_cells(x) for x in lens.summaries])
        if lens.skipped:
            lines += [
                "",
                "Not looked at: "
                + ", ".join(f"{k} {v}" for k, v in sorted(lens.skipped.items()))
                + ".",
            ]
        written = _figure_index(out).get("written", {})
        for name in ("lens_last", "lens_subject_last"):
            png = next((f for f in written.get(name, []) if f.endswith(".png")), None)
            if png:
                lines += ["", f"![{name}](figures/{png})"]
        if lens.tuned:
            from mlake.stages.lens import tuned_lines

            lines += ["", *tuned_lines(lens.tuned)]
        edits_dir = _stage_runs(manifest, "lens").get("lens_edits")
        if edits_dir and (Path(edits_dir) / "summary.json").is_file():
            from analysis.lens import EditLensResult
            from mlake.stages.lens import edit_lens_lines

            eres = EditLensResult.from_dict(_read(Path(edits_dir) / "summary.json"))
            lines += ["", "### The lens before and after edits", ""]
            lines += edit_lens_lines(eres, markdown=True)
            for lang in eres.langs:
                png = next(
                    (f for f in written.get(f"lens_edits_{lang}", []) if f.endswith(".png")), None
                )
                if png:
                    lines += ["", f"![lens_edits_{lang}](figures/{png})"]
            from mlake.stages.lens import edit_failures, failure_lines

            lines += ["", "### Where transfer fails", ""]
            lines += failure_lines(edit_failures(EditLensResult.load(edits_dir)), markdown=True)
            png = next((f for f in written.get("lens_failures", []) if f.endswith(".png")), None)
            if png:
                lines += ["", f"![lens_failures](figures/{png})"]

    # Cross-lingual patching.
    patch_dir = _stage_runs(manifest, "patching").get("patching")
    if patch_dir and (Path(patch_dir) / "summary.json").is_file():
        from analysis.patching import PatchingResult
        from mlake.stages.patching import report_lines

        patched = PatchingResult.from_dict(_read(Path(patch_dir) / "summary.json"))
        lines += ["", "## Cross-lingual patching", "", *report_lines(patched, markdown=True)]
        written = _figure_index(out).get("written", {})
        for name in ("patching_matrices", "patching_layers"):
            png = next((f for f in written.get(name, []) if f.endswith(".png")), None)
            if png:
                lines += ["", f"![{name}](figures/{png})"]

    # Neurons.
    n_dir = _stage_runs(manifest, "neurons").get("neurons")
    if n_dir and (Path(n_dir) / "summary.json").is_file():
        from analysis.neurons.config import NeuronResult

        nres = NeuronResult.from_dict(_read(Path(n_dir) / "summary.json"))
        lines += ["", "## Neurons", ""]
        for m in nres.methods:
            if not m.per_fact or not isinstance(m.jaccard, list):
                continue  # no per-fact sets (LAPE), so no overlap
            lines += [
                f"**{m.method} ({m.unit}s)**: same-fact mean Jaccard overlap of the "
                "important sets"
                + (
                    " (sets indistinguishable from random sets: see the ablation check)."
                    if m.check_signal is False
                    else "."
                ),
                "",
            ]
            lines += _list_matrix(m.jaccard, nres.langs)
            c = m.check or {}
            if c.get("n"):
                lines += [
                    "",
                    f"Ablation check ({int(c['n'])} facts): answer probability drops "
                    f"{_f(c.get('drop'), pct=True)} pp with the set, "
                    f"{_f(c.get('drop_random'), pct=True)} pp with random sets (Wilcoxon p = "
                    f"{_f(c.get('wilcoxon_p'), 3)}).  {ablation_check_text(m)}",
                    "",
                ]
            shared = sum(int(r.get("shared", 0)) for r in m.counts)
            specific = {
                lang: sum(int(r.get(f"specific_{lang}", 0)) for r in m.counts)
                for lang in nres.langs
            }
            lines += [
                "Units specific to one language: "
                + ", ".join(f"{k} {v}" for k, v in specific.items())
                + f"; shared: {shared}.",
                "",
            ]

    # Relation.
    for label, path in _stage_runs(manifest, "relate").items():
        s = _read(Path(path) / "summary.json")
        lines += ["", f"## Sharing against transfer ({label})", ""]
        lines += [
            "Pair level: Spearman rho over the off-diagonal cells, exact Mantel p (one-sided).",
            "",
        ]
        lines += _table(
            ["predictor", "outcome", "rho", "p", "cells"],
            [
                [
                    r["predictor"],
                    r["outcome"],
                    _f(r.get("rho")),
                    _f(r.get("p"), 3),
                    r.get("n_cells"),
                ]
                for r in s["pair_level"]
            ],
        )
        fits = s.get("fits") or {}
        rows = []
        for kind, fit in fits.items():
            term = next((t for t in fit.get("terms", []) if t.get("term") == "overlap"), None)
            if fit.get("note") or term is None:
                rows.append([kind, "–", "–", fit.get("note") or "", fit.get("n_rows")])
                continue
            rows.append(
                [
                    kind,
                    _f(term.get("estimate"), 3),
                    f"[{_f(term.get('ci_low'), 3)}, {_f(term.get('ci_high'), 3)}]",
                    _f(term.get("p"), 3),
                    fit.get("n_rows"),
                ]
            )
        lines += ["", "Fact level, the overlap's coefficient (per SD; with controls):", ""]
        lines += _table(["model", "estimate", "95% CI", "p (perm.)", "rows"], rows)
        for item in s.get("interventions") or []:
            lines += ["", f"Restricted editing **{item['label']}** against {item['against']}:", ""]
            lines += _table(
                ["metric", "unrestricted", "restricted", "difference", "95% CI", "facts"],
                [
                    [
                        metric,
                        _f(d.get("a"), 3),
                        _f(d.get("b"), 3),
                        _f(d.get("diff"), 3),
                        f"[{_f(d.get('ci_low'), 3)}, {_f(d.get('ci_high'), 3)}]",
                        d.get("n_facts"),
                    ]
                    for metric, d in item["differences"].items()
                ],
            )
        for note in s.get("notes") or []:
            lines += ["", f"Note: {note}"]

    # Probes.
    p_dir = _stage_runs(manifest, "probes").get("probes")
    probe_note = ((manifest.get("stages") or {}).get("probes") or {}).get("note")
    if p_dir and (Path(p_dir) / "summary.json").is_file():
        from probes.config import ProbeResult

        pres = ProbeResult.from_dict(_read(Path(p_dir) / "summary.json"))
        lid = pres.language_id
        lines += ["", "## Probes", ""]
        lines += [
            "Signal: held-out accuracy above its baseline, the larger of the control task's "
            "accuracy and chance, by more than that many held-out examples reach by chance "
            "(one-sided binomial test, p < 0.05); otherwise the probe is reported as no signal.",
            "",
        ]
        lid = lid.dropna(subset=["accuracy"])  # a position no fold could score
        if len(lid):
            best = lid.loc[lid.groupby("position")["accuracy"].idxmax()]
            lines += ["Language identity, best layer per position:", ""]
            lines += _table(
                ["position", "layer", "accuracy %", "control %", "chance %", "signal"],
                [
                    [
                        r["position"],
                        int(r["layer"]),
                        _f(r["accuracy"], pct=True),
                        _f(r.get("control"), pct=True),
                        _f(r.get("chance"), pct=True),
                        _probe_verdict(pres.language_id_signal(r["position"], int(r["layer"]))),
                    ]
                    for r in best.to_dict(orient="records")
                ],
            )
        tr = pres.transfer
        off = tr[tr["train_lang"] != tr["test_lang"]] if len(tr) else tr
        means = off.groupby(["task", "position", "layer"])[["accuracy", "control", "chance"]].mean()
        # Tasks and positions no language pair could score (too few facts known in two
        # languages) have no best layer: they are said to be missing, not drawn.
        means = means.dropna(subset=["accuracy"])
        if len(tr) and not len(means):
            lines += [
                "",
                "Cross-lingual probes: no accuracy for any language pair (too few facts known "
                "in two languages to train and test on).",
            ]
        if len(means):
            best = means.loc[means.groupby(level=["task", "position"])["accuracy"].idxmax()]
            lines += ["", "Cross-lingual probes, best layer (mean over language pairs):", ""]
            lines += _table(
                ["task", "position", "layer", "accuracy %", "control %", "chance %", "signal"],
                [
                    [
                        t,
                        p,
                        layer,
                        _f(r["accuracy"], pct=True),
                        _f(r["control"], pct=True),
                        _f(r["chance"], pct=True),
                        _probe_verdict(pres.cross_lingual_signal(t, p, int(layer))),
                    ]
                    for (t, p, layer), r in best.iterrows()
                ],
            )
            quiet_probes = [
                f"{t} at the {p} position"
                for (t, p, layer), _ in best.iterrows()
                if pres.cross_lingual_signal(t, p, int(layer))[0] is False
            ]
            if quiet_probes:
                lines += [
                    "",
                    "No signal for the cross-lingual probes ("
                    + "; ".join(quiet_probes)
                    + "): even at their best layer they are not reliably above their control or "
                    "chance, so they show no representation shared across languages there.",
                ]
    elif probe_note:
        lines += ["", "## Probes", "", f"Not run: {probe_note}."]

    # Figures.
    index = _figure_index(out)
    if index:
        lines += ["", "## Figures", ""]
        for name, files in index.get("written", {}).items():
            png = next((f for f in files if f.endswith(".png")), None)
            pdf = next((f for f in files if f.endswith(".pdf")), None)
            if png:
                lines += [f"### {name}", "", f"![{name}](figures/{png})", ""]
                if pdf:
                    lines += [f"PDF: [figures/{pdf}](figures/{pdf})", ""]
        skipped = index.get("skipped", {})
        if skipped:
            lines += ["Not drawn: " + "; ".join(f"{k} ({v})" for k, v in skipped.items()), ""]
    return "\n".join(lines).rstrip() + "\n"


def write_report(out: str | os.PathLike[str]) -> Path:
    """Write ``report.md`` into the pipeline run folder ``out`` and return its path."""
    path = Path(out) / "report.md"
    text = build_report(out)
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
