"""Latent-language lens figures (``result``: a :class:`~analysis.lens.LensResult`): layer by
layer, the mean probability of a fact's answer written in each answer language, read through
the logit lens at one prompt position, one panel per prompt language.

At the last position (where the answer is read out) the panel of a non-English prompt
language also draws its *latent English* curve: the English answer's mean probability over
the facts whose English first token differs from the prompt language's (the plain English
line counts the facts where the two coincide, ``Paris`` in fr and en, as English too).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from figures.style import PAGE_WIDTH, SHARED_COLOR, lang_color, layer_ticks, use_style

#: What each lens position is called in titles.
POSITION_LABELS = {
    "last": "the last position (where the answer is read out)",
    "subject_last": "the subject's last token",
}
#: Line width of the prompt language's own answer, and of the other answer languages.
OWN_WIDTH, OTHER_WIDTH = 2.2, 1.0
#: The latent English curve's legend entry.
LATENT_LABEL = "latent English (facts whose English token differs)"


def answer_probabilities(
    result: Any, position: str = "last", *, langs: Sequence[str] | None = None
) -> Any:
    """Per prompt language (one panel each, ``n`` facts in its title), the mean probability
    by layer of the answer written in each answer language (one line each,
    :func:`figures.style.lang_color`; the prompt language's own answer drawn thick, the others
    thin), at ``position`` (``last`` or ``subject_last``).  At ``last`` a non-English prompt
    language's latent English curve is drawn dotted (module docstring).  A prompt language
    with no fact looked at says so in its panel.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    use_style()
    if position not in POSITION_LABELS:
        raise ValueError(f"position {position!r}: choose {', '.join(POSITION_LABELS)}")
    summaries = [s for s in result.summaries if langs is None or s.lang in langs]
    n_panels = max(1, len(summaries))
    fig, axes = plt.subplots(
        1,
        n_panels,
        figsize=(PAGE_WIDTH, 2.0),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    layers = np.arange(result.n_layers)
    top = 0.0
    for ax, s in zip(axes[0], summaries, strict=False):
        ax.set_title(f"{s.lang} prompts (n={s.n_facts})")
        ax.set_xticks(layer_ticks(result.n_layers, max_labels=6))
        ax.set_xlim(-0.3, result.n_layers - 0.7)
        ax.set_xlabel("layer")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        rows = np.asarray(s.mean_prob.get(position) or [], dtype=float)
        if not s.n_facts or rows.size == 0:
            ax.text(
                0.5,
                0.5,
                "no fact\nlooked at",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#666666",
            )
            continue
        # The prompt language's own answer last, so that it is drawn on top.
        order = sorted(range(len(s.answer_langs)), key=lambda j: s.answer_langs[j] == s.lang)
        for j in order:
            lang = s.answer_langs[j]
            own = lang == s.lang
            ax.plot(
                layers,
                rows[:, j],
                marker="o" if own else None,
                ms=2.5,
                lw=OWN_WIDTH if own else OTHER_WIDTH,
                alpha=1.0 if own else 0.8,
                color=lang_color(lang),
                label=f"{lang} answer",
                zorder=3 if own else 2,
            )
        top = max(top, float(rows.max()))
        if position == "last" and s.latent_english:
            latent = np.asarray(s.latent_english, dtype=float)
            ax.plot(
                layers,
                latent,
                ls=":",
                lw=1.4,
                color=SHARED_COLOR,
                label=LATENT_LABEL,
                zorder=4,
            )
            ax.text(
                0.02,
                0.97,
                f"latent English: n={s.n_english_distinct}",
                ha="left",
                va="top",
                fontsize=6,
                color=SHARED_COLOR,
                transform=ax.transAxes,
            )
            top = max(top, float(latent.max()))
    for ax in axes[0][len(summaries) :]:
        ax.set_visible(False)
    axes[0][0].set_ylim(0, min(1.0, max(0.05, 1.08 * top)))
    axes[0][0].set_ylabel("mean probability of\nthe answer's first token")
    # One legend for every panel: the answer languages in the run's order (drawn thin; each
    # panel's own language is the thick line), then the latent English curve when drawn.
    from matplotlib.lines import Line2D

    drawn = {label for ax in axes[0] for label in ax.get_legend_handles_labels()[1]}
    handles = [
        Line2D([], [], color=lang_color(lang), lw=OTHER_WIDTH)
        for lang in result.langs
        if f"{lang} answer" in drawn
    ]
    labels = [f"{lang} answer" for lang in result.langs if f"{lang} answer" in drawn]
    if LATENT_LABEL in drawn:
        handles.append(Line2D([], [], color=SHARED_COLOR, lw=1.4, ls=":"))
        labels.append(LATENT_LABEL)
    if handles:
        handles.append(Line2D([], [], color=SHARED_COLOR, lw=OWN_WIDTH, marker="o", ms=2.5))
        labels.append("thick: the prompt's own language")
        fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    lens = getattr(result, "lens", "logit")
    fig.suptitle(f"{lens} lens at {POSITION_LABELS[position]}: the answer written in each language")
    return fig


#: Line styles of the edit lens curves: (kind, phase) -> (line style, label).
EDIT_STYLES = {
    ("new", "after"): ("-", "new answer, after the edit"),
    ("new", "before"): ("--", "new answer, before"),
    ("old", "after"): ("-", "old answer, after the edit"),
    ("old", "before"): ("--", "old answer, before"),
}
#: The colors of the new and the old answer in the edit lens figure.
NEW_COLOR, OLD_COLOR = "#c0392b", "#7f8c8d"


def edit_curves(
    result: Any, edit_lang: str, position: str = "last", *, langs: Sequence[str] | None = None
) -> Any:
    """The lens before and after the edits of one edit language (``result``: an
    :class:`~analysis.lens.EditLensResult`): one panel per test language, the mean
    probability by layer of the new answer (red) and the old answer (grey), each written in
    the test language, before the edit (dashed) and after it (solid), at ``position``.  Each
    panel's title gives the edits read there and how many succeed there; a panel without
    edits says so.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    use_style()
    if position not in POSITION_LABELS:
        raise ValueError(f"position {position!r}: choose {', '.join(POSITION_LABELS)}")
    if edit_lang not in result.pairs:
        raise ValueError(f"edit language {edit_lang!r}: the run has {', '.join(result.pairs)}")
    tests = [b for b in result.langs if langs is None or b in langs]
    fig, axes = plt.subplots(
        1,
        max(1, len(tests)),
        figsize=(PAGE_WIDTH, 2.0),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    layers = np.arange(result.n_layers)
    top = 0.0
    for ax, b in zip(axes[0], tests, strict=False):
        s = result.pair(edit_lang, b)
        ax.set_title(f"read in {b}: {s.n_success}/{s.n_edits} succeed", fontsize=7)
        ax.set_xticks(layer_ticks(result.n_layers, max_labels=6))
        ax.set_xlim(-0.3, result.n_layers - 0.7)
        ax.set_xlabel("layer")
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
        curves = s.mean_prob.get(position) or {}
        if not s.n_edits or not curves:
            ax.text(
                0.5,
                0.5,
                "no edit\nread here",
                ha="center",
                va="center",
                transform=ax.transAxes,
                color="#666666",
            )
            continue
        for (kind, phase), (ls, label) in EDIT_STYLES.items():
            values = np.asarray(curves[f"{kind}_{phase}"], dtype=float)
            ax.plot(
                layers,
                values,
                ls=ls,
                lw=2.0 if phase == "after" else 1.2,
                marker="o" if phase == "after" else None,
                ms=2.5,
                color=NEW_COLOR if kind == "new" else OLD_COLOR,
                label=label,
            )
            top = max(top, float(values.max()))
    for ax in axes[0][len(tests) :]:
        ax.set_visible(False)
    axes[0][0].set_ylim(0, min(1.0, max(0.05, 1.08 * top)))
    axes[0][0].set_ylabel("mean probability\n(test language's form)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:
        for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=4, frameon=False)
    fig.suptitle(
        f"{result.method} edits in {edit_lang} (n={len(result.edits.get(edit_lang, []))}), "
        f"{result.lens} lens at {POSITION_LABELS[position]}"
    )
    return fig
