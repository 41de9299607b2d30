"""Where transfer fails (``result``: an :class:`~analysis.failures.FailureResult`): for one
editing method, one edit-language-by-test-language matrix per outcome (transferred, not
enriched, not extracted, lost at the output), each cell the outcome's share of the applicable
edits with its count under it; pairs without an applicable edit are hatched ``n/a``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from figures.neurons import _heatmap
from figures.style import PAGE_WIDTH, use_style


def failure_matrices(result: Any, method: str) -> Any:
    """Per outcome (:data:`~analysis.failures.TRANSFERRED`, then
    :data:`~analysis.failures.FAILURES`), a panel: rows are edit languages, columns test
    languages, the colour the outcome's share of the pair's applicable edits (0 to 1), the
    text the share and ``count/applicable``.

    Raises:
        ValueError: ``method`` not in the result.

    Returns:
        A matplotlib Figure.
    """
    import matplotlib.pyplot as plt

    from analysis.failures import FAILURES, TRANSFERRED

    if method not in result.methods:
        raise ValueError(f"method {method!r}: the result has {', '.join(result.methods)}")
    use_style()
    langs = list(result.langs)
    outcomes = (TRANSFERRED, *FAILURES)
    fig, axes = plt.subplots(
        1, len(outcomes), figsize=(PAGE_WIDTH, 2.1), squeeze=False, layout="constrained"
    )
    image = None
    for ax, outcome in zip(axes[0], outcomes, strict=True):
        rates = np.full((len(langs), len(langs)), np.nan)
        notes = np.full((len(langs), len(langs)), "", dtype=object)
        for i, a in enumerate(langs):
            for j, b in enumerate(langs):
                s = result.summary(method, a, b)
                if s.n_applicable:
                    rates[i, j] = s.rate(outcome)
                    notes[i, j] = f"{s.counts.get(outcome, 0)}/{s.n_applicable}"
        image = _heatmap(
            ax, rates, langs, cmap="Blues", vmin=0.0, vmax=1.0, fmt="{:.2f}", notes=notes
        )
        ax.set_title(outcome, fontsize=8)
        ax.set_xlabel("test language")
    axes[0][0].set_ylabel("edit language")
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), shrink=0.8, label="share of applicable edits")
    fig.suptitle(
        f"Where {method} edits fail to transfer (top {result.top_k}; latent layers "
        f"{result.latent[0]}-{result.latent[-1]} of {result.n_layers})",
        fontsize=9,
    )
    return fig
