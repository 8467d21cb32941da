# ruff: noqa: RUF001, RUF002 -- lookalike characters are what this file is about
"""Normalisation of screened text: Unicode folding, invisible characters, and encoded layers.

Two views of a text are screened: the *skeleton* (NFKC, confusables folded to
ASCII, invisible characters removed, whitespace collapsed, lower case), which
the rules and the model read, and the *decoded layers* found inside it
(base64, hex, rot13, percent-encoding, HTML entities), each rescanned as a text
of its own. Decoding is bounded in depth and in total characters so that an
adversarial input (a megabyte of base64-looking text) costs linear time.
"""

from __future__ import annotations

import base64
import binascii
import codecs
import html
import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final
from urllib.parse import unquote

__all__ = [
    "CONFUSABLES",
    "DecodedLayer",
    "decode_layers",
    "fold_leet",
    "skeleton",
    "skeleton_tokens",
    "strip_invisible",
]

# Zero-width, joiners, bidi embeddings/overrides/isolates, BOM, soft hyphen, the
# Mongolian vowel separator and the tag block's prefix: all render as nothing and
# are used to split a keyword so that a plain substring rule misses it.
_INVISIBLE: Final = (
    "\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180e"
    "\u200b\u200c\u200d\u200e\u200f\u202a\u202b\u202c\u202d\u202e"
    "\u2060\u2061\u2062\u2063\u2064\u2066\u2067\u2068\u2069\u206a\u206b\u206c\u206d\u206e\u206f"
    "\u3164\ufeff\uffa0"
)

# Lookalikes NFKC leaves alone: Cyrillic and Greek letters that render like Latin
# ones, plus a few symbols. Written out (about 80 entries) rather than depending
# on a confusables package: the Unicode confusables.txt is 6,000+ mappings, most
# to non-ASCII targets, and only Latin skeletons matter for English/German rules.
# NFKC already folds fullwidth forms, mathematical alphanumerics and ligatures.
CONFUSABLES: Final[dict[str, str]] = {
    # Cyrillic capitals
    "А": "a", "В": "b", "С": "c", "Е": "e", "Н": "h", "І": "i", "Ј": "j", "К": "k",
    "М": "m", "О": "o", "Р": "p", "Ѕ": "s", "Т": "t", "Х": "x", "У": "y", "Ү": "y",
    "Ԛ": "q", "Ԝ": "w", "Ꙅ": "s",
    # Cyrillic small
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "һ": "h", "і": "i", "ї": "i",
    "ј": "j", "к": "k", "ӏ": "l", "м": "m", "о": "o", "р": "p", "ԛ": "q", "ѕ": "s",
    "т": "t", "у": "y", "ү": "y", "х": "x", "ԝ": "w", "ɡ": "g", "ո": "n", "ս": "u",
    "ɑ": "a", "ɩ": "i", "ʏ": "y", "ᴠ": "v", "ᴡ": "w", "ᴢ": "z",
    # Greek capitals
    "Α": "a", "Β": "b", "Ε": "e", "Ζ": "z", "Η": "h", "Ι": "i", "Κ": "k", "Μ": "m",
    "Ν": "n", "Ο": "o", "Ρ": "p", "Τ": "t", "Υ": "y", "Χ": "x",
    # Greek small
    "α": "a", "ε": "e", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p", "τ": "t",
    "υ": "u", "χ": "x", "ϲ": "c", "ϳ": "j",
    # Armenian, Cherokee and Latin extensions that pass for ASCII letters
    "օ": "o", "Ꭺ": "a", "Ᏼ": "b", "Ꮯ": "c", "Ꭼ": "e", "Ꮋ": "h", "Ꭻ": "j", "Ꮶ": "k",
    "Ꮇ": "m", "Ꮲ": "p", "Ꭲ": "t", "ı": "i", "ȷ": "j", "ł": "l", "ø": "o", "đ": "d",
    # Punctuation lookalikes
    "‐": "-", "‑": "-", "‒": "-", "–": "-", "—": "-", "―": "-", "−": "-",
    "‘": "'", "’": "'", "‚": "'", "‛": "'", "“": '"', "”": '"', "„": '"', "‟": '"',
    "‹": "<", "›": ">", "«": '"', "»": '"', "ǀ": "|", "∣": "|", "｜": "|",
}  # fmt: skip

