"""The breaker against a reference model, driven by hypothesis through calls, results and time.

The model keeps every outcome in a plain list and recomputes the window by
scanning it, which is slow and obviously right; the breaker keeps a ring or
per-second buckets. After every step they must agree.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from bastion.resilience import CircuitBreaker, CircuitOpenError, CircuitState, default_policy
from bastion.resilience._policy import Policy

EPOCH = 1_800_000_000.0
SLOW = 0.5


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return EPOCH + self.now


class Model:
    """The breaker's rules, stated as simply as possible."""

    def __init__(self, policy: Policy) -> None:
        self.p = policy
        self.state = "closed"
        self.outcomes: list[tuple[float, int]] = []  # (time, failed) since the circuit last closed
        self.run = 0  # failures in a row
        self.open_until = 0.0
        self.issued = self.in_flight = self.successes = 0
        self.half_open_periods = 0
        self.probe_outcomes: list[str] = []  # results counted in this half-open period
        self.minimum = (
            min(policy.minimum_calls, policy.window_size)
            if policy.window == "count"
            else policy.minimum_calls
        )

    def window(self, now: float) -> list[int]:
        if self.p.window == "count":
            return [failed for _, failed in self.outcomes[-self.p.window_size :]]
        oldest = int(now) - self.p.window_size
        return [failed for at, failed in self.outcomes if int(at) > oldest]

    def rate_rule(self, now: float) -> bool:
        window = self.window(now)
        return len(window) >= self.minimum and sum(window) / len(window) >= (
            self.p.failure_rate_threshold
        )

    def enter(self, state: str) -> None:
        self.state = state
        self.issued = self.in_flight = self.successes = 0
        if state == "half_open":
            self.half_open_periods += 1
            self.probe_outcomes = []

    def read(self, now: float) -> str:
        if self.state == "open" and now >= self.open_until:
            self.enter("half_open")
        return self.state

    def acquire(self, now: float) -> float | None:
        """None when admitted, else the retry_after the rejection carries."""
        if self.state == "closed":
            return None
        if self.read(now) == "open":
            return self.open_until - now
        if self.issued >= self.p.half_open_probes:
            return 1.0
        self.issued += 1
        self.in_flight += 1
        return None

    def open(self, now: float) -> None:
        self.open_until = now + self.p.open_duration
        self.run = 0
        self.enter("open")

    def success(self, now: float, duration: float) -> None:
        if self.p.slow_call_threshold and duration > self.p.slow_call_threshold:
            self.failure(now)
            return
        if self.state == "closed":
            self.run = 0
            self.outcomes.append((now, 0))
        elif self.state == "half_open" and self.in_flight:
            self.in_flight -= 1
            self.successes += 1
            self.probe_outcomes.append("success")
            if self.successes >= self.p.half_open_probes:
                self.enter("closed")
                self.outcomes = []
                self.run = 0

    def failure(self, now: float) -> None:
        if self.state == "closed":
            self.outcomes.append((now, 1))
            self.run += 1
            limit = self.p.consecutive_failures
            if (limit and self.run >= limit) or self.rate_rule(now):
                self.open(now)
        elif self.state == "half_open" and self.in_flight:
            self.in_flight -= 1
            self.probe_outcomes.append("failure")
            self.open(now)

    def ignored(self) -> None:
        if self.state == "half_open" and self.in_flight:
            self.in_flight -= 1
            self.issued -= 1


breaker_settings = st.fixed_dictionaries(
    {
        "window_size": st.integers(1, 8),
        "minimum_calls": st.integers(1, 10),
        "failure_rate_threshold": st.sampled_from([0.2, 0.25, 0.5, 0.6, 1.0]),
        "consecutive_failures": st.integers(0, 6),
        "open_duration": st.sampled_from([0.0, 1.0, 2.5, 30.0]),
        "half_open_probes": st.integers(1, 3),
        "slow_call_threshold": st.sampled_from([0.0, SLOW]),
    }
)


