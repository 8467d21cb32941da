"""Request deadlines under a real uvicorn server, where each request runs in its own task."""

from __future__ import annotations

import asyncio
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from starlette.responses import StreamingResponse

import bastion

SHORT = 0.3
LATE = 0.5


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def served(sqlite_url) -> Iterator[str]:
    """An app with short route deadlines, served by uvicorn on a real port in a thread."""
    app = FastAPI()
    bastion.install(
        app,
        database={"url": sqlite_url},
        logging={"level": "CRITICAL"},
        resilience={"route_deadlines": {"/slow": SHORT, "/stream": SHORT}},
    )

    @app.get("/slow")
    async def slow() -> dict[str, str]:
        await asyncio.sleep(30)
        return {}

    @app.get("/fast")
    async def fast() -> dict[str, str]:
        return {"ok": "yes"}

    @app.get("/stream")
    async def stream() -> StreamingResponse:
        async def chunks():
            yield b"first\n"
            await asyncio.sleep(30)
            yield b"never\n"

        return StreamingResponse(chunks())

    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    # A real server must bind before the test calls it; bounded at 10 s.
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.01)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)
    assert not thread.is_alive()


class TestServed:
    def test_slow_request_gets_504_and_the_server_keeps_serving(self, served):
        """Over real HTTP the slow request is answered 504 in time; the next one is served."""
        with httpx.Client(base_url=served, timeout=5) as client:
            started = time.monotonic()
            response = client.get("/slow")
            elapsed = time.monotonic() - started
            assert 504 == response.status_code
            assert "REQUEST_TIMEOUT" == response.json()["code"]
            assert SHORT <= elapsed < SHORT + LATE
            assert {"ok": "yes"} == client.get("/fast").json()

    def test_deadline_mid_stream_aborts_the_connection(self, served):
        """A response already streaming is cut off: the client sees an incomplete body."""
        with (
            httpx.Client(base_url=served, timeout=5) as client,
            client.stream("GET", "/stream") as response,
        ):
            assert 200 == response.status_code
            with pytest.raises(httpx.RemoteProtocolError):
                response.read()
