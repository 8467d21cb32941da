"""Quota counters on memory and on a real Redis: all or nothing, periods, refunds, failure."""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets

import pytest
import redis.asyncio as aioredis
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.crc import key_slot
from support import CountingRunner, WallClock, free_port

from bastion.ratelimit._errors import LimitsUnavailable, QuotaExceeded
from bastion.ratelimit._quota import QuotaCounter, Quotas, QuotaVerdict, period_window


def epoch(*args: int, microsecond: int = 0) -> float:
    """Epoch seconds of a UTC civil time."""
    return dt.datetime(*args, microsecond=microsecond, tzinfo=dt.UTC).timestamp()


@pytest.fixture
def wall_clock() -> WallClock:
    """A UTC wall clock at 2026-12-07 12:00 that only the test moves."""
    return WallClock(epoch(2026, 12, 7, 12, 0, 0))


@pytest.fixture(params=["memory", "redis"])
async def make_quotas(request, wall_clock):
    """Build quotas on the parametrized store, on the test's clock; closed at the end."""
    made: list[Quotas] = []
    clients = []
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")

    def make(*, fail_open: bool = True, clock=wall_clock) -> Quotas:
        if request.param == "memory":
            quotas = Quotas.memory(clock=clock, fail_open=fail_open)
        else:
            client = aioredis.Redis.from_url(url, socket_timeout=2, socket_connect_timeout=2)
            clients.append(client)
            # A second of timeout: the machine is shared; the default 50 ms is for
            # the request path of an idle production Redis.
            quotas = Quotas.for_store(
                client, key_prefix=prefix, timeout=1.0, fail_open=fail_open, clock=clock
            )
        made.append(quotas)
        return quotas

    yield make
    for quotas in made:
        await quotas.close()
    for client in clients:
        await client.aclose()


@pytest.fixture
def subject() -> str:
    """A subject (tenant) no other test uses."""
    return f"tenant-{secrets.token_hex(4)}"


class TestQuotaCounter:
    def test_periods_are_day_month_or_seconds(self, subject):
        """``day``, ``month``, a number of seconds and a timedelta are periods."""
        assert "day" == QuotaCounter("a", subject, 1, "day").period
        assert "month" == QuotaCounter("a", subject, 1, "month").period
        assert 3600.0 == QuotaCounter("a", subject, 1, 3600).period
        assert 3600.0 == QuotaCounter("a", subject, 1, dt.timedelta(hours=1)).period

    @pytest.mark.parametrize(
        ("name", "limit", "period"),
        [
            ("has space", 1, "day"),
            ("a:b", 1, "day"),
            ("", 1, "day"),
            ("x" * 65, 1, "day"),
            ("ok", -1, "day"),
            ("ok", 1.5, "day"),
            ("ok", True, "day"),
            ("ok", 1, "week"),
            ("ok", 1, 0),
            ("ok", 1, float("inf")),
        ],
    )
    def test_bad_fields_are_refused(self, subject, name, limit, period):
        """A name outside ``[A-Za-z0-9_.-]``, a bad limit or an unknown period is refused."""
        with pytest.raises(ValueError):  # noqa: PT011 -- the message is checked elsewhere
            QuotaCounter(name, subject, limit, period)

    def test_a_subject_is_needed(self):
        """An empty subject is refused."""
        with pytest.raises(ValueError, match="subject"):
            QuotaCounter("uploads", "", 1)


