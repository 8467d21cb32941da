"""Tracing: the OpenTelemetry SDK set up from settings, and W3C Trace Context read inbound.

:func:`build_tracing` makes one ``TracerProvider`` per installed app: resource
``service.name``, a parent-based ratio sampler, and a ``BatchSpanProcessor``
with the OTLP exporter the settings name (none for ``exporter="none"``: spans
are still made, so their ids reach the logs, and nothing is exported).

The first provider built in a process also becomes OpenTelemetry's global one,
so libraries and the app's own ``trace.get_tracer(...)`` spans share it. The
global provider can be set only once per process: a second app in the same
process keeps its own provider for its server spans, and the spans of
libraries go to the first (or to one the application set itself, which bastion
never replaces).

Inbound context is read by :func:`remote_parent` from the raw header bytes the
middleware already walks, rather than through the propagator over a dict of
every header: 2.9 µs against 4.4 µs a request here (figures in
docs/observability.md). Outbound, the standard ``TraceContextTextMapPropagator``
injects. Baggage is not propagated: nothing in bastion reads it, and
forwarding caller-chosen key/values to every dependency is a choice an
application makes, not a default.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.trace.id_generator import RandomIdGenerator
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, Sampler, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

from bastion.errors import ConfigurationError
from bastion.observability._server_span import ServerSpans, sampled_flags
from bastion.settings import TracingSettings

__all__ = [
    "PrimedIdGenerator",
    "Tracing",
    "build_tracing",
    "remote_parent",
    "remote_span_context",
]

logger = structlog.get_logger("bastion.tracing")

_OTLP_HINT: Final = 'install it with: pip install "bastion[otlp]"'
_TRACES_PATH: Final = "/v1/traces"
_LOCAL_COLLECTOR: Final = "http://localhost:4318"

# W3C Trace Context: version-traceid-parentid-flags, lowercase hex. A version above
# 00 may carry more fields after a dash; its version-00 prefix is what counts.
# Optional whitespace around the value is tolerated (RFC 9110 OWS).
_TRACEPARENT: Final = re.compile(
    rb"[ \t]*([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})(-[^ \t]*)?[ \t]*"
)
_INVALID_VERSION: Final = b"ff"


@dataclass(frozen=True, slots=True)
class Tracing:
    """What :func:`build_tracing` made for one app.

    Attributes:
        provider: the app's SDK tracer provider.
        tracer: the tracer server spans are started with.
        trace_operational: whether probes and ``/metrics`` get spans too.
        root_sample_bound: new traces whose id's low 64 bits are below it are recorded.
        ids: hands a sampled root's trace id to the SDK when the SDK makes the span.
        spans: makes recorded server spans without the SDK's ``start_span``
            (``None``: the SDK makes them).
    """

    provider: TracerProvider
    tracer: trace.Tracer
    trace_operational: bool
    root_sample_bound: int = 0
    ids: PrimedIdGenerator | None = None
    spans: ServerSpans | None = None

    def start_server_span(
        self,
        name: str,
        parent: SpanContext | None,
        attributes_of: Callable[[Any], dict[str, Any]] | None = None,
        source: Any = None,
    ) -> trace.Span:
        """Start a request's SERVER span, deciding its sampling before the SDK is involved.

        The decision is the provider's own ``ParentBased(TraceIdRatioBased)``
        (or ``ALWAYS_OFF`` roots without an exporter): a remote parent's sampled
        flag decides, else the new trace id's low 64 bits against the ratio's
        bound. A span that will not be recorded is a ``NonRecordingSpan`` made
        here (~1 µs, with ids for the logs and outbound ``traceparent``) rather
        than by the SDK's ``start_span`` (~3 µs, the same span): at 10% sampling
        nine requests in ten take this path. A span that will be recorded is a
        :class:`~bastion.observability._server_span.ServerSpan` with the ids,
        flags and trace state the SDK would give it, handed to the provider's
        span processors when it ends; where that cannot stand in for the SDK's
        span (:meth:`ServerSpans.of`, or a tracer switched off) the SDK's
        ``start_span`` makes it, a sampled root's trace id handed over through
        :class:`PrimedIdGenerator` so the SDK's sampler sees the id the decision
        was made on and agrees.

        Args:
            name: the span's first name (the method; the route is known at the end).
            parent: the inbound ``traceparent``'s context, or ``None`` for a new trace.
            attributes_of: builds the span's start attributes from ``source``;
                called only for a span that is recorded (given to the span at start,
                which costs less than setting them after).
            source: what ``attributes_of`` reads (the request's scope, say).
        """
        if parent is not None:
            if parent.trace_flags.sampled:
                attributes = attributes_of(source) if attributes_of is not None else None
                spans = self.spans
                if spans is not None and spans.enabled():
                    # The SDK's child of a remote parent: sampled, the caller's level-2
                    # random flag and trace state kept.
                    own = SpanContext(
                        parent.trace_id,
                        _span_id(),
                        False,
                        sampled_flags(parent),
                        parent.trace_state,
                    )
                    return spans.start(name, own, parent, attributes)
                context = trace.set_span_in_context(NonRecordingSpan(parent), Context())
                return self.tracer.start_span(
                    name, context=context, kind=SpanKind.SERVER, attributes=attributes
                )
            # Level 2: the caller's random-trace-id flag is kept, as the SDK keeps it.
            flags = TraceFlags(parent.trace_flags & _RANDOM_TRACE_ID)
            return NonRecordingSpan(
                SpanContext(parent.trace_id, _span_id(), False, flags, parent.trace_state)
            )
        trace_id = _trace_id()
        if (trace_id & _TRACE_ID_LIMIT) < self.root_sample_bound and self.ids is not None:
            attributes = attributes_of(source) if attributes_of is not None else None
            spans = self.spans
            if spans is not None and spans.enabled():
                # As the SDK's root: sampled and random flags, an empty trace state.
                own = SpanContext(trace_id, _span_id(), False, _NEW_SAMPLED)
                return spans.start(name, own, None, attributes)
            self.ids.prime(trace_id)
            return self.tracer.start_span(
                name, context=_NO_PARENT, kind=SpanKind.SERVER, attributes=attributes
            )
        return NonRecordingSpan(SpanContext(trace_id, _span_id(), False, _NEW_UNSAMPLED))

    async def shutdown(self) -> None:
        """Export what is queued; stop the exporter unless the provider is the global one.

        A lifecycle shutdown hook. The app's spans are always flushed. Its
        provider is shut down only when it is not OpenTelemetry's global
        provider: that one cannot be replaced once set, so shutting it down
        would silently drop every later span of the process (libraries',
        other apps' boundary spans, an app installed next in the same
        process). The global provider is the process's, not the app's: the
        SDK shuts it down at interpreter exit (``shutdown_on_exit``), after a
        last flush.
        """
        # Both block on the exporter (bounded by its timeout): off the event loop.
        if self.provider is trace.get_tracer_provider():
            await asyncio.to_thread(self.provider.force_flush)
        else:
            # BatchSpanProcessor.shutdown flushes its queue before stopping the worker.
            await asyncio.to_thread(self.provider.shutdown)


def build_tracing(settings: TracingSettings) -> Tracing:
    """Build the tracer provider the ``tracing`` section describes.

    Example:
        >>> tracing = build_tracing(TracingSettings(exporter="none"))
        >>> span = tracing.tracer.start_span("work")

    Args:
        settings: the ``tracing`` section.

    Returns:
        The provider and the tracer for server spans.

    Raises:
        ConfigurationError: an OTLP exporter is configured and its package is missing.
    """
    exporter = _exporter(settings)
    # With no exporter nothing would read a recorded span: new traces get a
    # non-recording span, which still has ids for the logs and outbound
    # traceparent (sampled flag off), at a third of an SDK span's cost and under
    # half of bastion's recorded one (docs/observability.md). An inbound sampled
    # parent is still recorded and its flag passed on, so a caller's distributed
    # trace is not broken here.
    root: Sampler = ALWAYS_OFF if exporter is None else TraceIdRatioBased(settings.sample_ratio)
    ids = PrimedIdGenerator()
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(root),
        id_generator=ids,
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    if isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider):
        trace.set_tracer_provider(provider)
    bound = 0 if exporter is None else TraceIdRatioBased.get_bound_for_rate(settings.sample_ratio)
    tracer = provider.get_tracer("bastion.http")
    spans = ServerSpans.of(provider, tracer)
    return Tracing(provider, tracer, settings.trace_operational, bound, ids, spans)


def _exporter(settings: TracingSettings) -> SpanExporter | None:
    if settings.exporter == "none":
        return None
    headers = _parse_headers(settings.headers.get_secret_value() if settings.headers else "")
    options: dict[str, Any] = {"headers": headers or None}
    try:
        if settings.exporter == "otlp-http":
            import requests  # noqa: F401, PLC0415 -- the sender's one dependency, from the otlp extra

            from bastion.observability._span_export import (  # noqa: PLC0415 -- needs requests
                OtlpHttpSpanExporter,
            )

            return OtlpHttpSpanExporter(_http_endpoint(settings.endpoint), headers=headers)
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (  # noqa: PLC0415 -- optional extra
            OTLPSpanExporter as GrpcExporter,
        )
    except ImportError as exc:
        raise ConfigurationError(
            f"tracing.exporter={settings.exporter} needs the OTLP exporter; {_OTLP_HINT}"
        ) from exc
    if settings.endpoint is not None:
        options["endpoint"] = settings.endpoint
        options["insecure"] = settings.endpoint.startswith("http://")
    return GrpcExporter(**options)


def _http_endpoint(configured: str | None) -> str:
    """Return the traces URL: the setting, else the OTLP variables, else the local collector."""
    if configured is not None:
        return _http_traces_url(configured)
    signal = os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    if signal:
        return signal
    return _http_traces_url(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or _LOCAL_COLLECTOR)


def _http_traces_url(endpoint: str) -> str:
    """Return the traces URL for a base endpoint, as OTEL_EXPORTER_OTLP_ENDPOINT reads it."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith(_TRACES_PATH) else endpoint + _TRACES_PATH


def _parse_headers(raw: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for pair in raw.split(","):
        name, sep, value = pair.partition("=")
        if not sep or not name.strip():
            if pair.strip():
                raise ConfigurationError("tracing.headers must be key=value pairs joined by ','")
            continue
        headers[name.strip().lower()] = value.strip()
    return headers


def remote_parent(traceparent: bytes, tracestate: Sequence[bytes] = ()) -> Context | None:
    """Return the context an inbound ``traceparent`` continues, or ``None`` when invalid.

    As :func:`remote_span_context`, wrapped in a context whose current span it is.
    """
    parent = remote_span_context(traceparent, tracestate)
    if parent is None:
        return None
    return trace.set_span_in_context(NonRecordingSpan(parent), Context())


def remote_span_context(traceparent: bytes, tracestate: Sequence[bytes] = ()) -> SpanContext | None:
    """Return the span context an inbound ``traceparent`` names, or ``None`` when invalid.

    Args:
        traceparent: the one ``traceparent`` header value (a duplicated header is
            invalid: the caller passes ``None``-equivalent by not calling).
        tracestate: every ``tracestate`` header value, in order; combined, and
            dropped whole when a member is invalid or there are more than 32.

    Returns:
        The remote parent's context, or ``None`` when the value is not a valid
        W3C ``traceparent`` (a new trace starts then).
    """
    match = _TRACEPARENT.fullmatch(traceparent)
    if match is None:
        return None
    version, trace_hex, span_hex, flags, extra = match.groups()
    if version == _INVALID_VERSION or (version == b"00" and extra is not None):
        return None
    trace_id = int(trace_hex, 16)
    span_id = int(span_hex, 16)
    if not trace_id or not span_id:
        return None
    state = TraceState.from_header([value.decode("latin-1") for value in tracestate])
    return SpanContext(
        trace_id, span_id, is_remote=True, trace_flags=TraceFlags(int(flags, 16)), trace_state=state
    )


class PrimedIdGenerator(RandomIdGenerator):
    """The SDK's random ids, except a root trace id :meth:`Tracing.start_server_span` chose.

    Primed per thread: a span started on another thread meanwhile draws its own.
    """

    def __init__(self) -> None:
        self._next = threading.local()

    def prime(self, trace_id: int) -> None:
        """Make ``trace_id`` the id of the next root span started on this thread."""
        self._next.trace_id = trace_id

    def generate_trace_id(self) -> int:
        """Return the primed id once, else a random one."""
        primed: int = getattr(self._next, "trace_id", 0)
        if primed:
            self._next.trace_id = 0
            return primed
        return super().generate_trace_id()


# The SDK's RandomIdGenerator draws from the random module too (reseeded in forked
# children by the module itself); zero is the invalid id.
def _trace_id() -> int:
    trace_id = random.getrandbits(128)
    while not trace_id:
        trace_id = random.getrandbits(128)
    return trace_id


def _span_id() -> int:
    span_id = random.getrandbits(64)
    while not span_id:
        span_id = random.getrandbits(64)
    return span_id


_TRACE_ID_LIMIT: Final = (1 << 64) - 1
# W3C Trace Context level 2's random-trace-id flag: our trace ids are 128 random
# bits, so a new trace carries it, sampled or not (the SDK's RandomIdGenerator says
# the same of its ids).
_RANDOM_TRACE_ID: Final = 0x02
_NEW_UNSAMPLED: Final = TraceFlags(_RANDOM_TRACE_ID)
_NEW_SAMPLED: Final = sampled_flags(None)
# An explicit empty context: the sampled root must not pick up whatever span the
# server's task happens to have current.
_NO_PARENT: Final = Context()
