"""Acceptance: one request crosses an HTTP hop and a message hop and stays one trace.

App A and app B are both bastion-installed, each exporting over OTLP/HTTP to one
real :class:`~bastion.testing.OtlpReceiver`. A's handler calls B, served by
uvicorn on a real port, through an httpx client instrumented with A's provider,
then publishes on NATS JetStream inside a producer span; a consumer pulls the
message and handles it inside a consumer span. The server spans are the
middleware's own. From what the receiver decoded, the links must read
server A -> client -> server B and server A -> producer -> consumer, in one trace.

Every span is made with an app's own provider, so the test holds whichever
provider is the process's global one.
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
from fastapi import FastAPI

import bastion
from bastion.observability._client_spans import instrument_httpx
from bastion.observability._propagation import consumer_span, producer_span
from bastion.testing import OtlpReceiver, ReceivedSpan, lifespan_client

NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    """A real OTLP/HTTP receiver both apps export to."""
    with OtlpReceiver() as running:
        yield running


def make_app(receiver: OtlpReceiver, service: str) -> FastAPI:
    app = FastAPI()
    bastion.install(
        app,
        database={"enabled": False},
        logging={"access_log": False},
        tracing={"exporter": "otlp-http", "endpoint": receiver.endpoint, "service_name": service},
    )
    return app


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def app_b(receiver: OtlpReceiver) -> Iterator[tuple[str, FastAPI]]:
    """App B, served by uvicorn on a real port in a thread: (base URL, app)."""
    app = make_app(receiver, "app-b")

    @app.get("/stock")
    async def stock() -> dict[str, int]:
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
    yield f"http://127.0.0.1:{port}", app
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


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


def only(spans: list[ReceivedSpan], name: str) -> ReceivedSpan:
    [span] = [span for span in spans if span.name == name]
    return span


class TestTraceAcrossHops:
    async def test_http_and_message_hops_make_one_trace(self, receiver, app_b, jetstream):
        """Server A -> client -> server B and server A -> producer -> consumer, one trace id."""
        js, subject = jetstream
        url_b, served_b = app_b
        app_a = make_app(receiver, "app-a")
        provider = app_a.state.bastion.tracing.provider
        outbound = instrument_httpx(httpx.AsyncClient(timeout=5), tracer_provider=provider)

        @app_a.post("/orders")
        async def order() -> dict[str, int]:
            available = (await outbound.get(f"{url_b}/stock")).json()["available"]
            headers: dict[str, str] = {}
            with producer_span(subject, system="nats", headers=headers, tracer_provider=provider):
                await js.publish(subject, b'{"order": 1}', headers=headers)
            return {"available": available}

        # The consumer is part of app A (its provider); it runs inside A's lifespan,
        # whose shutdown flushes A's spans to the receiver.
        async with outbound, lifespan_client(app_a) as client:
            assert 200 == (await client.post("/orders")).status_code
            subscription = await js.pull_subscribe(subject)
            [message] = await subscription.fetch(1, timeout=5)
            with consumer_span(
                message.subject, message.headers, system="nats", tracer_provider=provider
            ):
                await asyncio.sleep(0)  # the handler's work
                await message.ack()
        # A's shutdown flushed A; B still serves, so its queued span is flushed here
        # rather than after the batch delay. Five spans: A's four and B's one.
        await asyncio.to_thread(served_b.state.bastion.tracing.provider.force_flush)
        spans = await receiver.wait_for_async(5)

        server_a, client_a = only(spans, "POST /orders"), only(spans, "GET")
        server_b = only(spans, "GET /stock")
        producer, consumer = only(spans, f"publish {subject}"), only(spans, f"process {subject}")
        assert [
            ("SERVER", "app-a"),
            ("CLIENT", "app-a"),
            ("SERVER", "app-b"),
            ("PRODUCER", "app-a"),
            ("CONSUMER", "app-a"),
        ] == [(s.kind, s.service_name) for s in (server_a, client_a, server_b, producer, consumer)]
        assert {server_a.trace_id} == {
            span.trace_id for span in (client_a, server_b, producer, consumer)
        }
        assert server_a.parent_span_id is None
        assert server_a.span_id == client_a.parent_span_id
        assert client_a.span_id == server_b.parent_span_id
        assert server_a.span_id == producer.parent_span_id
        assert producer.span_id == consumer.parent_span_id
