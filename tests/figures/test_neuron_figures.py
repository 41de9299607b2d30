"""Neuron-attribution figures (figures/neurons.py) drawn from a synthetic NeuronResult: panels,
annotations, colour scales, NaN cells, language labels and colours, and glyphs."""

from __future__ import annotations

import math

import numpy as np
import pytest

from analysis.neurons.config import MethodSummary, NeuronResult
from mlake_core.languages import LANGUAGES

N_LAYERS = 4
D_MLP = 64
N_HEADS = 4


def _symmetric(rng: np.random.Generator) -> np.ndarray:
    m = rng.uniform(0.0, 0.6, (5, 5))
    m = (m + m.T) / 2
    np.fill_diagonal(m, 1.0)
    return m


def _summary(method: str, unit: str, rng: np.random.Generator) -> MethodSummary:
    n_units = D_MLP if unit == "neuron" else N_HEADS
    jaccard = _symmetric(rng)
    overlap = np.minimum(1.0, 1.5 * jaccard)
    n_pairs = np.full((5, 5), 7)
    np.fill_diagonal(n_pairs, 0)
    # zh-ja: no fact attributed in both languages.
    for m in (jaccard, overlap):
        m[1, 2] = m[2, 1] = math.nan
    n_pairs[1, 2] = n_pairs[2, 1] = 0
    counts = []
    for layer in range(N_LAYERS):
        row: dict[str, int] = {"layer": layer}
        for i, lang in enumerate(LANGUAGES):
            row[f"specific_{lang}"] = (layer + i) % 3 if unit == "neuron" else i % 2
        row["shared"] = layer + 1 if unit == "neuron" else 0
        row["neither"] = n_units - sum(v for k, v in row.items() if k != "layer")
        counts.append(row)
    drop = rng.uniform(-0.05, 0.1, (5, 5))
    np.fill_diagonal(drop, 0.4)
    drop[4, 3] = math.nan
    drop_random = rng.uniform(-0.02, 0.02, (5, 5))
    return MethodSummary(
        method=method,
        unit=unit,
        n_facts=dict.fromkeys(LANGUAGES, 7),
        set_size=dict.fromkeys(LANGUAGES, 3.0),
        jaccard=(jaccard if method != "lape" else np.full((5, 5), math.nan)).tolist(),
        overlap=(overlap if method != "lape" else np.full((5, 5), math.nan)).tolist(),
        n_pairs=n_pairs.tolist(),
        counts=counts,
        ablation=drop.tolist(),
        ablation_random=drop_random.tolist(),
        check={},
    )


@pytest.fixture
def result() -> NeuronResult:
    rng = np.random.default_rng(0)
    return NeuronResult(
        langs=LANGUAGES,
        n_layers=N_LAYERS,
        methods=[
            _summary("ig", "neuron", rng),
            _summary("atp", "neuron", rng),
            _summary("atp", "head", rng),
            _summary("lape", "neuron", rng),
        ],
        skipped={},
        run_path="runs/synthetic",
    )


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


def _heatmap_axes(fig):
    """Axes holding an image that are not colour bars."""
    bars = {getattr(im.colorbar, "ax", None) for ax in fig.axes for im in ax.images}
    return [ax for ax in fig.axes if ax.images and ax not in bars]


def _texts(ax) -> list[str]:
    return [t.get_text() for t in ax.texts]


def _all_text(fig) -> str:
    parts = [fig.get_suptitle()] if hasattr(fig, "get_suptitle") else []
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel(), *_texts(ax)]
        parts += [t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()]
        if ax.get_legend():
            parts += [t.get_text() for t in ax.get_legend().get_texts()]
    return " ".join(parts)


def test_language_colours_cover_languages() -> None:
    from matplotlib.colors import to_rgb

    from figures.style import LANG_COLORS, SHARED_COLOR

    assert set(LANG_COLORS) == set(LANGUAGES)
    colours = [to_rgb(c) for c in [*LANG_COLORS.values(), SHARED_COLOR]]
    assert len(set(colours)) == len(colours)