_FOLD_MAP: Final[dict[str, str]] = {**dict.fromkeys(_INVISIBLE, ""), **CONFUSABLES}
# Rewriting only the characters that change: ``str.translate`` with a dict costs a
# look-up per character (about 0.3 ms for 4 KB of mostly-ASCII text); a character
# class is scanned at C speed, and invisibles are deleted without a callback.
_FOLDABLE: Final = re.compile("[" + "".join(map(re.escape, _FOLD_MAP)) + "]")
_INVISIBLE_CHARS: Final = re.compile("[" + "".join(map(re.escape, _INVISIBLE)) + "]+")


def _fold_char(match: re.Match[str]) -> str:
    return _FOLD_MAP[match.group()]


_LEET: Final = str.maketrans(
    {"0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s", "!": "i"}
)
# A digit or symbol between letters: "1gn0re", "s3cr3t", "@ct". Rules also read the
# folded view only when this is present, since leet folding wrecks numbers.
_LEET_RUN: Final = re.compile(r"[0134578@$]+[a-z]")
_LEET_CONTEXT: Final = 120
"""Characters of context kept on each side of a leetspeak word for the rules to read."""
_LEET_MAX_SPANS: Final = 32


def strip_invisible(text: str) -> str:
    """``text`` without zero-width, joiner, bidi-control and other invisible characters."""
    if text.isascii():
        return text
    return _INVISIBLE_CHARS.sub("", text)


def skeleton(text: str) -> str:
    """The view rules and the model read.

    NFKC, confusables folded, invisibles gone, whitespace collapsed to single
    spaces, lower case.

    Example:
        >>> skeleton("Ｉｇｎｏｒｅ\u200b аll")
        'ignore all'
    """
    return skeleton_tokens(text)[0]


def skeleton_tokens(text: str) -> tuple[str, list[str]]:
    """:func:`skeleton` and its tokens (``skeleton(text).split()``), split once."""
    if not text.isascii():
        # Checking is about ten times cheaper than normalising text that is normal.
        if not unicodedata.is_normalized("NFKC", text):
            text = unicodedata.normalize("NFKC", text)
        text = _FOLDABLE.sub(_fold_char, text)
    # Lower case adds no whitespace, so lowering before splitting gives the same tokens.
    tokens = text.lower().split()
    return " ".join(tokens), tokens


def fold_leet(folded: str) -> list[str]:
    """The parts of ``folded`` (a skeleton) around leetspeak words, digits read as letters.

    Only the neighbourhood of each such word is folded and returned, so that text
    full of version numbers ("k8s", "2fa") does not cost the rules a second full pass.
    """
    spans: list[tuple[int, int]] = []
    size = len(folded)
    for run in _LEET_RUN.finditer(folded):
        start, end = run.span()
        # "1gnore", "s3cret": not "100ms" (a number before the letters).
        if start and folded[start - 1].isdigit():
            continue
        low, high = max(0, start - _LEET_CONTEXT), min(size, end + _LEET_CONTEXT)
        if spans and low <= spans[-1][1]:
            spans[-1] = (spans[-1][0], high)
        elif len(spans) < _LEET_MAX_SPANS:
            spans.append((low, high))
        else:
            break
    return [folded[low:high].translate(_LEET) for low, high in spans]


@dataclass(frozen=True, slots=True)
class DecodedLayer:
    """A payload found encoded in a text.

    Attributes:
        kind: ``base64``, ``hex``, ``rot13``, ``percent`` or ``entities``.
        text: the decoded payload.
        depth: 1 for a payload of the screened text, 2 for one inside a payload.
    """

    kind: str
    text: str
    depth: int


