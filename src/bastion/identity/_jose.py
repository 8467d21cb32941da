"""The bits of JOSE parsing bastion's own verifier and the OIDC verifier share."""

from __future__ import annotations

import binascii
import re
from typing import Final

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
