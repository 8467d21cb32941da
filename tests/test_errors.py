"""The ErrorCode registry, the BastionError tree and RFC 9457 problem bodies."""

from http import HTTPStatus

import pytest

from bastion import errors
from bastion.errors import (
    BastionError,
    Conflict,
    DependencyFailure,
    ErrorCode,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    ServiceUnavailable,
    Unauthenticated,
    code_for_status,
    problem_body,
    problem_responses,
)

# The codes ARCHITECTURE.md names as public API, with the status each is answered with.
ARCHITECTURE_CODES = {
    "INVALID_INPUT": 422,
    "INPUT_TOO_LONG": 422,
    "PROMPT_INJECTION_DETECTED": 422,
    "SERVICE_UNAVAILABLE": 503,
    "DEPENDENCY_FAILURE": 502,
    "RATE_LIMITED": 429,
    "UNAUTHENTICATED": 401,
    "FORBIDDEN": 403,
    "NOT_FOUND": 404,
    "CONFLICT": 409,
    "PRECONDITION_FAILED": 412,
    "PRECONDITION_REQUIRED": 428,
    "IDEMPOTENCY_KEY_REUSED": 422,
    "ACCOUNT_LOCKED": 429,
    "QUOTA_EXCEEDED": 429,
    "PAYLOAD_TOO_LARGE": 413,
    "UNSUPPORTED_MEDIA_TYPE": 415,
    "MALWARE_DETECTED": 422,
    "VERSION_SUNSET": 410,
    "REQUEST_TIMEOUT": 504,
    "INTERNAL": 500,
}

RFC9457_MEMBERS = {"type", "title", "status", "detail"}


class TestErrorCode:
    @pytest.mark.parametrize(("name", "status"), sorted(ARCHITECTURE_CODES.items()))
    def test_architecture_code_exists_with_its_status(self, name, status):
        """Every code the architecture names exists, is its own value, and has its status."""
        code = ErrorCode[name]
        assert (name, status) == (code.value, code.status)

    @pytest.mark.parametrize("code", list(ErrorCode))
    def test_every_code_has_an_error_status_title_and_slug(self, code):
        """Each code maps to a real 4xx/5xx status, a non-empty title and a URI-safe slug."""
        assert 400 <= code.status < 600
        assert HTTPStatus(code.status)
        assert code.title.strip()
        assert code.value.lower().replace("_", "-") == code.slug

    def test_codes_are_strings(self):
        """Codes compare and serialize as their names (a StrEnum)."""
        assert "NOT_FOUND" == ErrorCode.NOT_FOUND
        assert "NOT_FOUND" == f"{ErrorCode.NOT_FOUND}"

    @pytest.mark.parametrize(
        ("status", "code"),
        [
            (400, ErrorCode.BAD_REQUEST),
            (401, ErrorCode.UNAUTHENTICATED),
            (403, ErrorCode.FORBIDDEN),
            (404, ErrorCode.NOT_FOUND),
            (405, ErrorCode.METHOD_NOT_ALLOWED),
            (406, ErrorCode.NOT_ACCEPTABLE),
            (409, ErrorCode.CONFLICT),
            (413, ErrorCode.PAYLOAD_TOO_LARGE),
            (415, ErrorCode.UNSUPPORTED_MEDIA_TYPE),
            (422, ErrorCode.INVALID_INPUT),
            (429, ErrorCode.RATE_LIMITED),
            (418, ErrorCode.HTTP_ERROR),
            (500, ErrorCode.INTERNAL),
            (501, ErrorCode.INTERNAL),
            (503, ErrorCode.SERVICE_UNAVAILABLE),
        ],
    )
    def test_code_for_framework_status(self, status, code):
        """A framework's HTTP error status maps to the matching code, else a generic one."""
        assert code == code_for_status(status)


