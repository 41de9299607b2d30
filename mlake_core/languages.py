"""The five MLaKE languages and parsing of language lists given by users."""

from __future__ import annotations

from collections.abc import Iterable

from mlake_core.errors import ConfigError

#: MLaKE's languages, in the order used for every 5x5 matrix (rows and columns).
LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "fr", "de")

#: Languages written without spaces between words; their text is compared character by
#: character rather than word by word.
UNSPACED: frozenset[str] = frozenset({"zh", "ja"})

#: Language families (for within- versus across-family comparisons).
FAMILY: dict[str, str] = {
    "en": "Germanic",
    "de": "Germanic",
    "fr": "Romance",
    "zh": "Sinitic",
    "ja": "Japonic",
}


def parse_langs(value: str | Iterable[str] | None) -> tuple[str, ...]:
    """Parse ``"en,zh"`` (or an iterable of codes) into a tuple of known language codes.

    Args:
        value: comma-separated codes, an iterable of codes, or ``None``/``"all"`` for all five.

    Returns:
        The codes in the order given, without duplicates.

    Raises:
        ConfigError: for an unknown code or an empty list.
    """
    if value is None:
        return LANGUAGES
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    if items == ["all"]:
        return LANGUAGES
    unknown = [v for v in items if v not in LANGUAGES]
    if unknown:
        raise ConfigError(
            f"unknown language code(s) {', '.join(map(repr, unknown))}; "
            f"MLaKE languages are {', '.join(LANGUAGES)}"
        )
    if not items:
        raise ConfigError(f"empty language list; choose from {', '.join(LANGUAGES)}")
    return tuple(dict.fromkeys(items))
