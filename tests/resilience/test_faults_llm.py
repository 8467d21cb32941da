"""Faults between Bastion Docs and its LLM provider: the assistant degrades, nothing else does.

The service runs in-process on SQLite; a FaultProxy sits between it and a
FakeLLMProvider. For each fault (latency, a hang, connection resets, a full
outage and the recovery) the scenario checks what a client sees, that no
question waits past the ``llm`` policy's total timeout, that the circuit opens
and closes as configured, and that routes not needing the provider keep serving.
"""

from __future__ import annotations

import asyncio

import pytest
from faults_support import MARGIN, circuit, new_owner, service, timed, wait_for_state

from bastion.testing import FakeLLMProvider, FaultProxy, lifespan_client

ASK = "/v1/assistant/ask"
REPLY = "From the provider."
QUESTION = {"question": "When is the budget review?"}
# One retry; 0.5 s per attempt, 1.2 s in all. Three failed attempts in a row open the
# circuit, which admits one probe after 1 s.
POLICY = {
    "timeout": 0.5,
    "total_timeout": 1.2,
    "retries": 1,
    "backoff_initial": 0.01,
    "backoff_max": 0.05,
    "consecutive_failures": 3,
    "minimum_calls": 100,
    "open_duration": 1.0,
    "half_open_probes": 1,
}
TOTAL_BOUND = POLICY["total_timeout"] + MARGIN


@pytest.fixture
def provider():
    with FakeLLMProvider(reply=REPLY) as fake:
        yield fake


@pytest.fixture
def proxy(provider):
    with FaultProxy(provider.url, name="llm-proxy") as faults:
        yield faults


@pytest.fixture
def app(sqlite_url, provider, proxy):
    return service(
        sqlite_url,
        llm={"url": proxy.url_for(provider.url)},
        resilience={"dependencies": {"llm": POLICY}},
    )


@pytest.fixture
async def client(app):
    async with lifespan_client(app) as c:
        yield c


@pytest.fixture
async def owner(app, client):
    headers = await new_owner(app)
    response = await client.post(
        "/v1/documents",
        json={"title": "Budget review", "body": "The budget review is on Monday. Bring numbers."},
        headers=headers,
    )
    assert 201 == response.status_code
    return headers


async def ask(client, owner):
    response, elapsed = await timed(client.post(ASK, json=QUESTION, headers=owner))
    assert 200 == response.status_code, response.text
    return response.json(), elapsed


async def serves_the_rest(client, owner) -> None:
    """Liveness and the document routes answer, and fast, whatever the provider does."""
    results = await asyncio.gather(
        timed(client.get("/health/live")), timed(client.get("/v1/documents", headers=owner))
    )
    assert [200, 200] == [response.status_code for response, _ in results]
    assert max(elapsed for _, elapsed in results) < MARGIN


async def open_the_circuit(client, owner) -> None:
    """Ask until the failures open the llm circuit (each question makes two attempts)."""
    for _ in range(2):
        body, elapsed = await ask(client, owner)
        assert body["degraded"]
        assert elapsed < TOTAL_BOUND
    await wait_for_state(client, "llm", "open", within=1.0)


class TestLatency:
    async def test_latency_under_the_attempt_timeout_is_answered(self, client, owner, proxy):
        """200 ms more per answer: the provider still answers, in about that much more time."""
        proxy.latency(200)
        body, elapsed = await ask(client, owner)
        assert (False, REPLY) == (body["degraded"], body["answer"])
        assert 0.2 <= elapsed < POLICY["timeout"] + MARGIN
        assert "closed" == (await circuit(client, "llm"))["state"]

    async def test_latency_past_the_attempt_timeout_degrades_in_bounded_time(
        self, client, owner, proxy
    ):
        """Answers 3 s late: each attempt times out, the question is answered degraded in time."""
        proxy.latency(3000)
        body, elapsed = await ask(client, owner)
        assert (True, "timeout") == (body["degraded"], body["reason"])
        assert elapsed < TOTAL_BOUND
        await serves_the_rest(client, owner)


class TestHang:
    async def test_hang_degrades_while_everything_else_serves(self, client, owner, proxy):
        """A provider that never answers: questions degrade in time, the rest serves."""
        proxy.hang()
        (body, elapsed), _ = await asyncio.gather(
            ask(client, owner), serves_the_rest(client, owner)
        )
        assert (True, "timeout") == (body["degraded"], body["reason"])
        assert elapsed < TOTAL_BOUND

    async def test_hang_then_clear_answers_again(self, client, owner, proxy):
        """Once the hang is lifted the provider answers the next question."""
        hang = proxy.hang()
        await ask(client, owner)
        proxy.remove(hang)
        body, _ = await ask(client, owner)
        assert (False, REPLY) == (body["degraded"], body["answer"])


class TestResets:
    async def test_resets_open_the_circuit_and_calls_stop(self, client, owner, proxy):
        """Connections reset: provider_error, then the circuit opens and no connection is tried."""
        proxy.reset_peer()
        first, _ = await ask(client, owner)
        await open_the_circuit(client, owner)
        tried = proxy.stats.connections_accepted
        body, elapsed = await ask(client, owner)
        assert "provider_error" == first["reason"]
        assert (True, "circuit_open") == (body["degraded"], body["reason"])
        assert tried == proxy.stats.connections_accepted
        assert elapsed < MARGIN
        await serves_the_rest(client, owner)


class TestOutage:
    async def test_outage_opens_the_circuit_and_recovery_closes_it(self, client, owner, proxy):
        """Refused connections open the circuit; after the restore a probe closes it again."""
        proxy.outage()
        await open_the_circuit(client, owner)
        open_body, _ = await ask(client, owner)
        await serves_the_rest(client, owner)
        proxy.restore()
        # Real time: the open circuit admits a probe only after open_duration (1 s).
        await asyncio.sleep(POLICY["open_duration"])
        body, elapsed = await ask(client, owner)
        assert "circuit_open" == open_body["reason"]
        assert (False, REPLY) == (body["degraded"], body["answer"])
        assert elapsed < TOTAL_BOUND
        assert "closed" == (await circuit(client, "llm"))["state"]

    async def test_failed_probe_opens_the_circuit_again(self, client, owner, proxy):
        """A probe made while the provider is still out re-opens the circuit for another period."""
        proxy.outage()
        await open_the_circuit(client, owner)
        await asyncio.sleep(POLICY["open_duration"])
        probe, _ = await ask(client, owner)
        after, _ = await ask(client, owner)
        assert probe["degraded"]
        assert (True, "circuit_open") == (after["degraded"], after["reason"])
        assert "open" == (await circuit(client, "llm"))["state"]
