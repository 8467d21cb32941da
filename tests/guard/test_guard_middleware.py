"""The request guard in an installed app: header, request-line, size, media type and JSON limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from starlette.responses import StreamingResponse
from starlette.routing import Route

import bastion
from bastion.errors import ConfigurationError
from bastion.guard._marks import limits
from bastion.guard._middleware import GuardMiddleware, GuardRoutes
from bastion.settings import GuardSettings

PROBLEM = "application/problem+json"
OFF = {"database": {"enabled": False}, "audit": {"enabled": False}, "flags": {"enabled": False}}


def make_app(install: dict[str, Any] | None = None, **guard: Any) -> FastAPI:
    """A FastAPI app with a route per way a route gets its limits, the guard inside bastion."""
    app = FastAPI()
    app.state.received = []

    async def keep(request: Request) -> dict[str, Any]:
        body = await request.body()
        request.app.state.received.append(body)
        return {"size": len(body)}

    @app.post("/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.put("/echo")
    async def echo_put(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.patch("/echo")
    async def echo_patch(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.get("/echo")
    async def echo_get(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.delete("/echo")
    async def echo_delete(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.post("/tiny")
    @limits(body=16)
    async def tiny(request: Request) -> dict[str, Any]:
        return await keep(request)

    @limits(body="small", content_types=["text/plain", "application/vnd.api+json"])
    @app.post("/marked")
    async def marked(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.post("/classed")
    async def classed(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.post("/overridden")
    @limits(body=32)
    async def overridden(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.post("/shallow")
    @limits(json_max_depth=2, json_max_elements=5)
    async def shallow(request: Request) -> dict[str, Any]:
        return await keep(request)

    @app.post("/upload")
    @limits(body=64, content_types=["application/octet-stream"])
    async def upload(request: Request) -> dict[str, Any]:
        chunks = [chunk async for chunk in request.stream()]
        request.app.state.received.append(b"".join(chunks))
        return {"size": sum(map(len, chunks))}

    @app.post("/upload/half")
    @limits(body=64, content_types=["application/octet-stream"])
    async def upload_half(request: Request) -> StreamingResponse:
        # Starts its answer before reading the body: a refusal can no longer be a 413.
        async def stream() -> AsyncIterator[bytes]:
            yield b"started;"
            async for chunk in request.stream():
                yield str(len(chunk)).encode()

        return StreamingResponse(stream())

    @app.post("/items/{item_id}")
    async def item(item_id: int, request: Request) -> dict[str, Any]:
        return await keep(request)

    swallowing = limits(body=64, content_types=["application/octet-stream"])(_Swallowing())
    app.router.routes.append(Route("/swallow", swallowing, methods=["POST"]))

    @app.post("/model")
    async def model(payload: dict[str, int]) -> dict[str, int]:
        return payload

    guard.setdefault("body_limits", {"default": 256, "small": 24, "big": 4096, "form": 48})
    guard.setdefault("route_classes", {"POST /classed": "big", "POST /overridden": "big"})
    overrides = {**OFF, "logging": {"level": "WARNING", "format": "json"}, **(install or {})}
    # The guard as bastion.install wires it (settings, position, start-up route reading).
    bastion.install(app, guard=guard, **overrides)
    wired = [entry for entry in app.user_middleware if entry.cls is GuardMiddleware]
    assert len(wired) == (1 if guard.get("enabled", True) else 0)
    return app


class _Swallowing:
    """A raw endpoint that reads its body, swallows any error and never answers."""

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        with contextlib.suppress(Exception):
            while (await receive()).get("more_body"):
                pass


@asynccontextmanager
async def started(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """The app inside its lifespan, with a client."""
    transport = httpx.ASGITransport(app=app)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        app.router.lifespan_context(app),
    ):
        yield client


@pytest.fixture
async def app() -> AsyncIterator[FastAPI]:
    """The default test app, started."""
    made = make_app()
    async with made.router.lifespan_context(made):
        yield made


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the started default app."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as c:
        yield c


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes
    messages: list[dict[str, Any]] = field(default_factory=list)

    def json(self) -> Any:
        return json.loads(self.body)


async def call(
    app: Any,
    method: str = "POST",
    path: str = "/echo",
    *,
    headers: list[tuple[bytes, bytes]] | None = None,
    chunks: list[bytes] | None = None,
    query: bytes = b"",
    raw_path: bytes | None = None,
    http_version: str = "1.1",
    disconnect_after: int | None = None,
    root_path: str = "",
) -> Answer:
    """Drive the app as a server would, with exactly these headers and body messages.

    ``disconnect_after``: the client leaves after that many body messages;
    ``raw_path=b""`` leaves ``raw_path`` out of the scope.
    """
    chunks = chunks if chunks is not None else []
    scope: dict[str, Any] = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": http_version,
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": raw_path if raw_path is not None else path.encode("utf-8", "replace"),
        "query_string": query,
        "root_path": root_path,
        "headers": headers if headers is not None else [(b"host", b"testserver")],
        "client": ("127.0.0.1", 40000),
        "server": ("testserver", 80),
        "state": {},
    }
    if raw_path == b"":
        del scope["raw_path"]  # a server that does not set it (it is optional in ASGI)
    done = asyncio.Event()
    sent = 0
    messages: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if disconnect_after is not None and sent >= disconnect_after:
            return {"type": "http.disconnect"}
        if sent < len(chunks):
            sent += 1
            return {
                "type": "http.request",
                "body": chunks[sent - 1],
                "more_body": sent < len(chunks),
            }
        if not chunks and sent == 0:
            sent = 1
            return {"type": "http.request", "body": b"", "more_body": False}
        await done.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message.get("more_body"):
            done.set()

    await asyncio.wait_for(app(scope, receive, send), timeout=10)
    start = next((m for m in messages if m["type"] == "http.response.start"), None)
    if start is None:
        return Answer(0, {}, b"", messages)
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    names = {k.decode().lower(): v.decode() for k, v in start["headers"]}
    return Answer(start["status"], names, body, messages)


def json_headers(body: bytes, media: bytes = b"application/json") -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"testserver"),
        (b"content-type", media),
        (b"content-length", str(len(body)).encode()),
    ]


def chunked_headers(media: bytes = b"application/json") -> list[tuple[bytes, bytes]]:
    return [
        (b"host", b"testserver"),
        (b"content-type", media),
        (b"transfer-encoding", b"chunked"),
    ]


def rejections(reason: str) -> float:
    return REGISTRY.get_sample_value("bastion_guard_rejections_total", {"reason": reason}) or 0.0


def assert_problem(answer: Any, status: int, code: str) -> dict[str, Any]:
    """The answer is the problem ``code`` whose correlation id is the echoed request id."""
    headers = answer.headers
    actual = answer.status_code if isinstance(answer, httpx.Response) else answer.status
    assert (status, PROBLEM) == (actual, headers["content-type"])
    body = answer.json()
    assert code == body["code"]
    assert body["correlation_id"]
    assert headers["x-request-id"] == body["correlation_id"]
    return body


def chunks_of(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)] or [b""]


class TestHeaderLimits:
    async def test_header_count_at_the_limit_passes(self, app):
        """Exactly ``max_header_count`` headers are accepted."""
        headers = [(b"host", b"testserver")] + [(f"x-h{n}".encode(), b"1") for n in range(99)]
        assert 200 == (await call(app, "GET", headers=headers)).status

    async def test_one_header_too_many_is_431(self, app):
        """One header over ``max_header_count`` answers 431 HEADERS_TOO_LARGE naming the limit."""
        before = rejections("header_count")
        headers = [(b"host", b"testserver")] + [(f"x-h{n}".encode(), b"1") for n in range(100)]
        answer = await call(app, "GET", headers=headers)
        body = assert_problem(answer, 431, "HEADERS_TOO_LARGE")
        assert 100 == body["limit"]
        assert before + 1 == rejections("header_count")

    async def test_header_bytes_at_the_limit_pass_and_one_more_fails(self, app):
        """Names and values add up to ``max_header_bytes`` at most; one byte more is a 431."""
        base = len(b"host") + len(b"testserver") + len(b"x-pad")
        exact = [(b"host", b"testserver"), (b"x-pad", b"a" * (16_384 - base))]
        assert 200 == (await call(app, "GET", headers=exact)).status
        over = [(b"host", b"testserver"), (b"x-pad", b"a" * (16_384 - base + 1))]
        before = rejections("header_size")
        body = assert_problem(await call(app, "GET", headers=over), 431, "HEADERS_TOO_LARGE")
        assert 16_384 == body["limit"]
        assert before + 1 == rejections("header_size")

    async def test_settings_set_the_header_limits(self):
        """``max_header_count`` and ``max_header_bytes`` come from the guard section."""
        app = make_app(max_header_count=8, max_header_bytes=1024)
        async with app.router.lifespan_context(app):
            eight = [(b"host", b"t")] + [(f"x-{n}".encode(), b"v") for n in range(7)]
            assert 200 == (await call(app, "GET", headers=eight)).status
            nine = [*eight, (b"x-9", b"v")]
            assert 431 == (await call(app, "GET", headers=nine)).status
            big = [(b"host", b"t"), (b"x", b"v" * (1024 - 6 + 1))]
            assert 431 == (await call(app, "GET", headers=big)).status


class TestRequestLine:
    async def test_query_at_the_limit_passes_and_one_byte_more_is_414(self, client):
        """A query string of ``max_query_bytes`` passes; one byte longer is 414 URI_TOO_LONG."""
        assert 200 == (await client.get("/echo?" + "q=" + "a" * (8192 - 2))).status_code
        before = rejections("query_size")
        response = await client.get("/echo?" + "q=" + "a" * (8192 - 1))
        body = assert_problem(response, 414, "URI_TOO_LONG")
        assert 8192 == body["limit"]
        assert before + 1 == rejections("query_size")

    @pytest.mark.parametrize(
        ("query", "code"),
        [
            (b"q=%FF", "invalid_utf8"),
            (b"q=%C3%28", "invalid_utf8"),
            (b"q=%ED%A0%80", "invalid_utf8"),  # an encoded surrogate
            (b"q=\xff", "invalid_utf8"),
            (b"q=a%00b", "nul_character"),
            (b"q=a\x00b", "nul_character"),
        ],
    )
    async def test_bad_query_encoding_is_422(self, app, query, code):
        """A query string that is not UTF-8 once decoded, or holds a NUL, is INVALID_INPUT."""
        before = rejections(code)
        answer = await call(app, "GET", query=query)
        body = assert_problem(answer, 422, "INVALID_INPUT")
        assert [{"field": "query", "code": code}] == [
            {"field": e["field"], "code": e["code"]} for e in body["errors"]
        ]
        assert before + 1 == rejections(code)

    async def test_good_query_encoding_passes(self, client):
        """Percent-encoded UTF-8 and plus signs pass."""
        response = await client.get("/echo", params={"q": "blåbær + 漢字 & co"})
        assert 200 == response.status_code

    @pytest.mark.parametrize(
        ("raw", "code"),
        [(b"/items/%FF", "invalid_utf8"), (b"/items/1%00", "nul_character")],
    )
    async def test_bad_path_encoding_is_422(self, app, raw, code):
        """A path that is not UTF-8 once decoded, or holds a NUL, is INVALID_INPUT (field path)."""
        path = raw.decode("latin-1").replace("%FF", "\ufffd").replace("%00", "\x00")
        answer = await call(
            app, "POST", path, raw_path=raw, headers=json_headers(b"{}"), chunks=[b"{}"]
        )
        body = assert_problem(answer, 422, "INVALID_INPUT")
        assert ("path", code) == (body["errors"][0]["field"], body["errors"][0]["code"])

    @pytest.mark.parametrize(
        ("path", "code"), [("/items/1\x00", "nul_character"), ("/items/\ud800", "invalid_utf8")]
    )
    async def test_path_without_raw_path_is_checked_after_decoding(self, app, path, code):
        """A server that gives no ``raw_path``: what survives decoding is still refused."""
        answer = await call(
            app, "POST", path, raw_path=b"", headers=json_headers(b"{}"), chunks=[b"{}"]
        )
        body = assert_problem(answer, 422, "INVALID_INPUT")
        assert ("path", code) == (body["errors"][0]["field"], body["errors"][0]["code"])

    async def test_unmatched_paths_pass_untouched(self, app):
        """A path no route matches is the router's 404, whatever its headers or query."""
        headers = [(b"host", b"testserver")] + [(f"x-h{n}".encode(), b"1") for n in range(200)]
        answer = await call(app, "GET", "/no/such/route", headers=headers, query=b"q=%FF")
        assert (404, "NOT_FOUND") == (answer.status, answer.json()["code"])

    async def test_operational_paths_pass_untouched(self, app):
        """Health probes and /metrics are never guarded."""
        headers = [(b"host", b"testserver")] + [(f"x-h{n}".encode(), b"1") for n in range(200)]
        answer = await call(app, "GET", "/metrics", headers=headers, query=b"q=%FF")
        assert 200 == answer.status


