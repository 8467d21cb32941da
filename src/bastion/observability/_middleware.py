"""The request middleware: context, timing, in-flight count, last-resort 500, access log.

Pure ASGI, and one layer rather than four: the lifecycle gate, the request
context, error rendering of last resort and the access log all need the start
time, the status and the request id, so they share one ``send`` wrapper and
one ``try`` instead of each paying for its own frame on every request.
"""

from __future__ import annotations

import asyncio
import time
from typing import Final

import structlog
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


class RequestMiddleware:
    """Outermost bastion layer on every HTTP request.

    Args:
        app: the wrapped ASGI app.
        lifecycle: counts requests in flight for graceful shutdown.
        access_log: writes the access line, or ``None`` when it is off.
        operational_prefixes: paths whose access lines are debug-level only.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        lifecycle: Lifecycle,
        access_log: AccessLogger | None,
        operational_prefixes: tuple[str, ...] = ("/health/", "/metrics"),
    ) -> None:
        self.app = app
        self.lifecycle = lifecycle
        self.access_log = access_log
        self.operational_prefixes = operational_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()
        request_id: str | None = None
        for name, value in scope["headers"]:
            if name == _REQUEST_ID_HEADER:
                if is_valid_request_id(value):
                    request_id = value.decode("ascii")
                break
        if request_id is None:
            request_id = new_request_id()
        client = scope.get("client")
        client_ip = client[0] if client else None
        context = RequestContext(request_id, scope["method"], client_ip)
        token = bind(context)
        request_id_header = (_REQUEST_ID_HEADER, request_id.encode("ascii"))
        status = 500
        response_started = False

        async def send_with_request_id(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                response_started = True
                status = message["status"]
                message["headers"] = [*message.get("headers", ()), request_id_header]
            await send(message)

        lifecycle = self.lifecycle
        lifecycle.request_started()
        try:
            await self.app(scope, receive, send_with_request_id)
        except asyncio.CancelledError:
            # Only the server cancels a request task: the shutdown timeout ran out.
            lifecycle.request_cut_off()
            logger.warning("request cut off by shutdown timeout", method=scope["method"])
            raise
        except Exception:
            logger.exception("unhandled error", method=scope["method"])
            if response_started:
                # Too late for a problem body; let the server abort the connection so
                # the client sees a truncated response rather than a false success.
                raise
            status = 500
            await _send_internal_error(send, request_id_header, request_id)
        finally:
            lifecycle.request_finished()
            route = scope.get("route")
            context.route = getattr(route, "path", None)
            access_log = self.access_log
            if access_log is not None:
                operational = scope["path"].startswith(self.operational_prefixes)
                if access_log.enabled(operational):
                    access_log.log(
                        operational=operational,
                        method=scope["method"],
                        route=context.route,
                        status=status,
                        duration_ms=round((time.perf_counter() - started) * 1000, 3),
                        client=client_ip,
                    )
            unbind(token)


async def _send_internal_error(
    send: Send, request_id_header: tuple[bytes, bytes], request_id: str
) -> None:
    body = render_problem(problem_body(ErrorCode.INTERNAL, _INTERNAL_DETAIL, request_id))
    await send(
        {
            "type": "http.response.start",
            "status": 500,
            "headers": [
                (b"content-type", PROBLEM_CONTENT_TYPE.encode()),
                (b"content-length", str(len(body)).encode()),
                request_id_header,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})