class TestProblemBody:
    def test_has_every_member(self):
        """A body has the RFC 9457 members plus code and correlation_id."""
        body = problem_body(ErrorCode.NOT_FOUND, "No such document.", "req-1")
        assert {
            "type": "urn:bastion:problem:not-found",
            "title": "Resource not found",
            "status": 404,
            "detail": "No such document.",
            "code": "NOT_FOUND",
            "correlation_id": "req-1",
        } == body

    def test_detail_defaults_to_title(self):
        """Without a detail, the title stands in, so detail is always a string."""
        body = problem_body(ErrorCode.CONFLICT, None, None)
        assert (body["title"], None) == (body["detail"], body["correlation_id"])

    def test_status_override(self):
        """An explicit status replaces the code's default in the body."""
        assert 418 == problem_body(ErrorCode.HTTP_ERROR, "x", "r", status=418)["status"]

    def test_schema_requires_every_member_and_lists_every_code(self):
        """The OpenAPI Problem schema requires the members and enumerates all codes."""
        schema = errors.PROBLEM_SCHEMA
        assert RFC9457_MEMBERS | {"code", "correlation_id"} == set(schema["required"])
        assert [code.value for code in ErrorCode] == schema["properties"]["code"]["enum"]


class TestBastionError:
    @pytest.mark.parametrize(
        ("error_class", "code", "status"),
        [
            (BastionError, ErrorCode.INTERNAL, 500),
            (InvalidInput, ErrorCode.INVALID_INPUT, 422),
            (NotFound, ErrorCode.NOT_FOUND, 404),
            (Conflict, ErrorCode.CONFLICT, 409),
            (Forbidden, ErrorCode.FORBIDDEN, 403),
            (Unauthenticated, ErrorCode.UNAUTHENTICATED, 401),
            (PreconditionFailed, ErrorCode.PRECONDITION_FAILED, 412),
            (ServiceUnavailable, ErrorCode.SERVICE_UNAVAILABLE, 503),
            (DependencyFailure, ErrorCode.DEPENDENCY_FAILURE, 502),
        ],
    )
    def test_subclass_code_and_status(self, error_class, code, status):
        """Each leaf of the tree carries its code and that code's status."""
        error = error_class()
        assert (code, status) == (error.code, error.status)
        assert isinstance(error, BastionError)

    def test_overrides_and_extension_members(self):
        """code, status, headers and extra members given at raise time are used."""
        error = BastionError(
            "Slow down.",
            code=ErrorCode.RATE_LIMITED,
            status=503,
            headers={"Retry-After": "7"},
            extra={"retry_after": 7},
        )
        body = error.problem("req-9")
        assert (503, {"Retry-After": "7"}) == (error.status, error.headers)
        assert ("RATE_LIMITED", 503, 7, "Slow down.") == (
            body["code"],
            body["status"],
            body["retry_after"],
            body["detail"],
        )

    def test_message_is_the_detail(self):
        """str(error) is the detail, so logs show what the client was told."""
        assert "No such document." == str(NotFound("No such document."))

    def test_code_override_does_not_change_the_class(self):
        """Overriding the code on one instance leaves the class default alone."""
        NotFound(code=ErrorCode.VERSION_SUNSET)
        assert ErrorCode.NOT_FOUND == NotFound().code

    def test_invalid_input_lists_field_errors(self):
        """InvalidInput's body has an errors list of {field, code, message}."""
        error = InvalidInput(errors=[FieldError("body.title", "too_long", "At most 200.")])
        body = error.problem("req-2")
        assert [{"field": "body.title", "code": "too_long", "message": "At most 200."}] == body[
            "errors"
        ]
        assert RFC9457_MEMBERS <= set(body)

    def test_configuration_error_is_not_an_http_error(self):
        """ConfigurationError stops start-up; it is not rendered as a response."""
        assert not issubclass(errors.ConfigurationError, BastionError)


class TestProblemResponses:
    def test_groups_codes_by_status(self):
        """Codes that share a status are listed together under it."""
        responses = problem_responses(
            ErrorCode.NOT_FOUND, ErrorCode.INVALID_INPUT, ErrorCode.INPUT_TOO_LONG
        )
        assert [404, 422] == list(responses)
        assert ["INPUT_TOO_LONG", "INVALID_INPUT"] == responses[422]["x-error-codes"]
        assert "Error codes: INPUT_TOO_LONG, INVALID_INPUT" == responses[422]["description"]
        assert {"application/problem+json"} == set(responses[404]["content"])
