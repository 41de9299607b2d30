"""Probe figures (``result``: a :class:`probes.config.ProbeResult`): probe accuracy by layer.

Left, the language-identity probe's balanced accuracy at each layer (one line per position:
the subject's last token, the prompt's last token), with its control task dashed.  Right, the
cross-lingual probes (a probe trained in one language, tested on held-out facts in another):
the mean accuracy over the off-diagonal language pairs at each layer, per task and position,
with its control dashed.  Layer 0 is the embeddings.  A hollow marker is a probe with no signal
(:func:`probes.config.probe_signal`: not reliably above its control or chance).

:func:`probe_accuracy_by_layer` shows the cross-lingual probe per language pair: one panel per
training language, one line per test language, the control task as a grey band, and the
language-identity probe in the last panel.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from figures.style import PAGE_WIDTH, SHARED_COLOR, lang_color, use_style

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
        _mark_no_signal(
            ax,
            rows["layer"],
            100 * rows["accuracy"],
            [result.language_id_signal(position, int(x))[0] for x in rows["layer"]],
            color,
            "o",
        )
        if "control" in rows:
            ax.plot(rows["layer"], 100 * rows["control"], color=color, ls="--", lw=0.8)
        if "chance" in rows:
            ax.axhline(100 * float(rows["chance"].iloc[0]), color="#999999", lw=0.5, ls=":")
    ax.set_title("language identity\n(dashed: control task; hollow: no signal)")
    ax.set_ylabel("balanced accuracy (%)")
    ax.legend(frameon=False, loc="center right", fontsize=6)
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
                _mark_no_signal(
                    ax,
                    means.index,
                    100 * means["accuracy"],
                    [result.cross_lingual_signal(task, position, int(x))[0] for x in means.index],
                    color,
                    TASK_STYLES.get(task, "o"),
                )
        ax.legend(frameon=False, loc="upper right", fontsize=6)
    else:
        ax.text(
            0.5, 0.5, "no cross-lingual probe", ha="center", va="center", transform=ax.transAxes
        )
    ax.set_title(
        "cross-lingual probes, mean over language pairs\n(dashed: control; hollow: no signal)"
    )
    ax.set_ylabel("accuracy (%; fact: top-1 retrieval)")
    for ax in axes:
        ax.set_ylim(0, 100)  # one scale for both panels
        ax.set_xlabel("layer (0: embeddings)")
        ax.set_xticks(np.arange(len(result.sites)))
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig


def _mark_no_signal(
    ax: Any, x: Any, y: Any, signals: list[bool | None], color: str, marker: str
) -> None:
    """Draw hollow markers over the points whose probe has no signal."""
    quiet = np.array([s is False for s in signals], dtype=bool)
    if quiet.any():
        ax.plot(
            np.asarray(x)[quiet],
            np.asarray(y, dtype=float)[quiet],
            ls="none",
            marker=marker,
            ms=4,
            mfc="white",
            mec=color,
            mew=0.9,
            zorder=4,
        )


PAIR_POSITION_LABELS = {"subject": "subject's last token", "last": "last token"}
TASK_LABELS = {
    "answer": "answer probe (balanced accuracy)",
    "fact": "fact retrieval (top-1)",
}
#: Line style of each position in the language-identity panel.
POSITION_STYLES: dict[str, Any] = {"subject": "-", "last": "--"}
CONTROL_COLOR = "#9A9A9A"


def _style_axis(ax: Any, layers: list[int]) -> None:
    from probes.activations import layer_name

    ax.set_xticks(layers, [layer_name(i) for i in layers])
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlim(layers[0] - 0.15, layers[-1] + 0.15)
    ax.grid(axis="y", color="#E6E6E6", linewidth=0.5)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def probe_accuracy_by_layer(result: Any, task: str | None = None, position: str = "subject") -> Any:
    """Cross-lingual probe accuracy by layer, and language identity by layer.

    One panel per training language A: a line per test language B (the language's colour,
    :func:`figures.style.lang_color`; the within-language line, B = A, drawn thicker), every
    probe scored on held-out facts.  The grey band spans the control task's accuracies over
    the test languages (its mean drawn as a grey line), so the height of a line above the band
    is its selectivity; the dotted line is chance.  The last panel is the language-identity
    probe at both positions (solid: the subject's last token; dashed: the last token), with
    its controls in grey.  Layer ``emb`` is the embeddings, ``L`` the residual stream after
    block ``L``.

    Args:
        task: ``answer`` (default when the result has it) or ``fact``.
        position: ``subject`` or ``last``, for the cross-lingual panels.

    Returns:
        A matplotlib Figure.

    Raises:
        KeyError: a task or position the result does not hold.
    """
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    tasks = result.tasks()
    if task is None:
        if not tasks:
            raise KeyError("the result has no cross-lingual task")
        task = tasks[0]
    result._check(task, position)
    use_style()
    langs = list(result.langs)
    layers = result.layers
    n_panels = len(langs) + 1
    n_cols = 3
    n_rows = int(np.ceil(n_panels / n_cols))
    fig, axes = plt.subplots(
        n_rows,
        n_cols,
        figsize=(PAGE_WIDTH, 1.75 * n_rows + 0.55),
        squeeze=False,
        sharex=True,
        layout="constrained",
    )
    flat = list(axes.ravel())
    t = result.transfer
    t = t[(t["task"] == task) & (t["position"] == position)]
    chance = float(t["chance"].mean())
    for ax, a in zip(flat, langs, strict=False):
        rows = t[t["train_lang"] == a]
        control = rows.pivot(index="layer", columns="test_lang", values="control").reindex(layers)
        ax.fill_between(
            layers,
            control.min(axis=1).to_numpy(dtype=float),
            control.max(axis=1).to_numpy(dtype=float),
            color=CONTROL_COLOR,
            alpha=0.25,
            linewidth=0,
        )
        ax.plot(layers, control.mean(axis=1), color=CONTROL_COLOR, linewidth=0.9)
        ax.axhline(chance, color="#555555", linestyle=":", linewidth=0.8)
        for b in langs:
            acc = rows[rows["test_lang"] == b].set_index("layer")["accuracy"].reindex(layers)
            ax.plot(
                layers,
                acc.to_numpy(dtype=float),
                color=lang_color(b),
                linewidth=2.2 if b == a else 1.1,
                marker="o",
                markersize=2.5 if b == a else 2.0,
                zorder=3 if b == a else 2,
            )
        ax.set_title(f"trained in {a}", color=lang_color(a))
        _style_axis(ax, layers)
    lid_ax = flat[len(langs)]
    lid = result.language_id
    lid_chance = float(lid["chance"].mean()) if len(lid) else np.nan
    for p in result.positions:
        rows = lid[lid["position"] == p].set_index("layer").reindex(layers)
        style = POSITION_STYLES.get(p, "-")
        lid_ax.plot(
            layers, rows["control"].to_numpy(dtype=float), color=CONTROL_COLOR,
            linestyle=style, linewidth=0.9,
        )  # fmt: skip
        lid_ax.plot(
            layers, rows["accuracy"].to_numpy(dtype=float), color=SHARED_COLOR,
            linestyle=style, linewidth=1.6, marker="o", markersize=2.5,
        )  # fmt: skip
    lid_ax.axhline(lid_chance, color="#555555", linestyle=":", linewidth=0.8)
    lid_ax.set_title("language identity")
    _style_axis(lid_ax, layers)
    for ax in flat[n_panels:]:
        ax.set_axis_off()
    for row in axes:
        row[0].set_ylabel("accuracy")
    for ax in axes[-1]:
        if ax.axison:
            ax.set_xlabel("layer")
    handles = [Line2D([], [], color=lang_color(b), linewidth=1.4, label=f"test {b}") for b in langs]
    handles += [
        Line2D([], [], color=CONTROL_COLOR, linewidth=3, alpha=0.5, label="control"),
        Line2D([], [], color="#555555", linestyle=":", linewidth=0.8, label="chance"),
    ]
    handles += [
        Line2D([], [], color=SHARED_COLOR, linestyle=POSITION_STYLES.get(p, "-"),
               label=f"lang. ID, {PAIR_POSITION_LABELS.get(p, p)}")
        for p in result.positions
    ]  # fmt: skip
    fig.legend(handles=handles, loc="outside right center", frameon=False, handlelength=1.8)
    fig.suptitle(
        f"{TASK_LABELS.get(task, task)} by layer, held-out facts, at the "
        f"{PAIR_POSITION_LABELS.get(position, position)}: trained in one language (panel), tested "
        "in each (line)",
        fontsize=8,
    )
    return fig
