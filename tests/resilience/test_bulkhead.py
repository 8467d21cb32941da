"""Bulkhead: bounded concurrency, a bounded FIFO queue, rejection when full, no slot ever lost."""

from __future__ import annotations

import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.resilience import Bulkhead, BulkheadFullError


async def turns(count: int) -> None:
    """Let the event loop run ``count`` times."""
    for _ in range(count):
        await asyncio.sleep(0)


class TestLimits:
    async def test_never_more_than_max_concurrent(self):
        """However many callers, at most max_concurrent hold a slot at once."""
        bulkhead = Bulkhead(3, 100, 0)
        running = peak = 0

        async def work() -> None:
            nonlocal running, peak
            async with bulkhead:
                running += 1
                peak = max(peak, running)
                await turns(3)
                running -= 1

        await asyncio.gather(*(work() for _ in range(50)))
        assert 3 == peak
        assert (0, 0) == (bulkhead.active, bulkhead.waiting)

    async def test_full_queue_rejects_at_once(self):
        """With every slot taken and the queue full, a newcomer is refused without waiting."""
        bulkhead = Bulkhead(1, 1, 0, name="llm")
        assert bulkhead.try_acquire()
        waiter = asyncio.create_task(bulkhead.acquire())
        await turns(1)
        started = time.monotonic()
        with pytest.raises(BulkheadFullError) as caught:
            await bulkhead.acquire()
        assert time.monotonic() - started < 0.05
        assert "llm" == caught.value.dependency
        assert 503 == caught.value.status
        assert {"Retry-After": "1"} == caught.value.headers
        bulkhead.release()
        await waiter
        bulkhead.release()
        assert 0 == bulkhead.active

    async def test_no_queue_rejects_when_busy(self):
        """max_queue 0: a call finding every slot taken is refused."""
        bulkhead = Bulkhead(1, 0, 0)
        async with bulkhead:
            with pytest.raises(BulkheadFullError):
                await bulkhead.acquire()

    async def test_waiters_are_served_in_order(self):
        """A freed slot goes to the longest waiter, never to a newcomer."""
        bulkhead = Bulkhead(1, 10, 0)
        order: list[int] = []
        assert bulkhead.try_acquire()

        async def wait(number: int) -> None:
            await bulkhead.acquire()
            order.append(number)
            bulkhead.release()

        tasks = []
        for number in range(5):
            tasks.append(asyncio.create_task(wait(number)))
            await turns(1)
        bulkhead.release()
        assert not bulkhead.try_acquire()  # no barging past the queue
        await asyncio.gather(*tasks)
        assert [0, 1, 2, 3, 4] == order

    async def test_queue_timeout_rejects(self):
        """A call that waited queue_timeout without a slot is refused as full."""
        bulkhead = Bulkhead(1, 5, 0.05)
        async with bulkhead:
            started = time.monotonic()
            with pytest.raises(BulkheadFullError):
                await bulkhead.acquire()
            assert 0.04 <= time.monotonic() - started < 1.0
            assert 0 == bulkhead.waiting

    async def test_callers_limit_is_a_timeout(self):
        """The caller's shorter limit (its deadline) ends the wait as a TimeoutError."""
        bulkhead = Bulkhead(1, 5, 10.0)
        async with bulkhead:
            with pytest.raises(TimeoutError):
                await bulkhead.acquire(0.02)
            assert 0 == bulkhead.waiting

    @pytest.mark.parametrize(
        ("arguments", "message"),
        [
            ((0, 1, 0), "max_concurrent"),
            ((1, -1, 0), "max_queue"),
            ((1, 1, -0.5), "queue_timeout"),
        ],
    )
    def test_bad_settings(self, arguments, message):
        """Impossible sizes are refused with the setting named."""
        with pytest.raises(ValueError, match=message):
            Bulkhead(*arguments)


class TestCancellation:
    async def test_cancelled_waiter_gives_its_place_back(self):
        """A cancelled waiter leaves the queue; the next one gets the slot."""
        bulkhead = Bulkhead(1, 2, 0)
        assert bulkhead.try_acquire()
        first = asyncio.create_task(bulkhead.acquire())
        second = asyncio.create_task(bulkhead.acquire())
        await turns(1)
        assert 2 == bulkhead.waiting
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        assert 1 == bulkhead.waiting
        bulkhead.release()
        await second
        assert (1, 0) == (bulkhead.active, bulkhead.waiting)
        bulkhead.release()
        assert 0 == bulkhead.active

    async def test_slot_handed_to_a_waiter_cancelled_in_the_same_turn_is_passed_on(self):
        """The slot reached a waiter just as it was cancelled: it goes to the next one, not lost."""
        bulkhead = Bulkhead(1, 2, 0)
        assert bulkhead.try_acquire()
        first = asyncio.create_task(bulkhead.acquire())
        second = asyncio.create_task(bulkhead.acquire())
        await turns(1)
        bulkhead.release()  # hands the slot to `first`, which has not run yet
        first.cancel()
        with pytest.raises(asyncio.CancelledError):
            await first
        async with asyncio.timeout(1):  # a lost slot would leave `second` waiting forever
            await second
        assert (1, 0) == (bulkhead.active, bulkhead.waiting)
        bulkhead.release()
        assert 0 == bulkhead.active

    @settings(max_examples=60, deadline=None)
    @given(
        limit=st.integers(1, 4),
        queue=st.integers(0, 6),
        plans=st.lists(
            st.tuples(st.integers(0, 4), st.one_of(st.none(), st.integers(0, 6))),
            min_size=1,
            max_size=25,
        ),
    )
    def test_no_slot_is_ever_lost(self, limit, queue, plans):
        """Any mix of holding, waiting, refusal and cancellation ends with every slot free."""

        async def scenario() -> None:
            bulkhead = Bulkhead(limit, queue, 0)
            running = peak = 0

            async def caller(hold: int) -> None:
                nonlocal running, peak
                try:
                    await bulkhead.acquire()
                except BulkheadFullError:
                    return
                running += 1
                peak = max(peak, running)
                try:
                    await turns(hold)
                finally:
                    running -= 1
                    bulkhead.release()

            tasks = [asyncio.create_task(caller(hold)) for hold, _ in plans]
            for turn in range(8):
                for task, (_, cancel_at) in zip(tasks, plans, strict=True):
                    if cancel_at == turn:
                        task.cancel()
                await turns(1)
            await asyncio.gather(*tasks, return_exceptions=True)
            assert peak <= limit
            assert (0, 0) == (bulkhead.active, bulkhead.waiting)

        asyncio.run(scenario())
