"""Error codes, the BastionError tree, and RFC 9457 problem rendering.

Every error a bastion service answers with is an ``application/problem+json``
body carrying a stable ``code`` from :class:`ErrorCode`. Components raise
subclasses of :class:`BastionError`; only the HTTP layer turns them into
responses.

The tree::

    BastionError                    INTERNAL (500)
    ├── InvalidInput                INVALID_INPUT (422), carries field errors
    ├── NotFound                    NOT_FOUND (404)
    ├── Conflict                    CONFLICT (409)
    │   └── data.TransactionConflict    a unit still conflicting after its last attempt
    ├── Forbidden                   FORBIDDEN (403)
    ├── Unauthenticated             UNAUTHENTICATED (401)
    ├── PreconditionFailed          PRECONDITION_FAILED (412)
    ├── PreconditionRequired        PRECONDITION_REQUIRED (428)
    ├── PayloadTooLarge             PAYLOAD_TOO_LARGE (413)
    ├── UnsupportedMediaType        UNSUPPORTED_MEDIA_TYPE (415)
    ├── ServiceUnavailable          SERVICE_UNAVAILABLE (503)
    ├── DependencyFailure           DEPENDENCY_FAILURE (502)
    └── ConfigurationError          not an HTTP error: stops start-up
        └── data.MigrationError     a migration cannot be read, planned or run
            └── data.DestructiveChangeRefused

Codes are public API: add codes, never rename them.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, Final

import orjson

__all__ = [
    "PROBLEM_CONTENT_TYPE",
    "BastionError",
    "ConfigurationError",
    "Conflict",
    "DependencyFailure",
    "ErrorCode",
    "FieldError",
    "Forbidden",
    "InvalidInput",
    "NotFound",
    "PayloadTooLarge",
    "PreconditionFailed",
    "PreconditionRequired",
    "ServiceUnavailable",
    "Unauthenticated",
    "UnsupportedMediaType",
    "code_for_status",
    "problem_body",
    "problem_responses",
]

PROBLEM_CONTENT_TYPE: Final = "application/problem+json"
DEFAULT_TYPE_BASE: Final = "urn:bastion:problem:"


class ErrorCode(enum.StrEnum):
    """Stable machine-readable error codes; each has a default HTTP status."""

    INVALID_INPUT = "INVALID_INPUT"
    INPUT_TOO_LONG = "INPUT_TOO_LONG"
    PROMPT_INJECTION_DETECTED = "PROMPT_INJECTION_DETECTED"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    DEPENDENCY_FAILURE = "DEPENDENCY_FAILURE"
    RATE_LIMITED = "RATE_LIMITED"
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"
    NOT_FOUND = "NOT_FOUND"
    CONFLICT = "CONFLICT"
    PRECONDITION_FAILED = "PRECONDITION_FAILED"
    PRECONDITION_REQUIRED = "PRECONDITION_REQUIRED"
    IDEMPOTENCY_KEY_REUSED = "IDEMPOTENCY_KEY_REUSED"
    ACCOUNT_LOCKED = "ACCOUNT_LOCKED"
    QUOTA_EXCEEDED = "QUOTA_EXCEEDED"
    PAYLOAD_TOO_LARGE = "PAYLOAD_TOO_LARGE"
    UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE"
    MALWARE_DETECTED = "MALWARE_DETECTED"
    VERSION_SUNSET = "VERSION_SUNSET"
    REQUEST_TIMEOUT = "REQUEST_TIMEOUT"
    INTERNAL = "INTERNAL"
    # Codes for the framework's own answers, which the list above does not name.
    BAD_REQUEST = "BAD_REQUEST"
    METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
    NOT_ACCEPTABLE = "NOT_ACCEPTABLE"
    HTTP_ERROR = "HTTP_ERROR"
    URI_TOO_LONG = "URI_TOO_LONG"
    HEADERS_TOO_LARGE = "HEADERS_TOO_LARGE"

    @property
    def status(self) -> int:
        """The HTTP status this code is answered with unless an error overrides it."""
        return _STATUS[self]

    # ``title`` is the RFC 9457 member's name, so it shadows ``str.title()`` on
    # purpose: title-casing an error code has no use.
    @property
    def title(self) -> str:  # type: ignore[override]
        """A short human-readable summary that does not change between occurrences."""
        return _TITLE.get(self) or HTTPStatus(self.status).phrase

    @property
    def slug(self) -> str:
        """The code in lower-kebab form, used in the problem ``type`` URI."""
        return self.value.lower().replace("_", "-")


_STATUS: Final[Mapping[ErrorCode, int]] = {
    ErrorCode.INVALID_INPUT: 422,
    ErrorCode.INPUT_TOO_LONG: 422,
    ErrorCode.PROMPT_INJECTION_DETECTED: 422,
    ErrorCode.SERVICE_UNAVAILABLE: 503,
    ErrorCode.DEPENDENCY_FAILURE: 502,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.CONFLICT: 409,
    ErrorCode.PRECONDITION_FAILED: 412,
    ErrorCode.PRECONDITION_REQUIRED: 428,
    ErrorCode.IDEMPOTENCY_KEY_REUSED: 422,
    ErrorCode.ACCOUNT_LOCKED: 429,
    ErrorCode.QUOTA_EXCEEDED: 429,
    ErrorCode.PAYLOAD_TOO_LARGE: 413,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE: 415,
    ErrorCode.MALWARE_DETECTED: 422,
    ErrorCode.VERSION_SUNSET: 410,
    ErrorCode.REQUEST_TIMEOUT: 504,
    ErrorCode.INTERNAL: 500,
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.METHOD_NOT_ALLOWED: 405,
    ErrorCode.NOT_ACCEPTABLE: 406,
    ErrorCode.HTTP_ERROR: 400,
    ErrorCode.URI_TOO_LONG: 414,
    ErrorCode.HEADERS_TOO_LARGE: 431,
}

_TITLE: Final[Mapping[ErrorCode, str]] = {
    ErrorCode.INVALID_INPUT: "Invalid input",
    ErrorCode.INPUT_TOO_LONG: "Input too long",
    ErrorCode.PROMPT_INJECTION_DETECTED: "Prompt injection detected",
    ErrorCode.DEPENDENCY_FAILURE: "A dependency failed",
    ErrorCode.RATE_LIMITED: "Rate limit exceeded",
    ErrorCode.UNAUTHENTICATED: "Authentication required",
    ErrorCode.NOT_FOUND: "Resource not found",
    ErrorCode.IDEMPOTENCY_KEY_REUSED: "Idempotency key reused with a different request",
    ErrorCode.ACCOUNT_LOCKED: "Account locked",
    ErrorCode.QUOTA_EXCEEDED: "Quota exceeded",
    ErrorCode.MALWARE_DETECTED: "Malware detected",
    ErrorCode.VERSION_SUNSET: "API version sunset",
    ErrorCode.REQUEST_TIMEOUT: "Request deadline exceeded",
    ErrorCode.INTERNAL: "Internal server error",
    ErrorCode.HTTP_ERROR: "HTTP error",
}

_CODE_BY_STATUS: Final[Mapping[int, ErrorCode]] = {
    400: ErrorCode.BAD_REQUEST,
    401: ErrorCode.UNAUTHENTICATED,
    403: ErrorCode.FORBIDDEN,
    404: ErrorCode.NOT_FOUND,
    405: ErrorCode.METHOD_NOT_ALLOWED,
    406: ErrorCode.NOT_ACCEPTABLE,
    409: ErrorCode.CONFLICT,
    410: ErrorCode.VERSION_SUNSET,
    412: ErrorCode.PRECONDITION_FAILED,
    413: ErrorCode.PAYLOAD_TOO_LARGE,
    414: ErrorCode.URI_TOO_LONG,
    415: ErrorCode.UNSUPPORTED_MEDIA_TYPE,
    422: ErrorCode.INVALID_INPUT,
    428: ErrorCode.PRECONDITION_REQUIRED,
    429: ErrorCode.RATE_LIMITED,
    431: ErrorCode.HEADERS_TOO_LARGE,
    500: ErrorCode.INTERNAL,
    502: ErrorCode.DEPENDENCY_FAILURE,
    503: ErrorCode.SERVICE_UNAVAILABLE,
    504: ErrorCode.REQUEST_TIMEOUT,
}


def code_for_status(status: int) -> ErrorCode:
    """Return the code for an HTTP error status raised by a framework, not by bastion."""
    fallback = (
        ErrorCode.HTTP_ERROR if status < HTTPStatus.INTERNAL_SERVER_ERROR else ErrorCode.INTERNAL
    )
    return _CODE_BY_STATUS.get(status, fallback)


@dataclass(frozen=True, slots=True)
class FieldError:
    """One field-level validation failure.

    Attributes:
        field: dotted location of the offending value, such as ``body.title``.
        code: a short machine-readable reason, such as ``too_long`` or ``missing``.
        message: a human-readable sentence that never echoes a secret.
        limit: the bound the value broke (characters, bytes, items), when it broke one.
    """

    field: str
    code: str
    message: str
    limit: int | None = None

    def as_dict(self) -> dict[str, Any]:
        """Return the member as it appears in a problem body's ``errors`` list."""
        member: dict[str, Any] = {"field": self.field, "code": self.code, "message": self.message}
        if self.limit is not None:
            member["limit"] = self.limit
        return member


