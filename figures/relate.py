"""Figures of the relation between parameter sharing and edit transfer (``result``: an
:class:`analysis.relate_result.RelateResult`):

* :func:`sharing_vs_transfer`: per ordered language pair (edit language A -> test language
  B), the mean same-fact overlap of A's and B's important units against the transfer rate
  and against the mean log-probability gain of the new answer in B, with the least-squares
  line over the pairs and the pair-level Spearman rho and exact Mantel p;
* :func:`restricted_editing`: restricted editing (FT limited to shared / random / specific
  neurons) against unrestricted editing: the paired differences with bootstrap intervals;
* :func:`sweep_dose_response`: a sweep of how much is shared (a training or restriction
  fraction) against the measured overlap and transfer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from figures.style import LANG_COLORS, PAGE_WIDTH, SHARED_COLOR, lang_color, use_style

OUTCOME_LABELS = {
    "transfer": "transfer rate (%)",
    "gain": "log-prob. gain of new answer (nats)",
}
METRIC_LABELS = {
    "efficacy": "efficacy",
    "transfer": "transfer",
    "transfer_prob": "transfer (prob.)",
    "gain": "gain (nats)",
    "locality": "locality",
}
#: Okabe-Ito colours for the compared conditions (in order).
CONDITION_COLORS = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#D55E00", "#56B4E9")


def _pair_stat(result: Any, outcome: str) -> str:
    """``rho = .., p = ..`` of the pair-level test of the neuron overlap used at fact level."""
    table = result.pair_level
    if table is None or len(table) == 0:
        return ""
    wanted = f"neuron_jaccard_{result.unit}"
    sel = table[(table["predictor"] == wanted) & (table["outcome"] == outcome)]
    if sel.empty:
        return ""
    rec = sel.iloc[0]
    rho, p = rec.get("rho"), rec.get("p")
    if rho is None or (isinstance(rho, float) and np.isnan(rho)):
        return ""
    return f"Spearman ρ = {rho:.2f}, Mantel p = {p:.3f} ({int(rec.get('n_cells', 0))} pairs)"


def sharing_vs_transfer(result: Any) -> Any:
    """Two panels (transfer rate, gain) against the mean overlap per ordered pair.

    Each point is one pair A -> B: its fill is A's colour and its edge B's
    (:func:`figures.style.lang_color`), labelled ``A→B``.  Pairs without an overlap or an
    outcome are left out.

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: the result has no pair rows.
    """
    import matplotlib.pyplot as plt

    pairs = result.by_pair
    if pairs is None or len(pairs) == 0:
        raise ValueError("the relation result has no language pairs")
    use_style()
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH * 0.75, 2.4), layout="constrained")
    for ax, outcome in zip(axes, ("transfer", "gain"), strict=True):
        x = pairs["overlap"].to_numpy(dtype=float)
        y = pairs[outcome].to_numpy(dtype=float) * (100 if outcome == "transfer" else 1)
        ok = np.isfinite(x) & np.isfinite(y)
        records = pairs.to_dict(orient="records")
        for rec, xi, yi, good in zip(records, x, y, ok, strict=True):
            if not good:
                continue
            a, b = str(rec["edit_lang"]), str(rec["test_lang"])
            ax.scatter(
                xi,
                yi,
                s=22,
                color=lang_color(a),
                edgecolors=lang_color(b),
                linewidths=1.2,
                zorder=3,
            )
        for (xi, yi), label in _point_labels(records, x, y, ok).items():
            ax.annotate(label, (xi, yi), xytext=(3, 3), textcoords="offset points", fontsize=5)
        if ok.sum() >= 2 and np.ptp(x[ok]) > 0:
            slope, intercept = np.polyfit(x[ok], y[ok], 1)
            grid = np.linspace(x[ok].min(), x[ok].max(), 20)
            ax.plot(grid, intercept + slope * grid, color=SHARED_COLOR, lw=0.8, ls="--", zorder=2)
        ax.set_xlabel(f"mean same-fact overlap ({result.unit}, {result.config.get('overlap')})")
        ax.set_ylabel(OUTCOME_LABELS[outcome])
        stat = _pair_stat(result, outcome)
        ax.set_title(stat or OUTCOME_LABELS[outcome], fontsize=7)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle(
        f"{result.method} edits: sharing against transfer per language pair "
        "(fill: edit language, ring: test language)",
        fontsize=8,
    )
    return fig


def _point_labels(
    records: Sequence[Mapping[str, Any]], x: np.ndarray, y: np.ndarray, ok: np.ndarray
) -> dict[tuple[float, float], str]:
    """Labels that do not collide: points that coincide share one label (``a↔b`` for the two
    directions of a pair, else the first and ``+k``); a label is left out when it would sit
    within ~12% of the x range and ~6% of the y range of one already placed (from the top)."""
    if not ok.any():
        return {}
    xr = float(np.ptp(x[ok])) or 1.0
    yr = float(np.ptp(y[ok])) or 1.0
    groups: dict[tuple[int, int], list[int]] = {}
    for i in np.flatnonzero(ok):
        groups.setdefault((round(200 * x[i] / xr), round(200 * y[i] / yr)), []).append(int(i))
    placed: dict[tuple[float, float], str] = {}
    for members in sorted(groups.values(), key=lambda m: (-y[m[0]], x[m[0]])):
        names = [(str(records[i]["edit_lang"]), str(records[i]["test_lang"])) for i in members]
        if len(names) == 2 and names[0] == names[1][::-1]:
            label = f"{names[0][0]}↔{names[0][1]}"
        else:
            label = f"{names[0][0]}→{names[0][1]}" + (
                f" +{len(names) - 1}" if len(names) > 1 else ""
            )
        px, py = float(x[members[0]]), float(y[members[0]])
        if any(abs(px - qx) < 0.12 * xr and abs(py - qy) < 0.06 * yr for qx, qy in placed):
            continue
        placed[(px, py)] = label
    return placed


def restricted_editing(
    result: Any, metrics: Sequence[str] = ("efficacy", "transfer", "gain", "locality")
) -> Any:
    """Restricted minus unrestricted editing, per metric: one bar per restricted condition,
    with its paired bootstrap interval over facts; the unrestricted value is written under
    each metric.

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: the result has no interventions.
    """
    import matplotlib.pyplot as plt

    items = list(result.interventions or [])
    if not items:
        raise ValueError("the relation result has no restricted-editing comparison")
    use_style()
    metrics = [m for m in metrics if all(m in it["differences"] for it in items)]
    fig, axes = plt.subplots(
        1, len(metrics), figsize=(PAGE_WIDTH * 0.8, 2.1), squeeze=False, layout="constrained"
    )
    width = 0.8 / len(items)
    for ax, metric in zip(axes[0], metrics, strict=True):
        for k, item in enumerate(items):
            d = item["differences"][metric]
            diff = _num(d.get("diff"))
            low, high = _num(d.get("ci_low")), _num(d.get("ci_high"))
            scale = 1.0 if metric == "gain" else 100.0
            xpos = k * width - 0.4 + width / 2
            err = None
            if np.isfinite(low) and np.isfinite(high) and np.isfinite(diff):
                err = [[scale * max(0.0, diff - low)], [scale * max(0.0, high - diff)]]
            ax.bar(
                xpos,
                scale * diff if np.isfinite(diff) else 0.0,
                width=width * 0.9,
                color=CONDITION_COLORS[k % len(CONDITION_COLORS)],
                yerr=err,
                capsize=2,
                error_kw={"lw": 0.7},
                label=item["label"],
            )
        base = _num(items[0]["differences"][metric].get("a"))
        unit = "" if metric == "gain" else " (pp)"
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks([])
        shown = f"{base:.2f}" if metric == "gain" else f"{100 * base:.0f}%"
        ax.set_xlabel(f"unrestricted: {shown}" if np.isfinite(base) else "")
        ax.set_title(f"Δ {METRIC_LABELS.get(metric, metric)}{unit}")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right center", frameon=False)
    fig.suptitle(
        f"restricted editing against {items[0].get('against', 'unrestricted')} "
        "(paired bootstrap intervals over facts)",
        fontsize=8,
    )
    return fig


def _num(value: Any) -> float:
    return float("nan") if value is None else float(value)


def sweep_dose_response(points: Sequence[Mapping[str, Any]], *, label: str = "fraction") -> Any:
    """A sweep's dose-response: the measured overlap and transfer against the swept fraction.

    Args:
        points: one mapping per sweep point: ``fraction`` (the dose, e.g. the fraction of
            bilingual training documents or of shared neurons edited), ``overlap`` and
            ``transfer`` (means), and ``overlap_ci`` / ``transfer_ci`` (``[low, high]`` or
            ``None``).  Transfer in [0, 1].
        label: the x-axis label (what ``fraction`` is a fraction of).

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: no points.
    """
    import matplotlib.pyplot as plt

    if not points:
        raise ValueError("no sweep points")
    use_style()
    ordered = sorted(points, key=lambda p: float(p["fraction"]))
    x = np.array([float(p["fraction"]) for p in ordered])
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH * 0.7, 2.1), layout="constrained")
    for ax, key, scale, ylabel, color in (
        (axes[0], "overlap", 1.0, "mean same-fact overlap", LANG_COLORS["en"]),
        (axes[1], "transfer", 100.0, "transfer rate (%)", LANG_COLORS["zh"]),
    ):
        y = np.array([_num(p.get(key)) for p in ordered]) * scale
        cis = [p.get(f"{key}_ci") for p in ordered]
        low = np.array([_num(c[0]) if c else np.nan for c in cis]) * scale
        high = np.array([_num(c[1]) if c else np.nan for c in cis]) * scale
        if np.isfinite(low).any():
            ax.fill_between(x, low, high, color=color, alpha=0.2, lw=0)
        ax.plot(x, y, marker="o", ms=3, color=color, lw=1)
        ax.set_xlabel(label)
        ax.set_ylabel(ylabel)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    fig.suptitle("sweep: dose-response (bands: 95% intervals)", fontsize=8)
    return fig


def predictors_vs_transfer(result: Any, outcome: str = "transfer") -> Any:
    """One panel per pair-level predictor of the lens and patching runs
    (:data:`analysis.relate.INTERVENTION_PREDICTORS` the result has), the neuron overlap used
    at fact level first: each off-diagonal cell A -> B of its matrix against the same cell of
    the ``outcome`` matrix (fill A's colour, edge B's), titled with the pair-level Spearman rho
    and Mantel p; a predictor without a cell both define says so in its panel.

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: the result has none of these predictors, or no such outcome.
    """
    import matplotlib.pyplot as plt

    from analysis.relate import INTERVENTION_PREDICTORS

    if outcome not in result.outcomes:
        raise ValueError(f"outcome {outcome!r}: the result has {', '.join(result.outcomes)}")
    names = [
        n
        for n in (f"neuron_jaccard_{result.unit}", *INTERVENTION_PREDICTORS)
        if n in result.predictors
    ]
    if not names:
        raise ValueError("the relation result has no overlap, lens or patching predictor")
    use_style()
    langs = list(result.langs)
    scale = 100.0 if outcome == "transfer" else 1.0
    y_all = result.outcomes[outcome].reindex(index=langs, columns=langs).to_numpy(dtype=float)
    ncols = min(3, len(names))  # long predictor names: three panels a row keep titles apart
    nrows = -(-len(names) // ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(PAGE_WIDTH, 2.3 * nrows + 0.4),
        squeeze=False,
        layout="constrained",
    )
    for ax in axes.flat[len(names) :]:
        ax.set_visible(False)
    table = result.pair_level
    for ax, name in zip(axes.flat, names, strict=False):
        x_all = result.predictors[name].reindex(index=langs, columns=langs).to_numpy(dtype=float)
        n = 0
        for i, a in enumerate(langs):
            for j, b in enumerate(langs):
                x, y = x_all[i, j], y_all[i, j]
                if i == j or not (np.isfinite(x) and np.isfinite(y)):
                    continue
                n += 1
                ax.scatter(
                    x,
                    y * scale,
                    s=22,
                    color=lang_color(a),
                    edgecolors=lang_color(b),
                    linewidths=1.4,
                )
        sel = table[(table["predictor"] == name) & (table["outcome"] == outcome)]
        stat = ""
        if not sel.empty and np.isfinite(float(sel.iloc[0]["rho"])):
            stat = f"\nρ = {float(sel.iloc[0]['rho']):.2f}, p = {float(sel.iloc[0]['p']):.3f}"
        elif n:
            stat = "\nρ undefined (a constant)"
        ax.set_title(f"{name}{stat}", fontsize=7)
        if not n:
            ax.text(0.5, 0.5, "no cells", transform=ax.transAxes, ha="center", va="center")
        ax.set_xlabel("predictor", fontsize=7)
    for row in axes:
        row[0].set_ylabel(OUTCOME_LABELS.get(outcome, outcome))
    handles = [
        plt.Line2D([], [], marker="o", linestyle="", color=lang_color(lang), label=lang)
        for lang in langs
    ]
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncols=len(langs),
        fontsize=7,
        title="each point a pair A → B: fill, edit language A; edge, test language B",
        title_fontsize=7,
        frameon=False,
    )
    return fig
