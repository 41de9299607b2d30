"""The language registry: known rules, generic rules with a warning, parsing."""

from __future__ import annotations

import warnings

import pytest

from mlake_core import languages
from mlake_core.errors import ConfigError
from mlake_core.languages import (
    LANGUAGES,
    Language,
    UnknownLanguageWarning,
    family,
    family_group,
    is_unspaced,
    language,
    parse_codes,
    parse_langs,
)


def test_mlake_five_in_matrix_order() -> None:
    assert LANGUAGES == ("en", "zh", "ja", "fr", "de")
    assert [family(c) for c in LANGUAGES] == [
        "Germanic",
        "Sinitic",
        "Japonic",
        "Romance",
        "Germanic",
    ]
    assert [is_unspaced(c) for c in LANGUAGES] == [False, True, True, False, False]


@pytest.mark.parametrize(
    ("code", "spaced", "fam", "script"),
    [
        ("es", True, "Romance", "Latn"),
        ("ru", True, "Slavic", "Cyrl"),
        ("ko", True, "Koreanic", "Kore"),
        ("ar", True, "Semitic", "Arab"),
        ("hi", True, "Indo-Aryan", "Deva"),
        ("th", False, "Tai", "Thai"),
        ("lo", False, "Tai", "Laoo"),
        ("km", False, "Austroasiatic", "Khmr"),
        ("my", False, "Tibeto-Burman", "Mymr"),
        ("vi", True, "Austroasiatic", "Latn"),
    ],
)
def test_known(code: str, spaced: bool, fam: str, script: str) -> None:
    lang = language(code)
    assert (lang.code, lang.spaced, lang.family, lang.script, lang.known) == (
        code,
        spaced,
        fam,
        script,
        True,
    )


def test_subtag_takes_base_rules() -> None:
    assert language("pt-BR") == Language("pt-BR", "Portuguese", True, "Romance", "Latn", True)
    assert language("zh-Hant").script == "Hant"
    assert is_unspaced("zh-Hant")


def test_unknown_warns_once_per_code(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(languages, "_WARNED", set())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = language("eu")
        language("eu")
        assert family("eu") is None
        language("qqq")
    assert first == Language("eu", "eu", True, None, None, False)
    hits = [w for w in caught if issubclass(w.category, UnknownLanguageWarning)]
    assert [str(w.message).split(":")[0] for w in hits] == ["language 'eu'", "language 'qqq'"]
    assert issubclass(UnknownLanguageWarning, UserWarning)
    assert family_group("eu") == "eu"
    assert family_group("de") == family_group("en") == "Germanic"


@pytest.mark.parametrize("code", ["", "E", "EN", "english", "e1", "en_US", "en-", "en-US-x", 3])
def test_malformed_code(code: object) -> None:
    with pytest.raises(ConfigError, match="malformed language code"):
        language(code)  # type: ignore[arg-type]


def test_parse_langs_available() -> None:
    six = (*LANGUAGES, "es")
    assert parse_langs(None, six) == six
    assert parse_langs("all", six) == six
    assert parse_langs("es,en", six) == ("es", "en")
    with pytest.raises(ConfigError) as exc:
        parse_langs("en,xx", six)
    assert str(exc.value) == "unknown language code(s) 'xx'; the data holds en, zh, ja, fr, de, es"
    with pytest.raises(ConfigError, match="MLaKE languages are en, zh, ja, fr, de"):
        parse_langs("es")


def test_parse_codes() -> None:
    assert parse_codes(None) is None
    assert parse_codes("all") is None
    assert parse_codes(" es , en,es") == ("es", "en")
    assert parse_codes(("xx",)) == ("xx",)
    with pytest.raises(ConfigError, match="malformed language code 'EN'"):
        parse_codes("EN,zh")
    with pytest.raises(ConfigError, match="empty language list"):
        parse_codes(" , ")
