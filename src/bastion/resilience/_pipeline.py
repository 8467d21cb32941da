"""Pipeline: a named dependency's strategies, composed in their declared order around each call.

The strategies are layers, outermost first as ``policy.order`` lists them (by
default fallback, total timeout, retry, circuit breaker, bulkhead, attempt
timeout). What a layer wraps runs inside it: strategies inside ``retry`` run
once per attempt, those outside it once per call.

The success path is kept short, because every call to every dependency pays
for it (``bench/resilience.py``):

* one deadline per attempt, the earliest that applies (attempt timeout, total
  timeout, the request's remaining budget), which cancels the task when it
  passes, rather than one ``asyncio.timeout`` per strategy; a pipeline's
  attempt deadlines share one loop timer (:class:`~._timeout.Alarms`);
* timeouts that start when the call starts are applied before the first layer
  runs, and those right around the dependency by that last step, so they cost
  no layer of their own;
* the first attempt is made directly: tenacity's retry machinery is entered
  only after a failure, with a fresh ``AsyncRetrying`` for that call (a shared
  one keeps its state on the instance), so one pipeline serves any number of
  concurrent calls;
* metric children are resolved once, here, not per call.

A failure that is the dependency's fault (:func:`is_transient`) is retried when
the operation is safe to repeat and the retry budget allows, and ends the call
as ``DependencyError`` (502) or ``DependencyTimeoutError`` (503), the last
failure chained as ``__cause__``. An open circuit raises ``CircuitOpenError``,
a full bulkhead ``BulkheadFullError``, both at once and never retried. Anything
else (an application bug inside the protected call) passes through unchanged.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import math
import time
from collections.abc import Awaitable, Callable, Coroutine
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Final, ParamSpec, Protocol, TypeVar

import structlog
from tenacity import AsyncRetrying, RetryCallState, wait_random_exponential

from bastion.context import current_context
from bastion.observability.metrics import (
    RESILIENCE_CALLS,
    RESILIENCE_FALLBACKS,
    RETRIES,
    RETRY_BUDGET_EXHAUSTED,
)
from bastion.resilience._breaker import CircuitBreaker
from bastion.resilience._bulkhead import Bulkhead
from bastion.resilience._classify import is_timeout, is_transient, never_reached
from bastion.resilience._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DependencyError,
    DependencyTimeoutError,
)
from bastion.resilience._policy import Policy
from bastion.resilience._retry import RetryBudget
from bastion.resilience._timeout import Alarms, OutOfTime
from bastion.settings import Strategy

__all__ = ["Pipeline", "PipelineCall"]

P = ParamSpec("P")
T = TypeVar("T")

logger = structlog.get_logger("bastion.resilience")

_INF: Final = math.inf
_STRATEGIES: Final = frozenset(
    ("fallback", "total_timeout", "retry", "circuit_breaker", "bulkhead", "timeout")
)
_DEADLINES: Final = frozenset(("total_timeout", "timeout"))
# Layers that take no time before the inner ones start: a deadline outside only
# these starts with the call.
_INSTANT: Final = frozenset(("fallback", "circuit_breaker")) | _DEADLINES
_OUTCOMES: Final = ("success", "failure", "timeout", "circuit_open", "bulkhead_full")


class _Options:
    """A call's options; never changed once made.

    Not a frozen dataclass: its ``__init__`` costs ~0.5 µs more, paid by every
    ``with_options()``, which callers may make per call.
    """

    __slots__ = ("fallback", "idempotent", "is_failure", "retry_after")

    def __init__(
        self,
        fallback: Callable[[BaseException], Awaitable[Any]] | None = None,
        idempotent: bool = True,
        is_failure: Callable[[Any], bool] | None = None,
        retry_after: Callable[[Any], float | None] | None = None,
    ) -> None:
        self.fallback = fallback
        self.idempotent = idempotent
        self.is_failure = is_failure
        self.retry_after = retry_after


_DEFAULTS: Final = _Options()


class _Call:
    """The state of one call (or one ``async with`` block) through a pipeline."""

    __slots__ = (
        "args",
        "attempts",
        "deadline",
        "expired",
        "final_deadline",
        "fn",
        "kwargs",
        "loop",
        "options",
        "outcome",
        "rejection",
        "task",
    )

    def __init__(  # noqa: PLR0917 -- one per call: positional arguments are the cheapest
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[..., Awaitable[Any]] | None,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        options: _Options,
        deadline: float,
    ) -> None:
        self.loop = loop
        self.fn = fn
        self.args = args
        self.kwargs = kwargs
        self.options = options
        # Loop time; ``deadline`` is the one the next attempt is bound by, and
        # ``final_deadline`` the one no retry may pass.
        self.deadline = deadline
        self.final_deadline = deadline
        self.task: asyncio.Task[Any] | None = None
        self.expired = False
        self.attempts = 0
        # The CircuitOpenError / BulkheadFullError this pipeline raised itself, to
        # tell it from the same errors raised by another pipeline inside the callee.
        self.rejection: BaseException | None = None
        self.outcome: str | None = None

    def expire(self) -> None:
        """Timer callback: the deadline passed; cancel the attempt in progress."""
        self.expired = True
        if self.task is not None:
            self.task.cancel()


class _Layer(Protocol):
    async def run(self, call: _Call) -> Any: ...


class _Invoke:
    """The innermost step: call the dependency, under the one deadline of this attempt."""

    __slots__ = ("alarms", "timeout")

    def __init__(self, timeout: float) -> None:
        # The timeouts declared right around the call, folded into this step.
        self.timeout = timeout
        self.alarms: Alarms | None = None

    async def run(self, call: _Call) -> Any:
        call.attempts += 1
        deadline = call.deadline
        fn = call.fn
        assert fn is not None  # noqa: S101 -- only blocks (async with) have no function
        if deadline == _INF and not self.timeout:
            return await fn(*call.args, **call.kwargs)
        loop = call.loop
        now = loop.time()
        if self.timeout and now + self.timeout < deadline:
            deadline = now + self.timeout
        if deadline <= now:
            raise OutOfTime(called=False, final=deadline >= call.final_deadline)
        task = call.task
        if task is None:
            task = call.task = asyncio.current_task()
            assert task is not None  # noqa: S101 -- a running coroutine always has its task
        # As asyncio.timeout does: cancellations requested by others before this
        # deadline are left to propagate; only the one it makes becomes a timeout.
        cancelling = task.cancelling()
        call.expired = False
        alarms = self.alarms
        if alarms is None or alarms.loop is not loop:
            alarms = self.alarms = Alarms(loop)
        alarm = alarms.add(deadline, call)
        try:
            result = await fn(*call.args, **call.kwargs)
        except asyncio.CancelledError:
            alarms.remove(alarm)
            if call.expired and task.uncancel() <= cancelling:
                raise OutOfTime(called=True, final=deadline >= call.final_deadline) from None
            raise
        except BaseException:
            alarms.remove(alarm)
            if call.expired:
                task.uncancel()
            raise
        alarms.remove(alarm)
        if call.expired:
            # Fired in the turn the callee finished, and the callee swallowed it.
            task.uncancel()
        return result


class _Deadline:
    """A timeout that starts after some waiting layer (a bulkhead queue, a retry)."""

    __slots__ = ("final", "inner", "seconds")

    def __init__(self, inner: _Layer, seconds: float, *, final: bool) -> None:
        self.inner = inner
        self.seconds = seconds
        self.final = final

    async def run(self, call: _Call) -> Any:
        deadline, final_deadline = call.deadline, call.final_deadline
        own = call.loop.time() + self.seconds
        if own < deadline:
            call.deadline = own
        if self.final and own < final_deadline:
            call.final_deadline = own
        try:
            return await self.inner.run(call)
        finally:
            call.deadline, call.final_deadline = deadline, final_deadline


class _Breaker:
    """Ask the circuit before the inner layers run; tell it how they ended."""

    __slots__ = ("breaker", "clock", "inner")

    def __init__(self, inner: _Layer, breaker: CircuitBreaker, clock: Callable[[], float]) -> None:
        self.inner = inner
        self.breaker = breaker
        self.clock = clock

    async def run(self, call: _Call) -> Any:
        breaker = self.breaker
        try:
            breaker.acquire()
        except CircuitOpenError as exc:
            call.rejection = exc
            raise
        clock = self.clock
        started = clock()
        try:
            result = await self.inner.run(call)
        except BaseException as exc:
            if _dependency_failed(exc):
                breaker.record_failure(clock() - started)
            else:
                breaker.record_ignored()
            raise
        is_failure = call.options.is_failure
        if is_failure is None:
            breaker.record_success(clock() - started)
            return result
        try:
            failed = is_failure(result)
        except BaseException:
            breaker.record_ignored()
            raise
        if failed:
            breaker.record_failure(clock() - started)
        else:
            breaker.record_success(clock() - started)
        return result


class _Bulkhead:
    """Hold a bulkhead slot while the inner layers run."""

    __slots__ = ("bulkhead", "inner")

    def __init__(self, inner: _Layer, bulkhead: Bulkhead) -> None:
        self.inner = inner
        self.bulkhead = bulkhead

    async def run(self, call: _Call) -> Any:
        bulkhead = self.bulkhead
        if not bulkhead.try_acquire():
            await _wait_for_slot(bulkhead, call)
        try:
            return await self.inner.run(call)
        finally:
            bulkhead.release()


class _Fallback:
    """Answer a failed call with the caller's fallback."""

    __slots__ = ("inner", "pipeline")

    def __init__(self, inner: _Layer, pipeline: Pipeline) -> None:
        self.inner = inner
        self.pipeline = pipeline

    async def run(self, call: _Call) -> Any:
        try:
            return await self.inner.run(call)
        except BaseException as exc:
            error = self.pipeline._conclude(call, exc)
            if error is None:
                raise
        return await self.pipeline._fall_back(call, error)


class _Retry:
    """Retry transient failures of safe operations, with full-jitter backoff, within the budget."""

    __slots__ = (
        "backoff_max",
        "budget",
        "exhausted",
        "inner",
        "jitter",
        "name",
        "retried",
        "retries",
        "sleep",
        "unsafe",
    )

    def __init__(
        self,
        inner: _Layer,
        name: str,
        policy: Policy,
        budget: RetryBudget,
        sleep: Callable[[float], Awaitable[None]],
    ) -> None:
        self.inner = inner
        self.name = name
        self.retries = policy.retries
        self.backoff_max = policy.backoff_max
        self.unsafe = policy.retry_unsafe
        self.budget = budget
        self.sleep = sleep
        # Stateless, so one serves every call: sleep n (0-based) is uniform in
        # [0, min(backoff_max, backoff_initial * 2**n)].
        self.jitter = wait_random_exponential(
            multiplier=policy.backoff_initial, max=policy.backoff_max
        )
        self.retried = RETRIES.labels(name)
        self.exhausted = RETRY_BUDGET_EXHAUSTED.labels(name)

    async def run(self, call: _Call) -> Any:
        try:
            result = await self.inner.run(call)
        except BaseException as exc:
            if not self._retryable(call, exc):
                raise
            failure: BaseException | None = exc
            result = None
        else:
            is_failure = call.options.is_failure
            if is_failure is None or not is_failure(result) or not self._safe(call, None):
                return result
            failure = None
        return await self._retry(call, failure, result)

    async def _retry(self, call: _Call, failure: BaseException | None, result: Any) -> Any:
        replayed = False

        async def attempt() -> Any:
            # tenacity numbers attempts from the first; the first, already made,
            # is replayed so its outcome goes through the same decisions.
            nonlocal replayed
            if not replayed:
                replayed = True
                if failure is not None:
                    raise failure
                return result
            return await self.inner.run(call)

        retrying = AsyncRetrying(
            retry=functools.partial(self._should_retry, call),
            wait=functools.partial(self._wait, call),
            stop=functools.partial(self._should_stop, call),
            before_sleep=functools.partial(self._before_sleep, call),
            retry_error_callback=_last_outcome,
            sleep=self.sleep,
        )
        return await retrying(attempt)

    def _retryable(self, call: _Call, exc: BaseException) -> bool:
        if not isinstance(exc, Exception) or not is_transient(exc):
            return False
        if isinstance(exc, OutOfTime) and exc.final:
            return False
        return self._safe(call, exc)

    def _safe(self, call: _Call, exc: BaseException | None) -> bool:
        """Whether repeating the operation cannot do it twice."""
        return call.options.idempotent or self.unsafe or (exc is not None and never_reached(exc))

    def _should_retry(self, call: _Call, state: RetryCallState) -> bool:
        outcome = state.outcome
        assert outcome is not None  # noqa: S101 -- tenacity decides after an attempt
        if outcome.failed:
            exc = outcome.exception()
            return exc is not None and self._retryable(call, exc)
        is_failure = call.options.is_failure
        return (
            is_failure is not None and bool(is_failure(outcome.result())) and self._safe(call, None)
        )

    def _wait(self, call: _Call, state: RetryCallState) -> float:
        hint = call.options.retry_after
        if hint is not None:
            outcome = state.outcome
            assert outcome is not None  # noqa: S101 -- tenacity waits after an attempt
            seconds = hint(outcome.exception() if outcome.failed else outcome.result())
            if seconds is not None:
                return max(0.0, float(seconds))
        return float(self.jitter(state))

    def _should_stop(self, call: _Call, state: RetryCallState) -> bool:
        if state.attempt_number > self.retries:
            return True
        wait = state.upcoming_sleep
        # A Retry-After longer than any backoff, or a wait that ends past the
        # call's deadline: the caller is better served by the failure now.
        if wait > self.backoff_max or call.loop.time() + wait >= call.final_deadline:
            return True
        if not self.budget.try_withdraw():
            self.exhausted.inc()
            logger.debug("retry budget exhausted", dependency=self.name)
            return True
        return False

    def _before_sleep(self, call: _Call, state: RetryCallState) -> None:
        self.retried.inc()
        outcome = state.outcome
        exc = outcome.exception() if outcome is not None and outcome.failed else None
        logger.debug(
            "retrying dependency call",
            dependency=self.name,
            attempt=state.attempt_number,
            wait_s=round(state.upcoming_sleep, 4),
            error=type(exc).__name__ if exc is not None else "failed result",
        )


def _last_outcome(state: RetryCallState) -> Any:
    """What a call that stopped retrying ends with: its last result, or its last error raised."""
    assert state.outcome is not None  # noqa: S101 -- tenacity stops after an attempt
    return state.outcome.result()


def _dependency_failed(exc: BaseException) -> bool:
    """Whether ``exc`` counts against the circuit: the dependency's fault, and it was called."""
    if isinstance(exc, OutOfTime):
        return exc.called
    return isinstance(exc, Exception) and is_transient(exc)


async def _wait_for_slot(bulkhead: Bulkhead, call: _Call) -> None:
    deadline = call.deadline
    try:
        await bulkhead.acquire(None if deadline == _INF else deadline - call.loop.time())
    except BulkheadFullError as exc:
        call.rejection = exc
        raise
    except TimeoutError:
        raise OutOfTime(called=False, final=deadline >= call.final_deadline) from None


class _Block:
    """One ``async with pipeline:`` block in progress."""

    __slots__ = ("breaker", "bulkhead", "call", "cancelling", "outer", "started", "timer")

    def __init__(self, call: _Call, outer: _Block | None) -> None:
        self.call = call
        self.outer = outer
        self.breaker: CircuitBreaker | None = None
        self.bulkhead: Bulkhead | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.cancelling = 0
        self.started = 0.0


# Blocks are entered on the shared pipeline, so their state is kept per task
# (each task has its own context), innermost last.
_blocks: ContextVar[_Block | None] = ContextVar("bastion_resilience_block", default=None)


class Pipeline:
    """The resilience pipeline of one named dependency.

    One instance serves every call to its dependency, concurrently: the state of
    a call lives in the call. Get pipelines from the registry
    (:func:`bastion.resilience.pipeline`), which builds each from the settings
    and gives pipelines that share a circuit the same breaker.

    Three forms:

    * ``await pipeline.call(fn, *args, **kwargs)``: the full pipeline around
      ``fn(*args, **kwargs)``;
    * ``@pipeline`` on an ``async def``: the same, at every call of the function;
    * ``async with pipeline:``: one guarded attempt around a block (circuit,
      bulkhead, one deadline), never retried since a block cannot be re-run.

    Options that are not the callee's arguments go through :meth:`with_options`.

    Args:
        name: the dependency's name (metric label, error attribute, log field).
        policy: every setting, resolved (:func:`bastion.resilience.resolve_policy`).
        breaker: the circuit this pipeline reports to; ``None`` for none.
        clock: monotonic seconds, for call durations and the retry budget.
            Deadlines run on the event loop's clock.
        sleep: awaited with each backoff; tests pass one that does not sleep.

    Raises:
        ValueError: an empty name, an unknown or repeated strategy in
            ``policy.order``, or a negative duration or count in ``policy``.

    Example:
        >>> llm = Pipeline("llm", default_policy("llm", "http"), breaker=None)
        >>> answer = await llm.call(client.post, "/v1/chat/completions", json=body)
        >>> @llm.with_options(fallback=keyword_answer)
        ... async def ask(question: str) -> Answer: ...
    """

    def __init__(
        self,
        name: str,
        policy: Policy,
        *,
        breaker: CircuitBreaker | None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        _validate(name, policy)
        self.name = name
        self.policy = policy
        order = [strategy for strategy in policy.order if _enabled(strategy, policy, breaker)]
        self.breaker: CircuitBreaker | None = breaker if "circuit_breaker" in order else None
        self.bulkhead: Bulkhead | None = (
            Bulkhead(policy.max_concurrent, policy.max_queue, policy.queue_timeout, name=name)
            if "bulkhead" in order
            else None
        )
        self.budget: RetryBudget | None = (
            RetryBudget(policy.retry_budget_ratio, policy.retry_budget_min_per_second, clock=clock)
            if "retry" in order
            else None
        )
        self._clock = clock
        self._sleep = sleep
        self._metrics = {outcome: RESILIENCE_CALLS.labels(name, outcome) for outcome in _OUTCOMES}
        self._success = self._metrics["success"]
        self._fallbacks = RESILIENCE_FALLBACKS.labels(name)

        # Timeouts outside anything that waits start with the call: they are
        # applied when it starts. Those right around the call are applied by its
        # last step. Neither costs a layer.
        leading = 0
        while leading < len(order) and order[leading] in _INSTANT:
            leading += 1
        trailing = len(order)
        while trailing > leading and order[trailing - 1] in _DEADLINES:
            trailing -= 1
        self._call_timeout = _shortest(order[:leading], policy)
        retry_at = order.index("retry") if "retry" in order else len(order)
        inner: _Layer = _Invoke(_shortest(order[trailing:], policy))
        with_fallback: _Layer | None = None
        for position in range(len(order) - 1, -1, -1):
            strategy = order[position]
            if strategy == "fallback":
                with_fallback = _Fallback(inner, self)
                continue
            if position < leading and strategy in _DEADLINES:
                continue
            if position >= trailing:
                continue
            inner = self._layer(strategy, inner, final=position < retry_at)
            if with_fallback is not None:
                with_fallback = self._layer(strategy, with_fallback, final=position < retry_at)
        self._head: _Layer = inner
        # A fallback left out of the order is off: the caller's fallback is not used.
        self._head_with_fallback: _Layer = with_fallback or inner
        # The block form's steps, in the declared order.
        self._block_steps = [s for s in order if s in ("circuit_breaker", "bulkhead")]
        self._block_timeout = _shortest(order, policy)

    def __repr__(self) -> str:
        return f"Pipeline({self.name!r}, order={self.policy.order!r})"

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn(*args, **kwargs)`` through the pipeline.

        Args:
            fn: an async function (or anything returning an awaitable).
            *args: passed to ``fn``.
            **kwargs: passed to ``fn``.

        Returns:
            What ``fn`` returned.

        Raises:
            CircuitOpenError: the circuit is open (503, ``Retry-After``).
            BulkheadFullError: too many calls in progress and waiting (503).
            DependencyTimeoutError: no answer in the time allowed (503).
            DependencyError: a transient failure on every attempt allowed (502),
                the last one chained.
            BaseException: anything else ``fn`` raised, unchanged.

        Example:
            >>> row = await pipeline("database").call(fetch_user, user_id)
        """
        return await self._run(_DEFAULTS, fn, args, kwargs)

    def with_options(
        self,
        *,
        fallback: Callable[[BaseException], Awaitable[Any]] | None = None,
        idempotent: bool = True,
        is_failure: Callable[[Any], bool] | None = None,
        retry_after: Callable[[Any], float | None] | None = None,
    ) -> PipelineCall:
        """Return this pipeline bound to per-call options (cheap: make one per call if you like).

        Args:
            fallback: awaited with the error when the call would raise
                ``DependencyError``, ``DependencyTimeoutError``,
                ``CircuitOpenError`` or ``BulkheadFullError``; what it returns
                is the call's result. Not used for other errors nor for
                cancellation, nor when ``fallback`` is left out of the order.
            idempotent: whether the operation may safely run twice. When
                ``False``, only failures that prove the dependency was never
                reached are retried (unless the policy's ``retry_unsafe``).
            is_failure: marks a result as a transient failure (an HTTP 503):
                retried like one, counted against the circuit; when no retry
                is left that last result is returned, counted as a failure.
            retry_after: gets each failed attempt's result or exception and
                may return the seconds the dependency asked to wait
                (``Retry-After``); that wait replaces the backoff, and one
                longer than ``backoff_max`` or past the deadline ends the call.

        Returns:
            A :class:`PipelineCall`: ``.call(fn, ...)``, a decorator, and ``async with``.

        Raises:
            TypeError: an option that should be callable is not.
        """
        # Typed as callables, but callers may be untyped: check, as a message beats a late crash.
        given: tuple[object, ...] = (fallback, is_failure, retry_after)
        for option in given:
            if option is not None and not callable(option):
                _not_callable(fallback=fallback, is_failure=is_failure, retry_after=retry_after)
        return PipelineCall(self, _Options(fallback, idempotent, is_failure, retry_after))

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function so every call of it goes through the pipeline.

        Raises:
            TypeError: ``fn`` is not an ``async def`` function.
        """
        return _decorate(self, _DEFAULTS, fn)

    async def __aenter__(self) -> None:
        """Enter one guarded attempt (see :meth:`PipelineCall.__aenter__`)."""
        await self._enter(_DEFAULTS)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._exit(exc)

    # -- the call ------------------------------------------------------------

    async def _run(
        self,
        options: _Options,
        fn: Callable[..., Awaitable[T]],
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
    ) -> T:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._call_timeout if self._call_timeout else _INF
        context = current_context()
        if context is not None and context.deadline is not None and context.deadline < deadline:
            deadline = context.deadline
        call = _Call(loop, fn, args, kwargs, options, deadline)
        if self.budget is not None:
            self.budget.deposit()
        head = self._head if options.fallback is None else self._head_with_fallback
        try:
            result: T = await head.run(call)
        except BaseException as exc:
            error = self._conclude(call, exc) if call.outcome is None else None
            if call.outcome is not None:
                self._metrics[call.outcome].inc()
            if error is None or error is exc:
                raise
            raise error from exc
        if call.outcome is not None:
            # The fallback answered.
            self._metrics[call.outcome].inc()
        elif options.is_failure is not None and options.is_failure(result):
            self._metrics["failure"].inc()
            self._log_failure(call, "failure", "failed result")
        else:
            self._success.inc()
        return result

    def _conclude(self, call: _Call, exc: BaseException) -> BaseException | None:
        """Decide how a failed call ends; ``None`` when ``exc`` is to pass through unchanged.

        Sets ``call.outcome`` and logs the failure, once per call.
        """
        if exc is call.rejection:
            call.outcome = "circuit_open" if isinstance(exc, CircuitOpenError) else "bulkhead_full"
            logger.debug("dependency call refused", dependency=self.name, outcome=call.outcome)
            return exc
        if not isinstance(exc, Exception) or not is_transient(exc):
            return None
        error: DependencyError
        if is_timeout(exc):
            call.outcome = "timeout"
            error = DependencyTimeoutError(self.name)
        else:
            call.outcome = "failure"
            error = DependencyError(self.name)
        error.__cause__ = exc
        self._log_failure(call, call.outcome, type(exc).__name__)
        return error

    def _log_failure(self, call: _Call, outcome: str, error: str) -> None:
        # The class name only: a driver's message may carry a DSN, a query or a secret.
        logger.warning(
            "dependency call failed",
            dependency=self.name,
            outcome=outcome,
            attempts=call.attempts,
            error=error,
        )

    async def _fall_back(self, call: _Call, error: BaseException) -> Any:
        fallback = call.options.fallback
        assert fallback is not None  # noqa: S101 -- the fallback layer runs only with one
        self._fallbacks.inc()
        answer = fallback(error)
        if not inspect.isawaitable(answer):
            raise TypeError(
                f"the fallback of {self.name!r} must be an async function; "
                f"it returned {type(answer).__name__}"
            )
        return await answer

    def _layer(self, strategy: Strategy, inner: _Layer, *, final: bool) -> _Layer:
        policy = self.policy
        if strategy == "retry":
            assert self.budget is not None  # noqa: S101 -- made when retry is in the order
            return _Retry(inner, self.name, policy, self.budget, self._sleep)
        if strategy == "circuit_breaker":
            assert self.breaker is not None  # noqa: S101 -- in the order only with a breaker
            return _Breaker(inner, self.breaker, self._clock)
        if strategy == "bulkhead":
            assert self.bulkhead is not None  # noqa: S101 -- made when in the order
            return _Bulkhead(inner, self.bulkhead)
        seconds = policy.timeout if strategy == "timeout" else policy.total_timeout
        return _Deadline(inner, seconds, final=final)

    # -- the block form ------------------------------------------------------

    async def _enter(self, options: _Options) -> None:
        if options.fallback is not None:
            raise TypeError(
                f"{self.name!r}: a fallback needs a value to return; use "
                "with_options(...).call(fn) or the decorator form, not async with"
            )
        loop = asyncio.get_running_loop()
        now = loop.time()
        deadline = now + self._block_timeout if self._block_timeout else _INF
        context = current_context()
        if context is not None and context.deadline is not None and context.deadline < deadline:
            deadline = context.deadline
        call = _Call(loop, None, (), {}, options, deadline)
        block = _Block(call, _blocks.get())
        if self.budget is not None:
            self.budget.deposit()
        try:
            await self._guard(block)
        except BaseException as exc:
            self._release(block, exc)
            error = self._conclude(call, exc)
            if call.outcome is not None:
                self._metrics[call.outcome].inc()
            if error is None or error is exc:
                raise
            raise error from exc
        call.attempts = 1
        if call.deadline != _INF:
            task = asyncio.current_task()
            assert task is not None  # noqa: S101 -- a running coroutine always has its task
            call.task = task
            block.cancelling = task.cancelling()
            block.timer = loop.call_at(call.deadline, call.expire)
        block.started = self._clock()
        _blocks.set(block)

    async def _guard(self, block: _Block) -> None:
        """Pass the block's circuit and bulkhead, in the declared order."""
        call = block.call
        for step in self._block_steps:
            if step == "circuit_breaker":
                assert self.breaker is not None  # noqa: S101 -- a step only with a breaker
                try:
                    self.breaker.acquire()
                except CircuitOpenError as exc:
                    call.rejection = exc
                    raise
                block.breaker = self.breaker
            else:
                assert self.bulkhead is not None  # noqa: S101 -- a step only with a bulkhead
                if not self.bulkhead.try_acquire():
                    await _wait_for_slot(self.bulkhead, call)
                block.bulkhead = self.bulkhead
        if call.deadline <= call.loop.time():
            raise OutOfTime(called=False, final=True)

    def _exit(self, exc: BaseException | None) -> None:
        block = _blocks.get()
        if block is None:
            raise RuntimeError(f"{self.name!r}: __aexit__ without __aenter__")
        _blocks.set(block.outer)
        call = block.call
        if block.timer is not None:
            block.timer.cancel()
        if call.expired:
            assert call.task is not None  # noqa: S101 -- set with the timer
            if call.task.uncancel() <= block.cancelling and isinstance(exc, asyncio.CancelledError):
                exc = OutOfTime(called=True, final=True)
        self._release(block, exc)
        if exc is None:
            self._success.inc()
            return
        error = self._conclude(call, exc)
        if call.outcome is not None:
            self._metrics[call.outcome].inc()
        if error is not None:
            raise error from exc

    def _release(self, block: _Block, exc: BaseException | None) -> None:
        if block.bulkhead is not None:
            block.bulkhead.release()
        if block.breaker is not None:
            duration = self._clock() - block.started
            if exc is None:
                block.breaker.record_success(duration)
            elif _dependency_failed(exc):
                block.breaker.record_failure(duration)
            else:
                block.breaker.record_ignored()


class PipelineCall:
    """A pipeline bound to per-call options (:meth:`Pipeline.with_options`).

    Attributes:
        pipeline: the pipeline the calls go through.
    """

    __slots__ = ("_options", "pipeline")

    def __init__(self, pipeline: Pipeline, options: _Options) -> None:
        self.pipeline = pipeline
        self._options = options

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Call ``fn(*args, **kwargs)`` through the pipeline with these options.

        See :meth:`Pipeline.call`.
        """
        return await self.pipeline._run(self._options, fn, args, kwargs)

    def __call__(self, fn: Callable[P, Awaitable[T]]) -> Callable[P, Coroutine[Any, Any, T]]:
        """Decorate an async function: its calls go through the pipeline with these options.

        Raises:
            TypeError: ``fn`` is not an ``async def`` function.
        """
        return _decorate(self.pipeline, self._options, fn)

    async def __aenter__(self) -> None:
        """Enter one guarded attempt: the circuit, a bulkhead slot, one deadline.

        The deadline is the shortest of the attempt timeout, the total timeout
        and the request's remaining budget; when it passes, the block is
        cancelled and ``DependencyTimeoutError`` raised from it. A block is never
        retried. Errors leave it as from :meth:`Pipeline.call`.

        Raises:
            CircuitOpenError: the circuit is open; the block does not run.
            BulkheadFullError: no slot; the block does not run.
            DependencyTimeoutError: no time is left; the block does not run.
            TypeError: a ``fallback`` was given (a block returns no value to replace).
        """
        await self.pipeline._enter(self._options)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.pipeline._exit(exc)


def _decorate(
    pipeline: Pipeline, options: _Options, fn: Callable[P, Awaitable[T]]
) -> Callable[P, Coroutine[Any, Any, T]]:
    if not inspect.iscoroutinefunction(fn):
        raise TypeError(
            f"{pipeline.name!r} decorates async functions (async def), "
            f"not {getattr(fn, '__qualname__', type(fn).__name__)}"
        )
    run = pipeline._run

    @functools.wraps(fn)
    async def protected(*args: P.args, **kwargs: P.kwargs) -> T:
        return await run(options, fn, args, kwargs)

    return protected


def _not_callable(**options: object) -> None:
    for option, value in options.items():
        if value is not None and not callable(value):
            raise TypeError(f"{option} must be callable, not {type(value).__name__}")


def _enabled(strategy: Strategy, policy: Policy, breaker: CircuitBreaker | None) -> bool:
    if strategy == "timeout":
        return policy.timeout > 0
    if strategy == "total_timeout":
        return policy.total_timeout > 0
    if strategy == "retry":
        return policy.retries > 0
    if strategy == "circuit_breaker":
        return breaker is not None
    if strategy == "bulkhead":
        return policy.max_concurrent > 0
    return True


def _shortest(strategies: list[Strategy], policy: Policy) -> float:
    """The shortest timeout among ``strategies``; 0 when none is a timeout."""
    seconds = [
        policy.timeout if strategy == "timeout" else policy.total_timeout
        for strategy in strategies
        if strategy in _DEADLINES
    ]
    return min(seconds, default=0.0)


def _validate(name: str, policy: Policy) -> None:
    if not name:
        raise ValueError("a pipeline needs a name")
    unknown = [s for s in policy.order if s not in _STRATEGIES]
    if unknown:
        raise ValueError(
            f"pipeline {name!r}: unknown strategies {unknown} in order; "
            f"the strategies are {sorted(_STRATEGIES)}"
        )
    if len(set(policy.order)) != len(policy.order):
        raise ValueError(f"pipeline {name!r}: order names a strategy twice: {policy.order}")
    negative = [
        field
        for field in (
            "timeout",
            "total_timeout",
            "retries",
            "backoff_initial",
            "backoff_max",
            "retry_budget_ratio",
            "retry_budget_min_per_second",
            "max_concurrent",
            "max_queue",
            "queue_timeout",
        )
        if getattr(policy, field) < 0
    ]
    if negative:
        raise ValueError(f"pipeline {name!r}: negative {', '.join(negative)}")