class BastionError(Exception):
    """Root of every error bastion raises on purpose.

    Args:
        detail: a human-readable explanation of this occurrence; it is sent to the
            client, so it must not contain secrets or personal data.
        code: overrides the class's default code.
        status: overrides the code's default HTTP status.
        headers: extra response headers, such as ``Retry-After``.
        extra: extension members added to the problem body.
    """

    code: ErrorCode = ErrorCode.INTERNAL

    def __init__(
        self,
        detail: str | None = None,
        *,
        code: ErrorCode | None = None,
        status: int | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ) -> None:
        if code is not None:
            self.code = code
        self.status = status if status is not None else self.code.status
        self.detail = detail if detail is not None else self.code.title
        self.headers = dict(headers or {})
        self.extra = dict(extra or {})
        super().__init__(self.detail)

    def problem(self, correlation_id: str | None) -> dict[str, Any]:
        """Return the RFC 9457 body for this error."""
        body = problem_body(self.code, self.detail, correlation_id, status=self.status)
        body.update(self.extra)
        return body


class InvalidInput(BastionError):
    """Input failed validation; carries one :class:`FieldError` per problem found."""

    code = ErrorCode.INVALID_INPUT

    def __init__(
        self,
        detail: str | None = None,
        *,
        errors: Iterable[FieldError] = (),
        code: ErrorCode | None = None,
    ) -> None:
        super().__init__(detail or "The request did not pass validation.", code=code)
        self.errors = tuple(errors)

    def problem(self, correlation_id: str | None) -> dict[str, Any]:
        """Return the problem body with its ``errors`` list."""
        body = super().problem(correlation_id)
        body["errors"] = [error.as_dict() for error in self.errors]
        return body


