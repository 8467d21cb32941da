"""The Redis store's own behaviour: the memory store's verdicts, keys, TTLs, concurrency.

The algorithms' equivalence with the model is the property tests' business
(test_properties.py); here: what is specific to Redis.
"""

from __future__ import annotations

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.crc import key_slot

from bastion.ratelimit._memory import MemoryStore
from bastion.ratelimit._redis import RedisStore, hash_tag
from bastion.ratelimit._rules import build_rules, rule_id
from bastion.ratelimit._store import Rule

ALGORITHMS = ["token_bucket", "sliding_window", "sliding_log"]


@pytest.fixture
async def store(redis_client, redis_prefix, clock):
    """A store on the shared Redis driven by the test's clock."""
    store = RedisStore(redis_client, key_prefix=redis_prefix, timeout=2.0, clock=clock)
    yield store
    await store.close()


@pytest.fixture
async def timed_store(redis_client, redis_prefix):
    """A store on Redis TIME, as in production."""
    store = RedisStore(redis_client, key_prefix=redis_prefix, timeout=2.0)
    yield store
    await store.close()


def mixed_rules() -> tuple[Rule, ...]:
    return (
        *build_rules("5/second", "token_bucket", max_log_limit=1000),
        *build_rules("8/minute", "sliding_window", max_log_limit=1000),
        *build_rules("6/hour", "sliding_log", max_log_limit=1000),
    )


class TestVerdicts:
    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    async def test_same_verdicts_as_memory(self, store, clock, unique_key, algorithm):
        """Requests (costs, pauses) get the memory store's verdicts, field by field."""
        rules = build_rules("4/second;10/5 seconds", algorithm, max_log_limit=1000)
        memory = MemoryStore(clock=clock)
        steps = [(1, 0.0), (2, 0.0), (1, 0.05), (3, 0.3), (1, 0.0), (2, 1.7), (4, 0.01), (1, 2.5)]
        for cost, pause in steps * 3:
            clock.advance(pause)
            expected = memory.decide_now(unique_key, rules, cost)
            actual = await store.decide(unique_key, rules, cost)
            assert expected.allowed == actual.allowed
            assert expected.remaining == actual.remaining
            assert expected.retry_after == pytest.approx(actual.retry_after, abs=1e-6)
            assert expected.reset_after == pytest.approx(actual.reset_after, abs=1e-6)

    async def test_token_bucket_burst_then_retry_after(self, store, unique_key):
        """10/second: ten pass, the eleventh waits 0.1 s and reports 0 remaining."""
        rules = build_rules("10/second", "token_bucket", max_log_limit=1000)
        verdicts = [await store.decide(unique_key, rules) for _ in range(11)]
        assert [True] * 10 + [False] == [verdict.allowed for verdict in verdicts]
        assert [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0] == [verdict.remaining[0] for verdict in verdicts]
        assert 0.1 == pytest.approx(verdicts[-1].retry_after)
        assert 1.0 == pytest.approx(verdicts[-1].reset_after[0])

    async def test_all_or_nothing(self, store, unique_key):
        """When one rule rejects, no rule is charged: the others' remaining is unchanged."""
        rules = mixed_rules()
        for _ in range(5):
            assert (await store.decide(unique_key, rules)).allowed
        rejected = await store.decide(unique_key, rules)
        assert not rejected.allowed
        assert (0, 3, 1) == rejected.remaining
        again = await store.decide(unique_key, rules)
        assert (0, 3, 1) == again.remaining

    async def test_redis_time_when_no_clock(self, timed_store, unique_key):
        """Without a clock the script reads Redis TIME: 2/minute admits two, then waits ~30 s."""
        rules = build_rules("2/minute", "token_bucket", max_log_limit=1000)
        verdicts = [await timed_store.decide(unique_key, rules) for _ in range(3)]
        assert [True, True, False] == [verdict.allowed for verdict in verdicts]
        assert 29.0 < verdicts[-1].retry_after <= 30.0

    async def test_reordered_rules_keep_their_counts(self, store, unique_key):
        """Each rule's state is named by the rule, not its position: reordering mixes nothing."""
        rules = mixed_rules()
        await store.decide(unique_key, rules)
        reordered = (rules[2], rules[0], rules[1])
        assert (4, 3, 6) == (await store.decide(unique_key, reordered)).remaining

    async def test_reset_forgets(self, store, unique_key, redis_client):
        """``reset`` deletes every rule's state for the key."""
        rules = mixed_rules()
        for _ in range(5):
            await store.decide(unique_key, rules)
        await store.reset(unique_key, rules)
        assert 0 == await redis_client.exists(*(store.key(unique_key, rule) for rule in rules))
        assert (4, 7, 5) == (await store.decide(unique_key, rules)).remaining

    async def test_bad_costs_and_no_rules(self, store, unique_key):
        """A cost above a burst, below 1, or no rules at all: ValueError, nothing asked of Redis."""
        rules = mixed_rules()
        with pytest.raises(ValueError, match="never be admitted"):
            await store.decide(unique_key, rules, cost=6)
        with pytest.raises(ValueError, match="never be admitted"):
            await store.decide(unique_key, rules, cost=0)
        with pytest.raises(ValueError, match="at least one rule"):
            await store.decide(unique_key, ())

    async def test_log_members_distinct_across_stores_at_one_instant(
        self, redis_client, redis_prefix, clock, unique_key
    ):
        """Two instances logging at the same instant keep every unit (distinct members)."""
        rules = build_rules("10/minute", "sliding_log", max_log_limit=1000)
        first = RedisStore(redis_client, key_prefix=redis_prefix, timeout=2.0, clock=clock)
        second = RedisStore(redis_client, key_prefix=redis_prefix, timeout=2.0, clock=clock)
        try:
            await first.decide(unique_key, rules, cost=3)
            await second.decide(unique_key, rules, cost=3)
            assert 6 == await redis_client.zcard(first.key(unique_key, rules[0]))
            assert (1,) == (await first.decide(unique_key, rules, cost=3)).remaining
        finally:
            await first.close()
            await second.close()

    async def test_decoded_replies(self, redis_url, redis_prefix, unique_key):
        """A client with ``decode_responses`` works the same."""
        client = aioredis.Redis.from_url(redis_url, decode_responses=True)
        store = RedisStore(client, key_prefix=redis_prefix, timeout=2.0)
        try:
            verdict = await store.decide(unique_key, mixed_rules())
            assert verdict.allowed
            assert (4, 7, 5) == verdict.remaining
        finally:
            await store.close()
            await client.aclose()

    async def test_from_url(self, redis_url, redis_prefix, unique_key):
        """``from_url`` makes a store with a client of its own, closed with it."""
        async with RedisStore.from_url(redis_url, key_prefix=redis_prefix, timeout=2.0) as store:
            await store.start()
            assert await store.ping()
            assert (await store.decide(unique_key, mixed_rules())).allowed


