"""Login throttling and lockout on memory and on a real Redis."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import secrets

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from redis.crc import key_slot
from structlog.testing import capture_logs
from support import CountingRunner, WallClock, free_port

from bastion.errors import ConfigurationError
from bastion.ratelimit._errors import AccountLocked, LimitsUnavailable, RateLimited
from bastion.ratelimit._login import (
    LockoutEvent,
    LoginThrottle,
    client_network,
    identifier_hash,
    normalise_identifier,
)
from bastion.settings import LoginThrottleSettings

START = dt.datetime(2026, 12, 7, 12, tzinfo=dt.UTC).timestamp()


def lockouts() -> float:
    return REGISTRY.get_sample_value("bastion_auth_lockouts_total") or 0.0


@pytest.fixture
def wall_clock() -> WallClock:
    """A UTC wall clock that only the test moves."""
    return WallClock(START)


@pytest.fixture(params=["memory", "redis"])
async def make_throttle(request, wall_clock):
    """Build throttles on the parametrized store and the test's clock; closed at the end."""
    made: list[LoginThrottle] = []
    clients = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

    def make(clock=wall_clock, fail_open: bool = True, **settings) -> LoginThrottle:
        config = LoginThrottleSettings(**settings)
        if request.param == "memory":
            throttle = LoginThrottle(config, clock=clock, fail_open=fail_open)
        else:
            client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            clients.append(client)
            # A second of timeout: the machine is shared with other test runs.
            throttle = LoginThrottle.for_store(
                client, config, key_prefix=prefix, timeout=1.0, clock=clock, fail_open=fail_open
            )
        made.append(throttle)
        return throttle

    make.store = request.param
    make.prefix = prefix if request.param == "redis" else None
    yield make
    for throttle in made:
        await throttle.close()
    for client in clients:
        await client.aclose()


@pytest.fixture
def email() -> str:
    """An identifier no other test uses."""
    return f"user-{secrets.token_hex(4)}@example.com"


@pytest.fixture
def ip() -> str:
    """A client address no other test uses."""
    return f"10.{secrets.randbelow(256)}.{secrets.randbelow(256)}.{secrets.randbelow(255) + 1}"


async def fail(throttle: LoginThrottle, identifier: str, ip: str | None, times: int):
    """Record ``times`` failures; return the last state."""
    state = None
    for _ in range(times):
        state = await throttle.record_failure(identifier, ip)
    return state


class TestIdentifiers:
    def test_identifiers_are_stripped_and_case_folded(self):
        """Spacing and case do not make a new identifier."""
        assert "strasse@example.com" == normalise_identifier("  STRAßE@Example.com ")
        assert identifier_hash(" Alice@Example.COM ") == identifier_hash("alice@example.com")

    def test_the_hash_is_sha256_of_the_normalised_identifier(self):
        """What is stored is the SHA-256 of the normalised identifier, in hex."""
        expected = hashlib.sha256(b"alice@example.com").hexdigest()
        assert expected == identifier_hash("ALICE@example.com")

    @pytest.mark.parametrize(
        ("given", "counted"),
        [
            ("192.0.2.7", "192.0.2.7"),
            ("::ffff:192.0.2.7", "192.0.2.7"),
            ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
            ("2001:db8:1:2::ffff", "2001:db8:1:2::/64"),
        ],
    )
    def test_ips_are_counted_per_address_or_ipv6_64(self, given, counted):
        """IPv4 per address (mapped or not), IPv6 per /64."""
        assert counted == client_network(given)

    def test_a_value_that_is_not_an_address_is_digested(self):
        """A test client's name becomes a digest, so no stray character reaches a key."""
        network = client_network("testclient")
        assert network.startswith("h")
        assert "testclient" not in network