class TestBodySize:
    async def test_content_length_at_the_limit_passes(self, client, app):
        """A body exactly at the route's limit reaches the app whole."""
        body = b'"' + b"a" * 254 + b'"'
        assert 256 == len(body)
        response = await client.post(
            "/echo", content=body, headers={"content-type": "application/json"}
        )
        assert 200 == response.status_code
        assert body == app.state.received[-1]

    async def test_content_length_over_the_limit_is_refused_unread(self, app):
        """A declared length one byte over the limit is a 413 before any byte is read."""
        before = rejections("body_too_large")
        body = b'"' + b"a" * 255 + b'"'
        answer = await call(app, headers=json_headers(body), chunks=[body], disconnect_after=0)
        problem = assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")
        assert 256 == problem["limit"]
        assert "256 bytes" in problem["detail"]
        assert [] == app.state.received
        assert before + 1 == rejections("body_too_large")

    @pytest.mark.parametrize("media", [b"application/json", b"application/octet-stream"])
    async def test_chunked_body_at_the_limit_passes(self, media):
        """A chunked body that ends exactly at the limit reaches the app byte for byte."""
        app = make_app(content_types=["application/json", "application/octet-stream"])
        body = b"[" + b"1," * 127 + b"1]"
        body = body[: 256 - 2] + b"1]" if len(body) > 256 else body + b" " * (256 - len(body))
        assert 256 == len(body)
        async with app.router.lifespan_context(app):
            answer = await call(app, headers=chunked_headers(media), chunks=chunks_of(body, 10))
            assert 200 == answer.status
            assert [body] == app.state.received

    async def test_chunked_json_over_the_limit_never_reaches_the_app(self, app):
        """A chunked JSON body passing the limit is a 413 and the app never runs."""
        body = b"[" + b"1," * 200 + b"1]"
        answer = await call(app, headers=chunked_headers(), chunks=chunks_of(body, 50))
        assert 256 == assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")["limit"]
        assert [] == app.state.received

    async def test_streamed_upload_over_the_limit_is_413_and_never_truncated(self, app):
        """A chunked upload streamed to the app is refused when it passes the limit: 413."""
        before = rejections("body_too_large")
        answer = await call(
            app,
            path="/upload",
            headers=chunked_headers(b"application/octet-stream"),
            chunks=[b"x" * 30, b"x" * 30, b"x" * 5, b"x" * 30],
        )
        assert 64 == assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")["limit"]
        assert [] == app.state.received
        assert before + 1 == rejections("body_too_large")

    async def test_streamed_upload_at_the_limit_passes(self, app):
        """An upload of exactly the limit streams through whole."""
        chunks = [b"a" * 30, b"b" * 30, b"c" * 4]
        answer = await call(
            app, path="/upload", headers=chunked_headers(b"application/octet-stream"), chunks=chunks
        )
        assert (200, [b"".join(chunks)]) == (answer.status, app.state.received)

    async def test_refusal_after_the_response_started_ends_the_response(self, app):
        """Once the app has started answering, passing the limit cuts the response short."""
        answer = await call(
            app,
            path="/upload/half",
            headers=chunked_headers(b"application/octet-stream"),
            chunks=[b"x" * 40, b"x" * 40],
        )
        assert 200 == answer.status
        last = answer.messages[-1]
        # No final body message: the server closes the connection on an unfinished response.
        assert last.get("more_body", False) or last["type"] == "http.response.start"

    async def test_fastapi_body_parameters_get_413_not_400(self, app):
        """A FastAPI body model fed a chunked body over the limit answers 413, not 400."""
        app_with_stream = make_app(body_limits={"default": 20, "small": 24}, route_classes={})
        async with app_with_stream.router.lifespan_context(app_with_stream):
            answer = await call(
                app_with_stream,
                path="/model",
                headers=chunked_headers(),
                chunks=[b'{"a": 1, ', b'"b": 2, "c": 3}'],
            )
            assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")

    async def test_http2_body_without_length_is_counted(self, app):
        """Over HTTP/2 a body may come without Content-Length: it is counted all the same."""
        answer = await call(
            app,
            path="/upload",
            http_version="2",
            headers=[(b"host", b"t"), (b"content-type", b"application/octet-stream")],
            chunks=[b"x" * 40, b"x" * 40],
        )
        assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")
        fine = await call(
            app,
            path="/upload",
            http_version="2",
            headers=[(b"host", b"t"), (b"content-type", b"application/octet-stream")],
            chunks=[b"x" * 40],
        )
        assert 200 == fine.status

    async def test_refusal_swallowed_by_the_app_is_still_answered(self, app):
        """An app that catches the refusal and answers nothing still gets its client a 413."""
        answer = await call(
            app,
            path="/swallow",
            headers=chunked_headers(b"application/octet-stream"),
            chunks=[b"x" * 200, b"x" * 200],
        )
        assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")

    async def test_http2_body_of_an_unlisted_type_is_refused_at_its_first_byte(self, app):
        """Over HTTP/2 without a length, a body of the wrong type is a 415 once a byte comes."""
        h2 = [(b"host", b"t"), (b"content-type", b"text/csv")]
        answer = await call(app, path="/upload", http_version="2", headers=h2, chunks=[b"a,b"])
        assert_problem(answer, 415, "UNSUPPORTED_MEDIA_TYPE")
        empty = await call(app, "GET", http_version="2", headers=h2, chunks=[b""])
        assert 200 == empty.status

    async def test_the_root_path_is_not_part_of_the_template(self, app):
        """Behind a root path (``/api``), routes are matched below it, as the router does."""
        answer = await call(
            app,
            path="/api/tiny",
            raw_path=b"/api/tiny",
            headers=json_headers(b"1" * 17),
            chunks=[b"1" * 17],
            root_path="/api",
        )
        assert 16 == assert_problem(answer, 413, "PAYLOAD_TOO_LARGE")["limit"]

    async def test_client_leaving_mid_body_ends_the_request(self, app):
        """A client that disconnects mid-body leaves nothing running and the app sees nothing."""
        tasks = len(asyncio.all_tasks())
        answer = await call(
            app, headers=chunked_headers(), chunks=[b"[1,", b"2,", b"3]"], disconnect_after=1
        )
        assert 0 == answer.status
        assert [] == app.state.received
        upload = await call(
            app,
            path="/upload",
            headers=chunked_headers(b"application/octet-stream"),
            chunks=[b"x", b"y"],
            disconnect_after=1,
        )
        # The app's own reaction to the disconnect (Starlette raises ClientDisconnect),
        # not the guard's: the guard passes the disconnect on and adds nothing.
        assert [] == app.state.received
        assert upload.status != 413
        await asyncio.sleep(0)
        assert tasks >= len(asyncio.all_tasks())


