"""Property tests of the limiter on memory and on Redis: safe, equal to the model, honest.

For any arrival sequence (times and costs) and any policy of one to three limits
with mixed algorithms, each store

(a) never admits more than the policy allows, checked from first principles on
    what it admitted (independent of the model): a token bucket at most
    ``burst + rate * (b - a) / period`` units in any interval ``[a, b]``, a sliding
    log at most ``burst`` in any window of its length, a window counter at most
    ``burst`` in any aligned window and never with its estimate above ``burst``;
(b) admits exactly what the reference model (``model.py``) admits, reporting the
    same ``remaining`` and, within 1e-6 s, the same ``retry_after`` and ``reset_after``;
(c) is honest about ``retry_after``: asking again that much later is admitted,
    and asking a microsecond earlier is not.

Times are whole milliseconds and rates small integers, so any two quantities the
algorithms compare are either equal or at least about 1e-5 apart: far from the
1e-9 tolerance both implementations use, and so the comparisons cannot disagree
by rounding. Redis gets the times explicitly (its scripts otherwise use ``TIME``).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import secrets
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from model import ManualClock, ModelLimiter

from bastion.ratelimit._expression import Limit
from bastion.ratelimit._memory import MemoryStore
from bastion.ratelimit._rules import ALGORITHMS, rule_id
from bastion.ratelimit._store import Rule, Verdict

TOLERANCE = 1e-6
JUST_BEFORE = 1e-6

# -- strategies ----------------------------------------------------------------

limits = st.builds(
    lambda rate, period, burst: Limit(rate, period, burst, f"{rate} per {period:g}s burst {burst}"),
    st.integers(1, 8),
    st.sampled_from([1.0, 2.0, 5.0, 10.0]),
    st.integers(1, 8),
)
policies = st.lists(
    st.builds(Rule, limits, st.sampled_from(ALGORITHMS)), min_size=1, max_size=3, unique_by=rule_id
).map(tuple)
gaps_ms = st.one_of(st.just(0), st.integers(0, 400), st.integers(0, 5_000))


@dataclass(frozen=True)
class Scenario:
    rules: tuple[Rule, ...]
    arrivals: tuple[tuple[float, int], ...]  # (time, cost), times never going back

    @property
    def smallest_burst(self) -> int:
        return min(rule.limit.burst for rule in self.rules)


@st.composite
def scenarios(draw, min_arrivals: int = 10, max_arrivals: int = 40) -> Scenario:
    rules = draw(policies)
    smallest = min(rule.limit.burst for rule in rules)
    # Start anywhere in ten minutes, so windows are aligned differently each time.
    clock_ms = 10_000_000 + draw(st.integers(0, 600_000))
    arrivals = []
    for gap, cost in draw(
        st.lists(
            st.tuples(gaps_ms, st.integers(1, smallest)),
            min_size=min_arrivals,
            max_size=max_arrivals,
        )
    ):
        clock_ms += gap
        arrivals.append((clock_ms / 1000, cost))
    return Scenario(rules, tuple(arrivals))


# -- the stores under test -----------------------------------------------------


class MemoryBackend:
    examples = 300

    def limiter(self, rules):
        clock = ManualClock()
        store = MemoryStore(clock=clock)

        def decide(now: float, cost: int) -> Verdict:
            clock.now = now
            return store.decide_now("k", rules, cost)

        return decide

    def close(self) -> None:
        pass


class RedisBackend:
    """One RedisStore on its own event loop; each example gets a key of its own."""

    examples = 60

    def __init__(self, redis_url: str, prefix: str) -> None:
        import redis.asyncio as aioredis

        from bastion.ratelimit._redis import RedisStore

        self.runner = asyncio.Runner()
        self.clock = ManualClock()

        async def start() -> tuple[Any, Any]:
            client = aioredis.Redis.from_url(redis_url, socket_timeout=5, socket_connect_timeout=5)
            return client, RedisStore(client, key_prefix=prefix, timeout=5.0, clock=self.clock)

        self.client, self.store = self.runner.run(start())

    def limiter(self, rules):
        key = f"prop:{secrets.token_hex(6)}"

        def decide(now: float, cost: int) -> Verdict:
            self.clock.now = now
            return self.runner.run(self.store.decide(key, rules, cost))

        return decide

    def close(self) -> None:
        try:
            self.runner.run(self.store.close())
            self.runner.run(self.client.aclose())
        finally:
            self.runner.close()


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
def backend(request):
    """The memory store, then the Redis store (on the test Redis, under this session's prefix)."""
    if request.param == "memory":
        chosen = MemoryBackend()
    else:
        chosen = RedisBackend(
            request.getfixturevalue("redis_url"), request.getfixturevalue("redis_prefix")
        )
    yield chosen
    chosen.close()


def run(backend, test) -> None:
    """Run a hypothesis test with the backend's number of examples."""
    settings(
        max_examples=backend.examples,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
        database=None,
    )(test)()


# -- (a) safety from first principles -------------------------------------------


def check_token_bucket(limit: Limit, admitted: list[tuple[float, int]]) -> None:
    # Intervals from one admission time to another (any other interval holds no
    # more units and is at least as long); units before index i or after j are outside.
    times = [when for when, _ in admitted]
    totals = list(itertools.accumulate((cost for _, cost in admitted), initial=0))
    firsts = [i for i in range(len(times)) if i == 0 or times[i - 1] != times[i]]
    lasts = [j for j in range(len(times)) if j == len(times) - 1 or times[j + 1] != times[j]]
    for i in firsts:
        for j in lasts:
            if j >= i:
                taken = totals[j + 1] - totals[i]
                allowed = limit.burst + limit.rate * (times[j] - times[i]) / limit.period
                assert taken <= allowed + TOLERANCE, f"{taken} units in [{times[i]}, {times[j]}]"


def check_sliding_log(limit: Limit, admitted: list[tuple[float, int]]) -> None:
    width = limit.window
    for end, _ in admitted:
        # 1e-7 absorbs the rounding of ``end - width``; grid points are farther apart.
        taken = sum(cost for when, cost in admitted if end - width + 1e-7 < when <= end)
        assert taken <= limit.burst, f"{taken} units in the window ending {end}"


def check_sliding_window(limit: Limit, admitted: list[tuple[float, int]]) -> None:
    width = limit.window
    per_window: dict[int, int] = {}
    for number, (when, cost) in enumerate(admitted):
        index = math.floor(when / width)
        fraction = min(1.0, max(0.0, (when - index * width) / width))
        earlier = admitted[:number]
        current = sum(c for t, c in earlier if math.floor(t / width) == index)
        previous = sum(c for t, c in earlier if math.floor(t / width) == index - 1)
        estimate = previous * (1 - fraction) + current
        assert estimate + cost <= limit.burst + TOLERANCE, f"admitted at estimate {estimate}"
        per_window[index] = per_window.get(index, 0) + cost
    assert all(count <= limit.burst for count in per_window.values()), per_window


SAFETY = {
    "token_bucket": check_token_bucket,
    "sliding_window": check_sliding_window,
    "sliding_log": check_sliding_log,
}


# -- (b) equivalence with the model ----------------------------------------------


def assert_same(expected: Verdict, actual: Verdict, when: float) -> None:
    context = f"at {when}: expected {expected}, got {actual}"
    assert expected.allowed == actual.allowed, context
    assert tuple(expected.remaining) == tuple(actual.remaining), context
    assert expected.retry_after == pytest.approx(actual.retry_after, abs=TOLERANCE), context
    assert tuple(expected.reset_after) == pytest.approx(tuple(actual.reset_after), abs=TOLERANCE), (
        context
    )


# -- the properties ---------------------------------------------------------------


class TestEveryStore:
    """(a), (b) and (c) on the memory store and on the Redis store."""

    def test_safety(self, backend):
        """Whatever arrives, no rule admits more than it allows."""

        @given(scenarios())
        def safety(scenario):
            decide = backend.limiter(scenario.rules)
            admitted = [(now, cost) for now, cost in scenario.arrivals if decide(now, cost).allowed]
            for rule in scenario.rules:
                SAFETY[rule.algorithm](rule.limit, admitted)

        run(backend, safety)

    def test_equals_the_model(self, backend):
        """Every verdict (admission, remaining, retry_after, reset_after) is the model's."""

        @given(scenarios())
        def equivalence(scenario):
            decide = backend.limiter(scenario.rules)
            model = ModelLimiter(list(scenario.rules))
            for now, cost in scenario.arrivals:
                assert_same(model.decide(now, cost), decide(now, cost), now)

        run(backend, equivalence)

    def test_retry_after_is_honest(self, backend):
        """After a rejection, asking at now + retry_after passes and a microsecond before fails."""

        @given(scenarios(min_arrivals=1, max_arrivals=20))
        def honesty(scenario):
            decide = backend.limiter(scenario.rules)
            model = ModelLimiter(list(scenario.rules))
            for now, cost in scenario.arrivals:
                model.decide(now, cost)
                decide(now, cost)
            # Keep asking at the last instant until refused (bounded by the burst).
            now, cost = scenario.arrivals[-1]
            for _ in range(scenario.smallest_burst + 1):
                verdict = decide(now, cost)
                assert_same(model.decide(now, cost), verdict, now)
                if not verdict.allowed:
                    break
            assert not verdict.allowed
            assert verdict.retry_after > 0
            if verdict.retry_after > 2 * JUST_BEFORE:
                before = now + verdict.retry_after - JUST_BEFORE
                early = decide(before, cost)
                assert not early.allowed, f"admitted {JUST_BEFORE} s before retry_after"
                assert_same(model.decide(before, cost), early, before)
            later = now + verdict.retry_after
            on_time = decide(later, cost)
            assert on_time.allowed, f"refused at now + retry_after ({verdict.retry_after})"
            assert_same(model.decide(later, cost), on_time, later)

        run(backend, honesty)


# -- the model itself ---------------------------------------------------------------


class TestModel:
    def test_model_token_bucket_example(self):
        """The model's bucket: 2 at once, then one per half second."""
        model = ModelLimiter([Rule(Limit(2, 1.0, 2, "2/second"), "token_bucket")])
        assert [True, True, False] == [model.decide(0.0).allowed for _ in range(3)]
        assert 0.5 == pytest.approx(model.decide(0.0).retry_after, abs=TOLERANCE)
        assert model.decide(0.5).allowed

    def test_model_sliding_log_example(self):
        """The model's log forgets a unit exactly one window later."""
        model = ModelLimiter([Rule(Limit(1, 1.0, 1, "1/second"), "sliding_log")])
        assert model.decide(0.25).allowed
        assert not model.decide(1.0).allowed
        assert model.decide(1.25).allowed

    def test_model_all_or_nothing(self):
        """The model consumes nothing when one rule refuses."""
        model = ModelLimiter(
            [
                Rule(Limit(10, 1.0, 10, "10/second"), "token_bucket"),
                Rule(Limit(1, 60.0, 1, "1/minute"), "sliding_window"),
            ]
        )
        assert model.decide(0.0).allowed
        assert (9, 0) == model.decide(0.0).remaining