class TestConsume:
    async def test_consumes_up_to_the_limit_then_refuses(self, make_quotas, subject):
        """3 per day admits 3, then refuses with the counter's name and the time to midnight."""
        quotas = make_quotas()
        counter = QuotaCounter("uploads", subject, 3, "day")
        verdicts = [await quotas.consume(counter) for _ in range(4)]
        assert [True, True, True, False] == [verdict.allowed for verdict in verdicts]
        assert [2, 1, 0, 0] == [verdict["uploads"].remaining for verdict in verdicts]
        assert [1, 2, 3, 3] == [verdict["uploads"].used for verdict in verdicts]
        refused = verdicts[-1]
        assert "uploads" == refused.exhausted
        assert 12 * 3600 == pytest.approx(refused.retry_after)
        assert epoch(2026, 12, 8) == refused["uploads"].resets_at
        assert dt.datetime(2026, 12, 8, tzinfo=dt.UTC) == refused["uploads"].resets

    async def test_raise_for_quota_answers_429_with_retry_after(self, make_quotas, subject):
        """A refused verdict raises QUOTA_EXCEEDED naming the quota, Retry-After to its renewal."""
        quotas = make_quotas()
        counter = QuotaCounter("api_calls", subject, 1, "day")
        (await quotas.consume(counter)).raise_for_quota()
        with pytest.raises(QuotaExceeded) as raised:
            (await quotas.consume(counter)).raise_for_quota()
        assert 429 == raised.value.status
        assert str(12 * 3600) == raised.value.headers["Retry-After"]
        assert "api_calls" == raised.value.problem("c")["quota"]

    async def test_all_or_nothing_across_counters(self, make_quotas, subject):
        """When one counter is full, the others are not consumed either."""
        quotas = make_quotas()
        daily = QuotaCounter("uploads", subject, 10, "day")
        monthly = QuotaCounter("uploads", subject, 2, "month")
        assert (await quotas.consume([daily, monthly], cost=2)).allowed
        refused = await quotas.consume([daily, monthly])
        assert (False, "uploads") == (refused.allowed, refused.exhausted)
        assert [2, 2] == [usage.used for usage in await quotas.usage([daily, monthly])]

    async def test_exhausted_is_the_first_refusing_counter(self, make_quotas, subject):
        """The verdict names the first counter without room; Retry-After waits for all of them."""
        quotas = make_quotas()
        daily = QuotaCounter("daily", subject, 1, "day")
        monthly = QuotaCounter("monthly", subject, 1, "month")
        spare = QuotaCounter("spare", subject, 100, "day")
        await quotas.consume([daily, monthly])
        refused = await quotas.consume([spare, monthly, daily])
        assert "monthly" == refused.exhausted
        # Both are full: a retry before the month renews would still be refused.
        assert epoch(2027, 1, 1) - epoch(2026, 12, 7, 12) == pytest.approx(refused.retry_after)

    async def test_a_cost_beyond_the_limit_is_refused(self, make_quotas, subject):
        """A cost larger than the whole limit never fits and consumes nothing."""
        quotas = make_quotas()
        counter = QuotaCounter("imports", subject, 5, "day")
        refused = await quotas.consume(counter, cost=6)
        assert (False, 0) == (refused.allowed, refused["imports"].used)
        assert (await quotas.consume(counter, cost=5)).allowed

    async def test_a_changed_limit_applies_at_once(self, make_quotas, subject):
        """The limit is read at every call: an upgraded plan admits more in the same period."""
        quotas = make_quotas()
        assert (await quotas.consume(QuotaCounter("docs", subject, 1, "month"))).allowed
        assert not (await quotas.consume(QuotaCounter("docs", subject, 1, "month"))).allowed
        upgraded = await quotas.consume(QuotaCounter("docs", subject, 5, "month"))
        assert (True, 2, 3) == (upgraded.allowed, upgraded["docs"].used, upgraded["docs"].remaining)

    async def test_a_zero_limit_admits_nothing(self, make_quotas, subject):
        """A limit of 0 refuses the first unit."""
        quotas = make_quotas()
        assert not (await quotas.consume(QuotaCounter("docs", subject, 0, "day"))).allowed

    async def test_subjects_are_counted_apart(self, make_quotas, subject):
        """Two tenants' counters of the same name do not share units."""
        quotas = make_quotas()
        assert (await quotas.consume(QuotaCounter("docs", subject, 1, "day"))).allowed
        assert (await quotas.consume(QuotaCounter("docs", subject + "-b", 1, "day"))).allowed

    async def test_periods_of_one_name_are_counted_apart(self, make_quotas, subject):
        """``uploads`` per day and per hour are two counters."""
        quotas = make_quotas()
        hourly = QuotaCounter("uploads", subject, 1, 3600)
        daily = QuotaCounter("uploads", subject, 1, "day")
        assert (await quotas.consume(hourly)).allowed
        assert (await quotas.consume(daily)).allowed

    @pytest.mark.parametrize("cost", [0, -1, 1.0, True])
    async def test_cost_must_be_a_positive_integer(self, make_quotas, subject, cost):
        """A cost below 1 or not an integer is a programming error."""
        quotas = make_quotas()
        with pytest.raises(ValueError, match="cost"):
            await quotas.consume(QuotaCounter("docs", subject, 1), cost=cost)

    async def test_one_call_is_one_subject(self, make_quotas, subject):
        """Counters of two subjects in one call are refused (they could not share a slot)."""
        quotas = make_quotas()
        with pytest.raises(ValueError, match="subject"):
            await quotas.consume(
                [QuotaCounter("a", subject, 1), QuotaCounter("a", subject + "x", 1)]
            )

    async def test_the_same_counter_twice_is_refused(self, make_quotas, subject):
        """One counter given twice is refused rather than consumed once."""
        quotas = make_quotas()
        counter = QuotaCounter("a", subject, 1)
        with pytest.raises(ValueError, match="twice"):
            await quotas.consume([counter, counter])
        with pytest.raises(ValueError, match="no quota"):
            await quotas.consume([])

    async def test_a_verdict_is_read_by_counter_name(self, subject):
        """``verdict[name]`` is that counter's usage; an unknown name is a KeyError."""
        quotas = Quotas.for_store(None)  # no Redis: this process's memory
        verdict = await quotas.consume(QuotaCounter("docs", subject, 2))
        assert 1 == verdict["docs"].remaining
        with pytest.raises(KeyError):
            verdict["pages"]
        await quotas.close()