class TestRouteClasses:
    async def test_a_mark_names_a_route_class(self, client):
        """``@limits(body="small")`` gives the route the size of that class."""
        ok = await client.post("/marked", content=b"a" * 24, headers={"content-type": "text/plain"})
        assert 200 == ok.status_code
        over = await client.post(
            "/marked", content=b"a" * 25, headers={"content-type": "text/plain"}
        )
        assert 24 == assert_problem(over, 413, "PAYLOAD_TOO_LARGE")["limit"]

    async def test_a_mark_gives_a_size_in_bytes(self, client):
        """``@limits(body=16)`` limits the route to 16 bytes."""
        headers = {"content-type": "application/json"}
        assert 200 == (await client.post("/tiny", content=b"1" * 16, headers=headers)).status_code
        over = await client.post("/tiny", content=b"1" * 17, headers=headers)
        assert 16 == assert_problem(over, 413, "PAYLOAD_TOO_LARGE")["limit"]

    async def test_settings_name_the_class_of_unmarked_routes(self, client):
        """``guard.route_classes`` gives ``POST /classed`` the ``big`` class."""
        body = b'"' + b"a" * 4094 + b'"'
        headers = {"content-type": "application/json"}
        assert 200 == (await client.post("/classed", content=body, headers=headers)).status_code
        over = await client.post("/classed", content=body + b" ", headers=headers)
        assert 4096 == assert_problem(over, 413, "PAYLOAD_TOO_LARGE")["limit"]

    async def test_the_mark_wins_over_the_settings(self, client):
        """A route both marked and listed in settings takes the mark's limit."""
        headers = {"content-type": "application/json"}
        over = await client.post("/overridden", content=b"1" * 33, headers=headers)
        assert 32 == assert_problem(over, 413, "PAYLOAD_TOO_LARGE")["limit"]

    async def test_settings_apply_only_to_their_method(self, client):
        """``POST /classed`` in settings says nothing of other methods of other routes."""
        body = b"1" * 257
        headers = {"content-type": "application/json"}
        assert 413 == (await client.put("/echo", content=body, headers=headers)).status_code

    async def test_parametrised_routes_are_guarded(self, client):
        """A route with a path parameter gets the default limits too."""
        headers = {"content-type": "application/json"}
        assert 200 == (await client.post("/items/3", content=b"{}", headers=headers)).status_code
        over = await client.post("/items/3", content=b"1" * 257, headers=headers)
        assert 413 == over.status_code

    def test_unknown_class_in_settings_stops_start_up(self):
        """A route class ``guard.body_limits`` does not define is a configuration error."""
        with pytest.raises(ConfigurationError, match="huge"):
            GuardRoutes(GuardSettings(route_classes={"POST /x": "huge"}))

    def test_settings_naming_no_route_are_only_a_warning(self):
        """A ``route_classes`` entry for a route the app lacks is logged, not fatal."""
        routes = GuardRoutes(GuardSettings(route_classes={"POST /nowhere": "upload"}))
        routes.read(FastAPI().router.routes)
        assert routes.resolve("POST", "/nowhere") is None

    def test_unknown_class_in_a_mark_stops_reading_routes(self):
        """A mark naming an undefined class fails when the routes are read (start-up)."""
        app = FastAPI()

        @app.post("/x")
        @limits(body="huge")
        async def x() -> None: ...

        with pytest.raises(ConfigurationError, match="huge"):
            GuardRoutes(GuardSettings()).read(app.router.routes)

    @pytest.mark.parametrize(
        "kwargs",
        [
            {"body": -1},
            {"body": True},
            {"body": " "},
            {"json_max_depth": 0},
            {"json_max_depth": 2000},
            {"json_max_elements": 0},
            {"content_types": "application/json"},
            {"content_types": ["json"]},
        ],
    )
    def test_mark_arguments_are_checked(self, kwargs):
        """``@limits`` refuses sizes, depths and media types it cannot honour."""
        with pytest.raises(ConfigurationError):
            limits(**kwargs)


