"""Tracing: the server span per request, W3C parent extraction, export, and ids in logs."""

import json
import logging
import sys

import pytest
import structlog
from fastapi import FastAPI
from hypothesis import given, settings
from hypothesis import strategies as st
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.sampling import TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

import bastion
from bastion.errors import ConfigurationError
from bastion.observability import build_tracing
from bastion.observability._tracing import Tracing
from bastion.settings import TracingSettings
from bastion.testing import OtlpReceiver, lifespan_client

TRACE_ID = "0af7651916cd43dd8448eb211c80319c"
PARENT_ID = "b7ad6b7169203331"


def make_app(receiver=None, **tracing) -> FastAPI:
    if receiver is not None:
        tracing = {"exporter": "otlp-http", "endpoint": receiver.endpoint, **tracing}
    # FastAPI's native tracing would use the global provider an earlier test set;
    # bastion turns it off only where it makes the server span itself.
    app = FastAPI(telemetry={"tracing": False})
    bastion.install(app, database={"enabled": False}, logging={"format": "json"}, tracing=tracing)

    @app.get("/items/{item_id}")
    async def read(item_id: int) -> dict:
        structlog.get_logger("app.items").info("reading item", item_id=item_id)
        logging.getLogger("app.stdlib").warning("stdlib line")
        return {"id": item_id}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("boom")

    async def thing(request):
        return PlainTextResponse(request.path_params["thing_id"])

    app.mount("/sub", Starlette(routes=[Route("/things/{thing_id}", thing)]))
    return app


async def serve(app, *requests) -> None:
    """Send each (path, headers) through the app's whole lifespan: shutdown flushes spans."""
    async with lifespan_client(app) as client:
        for path, headers in requests:
            await client.get(path, headers=headers)


def lines(capsysbinary) -> list[dict]:
    out = capsysbinary.readouterr().out.decode().splitlines()
    return [json.loads(line) for line in out if line.startswith("{")]


def by_event(records: list[dict]) -> dict[str, dict]:
    return {line["event"]: line for line in records}


class TestServerSpan:
    async def test_span_is_named_by_route_template_with_semconv_attributes(self):
        """One SERVER span per request, named by route template, with HTTP semconv attributes."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/items/7", {"User-Agent": "probe/1"}))
            (span,) = receiver.wait_for(1)
        assert ("GET /items/{item_id}", "SERVER", "UNSET") == (span.name, span.kind, span.status)
        assert {
            "http.request.method": "GET",
            "url.path": "/items/7",
            "url.scheme": "http",
            "http.route": "/items/{item_id}",
            "http.response.status_code": 200,
            "server.address": "testserver",
            "client.address": "127.0.0.1",
            "user_agent.original": "probe/1",
            "network.protocol.version": "1.1",
        } == span.attributes
        assert "bastion" == span.service_name

    async def test_client_address_is_the_client_behind_a_trusted_proxy(self):
        """Through a trusted proxy the span names the forwarded client and the proxy as peer."""
        with OtlpReceiver() as receiver:
            app = FastAPI(telemetry={"tracing": False})
            bastion.install(
                app,
                database={"enabled": False},
                http={"trusted_proxies": ["127.0.0.0/8"]},
                tracing={"exporter": "otlp-http", "endpoint": receiver.endpoint},
            )

            @app.get("/where")
            async def where() -> dict:
                return {}

            await serve(app, ("/where", {"X-Forwarded-For": "203.0.113.9"}))
            (span,) = receiver.wait_for(1)
        assert "203.0.113.9" == span.attributes["client.address"]
        assert "127.0.0.1" == span.attributes["network.peer.address"]

    async def test_mounted_starlette_route_gets_its_full_template(self):
        """A plain Starlette Route under a Mount is named by mount prefix plus its template."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/sub/things/9", {}), ("/sub/things/10", {}))
            spans = receiver.wait_for(2)
        assert ["GET /sub/things/{thing_id}"] * 2 == [span.name for span in spans]

    async def test_unmatched_request_is_named_by_method_only(self):
        """A request no route matches gets the method as name and no http.route."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/nowhere/1", {}))
            (span,) = receiver.wait_for(1)
        assert ("GET", None, 404) == (
            span.name,
            span.attributes.get("http.route"),
            span.attributes["http.response.status_code"],
        )

    async def test_exception_marks_the_span_as_error_with_the_exception_recorded(self):
        """An unhandled exception gives the span ERROR status, error.type and an exception event."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/boom", {}))
            (span,) = receiver.wait_for(1)
        assert ("ERROR", "RuntimeError", 500, ("exception",)) == (
            span.status,
            span.attributes["error.type"],
            span.attributes["http.response.status_code"],
            span.events,
        )

    async def test_operational_paths_are_not_traced_by_default(self):
        """Probes make no span unless tracing.trace_operational is on."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/health/live", {}), ("/items/1", {}))
            spans = receiver.wait_for(1)
        assert ["GET /items/{item_id}"] == [span.name for span in spans]

    async def test_trace_operational_traces_probes(self):
        """With tracing.trace_operational, probes get spans too."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver, trace_operational=True), ("/health/live", {}))
            (span,) = receiver.wait_for(1)
        assert "GET /health/live" == span.name