class TestPeriods:
    @pytest.mark.parametrize(
        ("last_instant", "renewal"),
        [
            (epoch(2024, 2, 29, 23, 59, 59, microsecond=999_000), epoch(2024, 3, 1)),
            (epoch(2023, 2, 28, 23, 59, 59, microsecond=999_000), epoch(2023, 3, 1)),
            (epoch(2026, 12, 31, 23, 59, 59, microsecond=999_000), epoch(2027, 1, 1)),
            (epoch(2026, 4, 30, 23, 59, 59, microsecond=999_000), epoch(2026, 5, 1)),
        ],
        ids=["leap-february", "common-february", "december", "april"],
    )
    async def test_a_month_renews_on_the_first_at_midnight_utc(
        self, make_quotas, wall_clock, subject, last_instant, renewal
    ):
        """Full on the month's last millisecond, empty at 00:00 UTC on the 1st."""
        wall_clock.now = last_instant
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 1, "month")
        assert (await quotas.consume(counter)).allowed
        refused = await quotas.consume(counter)
        assert (False, renewal) == (refused.allowed, refused["docs"].resets_at)
        assert 0.001 == pytest.approx(refused.retry_after, abs=1e-6)
        wall_clock.now = renewal
        assert (await quotas.consume(counter)).allowed

    async def test_a_day_renews_at_midnight_utc(self, make_quotas, wall_clock, subject):
        """A day quota full at 23:59:59 UTC admits again at 00:00:00."""
        wall_clock.now = epoch(2026, 12, 7, 23, 59, 59)
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 1, "day")
        assert (await quotas.consume(counter)).allowed
        assert not (await quotas.consume(counter)).allowed
        wall_clock.advance(1)
        renewed = await quotas.consume(counter)
        assert (True, 1, epoch(2026, 12, 9)) == (
            renewed.allowed,
            renewed["docs"].used,
            renewed["docs"].resets_at,
        )

    async def test_seconds_renew_on_multiples_since_the_epoch(
        self, make_quotas, wall_clock, subject
    ):
        """A 3600-second quota renews on the hour, whenever it was first used."""
        wall_clock.now = epoch(2026, 12, 7, 12, 40)
        quotas = make_quotas()
        counter = QuotaCounter("calls", subject, 1, 3600)
        first = await quotas.consume(counter)
        assert epoch(2026, 12, 7, 13) == first["calls"].resets_at
        wall_clock.now = epoch(2026, 12, 7, 13)
        assert (await quotas.consume(counter)).allowed

    @settings(
        max_examples=60,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        seconds=st.integers(min_value=0, max_value=2**33),
        microseconds=st.integers(min_value=0, max_value=999_999),
    )
    @example(seconds=int(epoch(2000, 2, 29, 23, 59, 59)), microseconds=999_999)
    @example(seconds=int(epoch(2100, 2, 28, 23, 59, 59)), microseconds=999_999)
    @example(seconds=int(epoch(2024, 2, 29)), microseconds=0)
    @example(seconds=int(epoch(1999, 12, 31, 23, 59, 59)), microseconds=999_999)
    @example(seconds=0, microseconds=0)
    async def test_month_ends_agree_with_datetime(self, make_quotas, seconds, microseconds):
        """For any instant, the month's end is the next 1st at 00:00 UTC, as datetime says.

        On Redis the script computes it (civil-from-days arithmetic on Redis time);
        a unit used at the instant still counts just before that end and not at it.
        """
        now = seconds + microseconds / 1e6
        day = dt.datetime.fromtimestamp(seconds, dt.UTC)
        year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
        expected = dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp()
        clock = WallClock(now)
        quotas = make_quotas(clock=clock)
        counter = QuotaCounter("m", f"prop-{secrets.token_hex(4)}", 10, "month")
        consumed = await quotas.consume(counter)
        assert expected == consumed["m"].resets_at
        clock.now = expected - 0.001
        assert 1 == (await quotas.usage(counter))[0].used
        clock.now = expected
        assert 0 == (await quotas.usage(counter))[0].used

    @given(seconds=st.integers(min_value=0, max_value=2**33))
    def test_python_month_window_agrees_with_datetime(self, seconds):
        """``period_window`` (the memory store's arithmetic) ends months where datetime does."""
        day = dt.datetime.fromtimestamp(seconds, dt.UTC)
        year, month = (day.year + 1, 1) if day.month == 12 else (day.year, day.month + 1)
        index, end = period_window("month", seconds + 0.5)
        assert dt.datetime(year, month, 1, tzinfo=dt.UTC).timestamp() == end
        assert day.year * 12 + day.month - 1 == index