class TestMediaType:
    async def test_missing_content_type_is_415(self, app):
        """A body without Content-Type answers 415 listing the accepted types."""
        before = rejections("media_type")
        answer = await call(
            app, headers=[(b"host", b"t"), (b"content-length", b"2")], chunks=[b"{}"]
        )
        body = assert_problem(answer, 415, "UNSUPPORTED_MEDIA_TYPE")
        assert "application/json" in body["accepted"]
        assert "application/json" in answer.headers["accept-post"]
        assert before + 1 == rejections("media_type")

    async def test_type_not_listed_is_415_with_accept_patch_for_patch(self, client):
        """A PATCH with an unlisted media type gets 415 and ``Accept-Patch``."""
        response = await client.patch("/echo", content=b"x", headers={"content-type": "text/csv"})
        body = assert_problem(response, 415, "UNSUPPORTED_MEDIA_TYPE")
        assert "text/csv" not in body["detail"]
        assert response.headers["accept-patch"] == ", ".join(body["accepted"])

    async def test_two_content_types_are_415(self, app):
        """Two Content-Type headers are refused: the app reads the first, so a JSON body
        sent as an allowed upload type second would escape the JSON checks."""
        deep = b"[" * 100 + b"]" * 100
        answer = await call(
            app,
            headers=[
                (b"host", b"t"),
                (b"content-type", b"application/json"),
                (b"content-type", b"multipart/form-data; boundary=x"),
                (b"content-length", str(len(deep)).encode()),
            ],
            chunks=[deep],
        )
        body = assert_problem(answer, 415, "UNSUPPORTED_MEDIA_TYPE")
        assert "exactly one" in body["detail"]

    async def test_parameters_and_case_are_ignored(self, client):
        """``Application/JSON; charset=utf-8`` is ``application/json``."""
        headers = {"content-type": "Application/JSON; charset=utf-8"}
        assert 200 == (await client.post("/echo", content=b"{}", headers=headers)).status_code

    async def test_the_mark_lists_its_own_types(self, client):
        """A route's own list replaces the settings' list."""
        json_body = await client.post(
            "/marked", content=b"{}", headers={"content-type": "application/json"}
        )
        assert ["text/plain", "application/vnd.api+json"] == assert_problem(
            json_body, 415, "UNSUPPORTED_MEDIA_TYPE"
        )["accepted"]
        api = await client.post(
            "/marked", content=b'{"a":1}', headers={"content-type": "application/vnd.api+json"}
        )
        assert 200 == api.status_code

    async def test_a_model_body_takes_json_only(self, client):
        """A FastAPI route with a model body lists only the JSON types it can read:
        a form sent there is a 415 naming them, not a 422 about a field never sent."""
        form = await client.post(
            "/model", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"}
        )
        body = assert_problem(form, 415, "UNSUPPORTED_MEDIA_TYPE")
        assert ["application/json", "application/merge-patch+json"] == body["accepted"]
        assert "application/json, application/merge-patch+json" == form.headers["accept-post"]
        assert 200 == (await client.post("/model", json={"a": 1})).status_code

    async def test_a_route_without_a_declared_body_keeps_the_whole_list(self, client):
        """A route that reads the request itself may take any listed type, forms included."""
        form = await client.post(
            "/echo", content=b"a=1", headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert 200 == form.status_code

    async def test_plus_json_types_are_inspected_as_json(self, client):
        """A listed ``+json`` media type gets the JSON checks."""
        response = await client.post(
            "/marked", content=b'{"a":', headers={"content-type": "application/vnd.api+json"}
        )
        assert "json_invalid" == assert_problem(response, 422, "INVALID_INPUT")["errors"][0]["code"]

    @pytest.mark.parametrize("method", ["GET", "DELETE", "HEAD", "OPTIONS"])
    async def test_bodyless_requests_need_no_content_type(self, app, method):
        """GET, HEAD, DELETE and OPTIONS without a body pass whatever their headers."""
        answer = await call(app, method, headers=[(b"host", b"t")])
        assert answer.status in {200, 405}
        zero = await call(app, method, headers=[(b"host", b"t"), (b"content-length", b"0")])
        assert zero.status in {200, 405}

    async def test_a_delete_with_a_body_is_checked(self, client):
        """A DELETE that does carry a body is held to the same rules."""
        response = await client.request(
            "DELETE", "/echo", content=b"x", headers={"content-type": "text/csv"}
        )
        assert 415 == response.status_code


class TestJsonBodies:
    @pytest.mark.parametrize(
        ("body", "code", "reason"),
        [
            (b'{"a": "\xff"}', "invalid_utf8", "invalid_utf8"),
            (b'{"a": "\xed\xa0\x80"}', "invalid_utf8", "invalid_utf8"),
            (b'{"a": "x\x00"}', "nul_character", "nul_character"),
            (b'{"a": "x\\u0000"}', "nul_character", "nul_character"),
            (b'{"a\\u0000": 1}', "nul_character", "nul_character"),
            (b'{"a": 1,}', "json_invalid", "json_invalid"),
            (b"{'a': 1}", "json_invalid", "json_invalid"),
            (b"[" * 33 + b"]" * 33, "too_deep", "json_depth"),
            (b"[" * 2000 + b"]" * 2000, "too_deep", "json_depth"),
        ],
    )
    async def test_refused_bodies(self, client, app, body, code, reason):
        """Each bad JSON body is a 422 INVALID_INPUT with its code on field ``body``."""
        app_limits = {"content-type": "application/json"}
        before = rejections(reason)
        response = await client.post("/classed", content=body, headers=app_limits)
        problem = assert_problem(response, 422, "INVALID_INPUT")
        assert [("body", code)] == [(e["field"], e["code"]) for e in problem["errors"]]
        assert before + 1 == rejections(reason)
        assert [] == app.state.received

    async def test_escaped_backslash_before_u0000_is_not_a_nul(self, client):
        """``"\\\\u0000"`` is a backslash then ``u0000``: accepted."""
        body = b'{"a": "\\\\u0000"}'
        response = await client.post(
            "/echo", content=body, headers={"content-type": "application/json"}
        )
        assert 200 == response.status_code

    async def test_malformed_json_names_line_and_column_not_content(self, client):
        """The json_invalid message gives a position and never quotes the body."""
        body = b'{\n  "secret-token-123": tru\n}'
        response = await client.post(
            "/echo", content=body, headers={"content-type": "application/json"}
        )
        error = assert_problem(response, 422, "INVALID_INPUT")["errors"][0]
        assert "line 2" in error["message"]
        assert "column" in error["message"]
        assert "secret" not in response.text
        assert "tru" not in response.text

    async def test_depth_at_the_limit_passes_and_one_more_fails(self, client):
        """A mark's depth 2 accepts ``[[1]]`` and refuses ``[[[1]]]`` with the limit."""
        headers = {"content-type": "application/json"}
        assert 200 == (await client.post("/shallow", content=b"[[1]]", headers=headers)).status_code
        response = await client.post("/shallow", content=b"[[[1]]]", headers=headers)
        error = assert_problem(response, 422, "INVALID_INPUT")["errors"][0]
        assert ("too_deep", 2) == (error["code"], error["limit"])

    async def test_elements_at_the_limit_pass_and_one_more_fails(self, client):
        """A mark's 5 values accept ``[1,2,3,4]`` (5 with the root) and refuse one more."""
        headers = {"content-type": "application/json"}
        assert (
            200
            == (await client.post("/shallow", content=b"[1,2,3,4]", headers=headers)).status_code
        )
        response = await client.post("/shallow", content=b"[1,2,3,4,5]", headers=headers)
        error = assert_problem(response, 422, "INVALID_INPUT")["errors"][0]
        assert ("too_many_elements", 5) == (error["code"], error["limit"])

    async def test_settings_limits_apply_to_unmarked_routes(self):
        """``guard.json_max_depth`` and ``json_max_elements`` bound every unmarked route."""
        app = make_app(json_max_depth=3, json_max_elements=4)
        async with started(app) as client:
            headers = {"content-type": "application/json"}
            assert (
                200 == (await client.post("/echo", content=b"[[[]]]", headers=headers)).status_code
            )
            assert (
                422
                == (await client.post("/echo", content=b"[[[[]]]]", headers=headers)).status_code
            )
            assert (
                200
                == (await client.post("/echo", content=b'{"a":[1,2]}', headers=headers)).status_code
            )
            assert (
                422
                == (
                    await client.post("/echo", content=b'{"a":[1,2,3]}', headers=headers)
                ).status_code
            )

    async def test_accepted_json_reaches_fastapi_models(self, client):
        """After the guard, FastAPI still parses and validates the body as usual."""
        response = await client.post("/model", json={"a": 1})
        assert (200, {"a": 1}) == (response.status_code, response.json())
        wrong = await client.post("/model", json={"a": "x"})
        assert 422 == wrong.status_code

    async def test_empty_json_body_is_left_to_the_app(self, app):
        """A chunked JSON request with no bytes at all passes; the app decides."""
        answer = await call(app, headers=chunked_headers(), chunks=[b""])
        assert (200, [b""]) == (answer.status, app.state.received)


class TestFormBodies:
    @pytest.mark.parametrize(
        ("body", "code"),
        [(b"a=%FF", "invalid_utf8"), (b"a=%00", "nul_character"), (b"a=\xc3", "invalid_utf8")],
    )
    async def test_bad_form_encoding_is_422(self, client, body, code):
        """A urlencoded form must be UTF-8 without NUL once decoded."""
        headers = {"content-type": "application/x-www-form-urlencoded"}
        response = await client.post("/echo", content=body, headers=headers)
        problem = assert_problem(response, 422, "INVALID_INPUT")
        assert [("body", code)] == [(e["field"], e["code"]) for e in problem["errors"]]

    async def test_good_form_reaches_the_app(self, client, app):
        """A valid form arrives byte for byte."""
        body = b"name=bl%C3%A5b%C3%A6r&x=a+b"
        headers = {"content-type": "application/x-www-form-urlencoded"}
        assert 200 == (await client.post("/echo", content=body, headers=headers)).status_code
        assert [body] == app.state.received

    async def test_multipart_is_checked_for_size_only(self, client, app):
        """Multipart bodies stream through; their bytes are not inspected."""
        response = await client.post("/echo", files={"f": ("a.bin", b"\x00\xff" * 10)})
        assert 200 == response.status_code
        assert b"\x00\xff" * 10 in app.state.received[-1]


class TestPassThrough:
    async def test_websockets_and_lifespan_pass(self):
        """Non-HTTP scopes reach the app untouched."""
        seen: list[str] = []

        async def inner(scope, receive, send):
            seen.append(scope["type"])

        guard = GuardMiddleware(inner, settings=GuardSettings())
        await guard({"type": "websocket", "path": "/ws"}, None, None)
        await guard({"type": "lifespan"}, None, None)
        assert ["websocket", "lifespan"] == seen

    async def test_a_disabled_guard_passes_everything(self):
        """``guard.enabled = false`` turns every check off."""
        app = make_app(enabled=False)
        async with started(app) as client:
            response = await client.post(
                "/tiny", content=b"1" * 100, headers={"content-type": "text/csv"}
            )
            assert 200 == response.status_code

    async def test_routes_added_after_start_are_read(self):
        """A route added after the first request is guarded too."""
        app = make_app()
        async with started(app) as client:
            await client.get("/echo")

            @app.post("/late")
            @limits(body=4)
            async def late(request: Request) -> dict[str, int]:
                return {"n": len(await request.body())}

            over = await client.post(
                "/late", content=b"12345", headers={"content-type": "application/json"}
            )
            assert 413 == over.status_code


class TestInTheFullStack:
    async def test_guard_sits_behind_identity_and_shared_rate_limits(
        self, database_url, redis_url, redis_prefix
    ):
        """With a real database, Redis limits and identity in front, refusals are still problems.

        The rate limiter (on Redis) counts the refused request first, so a client
        that only sends oversized bodies is still limited.
        """
        app = make_app(
            install={
                "database": {"url": database_url},
                "migrations": {"mode": "auto"},
                "redis": {"url": redis_url, "key_prefix": f"{redis_prefix}guard:"},
                "ratelimit": {"default": "3/minute"},
            }
        )
        headers = {"content-type": "application/json"}
        async with started(app) as client:
            ok = await client.post("/echo", content=b'{"a": 1}', headers=headers)
            assert 200 == ok.status_code
            assert [b'{"a": 1}'] == app.state.received
            too_big = await client.post("/tiny", content=b"1" * 17, headers=headers)
            assert_problem(too_big, 413, "PAYLOAD_TOO_LARGE")
            deep = await client.post("/echo", content=b"[" * 40 + b"]" * 40, headers=headers)
            assert_problem(deep, 422, "INVALID_INPUT")
            limited = await client.post("/tiny", content=b"1" * 17, headers=headers)
            assert 429 == limited.status_code


JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**53), 2**53)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=30,
)