class TestConcurrency:
    @pytest.mark.parametrize("algorithm", ALGORITHMS)
    async def test_200_concurrent_admit_exactly_the_allowance(
        self, timed_store, unique_key, algorithm
    ):
        """200 concurrent decisions on one key, pipelined: exactly the allowance passes."""
        rules = build_rules("50/hour", algorithm, max_log_limit=1000)
        verdicts = await asyncio.gather(
            *(timed_store.decide(unique_key, rules) for _ in range(200))
        )
        assert 50 == sum(verdict.allowed for verdict in verdicts)
        assert list(range(49, -1, -1)) == sorted(
            (verdict.remaining[0] for verdict in verdicts if verdict.allowed), reverse=True
        )

    async def test_two_stores_share_the_count(self, redis_client, redis_prefix, unique_key):
        """Two stores (two instances) on one Redis count together."""
        rules = build_rules("30/hour", "token_bucket", max_log_limit=1000)
        first = RedisStore(redis_client, key_prefix=redis_prefix, timeout=2.0)
        second = RedisStore(redis_client, key_prefix=redis_prefix, timeout=2.0)
        try:
            verdicts = await asyncio.gather(
                *((first if n % 2 else second).decide(unique_key, rules) for n in range(100))
            )
            assert 30 == sum(verdict.allowed for verdict in verdicts)
        finally:
            await first.close()
            await second.close()


class TestKeys:
    async def test_keys_share_a_slot_carry_ttls_and_name_their_rule(
        self, store, redis_client, redis_prefix, unique_key
    ):
        """Keys: prefix, ``rl:``, hash-tagged key, rule id; all in one slot, all with a TTL."""
        rules = mixed_rules()
        await store.decide(unique_key, rules)
        keys = [store.key(unique_key, rule) for rule in rules]
        assert [f"{redis_prefix}rl:{{{unique_key}}}:{rule_id(rule)}" for rule in rules] == keys
        assert 1 == len({key_slot(key.encode()) for key in keys})
        ttls = [await redis_client.pttl(key) for key in keys]
        # Token bucket: full again in 0.2 s; window counter: the end of the next
        # window (within 2 minutes); log: one window (an hour).
        assert 0 < ttls[0] <= 200
        assert 0 < ttls[1] <= 120_000
        assert 3_500_000 < ttls[2] <= 3_600_000

    @pytest.mark.parametrize("key", ["", "a}b", "{x}", "#h", "x{", "}{", "ip:10.0.0.1"])
    async def test_any_key_keeps_one_slot(self, store, redis_client, key):
        """Keys with braces, a leading ``#`` or none at all still land in one slot per decision."""
        rules = mixed_rules()
        await store.decide(key, rules)
        keys = [store.key(key, rule) for rule in rules]
        assert 1 == len({key_slot(name.encode()) for name in keys})
        assert [1, 1, 1] == [await redis_client.exists(name) for name in keys]

    def test_hash_tags_are_distinct(self):
        """No two keys share a tag, whichever form they take."""
        keys = ["", "a}b", "{x}", "#h", "x{", "}{", "h", "#", "a"]
        assert len(keys) == len({hash_tag(key) for key in keys})
