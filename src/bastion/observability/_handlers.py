"""Exception handlers that render every framework and bastion error as RFC 9457."""

from __future__ import annotations

from collections.abc import Mapping
from http import HTTPStatus
from typing import Any, Final

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from bastion.context import current_context
from bastion.errors import (
    PROBLEM_CONTENT_TYPE,
    BastionError,
    ErrorCode,
    FieldError,
    code_for_status,
    problem_body,
    render_problem,
)

__all__ = ["install_exception_handlers", "problem_response", "send_problem"]

logger = structlog.get_logger("bastion.request")

# The caller already queued for database.pool_timeout; a few seconds more let the
# burst that exhausted the pool drain (the admin routes answer a 503 alike).
_RETRY_AFTER = "5"

_DEFAULT_DETAIL = {
    ErrorCode.NOT_FOUND: "No resource exists at this path.",
    ErrorCode.METHOD_NOT_ALLOWED: "This path does not accept this method; see the Allow header.",
}


def problem_response(
    body: Mapping[str, Any], status: int, headers: Mapping[str, str] | None = None
) -> Response:
    """Return a ``application/problem+json`` response for ``body``."""
    return Response(
        render_problem(body), status_code=status, headers=headers, media_type=PROBLEM_CONTENT_TYPE
    )


async def send_problem(error: BastionError, scope: Scope, receive: Receive, send: Send) -> None:
    """Answer a request with ``error`` from a middleware, outside the app's exception handlers.

    The body is what the handlers would have rendered: the problem with the request's
    correlation id, the error's status and headers.
    """
    await problem_response(error.problem(_correlation_id()), error.status, error.headers)(
        scope, receive, send
    )


def _correlation_id() -> str | None:
    context = current_context()
    return context.request_id if context else None


async def _bastion_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, BastionError)  # noqa: S101 -- registered for this type only
    return problem_response(exc.problem(_correlation_id()), exc.status, exc.headers)


async def _http_exception(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)  # noqa: S101 -- registered for this type only
    code = code_for_status(exc.status_code)
    detail = exc.detail
    if not detail or detail == HTTPStatus(exc.status_code).phrase:
        detail = _DEFAULT_DETAIL.get(code, code.title)
    body = problem_body(code, detail, _correlation_id(), status=exc.status_code)
    if exc.status_code in {204, 304}:
        return Response(status_code=exc.status_code, headers=exc.headers)
    return problem_response(body, exc.status_code, exc.headers)


# Pydantic's error types for a value over its bounds, and the context key holding the bound.
_TOO_LONG: Final = {
    "string_too_long": "max_length",
    "too_long": "max_length",
    "bytes_too_long": "max_length",
}


def _field_errors(errors: Any) -> list[FieldError]:
    # Pydantic's own error dicts carry the offending input; it is dropped here on
    # purpose, since it may be a password or personal data.
    result = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ())) or "body"
        kind = str(error.get("type", "invalid"))
        limit = None
        context = error.get("ctx") or {}
        bound = _TOO_LONG.get(kind)
        if bound is not None and isinstance(context.get(bound), int):
            limit = context[bound]
        elif isinstance(context.get("limit"), int):
            # bastion.guard's own bounded types put their bound under ``limit``.
            limit = context["limit"]
        result.append(FieldError(location, kind, str(error["msg"]), limit))
    return result


async def _validation_error(request: Request, exc: Exception) -> Response:
    errors = _field_errors(getattr(exc, "errors", list)())
    # Too long and nothing else wrong: the client's fix is to shorten, which a
    # distinct code tells it without parsing the list.
    too_long = bool(errors) and all(error.limit is not None for error in errors)
    code = ErrorCode.INPUT_TOO_LONG if too_long else ErrorCode.INVALID_INPUT
    body = problem_body(code, "The request did not pass validation.", _correlation_id())
    body["errors"] = [error.as_dict() for error in errors]
    return problem_response(body, 422)


async def _pool_timeout(request: Request, exc: Exception) -> Response:
    # An exhausted pool is overload, not a bug: a retryable 503 rather than a 500.
    # The pool already logged it (rate-limited) and counted it; SQLAlchemy's message
    # describes the pool's sizes, which the client has no use for.
    body = problem_body(
        ErrorCode.SERVICE_UNAVAILABLE,
        "No database connection became free in time; retry shortly.",
        _correlation_id(),
    )
    return problem_response(body, 503, {"Retry-After": _RETRY_AFTER})


async def _connection_lost(request: Request, exc: Exception) -> Response:
    # A dependency that cannot be reached (connection refused or reset, or a
    # database connection the driver found dead) is an outage, not a bug: the
    # client may retry, and readiness is already failing for the load balancer.
    # Every other database error is a bug and stays a 500.
    if isinstance(exc, DBAPIError) and not exc.connection_invalidated:
        raise exc
    logger.warning(
        "dependency unreachable",
        error=type(exc.orig if isinstance(exc, DBAPIError) else exc).__name__,
        method=request.method,
    )
    body = problem_body(
        ErrorCode.SERVICE_UNAVAILABLE,
        "A service this request needs cannot be reached; retry shortly.",
        _correlation_id(),
    )
    return problem_response(body, 503, {"Retry-After": _RETRY_AFTER})


def install_exception_handlers(app: Starlette) -> None:
    """Register bastion's renderers on a Starlette or FastAPI app."""
    app.add_exception_handler(BastionError, _bastion_error)
    app.add_exception_handler(HTTPException, _http_exception)
    app.add_exception_handler(PoolTimeout, _pool_timeout)
    app.add_exception_handler(ConnectionError, _connection_lost)
    app.add_exception_handler(DBAPIError, _connection_lost)
    try:
        from fastapi.exceptions import RequestValidationError  # noqa: PLC0415 -- optional
    except ImportError:  # pragma: no cover -- fastapi is a dependency today
        return
    app.add_exception_handler(RequestValidationError, _validation_error)
