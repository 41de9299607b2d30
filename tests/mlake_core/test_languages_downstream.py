"""Languages beyond MLaKE's five downstream: family groups, Mantel permutations for n
languages, figure colours, and --langs resolved against the data folder."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from analysis.relate import mantel, pair_level
from figures.style import LANG_COLORS, OTHER_LANG_COLORS, SHARED_COLOR, lang_color
from mlake.settings import DataSettings
from mlake.sweep import _family_split
from mlake_core.errors import ConfigError
from mlake_core.languages import LANGUAGES


@pytest.mark.filterwarnings("ignore::mlake_core.languages.UnknownLanguageWarning")
def test_family_split_with_other_languages() -> None:
    frame = pd.DataFrame(
        {
            "a": ["en", "fr", "zh", "eu", "eu", "es", "pt-BR"],
            "b": ["de", "es", "ja", "eu", "en", "en", "it"],
        }
    )
    # Germanic, Romance, Sinitic vs Japonic, an unknown family its own group, ...
    assert _family_split(frame, "a", "b").tolist() == [True, True, False, True, False, False, True]


def _matrices(n: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(n, n))
    return a, a + 0.3 * rng.normal(size=(n, n))


@pytest.mark.parametrize(("n", "perms"), [(5, 120), (6, 720), (7, 5040)])
def test_mantel_exact_up_to_seven(n: int, perms: int) -> None:
    a, b = _matrices(n)
    res = mantel(a, b)
    assert res.exact and res.n_perm == perms
    assert res.n_cells == n * (n - 1)
    assert res.rho > 0.5 and res.p >= 1 / perms


def test_mantel_sampled_above_seven() -> None:
    a, b = _matrices(8)
    res = mantel(a, b, max_perm=2000)
    assert not res.exact and res.n_perm == 2000  # 8! = 40320 > max_perm: sampled
    assert mantel(a, b, max_perm=2000) == res  # the fixed seed: the same p-value every run
    assert 1 / 2000 <= res.p < 0.01


def test_pair_level_six_languages() -> None:
    langs = [*LANGUAGES, "es"]
    a, b = _matrices(6)
    frame = pair_level(
        {"overlap": pd.DataFrame(a, index=langs, columns=langs)},
        {"transfer": pd.DataFrame(b, index=langs, columns=langs)},
        langs,
    )
    row = frame.iloc[0]
    assert (row["n_cells"], row["n_perm"], bool(row["exact"])) == (30, 720, True)
    assert not math.isnan(row["rho"])


def test_lang_colors() -> None:
    assert [lang_color(x) for x in LANGUAGES] == [LANG_COLORS[x] for x in LANGUAGES]
    es = lang_color("es")
    assert es in OTHER_LANG_COLORS and es == lang_color("es")
    others = set(OTHER_LANG_COLORS)
    assert not others & set(LANG_COLORS.values()) and SHARED_COLOR not in others


def test_data_settings_langs_from_the_folder(tmp_path) -> None:
    # a folder that is not there: all means MLaKE's five, and codes are only checked for form
    missing = DataSettings(data_dir=None, langs=("all",))
    assert len(missing.langs) >= 1
    base = tmp_path / "v2024-11" / "dataset" / "single_hop"
    base.mkdir(parents=True)
    for lang in ("en", "es"):
        (base / f"{lang}_qa.json").write_text("[]", encoding="utf-8")
    assert DataSettings(data_dir=str(tmp_path)).langs == ("en", "es")
    assert DataSettings(data_dir=str(tmp_path), langs=("es",)).langs == ("es",)
    with pytest.raises(ConfigError, match="'zh'; the data holds en, es"):
        DataSettings(data_dir=str(tmp_path), langs=("en", "zh"))
    with pytest.raises(ConfigError, match="malformed language code 'Spanish'"):
        DataSettings(data_dir=str(tmp_path), langs=("Spanish",))


def test_mlake_tiny_texts_for_spanish_and_a_clear_error_otherwise() -> None:
    from mlake_core.models.mlake_tiny.corpus import synthetic_name

    name = synthetic_name("es", "BBC")
    assert name == synthetic_name("es", "BBC") and len(name.split()) == 2
    assert all(word[0].isupper() for word in name.split())
    with pytest.raises(ConfigError, match="name_entities: mlake-tiny has no name_entities text"):
        synthetic_name("eu", "BBC")


def test_transfer_figure_six_languages() -> None:
    import matplotlib.pyplot as plt

    from figures.editing import transfer_matrices
    from figures.style import matrix_scale

    langs = [*LANGUAGES, "es"]
    values = np.linspace(0, 1, 36).reshape(6, 6)
    frame = pd.DataFrame(values, index=langs, columns=langs)
    fig = transfer_matrices({"rome": frame}, langs)
    try:
        ax = fig.axes[0]
        assert [t.get_text() for t in ax.get_xticklabels()] == langs
        assert [t.get_text() for t in ax.get_yticklabels()] == langs
        assert ax.images[0].get_array().shape == (6, 6)
        assert fig.get_size_inches()[0] == pytest.approx(2.05 * matrix_scale(6) + 0.6)
    finally:
        plt.close(fig)
    assert matrix_scale(5) == 1.0 and matrix_scale(3) == 1.0
    assert matrix_scale(20) == 2.0
