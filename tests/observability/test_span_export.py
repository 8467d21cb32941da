"""Bastion's OTLP/HTTP span exporter: the SDK's bytes, sent with the SDK exporter's retry rules."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import (
    Link,
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    StatusCode,
    TraceFlags,
    TraceState,
    set_span_in_context,
)

from bastion.observability._span_export import OtlpHttpSpanExporter, encode_spans
from bastion.observability._tracing import build_tracing
from bastion.settings import TracingSettings
from bastion.testing import OtlpReceiver


class _Keep(SpanExporter):
    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


_text = st.text(max_size=12)
_scalar = st.one_of(
    _text,
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
_value = st.one_of(
    _scalar,
    st.lists(_text, max_size=3),
    st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=3),
    st.lists(st.booleans(), max_size=3),
    st.lists(st.floats(allow_nan=False), max_size=3),
)
_attributes = st.dictionaries(st.text(min_size=1, max_size=10), _value, max_size=6)
_ids = st.integers(min_value=1, max_value=2**64 - 1)
_span_spec = st.fixed_dictionaries(
    {
        "name": _text,
        "kind": st.sampled_from(list(SpanKind)),
        "attributes": _attributes,
        "events": st.lists(st.tuples(_text, _attributes), max_size=2),
        "parent": st.one_of(
            st.none(),
            st.tuples(
                st.integers(min_value=1, max_value=2**128 - 1),
                _ids,
                st.booleans(),
                st.lists(st.sampled_from(["a=1", "vendor=x", "k@t=v"]), max_size=2, unique=True),
            ),
        ),
        "links": st.lists(st.tuples(_ids, _ids, st.booleans(), _attributes), max_size=2),
        "status": st.one_of(
            st.none(), st.tuples(st.sampled_from([StatusCode.OK, StatusCode.ERROR]), _text)
        ),
        "tracer": st.sampled_from(["a", "b"]),
    }
)


def _make_spans(specs: list[dict[str, Any]]) -> list[ReadableSpan]:
    kept = _Keep()
    provider = TracerProvider(resource=Resource.create({"service.name": "svc", "n": 1}))
    provider.add_span_processor(SimpleSpanProcessor(kept))
    tracers = {
        "a": provider.get_tracer("a", "1.0", schema_url="https://schema/1"),
        "b": provider.get_tracer("b"),
    }
    for spec in specs:
        context = None
        if spec["parent"] is not None:
            trace_id, span_id, remote, members = spec["parent"]
            state = TraceState([tuple(member.split("=")) for member in members])
            parent = SpanContext(trace_id, span_id, remote, TraceFlags(1), state)
            context = set_span_in_context(NonRecordingSpan(parent))
        links = [
            Link(SpanContext(t, s, remote, TraceFlags(1)), attributes)
            for t, s, remote, attributes in spec["links"]
        ]
        span = tracers[spec["tracer"]].start_span(
            spec["name"],
            context=context,
            kind=spec["kind"],
            attributes=spec["attributes"],
            links=links,
        )
        for name, attributes in spec["events"]:
            span.add_event(name, attributes)
        if spec["status"] is not None:
            code, description = spec["status"]
            span.set_status(code, description if code is StatusCode.ERROR else None)
        span.end()
    return kept.spans


class TestEncoding:
    @settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(st.lists(_span_spec, min_size=1, max_size=6))
    def test_bytes_equal_the_sdk_encoders(self, specs: list[dict[str, Any]]) -> None:
        """For any spans (every attribute type, events, links, status, remote parents, trace state,
        several scopes), the request bytes are exactly those the SDK's encoder serializes."""
        spans = _make_spans(specs)
        assert encode_spans(spans) == sdk_encode(spans).SerializeToString()

    def test_an_unsupported_attribute_is_left_out_and_the_span_still_sent(self) -> None:
        """A value no OTLP type can carry costs that attribute, not the span (as the SDK)."""
        spans = _make_spans(
            [{"name": "s", "kind": SpanKind.INTERNAL, "attributes": {"ok": 1}, "events": [],
              "parent": None, "links": [], "status": None, "tracer": "b"}]
        )  # fmt: skip
        spans[0]._attributes._dict["bad"] = object()  # type: ignore[attr-defined]  # a value the SDK's own checks would have refused
        encoded = encode_spans(spans)
        spans[0]._attributes._dict.pop("bad")  # type: ignore[attr-defined]  # back to what the SDK encodes
        assert encoded == sdk_encode(spans).SerializeToString()


class _Collector:
    """A real HTTP server answering exports with a scripted list of statuses."""

    def __init__(self, statuses: list[int], retry_after: str | None = None) -> None:
        self.statuses = statuses
        self.retry_after = retry_after
        self.bodies: list[bytes] = []
        self.times: list[float] = []
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                collector.bodies.append(body)
                collector.times.append(time.monotonic())
                status = collector.statuses.pop(0) if collector.statuses else 200
                self.send_response(status)
                if collector.retry_after is not None and status != 200:
                    self.send_header("Retry-After", collector.retry_after)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def one_span() -> list[ReadableSpan]:
    return _make_spans(
        [{"name": "GET /x", "kind": SpanKind.SERVER, "attributes": {"http.route": "/x"},
          "events": [], "parent": None, "links": [], "status": None, "tracer": "a"}]
    )  # fmt: skip


