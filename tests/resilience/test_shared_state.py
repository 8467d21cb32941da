"""Circuit state shared through a real Redis: two registries with their own clients, two instances.

A multi-process test with real servers is tests/cluster's; here the shared-state
protocol itself: published transitions, the periodic re-read, no Redis call per
protected call, and Redis outages that leave the breakers on local state.
"""

from __future__ import annotations

import asyncio
import gc
import socket
import time
from collections.abc import Callable

import orjson
import pytest
import redis.asyncio as redis_asyncio
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.resilience import CircuitOpenError, CircuitState, Resilience
from bastion.settings import ResilienceSettings
from bastion.testing import FaultProxy

pytestmark = pytest.mark.redis

# The promise is "about a second"; the margin is for a machine shared by
# several test runs.
PROPAGATION = 2.5
LLM = {"llm": {"kind": "http", "consecutive_failures": 3, "open_duration": 30}}


class FakeMonotonic:
    def __init__(self) -> None:
        self.now = time.monotonic()

    def __call__(self) -> float:
        return self.now


async def eventually(predicate: Callable[[], bool], within: float = PROPAGATION) -> float:
    """Wait until ``predicate()`` holds; return how long it took."""
    started = time.monotonic()
    while not predicate():
        if time.monotonic() - started > within:
            pytest.fail(f"not within {within} s")
        await asyncio.sleep(0.02)
    return time.monotonic() - started


def open_locally(resilience: Resilience, circuit: str = "llm") -> None:
    breaker = resilience.breaker(circuit)
    while breaker.state is CircuitState.CLOSED:
        breaker.acquire()
        breaker.record_failure(0.01)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
async def clients(redis_url):
    """Make Redis clients (each instance has its own); closed at the end."""
    made = []

    def make(url: str = redis_url):
        client = redis_asyncio.from_url(url, socket_timeout=1, socket_connect_timeout=1)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.aclose()


@pytest.fixture
async def instances(clients, redis_prefix):
    """Make started registries sharing this test's key prefix; stopped at the end."""
    started: list[Resilience] = []

    async def make(client=None, *, refresh: float = 1.0, clock=None, start=True, deps=None):
        settings = ResilienceSettings(
            dependencies=deps if deps is not None else LLM, state_refresh_interval=refresh
        )
        extra = {"clock": clock} if clock is not None else {}
        resilience = Resilience(
            settings, redis=client or clients(), key_prefix=redis_prefix, **extra
        )
        if start:
            await resilience.start()
            started.append(resilience)
        return resilience

    yield make
    for resilience in started:
        await resilience.stop()


async def wait_subscribed(client, channel: str, count: int) -> None:
    async def subscribers() -> int:
        return dict(await client.pubsub_numsub(channel)).get(channel.encode(), 0)

    started = time.monotonic()
    while await subscribers() < count:
        assert time.monotonic() - started < PROPAGATION, "instances did not subscribe"
        await asyncio.sleep(0.02)


