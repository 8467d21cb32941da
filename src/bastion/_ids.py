"""Time-ordered ids (UUIDv7, RFC 9562) for bastion's own rows and tokens."""

from __future__ import annotations

import time
import uuid

__all__ = ["uuid7", "uuid7_text"]


def uuid7(now: float | None = None) -> uuid.UUID:
    """A UUIDv7: 48-bit millisecond time, then 74 random bits; sorts by creation time."""
    stamp = time.time() if now is None else now
    value = (int(stamp * 1000) & ((1 << 48) - 1)) << 80 | (uuid.uuid4().int & ((1 << 80) - 1))
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 4122 variant
    return uuid.UUID(int=value)


def uuid7_text(now: float | None = None) -> str:
    """:func:`uuid7` as its canonical text."""
    return str(uuid7(now))
