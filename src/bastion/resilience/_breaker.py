"""Circuit breaker: stop calling a dependency that keeps failing, probe it, resume when it answers.

States, as Resilience4j names them::

    CLOSED --(failure rate >= threshold over >= minimum_calls, or N failures in a row)--> OPEN
    OPEN --(open_duration passed; noticed on the next acquire or read, no timer)--> HALF_OPEN
    HALF_OPEN --(every probe succeeded)--> CLOSED        (the window starts afresh)
    HALF_OPEN --(a probe failed)--> OPEN                 (for another open_duration)

The closed path is the hot one: :meth:`CircuitBreaker.acquire` is one attribute
check and recording a result is a few integer updates on a ring (count window)
or on per-second buckets (time window), never a scan of the window.

The failure rate is evaluated when a failure is recorded: a success never opens a
circuit. Results that arrive while the circuit is open come from calls admitted
before it opened; they are not counted. Results that arrive while half-open are
taken as the probes' (a call admitted before the circuit opened may take a probe's
place; its result is as telling).

Monotonic time (``clock``) drives the breaker; wall-clock time (``wall``, epoch
seconds) is only what it reports (``since``, ``next_probe``) and what it shares with
other instances through :meth:`CircuitBreaker.apply_remote`.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import structlog

from bastion.observability._metrics import CIRCUIT_STATE, CIRCUIT_TRANSITIONS
from bastion.resilience._errors import CircuitOpenError
from bastion.resilience._policy import Policy

__all__ = ["CircuitBreaker", "CircuitListener", "CircuitSnapshot", "CircuitState"]

logger = structlog.get_logger("bastion.resilience")

# What a caller turned away while every probe is out is told to wait: probes end
# within their own timeouts, so the next decision is near.
PROBES_BUSY_RETRY_AFTER: Final = 1.0


class CircuitState(enum.StrEnum):
    """The state of a circuit."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """A circuit as ``/health/circuits`` and the shared state show it.

    Attributes:
        name: the circuit's name.
        state: its state now.
        failure_rate: failures / calls in the window, ``None`` until the window
            holds ``minimum_calls`` calls.
        calls: calls in the window.
        since: wall-clock epoch seconds of the last transition (of the breaker's
            creation before any).
        next_probe: epoch seconds when an open circuit admits probes; ``None``
            unless open.
    """

    name: str
    state: CircuitState
    failure_rate: float | None
    calls: int
    since: float
    next_probe: float | None


CircuitListener = Callable[[CircuitSnapshot], None]
"""Called with the new snapshot after each local transition (not after a remote one)."""


class _CountWindow:
    """The outcomes of the last ``size`` calls, in a ring of bytes."""

    __slots__ = ("_index", "_ring", "_size", "calls", "failures")

    def __init__(self, size: int) -> None:
        self._size = size
        self._ring = bytearray(size)
        self._index = 0
        self.calls = 0
        self.failures = 0

    def add(self, failed: int, now: float) -> None:
        index = self._index
        if self.calls == self._size:
            self.failures -= self._ring[index]
        else:
            self.calls += 1
        self._ring[index] = failed
        self.failures += failed
        index += 1
        self._index = 0 if index == self._size else index

    def expire(self, now: float) -> None:
        """Count windows do not age."""

    def reset(self) -> None:
        self._ring = bytearray(self._size)
        self._index = 0
        self.calls = 0
        self.failures = 0


class _TimeWindow:
    """The outcomes of the calls of the last ``size`` seconds, in per-second buckets.

    The totals are kept incrementally: a record touches its own bucket and
    subtracts the buckets that fell out since the previous record (at most
    ``size`` of them, however long the gap).
    """

    __slots__ = ("_bucket_calls", "_bucket_failures", "_head", "_size", "calls", "failures")

    def __init__(self, size: int) -> None:
        self._size = size
        self._bucket_calls = [0] * size
        self._bucket_failures = [0] * size
        self._head: int | None = None  # the newest second that has a bucket
        self.calls = 0
        self.failures = 0

    def add(self, failed: int, now: float) -> None:
        second = int(now)
        if second != self._head:
            self.expire(now)
        index = second % self._size
        self._bucket_calls[index] += 1
        self._bucket_failures[index] += failed
        self.calls += 1
        self.failures += failed

    def expire(self, now: float) -> None:
        """Drop the buckets older than the window ending at ``now``."""
        second = int(now)
        head = self._head
        if head is None or second - head >= self._size:
            self.reset()
        elif second > head:
            for passed in range(head + 1, second + 1):
                index = passed % self._size
                self.calls -= self._bucket_calls[index]
                self.failures -= self._bucket_failures[index]
                self._bucket_calls[index] = 0
                self._bucket_failures[index] = 0
        else:
            # The monotonic clock never goes back; an equal second has nothing to drop.
            return
        self._head = second

    def reset(self) -> None:
        self._bucket_calls = [0] * self._size
        self._bucket_failures = [0] * self._size
        self._head = None
        self.calls = 0
        self.failures = 0


class CircuitBreaker:
    """A circuit breaker for one circuit (one or more pipelines report to it).

    Example:
        >>> breaker = CircuitBreaker("payments", default_policy("payments", "http"))
        >>> breaker.acquire()  # raises CircuitOpenError while open
        >>> breaker.record_success(0.012)

    Args:
        name: the circuit's name (metric label, ``/health/circuits``, shared-state field).
        policy: the breaker settings are read from it: ``failure_rate_threshold``,
            ``window``, ``window_size``, ``minimum_calls`` (capped at ``window_size``
            for a count window, which could never hold more), ``consecutive_failures``,
            ``open_duration``, ``half_open_probes``, ``slow_call_threshold``.
        clock: monotonic seconds; the breaker's own time.
        wall: epoch seconds; only for what the breaker reports and shares.

    Raises:
        ValueError: a breaker setting of ``policy`` is out of range.
    """

    __slots__ = (
        "_clock",
        "_closed",
        "_consecutive",
        "_consecutive_limit",
        "_gauges",
        "_listeners",
        "_minimum_calls",
        "_open_duration",
        "_open_until",
        "_probe_limit",
        "_probe_successes",
        "_probes_in_flight",
        "_probes_issued",
        "_since",
        "_slow",
        "_stamp",
        "_state",
        "_threshold",
        "_transitions",
        "_wall",
        "_window",
        "name",
    )

    def __init__(
        self,
        name: str,
        policy: Policy,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        _validate(name, policy)
        self.name = name
        self._clock = clock
        self._wall = wall
        self._threshold = policy.failure_rate_threshold
        self._window: _CountWindow | _TimeWindow
        if policy.window == "count":
            self._window = _CountWindow(policy.window_size)
            self._minimum_calls = min(policy.minimum_calls, policy.window_size)
        else:
            self._window = _TimeWindow(policy.window_size)
            self._minimum_calls = policy.minimum_calls
        self._consecutive_limit = policy.consecutive_failures
        self._open_duration = policy.open_duration
        self._probe_limit = policy.half_open_probes
        self._slow = policy.slow_call_threshold
        # Admits every call without looking further: the one check acquire() makes.
        self._closed = True
        self._state = CircuitState.CLOSED
        self._consecutive = 0
        self._open_until = 0.0
        self._probes_issued = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        self._since = wall()
        # When the last transition happened (epoch); 0 before any, so that a
        # breaker made after another instance opened the circuit still applies it.
        self._stamp = 0.0
        self._listeners: list[CircuitListener] = []
        self._gauges = {state: CIRCUIT_STATE.labels(name, state.value) for state in CircuitState}
        self._transitions = {
            state: CIRCUIT_TRANSITIONS.labels(name, state.value) for state in CircuitState
        }
        self._set_gauges(CircuitState.CLOSED)

    @property
    def state(self) -> CircuitState:
        """The state now; an open circuit whose open period has passed reads half-open."""
        if self._state is CircuitState.OPEN and self._clock() >= self._open_until:
            self._enter_half_open()
        return self._state

    def add_listener(self, listener: CircuitListener) -> None:
        """Call ``listener`` with the new snapshot after every local transition.

        Transitions applied from another instance (:meth:`apply_remote`) are not
        announced, so instances never echo each other's transitions. A listener
        runs inside the call that caused the transition: it must be quick and must
        not raise (schedule work, do not do it).
        """
        self._listeners.append(listener)

    def acquire(self) -> None:
        """Admit a call, or refuse it when the circuit is open.

        Each admitted call must end with exactly one of :meth:`record_success`,
        :meth:`record_failure` or :meth:`record_ignored`.

        Raises:
            CircuitOpenError: the circuit is open (``retry_after`` is the time
                until it admits probes), or half-open with every probe out.
        """
        if self._closed:
            return
        self._acquire_not_closed()

    def record_success(self, duration: float) -> None:
        """Record a call that succeeded after ``duration`` seconds (slow ones count as failures)."""
        if self._slow and duration > self._slow:
            self.record_failure(duration)
            return
        if self._closed:
            self._consecutive = 0
            self._window.add(0, self._clock())
            return
        if self._state is CircuitState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1
            self._probe_successes += 1
            if self._probe_successes >= self._probe_limit:
                self._transition(CircuitState.CLOSED, reason="probes succeeded")

    def record_failure(self, duration: float) -> None:
        """Record a call that failed through the dependency's fault."""
        if self._closed:
            now = self._clock()
            window = self._window
            window.add(1, now)
            self._consecutive += 1
            if self._consecutive_limit and self._consecutive >= self._consecutive_limit:
                self._open(now, reason="consecutive failures")
            elif (
                window.calls >= self._minimum_calls
                and window.failures / window.calls >= self._threshold
            ):
                self._open(now, reason="failure rate")
            return
        if self._state is CircuitState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1
            self._open(self._clock(), reason="probe failed")

    def record_ignored(self) -> None:
        """Record a call that ended in an error that is not the dependency's fault.

        It is not counted; a half-open probe's permit is given back.
        """
        if not self._closed and self._state is CircuitState.HALF_OPEN and self._probes_in_flight:
            self._probes_in_flight -= 1
            self._probes_issued -= 1

    def snapshot(self) -> CircuitSnapshot:
        """Return the circuit as it is now."""
        return self._snapshot(self.state)

    def apply_remote(self, state: CircuitState, since: float, open_until: float | None) -> bool:
        """Apply a transition another instance made, unless this breaker knows a later one.

        Remote OPEN opens this breaker until the remote's ``open_until``; remote
        CLOSED closes it and starts its window afresh. Listeners are not called.

        Args:
            state: the state the other instance entered (OPEN or CLOSED).
            since: epoch seconds of that transition; applied only when later than
                this breaker's own last transition.
            open_until: epoch seconds when the remote open period ends (OPEN only).

        Returns:
            Whether the transition was applied. An OPEN whose period has already
            ended is not.
        """
        if since <= self._stamp:
            return False
        if state is CircuitState.OPEN:
            if open_until is None:
                return False
            remaining = open_until - self._wall()
            if remaining <= 0:
                return False
            self._apply(CircuitState.OPEN, since)
            self._open_until = self._clock() + remaining
            return True
        if state is CircuitState.CLOSED:
            self._apply(CircuitState.CLOSED, since)
            return True
        return False

    # -- transitions -------------------------------------------------------------

    def _acquire_not_closed(self) -> None:
        if self._state is CircuitState.OPEN:
            now = self._clock()
            if now < self._open_until:
                raise CircuitOpenError(self.name, self._open_until - now)
            self._enter_half_open()
        if self._probes_issued >= self._probe_limit:
            raise CircuitOpenError(self.name, PROBES_BUSY_RETRY_AFTER)
        self._probes_issued += 1
        self._probes_in_flight += 1

    def _open(self, now: float, *, reason: str) -> None:
        self._open_until = now + self._open_duration
        self._transition(CircuitState.OPEN, reason=reason)

    def _enter_half_open(self) -> None:
        self._transition(CircuitState.HALF_OPEN, reason="open period over")

    def _transition(self, state: CircuitState, *, reason: str) -> None:
        previous = self._state
        window = self._window
        window.expire(self._clock())
        calls, failures = window.calls, window.failures
        # Strictly after the last one, even if the wall clock stepped back or
        # another instance's clock runs ahead: transitions are ordered by it.
        self._enter(state, max(self._wall(), self._stamp + 1e-6))
        if state is CircuitState.OPEN:
            logger.warning(
                "circuit opened",
                circuit=self.name,
                previous=previous.value,
                reason=reason,
                failure_rate=round(failures / calls, 4) if calls else None,
                calls=calls,
                failures=failures,
                consecutive_failures=self._consecutive,
                open_for_s=self._open_duration,
            )
            self._consecutive = 0
        elif state is CircuitState.CLOSED:
            logger.info("circuit closed", circuit=self.name, previous=previous.value, reason=reason)
            self._consecutive = 0
            window.reset()
        else:
            logger.info("circuit half-open", circuit=self.name, probes=self._probe_limit)
            return
        if self._listeners:
            self._notify(self._snapshot(state))

    def _notify(self, snapshot: CircuitSnapshot) -> None:
        for listener in self._listeners:
            # A listener's bug must not fail the protected call that made the transition.
            try:
                listener(snapshot)
            except Exception:
                logger.exception("circuit listener failed", circuit=self.name)

    def _apply(self, state: CircuitState, since: float) -> None:
        previous = self._state
        self._enter(state, since)
        if state is previous:
            return
        self._consecutive = 0
        if state is CircuitState.OPEN:
            logger.warning("circuit opened by another instance", circuit=self.name)
        else:
            self._window.reset()
            logger.info("circuit closed by another instance", circuit=self.name)

    def _enter(self, state: CircuitState, since: float) -> None:
        """Set the state and reset the probes; count and show the change when it is one."""
        previous = self._state
        self._state = state
        self._closed = state is CircuitState.CLOSED
        self._since = self._stamp = since
        self._probes_issued = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        if state is not previous:
            self._transitions[state].inc()
            self._set_gauges(state)

    def _snapshot(self, state: CircuitState) -> CircuitSnapshot:
        now = self._clock()
        window = self._window
        window.expire(now)
        calls = window.calls
        rate = window.failures / calls if calls and calls >= self._minimum_calls else None
        next_probe = None
        if state is CircuitState.OPEN:
            next_probe = self._wall() + (self._open_until - now)
        return CircuitSnapshot(self.name, state, rate, calls, self._since, next_probe)

    def _set_gauges(self, current: CircuitState) -> None:
        for state, gauge in self._gauges.items():
            gauge.set(1 if state is current else 0)


def _validate(name: str, policy: Policy) -> None:
    if not name:
        raise ValueError("a circuit needs a name")
    problems = []
    if not 0.0 < policy.failure_rate_threshold <= 1.0:
        problems.append(f"failure_rate_threshold={policy.failure_rate_threshold} (0 < x <= 1)")
    if policy.window not in ("count", "time"):
        problems.append(f"window={policy.window!r} ('count' or 'time')")
    if policy.window_size < 1:
        problems.append(f"window_size={policy.window_size} (>= 1)")
    if policy.minimum_calls < 1:
        problems.append(f"minimum_calls={policy.minimum_calls} (>= 1)")
    if policy.consecutive_failures < 0:
        problems.append(f"consecutive_failures={policy.consecutive_failures} (>= 0)")
    if policy.open_duration < 0:
        problems.append(f"open_duration={policy.open_duration} (>= 0)")
    if policy.half_open_probes < 1:
        problems.append(f"half_open_probes={policy.half_open_probes} (>= 1)")
    if policy.slow_call_threshold < 0:
        problems.append(f"slow_call_threshold={policy.slow_call_threshold} (>= 0)")
    if problems:
        raise ValueError(f"circuit {name!r}: invalid breaker settings: " + ", ".join(problems))