class TestUsageRefundReset:
    async def test_usage_is_read_only(self, make_quotas, subject):
        """Reading usage any number of times consumes nothing."""
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 2, "day")
        await quotas.consume(counter)
        for _ in range(3):
            (usage,) = await quotas.usage(counter)
        assert (1, 1) == (usage.used, usage.remaining)
        assert (await quotas.consume(counter)).allowed

    async def test_usage_of_an_unused_counter_is_zero(self, make_quotas, subject):
        """A counter never consumed reports 0 used and its whole limit."""
        (usage,) = await make_quotas().usage(QuotaCounter("docs", subject, 7, "month"))
        assert (0, 7) == (usage.used, usage.remaining)

    async def test_refund_gives_units_back(self, make_quotas, subject):
        """Work that failed after consuming gets its units back."""
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 2, "day")
        await quotas.consume(counter, cost=2)
        (usage,) = await quotas.refund(counter)
        assert 1 == usage.used
        assert (await quotas.consume(counter)).allowed

    async def test_refund_never_goes_below_zero(self, make_quotas, subject):
        """Refunding more than was used leaves 0, not credit."""
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 2, "day")
        await quotas.consume(counter)
        assert 0 == (await quotas.refund(counter, cost=5))[0].used
        assert 0 == (await quotas.refund(counter))[0].used
        verdicts = [await quotas.consume(counter) for _ in range(3)]
        assert [True, True, False] == [verdict.allowed for verdict in verdicts]

    async def test_refund_of_a_verdict_gives_back_what_it_took(self, make_quotas, subject):
        """Refunding a verdict returns its cost to each of its counters."""
        quotas = make_quotas()
        daily = QuotaCounter("docs", subject, 5, "day")
        monthly = QuotaCounter("docs", subject, 50, "month")
        await quotas.consume([daily, monthly], cost=2)
        verdict = await quotas.consume([daily, monthly], cost=3)
        assert [2, 2] == [usage.used for usage in await quotas.refund(verdict)]
        with pytest.raises(ValueError, match="cannot refund 4"):
            await quotas.refund(verdict, cost=4)

    async def test_refund_does_not_credit_a_new_period(self, make_quotas, wall_clock, subject):
        """Units a verdict took yesterday are not given back to today's count."""
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 1, "day")
        yesterday = await quotas.consume(counter)
        wall_clock.advance(86_400)
        assert (await quotas.consume(counter)).allowed
        assert 1 == (await quotas.refund(yesterday))[0].used
        assert not (await quotas.consume(counter)).allowed

    async def test_nothing_to_refund_for_a_refused_verdict(self, make_quotas, subject):
        """A refused verdict took nothing, so refunding it does nothing."""
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 1, "day")
        await quotas.consume(counter)
        refused = await quotas.consume(counter)
        assert () == await quotas.refund(refused)
        assert 1 == (await quotas.usage(counter))[0].used

    async def test_reset_forgets_usage(self, make_quotas, subject):
        """An operator's reset empties the counters."""
        quotas = make_quotas()
        counter = QuotaCounter("docs", subject, 1, "day")
        await quotas.consume(counter)
        await quotas.reset(counter)
        assert 0 == (await quotas.usage(counter))[0].used
        assert (await quotas.consume(counter)).allowed


