"""OTLP/HTTP span export with a hand-written protobuf encoder.

The SDK's OTLP encoder builds a protobuf object per span, attribute and value
before serializing them: ~30 µs of the process's CPU per span here
(``bench/README.md``), about twice what recording the span cost on the request
path. With every request traced that is the largest single cost of tracing,
paid on the same cores that serve requests. This encoder writes the same bytes
directly (a test checks them against the SDK's for random spans) in a fraction
of that; the sender is a ``requests`` session with the SDK exporter's retry
rules.

Only the OTLP/HTTP protobuf exporter is replaced; ``otlp-grpc`` stays the SDK's.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any, Final

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import SpanContext, SpanKind

from bastion.observability._server_span import ServerSpan

__all__ = ["OtlpHttpSpanExporter", "encode_spans"]

logger = logging.getLogger("bastion.tracing")

_CONTENT_TYPE: Final = "application/x-protobuf"
_RETRYABLE: Final = frozenset({408, 429, 502, 503, 504})
# SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK and SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK.
_HAS_IS_REMOTE: Final = 0x100
_IS_REMOTE: Final = 0x200
_UINT64: Final = 0xFFFFFFFFFFFFFFFF
_pack_fixed64: Final = struct.Struct("<Q").pack
_pack_fixed32: Final = struct.Struct("<I").pack
_pack_double: Final = struct.Struct("<d").pack

# Small varints (lengths of attribute values, kinds, codes) from a table.
_SMALL: Final = tuple(bytes([n]) for n in range(128))


def _varint(value: int) -> bytes:
    if value < 128:  # noqa: PLR2004 -- one byte holds 7 bits
        return _SMALL[value]
    out = bytearray()
    while value >= 128:  # noqa: PLR2004 -- 7 bits per byte, high bit continues
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(tag: bytes, payload: bytes) -> bytes:
    """A length-delimited field: its tag, the payload's length, the payload."""
    return tag + _varint(len(payload)) + payload


# Keys repeat on every span: their encoded ``KeyValue.key`` field is kept.
_KEYS: dict[str, bytes] = {}
_KEYS_MAX: Final = 4096


def _key(key: str) -> bytes:
    encoded = _KEYS.get(key)
    if encoded is None:
        raw = key.encode()
        encoded = _field(b"\x0a", raw) if raw else b""
        if len(_KEYS) < _KEYS_MAX:
            _KEYS[key] = encoded
    return encoded


def _value(value: Any) -> bytes:  # noqa: PLR0911 -- one return per member of the AnyValue oneof
    """An ``AnyValue`` message; the order of the checks is the SDK encoder's."""
    if value is None:
        return b""
    if isinstance(value, bool):
        return b"\x10\x01" if value else b"\x10\x00"
    if isinstance(value, str):
        return _field(b"\x0a", value.encode())
    if isinstance(value, int):
        return b"\x18" + _varint(value & _UINT64)
    if isinstance(value, float):
        return b"\x21" + _pack_double(value)
    if isinstance(value, bytes):
        return _field(b"\x3a", value)
    if isinstance(value, Sequence):
        return _field(b"\x2a", b"".join(_field(b"\x0a", _value(item)) for item in value))
    if isinstance(value, Mapping):
        return _field(
            b"\x32",
            b"".join(_field(b"\x0a", _key_value(str(k), v)) for k, v in value.items()),
        )
    raise TypeError(f"attribute values of type {type(value).__name__} cannot be exported")


def _key_value(key: str, value: Any) -> bytes:
    return _key(key) + _field(b"\x12", _value(value))


# Most attribute values repeat from span to span (a method, a route template, a
# status, an address): their encoded ``KeyValue``, field tag and length prefix
# included, is kept by key, type and value (``1``, ``True`` and ``1.0`` are equal
# keys otherwise), one table per field tag (span, event, link, resource and scope
# attributes, each table bounded), which halves the encoding time of a typical
# server span.
_PAIRS: dict[bytes, dict[tuple[str, type, Any], bytes]] = {}
_PAIRS_MAX: Final = 16384
_CACHED_TYPES: Final = frozenset({str, int, bool, float})


def _attributes(tag: bytes, attributes: Mapping[str, Any] | None) -> bytes:
    if not attributes:
        return b""
    parts = []
    pairs = _PAIRS.get(tag)
    if pairs is None:
        pairs = _PAIRS.setdefault(tag, {})
    # An SDK span's attributes are a BoundedAttributes, whose items() goes through
    # the Mapping ABC one __getitem__ at a time (a fifth of the encoding time);
    # the dict it wraps is read directly when there is one. An ended span's
    # attributes no longer change.
    for key, value in getattr(attributes, "_dict", attributes).items():
        kind = value.__class__
        cacheable = kind in _CACHED_TYPES
        encoded = pairs.get((key, kind, value)) if cacheable else None
        if encoded is None:
            try:
                pair = _key_value(key, value)
            except TypeError:
                # As the SDK's encoder: the attribute is left out, the span is still sent.
                logger.exception("span attribute %r not exported", key)
                continue
            encoded = tag + _varint(len(pair)) + pair
            if cacheable and len(pairs) < _PAIRS_MAX:
                pairs[key, kind, value] = encoded
        parts.append(encoded)
    return b"".join(parts)