class NotFound(BastionError):
    """The resource does not exist, or the caller may not know that it does."""

    code = ErrorCode.NOT_FOUND


class Conflict(BastionError):
    """The request conflicts with the current state of the resource."""

    code = ErrorCode.CONFLICT


class Forbidden(BastionError):
    """The caller is known but not allowed to do this."""

    code = ErrorCode.FORBIDDEN


class Unauthenticated(BastionError):
    """The request carries no valid identity."""

    code = ErrorCode.UNAUTHENTICATED


class PreconditionFailed(BastionError):
    """A conditional request header did not match the resource's current state."""

    code = ErrorCode.PRECONDITION_FAILED


class PreconditionRequired(BastionError):
    """A write that must be conditional came without ``If-Match`` (RFC 6585).

    Refusing it, rather than applying it unconditionally, is what stops two
    writers from silently overwriting each other's changes.
    """

    code = ErrorCode.PRECONDITION_REQUIRED


class PayloadTooLarge(BastionError):
    """The request body is larger than the route accepts."""

    code = ErrorCode.PAYLOAD_TOO_LARGE


class UnsupportedMediaType(BastionError):
    """The request body's media type is not one the route accepts."""

    code = ErrorCode.UNSUPPORTED_MEDIA_TYPE


class ServiceUnavailable(BastionError):
    """The service cannot answer now (shutting down, not ready, overloaded)."""

    code = ErrorCode.SERVICE_UNAVAILABLE