class TestMemory:
    async def test_ended_periods_are_dropped(self, wall_clock):
        """Counters of thousands of subjects whose period ended do not stay in memory."""
        quotas = Quotas.memory(clock=wall_clock)
        for n in range(3000):
            await quotas.consume(QuotaCounter("docs", f"s{n}", 1, 60))
        wall_clock.advance(120)
        for _ in range(2048):
            await quotas.consume(QuotaCounter("docs", "live", 10**6, 60))
        assert len(quotas._backend) < 100


@pytest.mark.redis
class TestRedis:
    async def test_a_call_is_one_round_trip_in_one_slot(self, redis_url, redis_prefix, subject):
        """Three counters are consumed by one script whose keys share a cluster slot."""
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        runner = CountingRunner(client, timeout=1.0)
        quotas = Quotas.for_store(runner, key_prefix=redis_prefix)
        try:
            counters = [
                QuotaCounter("uploads", subject, 5, "day"),
                QuotaCounter("uploads", subject, 50, "month"),
                QuotaCounter("calls", subject, 5, 60),
            ]
            assert (await quotas.consume(counters)).allowed
            assert 1 == runner.calls
            keys = sorted(
                [key.decode() async for key in client.scan_iter(f"{redis_prefix}quota:*")]
            )
            assert 3 == len(keys)
            assert 1 == len({key_slot(key.encode()) for key in keys})
            assert all(f"{{{subject}}}" in key for key in keys)
        finally:
            await quotas.close()
            await runner.close()
            await client.aclose()

    async def test_every_key_expires_after_its_period(self, redis_url, redis_prefix, subject):
        """A counter's key lives until its period ends (plus a second), by Redis's clock."""
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        quotas = Quotas.for_store(client, key_prefix=redis_prefix, timeout=1.0)
        try:
            verdict = await quotas.consume(
                [QuotaCounter("d", subject, 5, "day"), QuotaCounter("h", subject, 5, 3600)]
            )
            for usage in verdict.usages:
                key = f"{redis_prefix}quota:{{{subject}}}:{usage.counter.key}"
                ttl = await client.pttl(key)
                assert 0 < ttl <= (usage.resets_after + 1.001) * 1000
        finally:
            await quotas.close()
            await client.aclose()

    async def test_braces_in_a_subject_stay_inside_its_tag(self, redis_url, redis_prefix):
        """A subject with braces is escaped, so it cannot end its hash tag early."""
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        quotas = Quotas.for_store(client, key_prefix=redis_prefix, timeout=1.0)
        try:
            odd = QuotaCounter("a", "x}:b", 1)
            plain = QuotaCounter("b", "x", 1)
            assert (await quotas.consume(odd)).allowed
            assert (await quotas.consume(plain)).allowed
            keys = {key.decode() async for key in client.scan_iter(f"{redis_prefix}quota:*")}
            assert {
                f"{redis_prefix}quota:{{x%7D:b}}:a:day",
                f"{redis_prefix}quota:{{x}}:b:day",
            } == keys
        finally:
            await quotas.close()
            await client.aclose()

    async def test_concurrent_consumers_take_exactly_the_limit(
        self, redis_url, redis_prefix, subject
    ):
        """200 concurrent consumptions from three instances admit exactly the limit of 50."""
        clients = [aioredis.Redis.from_url(redis_url, socket_timeout=2) for _ in range(3)]
        instances = [Quotas.for_store(c, key_prefix=redis_prefix, timeout=2.0) for c in clients]
        try:
            counter = QuotaCounter("docs", subject, 50, "day")
            verdicts = await asyncio.gather(
                *(instances[n % 3].consume(counter) for n in range(200))
            )
            assert 50 == sum(verdict.allowed for verdict in verdicts)
            assert 50 == (await instances[0].usage(counter))[0].used
        finally:
            for quotas in instances:
                await quotas.close()
            for client in clients:
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

    async def test_consume_fails_open_uncounted(self, unreachable, subject):
        """With Redis down, a fail-open consume is allowed and says it was not counted."""
        quotas = Quotas.for_store(unreachable, timeout=0.5)
        verdict = await quotas.consume(QuotaCounter("docs", subject, 1))
        assert QuotaVerdict(allowed=True, usages=(), degraded=True) == verdict
        assert () == await quotas.refund(QuotaCounter("docs", subject, 1))
        await quotas.close()

    async def test_consume_fails_closed_with_503(self, unreachable, subject):
        """With Redis down and fail_open=False, consume raises LimitsUnavailable."""
        quotas = Quotas.for_store(unreachable, timeout=0.5, fail_open=False)
        with pytest.raises(LimitsUnavailable):
            await quotas.consume(QuotaCounter("docs", subject, 1))
        await quotas.close()

    async def test_usage_and_reset_have_no_answer_to_make_up(self, unreachable, subject):
        """Reading or resetting a quota while Redis is down raises LimitsUnavailable."""
        quotas = Quotas.for_store(unreachable, timeout=0.5)
        with pytest.raises(LimitsUnavailable):
            await quotas.usage(QuotaCounter("docs", subject, 1))
        with pytest.raises(LimitsUnavailable):
            await quotas.reset(QuotaCounter("docs", subject, 1))
        await quotas.close()


