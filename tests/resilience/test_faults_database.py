"""Faults between Bastion Docs and PostgreSQL: bounded failures, a circuit, no lost writes.

The service runs in-process; a FaultProxy sits between it and the test
session's PostgreSQL database. Each scenario switches a fault on while
documents are created and read, then checks what clients saw (bounded times,
503/504 problems rather than 500s), the ``database`` circuit, and, through a
direct connection that bypasses the proxy, that every write answered 201 is
stored exactly once and every failed one left nothing.
"""

from __future__ import annotations

import asyncio
import secrets

import asyncpg
import pytest
from faults_support import MARGIN, circuit, new_owner, service, timed, wait_for_state

from bastion.testing import FaultProxy, lifespan_client

pytestmark = pytest.mark.postgres

# New connections: 1 s each, 2 s in all with one retry; three failures in a row open the
# circuit for 1 s. Requests: 3 s deadline, so a hung pooled connection cannot hold one longer.
POLICY = {
    "timeout": 1.0,
    "total_timeout": 2.0,
    "retries": 1,
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "consecutive_failures": 3,
    "minimum_calls": 100,
    "open_duration": 1.0,
    "half_open_probes": 1,
}
DEADLINE = 3.0
REQUEST_BOUND = DEADLINE + MARGIN
# What a client may see while the database is out: never a 500.
OUTAGE_STATUSES = {502, 503, 504}
OUTAGE_CODES = {"SERVICE_UNAVAILABLE", "DEPENDENCY_FAILURE", "REQUEST_TIMEOUT"}


@pytest.fixture
def proxy(postgres_url):
    with FaultProxy(postgres_url, name="postgres-proxy") as faults:
        yield faults


@pytest.fixture
def app(postgres_url, proxy):
    return service(
        proxy.url_for(postgres_url),
        database={
            "pool_size": 2,
            "max_overflow": 2,
            "pool_timeout": 2.0,
            "connect_timeout": 1.0,
        },
        resilience={"request_deadline": DEADLINE, "dependencies": {"database": POLICY}},
    )


@pytest.fixture
async def client(app):
    async with lifespan_client(app) as c:
        yield c


@pytest.fixture
async def owner(app, client):
    return await new_owner(app)


@pytest.fixture
def stored(postgres_url):
    """Count stored documents by title over a direct connection (not through the proxy)."""

    async def count(titles: list[str]) -> dict[str, int]:
        dsn = postgres_url.replace("postgresql+asyncpg://", "postgresql://", 1)
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            rows = await conn.fetch(
                "SELECT title, count(*) AS n FROM documents WHERE title = ANY($1) GROUP BY title",
                titles,
            )
        finally:
            await conn.close()
        return {row["title"]: row["n"] for row in rows}

    return count


class Writes:
    """Documents created with unique titles, sorted by what the client was told."""

    def __init__(self, client, owner) -> None:
        self.client, self.owner = client, owner
        self.created: list[str] = []
        self.failed: list[str] = []
        self.slowest = 0.0

    async def create(self, count: int) -> list:
        async def one():
            title = f"doc-{secrets.token_hex(8)}"
            response, elapsed = await timed(
                self.client.post("/v1/documents", json={"title": title}, headers=self.owner)
            )
            self.slowest = max(self.slowest, elapsed)
            if response.status_code == 201:
                self.created.append(title)
            else:
                self.failed.append(title)
            return response

        return await asyncio.gather(*(one() for _ in range(count)))

    async def check_exactly_once(self, stored) -> None:
        """Every 201 is stored once; every failure left nothing."""
        counts = await stored(self.created + self.failed)
        assert dict.fromkeys(self.created, 1) == counts


def assert_outage_answer(response) -> None:
    assert response.status_code in OUTAGE_STATUSES, response.text
    assert response.json()["code"] in OUTAGE_CODES
    assert "asyncpg" not in response.text
    assert "Connection" not in response.json()["detail"]


async def live_is_fast(client) -> None:
    response, elapsed = await timed(client.get("/health/live"))
    assert (200, True) == (response.status_code, elapsed < MARGIN)


