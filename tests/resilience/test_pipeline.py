"""The pipeline: outcomes, deadlines, cancellation, fallback, the three forms, the order."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.context import RequestContext, bind, unbind
from bastion.resilience import (
    BulkheadFullError,
    CircuitBreaker,
    CircuitOpenError,
    CircuitState,
    DependencyError,
    DependencyTimeoutError,
    Pipeline,
    Policy,
    default_policy,
)
from bastion.resilience._timeout import Alarms, OutOfTime

HANG = "hang"
# How late a deadline may be met on a machine shared with other suites.
SLACK = 0.25


class Script:
    """A callee whose attempts follow a script; the last step repeats.

    A step is a value to return, an exception class to raise (a fresh instance
    each time), or HANG.
    """

    def __init__(self, *steps: Any) -> None:
        self.steps = steps
        self.calls = 0
        self.arguments: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    async def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        self.arguments.append((args, kwargs))
        step = self.steps[min(self.calls, len(self.steps)) - 1]
        if step == HANG:
            await asyncio.sleep(3600)
        if isinstance(step, type) and issubclass(step, BaseException):
            raise step(f"attempt {self.calls} failed: password=hunter2")
        return step


class Naps:
    """An injected sleep: records each backoff, returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def policy(**changes: Any) -> Policy:
    """The custom class's defaults, with fast backoff, under ``changes``."""
    base = dataclasses.replace(
        default_policy("dep", "custom"), backoff_initial=0.001, backoff_max=0.01
    )
    return dataclasses.replace(base, **changes)


def calls(name: str, outcome: str) -> float:
    labels = {"dependency": name, "outcome": outcome}
    return REGISTRY.get_sample_value("bastion_resilience_calls_total", labels) or 0.0


def counter(metric: str, name: str) -> float:
    return REGISTRY.get_sample_value(metric, {"dependency": name}) or 0.0


@pytest.fixture
def name() -> str:
    """A dependency name of this test alone, so metric counts start at zero."""
    return f"dep-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def naps() -> Naps:
    return Naps()


def build(name: str, naps: Naps | None = None, *, breaker: bool = True, **changes: Any) -> Pipeline:
    chosen = policy(**changes)
    return Pipeline(
        name,
        chosen,
        breaker=CircuitBreaker(name, chosen) if breaker else None,
        sleep=naps or Naps(),
    )


@pytest.fixture
def deadline_context() -> Iterator[RequestContext]:
    """A request context made current for the test; set its ``deadline``."""
    context = RequestContext(request_id="r-1")
    token = bind(context)
    yield context
    unbind(token)