QUOTA_OPERATIONS = st.lists(
    st.one_of(
        st.tuples(st.just("consume"), st.integers(1, 3), st.sampled_from([(0,), (1,), (0, 1)])),
        st.tuples(st.just("refund"), st.integers(1, 3), st.sampled_from([(0,), (1,), (0, 1)])),
        st.tuples(st.just("refund_last"), st.just(0), st.just(())),
        st.tuples(st.just("usage"), st.just(0), st.just((0, 1))),
        st.tuples(st.just("wait"), st.sampled_from([1, 1800, 3600, 7200, 86_400]), st.just(())),
    ),
    max_size=40,
)


@pytest.mark.redis
class TestParity:
    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(operations=QUOTA_OPERATIONS)
    async def test_memory_and_redis_answer_alike(self, redis_url, redis_prefix, operations):
        """Any sequence of consumptions, refunds, reads and waits: both stores agree."""
        clock = WallClock(epoch(2026, 12, 31, 20))  # a day and a month end are near
        client = aioredis.Redis.from_url(redis_url, socket_timeout=2)
        memory = Quotas.memory(clock=clock)
        prefix = f"{redis_prefix}{secrets.token_hex(4)}:"  # a fresh namespace per example
        shared = Quotas.for_store(client, key_prefix=prefix, timeout=2.0, clock=clock)
        counters = [QuotaCounter("docs", "t", 5, 3600), QuotaCounter("docs", "t", 8, "month")]
        last: dict[int, QuotaVerdict] = {}
        try:
            for op, amount, chosen in operations:
                if op == "wait":
                    clock.advance(amount)
                    continue
                answers = []
                for n, quotas in enumerate((memory, shared)):
                    group = [counters[i] for i in chosen]
                    if op == "consume":
                        answer = last[n] = await quotas.consume(group, cost=amount)
                    elif op == "refund":
                        answer = await quotas.refund(group, cost=amount)
                    elif op == "refund_last":
                        answer = await quotas.refund(last[n]) if n in last else ()
                    else:
                        answer = await quotas.usage(group)
                    answers.append(answer)
                assert answers[0] == answers[1], (op, amount, chosen)
        finally:
            await memory.close()
            await shared.close()
            await client.aclose()
