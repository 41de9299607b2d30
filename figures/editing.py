"""Edit-transfer figures: the languages x languages matrix of each editing method (rows: the
language the edit was made in, columns: the language it is measured in; the diagonal is
efficacy, the rest transfer), one panel per method on one scale.

A method's matrix is :func:`analysis.transfer.transfer_matrix` of its transfer run
(question form, facts the model knew in the test language before the edit); the number of
such facts per cell is written under each value.

:func:`protocol_matrices` draws the MLaKE protocol's tables of one method (``mlake edit
transfer --protocol mlake``): the multiple-choice and multi-hop matrices beside the
free-form one.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from figures.neurons import _heatmap
from figures.style import PAGE_WIDTH, matrix_scale, use_style

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
    panel = 2.05 * matrix_scale(len(langs))
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


#: Panel titles of :func:`protocol_matrices`, by table format.
FORMAT_TITLES = {
    "free-form": "free-form",
    "mcqa-loglik": "MC, option text",
    "mcqa-letter": "MC, letter",
}


def protocol_matrices(cells: Any, langs: Sequence[str], *, title: str = "") -> Any:
    """The MLaKE protocol's tables of one editing method as heatmaps: single-hop in the top
    row, multi-hop below; free-form, multiple choice by option log-likelihood and by letter
    side by side (:func:`analysis.transfer.protocol_cells`; rows: edit language, columns:
    test language, % answered with the edit).  Under each value: the unedited model's % on
    the same questions (``b``) and the questions counted (``n``); a cell without questions
    is drawn ``n/a``.  A format with no question in any cell (multiple choice in a run of the
    free-form protocol) is left out.

    Args:
        cells: :func:`~analysis.transfer.protocol_cells` of one method's rows.
        langs: language order.
        title: the figure's title (e.g. the method).

    Returns:
        A matplotlib Figure.

    Raises:
        ValueError: no cell has a question.
    """
    import matplotlib.pyplot as plt

    formats = [f for f in FORMAT_TITLES if (cells[cells["format"] == f]["n"] > 0).any()]
    hops = [h for h in ("single-hop", "multi-hop") if (cells[cells["hop"] == h]["n"] > 0).any()]
    if not formats or not hops:
        raise ValueError("no protocol cell has a question to show")
    use_style()
    langs = list(langs)
    panel = 2.05 * matrix_scale(len(langs))
    fig, axes = plt.subplots(
        len(hops),
        len(formats),
        figsize=(min(PAGE_WIDTH, panel * len(formats) + 0.6), (panel + 0.3) * len(hops) + 0.2),
        squeeze=False,
        layout="constrained",
    )
    image = None
    for i, hop in enumerate(hops):
        for j, fmt in enumerate(formats):
            ax = axes[i, j]
            sel = cells[(cells["hop"] == hop) & (cells["format"] == fmt)]
            sel = sel.set_index(["edit_lang", "test_lang"])
            matrix = np.full((len(langs), len(langs)), np.nan)
            notes = np.full((len(langs), len(langs)), "", dtype=object)
            for r, a in enumerate(langs):
                for c, b in enumerate(langs):
                    if (a, b) not in sel.index:
                        continue
                    cell = sel.loc[(a, b)]
                    if int(cell["n"]) > 0:
                        matrix[r, c] = float(cell["pct"])
                        before = float(cell["before_pct"])
                        prior = "" if np.isnan(before) else f"b{before:.0f} "
                        notes[r, c] = f"{prior}n={int(cell['n'])}"
            image = _heatmap(
                ax, matrix, langs, cmap="viridis", vmin=0.0, vmax=100.0, fmt="{:.0f}", notes=notes
            )
            ax.set_title(f"{hop}, {FORMAT_TITLES[fmt]}", fontsize=7)
            if i == len(hops) - 1:
                ax.set_xlabel("test language")
            if j == 0:
                ax.set_ylabel("edit language")
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes.flat), fraction=0.05, pad=0.02, shrink=0.85)
        bar.set_label("answered with the edit (%)", fontsize=7)
        bar.ax.tick_params(labelsize=6)
    fig.suptitle(
        f"{title + ': ' if title else ''}the MLaKE protocol (MC: multiple choice by the most "
        "probable option text or letter; b: % before the edit; n: questions)",
        fontsize=8,
    )
    return fig
