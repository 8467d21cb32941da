"""Bastion's own recorded server span: what the SDK's span would have been, made for less."""

from __future__ import annotations

import dataclasses
import gc
import logging
import sys
import threading
import time
from typing import Any

import pytest
from fastapi import FastAPI
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans as sdk_encode
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import (
    ReadableSpan,
    SpanLimits,
    SpanProcessor,
    TracerProvider,
    _TracerConfig,
)
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import (
    NonRecordingSpan,
    SpanContext,
    SpanKind,
    Status,
    StatusCode,
    TraceFlags,
    TraceState,
)

import bastion
from bastion.observability._server_span import ServerSpan, ServerSpans
from bastion.observability._span_export import encode_spans
from bastion.observability._tracing import PrimedIdGenerator, Tracing, build_tracing
from bastion.settings import TracingSettings
from bastion.testing import OtlpReceiver, lifespan_client

TRACE_ID = 0x0AF7651916CD43DD8448EB211C80319C
PARENT_ID = 0xB7AD6B7169203331
STATE = TraceState([("vendor", "x"), ("other", "y")])


class _Keep(SpanExporter):
    """Keeps what it is given."""

    def __init__(self) -> None:
        self.spans: list[ReadableSpan] = []

    def export(self, spans: Any) -> SpanExportResult:
        self.spans.extend(spans)
        return SpanExportResult.SUCCESS