class TestOutcomes:
    async def test_success_returns_the_result(self, name):
        """The callee's arguments go through and its result comes back; counted as success."""
        pipeline = build(name)
        callee = Script("answer")
        assert "answer" == await pipeline.call(callee, 1, key="value")
        assert [((1,), {"key": "value"})] == callee.arguments
        assert 1 == calls(name, "success")
        assert 1 == pipeline.breaker.snapshot().calls

    async def test_application_errors_pass_through_unchanged(self, name):
        """A bug in the protected code stays itself: not retried, not counted, no circuit."""
        pipeline = build(name)
        error = KeyError("id")

        async def buggy() -> None:
            raise error

        with pytest.raises(KeyError) as caught:
            await pipeline.call(buggy)
        assert error is caught.value
        assert 0 == pipeline.breaker.snapshot().calls
        for outcome in ("success", "failure", "timeout"):
            assert 0 == calls(name, outcome)

    async def test_transient_failure_ends_as_dependency_error(self, name, naps):
        """After the last attempt: DependencyError (502) chained to the last failure."""
        pipeline = build(name, naps, retries=2)
        callee = Script(ConnectionResetError)
        with pytest.raises(DependencyError) as caught:
            await pipeline.call(callee)
        error = caught.value
        assert not isinstance(error, DependencyTimeoutError)
        assert (502, name) == (error.status, error.dependency)
        assert isinstance(error.__cause__, ConnectionResetError)
        assert "attempt 3" in str(error.__cause__)
        assert "hunter2" not in error.detail
        assert 3 == callee.calls
        assert 1 == calls(name, "failure")
        assert 3 == pipeline.breaker.snapshot().calls

    async def test_client_timeouts_end_as_dependency_timeout(self, name):
        """A timeout raised by the client is a 503 DependencyTimeoutError."""
        pipeline = build(name, retries=0)
        with pytest.raises(DependencyTimeoutError) as caught:
            await pipeline.call(Script(TimeoutError))
        assert 503 == caught.value.status
        assert isinstance(caught.value.__cause__, TimeoutError)
        assert 1 == calls(name, "timeout")

    async def test_open_circuit_answers_at_once_and_is_not_retried(self, name, naps):
        """Once the circuit opens, the next attempt is refused: CircuitOpenError, no more calls."""
        pipeline = build(name, naps, retries=3, consecutive_failures=2, open_duration=30.0)
        callee = Script(ConnectionResetError)
        with pytest.raises(CircuitOpenError) as caught:
            await pipeline.call(callee)
        assert 2 == callee.calls
        assert 503 == caught.value.status
        assert 29 < caught.value.retry_after <= 30
        assert CircuitState.OPEN == pipeline.breaker.state
        with pytest.raises(CircuitOpenError):
            await pipeline.call(callee)
        assert 2 == callee.calls
        assert 2 == calls(name, "circuit_open")

    async def test_full_bulkhead_rejects(self, name):
        """No slot and no room in the queue: BulkheadFullError, and the callee is not called."""
        pipeline = build(name, max_concurrent=1, max_queue=0)
        gate = asyncio.Event()

        async def slow() -> str:
            await gate.wait()
            return "done"

        first = asyncio.create_task(pipeline.call(slow))
        await asyncio.sleep(0)
        callee = Script("never")
        with pytest.raises(BulkheadFullError):
            await pipeline.call(callee)
        assert 0 == callee.calls
        gate.set()
        assert "done" == await first
        assert 1 == calls(name, "bulkhead_full")
        assert 0 == pipeline.bulkhead.active

    async def test_a_failure_is_logged_once_without_its_message(self, name, naps):
        """One warning per failed call: dependency, attempts, error class; never its text."""
        pipeline = build(name, naps, retries=2)
        with capture_logs() as logs, pytest.raises(DependencyError):
            await pipeline.call(Script(ConnectionResetError))
        warnings = [line for line in logs if line["log_level"] == "warning"]
        assert [
            {
                "event": "dependency call failed",
                "dependency": name,
                "outcome": "failure",
                "attempts": 3,
                "error": "ConnectionResetError",
                "log_level": "warning",
            }
        ] == warnings
        assert "hunter2" not in repr(logs)


