"""Languages: MLaKE's five by default, any other language code given in MLaKE's format.

MLaKE's five languages (:data:`LANGUAGES`) are the default and fix the order of every matrix
over the published releases.  A data folder may hold other languages too (see
:mod:`mlake_core.data.paths`); the languages of a loaded dataset, in their loaded order, are
the rows and columns of its matrices.

What mlake needs to know about a language is in its :class:`Language` record:

- whether words are separated by spaces (text in unspaced languages -- Chinese, Japanese,
  Thai, Lao, Khmer, Burmese -- is compared and joined character by character);
- its family (for within- versus across-family comparisons; branch level for Indo-European
  and other large families, as in the MLaKE paper's Germanic/Romance split);
- its writing system (ISO 15924 code).

:func:`language` gives the record of a known code, and for any other well-formed code a
generic record (``known=False``: spaced, no family, no script) with an
:class:`UnknownLanguageWarning`, once per code per process.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mlake_core.errors import ConfigError

#: MLaKE's languages, in the order used for every matrix over MLaKE data (rows and columns).
LANGUAGES: tuple[str, ...] = ("en", "zh", "ja", "fr", "de")

#: A language code: ISO 639-1/639-3 (two or three lower-case letters), optionally followed
#: by one subtag (region or script: ``pt-BR``, ``zh-Hant``).
CODE_PATTERN = re.compile(r"^[a-z]{2,3}(-[A-Za-z0-9]+)?$")


class UnknownLanguageWarning(UserWarning):
    """A language code mlake has no rules for: generic rules are used for it."""


@dataclass(frozen=True)
class Language:
    """What mlake knows about a language.

    Attributes:
        code: the code as given (``es``, ``pt-BR``).
        name: English name (the code itself for an unknown language).
        spaced: whether words are separated by spaces; unspaced text is compared and joined
            character by character.
        family: language family (branch level for large families: Germanic, Romance,
            Slavic, ...); ``None`` when not known.
        script: ISO 15924 code of the usual writing system; ``None`` when not known.
        known: ``False`` for a code with no rules of its own (generic rules are used).
    """

    code: str
    name: str
    spaced: bool
    family: str | None
    script: str | None
    known: bool


# code: (name, spaced, family, script).  Only facts that are standard and uncontroversial.
_RULES: dict[str, tuple[str, bool, str, str]] = {
    # MLaKE's five
    "en": ("English", True, "Germanic", "Latn"),
    "zh": ("Chinese", False, "Sinitic", "Hans"),
    "ja": ("Japanese", False, "Japonic", "Jpan"),
    "fr": ("French", True, "Romance", "Latn"),
    "de": ("German", True, "Germanic", "Latn"),
    # Germanic
    "nl": ("Dutch", True, "Germanic", "Latn"),
    "sv": ("Swedish", True, "Germanic", "Latn"),
    "da": ("Danish", True, "Germanic", "Latn"),
    "no": ("Norwegian", True, "Germanic", "Latn"),
    "nb": ("Norwegian Bokmål", True, "Germanic", "Latn"),
    "is": ("Icelandic", True, "Germanic", "Latn"),
    "af": ("Afrikaans", True, "Germanic", "Latn"),
    # Romance
    "es": ("Spanish", True, "Romance", "Latn"),
    "it": ("Italian", True, "Romance", "Latn"),
    "pt": ("Portuguese", True, "Romance", "Latn"),
    "ca": ("Catalan", True, "Romance", "Latn"),
    "ro": ("Romanian", True, "Romance", "Latn"),
    "gl": ("Galician", True, "Romance", "Latn"),
    # Slavic
    "ru": ("Russian", True, "Slavic", "Cyrl"),
    "uk": ("Ukrainian", True, "Slavic", "Cyrl"),
    "be": ("Belarusian", True, "Slavic", "Cyrl"),
    "bg": ("Bulgarian", True, "Slavic", "Cyrl"),
    "mk": ("Macedonian", True, "Slavic", "Cyrl"),
    "sr": ("Serbian", True, "Slavic", "Cyrl"),
    "hr": ("Croatian", True, "Slavic", "Latn"),
    "sl": ("Slovenian", True, "Slavic", "Latn"),
    "pl": ("Polish", True, "Slavic", "Latn"),
    "cs": ("Czech", True, "Slavic", "Latn"),
    "sk": ("Slovak", True, "Slavic", "Latn"),
    # Baltic, Celtic, Hellenic, Albanian, Armenian
    "lt": ("Lithuanian", True, "Baltic", "Latn"),
    "lv": ("Latvian", True, "Baltic", "Latn"),
    "ga": ("Irish", True, "Celtic", "Latn"),
    "cy": ("Welsh", True, "Celtic", "Latn"),
    "el": ("Greek", True, "Hellenic", "Grek"),
    "sq": ("Albanian", True, "Albanian", "Latn"),
    "hy": ("Armenian", True, "Armenian", "Armn"),
    # Indo-Iranian
    "hi": ("Hindi", True, "Indo-Aryan", "Deva"),
    "bn": ("Bengali", True, "Indo-Aryan", "Beng"),
    "ur": ("Urdu", True, "Indo-Aryan", "Arab"),
    "mr": ("Marathi", True, "Indo-Aryan", "Deva"),
    "gu": ("Gujarati", True, "Indo-Aryan", "Gujr"),
    "pa": ("Punjabi", True, "Indo-Aryan", "Guru"),
    "ne": ("Nepali", True, "Indo-Aryan", "Deva"),
    "fa": ("Persian", True, "Iranian", "Arab"),
    # Dravidian
    "ta": ("Tamil", True, "Dravidian", "Taml"),
    "te": ("Telugu", True, "Dravidian", "Telu"),
    "kn": ("Kannada", True, "Dravidian", "Knda"),
    "ml": ("Malayalam", True, "Dravidian", "Mlym"),
    # Uralic, Turkic, Kartvelian
    "fi": ("Finnish", True, "Uralic", "Latn"),
    "et": ("Estonian", True, "Uralic", "Latn"),
    "hu": ("Hungarian", True, "Uralic", "Latn"),
    "tr": ("Turkish", True, "Turkic", "Latn"),
    "az": ("Azerbaijani", True, "Turkic", "Latn"),
    "kk": ("Kazakh", True, "Turkic", "Cyrl"),
    "uz": ("Uzbek", True, "Turkic", "Latn"),
    "ka": ("Georgian", True, "Kartvelian", "Geor"),
    # Afro-Asiatic
    "ar": ("Arabic", True, "Semitic", "Arab"),
    "he": ("Hebrew", True, "Semitic", "Hebr"),
    "am": ("Amharic", True, "Semitic", "Ethi"),
    # East and South-East Asia
    "ko": ("Korean", True, "Koreanic", "Kore"),
    "th": ("Thai", False, "Tai", "Thai"),
    "lo": ("Lao", False, "Tai", "Laoo"),
    "km": ("Khmer", False, "Austroasiatic", "Khmr"),
    "vi": ("Vietnamese", True, "Austroasiatic", "Latn"),
    "my": ("Burmese", False, "Tibeto-Burman", "Mymr"),
    "id": ("Indonesian", True, "Austronesian", "Latn"),
    "ms": ("Malay", True, "Austronesian", "Latn"),
    "tl": ("Tagalog", True, "Austronesian", "Latn"),
    # Niger-Congo
    "sw": ("Swahili", True, "Bantu", "Latn"),
}

_WARNED: set[str] = set()


def _check_code(code: object) -> str:
    if not isinstance(code, str) or not CODE_PATTERN.match(code):
        raise ConfigError(
            f"malformed language code {code!r}: expected two or three lower-case letters, "
            "optionally with one subtag (e.g. es, pt-BR, zh-Hant)"
        )
    return code


def language(code: str) -> Language:
    """The rules for language ``code``.

    A known code (MLaKE's five and common languages) gets its own record.  A code with a
    subtag (``pt-BR``) takes its base language's rules; a four-letter subtag is the script
    (``zh-Hant``).  Any other well-formed code gets generic rules (spaced, no family, no
    script, ``known=False``) and an :class:`UnknownLanguageWarning`, once per code per process.

    Raises:
        ConfigError: for a malformed code (naming it).
    """
    _check_code(code)
    base, _, subtag = code.partition("-")
    rules = _RULES.get(code) or _RULES.get(base)
    if rules is not None:
        name, spaced, fam, script = rules
        if subtag and len(subtag) == 4 and subtag.isalpha():
            script = subtag.title()
        return Language(code, name, spaced, fam, script, known=True)
    if code not in _WARNED:
        _WARNED.add(code)
        warnings.warn(
            f"language {code!r}: mlake has no rules of its own for it; using generic ones "
            "(words separated by spaces, no family, the generic subject locator)",
            UnknownLanguageWarning,
            stacklevel=2,
        )
    return Language(code, code, True, None, None, known=False)


def is_unspaced(code: str) -> bool:
    """Whether words of ``code`` are written without spaces between them (zh, ja, th, ...)."""
    return not language(code).spaced


def family(code: str) -> str | None:
    """The family of ``code`` (``None`` when not known)."""
    return language(code).family


def family_group(code: str) -> str:
    """The group ``code`` is compared within: its family, or the code itself when the family
    is not known (an unknown family is a group of its own)."""
    return language(code).family or code


def known_languages() -> tuple[str, ...]:
    """The codes with rules of their own, sorted."""
    return tuple(sorted(_RULES))


def parse_codes(value: str | Iterable[str] | None) -> tuple[str, ...] | None:
    """Parse ``"en,es"`` (or an iterable of codes) into well-formed codes, before the data
    is read (which languages a data folder holds is checked when it is loaded).

    Returns:
        The codes in the order given, without duplicates; ``None`` for ``None``/``"all"``
        (every language of the data).

    Raises:
        ConfigError: for a malformed code or an empty list.
    """
    if value is None:
        return None
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    if items == ["all"]:
        return None
    if not items:
        raise ConfigError("empty language list; give codes such as en,zh or 'all'")
    for item in items:
        _check_code(item)
    return tuple(dict.fromkeys(items))


def parse_langs(
    value: str | Iterable[str] | None, available: Sequence[str] | None = None
) -> tuple[str, ...]:
    """Parse ``"en,zh"`` (or an iterable of codes) into codes available in the loaded data.

    Args:
        value: comma-separated codes, an iterable of codes, or ``None``/``"all"`` for all
            available languages.
        available: the languages of the loaded data, in their order (default
            :data:`LANGUAGES`).

    Returns:
        The codes in the order given, without duplicates (all available ones, in their
        order, for ``None``/``"all"``).

    Raises:
        ConfigError: for a code not available (listing the available ones), a malformed
            code, or an empty list.
    """
    avail = tuple(LANGUAGES if available is None else available)
    if value is None:
        return avail
    items = [v.strip() for v in value.split(",")] if isinstance(value, str) else list(value)
    items = [v for v in items if v]
    if items == ["all"]:
        return avail
    unknown = [v for v in items if v not in avail]
    if unknown:
        what = "MLaKE languages are" if avail == LANGUAGES else "the data holds"
        raise ConfigError(
            f"unknown language code(s) {', '.join(map(repr, unknown))}; {what} {', '.join(avail)}"
        )
    if not items:
        raise ConfigError(f"empty language list; choose from {', '.join(avail)}")
    return tuple(dict.fromkeys(items))