def test_overlap_matrices(result) -> None:
    from matplotlib.figure import Figure

    from figures.neurons import NAN_TEXT, overlap_matrices
    from figures.style import missing_glyphs

    fig = overlap_matrices(result)
    assert isinstance(fig, Figure)
    panels = _heatmap_axes(fig)
    # ig and atp, not lape (no per-fact sets); one shared colour bar.
    assert [ax.get_title() for ax in panels] == ["integrated gradients", "attribution patching"]
    assert len(fig.axes) == 3
    for ax, method in zip(panels, ("ig", "atp"), strict=True):
        assert ax.images[0].get_clim() == (0.0, 1.0)
        assert [t.get_text() for t in ax.get_xticklabels()] == list(LANGUAGES)
        assert [t.get_text() for t in ax.get_yticklabels()] == list(LANGUAGES)
        texts = _texts(ax)
        matrix = np.array(result.get(method).jaccard, dtype=float)
        # Every finite cell annotated with its value; the two zh-ja cells marked n/a.
        for v in matrix[np.isfinite(matrix)]:
            assert f"{v:.2f}" in texts
        assert texts.count(NAN_TEXT) == 2
        assert texts.count("n=7") == 5 * 4 - 2  # off-diagonal cells with a value
        hatched = [p for p in ax.patches if p.get_hatch()]
        assert len(hatched) == 2
        assert sorted((p.get_x() + 0.5, p.get_y() + 0.5) for p in hatched) == [(1, 2), (2, 1)]
        assert np.ma.is_masked(ax.images[0].get_array()[1, 2])
    assert not missing_glyphs(_all_text(fig))

    # The overlap coefficient, and heads (attribution patching only).
    fig = overlap_matrices(result, unit="head", measure="overlap")
    (panel,) = _heatmap_axes(fig)
    assert panel.get_title() == "attribution patching"
    matrix = np.array(result.get("atp", "head").overlap, dtype=float)
    assert f"{matrix[0, 1]:.2f}" in _texts(panel)


def test_overlap_matrices_from_json(result) -> None:
    """Matrices read back from the result's JSON hold None for NaN."""
    from figures.neurons import NAN_TEXT, overlap_matrices

    for summary in result.methods:
        summary.jaccard = summary.to_dict()["jaccard"]
    assert result.get("ig").jaccard[1][2] is None
    fig = overlap_matrices(result)
    assert all(_texts(ax).count(NAN_TEXT) == 2 for ax in _heatmap_axes(fig))


def test_overlap_matrices_refuses(result) -> None:
    from figures.neurons import overlap_matrices

    with pytest.raises(ValueError, match="measure"):
        overlap_matrices(result, measure="dice")
    lape_only = NeuronResult(LANGUAGES, N_LAYERS, [result.get("lape")], {}, "runs/x")
    with pytest.raises(ValueError, match="no per-fact"):
        overlap_matrices(lape_only)


