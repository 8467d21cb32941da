"""The memory store: the behaviour a caller relies on, one algorithm at a time, and its memory."""

from __future__ import annotations

import asyncio

import pytest

from bastion.ratelimit._memory import SWEEP_MINIMUM, MemoryStore
from bastion.ratelimit._store import LimitStore


class TestTokenBucket:
    def test_burst_passes_then_the_next_waits_one_token(self, memory_store, make_rules):
        """10/second admits 10 at once, then the 11th waits 0.1 s for one token."""
        rules = make_rules("10/second")
        verdicts = [memory_store.decide_now("k", rules) for _ in range(11)]
        assert [True] * 10 + [False] == [verdict.allowed for verdict in verdicts]
        assert [9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0] == [verdict.remaining[0] for verdict in verdicts]
        assert 0.1 == pytest.approx(verdicts[-1].retry_after)

    def test_tokens_refill_at_the_rate(self, memory_store, make_rules, clock):
        """Half a second after emptying 10/second, 5 tokens are back."""
        rules = make_rules("10/second")
        for _ in range(10):
            memory_store.decide_now("k", rules)
        clock.advance(0.5)
        verdicts = [memory_store.decide_now("k", rules) for _ in range(6)]
        assert [True] * 5 + [False] == [verdict.allowed for verdict in verdicts]

    def test_reset_after_is_the_time_to_a_full_bucket(self, memory_store, make_rules):
        """After 3 of 10/second, the bucket is full again in 0.3 s."""
        rules = make_rules("10/second")
        for _ in range(3):
            verdict = memory_store.decide_now("k", rules)
        assert 0.3 == pytest.approx(verdict.reset_after[0])

    def test_burst_smaller_than_rate(self, memory_store, make_rules, clock):
        """``10/second burst 2`` admits 2 at once and then one every 0.1 s."""
        rules = make_rules("10/second burst 2")
        assert [True, True, False] == [
            memory_store.decide_now("k", rules).allowed for _ in range(3)
        ]
        clock.advance(0.1)
        assert [True, False] == [memory_store.decide_now("k", rules).allowed for _ in range(2)]

    def test_idle_bucket_does_not_overfill(self, memory_store, make_rules, clock):
        """An hour of silence still leaves only ``burst`` tokens."""
        rules = make_rules("10/second")
        clock.advance(3600)
        verdicts = [memory_store.decide_now("k", rules) for _ in range(11)]
        assert 10 == sum(verdict.allowed for verdict in verdicts)

    def test_cost_takes_several_tokens(self, memory_store, make_rules):
        """A request of cost 4 takes 4 tokens, and waits for 4 when they are missing."""
        rules = make_rules("10/second")
        assert 6 == memory_store.decide_now("k", rules, cost=4).remaining[0]
        assert 2 == memory_store.decide_now("k", rules, cost=4).remaining[0]
        rejected = memory_store.decide_now("k", rules, cost=4)
        assert (False, 2) == (rejected.allowed, rejected.remaining[0])
        assert 0.2 == pytest.approx(rejected.retry_after)


class TestSlidingWindow:
    def test_at_most_burst_in_a_window(self, memory_store, make_rules):
        """5/minute admits 5 in its window and no more."""
        rules = make_rules("5/minute", "sliding_window")
        verdicts = [memory_store.decide_now("k", rules) for _ in range(6)]
        assert [True] * 5 + [False] == [verdict.allowed for verdict in verdicts]
        assert [4, 3, 2, 1, 0, 0] == [verdict.remaining[0] for verdict in verdicts]

    def test_previous_window_weighs_by_its_overlap(self, make_rules, clock):
        """Halfway into the next window, half of the previous window's 10 still count."""
        clock.now = 600.0  # the start of an aligned 60 s window
        store = MemoryStore(clock=clock)
        rules = make_rules("10/minute", "sliding_window")
        for _ in range(10):
            store.decide_now("k", rules)
        clock.advance(90)  # halfway into the next window
        verdicts = [store.decide_now("k", rules) for _ in range(6)]
        assert [True] * 5 + [False] == [verdict.allowed for verdict in verdicts]

    def test_retry_after_is_when_the_estimate_has_room(self, make_rules, clock):
        """Full previous window, empty current: one more fits once 1/10 of it has slid out."""
        clock.now = 600.0
        store = MemoryStore(clock=clock)
        rules = make_rules("10/minute", "sliding_window")
        for _ in range(10):
            store.decide_now("k", rules)
        clock.advance(60)
        rejected = store.decide_now("k", rules)
        assert not rejected.allowed
        assert 6.0 == pytest.approx(rejected.retry_after)
        clock.advance(6.0)
        assert store.decide_now("k", rules).allowed

    def test_reset_after_is_the_end_of_the_next_window(self, make_rules, clock):
        """A unit counted now weighs until the window after this one ends."""
        clock.now = 615.0
        store = MemoryStore(clock=clock)
        verdict = store.decide_now("k", make_rules("10/minute", "sliding_window"))
        assert 105.0 == pytest.approx(verdict.reset_after[0])


