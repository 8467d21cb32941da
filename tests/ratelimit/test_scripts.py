"""The script runner: EVALSHA by hash, NOSCRIPT reloads, pipelining, errors, timeouts, cancellation.

Against the shared Redis (never flushed here: tests/ratelimit/test_redis_outage.py
flushes and kills a Redis of its own), and through a FaultProxy where Redis must
be slow or hang.
"""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
import redis.asyncio as aioredis

from bastion.ratelimit._scripts import LuaScript, ScriptError, ScriptRunner, StoreUnavailable
from bastion.testing import FaultProxy

# A loaded 2-CPU machine runs several suites at once: time bounds get this margin.
MARGIN = 0.5

ECHO = LuaScript.from_source("echo.lua", "return {KEYS[1], ARGV[1]}")


def fresh_script(body: str = "return ARGV[1]") -> LuaScript:
    """A script Redis has never seen (a random comment makes its SHA): first call NOSCRIPT."""
    return LuaScript.from_source("fresh.lua", f"-- {secrets.token_hex(8)}\n{body}")


@pytest.fixture
async def runner(redis_client):
    runner = ScriptRunner(redis_client, timeout=2.0)
    yield runner
    await runner.close()


@pytest.fixture
def batches(monkeypatch):
    """Sizes of the batches the runners write, in order."""
    sizes: list[int] = []
    original = ScriptRunner._write

    async def spy(self, channel, calls):
        sizes.append(len(calls))
        await original(self, channel, calls)

    monkeypatch.setattr(ScriptRunner, "_write", spy)
    return sizes


class TestLuaScript:
    def test_resource_and_sha(self):
        """A resource file is read with its SHA-1, the hash EVALSHA names it by."""
        import hashlib

        script = LuaScript("decide.lua")
        expected = hashlib.sha1(script.source.encode(), usedforsecurity=False).hexdigest()
        assert expected == script.sha
        assert "decide.lua" == script.name


class TestRun:
    async def test_runs_by_hash(self, runner, redis_client):
        """A call returns the script's reply; the script is then cached under its SHA."""
        assert [b"k", b"v"] == await runner.run(ECHO, ["k"], ["v"])
        assert [True] == await redis_client.script_exists(ECHO.sha)

    async def test_noscript_is_transparent(self, runner, redis_client):
        """A script Redis does not hold (NOSCRIPT) is loaded and the call answered."""
        script = fresh_script()
        assert [False] == await redis_client.script_exists(script.sha)
        assert b"x" == await runner.run(script, [], ["x"])
        assert [True] == await redis_client.script_exists(script.sha)

    async def test_concurrent_noscripts_load_once_and_all_answer(self, runner, batches):
        """Fifty concurrent first calls of an unknown script all get their own reply."""
        script = fresh_script()
        replies = await asyncio.gather(*(runner.run(script, [], [str(n)]) for n in range(50)))
        assert [str(n).encode() for n in range(50)] == replies

    async def test_execute_plain_command(self, runner, redis_client, redis_prefix):
        """``execute`` sends a plain command the same way (DEL, PING)."""
        key = redis_prefix + "plain"
        await redis_client.set(key, "1")
        assert 1 == await runner.execute("DEL", key)
        assert b"PONG" == await runner.execute("PING")

    async def test_script_error_is_not_an_outage(self, runner):
        """An error the script raises is a ScriptError; the next call goes through."""
        broken = LuaScript.from_source("broken.lua", "return redis.error_reply('ERR boom')")
        with pytest.raises(ScriptError, match="boom"):
            await runner.run(broken, [], [])
        assert [b"k", b"v"] == await runner.run(ECHO, ["k"], ["v"])

    async def test_decoded_replies(self, redis_url):
        """A client with ``decode_responses`` gives str replies; the runner passes them through."""
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        runner = ScriptRunner(client, timeout=2.0)
        try:
            assert ["k", "v"] == await runner.run(ECHO, ["k"], ["v"])
        finally:
            await runner.close()
            await client.aclose()

    async def test_connect_warms_up(self, redis_client, batches):
        """``connect`` opens the connection ahead: the first call is written at once, alone."""
        runner = ScriptRunner(redis_client, timeout=2.0)
        try:
            await runner.connect()
            await runner.connect()  # already connected: nothing to do
            assert [b"k", b"v"] == await runner.run(ECHO, ["k"], ["v"])
            assert [1] == batches
        finally:
            await runner.close()

    async def test_connect_to_nothing_raises(self):
        """``connect`` to a port nothing listens on raises StoreUnavailable."""
        client = aioredis.Redis(host="127.0.0.1", port=1)
        runner = ScriptRunner(client, timeout=1.0)
        try:
            with pytest.raises(StoreUnavailable, match="could not connect"):
                await runner.connect()
        finally:
            await runner.close()
            await client.aclose()

    async def test_python_parser(self, redis_url, batches):
        """With redis-py's pure-Python parser (no hiredis reader) replies and errors arrive."""
        from redis._parsers import _AsyncRESP2Parser

        client = aioredis.Redis.from_url(redis_url, parser_class=_AsyncRESP2Parser)
        runner = ScriptRunner(client, timeout=2.0)
        broken = LuaScript.from_source("broken.lua", "return redis.error_reply('ERR boom')")
        try:
            replies = await asyncio.gather(*(runner.run(ECHO, ["k"], [str(n)]) for n in range(50)))
            assert [[b"k", str(n).encode()] for n in range(50)] == replies
            assert b"x" == await runner.run(fresh_script(), [], ["x"])
            with pytest.raises(ScriptError, match="boom"):
                await runner.run(broken, [], [])
        finally:
            await runner.close()
            await client.aclose()

    async def test_closed_runner_refuses(self, redis_client):
        """After close, calls raise StoreUnavailable at once."""
        runner = ScriptRunner(redis_client, timeout=2.0)
        await runner.run(ECHO, ["k"], ["v"])
        await runner.close()
        with pytest.raises(StoreUnavailable):
            await runner.run(ECHO, ["k"], ["v"])


