"""The Redis store when Redis goes away: killed, flushed, frozen; and when it comes back.

Each test runs a ``redis-server`` of its own on a free port (nothing persisted),
which it may kill, restart on the same port or stop with SIGSTOP: the shared
Redis on 6379 is never touched. Waits on real time are bounded: they are what
is under test (a timeout, a fail-fast interval).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
import redis.asyncio as aioredis

from bastion.ratelimit._redis import DECIDE, RedisStore
from bastion.ratelimit._rules import build_rules
from bastion.ratelimit._scripts import LuaScript, ScriptRunner
from bastion.ratelimit._store import StoreUnavailable

# A loaded 2-CPU machine runs several suites at once: time bounds get this margin.
MARGIN = 0.5
TIMEOUT = 0.1
RETRY_INTERVAL = 0.2


class PrivateRedis:
    """A ``redis-server`` on a free port that the test may kill, restart, stop and resume."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        """Start (again, on the same port) and wait until it answers PING (at most 10 s)."""
        self.process = subprocess.Popen(
            [
                *(self.binary, "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--dir", str(self.directory)),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=1)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                except redis.ConnectionError:
                    if time.monotonic() > deadline or self.process.poll() is not None:
                        raise
                    time.sleep(0.02)
                else:
                    return
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL: how a crashed Redis looks to its clients."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: connections stay open, nothing answers."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.process.kill()
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path, service_unavailable) -> Iterator[PrivateRedis]:
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    if not os.path.exists(binary):
        service_unavailable("redis-server", "not installed (apt-get install redis-server)")
    server = PrivateRedis(binary, tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def store(private_redis):
    client = aioredis.Redis.from_url(private_redis.url)
    runner = ScriptRunner(client, timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
    store = RedisStore(client, key_prefix="test:", timeout=TIMEOUT, runner=runner)
    yield store
    await runner.close()
    await client.aclose()


def script_loaded(server: PrivateRedis) -> bool:
    """Whether the server holds decide.lua, asked on a connection of the test's own."""
    client = redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2)
    try:
        return bool(client.script_exists(DECIDE.sha)[0])
    finally:
        client.close()


RULES = build_rules("1000/second", "token_bucket", max_log_limit=1000)


async def timed(awaitable):
    """Await; return (result or the exception raised, seconds taken)."""
    started = time.monotonic()
    try:
        result = await awaitable
    except Exception as exc:  # noqa: BLE001 -- the test inspects it
        result = exc
    return result, time.monotonic() - started


async def until_admitted(store: RedisStore, within: float) -> float:
    """Decide every 10 ms until Redis answers again; return how long it took."""
    started = time.monotonic()
    while True:
        try:
            await store.decide("k", RULES)
            return time.monotonic() - started
        except StoreUnavailable:
            if time.monotonic() - started > within:
                raise
            await asyncio.sleep(0.01)


class TestKilled:
    async def test_killed_fails_fast_and_recovers_after_restart(self, store, private_redis):
        """Killed: StoreUnavailable at once and fast while down; restarted: decisions again."""
        assert (await store.decide("k", RULES)).allowed
        private_redis.kill()
        result, elapsed = await timed(store.decide("k", RULES))
        assert isinstance(result, StoreUnavailable)
        assert elapsed < TIMEOUT + MARGIN
        # While it is down, no decision waits: refused, or failing fast.
        outcomes = [await timed(store.decide("k", RULES)) for _ in range(50)]
        assert all(isinstance(result, StoreUnavailable) for result, _ in outcomes)
        assert max(elapsed for _, elapsed in outcomes) < TIMEOUT + MARGIN
        assert sum(elapsed for _, elapsed in outcomes) < 0.5
        private_redis.start()
        # The new server holds no script: the first EVALSHA answers NOSCRIPT, reloaded.
        assert not script_loaded(private_redis)
        await until_admitted(store, within=RETRY_INTERVAL * 10 + MARGIN)
        assert script_loaded(private_redis)
        verdicts = await asyncio.gather(*(store.decide("k", RULES) for _ in range(50)))
        assert all(verdict.allowed for verdict in verdicts)

    async def test_in_flight_calls_fail_when_killed(self, store, private_redis):
        """Calls in flight when Redis dies fail with StoreUnavailable, none hangs."""
        assert (await store.decide("k", RULES)).allowed
        tasks = [asyncio.ensure_future(store.decide("k", RULES)) for _ in range(100)]
        private_redis.kill()
        results = await asyncio.wait_for(
            asyncio.gather(*tasks, return_exceptions=True), TIMEOUT + MARGIN + 1
        )
        assert all(isinstance(result, StoreUnavailable) or result.allowed for result in results)


class TestFlushed:
    async def test_script_flush_is_transparent(self, store, private_redis):
        """After SCRIPT FLUSH, decisions go on: NOSCRIPT is answered by loading and resending."""
        rules = build_rules("10/minute", "sliding_log", max_log_limit=1000)
        assert (await store.decide("f", rules)).allowed
        client = redis.Redis(host="127.0.0.1", port=private_redis.port, socket_timeout=2)
        try:
            client.script_flush()
        finally:
            client.close()
        verdicts = await asyncio.gather(*(store.decide("f", rules) for _ in range(20)))
        # 10 per minute, one spent: exactly nine more, each counted once despite the reload.
        assert 9 == sum(verdict.allowed for verdict in verdicts)


class TestFrozen:
    async def test_stopped_redis_times_out_then_fails_fast_then_recovers(
        self, store, private_redis
    ):
        """SIGSTOP: a decision fails after about the timeout, later ones at once; SIGCONT: back."""
        assert (await store.decide("k", RULES)).allowed
        private_redis.pause()
        try:
            results = await asyncio.gather(*(timed(store.decide("k", RULES)) for _ in range(20)))
            assert all(isinstance(result, StoreUnavailable) for result, _ in results)
            assert all(TIMEOUT * 0.9 <= elapsed < TIMEOUT + MARGIN for _, elapsed in results)
            result, elapsed = await timed(store.decide("k", RULES))
            assert isinstance(result, StoreUnavailable)
            assert elapsed < 0.05
        finally:
            private_redis.resume()
        await until_admitted(store, within=RETRY_INTERVAL * 10 + MARGIN)

    async def test_writer_blocked_by_a_stopped_redis_is_released(self, private_redis):
        """A write too big for the socket buffers, to a Redis reading nothing, ends in time."""
        client = aioredis.Redis.from_url(private_redis.url)
        runner = ScriptRunner(client, timeout=TIMEOUT, retry_interval=RETRY_INTERVAL)
        echo = LuaScript.from_source("echo.lua", "return #ARGV[1]")
        try:
            assert 1 == await runner.run(echo, [], ["x"])
            private_redis.pause()
            try:
                # 32 MB: the kernel's buffers fill and the write waits for room.
                result, elapsed = await timed(
                    asyncio.wait_for(runner.run(echo, [], ["x" * 32_000_000]), 5)
                )
                assert isinstance(result, StoreUnavailable)
                assert elapsed < TIMEOUT + MARGIN
            finally:
                private_redis.resume()
        finally:
            await runner.close()
            await client.aclose()