class TestSlidingLog:
    def test_exactly_burst_in_any_window(self, memory_store, make_rules, clock):
        """3/second admits 3, then one more each time the oldest is a second old."""
        rules = make_rules("3/second", "sliding_log")
        for offset in (0.0, 0.2, 0.4):
            clock.now = 10_000.0 + offset
            assert memory_store.decide_now("k", rules).allowed
        clock.now = 10_000.9
        rejected = memory_store.decide_now("k", rules)
        assert (False, 0) == (rejected.allowed, rejected.remaining[0])
        assert 0.1 == pytest.approx(rejected.retry_after)
        assert 0.5 == pytest.approx(rejected.reset_after[0])
        clock.now = 10_001.0
        assert memory_store.decide_now("k", rules).allowed
        assert not memory_store.decide_now("k", rules).allowed

    def test_cost_waits_for_enough_to_leave(self, memory_store, make_rules, clock):
        """A cost of 2 against a full log waits for the second oldest to leave."""
        rules = make_rules("3/second", "sliding_log")
        for offset in (0.0, 0.2, 0.4):
            clock.now = 10_000.0 + offset
            memory_store.decide_now("k", rules)
        clock.now = 10_000.5
        assert 0.7 == pytest.approx(memory_store.decide_now("k", rules, cost=2).retry_after)


class TestAllOrNothing:
    def test_every_limit_applies(self, memory_store, make_rules, clock):
        """``2/second;3/minute``: the second limit stops the fourth request a second later."""
        rules = make_rules("2/second;3/minute")
        assert [True, True, False] == [
            memory_store.decide_now("k", rules).allowed for _ in range(3)
        ]
        clock.advance(1)
        assert [True, False] == [memory_store.decide_now("k", rules).allowed for _ in range(2)]

    def test_rejection_consumes_nothing(self, memory_store, make_rules):
        """A request one limit refuses leaves the other limits untouched."""
        rules = make_rules("100/second;1/hour")
        memory_store.decide_now("k", rules)
        for _ in range(50):
            rejected = memory_store.decide_now("k", rules)
        assert (99, 0) == rejected.remaining

    def test_retry_after_is_the_longest_wait(self, memory_store, make_rules, clock):
        """When two limits refuse (1 s and 29 s away), the request waits for the slower."""
        rules = make_rules("1/second;2/minute")
        memory_store.decide_now("k", rules)
        clock.advance(1)
        memory_store.decide_now("k", rules)
        rejected = memory_store.decide_now("k", rules)
        assert 29.0 == pytest.approx(rejected.retry_after)

    def test_mixed_algorithms(self, memory_store, clock):
        """One decision may hold a token bucket, a window counter and a log."""
        from bastion.ratelimit._rules import build_rules

        rules = (
            *build_rules("5/second", "token_bucket", max_log_limit=10),
            *build_rules("8/minute", "sliding_window", max_log_limit=10),
            *build_rules("6/minute", "sliding_log", max_log_limit=10),
        )
        admitted = 0
        for _ in range(20):
            admitted += memory_store.decide_now("k", rules).allowed
            clock.advance(0.5)
        assert 6 == admitted

    def test_outputs_are_per_rule_in_order(self, memory_store, make_rules):
        """``remaining`` and ``reset_after`` follow the order of the rules."""
        verdict = memory_store.decide_now("k", make_rules("10/second;1000/hour"))
        assert (9, 999) == verdict.remaining
        assert pytest.approx((0.1, 3.6)) == verdict.reset_after


class TestKeysAndRules:
    def test_keys_are_independent(self, memory_store, make_rules):
        """One client's spending is not another's."""
        rules = make_rules("1/minute")
        assert memory_store.decide_now("a", rules).allowed
        assert memory_store.decide_now("b", rules).allowed
        assert not memory_store.decide_now("a", rules).allowed

    def test_counts_follow_the_limit_not_the_policy_order(self, memory_store, make_rules):
        """Reordering a policy's limits (a new tuple) keeps their counts."""
        first = make_rules("1/minute;10/hour")
        reordered = make_rules("10/hour;1/minute")
        memory_store.decide_now("k", first)
        verdict = memory_store.decide_now("k", reordered)
        assert (False, (9, 0)) == (verdict.allowed, verdict.remaining)

    def test_rules_given_as_a_list_work(self, memory_store, make_rules):
        """A list (not cached, as it could change) decides the same as a tuple."""
        rules = make_rules("2/minute")
        assert [True, True, False] == [
            memory_store.decide_now("k", list(rules)).allowed for _ in range(3)
        ]

    @pytest.mark.parametrize("algorithm", ["token_bucket", "sliding_window", "sliding_log"])
    @pytest.mark.parametrize("expression", ["5/second", "5/second;100/hour"])
    @pytest.mark.parametrize("cost", [0, -2, 6])
    def test_impossible_cost_raises(self, memory_store, make_rules, algorithm, expression, cost):
        """A cost below 1 or above the burst raises instead of answering forever 429."""
        with pytest.raises(ValueError, match="cost"):
            memory_store.decide_now("k", make_rules(expression, algorithm), cost=cost)

    def test_no_rule_raises(self, memory_store):
        """A decision without a rule is a programming error."""
        with pytest.raises(ValueError, match="at least one rule"):
            memory_store.decide_now("k", ())

    async def test_reset_forgets_a_key(self, memory_store, make_rules):
        """After ``reset`` the key starts afresh under those rules, others keep theirs."""
        rules = make_rules("1/minute")
        memory_store.decide_now("a", rules)
        memory_store.decide_now("b", rules)
        await memory_store.reset("a", rules)
        assert memory_store.decide_now("a", rules).allowed
        assert not memory_store.decide_now("b", rules).allowed

    async def test_reset_of_unused_rules_is_harmless(self, memory_store, make_rules):
        """Resetting a key under rules never used does nothing."""
        await memory_store.reset("a", make_rules("1/minute", "sliding_log"))
        assert 0 == len(memory_store)

    async def test_close_drops_everything(self, memory_store, make_rules):
        """A closed store holds nothing."""
        rules = make_rules("1/minute")
        memory_store.decide_now("a", rules)
        await memory_store.close()
        assert 0 == len(memory_store)