class _Calls(SpanProcessor):
    """A processor that does something on start: records every call it gets."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any, Any]] = []

    def on_start(self, span: Any, parent_context: Any = None) -> None:
        self.calls.append(("on_start", span, parent_context))
        span.set_attribute("from.on_start", "yes")

    def _on_ending(self, span: Any) -> None:
        self.calls.append(("_on_ending", span, None))

    def on_end(self, span: ReadableSpan) -> None:
        self.calls.append(("on_end", span, None))


def _tracings(
    limits: SpanLimits | None = None, *processors: SpanProcessor
) -> tuple[Tracing, Tracing]:
    """Two views of one provider: bastion's lean server span, and the SDK's."""
    provider = TracerProvider(
        resource=Resource.create({"service.name": "svc"}),
        id_generator=PrimedIdGenerator(),
        span_limits=limits,
        shutdown_on_exit=False,
    )
    for processor in processors:
        provider.add_span_processor(processor)
    tracer = provider.get_tracer("bastion.http")
    spans = ServerSpans.of(provider, tracer)
    assert spans is not None
    lean = Tracing(provider, tracer, False, 1 << 64, PrimedIdGenerator(), spans)
    return lean, dataclasses.replace(lean, spans=None)


def _parent(flags: int = 0x01, state: TraceState = STATE) -> SpanContext:
    return SpanContext(TRACE_ID, PARENT_ID, True, TraceFlags(flags), state)


def _view(span: ReadableSpan) -> dict[str, Any]:
    """Everything a processor or exporter reads of an ended span, but its own id and times."""
    context = span.get_span_context()
    assert context is not None
    return {
        "name": span.name,
        "kind": span.kind,
        "trace_id": context.trace_id,
        "flags": context.trace_flags,
        "state": context.trace_state,
        "parent": span.parent,
        "attributes": list(span.attributes.items()),
        "dropped_attributes": span.dropped_attributes,
        "events": [
            (e.name, e.timestamp, list(e.attributes.items()), e.dropped_attributes)  # type: ignore[attr-defined]
            for e in span.events
        ],
        "dropped_events": span.dropped_events,
        "links": [(link.context, list(link.attributes.items())) for link in span.links],
        "dropped_links": span.dropped_links,
        "status": (span.status.status_code, span.status.description),
        "resource": span.resource,
        "scope": span.instrumentation_scope,
    }


class _Odd:
    """A value that is no attribute type; the SDK keeps its str()."""

    def __str__(self) -> str:
        return "odd"


_text = st.text(max_size=8)
_scalar = st.one_of(
    _text,
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=False),
)
_plain_value = st.one_of(
    _scalar,
    st.lists(_text, max_size=3),
    st.lists(st.integers(min_value=0, max_value=9), max_size=3).map(tuple),
)
_odd_value = st.one_of(_plain_value, st.just(b"raw"), st.just(None), st.builds(_Odd))
_key = st.one_of(st.sampled_from(["a", "b", "c", "http.route", ""]), st.text(max_size=4))
_attributes = st.dictionaries(st.one_of(_key, st.integers(0, 3)), _odd_value, max_size=4)
# What the middleware builds: valid keys, scalar values (it never sets a list).
_start_attributes = st.dictionaries(st.text(min_size=1, max_size=6), _scalar, max_size=4)
_timestamp = st.integers(min_value=1, max_value=2**62)
_link_context = st.builds(
    SpanContext,
    st.integers(min_value=0, max_value=2**128 - 1),
    st.integers(min_value=0, max_value=2**64 - 1),
    st.booleans(),
    st.just(TraceFlags(1)),
    st.sampled_from([TraceState(), STATE]),
)
_operation = st.one_of(
    st.tuples(st.just("set_attribute"), st.one_of(_key, st.just(7)), _odd_value),
    st.tuples(st.just("set_attributes"), _attributes),
    st.tuples(st.just("trusted"), st.dictionaries(_key.filter(bool), _scalar, max_size=3)),
    st.tuples(st.just("add_event"), _text, _attributes, _timestamp),
    st.tuples(st.just("add_link"), _link_context, _attributes),
    st.tuples(
        st.just("set_status"),
        st.one_of(
            st.sampled_from(list(StatusCode)),
            st.builds(Status, st.sampled_from(list(StatusCode)), st.one_of(st.none(), _text)),
        ),
        st.one_of(st.none(), _text),
    ),
    st.tuples(st.just("update_name"), _text),
    st.tuples(st.just("record_exception"), _text, _timestamp, st.booleans()),
)
_limits = st.sampled_from(
    [
        None,
        SpanLimits(
            max_span_attributes=3,
            max_events=2,
            max_links=1,
            max_event_attributes=2,
            max_link_attributes=1,
            max_attribute_length=4,
        ),
        SpanLimits(max_span_attributes=0, max_events=0, max_links=0),
    ]
)


def _apply(span: Any, operation: tuple[Any, ...]) -> None:
    """Apply one API call; ``trusted`` is the middleware's own path on bastion's span."""
    verb, *args = operation
    if verb == "trusted":
        setter = (
            span.set_trusted_attributes if isinstance(span, ServerSpan) else span.set_attributes
        )
        setter(*args)
    elif verb == "record_exception":
        message, timestamp, escaped = args
        span.record_exception(ValueError(message), {"extra": 1}, timestamp, escaped)
    else:
        getattr(span, verb)(*args)


class TestStart:
    def test_a_sampled_root_is_bastions_span_with_the_sdk_roots_ids(self):
        """A new sampled trace: sampled and level-2 random flags, empty trace state, no parent."""
        lean, _ = _tracings()
        span = lean.start_server_span("GET", None, dict, {"url.path": "/a"})
        context = span.get_span_context()
        assert (ServerSpan, 0x03, TraceState(), None, SpanKind.SERVER, True) == (
            type(span),
            context.trace_flags,
            context.trace_state,
            span.parent,
            span.kind,
            span.is_recording(),
        )
        assert {"url.path": "/a"} == dict(span.attributes)
        assert (context.trace_id != 0, context.span_id != 0) == (True, True)

    @pytest.mark.parametrize(("inbound", "own"), [(0x01, 0x01), (0x03, 0x03), (0xFF, 0x03)])
    def test_a_sampled_remote_parent_is_continued_as_the_sdk_continues_it(self, inbound, own):
        """Same trace, remote parent, trace state kept, sampled, the caller's random flag kept."""
        lean, sdk = _tracings()
        parent = _parent(inbound)
        span = lean.start_server_span("GET", parent)
        reference = sdk.start_server_span("GET", parent)
        context = span.get_span_context()
        assert (TRACE_ID, own, STATE, parent, False) == (
            context.trace_id,
            context.trace_flags,
            context.trace_state,
            span.parent,
            context.is_remote,
        )
        assert reference.get_span_context().trace_flags == context.trace_flags

    def test_the_resource_and_scope_are_the_tracers(self):
        """Processors and exporters group the span under the tracer's resource and scope."""
        lean, sdk = _tracings()
        span = lean.start_server_span("GET", _parent())
        reference = sdk.start_server_span("GET", _parent())
        assert (reference.resource, reference.instrumentation_scope) == (
            span.resource,
            span.instrumentation_scope,
        )

    def test_an_app_records_with_bastions_span(self):
        """build_tracing with an exporter gives the lean span to sampled requests."""
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=1.0))
        span = tracing.start_server_span("GET", None)
        tracing.provider.shutdown()
        assert isinstance(span, ServerSpan)