class TestLockout:
    async def test_the_threshold_locks(self, make_throttle, email, ip):
        """Four failures leave the identifier open; the fifth locks it for 15 minutes."""
        throttle = make_throttle()
        state = await fail(throttle, email, ip, 4)
        assert (4, 1, False) == (state.failures, state.failures_left, state.locked)
        await throttle.check(email, ip + "0")
        state = await throttle.record_failure(email, ip + "0")
        assert (True, 900.0, 0) == (state.locked, state.retry_after, state.failures)
        with pytest.raises(AccountLocked) as raised:
            await throttle.check(email, "192.0.2.1")
        assert 429 == raised.value.status
        assert "ACCOUNT_LOCKED" == raised.value.code
        assert "900" == raised.value.headers["Retry-After"]

    async def test_the_lockout_ends(self, make_throttle, wall_clock, email):
        """After its duration the identifier may try again."""
        throttle = make_throttle()
        await fail(throttle, email, None, 5)
        wall_clock.advance(899)
        with pytest.raises(AccountLocked) as raised:
            await throttle.check(email, None)
        assert 1 == pytest.approx(raised.value.retry_after)
        wall_clock.advance(1)
        await throttle.check(email, None)

    async def test_repeated_lockouts_grow_up_to_the_cap(self, make_throttle, wall_clock, email):
        """Each lockout within the memory doubles: 900, 1800, 3600, then the 5000 s cap."""
        throttle = make_throttle(lockout_max=5000)
        lengths = []
        for _ in range(5):
            state = await fail(throttle, email, None, 5)
            lengths.append((state.retry_after, state.lockout.repetition))
            wall_clock.advance(state.retry_after)
        assert [(900, 0), (1800, 1), (3600, 2), (5000, 3), (5000, 4)] == lengths

    async def test_an_enormous_growth_still_stops_at_the_cap(
        self, make_throttle, wall_clock, email
    ):
        """A growth whose power overflows a float locks for ``lockout_max``, not for ever."""
        throttle = make_throttle(lockout_growth=1e300)
        lengths = []
        for _ in range(3):
            state = await fail(throttle, email, None, 5)
            lengths.append(state.retry_after)
            wall_clock.advance(state.retry_after)
        assert [900, 86_400, 86_400] == lengths

    async def test_repetitions_are_forgotten_after_the_memory(
        self, make_throttle, wall_clock, email
    ):
        """A lockout more than ``lockout_memory`` after the last one ended starts again at 900 s."""
        throttle = make_throttle(lockout_memory=3600)
        await fail(throttle, email, None, 5)
        wall_clock.advance(900 + 3600)  # exactly the memory: still remembered
        assert 1800 == (await fail(throttle, email, None, 5)).retry_after
        wall_clock.advance(1800 + 3600.5)
        state = await fail(throttle, email, None, 5)
        assert (900, 0) == (state.retry_after, state.lockout.repetition)

    async def test_failures_are_forgotten_after_the_memory(self, make_throttle, wall_clock, email):
        """Failures older than ``lockout_memory`` no longer count toward a lockout."""
        throttle = make_throttle(lockout_memory=3600)
        await fail(throttle, email, None, 4)
        wall_clock.advance(3601)
        assert 1 == (await throttle.record_failure(email, None)).failures

    async def test_success_clears_consecutive_failures(self, make_throttle, email, ip):
        """Four failures, a success, four more: not locked."""
        throttle = make_throttle(ip_limit="100 per 15 minutes")
        await fail(throttle, email, ip, 4)
        await throttle.record_success(email, ip)
        state = await fail(throttle, email, ip, 4)
        assert (4, False) == (state.failures, state.locked)
        await throttle.check(email, ip)

    async def test_success_keeps_the_repetitions(self, make_throttle, wall_clock, email):
        """A success clears failures, not the memory of lockouts: the next one is longer."""
        throttle = make_throttle()
        await fail(throttle, email, None, 5)
        wall_clock.advance(900)
        await throttle.record_success(email, None)
        assert 1800 == (await fail(throttle, email, None, 5)).retry_after

    async def test_failures_while_locked_are_not_counted(self, make_throttle, wall_clock, email):
        """Failures that arrive during a lockout neither extend it nor lock again."""
        throttle = make_throttle()
        await fail(throttle, email, None, 5)
        state = await fail(throttle, email, None, 7)
        assert (True, None) == (state.locked, state.lockout)
        wall_clock.advance(900)
        await throttle.check(email, None)
        assert 1 == (await throttle.record_failure(email, None)).failures

    async def test_unlock_lifts_the_lockout(self, make_throttle, email):
        """An admin's unlock ends a lockout at once and forgets the repetitions."""
        throttle = make_throttle()
        await fail(throttle, email, None, 5)
        assert await throttle.unlock(email)
        await throttle.check(email, None)
        assert 900 == (await fail(throttle, email, None, 5)).retry_after
        assert await throttle.unlock(" " + email.upper())
        assert not await throttle.unlock(email)

    async def test_identifiers_are_normalised(self, make_throttle, email):
        """Failures under different case and spacing count for one identifier."""
        throttle = make_throttle()
        for variant in [email, email.upper(), f" {email}", email.title(), email]:
            await throttle.record_failure(variant, None)
        with pytest.raises(AccountLocked):
            await throttle.check(email, None)

    async def test_answers_do_not_depend_on_the_identifier(self, make_throttle, wall_clock):
        """Any two identifiers with the same history get the same answers, headers and bodies."""
        throttle = make_throttle()
        answers = []
        for identifier in ["owner@example.com", f"nobody-{secrets.token_hex(4)}@example.com"]:
            states = [await throttle.record_failure(identifier, None) for _ in range(6)]
            with pytest.raises(AccountLocked) as raised:
                await throttle.check(identifier, None)
            answers.append(
                (
                    [(s.failures, s.locked, s.retry_after, s.failures_left) for s in states],
                    raised.value.status,
                    raised.value.headers,
                    raised.value.problem("id"),
                )
            )
        assert answers[0] == answers[1]

    async def test_lockouts_can_be_switched_off(self, make_throttle, email):
        """A lockout duration of 0 never locks."""
        throttle = make_throttle(lockout_duration=0, ip_limit="100/minute")
        state = await fail(throttle, email, None, 10)
        assert not state.locked
        await throttle.check(email, None)
        await throttle.record_success(email, None)


