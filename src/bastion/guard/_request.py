"""Encoding of the request line and of form bodies: valid UTF-8 without NUL, once percent-decoded.

Servers decode the path leniently (uvicorn replaces invalid bytes with U+FFFD)
and parse query strings and forms leniently too, so a ``%FF`` or a ``%00``
reaches handlers as a replacement character or a NUL, which then travel into
logs, SQL parameters and file names. The raw bytes are checked here instead.
"""

from __future__ import annotations

from typing import Final, Literal
from urllib.parse import unquote_to_bytes

__all__ = ["EncodingFault", "check_percent_encoded"]

EncodingFault = Literal["invalid_utf8", "nul_character"]

# Single bytes are looked up as ints (``37 in raw``): a memchr, where a one-byte
# bytes needle costs a substring search, ten times more (bench/guard.py).
_PERCENT: Final = 0x25


def check_percent_encoded(raw: bytes) -> EncodingFault | None:
    """Return what is wrong with a percent-encoded string once decoded, or ``None``.

    ``+`` (a space in query strings and forms) needs no decoding: it changes
    nothing about validity.

    Args:
        raw: the path, query string or form body as received.
    """
    if _PERCENT not in raw:
        # Nothing to decode: the common query string is plain ASCII.
        if raw.isascii():
            return "nul_character" if 0 in raw else None
        decoded = raw
    else:
        decoded = unquote_to_bytes(raw)
    if 0 in decoded:
        return "nul_character"
    if not decoded.isascii():
        try:
            decoded.decode()
        except UnicodeDecodeError:
            return "invalid_utf8"
    return None