class TestSameAsTheSdk:
    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        limits=_limits,
        start=_start_attributes,
        operations=st.lists(_operation, max_size=10),
    )
    def test_any_api_calls_leave_what_the_sdks_span_would(self, limits, start, operations):
        """For any sequence of API calls under any span limits, the ended span reads exactly as
        the SDK's span given the same calls: attributes and their order, cleaned values,
        drops, events, links, status, name."""
        lean, sdk = _tracings(limits)
        span = lean.start_server_span("GET", _parent(), dict, start)
        reference = sdk.start_server_span("GET", _parent(), dict, start)
        for operation in operations:
            _apply(span, operation)
            _apply(reference, operation)
        span.end()
        reference.end()
        assert _view(reference) == _view(span)

    def test_a_span_used_as_a_context_manager_records_the_escaping_exception(self):
        """``with span:`` around a raise: an exception event and ERROR, as the SDK's span."""
        lean, sdk = _tracings()
        views = []
        for tracing in (lean, sdk):
            span = tracing.start_server_span("GET", _parent())
            with pytest.raises(KeyError), span:
                raise KeyError("k")
            views.append(_view(span))
        lean_view, sdk_view = views
        assert (sdk_view["status"], [e[0] for e in sdk_view["events"]]) == (
            lean_view["status"],
            [e[0] for e in lean_view["events"]],
        )

    def test_an_ended_span_refuses_changes_and_is_handed_over_once(self):
        """After end: attributes, name, status and events stay; a second end is ignored."""
        kept = _Keep()
        lean, _ = _tracings(None, SimpleSpanProcessor(kept))
        span = lean.start_server_span("GET", _parent(), dict, {"a": 1})
        span.end()
        span.set_attribute("b", 2)
        span.set_attributes({"c": 3})
        span.set_trusted_attributes({"d": 4})
        span.update_name("renamed")
        span.set_status(StatusCode.ERROR)
        span.add_event("late")
        span.add_link(_parent())
        span.end()
        assert ([span], {"a": 1}, "GET", StatusCode.UNSET, (), (), False) == (
            kept.spans,
            dict(span.attributes),
            span.name,
            span.status.status_code,
            span.events,
            span.links,
            span.is_recording(),
        )

    def test_a_set_on_an_ended_span_warns_as_the_sdk(self, caplog):
        """The SDK's warning, on the SDK's logger."""
        lean, _ = _tracings()
        span = lean.start_server_span("GET", _parent())
        span.end()
        with caplog.at_level(logging.WARNING, logger="opentelemetry.sdk.trace"):
            span.set_attribute("late", 1)
        assert ["Setting attribute on ended span."] == [r.getMessage() for r in caplog.records]

    def test_the_start_attributes_are_bounded_by_the_limits(self):
        """Middleware attributes skip validation, not the limits an operator set."""
        lean, sdk = _tracings(SpanLimits(max_span_attributes=2, max_attribute_length=3))
        start = {"url.path": "/items/42", "url.scheme": "https", "server.port": 80}
        span = lean.start_server_span("GET", _parent(), dict, start)
        reference = sdk.start_server_span("GET", _parent(), dict, start)
        assert ([("url.scheme", "htt"), ("server.port", 80)], 1) == (
            list(span.attributes.items()),
            span.dropped_attributes,
        )
        assert (list(reference.attributes.items()), reference.dropped_attributes) == (
            list(span.attributes.items()),
            span.dropped_attributes,
        )

    def test_the_attributes_are_a_plain_dict_the_collector_skips(self):
        """No BoundedAttributes, lock or lists per span: a dict of str and int is untracked."""
        lean, _ = _tracings()
        span = lean.start_server_span("GET", None, dict, {"url.path": "/a", "server.port": 80})
        span.set_trusted_attributes({"http.response.status_code": 200})
        assert (dict, False, (), ()) == (
            type(span._attributes),
            gc.is_tracked(span._attributes),
            span._events,
            span._links,
        )


