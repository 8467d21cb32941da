"""The request middleware: context, server span, timing, metrics, last-resort 500, access log.

Pure ASGI, and one layer rather than six: the lifecycle gate, the request
context, the server span, the HTTP metrics, error rendering of last resort and
the access log all need the start time, the status, the route template and the
request id, so they share one walk of the headers, one ``send`` wrapper and one
``try`` instead of each paying for its own frame on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, Final, Protocol

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import StatusCode
from starlette.requests import ClientDisconnect
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion._routes import PathSet
from bastion.context import RequestContext, bind, is_valid_request_id, new_request_id, unbind
from bastion.errors import (
    PROBLEM_CONTENT_TYPE,
    BastionError,
    ErrorCode,
    problem_body,
    render_problem,
)
from bastion.lifecycle import Lifecycle
from bastion.observability._http_metrics import HttpMetrics
from bastion.observability._logging import AccessLogger
from bastion.observability._server_span import ServerSpan
from bastion.observability._tracing import Tracing, remote_span_context

__all__ = ["UNMATCHED_ROUTE", "RequestMiddleware"]

logger = structlog.get_logger("bastion.request")

_REQUEST_ID_HEADER: Final = b"x-request-id"
_TRACEPARENT: Final = b"traceparent"
_TRACESTATE: Final = b"tracestate"
_USER_AGENT: Final = b"user-agent"

UNMATCHED_ROUTE: Final = "_unmatched"
"""The one route value metrics give requests no route matched (a 404 from the router)."""

# Mounted routes' full templates, by inner route and mount root path. Bounded: a
# mount with path parameters makes one root path per value.
_MOUNTED: dict[tuple[int, str], str | None] = {}
_MOUNTED_MAX: Final = 1024
_INTERNAL_DETAIL: Final = (
    "An unexpected error occurred. Quote the correlation_id when reporting it."
)


_PROBE_METHODS: Final = frozenset({"GET", "HEAD"})


_CUT_OFF_DETAIL: Final = (
    "The server shut down before this request finished. It is safe to retry if the "
    "operation is idempotent."
)
_DEADLINE_DETAIL: Final = "The request did not finish within its deadline and was stopped."
_DETAILS: Final = {
    ErrorCode.INTERNAL: _INTERNAL_DETAIL,
    ErrorCode.SERVICE_UNAVAILABLE: _CUT_OFF_DETAIL,
    ErrorCode.REQUEST_TIMEOUT: _DEADLINE_DETAIL,
}


class RequestDeadlineTracker(Protocol):
    """What the middleware needs of the request deadlines (``bastion.resilience`` has them).

    Kept a protocol so observability does not import resilience: the tracker is
    handed over by ``install``.
    """

    active: bool
    default: float
    clock: Callable[[], float]
    current_task: Callable[[], asyncio.Task[Any] | None]
    inflight: dict[asyncio.Task[Any], RequestContext]
    expired: dict[asyncio.Task[Any], int]

    def claim(self, task: asyncio.Task[Any]) -> bool:
        """Return whether ``task`` was cancelled by its deadline (and take that back)."""

    def release(self, task: asyncio.Task[Any]) -> None:
        """Undo a deadline cancellation of a finished request that the app swallowed."""

    def exceeded(self, route: str) -> None:
        """Count a request answered 504 because its deadline passed."""


class RequestMiddleware:
    """Outermost bastion layer on every HTTP request.

    Args:
        app: the wrapped ASGI app.
        lifecycle: counts requests in flight for graceful shutdown.
        access_log: writes the access line, or ``None`` when it is off.
        operational_prefixes: paths whose access lines are debug-level only, and
            which get no span unless ``tracing.trace_operational`` is on.
        probes: routes answered here, by exact path, without passing through the
            app: one dict lookup per request instead of every app request failing
            to match the probe routes first (3-5 µs a request, bench/request_path.py),
            and a probe a catch-all route or the app's own middleware cannot shadow.
        tracing: starts a server span per request, or ``None`` when tracing is off.
        metrics: records the HTTP RED metrics, or ``None`` when metrics are off.
        deadlines: gives each request other than the operational ones its
            deadline and answers ``504 REQUEST_TIMEOUT`` when its sweeper cancels
            the request; ``None`` when resilience is off.
        client_address: finds the client's address from the socket peer and the
            trusted proxies' header (``bastion._forwarded.ClientAddress``); ``None``
            when no proxy is trusted, and the peer is the client.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifecycle: Lifecycle,
        access_log: AccessLogger | None,
        operational_prefixes: tuple[str, ...] = ("/health/", "/metrics"),
        probes: Mapping[str, Route] | None = None,
        tracing: Tracing | None = None,
        metrics: HttpMetrics | None = None,
        deadlines: RequestDeadlineTracker | None = None,
        client_address: Callable[[str | None, Any], str | None] | None = None,
    ) -> None:
        self.app = app
        self.client_address = client_address
        self.probes = dict(probes or {})
        self.lifecycle = lifecycle
        self.access_log = access_log
        self.operational_prefixes = PathSet(operational_prefixes)
        self.tracing = tracing
        self.trace_operational = tracing is not None and tracing.trace_operational
        self.metrics = metrics
        self.deadlines = deadlines

    async def __call__(  # noqa: PLR0912, PLR0915 -- one frame on every request; helpers cost a call each
        self, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter_ns()
        tracing = self.tracing
        path = scope["path"]
        operational = self.operational_prefixes.matches(path)
        if operational and not self.trace_operational:
            tracing = None
        # Kept ids are echoed as the bytes they came in as: no decode/encode round trip.
        raw_id: bytes | None = None
        traceparent: bytes | None = None
        tracestate: list[bytes] = []
        user_agent: bytes | None = None
        if tracing is None:
            for name, value in scope["headers"]:
                if name == _REQUEST_ID_HEADER:
                    raw_id = value
                elif name == _USER_AGENT:
                    user_agent = value
        else:
            # One walk for every header the request and its span need; ASGI servers
            # lower-case names, so the W3C rule of case-insensitive names holds here.
            duplicated = False
            for name, value in scope["headers"]:
                if name == _REQUEST_ID_HEADER:
                    raw_id = value
                elif name == _TRACEPARENT:
                    duplicated = traceparent is not None
                    traceparent = value
                elif name == _TRACESTATE:
                    tracestate.append(value)
                elif name == _USER_AGENT:
                    user_agent = value
            if duplicated:
                traceparent = None
        if raw_id is not None and is_valid_request_id(raw_id):
            request_id = raw_id.decode("ascii")
        else:
            request_id = new_request_id()
            raw_id = request_id.encode("ascii")
        request_id_header = (_REQUEST_ID_HEADER, raw_id)
        method = scope["method"]
        client = scope.get("client")
        client_ip = client[0] if client else None
        client_address = self.client_address
        if client_address is not None:
            # Logs, audit and limits all read the client from the context, so it is
            # resolved once, here; without trusted proxies this costs one None check.
            client_ip = client_address(client_ip, scope["headers"])
        context = RequestContext(request_id, method, client_ip)
        if user_agent is not None:
            # Latin-1 maps every byte: a header is bytes, whatever a client put in it.
            context.user_agent = user_agent.decode("latin-1")
        token = bind(context)
        status = 500
        response_started = False
        response_bytes = 0
        request_bytes = 0
        root_path = scope.get("root_path", "")

        span: Any = None
        span_token: contextvars.Token[Context] | None = None
        if tracing is not None:
            parent = (
                remote_span_context(traceparent, tracestate) if traceparent is not None else None
            )
            span = tracing.start_server_span(
                method, parent, _request_attributes, (scope, client_ip, user_agent)
            )
            span_context = span.get_span_context()
            context.trace_id = format(span_context.trace_id, "032x")
            context.span_id = format(span_context.span_id, "016x")
            span_token = otel_context.attach(trace.set_span_in_context(span))

        metrics = self.metrics
        app_receive = receive
        if metrics is not None:
            metrics.started(method)

            # A coroutine per message the app reads, and only on requests whose body
            # it reads (FastAPI never calls receive for a GET without a body).
            async def counting_receive() -> Message:
                nonlocal request_bytes
                message = await receive()
                if message["type"] == "http.request":
                    request_bytes += len(message.get("body", b""))
                return message

            app_receive = counting_receive

        # A closure rather than a per-request object with __call__: both cost about the
        # same to create, but the two calls per response cost ~0.7 µs more through
        # __call__ and attribute access than through cells. A plain function that
        # returns send's awaitable rather than a coroutine awaiting it: no coroutine
        # object per message, ~0.3 µs a response.
        def send_with_request_id(message: Message) -> Awaitable[None]:
            nonlocal status, response_started, response_bytes
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                # A new list: the app may reuse its header list for other responses.
                message["headers"] = [*message.get("headers", ()), request_id_header]
            else:
                response_bytes += len(message.get("body", b""))
            return send(message)

        lifecycle = self.lifecycle
        lifecycle.request_started()
        # No timer per request: the tracker's sweeper cancels the task once its
        # deadline has passed (bastion.resilience._deadline).
        tracker = self.deadlines
        task: asyncio.Task[Any] | None = None
        if tracker is not None and tracker.active and not operational:
            task = tracker.current_task()
            if task is not None:
                default = tracker.default
                if default:
                    context.deadline = tracker.clock() + default
                tracker.inflight[task] = context
        timed_out = False
        # GET and HEAD only: other methods reach the app, whose router answers 405
        # with an Allow header from the same routes kept at its end.
        probe = self.probes.get(path) if method in _PROBE_METHODS else None
        failure: BaseException | None = None
        try:
            if probe is None:
                await self.app(scope, app_receive, send_with_request_id)
            else:
                scope["route"] = probe
                await probe.handle(scope, app_receive, send_with_request_id)
        except BaseException as exc:
            if task is not None and tracker is not None and tracker.claim(task):
                # The sweeper cancelled the request: its deadline passed. (The app
                # may have turned the cancellation into another error on its way out.)
                timed_out = True
                # The sweeper must not cancel the 504 it is being answered with.
                context.deadline = None
                logger.warning("request deadline exceeded", method=method)
                if response_started:
                    # Too late for a problem: the server aborts the connection, so
                    # the client sees a truncated response, not a false success.
                    failure = BastionError(_DEADLINE_DETAIL, code=ErrorCode.REQUEST_TIMEOUT)
                    raise failure from None
                status = 504
                # A client gone in the meantime is no error of the app's.
                with contextlib.suppress(OSError):
                    await _send_problem(
                        send, request_id_header, request_id, ErrorCode.REQUEST_TIMEOUT
                    )
            elif isinstance(exc, asyncio.CancelledError):
                failure = exc
                # Otherwise only the server cancels a request task: the shutdown
                # timeout ran out.
                lifecycle.request_cut_off()
                logger.warning("request cut off by shutdown timeout", method=method)
                if not response_started:
                    # A retryable 503 problem with the correlation id, rather than the
                    # server's bare 500: the client did nothing wrong and may try again
                    # on another instance. The cancellation was consumed by the except,
                    # so this send runs; a second cancellation (forced exit) skips it.
                    status = 503
                    with contextlib.suppress(Exception, asyncio.CancelledError):
                        await _send_problem(
                            send, request_id_header, request_id, ErrorCode.SERVICE_UNAVAILABLE
                        )
                raise
            elif isinstance(exc, ClientDisconnect) and not response_started:
                # The client hung up while the app read its body: nobody is left to
                # answer, and it is the client's doing, not a bug to page anyone about.
                # Recorded as nginx's 499 so dashboards can tell it from a 4xx sent.
                status = _CLIENT_CLOSED_REQUEST
                logger.info("client disconnected before the request was read", method=method)
            elif isinstance(exc, Exception):
                failure = exc
                logger.exception("unhandled error", method=method)
                if response_started:
                    # Too late for a problem body; let the server abort the connection so
                    # the client sees a truncated response rather than a false success.
                    raise
                status = 500
                await _send_problem(send, request_id_header, request_id, ErrorCode.INTERNAL)
            else:
                raise
        finally:
            lifecycle.request_finished()
            if task is not None and tracker is not None:
                del tracker.inflight[task]
                if tracker.expired:
                    tracker.release(task)
            route = scope.get("route")
            # FastAPI >= 0.16x keeps an included router's routes relative to its
            # prefix and records the full template in its own scope entry.
            fastapi_scope = scope.get("fastapi")
            effective = fastapi_scope.get("effective_route_context") if fastapi_scope else None
            if route is None:
                template = None
            elif effective is not None:
                template = getattr(effective, "path_format", None)
            elif scope.get("root_path", "") == root_path:
                template = getattr(route, "path", None)
            else:
                template = _mounted_template(scope, route, root_path)
            context.route = template
            if timed_out and tracker is not None:
                tracker.exceeded(template or UNMATCHED_ROUTE)
            ended = time.perf_counter_ns()
            if span_token is not None:
                otel_context.detach(span_token)
                if span.is_recording():
                    _end_span_attributes(span, method, template, status, failure)
                span.end()
            if metrics is not None:
                metrics.finished(
                    method=method,
                    route=template or UNMATCHED_ROUTE,
                    status=status,
                    duration=(ended - started) / 1e9,
                    request_bytes=request_bytes,
                    response_bytes=response_bytes,
                    tenant=context.tenant_id,
                )
            access_log = self.access_log
            if access_log is not None and (
                access_log.debug_enabled if operational else access_log.info_enabled
            ):
                # Integer nanoseconds to milliseconds with three decimals:
                # round(seconds * 1000, 3) costs ~0.5 µs, this ~0.2 µs.
                duration_ms = (ended - started) // 1000 / 1000
                access_log.log(context, status, duration_ms, operational)
            unbind(token)


def _request_attributes(
    request: tuple[Scope, str | None, bytes | None],
) -> dict[str, Any]:
    """Return the OpenTelemetry HTTP server semantic-convention attributes known at entry.

    ``client.address`` is the client as resolved through trusted proxies, and
    ``network.peer.address`` the socket peer when that is another host (semconv).
    """
    scope, client_ip, user_agent = request
    attributes: dict[str, Any] = {
        "http.request.method": scope["method"],
        "url.path": scope["path"],
        "url.scheme": scope.get("scheme", "http"),
        "network.protocol.version": scope.get("http_version", "1.1"),
    }
    server = scope.get("server")
    if server:
        attributes["server.address"] = server[0]
        if server[1] is not None:
            attributes["server.port"] = server[1]
    if client_ip is not None:
        attributes["client.address"] = client_ip
        peer = scope.get("client")
        if peer and peer[0] != client_ip:
            attributes["network.peer.address"] = peer[0]
    if user_agent is not None:
        attributes["user_agent.original"] = user_agent.decode("latin-1")
    return attributes


def _end_span_attributes(
    span: Any, method: str, template: str | None, status: int, failure: BaseException | None
) -> None:
    """Name the span by route template and record the outcome."""
    # bastion's own span takes the values bastion built (a template, a status, a class
    # name) without the validation user code's values get; the SDK's span (made when
    # the lean one cannot stand in) validates them as before.
    set_attributes = (
        span.set_trusted_attributes if isinstance(span, ServerSpan) else span.set_attributes
    )
    if template is not None:
        # OTel semconv: "{method} {http.route}"; without a route, the method alone.
        span.update_name(f"{method} {template}")
        # One call, not two: each checks the span's state (and the SDK's takes its lock).
        set_attributes({"http.route": template, "http.response.status_code": status})
    else:
        set_attributes({"http.response.status_code": status})
    if failure is not None:
        span.record_exception(failure)
        set_attributes({"error.type": type(failure).__qualname__})
        span.set_status(StatusCode.ERROR, type(failure).__qualname__)
    elif status >= 500:  # noqa: PLR2004 -- server errors mark a server span as failed
        set_attributes({"error.type": str(status)})
        span.set_status(StatusCode.ERROR)


def _mounted_template(scope: Scope, route: BaseRoute, root_path: str) -> str | None:
    """Return the full template of a route reached through one or more ``Mount``s.

    The router mutates the one scope dict as it descends, so after the response
    ``scope["route"]`` is the innermost route, whose path lacks the mounts'
    prefixes: the prefixes are found again by matching the mounts from the top.
    """
    key = (id(route), scope.get("root_path", ""))
    cached = _MOUNTED.get(key, _MISSING)
    if cached is not _MISSING:
        return cached  # type: ignore[return-value]  # the sentinel was ruled out
    router = scope.get("router")
    probe: dict[str, Any] = {
        "type": "http",
        "path": scope["path"],
        "root_path": root_path,
        "method": scope["method"],
    }
    prefix = ""
    routes: list[BaseRoute] = list(getattr(router, "routes", ()))
    descended = True
    while descended:
        descended = False
        for candidate in routes:
            if candidate is route:
                break
            if isinstance(candidate, Mount):
                match, child = candidate.matches(probe)
                if match is Match.FULL:
                    prefix += candidate.path
                    probe.update(child)
                    routes = list(candidate.routes)
                    descended = True
                    break
    inner = getattr(route, "path", None)
    if inner is None:
        template = None
    elif isinstance(route, Mount):
        template = prefix + inner + "/{path}"
    else:
        template = prefix + inner
    if len(_MOUNTED) < _MOUNTED_MAX:
        _MOUNTED[key] = template
    return template


_MISSING: Final = object()
# nginx's status for a request its client closed before the answer; never sent.
_CLIENT_CLOSED_REQUEST: Final = 499


async def _send_problem(
    send: Send, request_id_header: tuple[bytes, bytes], request_id: str, code: ErrorCode
) -> None:
    body = render_problem(problem_body(code, _DETAILS[code], request_id))
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        request_id_header,
    ]
    if code is ErrorCode.SERVICE_UNAVAILABLE:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": code.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