class TestInboundContext:
    async def test_valid_traceparent_continues_the_trace(self):
        """An inbound sampled traceparent gives the span its trace id and parent."""
        header = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/items/1", header))
            (span,) = receiver.wait_for(1)
        assert (TRACE_ID, PARENT_ID) == (span.trace_id, span.parent_span_id)

    async def test_unsampled_parent_is_honoured_even_at_ratio_one(self, capsysbinary):
        """An inbound unsampled flag wins over sample_ratio 1: nothing exported, ids logged."""
        header = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-00"}
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/items/1", header))
            exported = receiver.spans
        access = by_event(lines(capsysbinary))["request"]
        assert ([], TRACE_ID) == (exported, access["trace_id"])

    async def test_sampled_parent_is_honoured_even_at_ratio_zero(self):
        """An inbound sampled flag wins over sample_ratio 0: the span is exported."""
        header = {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver, sample_ratio=0.0), ("/items/1", header))
            (span,) = receiver.wait_for(1)
        assert TRACE_ID == span.trace_id

    @pytest.mark.parametrize(
        "value",
        [
            f"00-{TRACE_ID}-{PARENT_ID}-0",
            f"00-{TRACE_ID.upper()}-{PARENT_ID}-01",
            f"00-{'0' * 32}-{PARENT_ID}-01",
            f"00-{TRACE_ID}-{'0' * 16}-01",
            f"ff-{TRACE_ID}-{PARENT_ID}-01",
            f"00-{TRACE_ID}-{PARENT_ID}-01-extra",
        ],
        ids=["short", "uppercase", "zero-trace", "zero-parent", "version-ff", "00-extra"],
    )
    async def test_invalid_traceparent_starts_a_new_trace(self, value):
        """A malformed traceparent is ignored: a root span with a fresh trace id."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver), ("/items/1", {"traceparent": value}))
            (span,) = receiver.wait_for(1)
        assert (None, True) == (span.parent_span_id, span.trace_id != TRACE_ID)


class TestExport:
    async def test_spans_reach_the_receiver_with_parentage(self):
        """A child span made in the handler is exported with the server span as its parent."""
        with OtlpReceiver() as receiver:
            app = make_app(receiver)
            tracer = app.state.bastion.tracing.tracer

            @app.get("/nested")
            async def nested() -> dict:
                with tracer.start_as_current_span("inner"):
                    return {}

            await serve(app, ("/nested", {}))
            spans = {span.name: span for span in receiver.wait_for(2)}
        server, inner = spans["GET /nested"], spans["inner"]
        assert (server.trace_id, server.span_id) == (inner.trace_id, inner.parent_span_id)

    async def test_ratio_zero_exports_nothing_but_logs_ids(self, capsysbinary):
        """sample_ratio 0: no span exported, yet the access line carries trace and span ids."""
        with OtlpReceiver() as receiver:
            await serve(make_app(receiver, sample_ratio=0.0), ("/items/1", {}))
            exported = receiver.spans
        access = by_event(lines(capsysbinary))["request"]
        assert ([], 32, 16) == (exported, len(access["trace_id"]), len(access["span_id"]))

    def test_missing_exporter_package_names_the_extra(self, monkeypatch):
        """An OTLP exporter without its package raises ConfigurationError naming bastion[otlp]."""
        monkeypatch.setitem(
            sys.modules, "opentelemetry.exporter.otlp.proto.grpc.trace_exporter", None
        )
        with pytest.raises(ConfigurationError, match=r'pip install "bastion\[otlp\]"'):
            build_tracing(TracingSettings(exporter="otlp-grpc"))


class TestShutdown:
    async def test_own_provider_is_flushed_and_shut_down(self):
        """An app's provider that is not the global one exports what it queued, then stops."""
        exporter = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(exporter))
        tracing = Tracing(provider, provider.get_tracer("test"), trace_operational=False)
        assert provider is not trace.get_tracer_provider()
        tracing.tracer.start_span("queued").end()
        await tracing.shutdown()
        provider.get_tracer("test").start_span("after").end()
        assert ["queued"] == [span.name for span in exporter.get_finished_spans()]

    async def test_global_provider_is_flushed_and_keeps_working(self):
        """The global provider is flushed only: spans made after an app's shutdown still export."""
        global_provider = trace.get_tracer_provider()
        if not isinstance(global_provider, TracerProvider):
            trace.set_tracer_provider(TracerProvider())
            global_provider = trace.get_tracer_provider()
        assert isinstance(global_provider, TracerProvider)
        exporter = InMemorySpanExporter()
        processor = BatchSpanProcessor(exporter)
        global_provider.add_span_processor(processor)
        tracing = Tracing(global_provider, global_provider.get_tracer("test"), False)
        try:
            tracing.tracer.start_span("queued").end()
            await tracing.shutdown()
            flushed = [span.name for span in exporter.get_finished_spans()]
            trace.get_tracer("later").start_span("after").end()
            processor.force_flush()
            names = [span.name for span in exporter.get_finished_spans()]
        finally:
            processor.shutdown()
        assert (["queued"], ["queued", "after"]) == (flushed, names)