class TestPropagation:
    async def test_open_on_one_instance_is_open_on_the_other_by_pubsub(
        self, instances, clients, redis_prefix
    ):
        """A circuit opened on one instance rejects calls on the other within a second."""
        first = await instances(refresh=60)
        second = await instances(refresh=60)  # no re-read in time: only pub/sub can tell it
        await wait_subscribed(clients(), f"{redis_prefix}circuits", 2)
        open_locally(first)
        took = await eventually(lambda: second.breaker("llm").state is CircuitState.OPEN)
        assert took < 1.0
        with pytest.raises(CircuitOpenError) as raised:
            second.breaker("llm").acquire()
        assert 30 == pytest.approx(raised.value.retry_after, abs=1.5)

    async def test_a_missed_message_is_caught_by_the_periodic_re_read(
        self, instances, clients, redis_prefix
    ):
        """A transition only in the hash (its message lost) is applied within the interval."""
        second = await instances()  # the default interval, 1 s
        record = {
            "c": "llm",
            "s": "open",
            "t": time.time(),
            "u": time.time() + 30,
            "i": "another-host:1:abcdef",
        }
        await clients().hset(f"{redis_prefix}circuits", "llm", orjson.dumps(record))
        took = await eventually(lambda: second.breaker("llm").state is CircuitState.OPEN)
        assert took < 1.5

    async def test_a_burst_of_transitions_shares_one_connection(
        self, instances, redis_url, redis_prefix
    ):
        """A hundred circuits opening at once are all published through a client whose pool
        holds two connections (one for the subscriber): none waits for a connection of its own."""
        small = redis_asyncio.from_url(redis_url, max_connections=2, socket_timeout=1)
        deps = {f"dep{i}": {"kind": "http", "consecutive_failures": 1} for i in range(100)}
        try:
            first = await instances(small, deps=deps, refresh=60)
            for i in range(100):
                open_locally(first, f"dep{i}")
            reader = redis_asyncio.from_url(redis_url)

            async def published() -> int:
                return len(await reader.hgetall(f"{redis_prefix}circuits"))

            started = time.monotonic()
            while await published() < 100:
                assert time.monotonic() - started < PROPAGATION
                await asyncio.sleep(0.05)
            await reader.aclose()
        finally:
            await first.stop()
            await small.aclose()

    async def test_an_instance_started_later_reads_the_open_circuit_at_start(self, instances):
        """An instance starting after the transition knows the circuit is open once started."""
        first = await instances()
        open_locally(first)
        await asyncio.sleep(0.3)  # the publication is in the background
        late = await instances()
        assert CircuitState.OPEN == late.breaker("llm").state

    async def test_closing_propagates(self, instances, clients, redis_prefix):
        """The instance whose probe succeeded closes the circuit everywhere, before others probe."""
        clock = FakeMonotonic()
        first = await instances(clock=clock, refresh=60)
        second = await instances(refresh=60)
        await wait_subscribed(clients(), f"{redis_prefix}circuits", 2)
        open_locally(first)
        await eventually(lambda: second.breaker("llm").state is CircuitState.OPEN)
        clock.now += 30  # the first instance's open period is over: it probes
        breaker = first.breaker("llm")
        breaker.acquire()
        breaker.record_success(0.01)
        assert CircuitState.CLOSED == breaker.state
        # The second instance's own open period has 30 s to go.
        await eventually(lambda: second.breaker("llm").state is CircuitState.CLOSED)
        assert 0 == second.breaker("llm").snapshot().calls

    async def test_malformed_records_are_ignored(self, instances, clients, redis_prefix):
        """Records that are not transitions, or of circuits this instance lacks, change nothing."""
        shared = clients()
        unknown = {"c": "elsewhere", "s": "open", "t": time.time(), "u": time.time() + 30, "i": "x"}
        await shared.hset(
            f"{redis_prefix}circuits",
            mapping={"llm": b"{not json", "x": b"[]", "elsewhere": orjson.dumps(unknown)},
        )
        resilience = await instances()
        assert 0 == await resilience.refresh()
        assert CircuitState.CLOSED == resilience.breaker("llm").state

    async def test_the_latest_transition_wins_in_the_hash(self, instances, clients, redis_prefix):
        """A transition older than the recorded one is not written over it."""
        first = await instances(refresh=60)
        open_locally(first)
        key = f"{redis_prefix}circuits"
        shared = clients()
        started = time.monotonic()
        while not await shared.hget(key, "llm"):
            assert time.monotonic() - started < PROPAGATION
            await asyncio.sleep(0.02)
        newer = {"c": "llm", "s": "closed", "t": time.time() + 60, "u": None, "i": "other:1:x"}
        await shared.hset(key, "llm", orjson.dumps(newer))
        first._shared.publish(first.breaker("llm").snapshot())  # re-send the older open
        await asyncio.sleep(0.3)
        assert newer == orjson.loads(await shared.hget(key, "llm"))


class TestCost:
    async def test_no_redis_call_per_protected_call(self, instances, clients):
        """A thousand calls through a pipeline make no Redis call; a transition makes one."""
        client = clients()
        commands: list[str] = []
        execute = client.execute_command

        async def counting(*args, **options):
            commands.append(str(args[0]))
            return await execute(*args, **options)

        client.execute_command = counting
        clock = FakeMonotonic()
        resilience = await instances(client, refresh=60, clock=clock)
        commands.clear()
        pipeline = resilience.pipeline("llm")

        async def answer() -> str:
            return "ok"

        for _ in range(1000):
            assert "ok" == await pipeline.call(answer)
        assert [] == commands
        open_locally(resilience)
        await eventually(lambda: bool(commands))
        await asyncio.sleep(0.1)
        commands.clear()
        clock.now += 30
        breaker = resilience.breaker("llm")
        breaker.acquire()
        breaker.record_success(0.01)
        await eventually(lambda: bool(commands))
        await asyncio.sleep(0.1)
        assert ["EVALSHA"] == commands