class TestPipelining:
    async def test_lone_caller_writes_alone(self, runner, batches):
        """One call at a time: each is written by itself, at once."""
        for n in range(5):
            assert [b"k", str(n).encode()] == await runner.run(ECHO, ["k"], [str(n)])
        assert [1] * 5 == batches

    async def test_concurrent_calls_share_round_trips(self, runner, batches):
        """200 concurrent calls go out in far fewer batches, each caller with its own reply."""
        replies = await asyncio.gather(*(runner.run(ECHO, ["k"], [str(n)]) for n in range(200)))
        assert [[b"k", str(n).encode()] for n in range(200)] == replies
        assert 200 == sum(batches)
        assert len(batches) < 20
        assert max(batches) > 1

    async def test_cancelled_callers_leave_replies_in_step(self, redis_client, redis_url):
        """Cancelling half the callers of an in-flight batch: the others get their own replies."""
        async with FaultProxy(redis_url) as proxy:
            client = aioredis.Redis.from_url(proxy.url_for(redis_url))
            runner = ScriptRunner(client, timeout=5.0, connections=1)
            try:
                await runner.run(ECHO, ["k"], ["warm"])
                proxy.latency(100)  # replies arrive 100 ms late: the batch is in flight
                tasks = [
                    asyncio.ensure_future(runner.run(ECHO, ["k"], [str(n)])) for n in range(100)
                ]
                await asyncio.sleep(0.03)
                for task in tasks[::2]:
                    task.cancel()
                done = await asyncio.gather(*tasks, return_exceptions=True)
                assert all(isinstance(result, asyncio.CancelledError) for result in done[::2])
                assert [[b"k", str(n).encode()] for n in range(1, 100, 2)] == done[1::2]
                proxy.clear()
                # The connection is still in step: later calls get their own replies.
                replies = await asyncio.gather(
                    *(runner.run(ECHO, ["k"], [f"a{n}"]) for n in range(20))
                )
                assert [[b"k", f"a{n}".encode()] for n in range(20)] == replies
            finally:
                await runner.close()
                await client.aclose()