class TestProperties:
    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(value=JSON_VALUES, indent=st.booleans(), chunk=st.integers(1, 64), chunked=st.booleans())
    async def test_accepted_bodies_arrive_byte_identical(self, app, value, indent, chunk, chunked):
        """Any JSON within the limits reaches the app exactly as sent, chunked or not."""
        body = json.dumps(value, indent=2 if indent else None, ensure_ascii=False).encode()
        depth, elements = reference_shape(value)
        app.state.received.clear()
        headers = chunked_headers() if chunked else json_headers(body)
        answer = await call(app, path="/classed", headers=headers, chunks=chunks_of(body, chunk))
        if len(body) > 4096:
            assert 413 == answer.status
        elif has_nul(value) or depth > 32 or elements > 10_000:
            assert 422 == answer.status
        else:
            assert 200 == answer.status, answer.body
            assert [body] == app.state.received

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(value=JSON_VALUES, chunk=st.integers(1, 64))
    async def test_shape_limits_decide_exactly_as_the_reference(self, app, value, chunk):
        """A body is accepted by a route with depth 2 and 5 values iff its shape is within them."""
        body = json.dumps(value).encode()
        if len(body) > 256 or has_nul(value):
            return
        depth, elements = reference_shape(value)
        answer = await call(
            app, path="/shallow", headers=chunked_headers(), chunks=chunks_of(body, chunk)
        )
        expected = 200 if depth <= 2 and elements <= 5 else 422
        assert expected == answer.status


def reference_shape(value: Any) -> tuple[int, int]:
    """Depth and value count, recursively: the definition the guard implements."""
    if isinstance(value, dict):
        shapes = [reference_shape(v) for v in value.values()]
    elif isinstance(value, list):
        shapes = [reference_shape(v) for v in value]
    else:
        return 0, 1
    return 1 + max((d for d, _ in shapes), default=0), 1 + sum(n for _, n in shapes)


def has_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any("\x00" in k or has_nul(v) for k, v in value.items())
    if isinstance(value, list):
        return any(has_nul(v) for v in value)
    return False
