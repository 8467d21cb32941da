"""BastionServer in this process: the drain on both HTTP parsers, cut-offs, forced exits,
and start-up failures.

The server runs on the test's event loop; the signal is delivered by calling
``handle_exit`` (what the signal handler calls), except in one test that sends a
real SIGTERM to this process. The waits are on a real server draining, so they
are real time, each bounded by ``wait_for``.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import socket
from typing import Any

import httpx
import pytest
import uvicorn
from drain_app import create_app
from shutdown_support import finish_upload, refuses_connections, start_upload, wait_for
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from startup_apps import REFUSAL, create_broken_app, create_misconfigured_app

from bastion._server import EXIT_FORCED, BastionServer, lifecycle_of
from bastion.lifecycle import Phase

BODY = os.urandom(48 * 1024)
HALF = len(BODY) // 2


@pytest.fixture(autouse=True)
def _environment(monkeypatch, sqlite_url):
    monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
    monkeypatch.setenv("BASTION_LOGGING__FORMAT", "json")


class Running:
    """A BastionServer serving on the running loop."""

    def __init__(self, server: BastionServer, task: asyncio.Task[None], port: int) -> None:
        self.server = server
        self.task = task
        self.port = port
        self.url = f"http://127.0.0.1:{port}"

    def signal(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)

    async def stopped(self, seconds: float = 10) -> None:
        await asyncio.wait_for(asyncio.shield(self.task), timeout=seconds)


async def run(
    app: Any,
    *,
    http: str = "auto",
    drain_delay: float = 0.0,
    shutdown_timeout: float = 5.0,
    signals: tuple[signal.Signals, ...] = (),
) -> Running:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(
        app,
        http=http,
        lifespan="on",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=shutdown_timeout,
    )
    server = BastionServer(
        config, drain_delay=drain_delay, lifecycle=lifecycle_of(app), signals=signals
    )
    task = asyncio.create_task(server.serve(sockets=[sock]))
    await wait_for(lambda: server.started or task.done(), seconds=10, what="start-up")
    return Running(server, task, sock.getsockname()[1])


class TestDrain:
    @pytest.mark.parametrize("http", ["h11", "httptools"])
    async def test_upload_in_progress_survives_the_listener_closing(self, http):
        """A half-sent upload is served in full after the listener closes, on both parsers."""
        app = create_app()
        running = await run(app, http=http)
        lifecycle = lifecycle_of(app)
        reader, writer = await start_upload(running.port, BODY, HALF)
        await wait_for(lambda: lifecycle.in_flight == 1, seconds=5, what="the upload in flight")

        running.signal()
        await wait_for(lambda: refuses_connections(running.port), seconds=5, what="listener")
        status, body = await finish_upload(reader, writer, BODY[HALF:])
        await running.stopped()

        assert (200, {"bytes": len(BODY), "sha256": hashlib.sha256(BODY).hexdigest()}) == (
            status,
            body,
        )
        assert 0 == running.server.exit_code
        assert Phase.STOPPED == lifecycle.phase

    async def test_readiness_fails_while_the_drain_delay_passes(self):
        """During the drain delay readiness is 503 on a new connection; liveness is 200."""
        app = create_app()
        running = await run(app, drain_delay=0.5)
        running.signal()
        await wait_for(
            lambda: lifecycle_of(app).phase is Phase.DRAINING, seconds=2, what="the drain"
        )
        async with httpx.AsyncClient(base_url=running.url) as client:
            ready = await client.get("/health/ready")
            live = await client.get("/health/live")
        await running.stopped()

        assert (503, 200) == (ready.status_code, live.status_code)
        assert 0 == running.server.exit_code

    async def test_request_past_the_timeout_is_cut_off_and_counted(self):
        """A request past the timeout is cancelled and counted once; exit status 0."""
        app = create_app()
        running = await run(app, shutdown_timeout=0.2)
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            endless = asyncio.create_task(client.get("/slow", params={"seconds": 60}))
            await wait_for(lambda: lifecycle_of(app).in_flight == 1, seconds=5, what="request")
            running.signal()
            response = await endless
            await running.stopped()

        assert 503 == response.status_code
        assert "SERVICE_UNAVAILABLE" == response.json()["code"]
        assert (1, 1) == (lifecycle_of(app).cut_off, running.server.requests_cut_off)
        assert 0 == running.server.exit_code

    async def test_second_signal_forces_the_exit(self):
        """A second signal cuts in-flight requests off at once and exits with status 1."""
        app = create_app()
        running = await run(app, shutdown_timeout=60)
        async with httpx.AsyncClient(base_url=running.url, timeout=10) as client:
            endless = asyncio.create_task(client.get("/slow", params={"seconds": 60}))
            await wait_for(lambda: lifecycle_of(app).in_flight == 1, seconds=5, what="request")
            running.signal()
            await wait_for(lambda: refuses_connections(running.port), seconds=5, what="close")
            running.signal()
            # Far below the 60 s timeout: only the second signal ends it this soon.
            await running.stopped(seconds=5)
            await asyncio.gather(endless, return_exceptions=True)

        assert EXIT_FORCED == running.server.exit_code
        assert (1, Phase.STOPPED) == (lifecycle_of(app).cut_off, lifecycle_of(app).phase)


class TestWithoutBastion:
    async def test_plain_app_serves_and_stops_cleanly(self):
        """An app without bastion installed is served and shut down; it has no lifecycle."""

        async def hello(request):
            return PlainTextResponse("hello")

        app = Starlette(routes=[Route("/", hello)])
        running = await run(app)
        async with httpx.AsyncClient(base_url=running.url) as client:
            response = await client.get("/")
        running.signal()
        await running.stopped()

        assert (200, "hello") == (response.status_code, response.text)
        assert lifecycle_of(app) is None
        assert 0 == running.server.exit_code


class TestSignals:
    async def test_real_sigterm_drains_and_restores_the_handler(self):
        """A real SIGTERM drains the server, which then restores the previous handler."""
        previous = signal.getsignal(signal.SIGTERM)
        app = create_app()
        running = await run(app, signals=(signal.SIGTERM,))
        assert running.server.handle_exit == signal.getsignal(signal.SIGTERM)

        os.kill(os.getpid(), signal.SIGTERM)
        await running.stopped()

        assert 0 == running.server.exit_code
        assert previous == signal.getsignal(signal.SIGTERM)


class TestStartupFailure:
    async def test_configuration_error_is_kept_for_one_line(self):
        """A start-up ConfigurationError exits 3 and is kept for the CLI's one line."""
        app = create_misconfigured_app()
        config = uvicorn.Config(app, port=0, lifespan="on", log_config=None)
        server = BastionServer(config, lifecycle=lifecycle_of(app), signals=())

        with pytest.raises(SystemExit) as exit_info:
            await server.serve()

        assert 3 == exit_info.value.code
        assert REFUSAL == str(server.configuration_error)

    async def test_other_error_is_not_a_configuration_error(self):
        """Any other start-up failure exits 3 and is not kept as a configuration error."""
        app = create_broken_app()
        config = uvicorn.Config(app, port=0, lifespan="on", log_config=None)
        server = BastionServer(config, lifecycle=lifecycle_of(app), signals=())

        with pytest.raises(SystemExit) as exit_info:
            await server.serve()

        assert 3 == exit_info.value.code
        assert server.configuration_error is None
