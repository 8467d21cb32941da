"""Faults between Bastion Docs and Redis: requests never notice, the outage is logged once.

Redis carries the shared circuit state here (``redis.url`` is set). The service
runs in-process on SQLite with a FaultProxy between it and the test Redis; the
state is re-read every 0.2 s, so an outage of a second or two is seen by many
refreshes, and still logged and counted once. Circuits keep working on local
state meanwhile, and what they did is published once Redis is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import json

import orjson
import pytest
import redis.asyncio as aioredis
from faults_support import MARGIN, circuit, new_owner, service, timed, wait_for_state
from prometheus_client import REGISTRY

from bastion.testing import FakeLLMProvider, FaultProxy, lifespan_client

pytestmark = pytest.mark.redis

REFRESH = 0.2
DEGRADED = "dependency unavailable: running degraded"
RECOVERED = "dependency available again"
LLM_POLICY = {
    "retries": 0,
    "timeout": 0.5,
    "total_timeout": 0.5,
    "consecutive_failures": 2,
    "minimum_calls": 100,
    "open_duration": 30.0,
}


@pytest.fixture
def proxy(redis_url):
    with FaultProxy(redis_url, name="redis-proxy") as faults:
        yield faults


@pytest.fixture
def provider():
    with FakeLLMProvider() as fake:
        yield fake


@pytest.fixture
def served(sqlite_url, redis_url, redis_prefix, proxy, provider):
    """Run the service with Redis behind the proxy; yields the client and an owner's headers.

    Entered inside the test, not as a fixture: the app's log sink binds the stdout of
    the phase it is built in, and capsysbinary replaces that stdout at every phase.
    """

    @contextlib.asynccontextmanager
    async def run():
        app = service(
            sqlite_url,
            logging={"level": "INFO", "format": "json"},
            redis={
                "url": proxy.url_for(redis_url),
                "key_prefix": redis_prefix,
                "socket_timeout": 0.5,
            },
            resilience={
                "state_refresh_interval": REFRESH,
                "state_timeout": 0.1,
                "dependencies": {"llm": LLM_POLICY},
            },
            llm={"url": provider.url},
            # These scenarios pin the circuits' and the limiter's use of Redis. Identity's
            # own (the access-token deny list, checked on every request within
            # identity.deny_list.timeout, 50 ms, and the permission cache) is kept in memory:
            # how it degrades is identity's concern, not what these scenarios measure. The
            # same for flags' change notifications (their outage has tests of its own).
            identity={"store_url": "memory://"},
            flags={"store_url": "memory://"},
        )
        async with lifespan_client(app) as client:
            try:
                yield client, await new_owner(app)
            finally:
                # The outage gauge and counter are process-wide: end the outage before
                # the app stops, so the next test starts with Redis seen as up.
                proxy.restore()
                await _outage_over(within=10 * REFRESH + MARGIN)

    return run


@pytest.fixture
async def shared_state(redis_url, redis_prefix):
    """Read a circuit's state from the shared hash, straight from Redis (not through the proxy)."""
    direct = aioredis.from_url(redis_url)

    async def state(name: str) -> str | None:
        raw = await direct.hget(f"{redis_prefix}circuits", name)
        return None if raw is None else orjson.loads(raw)["s"]

    yield state
    await direct.aclose()


def outages() -> float:
    return (
        REGISTRY.get_sample_value("bastion_dependency_outages_total", {"dependency": "redis"})
        or 0.0
    )


def degraded_gauge() -> float | None:
    return REGISTRY.get_sample_value("bastion_dependency_degraded", {"dependency": "redis"})