class TestIpThrottle:
    async def test_an_ip_is_throttled_after_its_failures(self, make_throttle, wall_clock, ip):
        """Five failures from one IP, each for another identifier, throttle that IP."""
        throttle = make_throttle()
        for n in range(5):
            await throttle.check(f"victim{n}@example.com", ip)
            state = await throttle.record_failure(f"victim{n}@example.com", ip)
            wall_clock.advance(10)
        assert 0 == state.ip_remaining
        with pytest.raises(RateLimited) as raised:
            await throttle.check("fresh@example.com", ip)
        assert 429 == raised.value.status
        assert "RATE_LIMITED" == raised.value.code
        # The oldest failure (50 s ago) leaves the window in 850 s.
        assert 850 == pytest.approx(raised.value.retry_after)
        assert {
            "x-ratelimit-limit": "5",
            "x-ratelimit-remaining": "0",
            "x-ratelimit-reset": "890",
            "ratelimit-policy": '"login";q=5;w=900',
            "ratelimit": '"login";r=0;t=890',
            "retry-after": "850",
        } == {name.lower(): value for name, value in raised.value.headers.items()}

    async def test_the_log_is_exact(self, make_throttle, wall_clock, ip):
        """The IP may try again exactly when its oldest failure is 15 minutes old."""
        throttle = make_throttle(lockout_threshold=100)
        for _ in range(5):
            await throttle.record_failure("a@example.com", ip)
            wall_clock.advance(60)
        # Halves, not thousandths: exact in binary, so the boundary is exact too.
        wall_clock.advance(900 - 5 * 60 - 0.5)
        with pytest.raises(RateLimited):
            await throttle.check("a@example.com", ip)
        wall_clock.advance(0.5)
        await throttle.check("a@example.com", ip)
        await throttle.record_failure("a@example.com", ip)
        with pytest.raises(RateLimited) as raised:
            await throttle.check("a@example.com", ip)
        assert 60 == pytest.approx(raised.value.retry_after)

    async def test_other_ips_are_not_throttled(self, make_throttle, ip):
        """One IP's failures leave another's allowance whole."""
        throttle = make_throttle()
        await fail(throttle, "a@example.com", ip, 5)
        await throttle.check("b@example.com", "192.0.2.200")
        assert 4 == (await throttle.record_failure("b@example.com", "192.0.2.200")).ip_remaining

    async def test_a_throttled_ip_learns_nothing_of_the_identifier(self, make_throttle, email, ip):
        """A throttled IP is told RATE_LIMITED even for a locked identifier."""
        throttle = make_throttle()
        await fail(throttle, email, ip, 5)
        with pytest.raises(RateLimited):
            await throttle.check(email, ip)

    async def test_success_does_not_forgive_the_ip(self, make_throttle, email, ip):
        """Logging in to one account does not reset the IP's failures."""
        throttle = make_throttle()
        await fail(throttle, "other@example.com", ip, 5)
        await throttle.record_success(email, ip)
        with pytest.raises(RateLimited):
            await throttle.check(email, ip)

    async def test_an_ipv6_client_is_counted_per_64(self, make_throttle):
        """Rotating addresses inside one /64 does not escape the throttle."""
        throttle = make_throttle()
        prefix = f"2001:db8:{secrets.randbelow(65535):x}:1"
        for n in range(5):
            await throttle.record_failure("a@example.com", f"{prefix}::{n + 1:x}")
        with pytest.raises(RateLimited):
            await throttle.check("a@example.com", f"{prefix}::ffff")

    async def test_several_ip_limits(self, make_throttle, wall_clock, ip):
        """``3 per minute;5 per hour``: the minute throttles first, then the hour."""
        throttle = make_throttle(ip_limit="3 per minute;5 per hour", lockout_threshold=100)
        await fail(throttle, "a@example.com", ip, 3)
        with pytest.raises(RateLimited) as raised:
            await throttle.check("a@example.com", ip)
        assert 60 == pytest.approx(raised.value.retry_after)
        wall_clock.advance(60)
        await fail(throttle, "a@example.com", ip, 2)
        with pytest.raises(RateLimited) as raised:
            await throttle.check("a@example.com", ip)
        assert 3540 == pytest.approx(raised.value.retry_after)

    def test_a_log_above_max_log_limit_is_refused(self):
        """An IP limit beyond ``max_log_limit`` stops configuration with the reason."""
        settings = LoginThrottleSettings(ip_limit="5000 per day")
        with pytest.raises(ConfigurationError, match="max_log_limit"):
            LoginThrottle(settings, max_log_limit=1000)


