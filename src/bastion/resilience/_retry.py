"""Retry budget: retries add only a share of a dependency's traffic, so an outage is not multiplied.

Per attempt, a retry policy looks sound: three retries of a failing call. Across
a fleet during an outage it quadruples the load on the dependency that is
already failing. A budget bounds retries by the traffic itself, as Finagle's
``RetryBudget`` does: over a sliding window (10 s), retries made may not exceed
``ratio`` x calls made, plus a small reserve (``min_per_second`` x the window)
so a quiet dependency can still retry at all.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

__all__ = ["RetryBudget"]

DEFAULT_WINDOW: Final = 10.0
_BUCKETS: Final = 10


class RetryBudget:
    """Retries allowed per window as a share of calls, in-process, safe for concurrent use.

    The window is kept as ten buckets: a call or retry lands in the bucket of its
    time, and buckets older than the window are dropped. At any time the window
    counted covers between nine tenths of ``window`` and all of it.

    With ``ratio`` and ``min_per_second`` both 0 there is no budget: every retry
    is allowed (switch retries off with ``retries = 0`` instead).

    Args:
        ratio: retries allowed per call in the window (0.2: one retry per five calls).
        min_per_second: retries always allowed per second of the window, whatever the traffic.
        window: seconds over which calls and retries are counted.
        clock: monotonic seconds.

    Raises:
        ValueError: a negative ``ratio`` or ``min_per_second``, or a ``window`` not above 0.

    Example:
        >>> budget = RetryBudget(ratio=0.2, min_per_second=5.0)
        >>> budget.deposit()          # once per call
        >>> if budget.try_withdraw():  # once per retry
        ...     ...
    """

    __slots__ = (
        "_calls",
        "_clock",
        "_current_calls",
        "_current_retries",
        "_limited",
        "_ratio",
        "_reserve",
        "_retries",
        "_slot",
        "_slot_end",
        "_width",
    )

    def __init__(
        self,
        ratio: float,
        min_per_second: float,
        *,
        window: float = DEFAULT_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ratio < 0 or min_per_second < 0:
            raise ValueError(
                f"retry budget: ratio ({ratio}) and min_per_second ({min_per_second}) "
                "must not be negative"
            )
        if window <= 0:
            raise ValueError(f"retry budget: window must be positive, not {window}")
        self._ratio = ratio
        self._reserve = min_per_second * window
        self._limited = bool(ratio or min_per_second)
        self._clock = clock
        self._width = window / _BUCKETS
        # Buckets of the past; the current one is kept in two attributes, which
        # makes deposit() one comparison and one increment between bucket changes.
        self._calls = [0] * _BUCKETS
        self._retries = [0] * _BUCKETS
        self._current_calls = 0
        self._current_retries = 0
        self._slot = int(clock() // self._width)
        self._slot_end = (self._slot + 1) * self._width

    def deposit(self) -> None:
        """Count one call (every call, first attempts only, whatever its outcome)."""
        if self._clock() >= self._slot_end:
            self._advance()
        self._current_calls += 1

    def try_withdraw(self) -> bool:
        """Spend one retry if the budget allows it.

        Returns:
            Whether the retry may be made; it is counted when it may.
        """
        if not self._limited:
            return True
        if self._clock() >= self._slot_end:
            self._advance()
        if self._retries_in_window() + 1 > self._allowed():
            return False
        self._current_retries += 1
        return True

    @property
    def available(self) -> float:
        """Retries the budget would allow now (``inf`` when there is no budget)."""
        if not self._limited:
            return float("inf")
        if self._clock() >= self._slot_end:
            self._advance()
        return max(0.0, self._allowed() - self._retries_in_window())

    def _allowed(self) -> float:
        return self._ratio * (self._current_calls + sum(self._calls)) + self._reserve

    def _retries_in_window(self) -> int:
        return self._current_retries + sum(self._retries)

    def _advance(self) -> None:
        slot = int(self._clock() // self._width)
        passed = slot - self._slot
        if passed <= 0:
            return
        if passed >= _BUCKETS:
            self._calls = [0] * _BUCKETS
            self._retries = [0] * _BUCKETS
        else:
            index = self._slot % _BUCKETS
            self._calls[index] = self._current_calls
            self._retries[index] = self._current_retries
            for later in range(self._slot + 1, slot + 1):
                self._calls[later % _BUCKETS] = 0
                self._retries[later % _BUCKETS] = 0
        self._current_calls = 0
        self._current_retries = 0
        self._slot = slot
        self._slot_end = (slot + 1) * self._width