class TestLogCorrelation:
    async def test_exporter_none_puts_span_ids_on_every_line(self, capsysbinary):
        """With exporter none, app, stdlib and access lines carry the request span's ids."""
        await serve(make_app(), ("/items/1", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}))
        records = by_event(lines(capsysbinary))
        ids = {
            (records[event]["trace_id"], records[event]["span_id"])
            for event in ("reading item", "stdlib line", "request")
        }
        assert 1 == len(ids)
        trace_id, span_id = ids.pop()
        assert (TRACE_ID, 16, True) == (trace_id, len(span_id), span_id != PARENT_ID)

    async def test_disabled_tracing_logs_no_ids(self, capsysbinary):
        """tracing.enabled=false: no span, so lines carry null trace and span ids."""
        app = make_app(enabled=False)
        await serve(app, ("/items/1", {"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"}))
        records = by_event(lines(capsysbinary))
        assert (None, {(None, None)}) == (
            app.state.bastion.tracing,
            {(records[e]["trace_id"], records[e]["span_id"]) for e in ("reading item", "request")},
        )


class TestNoExporter:
    def test_new_traces_get_ids_but_are_not_recorded(self):
        """With no exporter a new trace is not recorded, yet has ids for logs and traceparent."""
        tracing = build_tracing(TracingSettings(exporter="none", sample_ratio=1.0))
        span = tracing.tracer.start_span("work")
        context = span.get_span_context()
        assert (False, True, False) == (
            span.is_recording(),
            context.is_valid,
            context.trace_flags.sampled,
        )

    def test_a_sampled_caller_keeps_its_flag(self):
        """An inbound sampled parent is still recorded, so its sampled flag is passed on."""

        tracing = build_tracing(TracingSettings(exporter="none"))
        remote = SpanContext(
            int(TRACE_ID, 16),
            int(PARENT_ID, 16),
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
        )
        parent = trace.set_span_in_context(NonRecordingSpan(remote))
        span = tracing.tracer.start_span("work", context=parent)
        assert (True, True) == (span.is_recording(), span.get_span_context().trace_flags.sampled)