@pytest.mark.parametrize("method, unit", [("ig", "neuron"), ("atp", "head"), ("lape", "neuron")])
def test_unit_counts(result, method, unit) -> None:
    from matplotlib.colors import to_rgba

    from figures.neurons import unit_counts
    from figures.style import LANG_COLORS, SHARED_COLOR, missing_glyphs

    summary = result.get(method, unit)
    fig = unit_counts(result, method, unit)
    (ax,) = fig.axes
    # One stack of bars per language and one for shared units; "neither" is not drawn.
    containers = ax.containers
    assert [c.get_label() for c in containers] == [*LANGUAGES, "shared"]
    # The legend reads top to bottom as the stack.
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["shared", *LANGUAGES[::-1]]
    for container, key in zip(containers, [*LANGUAGES, "shared"], strict=True):
        colour = SHARED_COLOR if key == "shared" else LANG_COLORS[key]
        assert len(container.patches) == N_LAYERS
        assert all(p.get_facecolor() == to_rgba(colour) for p in container.patches)
        column = "shared" if key == "shared" else f"specific_{key}"
        heights = [p.get_height() for p in container.patches]
        assert heights == [row[column] for row in summary.counts]
    tops = [
        sum(row[k] for k in row if k.startswith("specific_") or k == "shared")
        for row in summary.counts
    ]
    last = containers[-1].patches
    assert [p.get_y() + p.get_height() for p in last] == pytest.approx(tops)
    assert ax.get_ylim()[1] > max(max(tops), 1)  # room for the note
    neither = sum(row["neither"] for row in summary.counts)
    n_units = D_MLP if unit == "neuron" else N_HEADS
    (note,) = [t for t in _texts(ax) if "no language" in t]
    assert f"{neither:,} of {N_LAYERS * n_units:,}" in note
    assert [t.get_text() for t in ax.get_xticklabels()] == [str(x) for x in range(N_LAYERS)]
    assert all(float(t).is_integer() for t in ax.get_yticks())  # whole units
    assert not missing_glyphs(_all_text(fig))


def test_unit_counts_unknown(result) -> None:
    from figures.neurons import unit_counts

    with pytest.raises(KeyError, match="ig"):
        unit_counts(result, "ig", "head")


def test_ablation_matrix(result) -> None:
    from figures.neurons import NAN_TEXT, ablation_matrix
    from figures.style import missing_glyphs

    summary = result.get("atp")
    fig = ablation_matrix(result, "atp")
    panels = _heatmap_axes(fig)
    assert [ax.get_title() for ax in panels] == ["specific units ablated", "random units ablated"]
    assert len(fig.axes) == 3  # and one colour bar
    limits = [ax.images[0].get_clim() for ax in panels]
    assert limits[0] == limits[1]
    low, high = limits[0]
    assert low == -high  # centred at 0
    finite = [v for m in (summary.ablation, summary.ablation_random) for row in m for v in row]
    finite = np.array(finite, dtype=float)
    assert high == pytest.approx(100 * np.nanmax(np.abs(finite)))
    cmap = panels[0].images[0].get_cmap()
    assert cmap.name.startswith("RdBu")
    specific, random = (_texts(ax) for ax in panels)
    # Percentage points, signed.
    assert "+40.0" in specific
    v = summary.ablation[0][1]
    assert f"{100 * v:+.1f}" in specific
    assert specific.count(NAN_TEXT) == 1 and random.count(NAN_TEXT) == 0
    assert f"{100 * summary.ablation_random[2][3]:+.1f}" in random
    summary.ablation_random[0][0] = 0.0
    summary.ablation_random[0][1] = -1e-4
    fig = ablation_matrix(result, "atp")
    zeros = _texts(_heatmap_axes(fig)[1])[:2]
    assert zeros == ["0.0", "0.0"]  # no sign on a zero
    for ax in panels:
        assert [t.get_text() for t in ax.get_xticklabels()] == list(LANGUAGES)
        assert [t.get_text() for t in ax.get_yticklabels()] == list(LANGUAGES)
    assert panels[0].get_ylabel() == "ablated language"
    assert panels[0].get_xlabel() == "measured language"
    assert not missing_glyphs(_all_text(fig))


def test_ablation_matrix_all_nan(result) -> None:
    """Heads have no ablation matrix: every cell n/a, the scale stays sane."""
    from figures.neurons import NAN_TEXT, ablation_matrix

    summary = result.get("atp", "head")
    summary.ablation = [[None] * 5 for _ in range(5)]
    summary.ablation_random = [[math.nan] * 5 for _ in range(5)]
    fig = ablation_matrix(result, "atp", "head")
    for ax in _heatmap_axes(fig):
        assert _texts(ax).count(NAN_TEXT) == 25
        assert ax.images[0].get_clim() == (-1.0, 1.0)
