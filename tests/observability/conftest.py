"""Span fixtures shared by the tracing tests: an in-memory exporter and a test tracer."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bastion.testing import OtlpReceiver


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Spans made during this test through the global provider and through ``provider``.

    Helpers called without ``tracer_provider=`` use the global provider, which
    tests/conftest.py sets to the tests' own recording provider before any app is
    built; a processor added here sees this test's spans.
    """
    exporter = InMemorySpanExporter()
    processor = SimpleSpanProcessor(exporter)
    global_provider = trace.get_tracer_provider()
    if not isinstance(global_provider, TracerProvider):
        trace.set_tracer_provider(TracerProvider())
        global_provider = trace.get_tracer_provider()
    assert isinstance(global_provider, TracerProvider)
    global_provider.add_span_processor(processor)
    yield exporter
    processor.shutdown()


@pytest.fixture
def provider(spans: InMemorySpanExporter) -> Iterator[TracerProvider]:
    """A provider of the test's own that always samples and exports into ``spans``."""
    own = TracerProvider()
    own.add_span_processor(SimpleSpanProcessor(spans))
    yield own
    own.shutdown()


@pytest.fixture
def tracer(provider: TracerProvider) -> trace.Tracer:
    """A tracer that always samples, for the test's own root spans."""
    return provider.get_tracer("test")


@pytest.fixture
def own() -> Iterator[tuple[TracerProvider, InMemorySpanExporter]]:
    """A provider apart from ``spans`` (an app's), and the exporter only it writes to."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    yield provider, exporter
    provider.shutdown()


@pytest.fixture
def recording() -> Iterator[dict[str, str]]:
    """Tracing settings under which an app records its spans (an exporter to a real receiver).

    With no exporter bastion records no new trace (nothing would read it), so a test
    that inspects an app's spans gives it one.
    """
    with OtlpReceiver() as receiver:
        yield {"exporter": "otlp-http", "endpoint": receiver.endpoint}
