"""Bulkhead: capped concurrency and a bounded FIFO queue, so one slow dependency holds few tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from types import TracebackType

from bastion.resilience._errors import BulkheadFullError

__all__ = ["Bulkhead"]


class Bulkhead:
    """At most ``max_concurrent`` calls at once; up to ``max_queue`` more wait their turn, in order.

    A call arriving when every slot is taken and the queue is full is refused at
    once (:class:`BulkheadFullError`, 503 with ``Retry-After: 1``); one that waited
    ``queue_timeout`` seconds without getting a slot is refused too. A freed slot
    goes straight to the longest waiter, never to a newcomer. A waiter that is
    cancelled leaves the queue, and if the slot reached it in the same instant it
    passes the slot on: no slot is ever lost.

    Use it as ``async with bulkhead:``, or :meth:`try_acquire` / :meth:`acquire`
    then :meth:`release`. A pipeline holds a slot only while an attempt runs,
    not while it waits to retry.

    Args:
        max_concurrent: calls in progress at once (at least 1).
        max_queue: calls waiting for a slot; 0 refuses at once when full.
        queue_timeout: longest wait for a slot in seconds; 0 for no limit (the
            caller's own deadline still applies).
        name: the dependency's name, carried by :class:`BulkheadFullError`.

    Raises:
        ValueError: ``max_concurrent`` below 1, or a negative ``max_queue`` or ``queue_timeout``.

    Example:
        >>> bulkhead = Bulkhead(10, 20, 1.0, name="llm")
        >>> async with bulkhead:
        ...     answer = await llm.ask(question)
    """

    __slots__ = ("_active", "_max", "_max_queue", "_queue_timeout", "_waiters", "name")

    def __init__(
        self, max_concurrent: int, max_queue: int, queue_timeout: float, *, name: str = "bulkhead"
    ) -> None:
        if max_concurrent < 1:
            raise ValueError(f"bulkhead {name!r}: max_concurrent must be at least 1")
        if max_queue < 0 or queue_timeout < 0:
            raise ValueError(f"bulkhead {name!r}: max_queue and queue_timeout must not be negative")
        self.name = name
        self._max = max_concurrent
        self._max_queue = max_queue
        self._queue_timeout = queue_timeout
        self._active = 0
        # A waiter's future resolves True when a slot is handed to it, False when
        # its wait timed out.
        self._waiters: deque[asyncio.Future[bool]] = deque()

    @property
    def active(self) -> int:
        """Slots taken now."""
        return self._active

    @property
    def waiting(self) -> int:
        """Calls waiting for a slot now."""
        return len(self._waiters)

    def try_acquire(self) -> bool:
        """Take a slot if one is free and nobody is waiting; never waits."""
        if self._active < self._max and not self._waiters:
            self._active += 1
            return True
        return False

    async def acquire(self, max_wait: float | None = None) -> None:
        """Take a slot, waiting in line for one if every slot is taken.

        Args:
            max_wait: the caller's own limit on the wait, in seconds (what is
                left of its deadline); the shorter of it and ``queue_timeout`` applies.

        Raises:
            BulkheadFullError: the queue is full, or ``queue_timeout`` passed first.
            TimeoutError: ``max_wait`` passed first.
        """
        if self.try_acquire():
            return
        if len(self._waiters) >= self._max_queue:
            raise BulkheadFullError(self.name)
        queue_limit = self._queue_timeout or None
        caller_first = max_wait is not None and (queue_limit is None or max_wait < queue_limit)
        limit = max_wait if caller_first else queue_limit
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._waiters.append(waiter)
        expiry = loop.call_later(limit, self._expire, waiter) if limit is not None else None
        try:
            granted = await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result():
                # The slot reached this waiter in the same loop turn as its cancellation.
                self.release()
            else:
                self._forget(waiter)
            raise
        finally:
            if expiry is not None:
                expiry.cancel()
        if granted:
            return
        if caller_first:
            raise TimeoutError(f"bulkhead {self.name!r}: no slot before the caller's deadline")
        raise BulkheadFullError(self.name)

    def release(self) -> None:
        """Give a slot back: to the longest waiter if any, else to the pool."""
        waiters = self._waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(True)
                return
        self._active -= 1

    async def __aenter__(self) -> None:
        await self.acquire()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()

    def _expire(self, waiter: asyncio.Future[bool]) -> None:
        if not waiter.done():
            waiter.set_result(False)
            self._forget(waiter)

    def _forget(self, waiter: asyncio.Future[bool]) -> None:
        # release() may already have taken it off the queue.
        with contextlib.suppress(ValueError):
            self._waiters.remove(waiter)