class TestOnTheEventLoop:
    async def test_decide_is_decide_now(self, memory_store, make_rules):
        """The coroutine answers what the synchronous call answers."""
        rules = make_rules("3/minute")
        verdicts = [await memory_store.decide("k", rules) for _ in range(4)]
        assert [True, True, True, False] == [verdict.allowed for verdict in verdicts]

    async def test_concurrent_decisions_admit_exactly_the_burst(self, make_rules):
        """200 concurrent tasks on one key: a decision never awaits, so exactly 10 pass."""
        store = MemoryStore()
        rules = make_rules("10/hour")
        verdicts = await asyncio.gather(*(store.decide("k", rules) for _ in range(200)))
        assert 10 == sum(verdict.allowed for verdict in verdicts)

    def test_default_clock_is_monotonic(self, make_rules):
        """Without a clock the store runs on ``time.monotonic``."""
        store = MemoryStore()
        assert store.decide_now("k", make_rules("1/hour")).allowed
        assert not store.decide_now("k", make_rules("1/hour")).allowed

    def test_is_a_limit_store(self, memory_store):
        """It has the protocol's methods (mypy checks the signatures)."""
        store: LimitStore = memory_store
        assert all(callable(getattr(store, name)) for name in ("decide", "reset", "close"))


class TestMemoryStaysBounded:
    def test_a_million_expiring_keys_do_not_stay(self, clock, make_rules):
        """A million distinct clients, each gone after a second: the table never holds
        more than the sweep threshold, though live keys are only about a thousand."""
        store = MemoryStore(clock=clock)
        rules = make_rules("1/second")
        decide = store.decide_now
        largest = 0
        for batch in range(100):
            for n in range(10_000):
                clock.now += 0.001
                decide(f"client:{batch}:{n}", rules)
            largest = max(largest, len(store))
        assert largest <= SWEEP_MINIMUM
        assert 0 < store.sweep()
        assert 1001 >= len(store)

    @pytest.mark.parametrize(
        ("expression", "algorithm"),
        [
            ("1/second", "sliding_window"),
            ("1/second", "sliding_log"),
            ("1/second;2 per 2 seconds", "token_bucket"),
        ],
    )
    def test_other_shapes_drop_expired_keys(self, clock, make_rules, expression, algorithm):
        """The window counter, the log and multi-limit buckets sweep their expired keys too."""
        store = MemoryStore(clock=clock)
        rules = make_rules(expression, algorithm)
        largest = 0
        for n in range(5 * SWEEP_MINIMUM):
            clock.now += 0.001
            store.decide_now(f"client:{n}", rules)
            if n % 1000 == 0:
                largest = max(largest, len(store))
        assert largest <= SWEEP_MINIMUM * len(rules)  # the threshold is per rule
        clock.advance(10)
        store.sweep()
        assert 0 == len(store)

    def test_many_policies_keep_their_counts(self, memory_store, make_rules):
        """Thousands of distinct rule tuples (past the compiled-plan cache) share the counts
        of their limit."""
        for _ in range(5000):
            memory_store.decide_now("k", make_rules("4000/hour"))
        assert 0 == memory_store.decide_now("k", make_rules("4000/hour")).remaining[0]

    def test_sweep_keeps_live_state(self, memory_store, make_rules, clock):
        """A sweep drops what expired and nothing a decision still needs."""
        short = make_rules("1/second")
        long = make_rules("1/hour", "sliding_log")
        memory_store.decide_now("a", short)
        memory_store.decide_now("a", long)
        clock.advance(2)
        assert 1 == memory_store.sweep()
        assert not memory_store.decide_now("a", long).allowed
        assert memory_store.decide_now("a", short).allowed

    def test_live_keys_beyond_the_threshold_are_kept(self, clock, make_rules):
        """Growing past the threshold with live keys loses no count."""
        store = MemoryStore(clock=clock)
        rules = make_rules("1/hour")
        for n in range(SWEEP_MINIMUM + 10):
            store.decide_now(f"client:{n}", rules)
        assert SWEEP_MINIMUM + 10 == len(store)
        assert not store.decide_now("client:0", rules).allowed
