"""Time-sortable identifiers: UUIDv7 as laid out by RFC 9562.

Python 3.11 has no ``uuid.uuid7`` (it arrives in 3.14), so this module builds
one with the same method CPython's does (RFC 9562, section 6.2, method 1): the
48-bit Unix timestamp in milliseconds, then a 42-bit counter spread over
``rand_a`` and the top of ``rand_b``, then 32 random bits. The counter starts
at a random value with its top bit clear each new millisecond and is
incremented within one, so identifiers made in one process sort in the order
they were made even when many share a millisecond or the clock steps back.

Layout (128 bits, most significant first)::

    unix_ts_ms (48) | ver=7 (4) | counter_hi (12) | var=0b10 (2) | counter_lo (30) | random (32)
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Final

__all__ = ["uuid7", "uuid7_time"]

_COUNTER_BITS: Final = 42
_COUNTER_MAX: Final = (1 << _COUNTER_BITS) - 1
# The counter is seeded below half its range, so at least 2**41 identifiers fit in
# one millisecond before it would have to borrow the next millisecond.
_SEED_MASK: Final = (1 << (_COUNTER_BITS - 1)) - 1
_TIMESTAMP_MAX: Final = (1 << 48) - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)

_lock = threading.Lock()
_last_ms = -1
_counter = 0


def uuid7() -> uuid.UUID:
    """Return a new UUIDv7, greater than every one this process made before.

    Thread-safe. If the wall clock moves backwards the previous millisecond is
    reused (and its counter advanced), so order within the process survives
    clock adjustments; order across processes follows their clocks.

    Example:
        >>> a, b = uuid7(), uuid7()
        >>> a < b and a.version == 7
        True

    Returns:
        A version 7, RFC 9562 variant UUID.
    """
    global _last_ms, _counter  # noqa: PLW0603 -- process-wide monotonic state, guarded by _lock
    with _lock:
        now_ms = time.time_ns() // 1_000_000
        if now_ms > _last_ms:
            _last_ms = now_ms
            _counter = int.from_bytes(os.urandom(6)) & _SEED_MASK
        else:
            _counter += 1
            if _counter > _COUNTER_MAX:
                # 2**41 ids in one millisecond: borrow the next one rather than wrap.
                _last_ms += 1
                _counter = int.from_bytes(os.urandom(6)) & _SEED_MASK
        timestamp_ms = _last_ms & _TIMESTAMP_MAX
        counter = _counter
    tail = int.from_bytes(os.urandom(4))
    value = (
        (timestamp_ms << 80)
        | (0x7 << 76)
        | ((counter >> 30) << 64)
        | (0b10 << 62)
        | ((counter & 0x3FFF_FFFF) << 32)
        | tail
    )
    return uuid.UUID(int=value)


def uuid7_time(value: uuid.UUID) -> datetime:
    """Return the creation time (UTC, millisecond precision) encoded in a UUIDv7.

    Args:
        value: a version 7 UUID.

    Returns:
        The timezone-aware UTC instant of its timestamp.

    Raises:
        ValueError: ``value`` is not a version 7 UUID.
    """
    if value.version != 7:  # noqa: PLR2004 -- the UUID version this module makes
        raise ValueError("not a UUIDv7")
    # Integer milliseconds added to the epoch: exact, where a float division may round.
    return _EPOCH + timedelta(milliseconds=value.int >> 80)
