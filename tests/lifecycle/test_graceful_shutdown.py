"""A real `bastion serve` process under SIGTERM: nothing that started is lost, and it exits 0."""

from __future__ import annotations

import asyncio
import hashlib
import signal

import httpx
import pytest
from shutdown_support import (
    EXIT_SECONDS,
    finish_upload,
    refuses_connections,
    start_upload,
    wait_for,
)
from startup_apps import REFUSAL

pytestmark = pytest.mark.slow

SLOW_SECONDS = 2.0
DRAIN_DELAY = 1.0
BODY = bytes(range(256)) * 256  # 64 KiB, enough to span many reads
HALF = len(BODY) // 2


async def _in_flight(client: httpx.AsyncClient) -> int:
    # The probe request counts itself.
    return int((await client.get("/in-flight")).json()["in_flight"]) - 1


def _index(names: list[str], event: str, start: int = 0) -> int:
    return names.index(event, start)


class TestSigterm:
    async def test_every_request_started_before_the_signal_completes(self, serve_process):
        """Every request begun before SIGTERM, a half-sent upload too, completes; exit 0."""
        served = serve_process("--drain-delay", str(DRAIN_DELAY), "--shutdown-timeout", "10")
        async with httpx.AsyncClient(base_url=served.url, timeout=EXIT_SECONDS) as client:
            slow = [
                asyncio.create_task(client.get("/slow", params={"seconds": SLOW_SECONDS, "n": n}))
                for n in range(4)
            ]
            reader, writer = await start_upload(served.port, BODY, HALF)
            await wait_for(lambda: _in_flight_is(client, 5), seconds=5, what="5 requests in flight")

            served.signal(signal.SIGTERM)

            ready_statuses: list[int] = []

            async def readiness_failed() -> bool:
                # A fresh connection each time: the listener is still open during the delay.
                async with httpx.AsyncClient(base_url=served.url) as probe:
                    ready_statuses.append((await probe.get("/health/ready")).status_code)
                return ready_statuses[-1] == 503

            await wait_for(readiness_failed, seconds=DRAIN_DELAY, what="readiness 503")
            await wait_for(
                lambda: refuses_connections(served.port),
                seconds=DRAIN_DELAY + 2,
                what="the listener to close",
            )
            # The upload began before the signal; its second half arrives after the
            # listener closed, and it must still be served.
            upload_status, upload = await finish_upload(reader, writer, BODY[HALF:])
            responses = await asyncio.gather(*slow)

        assert 0 == served.wait()
        assert 503 == ready_statuses[-1]
        assert (200, {"bytes": len(BODY), "sha256": hashlib.sha256(BODY).hexdigest()}) == (
            upload_status,
            upload,
        )
        assert [200] * 4 == [response.status_code for response in responses]
        assert [{"n": str(n), "slept": SLOW_SECONDS} for n in range(4)] == [
            response.json() for response in responses
        ]

    async def test_shutdown_steps_are_logged_in_order(self, serve_process):
        """Each shutdown step is logged in order, hooks from the highest priority down."""
        served = serve_process("--drain-delay", "0.2", "--shutdown-timeout", "10")
        async with httpx.AsyncClient(base_url=served.url, timeout=EXIT_SECONDS) as client:
            slow = asyncio.create_task(client.get("/slow", params={"seconds": 1}))
            await wait_for(lambda: _in_flight_is(client, 1), seconds=5, what="a request in flight")
            served.signal(signal.SIGTERM)
            response = await slow
        assert 0 == served.wait()
        assert 200 == response.status_code

        names = served.event_names()
        steps = [
            "shutdown signal received",
            "draining: readiness now reports 503",
            "drain delay: still serving while load balancers notice",
            "listener closed: new connections are refused",
            "waiting for in-flight requests",
            "in-flight requests finished",
            "stopped",
            "server stopped",
        ]
        positions = [names.index(step) for step in steps]
        assert sorted(positions) == positions
        hooks = [e["step"] for e in served.events() if e["event"] == "shutdown step done"]
        # Traces flush last, after everything that could still make a span.
        assert [
            "close test clients",
            "close test cache",
            "flush deprecation usage",
            "stop idempotency keys",
            "stop feature flags",
            "stop audit trail",
            "close identity",
            "close rate limits",
            "stop resilience",
            "close database pool",
            "flush traces",
        ] == hooks
        stopped = next(e for e in served.events() if e["event"] == "stopped")
        assert 0 == stopped["requests_cut_off"]
        assert "bastion.server" == next(
            e["logger"] for e in served.events() if e["event"] == "shutdown signal received"
        )

    async def test_request_longer_than_the_timeout_is_cut_off_and_counted(self, serve_process):
        """A request past the timeout is cut off, counted and logged once; exit still 0."""
        served = serve_process("--shutdown-timeout", "0.5")
        async with httpx.AsyncClient(base_url=served.url, timeout=EXIT_SECONDS) as client:
            endless = asyncio.create_task(client.get("/slow", params={"seconds": 60}))
            await wait_for(lambda: _in_flight_is(client, 1), seconds=5, what="a request in flight")
            served.signal(signal.SIGTERM)
            response = await endless

        assert 0 == served.wait()
        # Cut off before it responded: a retryable 503 problem, not the server's bare 500.
        assert 503 == response.status_code
        assert "application/problem+json" == response.headers["content-type"]
        assert "SERVICE_UNAVAILABLE" == response.json()["code"]
        assert response.headers["x-request-id"] == response.json()["correlation_id"]
        events = served.events()
        timeout_line = next(e for e in events if e["event"].startswith("shutdown timeout reached"))
        assert 1 == timeout_line["requests"]
        assert 1 == sum(e["event"] == "request cut off by shutdown timeout" for e in events)
        assert 1 == next(e for e in events if e["event"] == "stopped")["requests_cut_off"]
        assert not [e for e in events if "Exception in ASGI application" in e["event"]]

    async def test_sigint_shuts_down_the_same_way(self, serve_process):
        """Ctrl+C (SIGINT) drains like SIGTERM and the process exits 0."""
        served = serve_process("--shutdown-timeout", "5")
        served.signal(signal.SIGINT)
        assert 0 == served.wait()
        received = next(e for e in served.events() if e["event"] == "shutdown signal received")
        assert "SIGINT" == received["signal"]
        assert "stopped" in served.event_names()

    async def test_second_signal_forces_the_exit(self, serve_process):
        """A second signal cuts in-flight requests off at once and exits with status 1."""
        served = serve_process("--shutdown-timeout", "60")
        async with httpx.AsyncClient(base_url=served.url, timeout=EXIT_SECONDS) as client:
            endless = asyncio.create_task(client.get("/slow", params={"seconds": 60}))
            await wait_for(lambda: _in_flight_is(client, 1), seconds=5, what="a request in flight")
            served.signal(signal.SIGTERM)
            await wait_for(
                lambda: refuses_connections(served.port), seconds=5, what="the listener to close"
            )
            served.signal(signal.SIGTERM)
            # Bounded well below the 60 s timeout: only forcing explains an exit this fast.
            assert 1 == served.wait(timeout=10)
            try:
                status = (await endless).status_code
            except httpx.TransportError:
                status = None
        # Abandoned, never answered as a success: a 503 problem when the cancellation
        # got that far, else a dropped connection.
        assert status in {503, None}
        events = served.events()
        forced = next(e for e in events if e["event"].startswith("forced exit"))
        assert ("forced exit: second signal; in-flight requests abandoned", 1) == (
            forced["event"],
            forced["requests"],
        )
        assert 1 == next(e for e in events if e["event"] == "stopped")["requests_cut_off"]
        assert not [e for e in events if "Exception in ASGI application" in e["event"]]