class TestDeadlines:
    async def test_hanging_callee_is_bounded_by_the_total_timeout(self, name):
        """Attempts time out and are retried, but the call ends within its total timeout."""
        pipeline = build(
            name, breaker=False, timeout=0.05, total_timeout=0.3, retries=10, backoff_max=0.01
        )
        callee = Script(HANG)
        started = time.monotonic()
        with pytest.raises(DependencyTimeoutError) as caught:
            await pipeline.call(callee)
        elapsed = time.monotonic() - started
        assert 0.28 <= elapsed < 0.3 + SLACK
        assert callee.calls >= 3
        assert isinstance(caught.value.__cause__, OutOfTime)
        assert 1 == calls(name, "timeout")

    async def test_a_timed_out_attempt_is_retried(self, name):
        """The attempt timeout is transient: the next attempt may answer."""
        pipeline = build(name, timeout=0.05, retries=2)
        callee = Script(HANG, "late answer")
        assert "late answer" == await pipeline.call(callee)
        assert 2 == callee.calls
        assert 1 == calls(name, "success")

    async def test_the_total_timeout_is_final(self, name):
        """When the total timeout passes, no retry follows."""
        pipeline = build(name, timeout=0, total_timeout=0.05, retries=3)
        callee = Script(HANG, "never")
        with pytest.raises(DependencyTimeoutError):
            await pipeline.call(callee)
        assert 1 == callee.calls

    async def test_no_backoff_sleeps_past_the_deadline(self, name, naps):
        """A wait that would end after the total deadline is not waited: the call fails now."""
        pipeline = build(name, naps, total_timeout=0.5, retries=5, backoff_initial=10.0,
                         backoff_max=10.0)  # fmt: skip
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(DependencyError):
            await pipeline.call(Script(ConnectionResetError))
        assert sum(naps.waits) < 0.5
        assert loop.time() - started < 0.5

    async def test_real_sleep_is_bounded_too(self, name):
        """With the real sleep, a failing call with long backoffs still ends before its deadline."""
        chosen = policy(total_timeout=0.3, retries=5, backoff_initial=0.2, backoff_max=0.2)
        pipeline = Pipeline(name, chosen, breaker=None)
        started = time.monotonic()
        with pytest.raises(DependencyError):
            await pipeline.call(Script(ConnectionResetError))
        assert time.monotonic() - started < 0.3 + SLACK

    async def test_the_request_budget_bounds_the_call(self, name, deadline_context):
        """A request with 0.1 s left gives its calls 0.1 s, whatever the policy allows."""
        pipeline = build(name, timeout=10.0, total_timeout=30.0)
        deadline_context.deadline = asyncio.get_running_loop().time() + 0.1
        started = time.monotonic()
        with pytest.raises(DependencyTimeoutError):
            await pipeline.call(Script(HANG))
        assert time.monotonic() - started < 0.1 + SLACK

    async def test_a_spent_request_budget_makes_no_call(self, name, deadline_context):
        """No time left: DependencyTimeoutError at once; the dependency is not called nor blamed."""
        pipeline = build(name)
        deadline_context.deadline = asyncio.get_running_loop().time() - 1
        callee = Script("never")
        with pytest.raises(DependencyTimeoutError):
            await pipeline.call(callee)
        assert 0 == callee.calls
        assert 0 == pipeline.breaker.snapshot().calls

    async def test_timeout_leaves_the_task_clean(self, name):
        """After a timeout the task has no pending cancellation; later timeouts still work."""
        pipeline = build(name, timeout=0.02, retries=1)
        with pytest.raises(DependencyTimeoutError):
            await pipeline.call(Script(HANG))
        task = asyncio.current_task()
        assert 0 == task.cancelling()
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.02):
                await asyncio.sleep(1)
        await asyncio.sleep(0)  # would raise CancelledError if a cancellation leaked

    async def test_a_callee_that_swallows_the_timeout(self, name):
        """A callee that catches the cancellation keeps its answer; the task is left clean."""
        pipeline = build(name, timeout=0.02, retries=0)

        async def stubborn() -> str:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                return "kept"
            return "unreachable"

        assert "kept" == await pipeline.call(stubborn)
        assert 0 == asyncio.current_task().cancelling()

    async def test_a_callee_that_turns_the_timeout_into_its_own_error(self, name):
        """A callee raising its own error on cancellation: that error passes; the task is clean."""
        pipeline = build(name, timeout=0.02, retries=0)

        async def translating() -> None:
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:
                raise LookupError("gave up") from None

        with pytest.raises(LookupError):
            await pipeline.call(translating)
        assert 0 == asyncio.current_task().cancelling()

    async def test_queue_wait_is_bounded_by_the_deadline(self, name, deadline_context):
        """Waiting for a bulkhead slot ends with the request's budget: a timeout, no call."""
        pipeline = build(name, max_concurrent=1, max_queue=5, queue_timeout=10.0)
        gate = asyncio.Event()
        holder = asyncio.create_task(pipeline.call(gate.wait))
        await asyncio.sleep(0)
        deadline_context.deadline = asyncio.get_running_loop().time() + 0.05
        callee = Script("never")
        with pytest.raises(DependencyTimeoutError) as caught:
            await pipeline.call(callee)
        assert not caught.value.__cause__.called
        assert 0 == callee.calls
        gate.set()
        await holder
        assert (0, 0) == (pipeline.bulkhead.active, pipeline.bulkhead.waiting)


