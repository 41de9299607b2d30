"""figures.probes.probe_accuracy_by_layer drawn from a result on planted activations: one
panel per training language with the test languages' colours and values, the control band,
chance, the language-identity panel, and the errors."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from matplotlib.colors import to_hex
from matplotlib.figure import Figure

from figures.probes import probe_accuracy_by_layer
from figures.style import LANG_COLORS, missing_glyphs
from probes.config import ProbeResult
from probes.crosslingual import transfer_table
from probes.language_id import language_id_table
from probes.similarity import similarity_table
from tests.probes.helpers import FAST, LANGS, planted

ONE_C = dataclasses.replace(FAST, cs=(0.1,))


@pytest.fixture(scope="module")
def result() -> ProbeResult:
    acts, classes = planted(per_class=12)
    return ProbeResult(
        langs=LANGS,
        sites=acts.sites,
        positions=acts.positions,
        language_id=language_id_table(acts, ONE_C),
        transfer=transfer_table(acts, classes, ONE_C),
        similarity=similarity_table(acts),
    )


@pytest.fixture(autouse=True)
def close_figures():
    import matplotlib.pyplot as plt

    yield
    plt.close("all")


def _accuracy_lines(ax):
    """The panel's lines with markers (accuracies), by colour."""
    return {to_hex(line.get_color()): line for line in ax.get_lines() if line.get_marker() == "o"}


def test_panels_lines_and_values(result):
    fig = probe_accuracy_by_layer(result, position="last")
    assert isinstance(fig, Figure)
    axes = [ax for ax in fig.axes if ax.axison]
    assert [ax.get_title() for ax in axes] == [f"trained in {a}" for a in LANGS] + [
        "language identity"
    ]
    t = result.transfer
    t = t[(t["task"] == "answer") & (t["position"] == "last")]
    for ax, a in zip(axes, LANGS, strict=False):
        assert to_hex(ax.title.get_color()) == LANG_COLORS[a].lower()
        lines = _accuracy_lines(ax)
        assert set(lines) == {LANG_COLORS[b].lower() for b in LANGS}
        for b in LANGS:
            line = lines[LANG_COLORS[b].lower()]
            expected = t[(t["train_lang"] == a) & (t["test_lang"] == b)].sort_values("layer")
            assert np.allclose(line.get_ydata(), expected["accuracy"])
            assert line.get_linewidth() == (2.2 if b == a else 1.1)
        # The control band spans the control accuracies over the test languages.
        band = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert len(band) == 1
        ys = band[0].get_paths()[0].vertices[:, 1]
        control = t[t["train_lang"] == a].groupby("layer")["control"]
        assert np.isclose(ys.max(), control.max().max())
        assert np.isclose(ys.min(), control.min().min())
        # Chance: the dotted horizontal line at 1 / 4 classes.
        chance = [ln for ln in ax.get_lines() if ln.get_linestyle() == ":"]
        assert len(chance) == 1 and np.allclose(chance[0].get_ydata(), 0.25)
    lid = axes[-1]
    shown = [ln for ln in lid.get_lines() if ln.get_marker() == "o"]
    assert len(shown) == 2  # both positions
    table = result.language_id
    for line, position in zip(shown, result.positions, strict=True):
        rows = table[table["position"] == position].sort_values("layer")
        assert np.allclose(line.get_ydata(), rows["accuracy"])
    fig.canvas.draw()
    labels = [t.get_text() for t in axes[-1].get_xticklabels()]
    assert labels == ["emb", "1"]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[:5] == [f"test {b}" for b in LANGS] and "control" in legend
    assert not missing_glyphs(" ".join([fig._suptitle.get_text(), *legend]))


def test_fact_task_and_default_task(result):
    fig = probe_accuracy_by_layer(result, task="fact")
    assert "fact retrieval" in fig._suptitle.get_text()
    fig = probe_accuracy_by_layer(result)
    assert "answer probe" in fig._suptitle.get_text()
    assert "subject's last token" in fig._suptitle.get_text()


def test_errors(result):
    with pytest.raises(KeyError, match="position 'middle'"):
        probe_accuracy_by_layer(result, position="middle")
    with pytest.raises(KeyError, match="task 'nope'"):
        probe_accuracy_by_layer(result, task="nope")
    empty = dataclasses.replace(result, transfer=result.transfer.iloc[0:0])
    with pytest.raises(KeyError, match="no cross-lingual task"):
        probe_accuracy_by_layer(empty)