async def _in_flight_is(client: httpx.AsyncClient, expected: int) -> bool:
    return expected <= await _in_flight(client)


class TestWorkers:
    async def test_sigterm_to_the_supervisor_drains_every_worker(self, serve_process):
        """Two workers warn loudly at start, then SIGTERM drains both and the parent exits 0."""
        served = serve_process(
            "--workers",
            "2",
            "--drain-delay",
            "0.2",
            "--shutdown-timeout",
            "10",
            # Two workers would both run start-up migrations on one SQLite file; the
            # subject here is the drain, not migration locking. Without migrations there
            # are no audit or flag tables, which readiness would (rightly) report.
            env={
                "BASTION_MIGRATIONS__MODE": "off",
                "BASTION_AUDIT__ENABLED": "false",
                "BASTION_FLAGS__ENABLED": "false",
            },
            ready=False,
        )
        served.wait_until_logged("listening", count=2)
        served.wait_until_ready()
        async with httpx.AsyncClient(base_url=served.url, timeout=EXIT_SECONDS) as client:
            slow = [
                asyncio.create_task(client.get("/slow", params={"seconds": 1, "n": n}))
                for n in range(4)
            ]
            # Each worker counts only its own requests, so wait for the handlers' log lines.
            await asyncio.to_thread(served.wait_until_logged, "slow request started", 4)
            served.signal(signal.SIGTERM)
            responses = await asyncio.gather(*slow)

        assert 0 == served.wait()
        assert [200] * 4 == [response.status_code for response in responses]
        names = served.event_names()
        assert 2 == names.count("stopped")
        assert 2 == names.count("server stopped")
        stopped = next(e for e in served.events() if e["event"] == "workers stopped")
        assert [0, 0] == stopped["exit_codes"]

        warning = served.stderr
        assert warning.startswith("bastion: WARNING: 2 worker processes")
        assert 1 < len(warning.splitlines())
        for named in ("http", "ratelimit", "jobs", "BASTION_REDIS__URL"):
            assert named in warning
        assert "SQLite with 2 workers" in warning
        assert "BASTION_DATABASE__URL" in warning

    def test_worker_that_cannot_start_stops_the_supervisor(self, serve_process):
        """A worker rejecting its configuration prints one line and stops the supervisor."""
        served = serve_process(
            "--workers",
            "2",
            app="tests.lifecycle.startup_apps:create_misconfigured_app",
            env={"BASTION_MIGRATIONS__MODE": "off"},
            ready=False,
        )
        assert 3 == served.wait()
        lines = [line for line in served.stderr.splitlines() if line.startswith("bastion: ")]
        assert f"bastion: {REFUSAL}" in lines
        assert "Traceback" not in served.stderr
