"""Every error answered over HTTP is RFC 9457 application/problem+json, and leaks nothing."""

import json

import pytest
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bastion
from bastion import errors
from bastion.errors import Conflict, FieldError, InvalidInput, ServiceUnavailable
from bastion.testing import lifespan_client

SECRET = "Sup3rS3cretValue"
PROBLEM = "application/problem+json"
MEMBERS = {"type", "title", "status", "detail", "code", "correlation_id"}


class Item(BaseModel):
    title: str = Field(max_length=10)
    count: int


def fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post("/items/{item_id}")
    async def create(item_id: int, item: Item) -> dict:
        return {"ok": True}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError(f"cannot reach postgresql://app:{SECRET}@db/app; password={SECRET}")

    @app.get("/conflict")
    async def conflict() -> dict:
        raise Conflict("The document changed.", headers={"ETag": '"v2"'}, extra={"version": 2})

    @app.get("/invalid")
    async def invalid() -> dict:
        raise InvalidInput(errors=[FieldError("query.sort", "not_allowed", "Unknown sort key.")])

    @app.get("/unavailable")
    async def unavailable() -> dict:
        raise ServiceUnavailable("Try again soon.", headers={"Retry-After": "5"})

    return app


def starlette_app() -> Starlette:
    async def create(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    async def boom(request: Request) -> JSONResponse:
        raise RuntimeError(f"cannot reach postgresql://app:{SECRET}@db/app; password={SECRET}")

    async def conflict(request: Request) -> JSONResponse:
        raise Conflict("The document changed.", headers={"ETag": '"v2"'}, extra={"version": 2})

    async def invalid(request: Request) -> JSONResponse:
        raise InvalidInput(errors=[FieldError("query.sort", "not_allowed", "Unknown sort key.")])

    async def unavailable(request: Request) -> JSONResponse:
        raise ServiceUnavailable("Try again soon.", headers={"Retry-After": "5"})

    return Starlette(
        routes=[
            Route("/items/{item_id}", create, methods=["POST"]),
            Route("/boom", boom),
            Route("/conflict", conflict),
            Route("/invalid", invalid),
            Route("/unavailable", unavailable),
        ]
    )


@pytest.fixture(params=["fastapi", "starlette"])
def app(request):
    """The same routes on FastAPI and on plain Starlette, with bastion installed."""
    app = fastapi_app() if request.param == "fastapi" else starlette_app()
    bastion.install(app, database={"enabled": False}, logging={"enabled": False})
    return app


def assert_problem(response, status: int, code: str) -> dict:
    """The response is a problem of this status and code, correlated with X-Request-Id."""
    assert (status, PROBLEM) == (response.status_code, response.headers["content-type"])
    body = response.json()
    assert MEMBERS <= set(body)
    assert (status, code) == (body["status"], body["code"])
    assert response.headers["x-request-id"] == body["correlation_id"]
    assert isinstance(body["detail"], str)
    assert body["type"].endswith(code.lower().replace("_", "-"))
    return body


class TestFrameworkErrors:
    async def test_unknown_path_is_404(self, app):
        """A path no route matches is a NOT_FOUND problem."""
        async with lifespan_client(app) as client:
            response = await client.get("/nope")
        assert_problem(response, 404, "NOT_FOUND")

    async def test_wrong_method_is_405_with_allow(self, app):
        """A known path with the wrong method is METHOD_NOT_ALLOWED and says what is allowed."""
        async with lifespan_client(app) as client:
            response = await client.get("/items/1")
        assert_problem(response, 405, "METHOD_NOT_ALLOWED")
        assert "POST" == response.headers["allow"]

    async def test_500_leaks_nothing(self, app):
        """An unhandled exception is INTERNAL with no trace, exception text or secret."""
        async with lifespan_client(app) as client:
            response = await client.get("/boom", headers={"X-Request-Id": "trace-me-1"})
        body = assert_problem(response, 500, "INTERNAL")
        assert "trace-me-1" == body["correlation_id"]
        for leak in (SECRET, "RuntimeError", "Traceback", "cannot reach", "postgresql", ".py"):
            assert leak not in response.text


class TestValidationErrors:
    @pytest.fixture
    def app(self):
        app = fastapi_app()
        bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        return app

    async def test_422_lists_field_errors(self, app):
        """Each invalid field is one {field, code, message} entry."""
        async with lifespan_client(app) as client:
            response = await client.post(
                "/items/not-a-number", json={"title": "x" * 11, "count": "many"}
            )
        body = assert_problem(response, 422, "INVALID_INPUT")
        fields = {error["field"]: error["code"] for error in body["errors"]}
        assert {
            "path.item_id": "int_parsing",
            "body.title": "string_too_long",
            "body.count": "int_parsing",
        } == fields
        limits = {error["field"]: error.get("limit") for error in body["errors"]}
        assert {"path.item_id": None, "body.title": 10, "body.count": None} == limits
        assert all(
            set(error) - {"limit"} == {"field", "code", "message"} for error in body["errors"]
        )

    async def test_only_too_long_is_input_too_long(self, app):
        """A body whose only fault is a value over its bound is INPUT_TOO_LONG, with the bound."""
        async with lifespan_client(app) as client:
            response = await client.post("/items/1", json={"title": "x" * 11, "count": 1})
        body = assert_problem(response, 422, "INPUT_TOO_LONG")
        [error] = body["errors"]
        assert {"field": "body.title", "code": "string_too_long", "limit": 10} == {
            key: error[key] for key in ("field", "code", "limit")
        }

    async def test_422_does_not_echo_the_input(self, app):
        """The rejected values (which may be secrets) are not in the response."""
        async with lifespan_client(app) as client:
            response = await client.post(
                "/items/1", json={"title": SECRET * 2, "count": SECRET, "extra": SECRET}
            )
        assert_problem(response, 422, "INVALID_INPUT")
        assert SECRET not in response.text

    async def test_missing_body_and_malformed_json(self, app):
        """A missing body and a body that is not JSON are INVALID_INPUT too."""
        async with lifespan_client(app) as client:
            missing = await client.post("/items/1")
            malformed = await client.post(
                "/items/1",
                content=b'{"title": ' + SECRET.encode(),
                headers={"content-type": "application/json"},
            )
        assert_problem(missing, 422, "INVALID_INPUT")
        assert_problem(malformed, 422, "INVALID_INPUT")
        assert SECRET not in malformed.text


class TestHttpExceptions:
    async def test_app_http_exception_keeps_its_detail_and_headers(self):
        """An HTTPException raised by the app is a problem with its own detail and headers."""
        app = FastAPI()
        bastion.install(app, database={"enabled": False}, logging={"enabled": False})

        @app.get("/teapot")
        async def teapot() -> dict:
            raise HTTPException(418, detail="Short and stout.", headers={"X-Pot": "1"})

        @app.get("/cached")
        async def cached() -> dict:
            raise HTTPException(304, headers={"ETag": '"v1"'})

        async with lifespan_client(app) as client:
            teapot_response = await client.get("/teapot")
            cached_response = await client.get("/cached")
        body = assert_problem(teapot_response, 418, "HTTP_ERROR")
        assert ("Short and stout.", "1") == (body["detail"], teapot_response.headers["x-pot"])
        assert (304, b"", '"v1"') == (
            cached_response.status_code,
            cached_response.content,
            cached_response.headers["etag"],
        )


class TestBastionErrors:
    async def test_subclass_renders_with_its_code_headers_and_extra(self, app):
        """A BastionError leaf renders its code, status, headers and extension members."""
        async with lifespan_client(app) as client:
            response = await client.get("/conflict")
        body = assert_problem(response, 409, "CONFLICT")
        assert ("The document changed.", 2) == (body["detail"], body["version"])
        assert '"v2"' == response.headers["etag"]

    async def test_invalid_input_renders_its_errors(self, app):
        """InvalidInput raised by the app has the same errors list as framework validation."""
        async with lifespan_client(app) as client:
            response = await client.get("/invalid")
        body = assert_problem(response, 422, "INVALID_INPUT")
        assert [
            {"field": "query.sort", "code": "not_allowed", "message": "Unknown sort key."}
        ] == body["errors"]

    async def test_service_unavailable_keeps_retry_after(self, app):
        """Headers of the error, such as Retry-After, reach the client."""
        async with lifespan_client(app) as client:
            response = await client.get("/unavailable")
        assert_problem(response, 503, "SERVICE_UNAVAILABLE")
        assert "5" == response.headers["retry-after"]


class TestProblemTypeBase:
    async def test_type_uses_the_configured_base(self, monkeypatch):
        """http.problem_type_base prefixes every problem type."""
        # The base is process-wide; restore it so later tests see the default.
        monkeypatch.setattr(errors, "_type_base", errors._type_base)
        app = FastAPI()
        bastion.install(
            app,
            database={"enabled": False},
            logging={"enabled": False},
            http={"problem_type_base": "https://errors.example.com/"},
        )
        async with lifespan_client(app) as client:
            response = await client.get("/nope")
        assert "https://errors.example.com/not-found" == response.json()["type"]


class TestOpenApi:
    def test_document_describes_errors_as_problems(self):
        """The OpenAPI document shows 422, 500 and 503 as Problem bodies with their codes."""
        app = fastapi_app()
        bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        schema = app.openapi()
        responses = schema["paths"]["/items/{item_id}"]["post"]["responses"]
        assert ["INPUT_TOO_LONG", "INVALID_INPUT"] == responses["422"]["x-error-codes"]
        assert ["INTERNAL"] == responses["500"]["x-error-codes"]
        assert ["SERVICE_UNAVAILABLE"] == responses["503"]["x-error-codes"]
        assert {PROBLEM} == set(responses["422"]["content"])
        assert "Problem" in schema["components"]["schemas"]
        assert "HTTPValidationError" not in schema["components"]["schemas"]
        assert schema is app.openapi()


class TestErrorLog:
    async def test_500_is_logged_with_the_secret_masked(self, capsysbinary, monkeypatch):
        """The error line names the request and exception, with every secret masked."""
        app = fastapi_app()
        bastion.install(app, database={"enabled": False}, logging={"format": "json"})
        async with lifespan_client(app) as client:
            await client.get("/boom", headers={"X-Request-Id": "boom-1"})
        output = capsysbinary.readouterr().out.decode()
        lines = [json.loads(line) for line in output.splitlines()]
        [error] = [line for line in lines if line["event"] == "unhandled error"]
        assert ("error", "boom-1", "bastion.request") == (
            error["level"],
            error["request_id"],
            error["logger"],
        )
        rendered = json.dumps(error["exception"])
        assert "RuntimeError" in rendered
        assert "postgresql://app:***@db/app" in rendered
        assert SECRET not in output