@pytest.fixture
def collector_factory() -> Iterator[Any]:
    made: list[_Collector] = []

    def make(statuses: list[int], retry_after: str | None = None) -> _Collector:
        made.append(_Collector(statuses, retry_after))
        return made[-1]

    yield make
    for collector in made:
        collector.close()


class TestSending:
    def test_a_transient_status_is_retried_until_accepted(
        self, collector_factory: Any, one_span: list[ReadableSpan]
    ) -> None:
        """503 then 200: one batch, two deliveries, success; the body is the encoded batch."""
        collector = collector_factory([503])
        exporter = OtlpHttpSpanExporter(collector.url, headers={"x-api-key": "k"}, timeout=5)
        assert exporter.export(one_span) is SpanExportResult.SUCCESS
        assert collector.bodies == [encode_spans(one_span)] * 2

    def test_a_permanent_status_is_not_retried(
        self, collector_factory: Any, one_span: list[ReadableSpan]
    ) -> None:
        """400 means the collector will never take this batch: dropped at once."""
        collector = collector_factory([400, 200])
        exporter = OtlpHttpSpanExporter(collector.url, timeout=5)
        assert exporter.export(one_span) is SpanExportResult.FAILURE
        assert len(collector.bodies) == 1

    def test_retry_after_is_honoured(
        self, collector_factory: Any, one_span: list[ReadableSpan]
    ) -> None:
        """The collector's Retry-After decides the wait, not the exporter's backoff."""
        collector = collector_factory([429], retry_after="0.3")
        exporter = OtlpHttpSpanExporter(collector.url, timeout=5)
        assert exporter.export(one_span) is SpanExportResult.SUCCESS
        assert collector.times[1] - collector.times[0] >= 0.25

    def test_retries_stop_at_the_timeout(
        self, collector_factory: Any, one_span: list[ReadableSpan]
    ) -> None:
        """A collector that keeps failing costs one export at most its timeout, then a failure."""
        collector = collector_factory([503] * 100)
        exporter = OtlpHttpSpanExporter(collector.url, timeout=1.5)
        started = time.monotonic()
        assert exporter.export(one_span) is SpanExportResult.FAILURE
        assert time.monotonic() - started < 2.0

    def test_an_unreachable_collector_fails_within_the_timeout(
        self, one_span: list[ReadableSpan]
    ) -> None:
        """Connection refused is retried, and the export still ends by its timeout."""
        exporter = OtlpHttpSpanExporter("http://127.0.0.1:9/v1/traces", timeout=1.0)
        started = time.monotonic()
        assert exporter.export(one_span) is SpanExportResult.FAILURE
        assert time.monotonic() - started < 1.5

    def test_shutdown_interrupts_a_wait_and_refuses_later_batches(
        self, collector_factory: Any, one_span: list[ReadableSpan]
    ) -> None:
        """Shutting down does not sit out a backoff; batches after it are refused."""
        collector = collector_factory([503] * 100, retry_after="5")
        exporter = OtlpHttpSpanExporter(collector.url, timeout=30)
        results: list[SpanExportResult] = []
        worker = threading.Thread(target=lambda: results.append(exporter.export(one_span)))
        worker.start()
        time.sleep(0.3)
        exporter.shutdown()
        worker.join(timeout=2)
        assert results == [SpanExportResult.FAILURE]
        assert exporter.export(one_span) is SpanExportResult.FAILURE


class TestConfiguration:
    def test_the_tracing_settings_export_through_it_to_a_real_receiver(self) -> None:
        """exporter=otlp-http with a base endpoint: spans reach /v1/traces, decoded intact."""
        with OtlpReceiver() as receiver:
            tracing = build_tracing(
                TracingSettings(exporter="otlp-http", endpoint=receiver.endpoint, sample_ratio=1.0)
            )
            tracer = tracing.tracer
            with (
                tracer.start_as_current_span("root", attributes={"k": "v"}),
                tracer.start_span("child"),
            ):
                pass
            tracing.provider.force_flush()
            spans = {span.name: span for span in receiver.wait_for(2)}
            tracing.provider.shutdown()
        assert spans["child"].parent_span_id == spans["root"].span_id
        assert spans["root"].attributes == {"k": "v"}

    @pytest.mark.parametrize(
        ("variables", "expected"),
        [
            ({}, "http://localhost:4318/v1/traces"),
            ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
            ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:1/t"}, "http://c:1/t"),
        ],
    )
    def test_without_an_endpoint_setting_the_otlp_variables_decide(
        self, monkeypatch: pytest.MonkeyPatch, variables: dict[str, str], expected: str
    ) -> None:
        """As every OTLP exporter: the signal variable, else the base one, else localhost."""
        for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
            monkeypatch.delenv(name, raising=False)
        for name, value in variables.items():
            monkeypatch.setenv(name, value)
        tracing = build_tracing(TracingSettings(exporter="otlp-http"))
        processor = tracing.provider._active_span_processor._span_processors[0]  # type: ignore[attr-defined]  # the one batch processor install() adds
        assert processor.span_exporter._endpoint == expected
        tracing.provider.shutdown()