class TestLatency:
    async def test_latency_slows_but_serves(self, client, owner, proxy, stored):
        """100 ms more per round trip: documents are created and listed, each write once."""
        proxy.latency(100)
        writes = Writes(client, owner)
        await writes.create(4)
        listed, elapsed = await timed(client.get("/v1/documents", headers=owner))
        assert (4, 0) == (len(writes.created), len(writes.failed))
        assert (200, 4) == (listed.status_code, listed.json()["total"])
        assert elapsed < REQUEST_BOUND
        assert "closed" == (await circuit(client, "database"))["state"]
        await writes.check_exactly_once(stored)


class TestHang:
    async def test_hang_is_bounded_by_the_request_deadline(self, client, owner, proxy, stored):
        """A database that never answers: requests end by their deadline, liveness stays fast."""
        writes = Writes(client, owner)
        await writes.create(2)
        hang = proxy.hang()
        responses, _ = await asyncio.gather(writes.create(3), live_is_fast(client))
        listed, elapsed = await timed(client.get("/v1/documents", headers=owner))
        for response in [*responses, listed]:
            assert_outage_answer(response)
        assert max(writes.slowest, elapsed) < REQUEST_BOUND
        proxy.remove(hang)
        await _recovers(client, owner)
        await writes.create(2)
        assert (4, 3) == (len(writes.created), len(writes.failed))
        await writes.check_exactly_once(stored)


class TestResets:
    async def test_resets_fail_fast_and_open_the_circuit(self, client, owner, proxy, stored):
        """Every connection reset: requests fail with 503 (never 500), then the circuit opens."""
        writes = Writes(client, owner)
        await writes.create(2)
        proxy.reset_peer()
        for _ in range(3):
            for response in await writes.create(2):
                assert_outage_answer(response)
        await wait_for_state(client, "database", "open", within=2.0)
        tried = proxy.stats.connections_accepted
        response, elapsed = await timed(client.get("/v1/documents", headers=owner))
        assert (503, "SERVICE_UNAVAILABLE") == (response.status_code, response.json()["code"])
        assert int(response.headers["Retry-After"]) >= 1
        assert elapsed < MARGIN
        assert tried == proxy.stats.connections_accepted
        await live_is_fast(client)
        proxy.clear()
        await _recovers(client, owner)
        assert "closed" == (await circuit(client, "database"))["state"]
        await writes.check_exactly_once(stored)
        assert writes.slowest < REQUEST_BOUND

    async def test_resets_coming_and_going_lose_and_double_nothing(
        self, client, owner, proxy, stored
    ):
        """Writes with resets switched on and off: each 201 stored once, each failure never."""
        writes = Writes(client, owner)
        for _ in range(3):
            await writes.create(3)
            reset = proxy.reset_peer()
            await writes.create(3)
            proxy.remove(reset)
            await _recovers(client, owner)
        assert writes.created
        assert writes.failed
        await writes.check_exactly_once(stored)


class TestOutage:
    async def test_outage_and_recovery(self, client, owner, proxy, stored):
        """Refused and cut: fast failures, an open circuit, then service again after the restore."""
        writes = Writes(client, owner)
        await writes.create(3)
        proxy.outage()
        for _ in range(3):
            for response in await writes.create(2):
                assert_outage_answer(response)
        await wait_for_state(client, "database", "open", within=2.0)
        await live_is_fast(client)
        proxy.restore()
        await _recovers(client, owner)
        await writes.create(3)
        assert (6, 6) == (len(writes.created), len(writes.failed))
        assert writes.slowest < REQUEST_BOUND
        assert "closed" == (await circuit(client, "database"))["state"]
        await writes.check_exactly_once(stored)


async def _recovers(client, owner) -> None:
    """Poll the list route until it answers 200 again: at most open_duration plus a few tries."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + POLICY["open_duration"] + REQUEST_BOUND
    while True:
        response = await client.get("/v1/documents", headers=owner)
        if response.status_code == 200:
            return
        assert_outage_answer(response)
        if loop.time() > deadline:
            pytest.fail(f"the service did not recover: {response.status_code} {response.text}")
        await asyncio.sleep(0.1)