_LOCAL_PARENT_FLAGS: Final = _pack_fixed32(_HAS_IS_REMOTE)
_REMOTE_PARENT_FLAGS: Final = _pack_fixed32(_HAS_IS_REMOTE | _IS_REMOTE)
_KINDS: Final = tuple(b"\x30" + _SMALL[value + 1] for value in range(5))
_SERVER_KIND: Final = _KINDS[SpanKind.SERVER.value]
_UNSET_STATUS: Final = b"\x7a\x00"


def _flags(parent: SpanContext | None) -> bytes:
    return _REMOTE_PARENT_FLAGS if parent is not None and parent.is_remote else _LOCAL_PARENT_FLAGS


def _span(span: ReadableSpan) -> bytes:  # noqa: PLR0912, PLR0915 -- one frame per span, fields in order
    """A ``Span`` message; fields in number order, as protobuf writes them."""
    if type(span) is ServerSpan:
        # bastion's server span is read from its slots: ReadableSpan's properties wrap
        # the attributes in a proxy and copy events and links into tuples, per span.
        # The attributes are copied (one C call, atomic under the GIL) so that a write
        # racing end() on another thread cannot resize the dict while it is encoded.
        context: SpanContext | None = span._context
        parent = span._parent
        name = span._name.encode()
        kind = _SERVER_KIND
        start_time, end_time = span._start_time, span._end_time
        attributes: Mapping[str, Any] | None = span._attributes.copy()
        dropped = span._dropped
        # Events and links are an empty tuple until one is added.
        rare = span._events.__class__ is not tuple or span._links.__class__ is not tuple
        status = span._status
    else:
        context = span.context
        parent = span.parent
        name = span.name.encode()
        # The protobuf enum is the API's SpanKind value plus one (0 is UNSPECIFIED).
        kind = _KINDS[span.kind.value]
        start_time, end_time = span.start_time, span.end_time
        attributes = span.attributes
        dropped = span.dropped_attributes
        rare = True
        status = span.status
    assert context is not None  # noqa: S101 -- an ended SDK span always has its context
    out = bytearray(b"\x0a\x10")
    out += context.trace_id.to_bytes(16, "big")
    out += b"\x12\x08"
    out += context.span_id.to_bytes(8, "big")
    state = context.trace_state
    if state:
        out += _field(b"\x1a", ",".join(f"{k}={v}" for k, v in state.items()).encode())
    if parent is not None:
        out += b"\x22\x08"
        out += parent.span_id.to_bytes(8, "big")
    if name:
        out += b"\x2a"
        out += _varint(len(name))
        out += name
    out += kind
    if start_time:
        out += b"\x39"
        out += _pack_fixed64(start_time)
    if end_time:
        out += b"\x41"
        out += _pack_fixed64(end_time)
    out += _attributes(b"\x4a", attributes)
    if dropped:
        out += b"\x50" + _varint(dropped)
    if rare:
        if span.events or span.dropped_events:
            out += _events(span)
        if span.links or span.dropped_links:
            out += _links(span)
    if status.description or status.status_code.value:
        body = _field(b"\x12", status.description.encode()) if status.description else b""
        if status.status_code.value:
            body += b"\x18" + _SMALL[status.status_code.value]
        out += _field(b"\x7a", body)
    else:
        out += _UNSET_STATUS
    out += b"\x85\x01"
    out += _flags(parent)
    return bytes(out)


def _events(span: ReadableSpan) -> bytes:
    out = b""
    for event in span.events:
        body = b"\x09" + _pack_fixed64(event.timestamp) if event.timestamp else b""
        if event.name:
            body += _field(b"\x12", event.name.encode())
        body += _attributes(b"\x1a", event.attributes)
        if event.dropped_attributes:
            body += b"\x20" + _varint(event.dropped_attributes)
        out += _field(b"\x5a", body)
    if span.dropped_events:
        out += b"\x60" + _varint(span.dropped_events)
    return out


def _links(span: ReadableSpan) -> bytes:
    # Like the SDK's encoder, a link's trace state is not sent.
    out = b""
    for link in span.links:
        linked = link.context
        body = (
            b"\x0a\x10"
            + linked.trace_id.to_bytes(16, "big")
            + b"\x12\x08"
            + linked.span_id.to_bytes(8, "big")
            + _attributes(b"\x22", link.attributes)
        )
        if link.dropped_attributes:
            body += b"\x28" + _varint(link.dropped_attributes)
        out += _field(b"\x6a", body + b"\x35" + _flags(linked))
    if span.dropped_links:
        out += b"\x70" + _varint(span.dropped_links)
    return out


