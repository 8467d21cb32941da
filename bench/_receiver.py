"""A minimal OTLP/HTTP trace receiver for the benchmark: ``python bench/_receiver.py PORT``.

It accepts ``POST`` on any path (``/v1/traces`` is where exporters send),
answers ``200`` with an empty ``ExportTraceServiceResponse`` at once, then
counts the spans in the body and drops it. ``GET /stats`` returns what it got
as JSON: requests and bytes per path, spans, server spans (one per traced
request; instrumentations add internal ones), spans by kind and name (the
first 50 distinct), and bodies it could not decode.

It runs in its own process, pinned to the load generator's core, so that
receiving spans never takes CPU time from the server being measured; the
exporters under test still pay for building, encoding and sending them.
``bastion.testing.OtlpReceiver`` (for tests) keeps every span for assertions,
which under load would grow without bound: this one only counts.
"""

from __future__ import annotations

import gzip
import json
import sys
import zlib
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any

import uvicorn

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

_EMPTY_RESPONSE = [(b"content-type", b"application/x-protobuf"), (b"content-length", b"0")]


class _Stats:
    def __init__(self) -> None:
        self.requests: Counter[str] = Counter()
        self.bytes: Counter[str] = Counter()
        self.spans = 0
        self.server_spans = 0
        self.names: Counter[str] = Counter()
        self.undecoded = 0

    def as_json(self) -> bytes:
        return json.dumps(
            {
                "requests": dict(self.requests),
                "bytes": dict(self.bytes),
                "spans": self.spans,
                "server_spans": self.server_spans,
                "names": dict(self.names),
                "undecoded": self.undecoded,
            }
        ).encode()


# OTLP's SpanKind values, to name them in the stats.
_KINDS = {0: "unspecified", 1: "internal", 2: "server", 3: "client", 4: "producer", 5: "consumer"}
_SERVER = 2
_MAX_NAMES = 50


def _spans(body: bytes, headers: dict[bytes, bytes]) -> list[tuple[int, str]]:
    """Return (kind, name) of every span in one export request body."""
    encoding = headers.get(b"content-encoding", b"")
    if encoding == b"gzip":
        body = gzip.decompress(body)
    elif encoding == b"deflate":
        body = zlib.decompress(body)
    if headers.get(b"content-type", b"").startswith(b"application/json"):
        document = json.loads(body)
        return [
            (_kind_number(span.get("kind", 0)), span.get("name", ""))
            for resource in document.get("resourceSpans", [])
            for scope in resource.get("scopeSpans", [])
            for span in scope.get("spans", [])
        ]
    # Imported here: a receiver that only counts requests still works without the
    # OTLP protobuf package.
    from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (  # noqa: PLC0415
        ExportTraceServiceRequest,
    )

    request = ExportTraceServiceRequest.FromString(body)
    return [
        (span.kind, span.name)
        for resource in request.resource_spans
        for scope in resource.scope_spans
        for span in scope.spans
    ]


def _kind_number(kind: int | str) -> int:
    if isinstance(kind, int):
        return kind
    names = {f"SPAN_KIND_{name.upper()}": number for number, name in _KINDS.items()}
    return names.get(kind, 0)


def make_app(stats: _Stats) -> Callable[[dict[str, Any], Receive, Send], Awaitable[None]]:
    """Return the receiver's ASGI callable, counting into ``stats``."""

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        if scope["method"] == "GET" and scope["path"] == "/stats":
            body = stats.as_json()
            await send(
                {
                    "type": "http.response.start",
                    "status": 200,
                    "headers": [(b"content-type", b"application/json")],
                }
            )
            await send({"type": "http.response.body", "body": body})
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        status = 200 if scope["method"] == "POST" else 405
        await send({"type": "http.response.start", "status": status, "headers": _EMPTY_RESPONSE})
        await send({"type": "http.response.body", "body": b""})
        if status != 200:
            return
        body = b"".join(chunks)
        stats.requests[scope["path"]] += 1
        stats.bytes[scope["path"]] += len(body)
        try:
            spans = _spans(body, dict(scope["headers"]))
        except Exception:  # noqa: BLE001 -- a body it cannot read is counted, never fatal
            stats.undecoded += 1
            return
        stats.spans += len(spans)
        for kind, name in spans:
            stats.server_spans += kind == _SERVER
            key = f"{_KINDS.get(kind, kind)} {name}"
            if key in stats.names or len(stats.names) < _MAX_NAMES:
                stats.names[key] += 1

    return app


def main() -> None:
    """Serve the receiver on loopback until terminated."""
    uvicorn.run(
        make_app(_Stats()),
        host="127.0.0.1",
        port=int(sys.argv[1]),
        log_config=None,
        access_log=False,
        lifespan="off",
    )


if __name__ == "__main__":
    main()
