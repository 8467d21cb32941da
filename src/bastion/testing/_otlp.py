"""A real OTLP/HTTP trace receiver on 127.0.0.1, for tests and benchmarks.

It decodes what an OpenTelemetry exporter really sends (protobuf
``ExportTraceServiceRequest`` on ``POST /v1/traces``) rather than standing in
for the exporter, so a test proves spans leave the process with their
parentage intact.
"""

from __future__ import annotations

import asyncio
import gzip
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any, Final

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

__all__ = ["OtlpReceiver", "ReceivedSpan"]

_TRACES_PATH: Final = "/v1/traces"


@dataclass(frozen=True, slots=True)
class ReceivedSpan:
    """One span as the receiver decoded it.

    Attributes:
        trace_id: 32 lowercase hex digits.
        span_id: 16 lowercase hex digits.
        parent_span_id: the parent's span id, or ``None`` for a root span.
        name: the span name, such as ``GET /items/{item_id}``.
        kind: ``SERVER``, ``CLIENT``, ``PRODUCER``, ``CONSUMER`` or ``INTERNAL``.
        attributes: the span's attributes, values as Python scalars or lists.
        status: ``UNSET``, ``OK`` or ``ERROR``.
        service_name: the ``service.name`` of the resource that sent it.
        events: the names of the span's events (``exception`` for a recorded one).
    """

    trace_id: str
    span_id: str
    parent_span_id: str | None
    name: str
    kind: str
    attributes: dict[str, Any] = field(default_factory=dict)
    status: str = "UNSET"
    service_name: str | None = None
    events: tuple[str, ...] = ()


class OtlpReceiver:
    """An OTLP/HTTP endpoint that keeps every span it receives.

    Example:
        >>> with OtlpReceiver() as receiver:
        ...     app = bastion.create_app(
        ...         tracing={"exporter": "otlp-http", "endpoint": receiver.endpoint}
        ...     )
        ...     ...  # serve requests, then shut the app down (that flushes)
        ...     spans = receiver.wait_for(1)

    Attributes:
        endpoint: the base URL to configure as ``tracing.endpoint``.
        requests: how many export requests arrived.
    """

    def __init__(self) -> None:
        self._spans: list[ReceivedSpan] = []
        self._changed = threading.Condition()
        self.requests = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler_for(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def __enter__(self) -> OtlpReceiver:
        """Start serving on a thread."""
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="otlp-receiver", daemon=True
        )
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @property
    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._changed:
            return list(self._spans)

    def wait_for(self, count: int, within: float = 5.0) -> list[ReceivedSpan]:
        """Block until at least ``count`` spans arrived, then return them all.

        Args:
            count: how many spans to wait for.
            within: seconds to wait at most.

        Raises:
            TimeoutError: fewer than ``count`` spans arrived in time.
        """
        with self._changed:
            if not self._changed.wait_for(lambda: len(self._spans) >= count, within):
                raise TimeoutError(f"{len(self._spans)} span(s) received, expected {count}")
            return list(self._spans)

    async def wait_for_async(self, count: int, within: float = 5.0) -> list[ReceivedSpan]:
        """:meth:`wait_for` without blocking the event loop."""
        return await asyncio.to_thread(self.wait_for, count, within)

    def clear(self) -> None:
        """Forget the spans received so far."""
        with self._changed:
            self._spans.clear()

    def _receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest()
        request.ParseFromString(body)
        received: list[ReceivedSpan] = []
        for resource_spans in request.resource_spans:
            resource = _attributes(resource_spans.resource.attributes)
            service = resource.get("service.name")
            for scope_spans in resource_spans.scope_spans:
                received.extend(_decode(span, service) for span in scope_spans.spans)
        with self._changed:
            self.requests += 1
            self._spans.extend(received)
            self._changed.notify_all()


def _decode(span: Span, service: Any) -> ReceivedSpan:
    return ReceivedSpan(
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        name=span.name,
        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        attributes=_attributes(span.attributes),
        status=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        service_name=service if isinstance(service, str) else None,
        events=tuple(event.name for event in span.events),
    )


def _attributes(pairs: Any) -> dict[str, Any]:
    return {pair.key: _value(pair.value) for pair in pairs}


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    if kind is None:
        return None
    if kind == "array_value":
        return [_value(item) for item in value.array_value.values]
    if kind == "kvlist_value":
        return _attributes(value.kvlist_value.values)
    return getattr(value, kind)


def _handler_for(receiver: OtlpReceiver) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            body = self.rfile.read(length)
            if self.headers.get("Content-Encoding") == "gzip":
                body = gzip.decompress(body)
            if self.path != _TRACES_PATH:
                self.send_error(404)
                return
            receiver._receive(body)
            reply = ExportTraceServiceResponse().SerializeToString()
            self.send_response(200)
            self.send_header("Content-Type", "application/x-protobuf")
            self.send_header("Content-Length", str(len(reply)))
            self.end_headers()
            self.wfile.write(reply)

        def log_message(self, format: str, *args: Any) -> None:
            """Stay quiet: a test's output is for its own lines."""

    return Handler