class TestFailures:
    async def test_refused_fails_fast(self, service_unavailable):
        """Nothing listening: StoreUnavailable well within the timeout, then fail fast."""
        client = aioredis.Redis(host="127.0.0.1", port=1)
        runner = ScriptRunner(client, timeout=1.0)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await runner.run(ECHO, ["k"], ["v"])
            assert time.monotonic() - started < 1.0
            started = time.monotonic()
            for _ in range(100):
                with pytest.raises(StoreUnavailable, match="failed recently"):
                    await runner.run(ECHO, ["k"], ["v"])
            assert time.monotonic() - started < 0.1
        finally:
            await runner.close()
            await client.aclose()

    async def test_server_busy_is_an_outage_then_a_probe_recovers(self, redis_client):
        """A LOADING reply is an outage: StoreUnavailable, fail fast, then a probe passes."""
        loading = LuaScript.from_source("loading.lua", "return redis.error_reply('LOADING fake')")
        runner = ScriptRunner(redis_client, timeout=2.0, retry_interval=0.2)
        try:
            with pytest.raises(StoreUnavailable, match=r"(?i)loading"):
                await runner.run(loading, [], [])
            with pytest.raises(StoreUnavailable, match="failed recently"):
                await runner.run(ECHO, ["k"], ["v"])
            await asyncio.sleep(0.25)
            assert [b"k", b"v"] == await runner.run(ECHO, ["k"], ["v"])
            assert [b"k", b"w"] == await runner.run(ECHO, ["k"], ["w"])
        finally:
            await runner.close()

    async def test_read_only_replica_is_an_outage(self, redis_client):
        """A READONLY answer (a replica after failover) is StoreUnavailable, not a script error."""
        read_only = LuaScript.from_source("ro.lua", "return redis.error_reply('READONLY fake')")
        runner = ScriptRunner(redis_client, timeout=2.0)
        try:
            with pytest.raises(StoreUnavailable, match="READONLY"):
                await runner.run(read_only, [], [])
        finally:
            await runner.close()

    async def test_hung_redis_times_out_within_the_timeout(self, redis_url):
        """A Redis that accepts but never answers: StoreUnavailable after about the timeout."""
        async with FaultProxy(redis_url) as proxy:
            client = aioredis.Redis.from_url(proxy.url_for(redis_url))
            runner = ScriptRunner(client, timeout=0.1, retry_interval=0.2)
            try:
                await runner.run(ECHO, ["k"], ["warm"])
                proxy.hang()
                started = time.monotonic()
                results = await asyncio.gather(
                    *(runner.run(ECHO, ["k"], [str(n)]) for n in range(20)),
                    return_exceptions=True,
                )
                elapsed = time.monotonic() - started
                assert all(isinstance(result, StoreUnavailable) for result in results)
                assert 0.1 <= elapsed < 0.1 + MARGIN
                # Failing fast now: no call waits for the timeout.
                started = time.monotonic()
                with pytest.raises(StoreUnavailable, match="failed recently"):
                    await runner.run(ECHO, ["k"], ["v"])
                assert time.monotonic() - started < 0.05
                proxy.clear()
                await asyncio.sleep(0.25)
                # The probe opens a new connection (the hung one was dropped).
                assert [b"k", b"back"] == await runner.run(ECHO, ["k"], ["back"])
            finally:
                await runner.close()
                await client.aclose()

    async def test_late_answer_ends_failing_fast(self, redis_url):
        """A stall past the timeout fails its calls; the late answer ends the fail-fast gap."""
        async with FaultProxy(redis_url) as proxy:
            client = aioredis.Redis.from_url(proxy.url_for(redis_url))
            runner = ScriptRunner(client, timeout=0.1, retry_interval=30.0)
            try:
                await runner.run(ECHO, ["k"], ["warm"])
                slow = proxy.latency(250)
                with pytest.raises(StoreUnavailable, match=r"within 0\.1 s"):
                    await runner.run(ECHO, ["k"], ["late"])
                with pytest.raises(StoreUnavailable, match="failed recently"):
                    await runner.run(ECHO, ["k"], ["v"])
                proxy.remove(slow)
                await asyncio.sleep(0.25 + MARGIN)  # the late answer arrives meanwhile
                # Not 30 s of failing fast: Redis answered, so calls go through again.
                assert [b"k", b"v"] == await runner.run(ECHO, ["k"], ["v"])
            finally:
                await runner.close()
                await client.aclose()

    async def test_failures_are_counted_by_reason(self):
        """``bastion_ratelimit_store_errors_total`` counts failed calls: connection, then fast."""
        from prometheus_client import REGISTRY

        def count(reason):
            value = REGISTRY.get_sample_value(
                "bastion_ratelimit_store_errors_total", {"reason": reason}
            )
            return value or 0.0

        before = {reason: count(reason) for reason in ("connection", "fast")}
        client = aioredis.Redis(host="127.0.0.1", port=1)
        runner = ScriptRunner(client, timeout=1.0)
        try:
            for _ in range(3):
                with pytest.raises(StoreUnavailable):
                    await runner.run(ECHO, ["k"], ["v"])
        finally:
            await runner.close()
            await client.aclose()
        assert 1 == count("connection") - before["connection"]
        assert 2 == count("fast") - before["fast"]

    async def test_probe_failures_back_off(self, redis_url):
        """While Redis stays hung, each failed probe doubles the fail-fast interval."""
        async with FaultProxy(redis_url) as proxy:
            client = aioredis.Redis.from_url(proxy.url_for(redis_url))
            runner = ScriptRunner(client, timeout=0.05, retry_interval=0.1, max_retry_interval=0.4)
            try:
                await runner.run(ECHO, ["k"], ["warm"])
                proxy.hang()
                probes = 0
                deadline = time.monotonic() + 1.5
                while time.monotonic() < deadline:
                    started = time.monotonic()
                    with pytest.raises(StoreUnavailable):
                        await runner.run(ECHO, ["k"], ["v"])
                    if time.monotonic() - started >= 0.04:
                        probes += 1  # only a probe waits the timeout
                    await asyncio.sleep(0.01)
                # Intervals 0.1, 0.2, 0.4, 0.4: about five probes in 1.5 s, not 25.
                assert 2 <= probes <= 7
            finally:
                await runner.close()
                await client.aclose()