class TestEvents:
    async def test_a_lockout_is_announced(self, make_throttle, wall_clock, email, ip):
        """Plain and async listeners get the identifier's hash, the IP, the end, the repetition."""
        throttle = make_throttle()
        seen: list[tuple[str, LockoutEvent]] = []

        @throttle.on_lockout
        def plain(event):
            seen.append(("plain", event))

        async def later(event):
            await asyncio.sleep(0)
            seen.append(("async", event))

        throttle.on_lockout(later)
        before = lockouts()
        state = await fail(throttle, email, ip, 5)
        expected = LockoutEvent(
            identifier_hash=identifier_hash(email),
            ip=ip,
            until=dt.datetime.fromtimestamp(START + 900, dt.UTC),
            duration=900.0,
            repetition=0,
        )
        assert [("plain", expected), ("async", expected)] == seen
        assert expected == state.lockout
        assert 1 == lockouts() - before

    async def test_a_failing_listener_is_isolated(self, make_throttle, email, ip):
        """A listener that raises is logged without personal data; the login flow goes on."""
        throttle = make_throttle()
        called = []

        @throttle.on_lockout
        def broken(event):
            raise RuntimeError(f"cannot mail {email}")

        throttle.on_lockout(called.append)
        with capture_logs() as logs:
            state = await fail(throttle, email, ip, 5)
        assert state.locked
        assert 1 == len(called)
        failed = [entry for entry in logs if entry["event"] == "lockout listener failed"]
        assert [("RuntimeError", "error")] == [(e["error"], e["log_level"]) for e in failed]
        assert email not in repr(logs)
        assert email.split("@")[0] not in repr(logs)

    async def test_concurrent_failures_lock_exactly_once(self, make_throttle, email):
        """50 failures racing past check() on three instances lock once, at the threshold."""
        instances = [make_throttle() for _ in range(3)]
        if make_throttle.store == "memory":
            instances = instances[:1]  # memory is one process: one instance
        events = []
        for throttle in instances:
            throttle.on_lockout(events.append)
        before = lockouts()
        for throttle in instances:
            await throttle.check(email, None)
        states = await asyncio.gather(
            *(instances[n % len(instances)].record_failure(email, None) for n in range(50))
        )
        assert 1 == len(events)
        assert 1 == lockouts() - before
        assert [1, 2, 3, 4] == sorted(s.failures for s in states if not s.locked)
        assert 46 == sum(s.locked for s in states)
        assert 0 == events[0].repetition