class TestRedisOutage:
    async def test_breakers_work_on_local_state_without_redis(self, instances, clients):
        """With Redis unreachable, circuits open and reject locally; the outage is logged once."""
        gc.collect()  # registries of earlier tests must not hold the "redis" outage open
        outages = "bastion_dependency_outages_total"
        before = REGISTRY.get_sample_value(outages, {"dependency": "redis"}) or 0.0
        client = clients(f"redis://127.0.0.1:{free_port()}/0")
        with capture_logs() as logs:
            resilience = await instances(client, refresh=0.1)
            open_locally(resilience)
            with pytest.raises(CircuitOpenError):
                resilience.breaker("llm").acquire()
            await asyncio.sleep(1.0)  # ~10 failed re-reads, a failed publication, resubscriptions
            await resilience.stop()
        degraded = [
            log for log in logs if log["event"] == "dependency unavailable: running degraded"
        ]
        assert [("warning", "redis", "circuit state")] == [
            (log["log_level"], log["dependency"], log["feature"]) for log in degraded
        ]
        lost = [
            log
            for log in logs
            if log["event"] == "circuit subscription lost; retrying with backoff"
        ]
        assert 1 == len(lost)
        assert 1.0 == (REGISTRY.get_sample_value(outages, {"dependency": "redis"}) or 0.0) - before
        assert [] == [log for log in logs if log["log_level"] in ("error", "critical")]

    async def test_after_an_outage_transitions_flow_again_both_ways(
        self, instances, clients, redis_url
    ):
        """After an outage each instance learns what it missed and publishes what it could not."""
        async with FaultProxy(redis_url, name="redis") as proxy:
            direct = await instances(
                refresh=0.2, deps={**LLM, "search": {"consecutive_failures": 3}}
            )
            with capture_logs() as logs:
                cut_off = await instances(
                    clients(proxy.url_for(redis_url)),
                    refresh=0.2,
                    deps={**LLM, "search": {"consecutive_failures": 3}},
                )
                proxy.outage()
                open_locally(direct, "llm")  # published; the cut-off instance misses it
                open_locally(cut_off, "search")  # cannot be published now
                await asyncio.sleep(0.6)
                assert CircuitState.CLOSED == cut_off.breaker("llm").state
                assert CircuitState.CLOSED == direct.breaker("search").state
                proxy.restore()
                await eventually(lambda: cut_off.breaker("llm").state is CircuitState.OPEN)
                await eventually(lambda: direct.breaker("search").state is CircuitState.OPEN)
                # The subscriber reconnects too, with backoff (at most 5 s between tries).
                await eventually(
                    lambda: any(log["event"] == "circuit subscription restored" for log in logs),
                    within=6,
                )
                # The outage ends a settle period (1 s) after its last failure.
                await eventually(
                    lambda: any(log["event"] == "dependency available again" for log in logs)
                )
        events = [log["event"] for log in logs if log.get("feature") == "circuit state"]
        assert ["dependency unavailable: running degraded", "dependency available again"] == events


class TestLifecycle:
    async def test_stop_ends_every_background_task(self, instances):
        """After stop() no subscriber, refresh or publication task is left running."""
        resilience = await instances(start=False)
        await resilience.start()
        await resilience.start()  # idempotent
        open_locally(resilience)
        await resilience.stop()
        left = [task.get_name() for task in asyncio.all_tasks() if "circuit" in task.get_name()]
        assert [] == left

    async def test_transitions_before_start_are_published_at_start(
        self, instances, clients, redis_prefix
    ):
        """A circuit that opened before start() is in the shared state once started."""
        resilience = await instances(start=False)
        open_locally(resilience)
        shared = clients()
        assert await shared.hget(f"{redis_prefix}circuits", "llm") is None
        await resilience.start()
        await asyncio.sleep(0.3)  # the publication is in the background
        record = orjson.loads(await shared.hget(f"{redis_prefix}circuits", "llm"))
        assert ("open", resilience.breaker("llm").snapshot().since) == (record["s"], record["t"])
        await resilience.stop()

    async def test_stop_never_hangs_whenever_it_comes(self, instances):
        """Stopping while the subscriber connects ends it too (redis-py can swallow that cancel)."""
        for steps in range(80):
            resilience = await instances(start=False)
            await resilience.start()
            for _ in range(steps):
                await asyncio.sleep(0)
            async with asyncio.timeout(3):
                await resilience.stop()

    async def test_without_redis_start_and_stop_do_nothing(self):
        """With the memory backend, circuits are per process and there is nothing to follow."""
        resilience = Resilience(ResilienceSettings(dependencies=LLM))
        await resilience.start()
        assert (False, 0) == (resilience.shared, await resilience.refresh())
        await resilience.stop()
