"""Timeouts inside a pipeline: attempt deadlines, and what an attempt raises when one passes."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from typing import Protocol

__all__ = ["Alarm", "Alarms", "OutOfTime"]


class OutOfTime(TimeoutError):
    """A deadline of the pipeline passed (it ends the call as ``DependencyTimeoutError``).

    Attributes:
        called: whether the dependency had been called (``False``: the time ran
            out before, waiting for a bulkhead slot or with no budget left). A call
            never made is not the dependency's fault and is safe to retry.
        final: whether the deadline that passed bounds the whole call (the total
            timeout or the request's deadline) rather than one attempt: no retry
            can follow.
    """

    def __init__(self, *, called: bool, final: bool) -> None:
        super().__init__(
            "the dependency did not answer before the deadline"
            if called
            else "no time was left to call the dependency"
        )
        self.called = called
        self.final = final


class _Expiring(Protocol):
    def expire(self) -> None: ...


class Alarm:
    """One attempt's deadline, set in :class:`Alarms`."""

    __slots__ = ("handle", "target", "when")

    def __init__(self, when: float, target: _Expiring) -> None:
        self.when = when
        self.target: _Expiring | None = target
        # Its own loop timer, for a deadline that could not join the queue.
        self.handle: asyncio.TimerHandle | None = None

    def fire(self) -> None:
        if self.target is not None:
            self.target.expire()


class Alarms:
    """The attempt deadlines of one pipeline on one event loop, served by one loop timer.

    The attempts of a pipeline mostly get the same timeout, so their deadlines
    arrive in order: they wait in a FIFO queue and one loop timer, set for the
    earliest, serves them all, re-set as it fires. Setting an alarm is an append
    and clearing it a flag, where a loop timer per attempt is a ``TimerHandle``
    pushed on the loop's heap and cancelled (``bench/resilience.py``: ~0.4 µs
    against ~1 µs). A deadline earlier than the last one queued (the request's
    own deadline binding) gets its own loop timer.
    """

    __slots__ = ("_handle", "_queue", "_resolution", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._queue: deque[Alarm] = deque()
        self._handle: asyncio.TimerHandle | None = None
        # asyncio runs a timer this close to its time: so do the alarms it fires.
        self._resolution = time.get_clock_info("monotonic").resolution

    def add(self, when: float, target: _Expiring) -> Alarm:
        """Call ``target.expire()`` at loop time ``when`` unless :meth:`remove` comes first."""
        alarm = Alarm(when, target)
        queue = self._queue
        if queue and when < queue[-1].when:
            alarm.handle = self.loop.call_at(when, alarm.fire)
            return alarm
        queue.append(alarm)
        if self._handle is None:
            self._handle = self.loop.call_at(when, self._fire)
        return alarm

    def remove(self, alarm: Alarm) -> None:
        """Clear ``alarm``; cleared alarms at the head of the queue are dropped at once."""
        alarm.target = None
        if alarm.handle is not None:
            alarm.handle.cancel()
            return
        queue = self._queue
        while queue and queue[0].target is None:
            queue.popleft()

    def _fire(self) -> None:
        self._handle = None
        queue = self._queue
        limit = self.loop.time() + self._resolution
        while queue:
            alarm = queue[0]
            target = alarm.target
            if target is not None:
                if alarm.when > limit:
                    self._handle = self.loop.call_at(alarm.when, self._fire)
                    return
                alarm.target = None
                target.expire()
            queue.popleft()