class TestProcessors:
    def test_batch_and_simple_processors_get_the_span_at_its_end(self):
        """The SDK's exporting processors, whose on_start does nothing, get on_end only."""
        kept, batched = _Keep(), _Keep()
        batch = BatchSpanProcessor(batched)
        lean, _ = _tracings(None, SimpleSpanProcessor(kept), batch)
        span = lean.start_server_span("GET", None)
        span.end()
        batch.force_flush()
        batch.shutdown()
        assert ([span], [span]) == (kept.spans, batched.spans)

    def test_a_processor_that_acts_on_start_gets_the_sdks_whole_protocol(self):
        """on_start (with the remote parent as the context's span), _on_ending, on_end; what it
        sets on start is on the exported span."""
        calls, kept = _Calls(), _Keep()
        lean, _ = _tracings(None, calls, SimpleSpanProcessor(kept))
        parent = _parent()
        span = lean.start_server_span("GET", parent)
        span.end()
        (start, parent_context), ending, ended = (
            (calls.calls[0][0], calls.calls[0][2]),
            calls.calls[1][:2],
            calls.calls[2][:2],
        )
        assert ("on_start", ("_on_ending", span), ("on_end", span)) == (start, ending, ended)
        assert parent == trace.get_current_span(parent_context).get_span_context()
        assert ([span], "yes") == (kept.spans, span.attributes["from.on_start"])

    def test_a_root_gets_an_empty_parent_context_on_start(self):
        """As the SDK's root span: on_start's context has no span in it."""
        calls = _Calls()
        lean, _ = _tracings(None, calls)
        lean.start_server_span("GET", None).end()
        context = calls.calls[0][2]
        assert trace.INVALID_SPAN_CONTEXT == trace.get_current_span(context).get_span_context()

    def test_a_processor_added_while_the_span_runs_gets_its_end(self):
        """As the SDK: processors are those registered when the span ends."""
        kept = _Keep()
        lean, _ = _tracings()
        span = lean.start_server_span("GET", None)
        lean.provider.add_span_processor(SimpleSpanProcessor(kept))
        span.end()
        assert [span] == kept.spans


class TestFallback:
    def test_sdk_span_metrics_keep_the_sdks_span(self, monkeypatch):
        """With the SDK's own span metrics on, the SDK makes the span (it counts live spans)."""
        monkeypatch.setenv("OTEL_PYTHON_SDK_INTERNAL_METRICS_ENABLED", "true")
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=1.0))
        span = tracing.start_server_span("GET", None)
        tracing.provider.shutdown()
        assert (None, False, True) == (
            tracing.spans,
            isinstance(span, ServerSpan),
            span.is_recording(),
        )

    def test_a_no_op_tracer_has_no_lean_spans(self):
        """OTEL_SDK_DISABLED gives a no-op tracer: nothing for bastion's span to stand in for."""
        assert None is ServerSpans.of(TracerProvider(), trace.NoOpTracer())

    def test_a_tracer_switched_off_records_nothing(self):
        """A tracer configurator that disables the tracer: the SDK's non-recording span."""
        lean, _ = _tracings()
        lean.tracer._set_tracer_config(_TracerConfig(is_enabled=False))
        span = lean.start_server_span("GET", _parent())
        assert (NonRecordingSpan, False) == (type(span), span.is_recording())


