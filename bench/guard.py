"""Micro-benchmark: the request guard's cost per request, in-process, against the app without it.

Each case drives an ASGI app directly (fake ``receive`` and ``send``, no server,
no network) and reports CPU ns per request of this thread, the median of
``--rounds`` interleaved rounds; each guarded case is printed with its baseline
from the same run (the same app without :class:`GuardMiddleware`), the ns the
guard adds and the ratio:

- **1 KB JSON POST** (``Content-Length``) to a raw ASGI endpoint that reads the
  body and answers 200: the guard's whole cost laid bare (headers, request line,
  buffering, UTF-8/NUL/syntax check by orjson, the cheap shape bounds, replay);
- the same **sent chunked** in 4 messages (joined once by the guard);
- the same to a **FastAPI endpoint** taking a ``dict`` body: the ratio a real
  JSON route sees, FastAPI's own parsing and validation included;
- **1 KB JSON that needs the walk** (the byte bounds pass ``json_max_elements``,
  so the parsed document is walked);
- **GET without a body**: the guard's floor on every request;
- **1 KB octet-stream upload**, streamed through and counted, never buffered.

Usage:
    .venv/bin/python bench/guard.py [--requests 20000] [--rounds 9]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import orjson
from _machine import describe, format_description
from fastapi import FastAPI
from starlette.routing import Route, Router

from bastion.guard._middleware import GuardMiddleware, GuardRoutes
from bastion.settings import GuardSettings

ASGIApp = Callable[[dict[str, Any], Any, Any], Awaitable[None]]
PATH = "/v1/documents"


def _document(size: int, values: int = 0) -> bytes:
    """A JSON object of about ``size`` bytes; with ``values``, a list of that many numbers."""
    doc: dict[str, Any] = {
        "title": "Quarterly report",
        "tags": ["finance", "q3", "internal"],
        "owner": {"id": "018f6c2e-7b1a-7c3d-9e4f-0a1b2c3d4e5f", "name": "Ada Lovelace"},
    }
    if values:
        doc["values"] = list(range(values))
    body = orjson.dumps(doc)
    pad = size - len(body) - len(b',"text":""')
    if pad > 0:
        # Commas and colons in the text: the byte bounds overshoot, as on real prose.
        doc["text"] = "lorem, ipsum: dolor sit amet " * (pad // 29 + 1)
        doc["text"] = doc["text"][:pad]
    return orjson.dumps(doc)


class _RawEndpoint:
    """Reads the whole body, answers 200: an endpoint with no cost of its own.

    A class, not a function: Starlette calls a function endpoint with a Request.
    """

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        more = True
        while more:
            message = await receive()
            more = message.get("more_body", False)
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


def _values(value: Any) -> int:
    """Every value of a document, the root included (the guard's count)."""
    if isinstance(value, dict):
        return 1 + sum(_values(child) for child in value.values())
    if isinstance(value, list):
        return 1 + sum(_values(child) for child in value)
    return 1


def _raw_app() -> Router:
    return Router(routes=[Route(PATH, _RawEndpoint(), methods=["POST", "GET"])])


def _fastapi_app() -> FastAPI:
    app = FastAPI()

    @app.post(PATH)
    async def create(payload: dict[str, Any]) -> dict[str, int]:
        return {"fields": len(payload)}

    return app


def _guarded(inner: Any, settings: GuardSettings) -> GuardMiddleware:
    routes = GuardRoutes(settings)
    routes.read(inner.routes)
    return GuardMiddleware(inner, settings=settings, routes=routes)


def _scope(method: str, headers: list[tuple[bytes, bytes]], app: Any) -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 51234),
        "scheme": "http",
        "method": method,
        "root_path": "",
        "path": PATH,
        "raw_path": PATH.encode(),
        "query_string": b"",
        "headers": [
            (b"host", b"127.0.0.1:8000"),
            (b"user-agent", b"bench/1.0"),
            (b"accept", b"*/*"),
            *headers,
        ],
        "state": {},
        "app": app,
    }


class _Status:
    __slots__ = ("status",)

    def __init__(self) -> None:
        self.status = 0

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.status = message["status"]


