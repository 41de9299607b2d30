"""Probe figures (``result``: a :class:`probes.config.ProbeResult`): probe accuracy by layer.

Left, the language-identity probe's balanced accuracy at each layer (one line per position:
the subject's last token, the prompt's last token), with its control task dashed.  Right, the
cross-lingual probes (a probe trained in one language, tested on held-out facts in another):
the mean accuracy over the off-diagonal language pairs at each layer, per task and position,
with its control dashed.  Layer 0 is the embeddings.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from figures.style import PAGE_WIDTH, use_style

#: Okabe-Ito colours per position (as in the rest of mlake's figures).
POSITION_COLORS = {"subject": "#0072B2", "last": "#D55E00"}
POSITION_LABELS = {"subject": "last subject token", "last": "last token"}
TASK_STYLES = {"answer": "o", "fact": "s"}


def accuracy_by_layer(result: Any) -> Any:
    """Probe accuracy by layer (module docstring).

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    use_style()
    fig, axes = plt.subplots(1, 2, figsize=(PAGE_WIDTH * 0.85, 2.2), layout="constrained")
    lid = result.language_id
    ax = axes[0]
    for position in result.positions:
        rows = lid[lid["position"] == position].sort_values("layer") if len(lid) else lid
        if not len(rows):
            continue
        color = POSITION_COLORS.get(position, "#4D4D4D")
        label = POSITION_LABELS.get(position, position)
        ax.plot(
            rows["layer"],
            100 * rows["accuracy"],
            color=color,
            marker="o",
            ms=2.5,
            lw=1,
            label=label,
        )
        if "control" in rows:
            ax.plot(rows["layer"], 100 * rows["control"], color=color, ls="--", lw=0.8)
        if "chance" in rows:
            ax.axhline(100 * float(rows["chance"].iloc[0]), color="#999999", lw=0.5, ls=":")
    ax.set_title("language identity (dashed: control task)")
    ax.set_ylabel("balanced accuracy (%)")
    ax.legend(frameon=False, loc="lower right")
    ax = axes[1]
    t = result.transfer
    if len(t):
        off = t[t["train_lang"] != t["test_lang"]]
        for task in result.tasks():
            for position in result.positions:
                sel = off[(off["task"] == task) & (off["position"] == position)]
                if not len(sel):
                    continue
                means = sel.groupby("layer")[["accuracy", "control"]].mean()
                color = POSITION_COLORS.get(position, "#4D4D4D")
                ax.plot(
                    means.index,
                    100 * means["accuracy"],
                    color=color,
                    marker=TASK_STYLES.get(task, "o"),
                    ms=2.5,
                    lw=1,
                    label=f"{task}, {POSITION_LABELS.get(position, position)}",
                )
                ax.plot(means.index, 100 * means["control"], color=color, lw=0.8, ls="--")
        ax.legend(frameon=False, fontsize=6)
    else:
        ax.text(
            0.5, 0.5, "no cross-lingual probe", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_title("cross-lingual probes (mean over language pairs)")
    for ax in axes:
        ax.set_xlabel("layer (0: embeddings)")
        ax.set_xticks(np.arange(len(result.sites)))
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig
