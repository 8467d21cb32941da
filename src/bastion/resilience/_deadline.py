"""Request deadlines: each request's time budget, what remains of it, and how it is enforced.

Every request gets ``RequestContext.deadline = loop.time() + request_deadline``
from the request middleware; a route can have its own (``route_deadlines`` in
the settings, or :func:`request_deadline` on its endpoint). Outbound calls read
what remains with :func:`remaining_time` and make it their total timeout.

Enforcement costs no timer per request (an ``asyncio.timeout`` costs ~5.6 µs a
request here). The middleware records each request's task in
:attr:`RequestDeadlines.inflight`; one sweeper task per app wakes every
``min(0.1 s, shortest deadline / 10)`` and cancels the tasks whose deadline has
passed, marking them in :attr:`RequestDeadlines.expired` so the middleware can
tell a deadline from a shutdown or a client going away, and answer ``504
REQUEST_TIMEOUT``. A request is therefore stopped between its deadline and one
sweep interval after it.

A request still unwinding :data:`GRACE` seconds after a cancellation is
cancelled again, and so on until it ends: asyncio delivers one cancellation
where the deadline means "stop now", and cleanup code that waits (SQLAlchemy
closes a connection it invalidates gracefully, shielded, for up to 2 s) would
otherwise hold the 504 back.

Per-route deadlines cost other routes nothing: they are resolved once at
start-up, and only the matched routes' ``handle`` is wrapped to re-set the
deadline when the router hands them the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import timedelta
from typing import Any, Final, TypeVar

import structlog
from starlette.routing import BaseRoute, Host, Mount, WebSocketRoute
from starlette.types import Receive, Scope, Send

from bastion.context import RequestContext, current_context
from bastion.errors import ConfigurationError
from bastion.observability._metrics import HTTP_DEADLINE_EXCEEDED

__all__ = ["DEADLINE_CANCEL_MESSAGE", "RequestDeadlines", "remaining_time", "request_deadline"]

logger = structlog.get_logger("bastion.resilience")

E = TypeVar("E")

DEADLINE_CANCEL_MESSAGE: Final = "bastion: request deadline exceeded"
"""The message of the cancellation a request gets when its deadline passes."""

_ATTRIBUTE: Final = "__bastion_request_deadline__"
# Longest and shortest sweep interval: the longest bounds how late a 30 s deadline
# is enforced; the shortest keeps a tiny route deadline from making a busy loop.
_SWEEP_MAX: Final = 0.1
_SWEEP_MIN: Final = 0.005
GRACE: Final = 0.1
"""Seconds a cancelled request may spend unwinding before it is cancelled again."""
_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT", "QUERY"}
)
_ANY_METHOD: Final = "*"


def remaining_time() -> float | None:
    """Return the seconds left before the current request's deadline (never negative).

    ``None`` outside a request, or when the request has no deadline: the caller's
    own timeouts then apply alone.

    Example:
        >>> budget = remaining_time()
        >>> timeout = 10.0 if budget is None else min(10.0, budget)
    """
    context = current_context()
    if context is None or context.deadline is None:
        return None
    return max(0.0, context.deadline - asyncio.get_running_loop().time())


def request_deadline(seconds: float | timedelta) -> Callable[[E], E]:
    """Give an endpoint its own request deadline instead of ``resilience.request_deadline``.

    The endpoint is returned unchanged (FastAPI still reads its signature); the
    deadline is found on it when the app starts, so the decorator may sit above
    or below the route decorator. A ``route_deadlines`` entry in the settings
    for the same route wins, so operators can change it without a release.
    Works on FastAPI and Starlette endpoints: functions and ``HTTPEndpoint``
    classes.

    Example:
        >>> @app.post("/v1/reports")
        ... @request_deadline(120)
        ... async def build_report(spec: ReportSpec) -> Report: ...

    Args:
        seconds: the deadline, counted from when the router hands the request
            to the route; 0 for none.

    Raises:
        ValueError: ``seconds`` is negative or not finite.
        TypeError: what is decorated cannot carry the deadline (not a function
            or a class).
    """
    value = _seconds(seconds, "request_deadline")

    def mark(endpoint: E) -> E:
        try:
            setattr(endpoint, _ATTRIBUTE, value)
        except (AttributeError, TypeError):
            raise TypeError(
                f"@request_deadline decorates endpoint functions or classes, not {endpoint!r}"
            ) from None
        return endpoint

    return mark


def _seconds(value: float | timedelta, what: str) -> float:
    seconds = value.total_seconds() if isinstance(value, timedelta) else float(value)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what} must be a finite number of seconds >= 0, not {value!r}")
    return seconds


def _parse_key(key: str) -> tuple[str, str]:
    """Split a ``route_deadlines`` key into (method or ``*``, template)."""
    method, _, template = key.strip().rpartition(" ")
    method = method.strip().upper() or _ANY_METHOD
    if not template.startswith("/") or (method != _ANY_METHOD and method not in _METHODS):
        raise ConfigurationError(
            f"resilience.route_deadlines: {key!r} is not a route template "
            "('/v1/items/{id}') or 'METHOD template' ('POST /v1/items')"
        )
    return method, template


class RequestDeadlines:
    """The deadlines of one app's requests, and the sweeper that enforces them.

    ``install`` makes one per app when resilience is on and hands it to the
    request middleware; its start-up hook calls :meth:`start`.

    Args:
        default: seconds a request may take; 0 for no deadline.
        routes: per-route deadlines by ``template`` or ``METHOD template``.

    Attributes:
        default: seconds a request may take unless its route says otherwise.
        active: whether any deadline applies (set at start-up); the middleware
            tracks nothing while it is off.
        clock: the event loop's clock (``loop.time``).
        current_task: returns the task of the request being served.
        inflight: the task and context of each request in progress.
        expired: the tasks cancelled because their deadline passed, with how
            many times each was.
        interval: seconds between two sweeps.

    Raises:
        ConfigurationError: a ``routes`` key is not a template or ``METHOD template``.
    """

    def __init__(self, default: float, routes: Mapping[str, float] | None = None) -> None:
        self.default = _seconds(default, "resilience.request_deadline")
        self._routes: dict[tuple[str, str], float] = {}
        for key, seconds in (routes or {}).items():
            self._routes[_parse_key(key)] = _seconds(seconds, f"route_deadlines[{key!r}]")
        self.active = False
        self.clock: Callable[[], float] = _loop_clock
        self.current_task: Callable[[], asyncio.Task[Any] | None] = asyncio.current_task
        self.inflight: dict[asyncio.Task[Any], RequestContext] = {}
        self.expired: dict[asyncio.Task[Any], int] = {}
        self.interval = _SWEEP_MAX
        self._sweeper: asyncio.Task[None] | None = None
        self._wrapped: list[tuple[Any, bool, Any]] = []
        self._counters: dict[str, Any] = {}

    async def start(self, routes: Sequence[BaseRoute]) -> None:
        """Resolve the per-route deadlines of ``routes`` and start the sweeper.

        Args:
            routes: the app's routes (``app.router.routes``), complete by now.
        """
        loop = asyncio.get_running_loop()
        self.clock = loop.time
        self.current_task = _task_finder(loop)
        overrides = self._apply(routes)
        shortest = min((s for s in (self.default, *overrides) if s > 0), default=0.0)
        self.active = shortest > 0
        if self.active:
            self.interval = max(_SWEEP_MIN, min(_SWEEP_MAX, shortest / 10))
            self._sweeper = asyncio.get_running_loop().create_task(
                self._sweep(), name="bastion request deadlines"
            )

    async def stop(self) -> None:
        """Stop the sweeper and put the wrapped routes back as they were."""
        self.active = False
        sweeper, self._sweeper = self._sweeper, None
        if sweeper is not None:
            sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await sweeper
        for route, had_own, previous in reversed(self._wrapped):
            if had_own:
                route.handle = previous
            else:
                with contextlib.suppress(AttributeError):
                    del route.handle
        self._wrapped.clear()

    def claim(self, task: asyncio.Task[Any]) -> bool:
        """Return whether ``task`` ended because its deadline passed, taking the cancellations back.

        The middleware calls it when the request ended in an exception. A task
        cancelled for another reason too (shutdown) is still cancelled afterwards,
        and that is not the deadline's.
        """
        cancels = self.expired.pop(task, 0)
        if not cancels:
            return False
        remaining = 0
        for _ in range(cancels):
            remaining = task.uncancel()
        return remaining == 0

    def release(self, task: asyncio.Task[Any]) -> None:
        """Take back the deadline's cancellations of a request that ended without raising.

        The app swallowed them. The middleware has taken the request out of
        :attr:`inflight` already.
        """
        for _ in range(self.expired.pop(task, 0)):
            task.uncancel()

    def exceeded(self, route: str) -> None:
        """Count a request answered 504 because its deadline passed."""
        counter = self._counters.get(route)
        if counter is None:
            counter = self._counters[route] = HTTP_DEADLINE_EXCEEDED.labels(route)
        counter.inc()

    async def _sweep(self) -> None:
        inflight, expired, clock = self.inflight, self.expired, self.clock
        while True:
            await asyncio.sleep(self.interval)
            now = clock()
            # No await in this loop: the dict cannot change under the iteration,
            # and cancel() only schedules the CancelledError.
            for task, context in inflight.items():
                deadline = context.deadline
                if deadline is None or deadline > now:
                    continue
                cancels = expired.get(task, 0)
                if deadline + cancels * GRACE <= now:
                    expired[task] = cancels + 1
                    task.cancel(DEADLINE_CANCEL_MESSAGE)

    def _apply(self, routes: Sequence[BaseRoute]) -> list[float]:
        """Wrap the routes that have their own deadline; return those deadlines."""
        used: set[tuple[str, str]] = set()
        plans: dict[int, tuple[Any, dict[str, dict[str, float]]]] = {}
        for target, template, methods, endpoint in _endpoints(routes):
            plan: dict[str, float] = {}
            marked = _marked(endpoint)
            if marked is not None:
                plan[_ANY_METHOD] = marked
            for key in ((_ANY_METHOD, template), *((m, template) for m in methods or _METHODS)):
                seconds = self._routes.get(key)
                if seconds is not None:
                    plan[key[0]] = seconds
                    used.add(key)
            if plan:
                plans.setdefault(id(target), (target, {}))[1][template] = plan
        unused = sorted(f"{m} {t}" if m != _ANY_METHOD else t for m, t in set(self._routes) - used)
        if unused:
            logger.warning("route deadlines name no route", routes=unused)
        for target, by_template in plans.values():
            self._wrap(target, by_template)
        return [
            seconds
            for _, by_template in plans.values()
            for plan in by_template.values()
            for seconds in plan.values()
        ]

    def _wrap(self, route: Any, by_template: dict[str, dict[str, float]]) -> None:
        had_own = "handle" in vars(route)
        inner = route.handle
        only = next(iter(by_template.values())) if len(by_template) == 1 else None
        deadlines = self

        async def handle(scope: Scope, receive: Receive, send: Send) -> None:
            plan = only if only is not None else by_template.get(_template(scope) or "", {})
            seconds = plan.get(scope["method"])
            if seconds is None:
                seconds = plan.get(_ANY_METHOD)
            if seconds is not None:
                context = current_context()
                if context is not None:
                    context.deadline = deadlines.clock() + seconds if seconds else None
            await inner(scope, receive, send)

        # The router looks ``handle`` up on the route object per request, so an
        # instance attribute takes over; FastAPI's included routers call the
        # original APIRoute's handle too.
        route.handle = handle
        self._wrapped.append((route, had_own, inner if had_own else None))


def _loop_clock() -> float:
    return asyncio.get_running_loop().time()


def _task_finder(loop: asyncio.AbstractEventLoop) -> Callable[[], asyncio.Task[Any] | None]:
    """Return the cheapest way to find the task running on ``loop``.

    ``asyncio.current_task()`` costs ~0.23 µs on Python 3.11, mostly the
    ``getpid()`` system call its running-loop check makes; a lookup in asyncio's
    own table of current tasks by the loop known at start-up costs ~0.02 µs.
    The table is asyncio's internal one, so it is used only after checking that
    it holds the task running now; otherwise the public function is.
    """
    table = getattr(asyncio.tasks, "_current_tasks", None)
    current = asyncio.current_task()
    if isinstance(table, dict) and current is not None and table.get(loop) is current:
        return functools.partial(table.get, loop)
    return asyncio.current_task


def _marked(endpoint: Any) -> float | None:
    value = getattr(endpoint, _ATTRIBUTE, None)
    return value if isinstance(value, float) else None


def _template(scope: Scope) -> str | None:
    fastapi = scope.get("fastapi")
    effective = fastapi.get("effective_route_context") if fastapi else None
    return getattr(effective, "path_format", None)


def _endpoints(
    routes: Sequence[BaseRoute], prefix: str = ""
) -> Iterator[tuple[Any, str, set[str] | None, Any]]:
    """Yield (the route to wrap, its full template, its methods, its endpoint) for HTTP routes."""
    for route in routes:
        contexts = getattr(route, "effective_route_contexts", None)
        if callable(contexts):
            # FastAPI >= 0.16x keeps an included router's routes where they were
            # declared and routes through per-inclusion contexts built lazily.
            for context in contexts():
                copied = getattr(context, "starlette_route", None)
                if copied is not None:
                    yield from _endpoints([copied], prefix)
                else:
                    original = context.original_route
                    methods = getattr(context, "methods", None)
                    yield original, prefix + context.path_format, methods, context.endpoint
        elif isinstance(route, Mount):
            yield from _endpoints(route.routes, prefix + route.path)
        elif isinstance(route, Host):
            yield from _endpoints(route.routes, prefix)
        elif not isinstance(route, WebSocketRoute):
            path = getattr(route, "path", None)
            endpoint = getattr(route, "endpoint", None)
            if isinstance(path, str) and endpoint is not None:
                yield route, prefix + path, getattr(route, "methods", None), endpoint