class TestExport:
    @settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        start=_start_attributes,
        operations=st.lists(
            _operation.filter(lambda op: op[0] not in ("set_attribute", "set_attributes")),
            max_size=6,
        ),
        remote=st.booleans(),
    )
    def test_bytes_equal_the_sdk_encoders(self, start, operations, remote):
        """bastion's encoder writes exactly the bytes the SDK's encoder gives for the lean span."""
        lean, _ = _tracings()
        parent = _parent() if remote else None
        span = lean.start_server_span("GET", parent, dict, start)
        for operation in operations:
            _apply(span, operation)
        span.end()
        assert sdk_encode([span]).SerializeToString() == encode_spans([span])

    def test_a_write_racing_the_end_cannot_break_the_encoding(self):
        """The encoder reads a snapshot: a thread writing into the dict meanwhile is harmless.

        Bounded real time (0.3 s): threads must interleave, so the switch interval is
        made tiny for the test.
        """
        lean, _ = _tracings()
        span = lean.start_server_span("GET", None, dict, {f"s{n}": n for n in range(100)})
        span.end()
        stop = threading.Event()

        def write() -> None:
            n = 0
            while not stop.is_set():
                span._attributes[f"k{n % 50}"] = n  # what a write that passed the check does
                span._attributes.pop(f"k{(n + 25) % 50}", None)
                n += 1

        interval = sys.getswitchinterval()
        sys.setswitchinterval(1e-6)
        writer = threading.Thread(target=write)
        writer.start()
        try:
            deadline = time.monotonic() + 0.3
            while time.monotonic() < deadline:
                encode_spans([span])
        finally:
            stop.set()
            writer.join()
            sys.setswitchinterval(interval)


class TestThroughTheApp:
    async def test_user_code_and_child_spans_see_the_server_span(self):
        """Handlers (async and sync, on a worker thread) set attributes on the current span, and
        an SDK child span is parented by it; all reach the receiver."""
        with OtlpReceiver() as receiver:
            app = FastAPI(telemetry={"tracing": False})
            runtime = bastion.install(
                app,
                database={"enabled": False},
                logging={"enabled": False},
                tracing={"exporter": "otlp-http", "endpoint": receiver.endpoint},
            )
            tracer = runtime.tracing.tracer

            @app.get("/async/{n}")
            async def in_loop(n: int) -> dict:
                current = trace.get_current_span()
                current.set_attribute("app.tier", "gold")
                current.set_attributes({"app.n": n, "app.tags": ["a", "b"]})
                with tracer.start_as_current_span("inner"):
                    pass
                return {"server": type(current).__name__}

            @app.get("/sync")
            def in_thread() -> dict:
                trace.get_current_span().add_event("in a worker thread", {"app.x": 1})
                return {}

            async with lifespan_client(app) as client:
                response = await client.get("/async/3")
                await client.get("/sync")
            spans = {span.name: span for span in receiver.wait_for(3)}
        server, inner, sync = spans["GET /async/{n}"], spans["inner"], spans["GET /sync"]
        assert "ServerSpan" == response.json()["server"]
        assert ("gold", 3, ["a", "b"], 200) == (
            server.attributes["app.tier"],
            server.attributes["app.n"],
            server.attributes["app.tags"],
            server.attributes["http.response.status_code"],
        )
        assert (server.span_id, ("in a worker thread",)) == (inner.parent_span_id, sync.events)
