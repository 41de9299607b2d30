"""Causal-tracing figures: the ROME-style heatmap of one fact in one language, and the average
effect by position class and layer, the languages side by side.

A language (or a fact) where tracing has no signal
(:func:`analysis.tracing.summary.tracing_signal`: the corruption leaves the answer's
probability near its clean value) is marked "no signal" in its panel title, legend entry or
figure title, rather than drawn as an unexplained blank map."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from figures.style import COLUMN_WIDTH, PAGE_WIDTH, layer_ticks, matrix_scale, use_style

#: Tokens shown before the subject in a fact's heatmap.  Restoring a token before the subject
#: changes nothing (its states are the same in the clean and corrupted runs), so the rows
#: further back (a few-shot prompt's demonstrations: most of the prompt) are left out, and the
#: axis label says how many.
SHOWN_BEFORE_SUBJECT = 8

#: Sequential single-hue colour maps per kind (ROME's convention; colour-blind safe).
CMAPS = {"resid": "Purples", "mlp": "Greens", "attn": "Reds"}
TITLES = {"resid": "residual stream", "mlp": "MLP output", "attn": "attention output"}
CLASS_LABELS = {
    "before_subject": "before subject",
    "first_subject": "first subject token",
    "middle_subject": "middle subject tokens",
    "last_subject": "last subject token",
    "first_after": "first token after",
    "later": "later tokens",
    "last": "last token",
}


def display_token(text: str) -> str:
    """A token as a tick label: newlines shown as ``\\n``, bytes of a character split over
    several tokens (byte-level BPE) as ``…``."""
    return text.replace("\n", "\\n").replace("\ufffd", "…") or "∅"


def trace_heatmap(
    trace: Any,
    kinds: Sequence[str] | None = None,
    *,
    title: str | None = None,
    min_total_effect: float | None = None,
) -> Any:
    """ROME-style heatmaps of one fact trace
    (:class:`~analysis.tracing.causal.FactTrace`): tokens (real labels, subject tokens
    starred) by layer, coloured by the answer's probability with that state restored; the
    colour scale starts at the corrupted probability.  One panel per kind.  A fact without
    signal (:func:`~analysis.tracing.summary.tracing_signal` with ``min_total_effect``,
    default the tracing default) says so in the title.  Tokens more than
    :data:`SHOWN_BEFORE_SUBJECT` before the subject are left out (no effect by construction),
    and the token axis says so.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from analysis.tracing.summary import MIN_TOTAL_EFFECT, tracing_signal

    use_style()
    kinds = list(kinds or trace.scores)
    n_tokens, n_layers = next(iter(trace.scores.values())).shape
    first = max(0, min(trace.subject_positions) - SHOWN_BEFORE_SUBJECT)
    labels = [
        display_token(t) + (" *" if i in set(trace.subject_positions) else "")
        for i, t in enumerate(trace.tokens)
    ][first:]
    n_tokens -= first
    height = max(2.0, 0.16 * n_tokens + 0.9)
    fig, axes = plt.subplots(
        1, len(kinds), figsize=(min(PAGE_WIDTH, 2.3 * len(kinds)), height), squeeze=False
    )
    for ax, kind in zip(axes[0], kinds, strict=True):
        scores = trace.scores[kind][first:]
        # At least 5 points of range: a model the corruption barely moves shows a flat map,
        # not its numerical noise blown up.
        vmin = min(trace.p_corrupt, float(scores.min()))
        vmax = max(trace.p_clean, float(scores.max()))
        if vmax - vmin < 0.05:  # probabilities: keep the scale inside [0, 1]
            vmax = min(1.0, vmin + 0.05)
            vmin = vmax - 0.05
        image = ax.imshow(
            scores,
            cmap=CMAPS.get(kind, "Greys"),
            vmin=vmin,
            vmax=vmax,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_yticks(range(n_tokens), labels if ax is axes[0][0] else [""] * n_tokens)
        if first and ax is axes[0][0]:
            ax.set_ylabel(f"from token {first} (the {first} before it: no effect, not shown)")
        ax.set_xticks(layer_ticks(n_layers))
        ax.set_xlabel("layer" if kind == "resid" else f"centre of {trace.window}-layer window")
        ax.set_title(f"restoring {TITLES.get(kind, kind)}")
        bar = fig.colorbar(image, ax=ax, fraction=0.08, pad=0.03)
        bar.ax.tick_params(labelsize=6)
        bar.formatter.set_useOffset(False)  # type: ignore[attr-defined]  # a ScalarFormatter
        bar.update_ticks()
    probs = f"p(answer): clean {trace.p_clean:.2f}, corrupted {trace.p_corrupt:.2f}"
    threshold = MIN_TOTAL_EFFECT if min_total_effect is None else min_total_effect
    if not tracing_signal(1, trace.p_clean, trace.p_corrupt, threshold)[0]:
        probs += f" (no signal: a drop under {100 * threshold:g}% of clean)"
    fig.suptitle(f"{title}; {probs}" if title else probs)
    fig.tight_layout()
    return fig


def average_effects(result: Any, kind: str = "mlp", *, langs: Sequence[str] | None = None) -> Any:
    """The average indirect effect of ``kind`` by position class and layer, one panel per
    language on one colour scale (``result``: a
    :class:`~analysis.tracing.summary.TracingResult`).  A language without signal is titled
    "no signal" (its map is noise and sets the colour scale only when no language has signal).

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from analysis.tracing.causal import POSITION_CLASSES

    use_style()
    summaries = [s for s in result.summaries if langs is None or s.lang in langs]
    maps = [s.maps[kind] for s in summaries if s.n_facts and s.signal] or [
        s.maps[kind] for s in summaries if s.n_facts
    ]
    finite = np.concatenate([m[np.isfinite(m)] for m in maps]) if maps else np.zeros(1)
    vmax = max(1e-6, float(finite.max())) if finite.size else 1.0
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    fig, axes = plt.subplots(
        1,
        len(summaries),
        figsize=(PAGE_WIDTH, 0.22 * len(POSITION_CLASSES) + 0.9),
        squeeze=False,
        sharey=True,
    )
    image = None
    for ax, s in zip(axes[0], summaries, strict=True):
        data = (
            s.maps[kind] if s.n_facts else np.full((len(POSITION_CLASSES), result.n_layers), np.nan)
        )
        image = ax.imshow(
            np.ma.masked_invalid(data),
            cmap=CMAPS.get(kind, "Greys"),
            vmin=vmin,
            vmax=vmax,
            aspect="auto",
            interpolation="nearest",
        )
        ax.set_title(f"{s.lang} (n={s.n_facts})" + ("" if s.signal else "\nno signal"))
        ax.set_xticks(layer_ticks(result.n_layers, max_labels=6))
        ax.set_xlabel("layer")
        ax.set_yticks(range(len(POSITION_CLASSES)), [CLASS_LABELS[c] for c in POSITION_CLASSES])
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[0]), fraction=0.02, pad=0.01)
        bar.set_label("indirect effect", fontsize=7)
    two_lines = any(not s.signal for s in summaries)  # "no signal" under a panel's title
    fig.suptitle(
        f"average indirect effect of restoring the {TITLES.get(kind, kind)}",
        y=1.1 if two_lines else 1.02,
    )
    return fig


def similarity_heatmap(result: Any, kind: str = "all") -> Any:
    """The language x language profile similarity between languages, annotated (``kind``: a traced kind or
    ``all``); languages without signal are starred and named in the title (their profiles are
    noise)."""
    import matplotlib.pyplot as plt

    use_style()
    matrix = np.array(result.similarity[kind], dtype=float)
    langs = list(result.langs)
    side = COLUMN_WIDTH * matrix_scale(len(langs))
    fig, ax = plt.subplots(figsize=(side, side * 0.85))
    image = ax.imshow(matrix, cmap="viridis", vmin=-1, vmax=1)
    quiet = [s.lang for s in result.summaries if not s.signal]
    ticks = [f"{lang}*" if lang in quiet else lang for lang in langs]
    ax.set_xticks(range(len(langs)), ticks)
    ax.set_yticks(range(len(langs)), ticks)
    for i in range(len(langs)):
        for j in range(len(langs)):
            v = matrix[i, j]
            ax.text(
                j,
                i,
                "-" if np.isnan(v) else f"{v:.2f}",
                ha="center",
                va="center",
                color="white" if not np.isnan(v) and v < 0.3 else "black",
                fontsize=7,
            )
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="Pearson r")
    ax.set_title(
        f"tracing profile similarity ({kind})"
        + (f"\n*no signal: {', '.join(quiet)}" if quiet else "")
    )
    fig.tight_layout()
    return fig


#: Profiles drawn by :func:`profiles`: (kind, position class, what it shows).
PROFILES = (
    ("mlp", "last_subject", "MLP at the last subject token"),
    ("attn", "last", "attention at the last token"),
    ("resid", "last_subject", "residual at the last subject token"),
)


def profiles(result: Any) -> Any:
    """Tracing profiles: the average indirect effect by layer, one line per language
    (:func:`figures.style.lang_color`), for the MLP at the last subject token, attention at
    the last token and the residual stream at the last subject token (ROME's three readings),
    one panel each (kinds not traced are left out).  A language without signal is drawn
    dashed and faint, "no signal" in its legend entry.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from analysis.tracing.causal import POSITION_CLASSES
    from figures.style import lang_color

    use_style()
    panels = [p for p in PROFILES if p[0] in result.kinds]
    fig, axes = plt.subplots(
        1,
        len(panels),
        figsize=(PAGE_WIDTH, 1.9),
        squeeze=False,
        sharey=True,
        layout="constrained",
    )
    layers = np.arange(result.n_layers)
    for ax, (kind, cls, title) in zip(axes[0], panels, strict=True):
        row = POSITION_CLASSES.index(cls)
        for s in result.summaries:
            if not s.n_facts:
                continue
            ax.plot(
                layers,
                100 * np.asarray(s.maps[kind][row], dtype=float),
                marker="o",
                ms=2.5,
                lw=1,
                color=lang_color(s.lang),
                label=f"{s.lang} (n={s.n_facts})" + ("" if s.signal else ", no signal"),
                ls="-" if s.signal else "--",
                alpha=1.0 if s.signal else 0.45,
            )
        ax.axhline(0, color="#999999", lw=0.5)
        ax.set_xticks(layer_ticks(len(layers)))
        ax.set_xlabel("layer" if kind == "resid" else f"centre of {result.window}-layer window")
        ax.set_title(title)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    axes[0][0].set_ylabel("indirect effect (pp)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside right center", frameon=False)
    return fig
