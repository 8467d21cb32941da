"""Limit expressions: ``20/second;1000/hour``, ``5 per 15 minutes burst 10``.

Parsed once, at configuration time; nothing here runs per request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

# Plurals are spelled out: stripping a trailing "s" would read "ms" as minutes.
_UNITS: Final = {
    **dict.fromkeys(("s", "sec", "secs", "second", "seconds"), 1.0),
    **dict.fromkeys(("m", "min", "mins", "minute", "minutes"), 60.0),
    **dict.fromkeys(("h", "hr", "hrs", "hour", "hours"), 3600.0),
    **dict.fromkeys(("d", "day", "days"), 86_400.0),
    **dict.fromkeys(("w", "week", "weeks"), 604_800.0),
}

_LIMIT: Final = re.compile(
    r"""^\s*(?P<rate>\d+)\s*(?:/|\s+per\s+)\s*(?P<count>\d+)?\s*(?P<unit>[a-z]+)
        (?:\s+burst\s+(?P<burst>\d+))?\s*$""",
    re.IGNORECASE | re.VERBOSE,
)


@dataclass(frozen=True, slots=True)
class Limit:
    """``rate`` units per ``period`` seconds, of which ``burst`` may arrive at once.

    A token bucket holds ``burst`` tokens and refills ``rate`` per ``period``; a
    window algorithm admits ``burst`` in any window of ``period * burst / rate``
    seconds, which keeps the same long-run rate.

    Attributes:
        rate: units admitted per period, at least 1.
        period: the period in seconds.
        burst: units that may be spent at once; ``rate`` unless the expression says.
        text: the expression it was parsed from, as a header or log names it.
    """

    rate: int
    period: float
    burst: int
    text: str

    @property
    def window(self) -> float:
        """Seconds over which a window algorithm admits ``burst`` units."""
        return self.period * self.burst / self.rate


def parse_limit(text: str) -> Limit:
    """Parse one limit such as ``10/second``, ``100/5m`` or ``5 per 15 minutes burst 2``.

    Raises:
        ValueError: the text is not a limit; the message says what one looks like.
    """
    match = _LIMIT.match(text)
    if match is None:
        raise ValueError(
            f"{text.strip()!r} is not a limit such as 10/second, 100/5m or 5 per 15 minutes"
        )
    unit = match["unit"].lower()
    seconds = _UNITS.get(unit)
    if seconds is None:
        raise ValueError(f"unknown unit {match['unit']!r} in {text.strip()!r}")
    rate = int(match["rate"])
    count = int(match["count"]) if match["count"] else 1
    if rate < 1 or count < 1:
        raise ValueError(f"{text.strip()!r} must admit at least 1 per a non-empty period")
    burst = int(match["burst"]) if match["burst"] else rate
    if burst < 1:
        raise ValueError(f"the burst of {text.strip()!r} must be at least 1")
    return Limit(rate=rate, period=seconds * count, burst=burst, text=" ".join(text.split()))


def parse_limits(text: str) -> tuple[Limit, ...]:
    """Parse limits separated by ``;`` (or ``,``), all of which a request must pass.

    Raises:
        ValueError: a part is not a limit, or there is none.
    """
    parts = [part for part in re.split(r"[;,]", text) if part.strip()]
    if not parts:
        raise ValueError("no limit given; write one such as 20/second;1000/hour")
    return tuple(parse_limit(part) for part in parts)
