"""One figure style for every mlake figure, with a real CJK font.

Figure labels hold Chinese and Japanese tokens, which matplotlib's default font (DejaVu Sans)
draws as empty boxes.  :func:`use_style` registers Noto Sans CJK SC (shipped as a file by the
``mplfonts`` dependency; it covers simplified Chinese, kana and the kanji in MLaKE) and puts it
after DejaVu Sans in the fallback list, so Latin text keeps its usual look and CJK characters
are drawn by a font that has them.  :func:`missing_glyphs` checks a label against the fonts
actually in use (the figure tests call it).

Sizes are for a two-column paper: a single column is 3.3 in wide, the full width 6.9 in.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

from mlake_core.errors import ConfigError

COLUMN_WIDTH = 3.3
PAGE_WIDTH = 6.9

#: One colour per language, the same in every mlake figure: the Okabe-Ito palette (safe for
#: the common colour-vision deficiencies; its yellow, weak on white, is left out).
LANG_COLORS: dict[str, str] = {
    "en": "#0072B2",  # blue
    "zh": "#D55E00",  # vermillion
    "ja": "#CC79A7",  # reddish purple
    "fr": "#009E73",  # bluish green
    "de": "#E69F00",  # orange
}
#: Units or results that belong to several languages at once (Okabe-Ito's black, softened).
SHARED_COLOR = "#4D4D4D"
#: Colours of the other languages a data folder may hold (:func:`lang_color`): Okabe-Ito's
#: sky blue, then distinct colours of Tableau's palette none of the five uses.
OTHER_LANG_COLORS: tuple[str, ...] = (
    "#56B4E9",  # sky blue
    "#8C564B",  # brown
    "#7F3C8D",  # purple
    "#17BECF",  # cyan
    "#BCBD22",  # olive
    "#2CA02C",  # green
    "#D62728",  # red
    "#1F3A93",  # dark blue
)


def matrix_scale(n_langs: int) -> float:
    """How much a languages x languages panel grows with the number of languages: 1 up to
    MLaKE's five, then with the square root of the count (cells shrink slowly, labels fit)."""
    return max(1.0, n_langs / 5) ** 0.5


def lang_color(lang: str) -> str:
    """The colour of a language: :data:`LANG_COLORS` for MLaKE's five; any other code gets
    one of :data:`OTHER_LANG_COLORS`, the same in every figure and run (chosen by a CRC-32
    of the code, so two other languages may share one)."""
    if lang in LANG_COLORS:
        return LANG_COLORS[lang]
    return OTHER_LANG_COLORS[zlib.crc32(lang.encode()) % len(OTHER_LANG_COLORS)]


CJK_FONT_FILE = "NotoSansCJKsc-Regular.otf"
CJK_FAMILY = "Noto Sans CJK SC"


@lru_cache(maxsize=1)
def cjk_font_path() -> Path:
    """The CJK font file (from the ``mplfonts`` package).

    Raises:
        ConfigError: when the package or the file is missing (set-up installs it).
    """
    try:
        import mplfonts
    except ImportError:
        raise ConfigError(
            "figures need the mplfonts package for CJK labels: pip install mplfonts"
        ) from None
    path = Path(mplfonts.__file__).parent / "fonts" / CJK_FONT_FILE
    if not path.is_file():
        raise ConfigError(f"{path}: CJK font missing from the mplfonts package; reinstall it")
    return path


def use_style() -> None:
    """Apply the mlake style (idempotent): the CJK font as fallback, paper-sized text."""
    import matplotlib as mpl
    from matplotlib import font_manager

    path = cjk_font_path()
    if CJK_FAMILY not in {f.name for f in font_manager.fontManager.ttflist}:
        font_manager.fontManager.addfont(str(path))
    mpl.rcParams.update(
        {
            # A list of families: matplotlib falls back glyph by glyph along it (a generic
            # "sans-serif" would resolve to DejaVu Sans alone).
            "font.family": ["DejaVu Sans", CJK_FAMILY],
            "font.size": 8,
            "axes.titlesize": 8,
            "axes.labelsize": 8,
            "xtick.labelsize": 7,
            "ytick.labelsize": 7,
            "legend.fontsize": 7,
            "figure.dpi": 150,
            "savefig.dpi": 300,
            "savefig.bbox": "tight",
            "pdf.fonttype": 42,
            "axes.unicode_minus": False,
        }
    )


def missing_glyphs(text: str) -> set[str]:
    """Characters of ``text`` that no font in the style's fallback list can draw."""
    from matplotlib import font_manager
    from matplotlib.ft2font import FT2Font

    use_style()
    fonts = [
        FT2Font(font_manager.findfont(font_manager.FontProperties(family=name)))
        for name in ("DejaVu Sans", CJK_FAMILY)
    ]
    charmaps = [set(f.get_charmap()) for f in fonts]
    return {
        ch
        for ch in text
        if not ch.isspace() and ch.isprintable() and not any(ord(ch) in m for m in charmaps)
    }


def layer_ticks(n_layers: int, max_labels: int = 9) -> list[int]:
    """The layers to label on an axis of ``n_layers`` layers: every one up to ``max_labels``,
    else every k-th from 0 (18 labels in a narrow panel run together)."""
    step = max(1, -(-n_layers // max_labels))
    return list(range(0, n_layers, step))
