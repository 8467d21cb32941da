"""Client spans of outbound calls: httpx requests, database statements, Redis commands."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from sqlalchemy import text
from starlette.applications import Starlette

import bastion
from bastion.data import Database
from bastion.observability._client_spans import (
    TracingTransport,
    instrument_httpx,
    instrument_redis,
)
from bastion.settings import DatabaseSettings, TracingSettings


def client_spans(spans: InMemorySpanExporter):
    return [s for s in spans.get_finished_spans() if s.kind is SpanKind.CLIENT]


class _EchoHandler(BaseHTTPRequestHandler):
    """Answers with the request's headers as JSON; ``/fail`` answers 503."""

    def do_GET(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(503 if self.path.startswith("/fail") else 200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def echo_server() -> Iterator[str]:
    """A real HTTP server on a free port that echoes the headers it received."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EchoHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


class TestHttpClient:
    async def test_request_gets_a_client_span_and_injects_it(self, echo_server, spans, tracer):
        """The server receives a traceparent naming the client span, a child of the caller's."""
        async with instrument_httpx(httpx.AsyncClient()) as client:
            with tracer.start_as_current_span("request") as parent:
                response = await client.get(f"{echo_server}/items")
        [span] = client_spans(spans)
        context = span.context
        flags = int(context.trace_flags)
        assert (
            f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
            == (response.json()["traceparent"])
        )
        assert parent.get_span_context().span_id == span.parent.span_id
        port = int(echo_server.rsplit(":", 1)[1])
        assert {
            "http.request.method": "GET",
            "url.full": f"{echo_server}/items",
            "server.address": "127.0.0.1",
            "server.port": port,
            "http.response.status_code": 200,
        } == dict(span.attributes)
        assert "GET" == span.name

    async def test_url_keeps_no_credentials_or_query_values(self, echo_server, spans, tracer):
        """url.full drops the password and replaces every query value."""
        url = echo_server.replace("http://", "http://alice:s3cret@") + "/items?token=abc&page=2"
        async with instrument_httpx(httpx.AsyncClient()) as client:
            with tracer.start_as_current_span("request"):
                await client.get(url)
        [span] = client_spans(spans)
        assert f"{echo_server}/items?token=REDACTED&page=REDACTED" == span.attributes["url.full"]

    async def test_server_error_marks_the_span(self, echo_server, spans, tracer):
        """A 5xx answer leaves the client span in error with error.type the status."""
        async with instrument_httpx(httpx.AsyncClient()) as client:
            with tracer.start_as_current_span("request"):
                await client.get(f"{echo_server}/fail")
        [span] = client_spans(spans)
        assert (StatusCode.ERROR, "503") == (span.status.status_code, span.attributes["error.type"])

    async def test_connection_failure_marks_the_span(self, spans, tracer):
        """A request that raises leaves the span in error with the exception's class."""
        transport = TracingTransport(httpx.AsyncHTTPTransport(retries=0))
        async with httpx.AsyncClient(transport=transport, timeout=2) as client:
            with tracer.start_as_current_span("request"), pytest.raises(httpx.ConnectError):
                await client.get("http://127.0.0.1:9/")
        [span] = client_spans(spans)
        assert (StatusCode.ERROR, "ConnectError") == (
            span.status.status_code,
            span.attributes["error.type"],
        )

    async def test_switched_off_leaves_the_client_alone(self, echo_server, spans, tracer):
        """trace_http_client=false: no wrapper, no span, no traceparent sent."""
        client = httpx.AsyncClient()
        transport = client._transport
        instrument_httpx(client, settings=TracingSettings(trace_http_client=False))
        async with client:
            with tracer.start_as_current_span("request"):
                response = await client.get(f"{echo_server}/items")
        assert transport is client._transport
        assert [] == client_spans(spans)
        assert "traceparent" not in response.json()

    async def test_instrumenting_twice_makes_one_span(self, echo_server, spans, tracer):
        """A client instrumented twice still makes one span per request."""
        client = instrument_httpx(instrument_httpx(httpx.AsyncClient()))
        async with client:
            with tracer.start_as_current_span("request"):
                await client.get(f"{echo_server}/items")
        assert 1 == len(client_spans(spans))


class TestDatabase:
    async def test_statement_gets_a_span_without_its_values(self, database_url, spans, tracer):
        """A statement in a trace gets a CLIENT span with its template, never the bound value."""
        database = Database(DatabaseSettings(url=database_url), trace=True)
        try:
            with tracer.start_as_current_span("request") as parent:
                async with database.engine.connect() as connection:
                    await connection.execute(text("SELECT :word AS w"), {"word": "hunter2"})
        finally:
            await database.aclose()
        [span] = client_spans(spans)
        assert parent.get_span_context().span_id == span.parent.span_id
        assert ("SELECT", "SELECT") == (span.name, span.attributes["db.operation.name"])
        assert database.engine.dialect.name == span.attributes["db.system.name"]
        assert "hunter2" not in json.dumps(dict(span.attributes))
        assert span.attributes["db.query.text"].startswith("SELECT ")

    async def test_failed_statement_is_in_error(self, sqlite_url, spans, tracer):
        """A statement that fails ends its span in error with the exception's class."""
        database = Database(DatabaseSettings(url=sqlite_url), trace=True)
        try:
            with tracer.start_as_current_span("request"):
                async with database.engine.connect() as connection:
                    with pytest.raises(Exception, match="no such table"):
                        await connection.execute(text("SELECT * FROM missing"))
        finally:
            await database.aclose()
        [span] = client_spans(spans)
        assert (StatusCode.ERROR, "OperationalError") == (
            span.status.status_code,
            span.attributes["error.type"],
        )

    async def test_no_span_outside_a_trace_or_when_off(self, sqlite_url, spans, tracer):
        """Statements outside a trace, or on an engine built with trace=False, make no span."""
        traced = Database(DatabaseSettings(url=sqlite_url), trace=True)
        untraced = Database(DatabaseSettings(url=sqlite_url))
        try:
            await traced.ping()
            with tracer.start_as_current_span("request"):
                await untraced.ping()
        finally:
            await traced.aclose()
            await untraced.aclose()
        assert [] == client_spans(spans)


class TestRedis:
    @pytest.fixture
    async def redis(self, redis_url):
        import redis.asyncio

        client = instrument_redis(redis.asyncio.from_url(redis_url, socket_timeout=2))
        yield client
        await client.aclose()

    async def test_command_gets_a_span_without_arguments(self, redis, redis_prefix, spans, tracer):
        """SET in a trace gets a CLIENT span named by the command; key and value stay out."""
        with tracer.start_as_current_span("request") as parent:
            await redis.set(f"{redis_prefix}user", "hunter2")
        [span] = client_spans(spans)
        assert parent.get_span_context().span_id == span.parent.span_id
        assert ("SET", "SET", "redis") == (
            span.name,
            span.attributes["db.operation.name"],
            span.attributes["db.system.name"],
        )
        attributes = json.dumps(dict(span.attributes))
        assert "hunter2" not in attributes
        assert redis_prefix not in attributes

    async def test_pipeline_is_one_span(self, redis, redis_prefix, spans, tracer):
        """A transaction of two commands is one MULTI span with its batch size."""
        with tracer.start_as_current_span("request"):
            async with redis.pipeline(transaction=True) as pipe:
                await pipe.set(f"{redis_prefix}a", 1).incr(f"{redis_prefix}a").execute()
        [span] = client_spans(spans)
        assert ("MULTI", 2) == (span.name, span.attributes["db.operation.batch.size"])

    async def test_no_span_outside_a_trace(self, redis, spans):
        """A command outside a sampled trace (a probe's PING) makes no span."""
        await redis.ping()
        assert [] == client_spans(spans)

    @pytest.mark.parametrize("trace_redis", [True, False])
    async def test_install_follows_trace_redis(self, redis_url, trace_redis, recording):
        """bastion.install instruments its Redis client only when tracing.trace_redis is on."""
        exporter = InMemorySpanExporter()
        runtime = bastion.install(
            Starlette(),
            redis={"url": redis_url},
            database={"enabled": False},
            tracing={"trace_redis": trace_redis, **recording},
        )
        runtime.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
        try:
            with runtime.tracing.tracer.start_as_current_span("request"):
                await runtime.redis.ping()
        finally:
            await runtime.redis.aclose()
            await runtime.tracing.shutdown()
        assert trace_redis == bool(client_spans(exporter))


class TestTracerProvider:
    """Given ``tracer_provider=``, spans go to that provider, never to the global one."""

    async def test_httpx_uses_the_given_provider(self, echo_server, spans, own):
        """instrument_httpx(tracer_provider=p): the CLIENT span reaches p's exporter only."""
        provider, exporter = own
        with provider.get_tracer("test").start_as_current_span("request"):
            async with instrument_httpx(httpx.AsyncClient(), tracer_provider=provider) as client:
                await client.get(echo_server)
        assert (["GET"], []) == (
            [s.name for s in client_spans(exporter)],
            client_spans(spans),
        )

    async def test_database_uses_the_given_provider(self, sqlite_url, spans, own):
        """Database(tracer_provider=p): statement spans reach p's exporter only."""
        provider, exporter = own
        database = Database(DatabaseSettings(url=sqlite_url), trace=True, tracer_provider=provider)
        try:
            with provider.get_tracer("test").start_as_current_span("request"):
                await database.ping()
        finally:
            await database.aclose()
        assert (["SELECT"], []) == (
            [s.name for s in client_spans(exporter)],
            client_spans(spans),
        )

    async def test_redis_uses_the_given_provider(self, redis_url, spans, own):
        """instrument_redis(client, p): command spans reach p's exporter only."""
        import redis.asyncio

        provider, exporter = own
        client = instrument_redis(redis.asyncio.from_url(redis_url, socket_timeout=2), provider)
        try:
            with provider.get_tracer("test").start_as_current_span("request"):
                await client.ping()
        finally:
            await client.aclose()
        assert (["PING"], []) == (
            [s.name for s in client_spans(exporter)],
            client_spans(spans),
        )

    async def test_install_gives_redis_the_apps_provider(self, redis_url, spans, recording):
        """bastion.install instruments its Redis client with the app's own provider."""
        exporter = InMemorySpanExporter()
        runtime = bastion.install(
            Starlette(), redis={"url": redis_url}, database={"enabled": False}, tracing=recording
        )
        assert runtime.tracing is not None
        runtime.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
        try:
            with runtime.tracing.tracer.start_as_current_span("request"):
                await runtime.redis.ping()
        finally:
            await runtime.redis.aclose()
            await runtime.tracing.shutdown()
        assert ["PING"] == [s.name for s in client_spans(exporter)]

    async def test_install_gives_the_database_the_apps_provider(self, sqlite_url, recording):
        """bastion.install builds its Database with the app's own provider."""
        exporter = InMemorySpanExporter()
        runtime = bastion.install(Starlette(), database={"url": sqlite_url}, tracing=recording)
        assert runtime.tracing is not None
        assert runtime.database is not None
        runtime.tracing.provider.add_span_processor(SimpleSpanProcessor(exporter))
        try:
            with runtime.tracing.tracer.start_as_current_span("request"):
                await runtime.database.ping()
        finally:
            await runtime.database.aclose()
            await runtime.tracing.shutdown()
        assert ["SELECT"] == [s.name for s in client_spans(exporter)]