class LogLines:
    """The JSON log lines written to stdout so far."""

    def __init__(self, capture) -> None:
        self.capture = capture
        self.seen: list[dict] = []

    def count(self, event: str) -> int:
        """How many lines of ``event`` were logged so far."""
        lines = self.capture.readouterr().out.decode().splitlines()
        self.seen.extend(json.loads(line) for line in lines if line.startswith("{"))
        return sum(1 for line in self.seen if line.get("event") == event)

    def outage_lines(self) -> list[dict]:
        """The degraded and recovered lines, for failure messages."""
        return [
            f"{line['timestamp']} {line['event']} {line.get('error')}"
            for line in self.seen
            if line.get("event") in {DEGRADED, RECOVERED}
        ]


@pytest.fixture
def log(capsysbinary) -> LogLines:
    return LogLines(capsysbinary)


async def document_traffic(client, owner, seconds: float) -> float:
    """Create and list documents for ``seconds``; return the slowest request's time."""
    loop = asyncio.get_running_loop()
    end, slowest, number = loop.time() + seconds, 0.0, 0
    while loop.time() < end:
        number += 1
        created, elapsed = await timed(
            client.post("/v1/documents", json={"title": f"Doc {number}"}, headers=owner)
        )
        listed, listed_elapsed = await timed(client.get("/v1/documents", headers=owner))
        assert (201, 200) == (created.status_code, listed.status_code)
        slowest = max(slowest, elapsed, listed_elapsed)
    return slowest


async def _outage_over(within: float) -> bool:
    """Wait until the degraded gauge is back at 0 (or was never set); whether it is."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while degraded_gauge() not in (None, 0.0):
        if loop.time() > deadline:
            return False
        await asyncio.sleep(REFRESH / 4)
    return True


async def recovered(log) -> None:
    """Wait until the outage is over: the gauge back at 0, one 'available again' line."""
    assert await _outage_over(within=5 * REFRESH + MARGIN), "the Redis outage never ended"
    assert 1 == log.count(RECOVERED)


class TestRedisOutage:
    @pytest.mark.parametrize("fault", ["outage", "hang", "reset_peer"])
    async def test_requests_are_unaffected_and_the_outage_logged_once(
        self, served, proxy, log, fault
    ):
        """Out, hung or resetting, then restored: requests succeed fast; one line each way."""
        async with served() as (client, owner):
            before = outages()
            getattr(proxy, fault)()
            slowest = await document_traffic(client, owner, seconds=6 * REFRESH)
            live, live_elapsed = await timed(client.get("/health/live"))
            assert 1 == log.count(DEGRADED)
            assert (1.0, 1.0) == (outages() - before, degraded_gauge())
            assert slowest < MARGIN
            assert (200, True) == (live.status_code, live_elapsed < MARGIN)
            proxy.restore()
            await recovered(log)
            await document_traffic(client, owner, seconds=2 * REFRESH)
            assert (1, 1) == (log.count(DEGRADED), log.count(RECOVERED)), log.outage_lines()

    async def test_latency_does_not_reach_requests(self, served, proxy, log):
        """Redis 50 ms slower: requests make no Redis call, so they are not slower; no outage."""
        async with served() as (client, owner):
            proxy.latency(50)
            slowest = await document_traffic(client, owner, seconds=5 * REFRESH)
            assert slowest < MARGIN
            assert 0 == log.count(DEGRADED)


class TestCircuitsWithoutRedis:
    async def test_circuit_opens_locally_and_is_published_after_recovery(
        self, served, proxy, provider, shared_state, log
    ):
        """With Redis out the llm circuit still opens; once Redis is back the opening is shared."""
        async with served() as (client, owner):
            proxy.outage()
            provider.behave("fail", status=500)
            for _ in range(2):
                response = await client.post(
                    "/v1/assistant/ask", json={"question": "anything"}, headers=owner
                )
                assert response.json()["degraded"]
            await wait_for_state(client, "llm", "open", within=1.0)
            proxy.restore()
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 10 * REFRESH + MARGIN
            while (await shared_state("llm")) != "open":
                assert loop.time() < deadline, "the opening was never published"
                await asyncio.sleep(REFRESH / 2)
            assert "open" == (await circuit(client, "llm"))["state"]
            await recovered(log)
