"""Retry budget: retries bounded by a share of the traffic over a sliding window."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.resilience import RetryBudget


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def withdrawals(budget: RetryBudget, attempts: int) -> int:
    return sum(budget.try_withdraw() for _ in range(attempts))


class TestBudget:
    def test_reserve_without_traffic(self):
        """With no calls, min_per_second x window retries are still allowed."""
        budget = RetryBudget(0.2, 1.0, clock=FakeClock())
        assert 10 == withdrawals(budget, 50)

    def test_share_of_the_calls(self):
        """Retries grow with calls: ratio x calls, plus the reserve."""
        budget = RetryBudget(0.2, 0.0, clock=FakeClock())
        for _ in range(100):
            budget.deposit()
        assert 20 == withdrawals(budget, 100)
        assert 0 == budget.available

    def test_window_slides(self):
        """Calls and retries older than the window stop counting; the budget refills."""
        clock = FakeClock()
        budget = RetryBudget(0.5, 0.0, window=10.0, clock=clock)
        for _ in range(10):
            budget.deposit()
        assert 5 == withdrawals(budget, 10)
        clock.now += 10.5
        assert 0 == withdrawals(budget, 10)  # the calls that paid for them expired too
        for _ in range(4):
            budget.deposit()
        assert 2 == withdrawals(budget, 10)

    def test_no_budget(self):
        """Ratio and reserve both 0: no limit (retries are switched off with retries = 0)."""
        budget = RetryBudget(0.0, 0.0, clock=FakeClock())
        assert 1000 == withdrawals(budget, 1000)
        assert math.inf == budget.available

    @pytest.mark.parametrize(
        ("arguments", "options"),
        [((-0.1, 1.0), {}), ((0.1, -1.0), {}), ((0.1, 1.0), {"window": 0.0})],
    )
    def test_bad_settings(self, arguments, options):
        """Negative shares and empty windows are refused."""
        with pytest.raises(ValueError, match="retry budget"):
            RetryBudget(*arguments, **options)

    @settings(max_examples=200, deadline=None)
    @given(
        ratio=st.sampled_from([0.0, 0.1, 0.2, 0.5, 1.0]),
        reserve_rate=st.sampled_from([0.0, 0.1, 0.5, 2.0]),
        events=st.lists(
            st.tuples(
                st.floats(0.0, 4.0, allow_nan=False),  # time passing first
                st.integers(0, 20),  # calls
                st.integers(0, 20),  # retries wanted
            ),
            max_size=40,
        ),
    )
    def test_retries_never_exceed_the_budget(self, ratio, reserve_rate, events):
        """At any time, retries of the last window <= ratio x its calls + the reserve."""
        window = 10.0
        width = window / 10
        clock = FakeClock(0.0)
        budget = RetryBudget(ratio, reserve_rate, window=window, clock=clock)
        calls: list[float] = []
        retries: list[float] = []
        for elapsed, new_calls, wanted in events:
            clock.now += elapsed
            for _ in range(new_calls):
                budget.deposit()
                calls.append(clock.now)
            for _ in range(wanted):
                if budget.try_withdraw():
                    retries.append(clock.now)
                    if ratio or reserve_rate:
                        now = clock.now
                        # The window counted covers at least its last nine tenths
                        # and never more than all of it.
                        recent_retries = sum(1 for t in retries if t >= now - window + width)
                        window_calls = sum(1 for t in calls if t > now - window)
                        assert recent_retries <= ratio * window_calls + reserve_rate * window
