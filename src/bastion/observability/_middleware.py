"""The request middleware: context, timing, in-flight count, last-resort 500, access log.

Pure ASGI, and one layer rather than four: the lifecycle gate, the request
context, error rendering of last resort and the access log all need the start
time, the status and the request id, so they share one ``send`` wrapper and
one ``try`` instead of each paying for its own frame on every request.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Mapping
from typing import Final

import structlog
from starlette.routing import Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.context import RequestContext, bind, is_valid_request_id, new_request_id, unbind
from bastion.errors import PROBLEM_CONTENT_TYPE, ErrorCode, problem_body, render_problem
from bastion.lifecycle import Lifecycle
from bastion.observability._logging import AccessLogger

__all__ = ["RequestMiddleware"]

logger = structlog.get_logger("bastion.request")

_REQUEST_ID_HEADER: Final = b"x-request-id"
_INTERNAL_DETAIL: Final = (
    "An unexpected error occurred. Quote the correlation_id when reporting it."
)


_PROBE_METHODS: Final = frozenset({"GET", "HEAD"})


_CUT_OFF_DETAIL: Final = (
    "The server shut down before this request finished. It is safe to retry if the "
    "operation is idempotent."
)


class RequestMiddleware:
    """Outermost bastion layer on every HTTP request.

    Args:
        app: the wrapped ASGI app.
        lifecycle: counts requests in flight for graceful shutdown.
        access_log: writes the access line, or ``None`` when it is off.
        operational_prefixes: paths whose access lines are debug-level only.
        probes: routes answered here, by exact path, without passing through the
            app: one dict lookup per request instead of every app request failing
            to match the probe routes first (3-5 µs a request, bench/request_path.py),
            and a probe a catch-all route or the app's own middleware cannot shadow.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifecycle: Lifecycle,
        access_log: AccessLogger | None,
        operational_prefixes: tuple[str, ...] = ("/health/", "/metrics"),
        probes: Mapping[str, Route] | None = None,
    ) -> None:
        self.app = app
        self.probes = dict(probes or {})
        self.lifecycle = lifecycle
        self.access_log = access_log
        self.operational_prefixes = operational_prefixes

    async def __call__(  # noqa: PLR0912, PLR0915 -- one frame on every request; helpers cost a call each
        self, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter_ns()
        # Kept ids are echoed as the bytes they came in as: no decode/encode round trip.
        raw_id: bytes | None = None
        for name, value in scope["headers"]:
            if name == _REQUEST_ID_HEADER:
                raw_id = value
                break
        if raw_id is not None and is_valid_request_id(raw_id):
            request_id = raw_id.decode("ascii")
        else:
            request_id = new_request_id()
            raw_id = request_id.encode("ascii")
        request_id_header = (_REQUEST_ID_HEADER, raw_id)
        method = scope["method"]
        client = scope.get("client")
        client_ip = client[0] if client else None
        context = RequestContext(request_id, method, client_ip)
        token = bind(context)
        status = 500
        response_started = False

        # A closure rather than a per-request object with __call__: both cost about the
        # same to create, but the two calls per response cost ~0.7 µs more through
        # __call__ and attribute access than through cells. A plain function that
        # returns send's awaitable rather than a coroutine awaiting it: no coroutine
        # object per message, ~0.3 µs a response.
        def send_with_request_id(message: Message) -> Awaitable[None]:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                # A new list: the app may reuse its header list for other responses.
                message["headers"] = [*message.get("headers", ()), request_id_header]
            return send(message)

        lifecycle = self.lifecycle
        lifecycle.request_started()
        # GET and HEAD only: other methods reach the app, whose router answers 405
        # with an Allow header from the same routes kept at its end.
        probe = self.probes.get(scope["path"]) if method in _PROBE_METHODS else None
        try:
            if probe is None:
                await self.app(scope, receive, send_with_request_id)
            else:
                scope["route"] = probe
                await probe.handle(scope, receive, send_with_request_id)
        except asyncio.CancelledError:
            # Only the server cancels a request task: the shutdown timeout ran out.
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
        except Exception:
            logger.exception("unhandled error", method=method)
            if response_started:
                # Too late for a problem body; let the server abort the connection so
                # the client sees a truncated response rather than a false success.
                raise
            status = 500
            await _send_problem(send, request_id_header, request_id, ErrorCode.INTERNAL)
        finally:
            lifecycle.request_finished()
            context.route = getattr(scope.get("route"), "path", None)
            access_log = self.access_log
            if access_log is not None:
                operational = scope["path"].startswith(self.operational_prefixes)
                if access_log.debug_enabled if operational else access_log.info_enabled:
                    # Integer nanoseconds to milliseconds with three decimals:
                    # round(seconds * 1000, 3) costs ~0.5 µs, this ~0.2 µs.
                    duration_ms = (time.perf_counter_ns() - started) // 1000 / 1000
                    access_log.log(context, status, duration_ms, operational)
            unbind(token)


async def _send_problem(
    send: Send, request_id_header: tuple[bytes, bytes], request_id: str, code: ErrorCode
) -> None:
    detail = _INTERNAL_DETAIL if code is ErrorCode.INTERNAL else _CUT_OFF_DETAIL
    body = render_problem(problem_body(code, detail, request_id))
    headers = [
        (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
        (b"content-length", str(len(body)).encode()),
        request_id_header,
    ]
    if code is ErrorCode.SERVICE_UNAVAILABLE:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": code.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