class TestServerSpanSampling:
    """Tracing.start_server_span decides sampling itself; it must decide as the SDK would."""

    def test_the_ratio_of_recorded_roots_is_the_configured_one(self):
        """At 25% about a quarter of new traces are recorded (4000 draws, within 4 sigma)."""
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=0.25))
        recorded = sum(tracing.start_server_span("GET", None).is_recording() for _ in range(4000))
        tracing.provider.shutdown()
        assert abs(recorded - 1000) < 4 * (4000 * 0.25 * 0.75) ** 0.5

    @settings(max_examples=300, deadline=None)
    @given(st.floats(min_value=0.0, max_value=1.0))
    def test_a_recorded_root_is_one_the_sdk_sampler_also_samples(self, ratio):
        """Every recorded root's trace id passes the SDK's TraceIdRatioBased check; every
        unrecorded one fails it: the middleware and the SDK never disagree."""
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=ratio))
        sampler = TraceIdRatioBased(ratio)
        for _ in range(20):
            span = tracing.start_server_span("GET", None)
            context = span.get_span_context()
            decision = sampler.should_sample(None, context.trace_id, "GET").decision
            assert span.is_recording() == decision.is_sampled() == context.trace_flags.sampled
        tracing.provider.shutdown()

    def test_the_primed_trace_id_is_used_once(self):
        """After a sampled root, the SDK's next root span draws its own trace id."""
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=1.0))
        first = tracing.start_server_span("GET", None)
        second = tracing.tracer.start_span("other")
        third = tracing.start_server_span("GET", None)
        tracing.provider.shutdown()
        ids = {s.get_span_context().trace_id for s in (first, second, third)}
        assert len(ids) == 3

    def test_an_unsampled_remote_parent_is_continued_without_recording(self):
        """Same trace id and trace state, a new span id, the flag left unsampled."""
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=1.0))
        state = TraceState([("vendor", "x")])
        parent = SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), True, TraceFlags(0), state)
        span = tracing.start_server_span("GET", parent)
        tracing.provider.shutdown()
        context = span.get_span_context()
        assert (False, int(TRACE_ID, 16), False, state) == (
            span.is_recording(),
            context.trace_id,
            context.trace_flags.sampled,
            context.trace_state,
        )
        assert context.span_id not in (0, int(PARENT_ID, 16))

    def test_a_sampled_remote_parent_is_recorded_as_its_child_at_ratio_zero(self):
        """The caller's decision wins: recorded, parented, with the start attributes."""
        tracing = build_tracing(TracingSettings(exporter="otlp-http", sample_ratio=0.0))
        parent = SpanContext(int(TRACE_ID, 16), int(PARENT_ID, 16), True, TraceFlags(1))
        span = tracing.start_server_span("GET", parent, dict, {"a": 1})
        tracing.provider.shutdown()
        assert (True, int(PARENT_ID, 16), {"a": 1}) == (
            span.is_recording(),
            span.parent.span_id,
            dict(span.attributes),
        )

    def test_without_an_exporter_no_root_is_recorded(self):
        """exporter=none: ids for the logs, nothing recorded, whatever the ratio."""
        tracing = build_tracing(TracingSettings(exporter="none", sample_ratio=1.0))
        spans = [tracing.start_server_span("GET", None) for _ in range(200)]
        assert not any(span.is_recording() for span in spans)
        assert all(span.get_span_context().is_valid for span in spans)
