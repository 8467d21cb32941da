"""The bits of JOSE parsing bastion's own verifier and the OIDC verifier share."""

from __future__ import annotations

import binascii
import re
from typing import Any, Final

import orjson

B64URL: Final = re.compile(rb"[A-Za-z0-9_-]*")
"""The base64url alphabet (RFC 7515 §2, no padding): check a segment with it first."""


def b64decode(segment: bytes) -> bytes:
    """Decode a base64url segment already checked against :data:`B64URL`.

    Raises:
        binascii.Error: a length no encoding gives.
    """
    # The alphabet is checked by the caller's regex; a2b_base64 then cannot skip input.
    return binascii.a2b_base64(
        segment.replace(b"-", b"+").replace(b"_", b"/") + b"=" * (-len(segment) % 4),
        strict_mode=True,
    )


def number(value: object) -> float | None:
    """Return a JSON number claim as a float, or ``None`` when it is not one."""
    # bool is an int subclass: "exp": true must not pass for 1970-01-01T00:00:01.
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return None


def json_segment(segment: bytes) -> Any:
    """Decode a base64url segment holding JSON.

    Raises:
        ValueError: not base64url, or not JSON (``binascii.Error`` is a ``ValueError``).
    """
    if not B64URL.fullmatch(segment):
        raise ValueError("not base64url")
    return orjson.loads(b64decode(segment))


def split_compact(token: object, max_length: int) -> tuple[dict[str, Any], bytes, bytes, bytes]:
    """Take a compact JWS apart, checking its form only (nothing is verified).

    Returns:
        ``(header, signing input, payload segment, signature)``; the payload is
        left encoded, so a token whose signature fails is never parsed further.

    Raises:
        ValueError: not a string of 1 to ``max_length`` characters, not three
            non-empty base64url segments, a header that is not a JSON object.
    """
    # Bound the length before any work: a megabyte of "token" costs nothing to refuse.
    if not isinstance(token, str | bytes) or not 0 < len(token) <= max_length:
        raise ValueError("not a token of a usable length")
    raw = token.encode("ascii", "replace") if isinstance(token, str) else token
    parts = raw.split(b".")
    if len(parts) != 3:  # noqa: PLR2004 - header.payload.signature
        raise ValueError("not three segments")
    head, body, sig = parts
    if not (head and body and sig) or not all(B64URL.fullmatch(p) for p in parts):
        raise ValueError("an empty or malformed segment")
    header = orjson.loads(b64decode(head))
    if not isinstance(header, dict):
        # A ValueError like every other refusal here: callers map one type to 401.
        raise ValueError("the header is not an object")  # noqa: TRY004
    return header, head + b"." + body, body, b64decode(sig)