class TestMemory:
    async def test_forgotten_entries_are_dropped(self, wall_clock):
        """Thousands of identifiers and IPs seen once do not stay in memory."""
        throttle = LoginThrottle(LoginThrottleSettings(lockout_memory=60), clock=wall_clock)
        for n in range(3000):
            await throttle.record_failure(f"u{n}@example.com", f"10.0.{n // 250}.{n % 250}")
        wall_clock.advance(86_400)
        for _ in range(1024):
            await throttle.record_failure("live@example.com", None)
        assert len(throttle._backend) < 10
        await throttle.close()


@pytest.mark.redis
class TestRedis:
    async def test_each_call_is_one_script_per_subject(self, redis_url, redis_prefix, email, ip):
        """check and record_failure send one script per subject (together); the rest one."""
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        runner = CountingRunner(client, timeout=1.0)
        throttle = LoginThrottle.for_store(runner, key_prefix=redis_prefix)
        try:
            counts = []
            for call in (
                throttle.check(email, ip),
                throttle.record_failure(email, ip),
                throttle.record_success(email, ip),
                throttle.unlock(email),
                throttle.check(email, None),
            ):
                before = runner.calls
                await call
                counts.append(runner.calls - before)
            assert [2, 2, 1, 1, 1] == counts
        finally:
            await throttle.close()
            await runner.close()
            await client.aclose()

    async def test_keys_hold_no_identifier_in_clear(self, redis_url, redis_prefix, email, ip):
        """Redis holds the identifier's SHA-256 as a hash tag, never the identifier; keys expire."""
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        throttle = LoginThrottle.for_store(client, key_prefix=redis_prefix, timeout=1.0)
        try:
            await fail(throttle, email, ip, 5)
            keys = sorted(
                [key.decode() async for key in client.scan_iter(f"{redis_prefix}login:*")]
            )
            digest = identifier_hash(email)
            assert [
                f"{redis_prefix}login:id:{{{digest}}}",
                f"{redis_prefix}login:ip:{{{ip}}}",
            ] == keys
            values = [await client.hgetall(keys[0]), await client.lrange(keys[1], 0, -1)]
            assert email.encode() not in repr(values).encode()
            assert email.split("@")[0] not in repr(keys) + repr(values)
            identifier_ttl, ip_ttl = await client.pttl(keys[0]), await client.pttl(keys[1])
            # The lockout, the memory of its repetition, and a second of slack.
            assert 900_000 + 86_400_000 - 5_000 < identifier_ttl <= 900_000 + 86_400_000 + 1_000
            assert 900_000 - 5_000 < ip_ttl <= 900_000
            assert key_slot(keys[0].encode()) == key_slot(f"x{{{digest}}}y".encode())
        finally:
            await throttle.close()
            await client.aclose()


