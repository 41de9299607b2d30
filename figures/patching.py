"""Cross-lingual patching figures (``result``: a :class:`~analysis.patching.PatchingResult`).

* :func:`matrices`: per patched position (a row of panels), the language x language matrix of how often B
  follows A (counterfactual pairs) at the position's best layer, and, when edits were
  measured, the forward edit-carried rate at its own best layer; rows are the source (or
  edit) language A, columns the target language B, each cell with its count.
* :func:`layer_curves`: per position, by layer, the follow rate per target language (the mean
  over the source languages other than B), the diagonal (A = B) dashed, and the forward
  edit-carried rate off the diagonal dotted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from figures.neurons import _heatmap
from figures.style import PAGE_WIDTH, SHARED_COLOR, lang_color, layer_ticks, use_style

#: What each patched position is called in titles.
POSITION_LABELS = {"subject_last": "subject's last token", "last": "last position"}


def _grid(rows: Any) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=float)


def matrices(result: Any) -> Any:
    """The language x language matrices at each position's best layer (module docstring).

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from analysis.patching import DIRECTIONS, POSITIONS

    use_style()
    langs = list(result.langs)
    with_edits = bool(result.edits)
    columns = 2 if with_edits else 1
    fig, axes = plt.subplots(
        len(POSITIONS),
        columns,
        figsize=(min(PAGE_WIDTH, 2.4 * columns + 0.8), 2.3 * len(POSITIONS) + 0.2),
        squeeze=False,
        layout="constrained",
    )
    counts = _grid(result.counterfactual["n"])
    image = None
    for r, pos in enumerate(POSITIONS):
        layer = result.counterfactual[pos]["best_layer"]
        notes = np.array([[f"n={int(v)}" for v in row] for row in counts], dtype=object)
        image = _heatmap(
            axes[r][0],
            100 * result.matrix("follows", pos),
            langs,
            cmap="viridis",
            vmin=0.0,
            vmax=100.0,
            fmt="{:.0f}",
            notes=notes,
        )
        axes[r][0].set_title(f"B follows A, {POSITION_LABELS[pos]}\nlayer {layer}", fontsize=7)
        axes[r][0].set_ylabel("source language A")
        if with_edits:
            section = result.edits[DIRECTIONS[0]][pos]
            cells = result.edits.get("n_cells") or [
                [result.edits["n"][a] for _ in langs] for a in langs
            ]
            edit_notes = np.array([[f"n={int(v)}" for v in row] for row in cells], dtype=object)
            _heatmap(
                axes[r][1],
                100 * result.matrix("carried", pos),
                langs,
                cmap="viridis",
                vmin=0.0,
                vmax=100.0,
                fmt="{:.0f}",
                notes=edit_notes,
            )
            axes[r][1].set_title(
                f"edit carried, {POSITION_LABELS[pos]}\nlayer {section['best_layer']}", fontsize=7
            )
            axes[r][1].set_ylabel("edit language A")
    for ax in axes[-1]:
        ax.set_xlabel("target language B")
    if image is not None:
        fig.colorbar(image, ax=list(axes.flat), shrink=0.6, label="% of pairs / edits")
    return fig


def layer_curves(result: Any) -> Any:
    """By layer, per position, the follow rate per target language and the forward
    edit-carried rate (module docstring).

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from analysis.patching import DIRECTIONS, POSITIONS

    use_style()
    langs = list(result.langs)
    fig, axes = plt.subplots(
        1, len(POSITIONS), figsize=(PAGE_WIDTH, 2.3), squeeze=False, sharey=True,
        layout="constrained",
    )  # fmt: skip
    layers = np.arange(result.n_layers)
    off = ~np.eye(len(langs), dtype=bool)
    for ax, pos in zip(axes[0], POSITIONS, strict=True):
        follows = np.stack([_grid(g) for g in result.counterfactual[pos]["follows"]])
        for j, b in enumerate(langs):
            column = follows[:, :, j]  # [layer, A]
            others = np.delete(column, j, axis=1)
            if np.isnan(others).all():
                continue
            ax.plot(
                layers,
                np.nanmean(others, axis=1),
                color=lang_color(b),
                lw=1.4,
                marker="o",
                ms=2,
                label=f"B = {b}",
            )
        diagonal = np.array([np.nanmean(np.diag(g)) for g in follows])
        if not np.isnan(diagonal).all():
            ax.plot(layers, diagonal, color=SHARED_COLOR, lw=1.0, ls="--", label="A = B")
        if result.edits:
            carried = np.stack([_grid(g) for g in result.edits[DIRECTIONS[0]][pos]["carried"]])
            values = np.array(
                [np.nanmean(g[off]) if not np.isnan(g[off]).all() else np.nan for g in carried]
            )
            if not np.isnan(values).all():
                ax.plot(
                    layers, values, color=SHARED_COLOR, lw=1.4, ls=":",
                    label="edit carried (A ≠ B)",
                )  # fmt: skip
        ax.set_title(f"patched at the {POSITION_LABELS[pos]}")
        ax.set_xticks(layer_ticks(result.n_layers, max_labels=9))
        ax.set_xlabel("layer")
        ax.set_ylim(-0.02, 1.02)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0][0].set_ylabel("fraction of pairs\nwhere B follows A")
    handles, labels = axes[0][-1].get_legend_handles_labels()
    if not handles:
        handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    fig.suptitle("cross-lingual patching by layer (source A ≠ target B unless marked)")
    return fig