class TestCancellation:
    async def test_caller_cancellation_propagates(self, name):
        """Cancelling the caller cancels the call: CancelledError, nothing counted, slot freed."""
        pipeline = build(name, timeout=5.0, max_concurrent=2, max_queue=0)
        task = asyncio.create_task(pipeline.call(Script(HANG)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert 0 == pipeline.bulkhead.active
        assert 0 == pipeline.breaker.snapshot().calls
        for outcome in ("success", "failure", "timeout"):
            assert 0 == calls(name, outcome)

    async def test_cancellation_at_the_deadline_still_propagates(self, name, deadline_context):
        """A cancellation arriving in the same instant as the deadline wins over the timeout."""
        pipeline = build(name, timeout=10.0, retries=0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 0.05
        deadline_context.deadline = deadline
        task = asyncio.create_task(pipeline.call(Script(HANG)))
        loop.call_at(deadline, task.cancel)
        with pytest.raises(asyncio.CancelledError):
            await task

    async def test_cancellation_during_backoff_propagates(self, name):
        """A caller cancelled while the pipeline waits to retry gets CancelledError."""
        chosen = policy(retries=3, backoff_initial=5.0, backoff_max=5.0)
        pipeline = Pipeline(name, chosen, breaker=None, sleep=lambda _s: asyncio.sleep(3600))
        task = asyncio.create_task(pipeline.call(Script(ConnectionResetError)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task


class TestFallback:
    async def test_fallback_answers_a_failed_call(self, name, naps):
        """The fallback gets the pipeline's error, with the cause; its result is the call's."""
        pipeline = build(name, naps, retries=1)
        seen: list[BaseException] = []

        async def cached(exc: BaseException) -> str:
            seen.append(exc)
            return "cached"

        answer = await pipeline.with_options(fallback=cached).call(Script(ConnectionResetError))
        assert "cached" == answer
        assert isinstance(seen[0], DependencyError)
        assert isinstance(seen[0].__cause__, ConnectionResetError)
        assert 1 == counter("bastion_resilience_fallbacks_total", name)
        assert 1 == calls(name, "failure")

    @pytest.mark.parametrize(
        ("changes", "expected"),
        [
            ({"consecutive_failures": 1, "retries": 1}, CircuitOpenError),
            ({"timeout": 0.02, "retries": 0}, DependencyTimeoutError),
        ],
    )
    async def test_fallback_gets_the_reason(self, name, changes, expected):
        """An open circuit or a timeout reaches the fallback as itself."""
        pipeline = build(name, **changes)
        seen: list[BaseException] = []

        async def record(exc: BaseException) -> None:
            seen.append(exc)

        callee = Script(ConnectionResetError) if expected is CircuitOpenError else Script(HANG)
        await pipeline.with_options(fallback=record).call(callee)
        assert [expected] == [type(exc) for exc in seen]

    async def test_fallback_on_a_full_bulkhead(self, name):
        """A call refused by the bulkhead is answered by the fallback."""
        pipeline = build(name, max_concurrent=1, max_queue=0)
        gate = asyncio.Event()
        holder = asyncio.create_task(pipeline.call(gate.wait))
        await asyncio.sleep(0)

        async def busy(exc: BaseException) -> str:
            return type(exc).__name__

        assert "BulkheadFullError" == await pipeline.with_options(fallback=busy).call(Script(1))
        gate.set()
        await holder

    async def test_no_fallback_for_application_errors(self, name):
        """A bug is not the dependency's failure: the fallback is not used."""
        pipeline = build(name)

        async def fallback(_exc: BaseException) -> str:
            return "no"

        with pytest.raises(ValueError, match="attempt 1"):
            await pipeline.with_options(fallback=fallback).call(Script(ValueError))

    async def test_no_fallback_for_cancellation(self, name):
        """A cancelled caller is not answered by the fallback."""
        pipeline = build(name)
        used = []

        async def fallback(exc: BaseException) -> None:
            used.append(exc)

        task = asyncio.create_task(pipeline.with_options(fallback=fallback).call(Script(HANG)))
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert [] == used

    async def test_fallback_left_out_of_the_order_is_off(self, name, naps):
        """An operator who removes fallback from the order sees the failures."""
        pipeline = build(name, naps, retries=0, order=("total_timeout", "retry", "timeout"))

        async def fallback(_exc: BaseException) -> str:
            return "hidden"

        with pytest.raises(DependencyError):
            await pipeline.with_options(fallback=fallback).call(Script(ConnectionResetError))

    async def test_a_sync_fallback_is_a_clear_error(self, name):
        """A fallback that is not async is reported as such."""
        pipeline = build(name, retries=0)
        with pytest.raises(TypeError, match="async"):
            await pipeline.with_options(fallback=lambda exc: "x").call(Script(ConnectionResetError))


class TestForms:
    async def test_decorator_keeps_the_signature(self, name, naps):
        """@pipeline keeps the function's name, docstring and signature, and guards each call."""
        pipeline = build(name, naps, retries=1)
        attempts = 0

        @pipeline
        async def fetch(item: int, *, fresh: bool = False) -> str:
            """Fetch an item."""
            nonlocal attempts
            attempts += 1
            if attempts == 1:
                raise ConnectionResetError
            return f"item {item} fresh={fresh}"

        assert "fetch" == fetch.__name__
        assert "Fetch an item." == fetch.__doc__
        assert ["item", "fresh"] == list(inspect.signature(fetch).parameters)
        assert inspect.iscoroutinefunction(fetch)
        assert "item 7 fresh=True" == await fetch(7, fresh=True)
        assert 2 == attempts

    async def test_decorator_with_options(self, name):
        """with_options(...) decorates too."""
        pipeline = build(name, retries=0)

        async def fallback(_exc: BaseException) -> str:
            return "fallback"

        @pipeline.with_options(fallback=fallback)
        async def broken() -> str:
            raise ConnectionResetError

        assert "fallback" == await broken()

    def test_decorating_a_sync_function_is_an_error(self, name):
        """Only async functions can be guarded; the error says so."""
        with pytest.raises(TypeError, match="async"):
            build(name)(lambda: 1)

    def test_options_must_be_callable(self, name):
        """A non-callable option is refused when given, not when first used."""
        with pytest.raises(TypeError, match="is_failure"):
            build(name).with_options(is_failure=503)

    async def test_block_success(self, name):
        """async with: one guarded attempt, counted as a success."""
        pipeline = build(name)
        async with pipeline:
            await asyncio.sleep(0)
        assert 1 == calls(name, "success")
        assert 1 == pipeline.breaker.snapshot().calls

    async def test_block_timeout_cancels_the_block(self, name):
        """A block past its deadline is cancelled and leaves as DependencyTimeoutError."""
        pipeline = build(name, timeout=0.05)
        reached_end = False

        async def block() -> None:
            nonlocal reached_end
            async with pipeline:
                await asyncio.sleep(3600)
                reached_end = True

        started = time.monotonic()
        with pytest.raises(DependencyTimeoutError):
            await block()
        assert not reached_end
        assert time.monotonic() - started < 0.05 + SLACK
        assert 0 == asyncio.current_task().cancelling()
        assert 1 == calls(name, "timeout")

    async def test_block_failures_are_classified(self, name):
        """Transient errors leave a block as DependencyError; bugs leave unchanged."""
        pipeline = build(name)
        with pytest.raises(DependencyError) as caught:
            async with pipeline:
                raise ConnectionResetError
        assert isinstance(caught.value.__cause__, ConnectionResetError)
        with pytest.raises(ZeroDivisionError):
            async with pipeline:
                _ = 1 / 0
        assert 1 == pipeline.breaker.snapshot().calls

    async def test_open_circuit_skips_the_block(self, name):
        """With the circuit open the block does not run."""
        pipeline = build(name, consecutive_failures=1)
        with pytest.raises(DependencyError):
            async with pipeline:
                raise ConnectionResetError
        ran = False
        with pytest.raises(CircuitOpenError):
            async with pipeline:
                ran = True
        assert not ran

    async def test_block_has_no_fallback(self, name):
        """A fallback has no value to replace in a block: refused with a clear message."""

        async def fallback(_exc: BaseException) -> None:
            return None

        with pytest.raises(TypeError, match="fallback"):
            async with build(name).with_options(fallback=fallback):
                pass

    async def test_blocks_in_concurrent_tasks_are_independent(self, name):
        """One pipeline guards blocks in many tasks at once; each keeps its own state."""
        pipeline = build(name, timeout=0.5, max_concurrent=80, max_queue=0)  # 40 tasks x 2 blocks

        async def block(number: int) -> int:
            async with pipeline:
                await asyncio.sleep(0.001 * (number % 5))
                async with pipeline:  # nested blocks unwind in order
                    await asyncio.sleep(0)
            return number

        assert list(range(40)) == await asyncio.gather(*(block(n) for n in range(40)))
        assert 80 == calls(name, "success")
        assert 0 == pipeline.bulkhead.active

    async def test_block_refused_by_a_full_bulkhead(self, name):
        """No slot: the block does not run, and the circuit is not charged for it."""
        pipeline = build(name, max_concurrent=1, max_queue=0)
        assert pipeline.bulkhead.try_acquire()
        ran = False
        with pytest.raises(BulkheadFullError):
            async with pipeline:
                ran = True
        assert not ran
        assert 0 == pipeline.breaker.snapshot().calls
        pipeline.bulkhead.release()
        assert 1 == calls(name, "bulkhead_full")

    async def test_block_without_time_left(self, name, deadline_context):
        """A request with no time left does not run the block."""
        pipeline = build(name, timeout=0, total_timeout=0)
        deadline_context.deadline = asyncio.get_running_loop().time() - 1
        ran = False
        with pytest.raises(DependencyTimeoutError):
            async with pipeline.with_options(idempotent=False):
                ran = True
        assert not ran
        assert 0 == pipeline.breaker.snapshot().calls

    async def test_block_without_timeouts(self, name):
        """With no timeout anywhere, a block runs unbounded and is counted."""
        pipeline = build(name, timeout=0, total_timeout=0)
        async with pipeline.with_options(idempotent=False):
            await asyncio.sleep(0.01)
        assert 1 == calls(name, "success")

    async def test_exit_without_enter(self, name):
        """Calling __aexit__ by hand without __aenter__ is a clear error."""
        with pytest.raises(RuntimeError, match="without __aenter__"):
            await build(name).__aexit__(None, None, None)


class TestOrder:
    async def test_bulkhead_inside_retry_frees_the_slot_while_waiting(self, name):
        """By default a slot is held only while an attempt runs, not during backoff."""
        active_while_sleeping: list[int] = []

        async def sleep(_seconds: float) -> None:
            active_while_sleeping.append(pipeline.bulkhead.active)

        chosen = policy(retries=2, max_concurrent=1, max_queue=0)
        pipeline = Pipeline(name, chosen, breaker=None, sleep=sleep)
        with pytest.raises(DependencyError):
            await pipeline.call(Script(ConnectionResetError))
        assert [0, 0] == active_while_sleeping

    async def test_bulkhead_outside_retry_holds_the_slot(self, name):
        """Declared outside retry, the bulkhead slot is kept across attempts and waits."""
        active_while_sleeping: list[int] = []

        async def sleep(_seconds: float) -> None:
            active_while_sleeping.append(pipeline.bulkhead.active)

        chosen = policy(retries=2, max_concurrent=1, max_queue=0,
                        order=("bulkhead", "retry", "timeout"))  # fmt: skip
        pipeline = Pipeline(name, chosen, breaker=None, sleep=sleep)
        with pytest.raises(DependencyError):
            await pipeline.call(Script(ConnectionResetError))
        assert [1, 1] == active_while_sleeping

    async def test_breaker_outside_retry_sees_one_outcome_per_call(self, name, naps):
        """Declared outside retry, the circuit counts calls, not attempts."""
        order = ("fallback", "total_timeout", "circuit_breaker", "retry", "bulkhead", "timeout")
        pipeline = build(name, naps, retries=3, order=order)
        with pytest.raises(DependencyError):
            await pipeline.call(Script(ConnectionResetError))
        assert 1 == pipeline.breaker.snapshot().calls

    async def test_timeout_outside_retry_bounds_the_whole_call(self, name):
        """The attempt timeout declared outside retry is final: no retry after it."""
        pipeline = build(name, timeout=0.05, total_timeout=0, retries=3,
                         order=("timeout", "retry", "circuit_breaker"))  # fmt: skip
        callee = Script(HANG, "never")
        with pytest.raises(DependencyTimeoutError):
            await pipeline.call(callee)
        assert 1 == callee.calls

    async def test_timeout_between_retry_and_bulkhead_covers_the_queue_wait(self, name):
        """A timeout declared outside the bulkhead starts before each wait for a slot."""
        pipeline = build(name, timeout=0.05, retries=1, max_concurrent=1, max_queue=5,
                         order=("retry", "timeout", "bulkhead"))  # fmt: skip
        assert pipeline.bulkhead.try_acquire()  # every slot taken
        started = time.monotonic()
        with pytest.raises(DependencyTimeoutError) as caught:
            await pipeline.call(Script("never"))
        assert not caught.value.__cause__.called
        # Never reached the dependency, so retried: two waits for a slot.
        assert 0.1 <= time.monotonic() - started < 0.1 + SLACK
        assert 1 == counter("bastion_retries_total", name)
        pipeline.bulkhead.release()

    async def test_fallback_inside_retry_answers_each_attempt(self, name):
        """Declared inside retry, the fallback answers the attempt, so nothing is retried."""
        pipeline = build(name, retries=3, order=("retry", "fallback", "circuit_breaker"))
        callee = Script(ConnectionResetError)

        async def fallback(_exc: BaseException) -> str:
            return "answered"

        assert "answered" == await pipeline.with_options(fallback=fallback).call(callee)
        assert 1 == callee.calls
        assert "Pipeline(" in repr(pipeline)

    async def test_strategies_left_out_are_off(self, name):
        """Without retry in the order, one attempt is made whatever retries says."""
        pipeline = build(name, retries=3, order=("fallback", "total_timeout", "timeout"))
        callee = Script(ConnectionResetError)
        with pytest.raises(DependencyError):
            await pipeline.call(callee)
        assert 1 == callee.calls
        assert (None, None, None) == (pipeline.breaker, pipeline.bulkhead, pipeline.budget)

    @pytest.mark.parametrize(
        ("changes", "message"),
        [
            ({"order": ("retry", "jitter")}, "unknown strategies"),
            ({"order": ("retry", "retry")}, "twice"),
            ({"timeout": -1.0}, "negative timeout"),
            ({"retries": -1}, "negative retries"),
        ],
    )
    def test_bad_policies(self, name, changes, message):
        """A policy that cannot work is refused when the pipeline is built."""
        with pytest.raises(ValueError, match=message):
            Pipeline(name, policy(**changes), breaker=None)

    def test_a_pipeline_needs_a_name(self):
        """The name labels metrics and errors: it cannot be empty."""
        with pytest.raises(ValueError, match="name"):
            Pipeline("", policy(), breaker=None)


class Recorder:
    """An alarm target that notes when it expired (loop time)."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.expired_at: float | None = None

    def expire(self) -> None:
        self.expired_at = self.loop.time()


class TestAttemptDeadlines:
    async def test_alarms_fire_at_their_time_and_cleared_ones_never(self):
        """Queued deadlines fire in order, none early; a cleared one does not fire."""
        loop = asyncio.get_running_loop()
        alarms = Alarms(loop)
        start = loop.time()
        targets = [Recorder(loop) for _ in range(4)]
        set_ = [alarms.add(start + 0.01 * (n + 1), target) for n, target in enumerate(targets)]
        alarms.remove(set_[1])
        await asyncio.sleep(0.08)
        assert targets[1].expired_at is None
        for n in (0, 2, 3):
            assert targets[n].expired_at >= start + 0.01 * (n + 1) - 1e-6

    async def test_an_earlier_deadline_gets_its_own_timer(self):
        """A deadline earlier than the queued ones (a request's own) is not delayed by them."""
        loop = asyncio.get_running_loop()
        alarms = Alarms(loop)
        start = loop.time()
        late, early = Recorder(loop), Recorder(loop)
        alarms.add(start + 0.2, late)
        alarms.add(start + 0.02, early)
        await asyncio.sleep(0.1)
        assert early.expired_at is not None
        assert late.expired_at is None

    async def test_cleared_alarms_are_not_kept(self):
        """Attempts that ended leave nothing queued behind them."""
        loop = asyncio.get_running_loop()
        alarms = Alarms(loop)
        for _ in range(100):
            alarms.remove(alarms.add(loop.time() + 10, Recorder(loop)))
        assert 0 == len(alarms._queue)

    @settings(max_examples=20, deadline=None)
    @given(
        plan=st.lists(
            st.tuples(st.integers(0, 30), st.booleans()),  # deadline in ms, cleared?
            min_size=1,
            max_size=20,
        )
    )
    def test_every_alarm_fires_once_on_time(self, plan):
        """Whatever the order of deadlines, each alarm not cleared fires, never before its time."""

        async def scenario() -> None:
            loop = asyncio.get_running_loop()
            alarms = Alarms(loop)
            start = loop.time()
            set_ = []
            for milliseconds, cleared in plan:
                target = Recorder(loop)
                alarm = alarms.add(start + milliseconds / 1000, target)
                set_.append((alarm, target, cleared))
            for alarm, _, cleared in set_:
                if cleared:
                    alarms.remove(alarm)
            await asyncio.sleep(0.06)
            for (milliseconds, cleared), (_, target, _) in zip(plan, set_, strict=True):
                if cleared:
                    assert target.expired_at is None
                else:
                    assert target.expired_at is not None
                    assert target.expired_at >= start + milliseconds / 1000 - 1e-6

        asyncio.run(scenario())

    async def test_concurrent_attempts_each_meet_their_deadline(self, name):
        """Staggered hanging calls, some with earlier request deadlines, each time out on time."""
        pipeline = build(name, breaker=False, timeout=0.1, retries=0)
        loop = asyncio.get_running_loop()

        async def one(number: int) -> float:
            await asyncio.sleep(0.002 * number)
            started = loop.time()
            budget = 0.03 if number % 3 == 0 else None
            context = RequestContext(request_id=f"r{number}")
            if budget is not None:
                context.deadline = started + budget
            token = bind(context)
            try:
                with pytest.raises(DependencyTimeoutError):
                    await pipeline.call(Script(HANG))
            finally:
                unbind(token)
            elapsed = loop.time() - started
            expected = budget if budget is not None else 0.1
            assert expected - 0.001 <= elapsed < expected + SLACK
            return elapsed

        await asyncio.gather(*(one(number) for number in range(30)))
