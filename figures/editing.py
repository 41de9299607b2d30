"""Edit-transfer figures: the languages x languages matrix of each editing method (rows: the
language the edit was made in, columns: the language it is measured in; the diagonal is
efficacy, the rest transfer), one panel per method on one scale.

A method's matrix is :func:`analysis.transfer.transfer_matrix` of its transfer run
(question form, facts the model knew in the test language before the edit); the number of
such facts per cell is written under each value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from figures.neurons import _heatmap
from figures.style import PAGE_WIDTH, use_style

METRIC_LABELS = {
    "success_greedy": "success (greedy alias match, %)",
    "success_prob": "success (p(new) > p(old), %)",
    "p_new": "p(new answer) (%)",
}


def transfer_counts(rows: Any, form: str = "question", known_only: bool = True) -> Any:
    """Per (edit language, test language), the facts counted in :func:`transfer_matrix`'s
    cell (a pandas DataFrame)."""
    sel = rows[
        (rows["form"] == form) & rows["kind"].isin(["efficacy", "generalization", "transfer"])
    ]
    if known_only:
        sel = sel[sel["known_before"]]
    return sel.pivot_table(
        index="edit_lang", columns="test_lang", values="fact_id", aggfunc="count"
    )


def transfer_matrices(
    matrices: Mapping[str, Any],
    langs: Sequence[str],
    *,
    counts: Mapping[str, Any] | None = None,
    metric: str = "success_greedy",
) -> Any:
    """One heatmap per editing method, on one 0-100% scale.

    Args:
        matrices: method label -> matrix (a pandas DataFrame indexed by edit language with
            test-language columns, values in [0, 1]; missing cells are drawn ``n/a``).
        langs: language order.
        counts: method label -> facts per cell (same shape), written under each value.
        metric: what the matrices hold (for the colour-bar label).

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: no matrix given.
    """
    import matplotlib.pyplot as plt

    if not matrices:
        raise ValueError("no transfer matrix to draw")
    use_style()
    langs = list(langs)
    n = len(matrices)
    panel = 2.05
    columns = n if n <= 3 else (2 if n == 4 else 3)
    rows_n = -(-n // columns)
    fig, axes = plt.subplots(
        rows_n,
        columns,
        figsize=(min(PAGE_WIDTH, panel * columns + 0.6), (panel + 0.3) * rows_n + 0.1),
        squeeze=False,
        layout="constrained",
    )
    image = None
    flat = list(axes.flat)
    for ax, (label, frame) in zip(flat, matrices.items(), strict=False):
        matrix = 100 * frame.reindex(index=langs, columns=langs).to_numpy(dtype=float)
        notes = None
        if counts and label in counts:
            c = counts[label].reindex(index=langs, columns=langs).to_numpy(dtype=float)
            notes = np.array(
                [["" if np.isnan(v) else f"n={int(v)}" for v in row] for row in c], dtype=object
            )
        image = _heatmap(
            ax, matrix, langs, cmap="viridis", vmin=0.0, vmax=100.0, fmt="{:.0f}", notes=notes
        )
        ax.set_title(label)
        k = flat.index(ax)
        if k + columns >= n:  # bottom panel of its column
            ax.set_xlabel("test language")
        if k % columns == 0:
            ax.set_ylabel("edit language")
    for ax in flat[n:]:
        ax.set_visible(False)
    if image is not None:
        bar = fig.colorbar(image, ax=flat[:n], fraction=0.05, pad=0.02, shrink=0.85)
        bar.set_label(METRIC_LABELS.get(metric, metric), fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(
        "edit transfer (diagonal: efficacy; facts known before in the test language)", fontsize=8
    )
    return fig