def _receiver(chunks: list[bytes]) -> Callable[[], Any]:
    """A fresh ``receive`` per request, giving ``chunks`` as body messages."""
    last = len(chunks) - 1
    messages = [
        {"type": "http.request", "body": chunk, "more_body": i < last}
        for i, chunk in enumerate(chunks)
    ]

    def make() -> Any:
        it = iter(messages)

        async def receive() -> dict[str, Any]:
            return next(it, {"type": "http.disconnect"})

        return receive

    return make


async def _run(app: ASGIApp, scope: dict[str, Any], receivers: Any, requests: int) -> float:
    """Serve ``requests`` requests; return CPU ns per request."""
    send = _Status()
    gc.collect()
    started = time.thread_time_ns()
    for _ in range(requests):
        await app(scope.copy(), receivers(), send)
    elapsed = time.thread_time_ns() - started
    if send.status != 200:
        raise RuntimeError(f"unexpected status {send.status}")
    return elapsed / requests


def _cases() -> list[tuple[str, ASGIApp, ASGIApp, dict[str, Any], Any]]:
    """(name, baseline app, guarded app, scope, receivers) for every case."""
    settings = GuardSettings(content_types=["application/json", "application/octet-stream"])
    raw = _raw_app()
    guarded_raw = _guarded(raw, settings)
    fast = _fastapi_app()
    guarded_fast = _guarded(fast, settings)
    body = _document(1024)
    walked = _document(1024, values=100)

    def json_headers(data: bytes) -> list[tuple[bytes, bytes]]:
        return [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]

    chunked = [(b"content-type", b"application/json"), (b"transfer-encoding", b"chunked")]
    quarter = len(body) // 4
    pieces = [body[i * quarter : (i + 1) * quarter if i < 3 else None] for i in range(4)]
    upload = [
        (b"content-type", b"application/octet-stream"),
        (b"content-length", str(len(body)).encode()),
    ]
    return [
        (
            "1 KB JSON POST, raw endpoint",
            raw,
            guarded_raw,
            _scope("POST", json_headers(body), raw),
            _receiver([body]),
        ),
        (
            "1 KB JSON POST chunked (4 parts), raw endpoint",
            raw,
            guarded_raw,
            _scope("POST", chunked, raw),
            _receiver(pieces),
        ),
        (
            "1 KB JSON POST, FastAPI dict body",
            fast,
            guarded_fast,
            _scope("POST", json_headers(body), fast),
            _receiver([body]),
        ),
        (
            "1 KB JSON walked (within limits), raw endpoint",
            raw,
            # Exactly its value count: the byte bound (commas in the text) passes it.
            _guarded(raw, GuardSettings(json_max_elements=_values(orjson.loads(walked)))),
            _scope("POST", json_headers(walked), raw),
            _receiver([walked]),
        ),
        (
            "GET without body, raw endpoint",
            raw,
            guarded_raw,
            _scope("GET", [], raw),
            _receiver([b""]),
        ),
        (
            "1 KB octet-stream upload, raw endpoint",
            raw,
            guarded_raw,
            _scope("POST", upload, raw),
            _receiver([body]),
        ),
    ]


async def _main(args: argparse.Namespace) -> None:
    cases = _cases()
    for _, bare, guarded, scope, receivers in cases:
        # Warm-up: route tables, first-use paths.
        await _run(bare, scope, receivers, 500)
        await _run(guarded, scope, receivers, 500)
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name, *_ in cases}
    for round_ in range(args.rounds):
        # Interleaved, order flipped every round, so drift hits both sides alike.
        for name, bare, guarded, scope, receivers in cases:
            pair = (bare, guarded) if round_ % 2 == 0 else (guarded, bare)
            for app in pair:
                ns = await _run(app, scope, receivers, args.requests)
                results[name][0 if app is bare else 1].append(ns)
    print(format_description(describe()))
    print(f"{args.requests} requests a round, median of {args.rounds} rounds, CPU ns/request")
    print(f"{'case':50} {'without':>9} {'guarded':>9} {'added':>8} {'ratio':>6}")
    for name, (without, with_guard) in results.items():
        base, guard = statistics.median(without), statistics.median(with_guard)
        print(f"{name:50} {base:9.0f} {guard:9.0f} {guard - base:8.0f} {guard / base:6.2f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=9)
    args = parser.parse_args()
    asyncio.run(_main(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