def _scope(scope: Any) -> bytes:
    if scope is None:
        return b""
    out = b""
    if scope.name:
        out += _field(b"\x0a", scope.name.encode())
    if scope.version:
        out += _field(b"\x12", scope.version.encode())
    return out + _attributes(b"\x1a", scope.attributes)


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """Return the serialized ``ExportTraceServiceRequest`` of ``spans``.

    The bytes are those the SDK's ``encode_spans(spans).SerializeToString()``
    gives: spans grouped by resource, then by instrumentation scope, in the
    order first seen.
    """
    # Grouped by identity: a Resource hashes by serializing its attributes to JSON
    # (~6 µs a span), and a provider's spans share one Resource object anyway.
    resources: dict[int, Any] = {}
    grouped: dict[int, dict[Any, list[bytes]]] = {}
    for span in spans:
        resource = span.resource
        scopes = grouped.get(id(resource))
        if scopes is None:
            resources[id(resource)] = resource
            scopes = grouped[id(resource)] = {}
        scopes.setdefault(span.instrumentation_scope or None, []).append(
            _field(b"\x12", _span(span))
        )
    request = []
    for key, scopes in grouped.items():
        resource = resources[key]
        body = [_field(b"\x0a", _attributes(b"\x0a", resource.attributes))]
        for scope, encoded in scopes.items():
            scope_spans = _field(b"\x0a", _scope(scope)) + b"".join(encoded)
            schema = scope.schema_url if scope is not None else None
            if schema:
                scope_spans += _field(b"\x1a", schema.encode())
            body.append(_field(b"\x12", scope_spans))
        if resource.schema_url:
            body.append(_field(b"\x1a", resource.schema_url.encode()))
        request.append(_field(b"\x0a", b"".join(body)))
    return b"".join(request)


class OtlpHttpSpanExporter(SpanExporter):
    """Exports spans as OTLP/HTTP protobuf, encoded by :func:`encode_spans`.

    Retries as the SDK's exporter does: on a connection error and on 408, 429,
    502, 503 and 504, with exponential backoff and jitter, until ``timeout``
    has passed since the export began; a ``Retry-After`` in seconds is honoured
    within that time. TLS verifies against the system's certificate authorities.

    Args:
        endpoint: the full traces URL, such as ``http://collector:4318/v1/traces``.
        headers: extra request headers (an API key, say).
        timeout: seconds one export may take, retries included.
    """

    def __init__(
        self, endpoint: str, *, headers: Mapping[str, str] | None = None, timeout: float = 10.0
    ) -> None:
        import requests  # noqa: PLC0415 -- comes with the otlp extra, needed only here

        self._endpoint = endpoint
        self._timeout = timeout
        self._session = requests.Session()
        # Environment settings read once here, not per export: with trust_env on,
        # requests looks for a .netrc and the proxy variables on every request
        # (2.5% of a fully traced server's CPU in a profile).
        self._session.trust_env = False
        self._session.proxies.update(requests.utils.get_environ_proxies(endpoint))
        self._session.headers.update({**(headers or {}), "Content-Type": _CONTENT_TYPE})
        self._requests_error = requests.RequestException
        self._shutdown = threading.Event()

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        """Send one batch; ``FAILURE`` once retries are spent (the batch is then dropped)."""
        if self._shutdown.is_set():
            return SpanExportResult.FAILURE
        data = encode_spans(spans)
        deadline = time.monotonic() + self._timeout
        backoff = 1.0
        while True:
            remaining = deadline - time.monotonic()
            wait: float | None
            # Full jitter on our own backoff: exporters of many instances retrying an
            # overloaded collector together would otherwise arrive in waves.
            jittered = random.uniform(0, backoff)  # noqa: S311 -- jitter, not secrecy
            try:
                response = self._session.post(self._endpoint, data=data, timeout=remaining)
            except self._requests_error as exc:
                wait, reason = jittered, type(exc).__name__
            else:
                if response.ok:
                    return SpanExportResult.SUCCESS
                reason = f"status {response.status_code}"
                wait = None
                if response.status_code in _RETRYABLE:
                    wait = _retry_after(response.headers.get("Retry-After"), jittered)
            if wait is None or time.monotonic() + wait >= deadline:
                logger.warning("span export failed, %d spans dropped: %s", len(spans), reason)
                return SpanExportResult.FAILURE
            if self._shutdown.wait(wait):
                return SpanExportResult.FAILURE
            backoff *= 2

    def shutdown(self) -> None:
        """Stop retrying, refuse further batches and close the connections."""
        self._shutdown.set()
        self._session.close()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        """Nothing is buffered here (the batch processor holds the spans)."""
        return True


def _retry_after(value: str | None, backoff: float) -> float:
    if value is not None:
        try:
            return max(0.0, float(value))
        except ValueError:
            pass
    return backoff
