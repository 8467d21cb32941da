"""The W3C Trace Context test harness endpoint, ``POST /_conformance/tracecontext``.

Only mounted when ``tracing.conformance_endpoint`` is on: it makes outbound
calls to URLs the caller chooses, which in production would let anyone use
the service to reach its private network. The W3C harness
(github.com/w3c/trace-context, ``test/``) drives it; see docs/observability.md.
"""

from __future__ import annotations

from typing import Any, Final

import httpx
from fastapi import APIRouter
from opentelemetry import trace
from opentelemetry.trace import SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import BaseModel

__all__ = ["CONFORMANCE_PATH", "conformance_router"]

CONFORMANCE_PATH: Final = "/_conformance/tracecontext"
_TIMEOUT: Final = 5.0
_PROPAGATOR: Final = TraceContextTextMapPropagator()


class HarnessCall(BaseModel):
    """One call the harness asks for: POST ``arguments`` to ``url``."""

    url: str
    arguments: list[Any] = []


def conformance_router(tracer: trace.Tracer) -> APIRouter:
    """Return the router serving the harness endpoint.

    Args:
        tracer: starts a CLIENT span per outbound call, so each call carries its
            own parent id.
    """
    router = APIRouter()

    @router.post(CONFORMANCE_PATH, include_in_schema=False)
    async def trace_context(calls: list[HarnessCall]) -> dict[str, int]:
        # In order and before answering, as the harness expects; the request's
        # server span (started by the middleware from the inbound traceparent) is
        # the current span, so each client span continues its trace.
        async with httpx.AsyncClient(timeout=_TIMEOUT) as client:
            for call in calls:
                with tracer.start_as_current_span("POST", kind=SpanKind.CLIENT) as span:
                    headers: dict[str, str] = {}
                    _PROPAGATOR.inject(headers)
                    response = await client.post(call.url, json=call.arguments, headers=headers)
                    span.set_attribute("http.response.status_code", response.status_code)
        return {"calls": len(calls)}

    return router
