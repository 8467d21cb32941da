"""Trace context in message headers, over a real NATS JetStream publish and consume."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from bastion.observability._propagation import (
    consumer_span,
    extract_context,
    inject_headers,
    producer_span,
)

NATS_URL = "nats://127.0.0.1:4222"


@pytest.fixture
async def jetstream(service_unavailable) -> AsyncIterator[tuple[object, str, str]]:
    """A JetStream context with a stream of its own: (js, stream, subject); deleted after."""
    import nats

    try:
        nc = await nats.connect(NATS_URL, connect_timeout=2, max_reconnect_attempts=0)
    except Exception as exc:  # noqa: BLE001 -- any failure means the service is unusable
        service_unavailable("nats", f"{type(exc).__name__}: {exc}")
    token = secrets.token_hex(4)
    stream, subject = f"bastion_test_{token}", f"bastion-test.{token}.orders"
    js = nc.jetstream()
    await js.add_stream(name=stream, subjects=[subject])
    try:
        yield js, stream, subject
    finally:
        await js.delete_stream(stream)
        await nc.close()


def span_named(spans: InMemorySpanExporter, name: str):
    [span] = [s for s in spans.get_finished_spans() if s.name == name]
    return span


class TestHeaders:
    def test_inject_writes_the_current_span(self, tracer):
        """Inside a span, inject_headers writes a traceparent naming that span."""
        headers: dict[str, str] = {}
        with tracer.start_as_current_span("work") as span:
            inject_headers(headers)
        context = span.get_span_context()
        flags = int(context.trace_flags)
        expected = f"00-{context.trace_id:032x}-{context.span_id:016x}-{flags:02x}"
        assert expected == headers["traceparent"]

    def test_inject_outside_a_span_writes_nothing(self, spans):
        """Outside any span there is no context to propagate, and no header is written."""
        headers: dict[str, str] = {"content-type": "application/json"}
        inject_headers(headers)
        assert {"content-type": "application/json"} == headers

    def test_extract_reads_header_names_in_any_case(self, tracer):
        """A producer outside bastion that writes Traceparent is still continued."""
        headers: dict[str, str] = {}
        with tracer.start_as_current_span("work") as span:
            inject_headers(headers)
        mixed = {"Traceparent": headers["traceparent"]}
        parent = trace.get_current_span(extract_context(mixed)).get_span_context()
        assert span.get_span_context().span_id == parent.span_id
        assert parent.is_remote

    def test_extract_without_headers_starts_a_new_trace(self, spans):
        """A message without a valid traceparent gives a consumer span with no parent."""
        with consumer_span("orders", {"traceparent": "00-bogus"}, system="nats"):
            pass
        assert span_named(spans, "process orders").parent is None

    def test_consumer_span_records_the_handlers_failure(self, spans):
        """A handler that raises leaves the consumer span in error, and the error propagates."""
        with pytest.raises(RuntimeError), consumer_span("orders", None, system="nats"):
            raise RuntimeError("boom")
        assert StatusCode.ERROR == span_named(spans, "process orders").status.status_code


class TestJetStream:
    async def test_consumed_message_continues_the_producers_trace(self, jetstream, spans, tracer):
        """Published with injected headers and pulled by a consumer: one trace, producer parent."""
        js, _stream, subject = jetstream
        with tracer.start_as_current_span("request"):
            headers: dict[str, str] = {}
            with producer_span(subject, system="nats", headers=headers):
                ack = await js.publish(subject, b'{"id": 1}', headers=headers)
        subscription = await js.pull_subscribe(subject, durable=f"consumer-{ack.seq}")
        [message] = await subscription.fetch(1, timeout=5)
        with consumer_span(
            message.subject, message.headers, system="nats", message_id=str(ack.seq)
        ):
            await message.ack()

        producer = span_named(spans, f"publish {subject}")
        consumer = span_named(spans, f"process {subject}")
        assert SpanKind.PRODUCER == producer.kind
        assert SpanKind.CONSUMER == consumer.kind
        assert producer.context.trace_id == consumer.context.trace_id
        assert producer.context.span_id == consumer.parent.span_id
        assert {
            "messaging.system": "nats",
            "messaging.destination.name": subject,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
            "messaging.message.id": str(ack.seq),
        } == dict(consumer.attributes)
        assert "send" == producer.attributes["messaging.operation.type"]


class TestTracerProvider:
    def test_message_spans_use_the_given_provider(self, spans, own):
        """producer_span/consumer_span(tracer_provider=p): both spans reach p's exporter only."""
        provider, exporter = own
        headers: dict[str, str] = {}
        with producer_span("orders", system="nats", headers=headers, tracer_provider=provider):
            pass
        with consumer_span("orders", headers, system="nats", tracer_provider=provider):
            pass
        assert (["publish orders", "process orders"], []) == (
            [s.name for s in exporter.get_finished_spans()],
            list(spans.get_finished_spans()),
        )
