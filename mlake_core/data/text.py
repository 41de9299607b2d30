"""Text utilities shared by the data layer: normalization with offset maps, and word units.

Matching across scripts needs normalization (NFKC folds full-width letters and half-width
katakana, ``casefold`` folds case), but every span we report must be a character range of the
*original* text.  :func:`normalize_with_map` therefore normalizes character by character and
keeps, for each normalized character, the index of the original character it came from.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from functools import lru_cache

# Punctuation and spaces that never belong to a subject or an answer at its edges.
EDGE_PUNCT = " \t\n\u3000,，、.。:：;；!！?？\"'“”„«»‘’「」『』()（）[]【】<>《》-–—·・"

_WORD_RE = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*", re.UNICODE)


@lru_cache(maxsize=200_000)
def normalize(text: str) -> str:
    """NFKC-normalize, case-fold and collapse whitespace (for comparisons, not display)."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


@lru_cache(maxsize=20_000)
def _normalize_with_map(text: str) -> tuple[str, tuple[int, ...]]:
    norm, src = normalize_with_map(text)
    return norm, tuple(src)


def normalize_with_map(text: str) -> tuple[str, list[int]]:
    """Normalize ``text`` like :func:`normalize` but keep an offset map.

    Returns:
        ``(norm, src)`` where ``src[k]`` is the index in ``text`` of the character that
        produced ``norm[k]``; ``len(src) == len(norm)``.
    """
    out: list[str] = []
    src: list[int] = []
    prev_space = True  # drops leading whitespace
    for i, ch in enumerate(text):
        folded = unicodedata.normalize("NFKC", ch).casefold()
        for c in folded:
            if c.isspace():
                if prev_space:
                    continue
                c = " "
                prev_space = True
            else:
                prev_space = False
            out.append(c)
            src.append(i)
    while out and out[-1] == " ":
        out.pop()
        src.pop()
    return "".join(out), src


def find_normalized(haystack: str, needle: str, start: int = 0) -> tuple[int, int] | None:
    """Find ``needle`` in ``haystack`` after normalization of both.

    Args:
        haystack: text to search (original form).
        needle: text to find (original form).
        start: first character index of ``haystack`` to consider.

    Returns:
        ``(begin, end)`` character offsets in the *original* ``haystack`` (end exclusive) of the
        first match at or after ``start``, or ``None``.
    """
    norm_h, src = _normalize_with_map(haystack)
    norm_n = normalize(needle)
    if not norm_n:
        return None
    k0 = next((k for k, s in enumerate(src) if s >= start), len(src))
    k = norm_h.find(norm_n, k0)
    if k < 0:
        return None
    end_k = k + len(norm_n) - 1
    return src[k], src[end_k] + 1


def is_cjk(ch: str) -> bool:
    """True for Han, kana and other characters of scripts written without spaces."""
    cp = ord(ch)
    return (
        0x3040 <= cp <= 0x30FF  # hiragana, katakana
        or 0x3400 <= cp <= 0x4DBF  # CJK ext A
        or 0x4E00 <= cp <= 0x9FFF  # CJK unified
        or 0xF900 <= cp <= 0xFAFF  # compatibility ideographs
        or 0xFF66 <= cp <= 0xFF9F  # half-width katakana
        or 0x20000 <= cp <= 0x2FA1F  # CJK ext B+
    )


@dataclass(frozen=True)
class Unit:
    """A matching unit of a text: a word, or a single CJK character."""

    start: int
    end: int
    norm: str


def units(text: str) -> list[Unit]:
    """Split text into matching units: words for alphabetic scripts, characters for CJK.

    A CJK character is its own unit because zh and ja have no spaces and tokens merge
    across word boundaries; alphabetic words (with inner apostrophes or hyphens) stay whole.
    Punctuation and spaces are not units.
    """
    result: list[Unit] = []
    for m in _WORD_RE.finditer(text):
        buf_start: int | None = None
        for i in range(m.start(), m.end()):
            ch = text[i]
            if is_cjk(ch):
                if buf_start is not None:
                    result.append(_unit(text, buf_start, i))
                    buf_start = None
                result.append(_unit(text, i, i + 1))
            elif buf_start is None:
                buf_start = i
        if buf_start is not None:
            result.append(_unit(text, buf_start, m.end()))
    return result


def _unit(text: str, start: int, end: int) -> Unit:
    return Unit(start, end, normalize(text[start:end]))


def strip_edges(text: str, start: int, end: int) -> tuple[int, int]:
    """Shrink ``[start, end)`` so that it neither starts nor ends with edge punctuation."""
    while start < end and text[start] in EDGE_PUNCT:
        start += 1
    while end > start and text[end - 1] in EDGE_PUNCT:
        end -= 1
    return start, end
