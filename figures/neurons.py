"""Neuron-attribution figures (``result``: a :class:`~analysis.neurons.config.NeuronResult`):
the overlap of the same fact's important units between languages, one panel per attribution
method; the units specific to each language and shared, per layer; and the ablation matrix,
the knowledge lost in every language when one language's specific units are ablated, beside
the same with random units.

Matrices may come from the result's JSON (``None`` for NaN); NaN cells are drawn hatched and
marked ``n/a``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from figures.style import (
    COLUMN_WIDTH,
    PAGE_WIDTH,
    SHARED_COLOR,
    lang_color,
    layer_ticks,
    matrix_scale,
    use_style,
)

METHOD_LABELS = {
    "ig": "integrated gradients",
    "atp": "attribution patching",
    "lape": "LAPE",
}
MEASURE_LABELS = {"jaccard": "Jaccard index", "overlap": "overlap coefficient"}
UNIT_LABELS = {"neuron": "MLP neurons", "head": "attention heads"}
#: Text marking a cell without a value.
NAN_TEXT = "n/a"
#: Colour of a cell without a value (hatched over it).
NAN_COLOR = "#EEEEEE"


def _matrix(rows: Any) -> np.ndarray:
    """A 2-D float array; ``None`` (JSON's NaN) becomes NaN."""
    return np.array(
        [[np.nan if v is None else v for v in row] for row in rows], dtype=float
    ).reshape(len(rows), -1)


def _text_color(image: Any, value: float) -> str:
    """Black or white, whichever reads better on the cell's colour."""
    r, g, b, _ = image.cmap(image.norm(value))
    luminance = 0.2126 * r + 0.7152 * g + 0.0722 * b
    return "black" if luminance > 0.5 else "white"


def _heatmap(
    ax: Any,
    matrix: np.ndarray,
    langs: Sequence[str],
    *,
    cmap: str,
    vmin: float,
    vmax: float,
    fmt: str,
    notes: np.ndarray | None = None,
    fontsize: float = 6.5,
) -> Any:
    """An annotated language-by-language heatmap; NaN cells hatched and marked ``n/a``.

    Args:
        notes: optional second line per cell (empty string: none).
    """
    from matplotlib import colormaps
    from matplotlib.patches import Rectangle

    colormap = colormaps[cmap].with_extremes(bad=NAN_COLOR)
    image = ax.imshow(
        np.ma.masked_invalid(matrix),
        cmap=colormap,
        vmin=vmin,
        vmax=vmax,
        interpolation="nearest",
    )
    n_rows, n_cols = matrix.shape
    for i in range(n_rows):
        for j in range(n_cols):
            v = matrix[i, j]
            if np.isnan(v):
                ax.add_patch(
                    Rectangle(
                        (j - 0.5, i - 0.5),
                        1,
                        1,
                        fill=False,
                        hatch="////",
                        edgecolor="#B0B0B0",
                        linewidth=0,
                    )
                )
                ax.text(j, i, NAN_TEXT, ha="center", va="center", color="#555555", fontsize=6)
                continue
            label = fmt.format(v)
            if label.lstrip("+-").strip("0.") == "":  # +0.0 and -0.0: no sign
                label = label.lstrip("+-")
            note = "" if notes is None else str(notes[i, j])
            color = _text_color(image, v)
            if note:
                ax.text(j, i - 0.1, label, ha="center", va="center", color=color, fontsize=fontsize)
                ax.text(j, i + 0.27, note, ha="center", va="center", color=color, fontsize=5)
            else:
                ax.text(j, i, label, ha="center", va="center", color=color, fontsize=fontsize)
    ax.set_xticks(range(n_cols), list(langs))
    ax.set_yticks(range(n_rows), list(langs))
    ax.tick_params(length=0)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return image


def _no_signal_suffix(summary: Any) -> str:
    """A title's mark for a method whose ablation check cannot tell its sets from random ones
    (:attr:`~analysis.neurons.config.MethodSummary.check_signal` false)."""
    return "\nno signal: sets ~ random sets" if summary.check_signal is False else ""


def _summaries(result: Any, unit: str, measure: str | None = None) -> list[Any]:
    """The result's per-fact method summaries for ``unit`` (``per_fact``: LAPE has no per-fact
    sets)."""
    return [
        m
        for m in result.methods
        if m.unit == unit
        and m.per_fact
        and (measure is None or getattr(m, measure, None) is not None)
    ]


def overlap_matrices(result: Any, unit: str = "neuron", measure: str = "jaccard") -> Any:
    """The language x language mean overlap between languages of the same fact's important units, one panel
    per per-fact attribution method (``ig``, ``atp``; LAPE has none), on one scale [0, 1].

    Each cell holds the mean over the facts attributed in both languages, and their number
    (``n=``); the diagonal is 1 by definition.  Cells with no such fact are hatched ``n/a``.

    Args:
        unit: ``neuron`` or ``head``.
        measure: ``jaccard`` (Jaccard index) or ``overlap`` (overlap coefficient).

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: an unknown measure, or no per-fact method for ``unit`` in the result.
    """
    import matplotlib.pyplot as plt

    if measure not in MEASURE_LABELS:
        raise ValueError(f"measure {measure!r}: choose jaccard or overlap")
    summaries = _summaries(result, unit, measure)
    if not summaries:
        raise ValueError(f"no per-fact attribution of {unit}s in the result")
    use_style()
    langs = list(result.langs)
    n = len(summaries)
    panel = 2.05 * matrix_scale(len(langs))
    fig, axes = plt.subplots(
        1,
        n,
        figsize=(min(PAGE_WIDTH, panel * n + 0.55), panel + 0.35),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for ax, summary in zip(axes[0], summaries, strict=True):
        matrix = _matrix(getattr(summary, measure))
        pairs = _matrix(summary.n_pairs) if summary.n_pairs else np.zeros_like(matrix)
        notes = np.array(
            [
                [
                    "" if i == j or np.isnan(pairs[i, j]) else f"n={int(pairs[i, j])}"
                    for j in range(len(langs))
                ]
                for i in range(len(langs))
            ]
        )
        image = _heatmap(
            ax, matrix, langs, cmap="viridis", vmin=0.0, vmax=1.0, fmt="{:.2f}", notes=notes
        )
        ax.set_title(
            f"{METHOD_LABELS.get(summary.method, summary.method)}" + _no_signal_suffix(summary)
        )
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.05, pad=0.02, shrink=0.85)
        bar.set_label(MEASURE_LABELS[measure], fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(
        f"a fact's important {UNIT_LABELS.get(unit, unit)}: overlap between languages", fontsize=8
    )
    return fig


def unit_counts(result: Any, method: str, unit: str = "neuron") -> Any:
    """Per layer, the units specific to each language (one colour per language,
    :func:`figures.style.lang_color`) stacked under the units shared by two or more.

    The units used by no language (most of them) are not drawn; their number is written in
    the panel.

    Returns:
        A matplotlib Figure.

    Raises:
        KeyError: no result for ``method`` and ``unit``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    summary = result.get(method, unit)
    use_style()
    langs = list(result.langs)
    counts = sorted(summary.counts, key=lambda row: row["layer"])
    layers = [int(row["layer"]) for row in counts]
    fig, ax = plt.subplots(figsize=(COLUMN_WIDTH, 2.2), layout="constrained")
    bottom = np.zeros(len(layers))
    series = [(f"specific_{lang}", lang, lang_color(lang)) for lang in langs]
    series.append(("shared", "shared", SHARED_COLOR))
    for key, label, color in series:
        values = np.array([float(row.get(key, 0) or 0) for row in counts])
        ax.bar(
            layers,
            values,
            bottom=bottom,
            color=color,
            label=label,
            width=0.75,
            edgecolor="white",
            linewidth=0.3,
        )
        bottom += values
    neither = sum(int(row.get("neither", 0) or 0) for row in counts)
    total = neither + int(bottom.sum())
    ax.set_xticks([layers[i] for i in layer_ticks(len(layers))])
    ax.yaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer")
    ax.set_ylabel(f"{UNIT_LABELS.get(unit, unit)}")
    # Headroom for the note on the units used by no language.
    ax.set_ylim(0, max(1.0, float(bottom.max())) * 1.15)
    ax.margins(x=0.02)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)
    share = f" ({100 * neither / total:.1f}%)" if total else ""
    ax.text(
        0.01,
        0.99,
        f"used by no language: {neither:,} of {total:,}{share}",
        transform=ax.transAxes,
        ha="left",
        va="top",
        fontsize=6,
        color="#444444",
    )
    # Legend top to bottom as the stack: shared first.
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(
        handles[::-1],
        labels[::-1],
        loc="upper left",
        bbox_to_anchor=(1.0, 1.0),
        frameon=False,
        handlelength=1.0,
        handletextpad=0.4,
        borderaxespad=0.2,
    )
    ax.set_title(
        f"{METHOD_LABELS.get(method, method)}: language-specific and shared "
        f"{UNIT_LABELS.get(unit, unit).split()[-1]}" + _no_signal_suffix(summary)
    )
    return fig


def ablation_matrix(result: Any, method: str, unit: str = "neuron") -> Any:
    """The drop of knowledge accuracy (percentage points) in each measured language (columns)
    when each language's specific units are ablated (rows), beside the drop with random units
    of the same number: two panels on one diverging scale centred at 0 (red: knowledge lost).

    Returns:
        A matplotlib Figure.

    Raises:
        KeyError: no result for ``method`` and ``unit``.
    """
    import matplotlib.pyplot as plt

    summary = result.get(method, unit)
    use_style()
    langs = list(result.langs)
    panels = [
        ("specific units ablated", 100 * _matrix(summary.ablation)),
        ("random units ablated", 100 * _matrix(summary.ablation_random)),
    ]
    finite = np.concatenate([m[np.isfinite(m)] for _, m in panels])
    limit = max(1.0, float(np.abs(finite).max())) if finite.size else 1.0
    panel = 2.05 * matrix_scale(len(langs))
    fig, axes = plt.subplots(
        1, 2, figsize=(2 * panel + 0.6, panel + 0.35), squeeze=False, layout="constrained"
    )
    image = None
    for ax, (title, matrix) in zip(axes[0], panels, strict=True):
        image = _heatmap(ax, matrix, langs, cmap="RdBu_r", vmin=-limit, vmax=limit, fmt="{:+.1f}")
        ax.set_title(title)
        ax.set_xlabel("measured language")
    axes[0][0].set_ylabel("ablated language")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.05, pad=0.02, shrink=0.85)
        bar.set_label("accuracy drop (pp)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(
        f"{METHOD_LABELS.get(method, method)}: accuracy drop with a language's "
        f"{UNIT_LABELS.get(unit, unit).split()[-1]} ablated",
        fontsize=8,
    )
    return fig