class BreakerMachine(RuleBasedStateMachine):
    window = "count"

    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        # Calls admitted and not finished: the half-open period they were admitted
        # in as a probe, or None for calls admitted while closed.
        self.pending: list[int | None] = []
        # Permits given back by results of calls admitted before this half-open
        # period: the breaker cannot tell them from its probes (as in
        # Resilience4j), so each lets one more probe in while the others run.
        self.stale_permits: dict[int, int] = {}

    @initialize(values=breaker_settings)
    def build(self, values):
        name = f"machine-{self.window}"
        policy = dataclasses.replace(default_policy(name, "http"), window=self.window, **values)
        self.breaker = CircuitBreaker(name, policy, clock=self.clock, wall=self.clock.wall)
        self.model = Model(policy)

    @rule()
    def start_call(self):
        model = self.model
        now = self.clock.now
        open_until = model.open_until
        expected = model.acquire(now)
        if expected is not None:
            with pytest.raises(CircuitOpenError) as rejected:
                self.breaker.acquire()
            assert pytest.approx(expected) == rejected.value.retry_after
            assert self.breaker.name == rejected.value.circuit
            if model.state == "open":
                assert now < open_until, "an open circuit rejected past its open period"
            return
        self.breaker.acquire()  # admitted, as the model says
        self.pending.append(model.half_open_periods if model.state == "half_open" else None)

    @precondition(lambda self: self.pending)
    @rule(data=st.data(), outcome=st.sampled_from(["success", "failure", "slow", "ignored"]))
    def finish_call(self, data, outcome):
        index = data.draw(st.integers(0, len(self.pending) - 1))
        tag = self.pending.pop(index)
        model = self.model
        now = self.clock.now
        before = model.state
        period = model.half_open_periods
        if outcome == "ignored" and before == "half_open" and model.in_flight and tag != period:
            self.stale_permits[period] = self.stale_permits.get(period, 0) + 1
        if outcome == "ignored":
            model.ignored()
            self.breaker.record_ignored()
        elif outcome == "failure":
            model.failure(now)
            self.breaker.record_failure(0.01)
        else:
            duration = SLOW * 2 if outcome == "slow" else 0.01
            model.success(now, duration)
            self.breaker.record_success(duration)
        if before == "closed" and model.state == "open":
            limit = model.p.consecutive_failures
            # Recomputed from the outcomes: the run of failures, or the rate rule.
            run = 0
            for _, failed in reversed(model.outcomes):
                if not failed:
                    break
                run += 1
            assert (limit and run >= limit) or model.rate_rule(now), "opened without a rule"
        if before == "half_open" and model.state == "closed":
            assert ["success"] * model.p.half_open_probes == model.probe_outcomes

    @rule(seconds=st.sampled_from([0.0, 0.3, 0.7, 1.0, 2.5, 5.0, 31.0]))
    def advance(self, seconds):
        self.clock.now += seconds

    @rule()
    def read_snapshot(self):
        now = self.clock.now
        state = self.model.read(now)
        snapshot = self.breaker.snapshot()
        assert state == snapshot.state.value
        window = self.model.window(now)
        assert len(window) == snapshot.calls
        if len(window) >= self.model.minimum:
            assert pytest.approx(sum(window) / len(window)) == snapshot.failure_rate
        else:
            assert snapshot.failure_rate is None

    @invariant()
    def agrees_with_the_model(self):
        if hasattr(self, "model"):
            # The raw state: reading the property would make the lazy transition itself.
            assert self.model.state == self.breaker._state.value

    @invariant()
    def half_open_never_runs_more_than_the_probes(self):
        if not hasattr(self, "model") or self.model.state != "half_open":
            return
        assert self.model.in_flight <= self.model.p.half_open_probes
        period = self.model.half_open_periods
        probes = sum(tag == period for tag in self.pending)
        assert probes <= self.model.p.half_open_probes + self.stale_permits.get(period, 0)


class TimeWindowMachine(BreakerMachine):
    window = "time"


_settings = settings(
    max_examples=150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestCountWindowBreaker = BreakerMachine.TestCase
TestCountWindowBreaker.settings = _settings
TestTimeWindowBreaker = TimeWindowMachine.TestCase
TestTimeWindowBreaker.settings = _settings


def test_states_are_the_documented_values():
    """The states read as /health/circuits and the metrics label them."""
    assert ["closed", "open", "half_open"] == [state.value for state in CircuitState]