MAX_DEPTH: Final = 2
"""How deep payloads inside payloads are decoded."""
MIN_RUN: Final = 16
"""Shortest base64 or hex run that is decoded (a word of 15 letters is not an encoding)."""
MAX_RUNS: Final = 32
"""Most runs decoded per text and depth; the rest are ignored (and that is a signal)."""

MIN_ESCAPES: Final = 3
"""Fewer percent-escapes than this are a URL, not an encoding worth a rescan."""

_BASE64_RUN: Final = re.compile(r"[A-Za-z0-9+/_-]{16,}={0,2}")
# A run of hex digits is found by the base64 scan; odd lengths are trimmed when decoding.
_HEX_DIGITS: Final = re.compile(r"[0-9a-fA-F]{16,}")
_ESCAPED_HEX_RUN: Final = re.compile(r"(?:\\x[0-9a-fA-F]{2}){8,}")
_PERCENT: Final = re.compile(r"%[0-9a-fA-F]{2}")
# Numeric references decode without their semicolon too (as browsers and html.unescape
# read them), so "&#32" between words is an escape; named ones need it ("&b=2" in a URL).
_ENTITY: Final = re.compile(r"&(?:#[0-9]{2,7};?|#[xX][0-9a-fA-F]{2,6};?|[A-Za-z]{2,8};)")
# Words rot13 turns common injection vocabulary into ("vtaber" is "ignore"): the
# rot13 view is decoded only when one of them is present, so benign text pays one scan.
_ROT13_WORDS: Final = (
    "vtaber",  # ignore
    "qvfertneq",  # disregard
    "sbetrg",  # forget
    "vafgehpgvba",  # instruction
    "flfgrz",  # system
    "cebzcg",  # prompt
    "cergraq",  # pretend
    "erirny",  # reveal
    "cerivbhf",  # previous
    "vtabevrer",  # ignoriere
    "iretvff",  # vergiss
    "najrvfhat",  # anweisung
    "wnvyoernx",  # jailbreak
    "bireevqr",  # override
    "nobir",  # above
)
_PRINTABLE_SHARE: Final = 0.85


def _printable(raw: bytes) -> str | None:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if not text:
        return None
    printable = sum(1 for char in text if char.isprintable() or char in "\n\r\t")
    if printable < _PRINTABLE_SHARE * len(text):
        return None
    # Letters make a payload worth screening; digits and punctuation alone do not.
    if sum(1 for char in text if char.isalpha()) < len(text) // 3:
        return None
    return text


def _base64(run: str) -> str | None:
    run = run.rstrip("=")
    if len(run) % 4 == 1:
        return None
    # Reading an encoding needs both cases or a digit; a long lower-case word is a word.
    # (Base64 of text mixes both cases; identifiers and hex digests do not.)
    if run.islower() or run.isupper() or run.isdigit():
        return None
    padded = run + "=" * (-len(run) % 4)
    altchars = b"-_" if ("-" in run or "_" in run) else None
    try:
        raw = base64.b64decode(padded, altchars=altchars, validate=True)
    except (binascii.Error, ValueError):
        return None
    return _printable(raw)


def _hex(run: str) -> str | None:
    digits = run.replace("\\x", "")
    digits = digits[: len(digits) - len(digits) % 2]
    try:
        raw = bytes.fromhex(digits)
    except ValueError:
        return None
    return _printable(raw)


ESCAPE_CONTEXT: Final = 200
"""Characters of context decoded with a percent-escape or an HTML entity, on each side."""
MAX_PIECES: Final = 8
"""More separate escaped pieces than this, and the whole text is decoded as one layer."""


def _escaped_pieces(text: str, pattern: re.Pattern[str], limit: int) -> list[str]:
    """The parts of ``text`` around its escapes, each with its context, to decode.

    Percent-escapes and entities change a text only where they are, so the
    neighbourhood of each (merged when they meet) is what a rescan must read: a
    page of HTML with one ``&amp;`` costs a rescan of 400 characters, not of the
    page. Text that is escaped throughout (or in many places) is one piece, whole
    (its first ``limit`` characters: decoding is bounded).
    """
    spans: list[tuple[int, int]] = []
    size = min(len(text), limit)
    for escape in pattern.finditer(text, 0, size):
        low = max(0, escape.start() - ESCAPE_CONTEXT)
        high = min(size, escape.end() + ESCAPE_CONTEXT)
        if spans and low <= spans[-1][1]:
            spans[-1] = (spans[-1][0], high)
        elif len(spans) == MAX_PIECES:
            return [text[:size]]
        else:
            spans.append((low, high))
    if sum(high - low for low, high in spans) * 2 > size:
        return [text[:size]]
    return [text[low:high] for low, high in spans]