class DependencyFailure(BastionError):
    """A dependency the request needs failed or did not answer."""

    code = ErrorCode.DEPENDENCY_FAILURE


class ConfigurationError(Exception):
    """A setting is missing, malformed or unsafe; start-up stops with its message."""


_type_base = DEFAULT_TYPE_BASE


def set_problem_type_base(base: str) -> None:
    """Set the prefix of every problem ``type`` URI (``http.problem_type_base``)."""
    global _type_base  # noqa: PLW0603 -- one process-wide setting, written once at install
    _type_base = base


def problem_body(
    code: ErrorCode,
    detail: str | None,
    correlation_id: str | None,
    *,
    status: int | None = None,
) -> dict[str, Any]:
    """Build the members every problem body has.

    Args:
        code: the stable error code.
        detail: the occurrence-specific explanation; defaults to the code's title.
        correlation_id: the request id of the request that failed.
        status: the HTTP status, when it differs from the code's default.

    Returns:
        A JSON-ready dict with ``type, title, status, detail, code, correlation_id``.
    """
    return {
        "type": _type_base + code.slug,
        "title": code.title,
        "status": status if status is not None else code.status,
        "detail": detail if detail is not None else code.title,
        "code": code.value,
        "correlation_id": correlation_id,
    }


def render_problem(body: Mapping[str, Any]) -> bytes:
    """Serialize a problem body."""
    return orjson.dumps(body)


PROBLEM_SCHEMA: Final[dict[str, Any]] = {
    "title": "Problem",
    "type": "object",
    "description": "An RFC 9457 problem details object.",
    "required": ["type", "title", "status", "detail", "code", "correlation_id"],
    "properties": {
        "type": {"type": "string", "format": "uri-reference"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "code": {"type": "string", "enum": [code.value for code in ErrorCode]},
        "correlation_id": {"type": ["string", "null"]},
        "errors": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["field", "code", "message"],
                "properties": {
                    "field": {"type": "string"},
                    "code": {"type": "string"},
                    "message": {"type": "string"},
                    "limit": {"type": "integer"},
                },
            },
        },
    },
}


def problem_responses(*codes: ErrorCode) -> dict[int | str, dict[str, Any]]:
    """Describe error responses for an endpoint's OpenAPI ``responses``.

    Codes sharing a status are listed together, in ``x-error-codes`` and in the
    description, so generated clients and readers see every code an endpoint
    can return.

    Example:
        >>> @app.get("/v1/documents/{id}", responses=problem_responses(ErrorCode.NOT_FOUND))
        ... async def read(id: str) -> Document: ...

    Args:
        codes: the codes the endpoint can answer with.

    Returns:
        A mapping suitable for FastAPI's ``responses=`` argument.
    """
    by_status: dict[int, list[ErrorCode]] = {}
    for code in codes:
        by_status.setdefault(code.status, []).append(code)
    return {status: _response_for(members) for status, members in sorted(by_status.items())}


def _response_for(codes: Sequence[ErrorCode]) -> dict[str, Any]:
    names = sorted({code.value for code in codes})
    return {
        "description": "Error codes: " + ", ".join(names),
        "content": {PROBLEM_CONTENT_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        "x-error-codes": names,
    }
