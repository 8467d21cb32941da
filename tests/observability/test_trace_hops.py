"""Acceptance: one request crosses an HTTP hop and a message hop and stays one trace.

App A (bastion installed, driven in process) calls app B (bastion installed,
served by uvicorn on a real port) with an instrumented httpx client, then
publishes on NATS JetStream; a consumer pulls the message and handles it in a
span. Every span lands in one exporter, and the parent links must read
server A -> client -> server B, and server A -> producer -> consumer.

Until the request middleware's server span and ``bastion.testing.OtlpReceiver``
are in, the handlers start their server spans themselves from the inbound
headers and the spans are read from an ``InMemorySpanExporter``.
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import bastion
from bastion.observability._client_spans import instrument_httpx
from bastion.observability._propagation import consumer_span, extract_context, producer_span
from bastion.testing import lifespan_client

NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span made through the global provider during this test."""
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        # set_tracer_provider works once per process; whoever comes first sets it.
        trace.set_tracer_provider(TracerProvider())
        provider = trace.get_tracer_provider()
    assert isinstance(provider, TracerProvider)
    provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()


@pytest.fixture
def server_tracer(spans: InMemorySpanExporter) -> trace.Tracer:
    """Stands in for the middleware's server span: always samples, same exporter."""
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(spans))
    return provider.get_tracer("test.server")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def app_b(server_tracer) -> Iterator[str]:
    """The second bastion app, served by uvicorn on a real port in a thread."""
    app = FastAPI()
    bastion.install(app, database={"enabled": False}, logging={"access_log": False})

    @app.get("/stock")
    async def stock(request: Request) -> dict[str, int]:
        with server_tracer.start_as_current_span(
            "GET /stock", context=extract_context(request.headers), kind=SpanKind.SERVER
        ):
            return {"available": 3}

    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # A real server must bind before the test calls it; bounded at 10 s.
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
async def jetstream(service_unavailable):
    """A JetStream context and a stream of its own: (js, subject); deleted after."""
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:  # noqa: BLE001 -- any failure means the service is unusable
        service_unavailable("nats", f"{type(exc).__name__}: {exc}")
    token = secrets.token_hex(4)
    stream, subject = f"bastion_hops_{token}", f"bastion-hops.{token}.orders"
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[subject])
    try:
        yield js, subject
    finally:
        await js.delete_stream(stream)
        await nc.close()


class TestTraceAcrossHops:
    async def test_http_and_message_hops_make_one_trace(
        self, app_b, jetstream, spans, server_tracer
    ):
        """Server A -> client -> server B and server A -> producer -> consumer, one trace id."""
        js, subject = jetstream
        app_a = FastAPI()
        bastion.install(app_a, database={"enabled": False}, logging={"access_log": False})
        outbound = instrument_httpx(httpx.AsyncClient(timeout=5))

        @app_a.post("/orders")
        async def order(request: Request) -> dict[str, int]:
            with server_tracer.start_as_current_span(
                "POST /orders", context=extract_context(request.headers), kind=SpanKind.SERVER
            ):
                available = (await outbound.get(f"{app_b}/stock")).json()["available"]
                headers: dict[str, str] = {}
                with producer_span(subject, system="nats", headers=headers):
                    await js.publish(subject, b'{"order": 1}', headers=headers)
                return {"available": available}

        async with outbound, lifespan_client(app_a) as client:
            assert 200 == (await client.post("/orders")).status_code
        subscription = await js.pull_subscribe(subject)
        [message] = await subscription.fetch(1, timeout=5)
        with consumer_span(message.subject, message.headers, system="nats"):
            await asyncio.sleep(0)  # the handler's work
            await message.ack()

        by_name = {span.name: span for span in spans.get_finished_spans()}
        server_a, client, server_b = by_name["POST /orders"], by_name["GET"], by_name["GET /stock"]
        producer, consumer = by_name[f"publish {subject}"], by_name[f"process {subject}"]
        assert {server_a.context.trace_id} == {
            span.context.trace_id for span in (client, server_b, producer, consumer)
        }
        assert server_a.parent is None
        assert server_a.context.span_id == client.parent.span_id
        assert client.context.span_id == server_b.parent.span_id
        assert server_b.parent.is_remote
        assert server_a.context.span_id == producer.parent.span_id
        assert producer.context.span_id == consumer.parent.span_id
        assert consumer.parent.is_remote