_ESCAPES: Final[tuple[tuple[str, re.Pattern[str], Callable[[str], str], int, int], ...]] = (
    # kind, escape, decoder, most characters one decoded character takes, fewest escapes
    ("percent", _PERCENT, unquote, 3, MIN_ESCAPES),
    ("entities", _ENTITY, html.unescape, 8, 1),
)


def _layers_of(
    text: str, depth: int, budget: list[int], lowered: str | None = None, *, long_runs: bool = True
) -> list[DecodedLayer]:
    found: list[DecodedLayer] = []

    def take(kind: str, decoded: str | None) -> None:
        if decoded is None or budget[0] <= 0:
            return
        decoded = decoded[: budget[0]]
        budget[0] -= len(decoded)
        found.append(DecodedLayer(kind, decoded, depth))

    # Hex digits are base64 characters too: one scan finds both kinds of run.
    for runs, match in enumerate(_BASE64_RUN.finditer(text) if long_runs else ()):
        if runs >= MAX_RUNS or budget[0] <= 0:
            break
        run = match.group()
        hex_digits = run[2:] if run[:2] in ("0x", "0X") else run
        if _HEX_DIGITS.fullmatch(hex_digits):
            take("hex", _hex(hex_digits[: budget[0] * 2 + 2]))
        else:
            # Decode no more than the budget allows: 4 characters give 3 bytes.
            take("base64", _base64(run[: (budget[0] * 4 // 3) + 4]))
    if "\\x" in text:
        for runs, match in enumerate(_ESCAPED_HEX_RUN.finditer(text)):
            if runs >= MAX_RUNS or budget[0] <= 0:
                break
            take("hex", _hex(match.group()[: budget[0] * 4 + 4]))
    for kind, pattern, unescape, width, least in _ESCAPES:
        limit = budget[0] * width
        if limit > 0 and len(pattern.findall(text, 0, limit)) >= least:
            for piece in _escaped_pieces(text, pattern, limit):
                decoded = unescape(piece)
                if decoded != piece:
                    take(kind, decoded)
    view = lowered if lowered is not None else text.lower()
    # Fifteen substring tests cost less than one scan with an alternation (measured).
    if budget[0] > 0 and any(map(view.__contains__, _ROT13_WORDS)):
        take("rot13", codecs.decode(text[: budget[0]], "rot13"))
    return found


def decode_layers(
    text: str, *, max_chars: int | None = None, lowered: str | None = None, long_runs: bool = True
) -> list[DecodedLayer]:
    """The payloads encoded in ``text``, and those inside them (depth 2 at most).

    Args:
        text: the text as received (case matters to base64), invisibles removed.
        max_chars: the most decoded characters produced in all (default: twice
            the text's length, at least 256), which bounds the work of rescanning.
        lowered: the text in lower case, if the caller has it (the rot13 check reads it).
        long_runs: ``False`` when the caller knows that ``text`` has no run of
            :data:`MIN_RUN` non-space characters: the scan for base64 and hex runs is
            skipped (payloads found inside payloads are still scanned).

    Returns:
        The decoded payloads, in the order found, outer ones first.
    """
    budget = [max(256, 2 * len(text)) if max_chars is None else max_chars]
    layers = _layers_of(text, 1, budget, lowered, long_runs=long_runs)
    for layer in list(layers):
        if budget[0] <= 0:
            break
        if layer.depth < MAX_DEPTH:
            layers.extend(_layers_of(layer.text, layer.depth + 1, budget))
    return layers