class TestUnavailable:
    @pytest.fixture
    async def unreachable(self):
        """A client of a port nothing listens on."""
        client = aioredis.Redis.from_url(
            f"redis://127.0.0.1:{free_port()}/0", socket_timeout=0.5, socket_connect_timeout=0.5
        )
        yield client
        await client.aclose()

    async def test_fails_open_to_local_counting(self, unreachable, email, ip):
        """With Redis down, the throttle counts in this process, says so, and logs once."""
        throttle = LoginThrottle.for_store(unreachable, timeout=0.5)
        try:
            with capture_logs() as logs:
                await throttle.check(email, ip)
                state = await fail(throttle, email, ip, 5)
                with pytest.raises(RateLimited):
                    await throttle.check(email, ip)
            assert (True, True) == (state.degraded, state.locked)
            await throttle.record_success(email, ip)
            unavailable = [
                e for e in logs if e["event"] == "dependency unavailable: running degraded"
            ]
            assert [("redis", "login throttling")] == [
                (e["dependency"], e["feature"]) for e in unavailable
            ]
            assert email not in repr(logs)
        finally:
            await throttle.close()

    async def test_fails_closed_with_503(self, unreachable, email, ip):
        """With Redis down and fail_open=False, check and record_failure raise LimitsUnavailable."""
        throttle = LoginThrottle.for_store(unreachable, timeout=0.5, fail_open=False)
        try:
            with pytest.raises(LimitsUnavailable):
                await throttle.check(email, ip)
            with pytest.raises(LimitsUnavailable):
                await throttle.record_failure(email, ip)
        finally:
            await throttle.close()

    async def test_unlock_reports_an_outage(self, unreachable, email):
        """An admin's unlock while Redis is down raises instead of pretending."""
        throttle = LoginThrottle.for_store(unreachable, timeout=0.5)
        try:
            with pytest.raises(LimitsUnavailable):
                await throttle.unlock(email)
        finally:
            await throttle.close()


# Two identifiers and failures twice as likely: sequences reach repeated lockouts.
OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("fail"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("fail"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("check"), st.integers(0, 1), st.integers(0, 2)),
        st.tuples(st.just("success"), st.integers(0, 1), st.just(0)),
        st.tuples(st.just("unlock"), st.integers(0, 1), st.just(0)),
        st.tuples(
            st.just("wait"), st.sampled_from([0.5, 1, 5, 10, 15, 29.5, 30, 31, 60]), st.just(0)
        ),
    ),
    max_size=60,
)


@pytest.mark.redis
class TestParity:
    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(operations=OPERATIONS)
    async def test_memory_and_redis_answer_alike(self, redis_url, redis_prefix, operations):
        """Any sequence of failures, successes, checks, unlocks and waits: both stores agree."""
        config = LoginThrottleSettings(
            ip_limit="3 per 20 seconds;5 per minute",
            lockout_threshold=3,
            lockout_duration=10,
            lockout_growth=2,
            lockout_max=50,
            lockout_memory=30,
        )
        clock = WallClock(START)
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        memory = LoginThrottle(config, clock=clock)
        prefix = f"{redis_prefix}{secrets.token_hex(4)}:"  # a fresh namespace per example
        shared = LoginThrottle.for_store(
            client, config, key_prefix=prefix, timeout=2.0, clock=clock
        )
        identifiers = ["a@example.com", "B@Example.com "]
        ips = ["192.0.2.1", "192.0.2.2", "2001:db8::1"]

        async def answer(throttle, op, first, second):
            if op == "fail":
                state = await throttle.record_failure(identifiers[first], ips[second])
                repetition = state.lockout.repetition if state.lockout else None
                return (
                    state.failures,
                    state.locked,
                    round(state.retry_after, 6),
                    state.ip_remaining,
                    repetition,
                )
            if op == "check":
                try:
                    await throttle.check(identifiers[first], ips[second])
                except (RateLimited, AccountLocked) as exc:
                    return type(exc).__name__, round(exc.retry_after, 6), exc.headers
                return "ok"
            if op == "success":
                return await throttle.record_success(identifiers[first], None)
            return await throttle.unlock(identifiers[first])

        try:
            for op, first, second in operations:
                if op == "wait":
                    clock.advance(first)
                    continue
                expected = await answer(memory, op, first, second)
                assert expected == await answer(shared, op, first, second), (op, first, second)
        finally:
            await memory.close()
            await shared.close()
            await client.aclose()
