"""The circuit breaker: when it opens, what it rejects, how it probes and closes, what it says."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.resilience import (
    CircuitBreaker,
    CircuitOpenError,
    CircuitSnapshot,
    CircuitState,
    default_policy,
)

EPOCH = 1_800_000_000.0


class FakeClock:
    """Monotonic and wall-clock time that only move when the test says."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return EPOCH + self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def breaker_for(clock: FakeClock, **settings) -> CircuitBreaker:
    name = settings.pop("name", None) or f"test-{uuid.uuid4().hex[:8]}"
    policy = dataclasses.replace(default_policy(name, "http"), **settings)
    return CircuitBreaker(name, policy, clock=clock, wall=clock.wall)


def fail(breaker: CircuitBreaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.record_failure(duration)


def succeed(breaker: CircuitBreaker, times: int = 1, duration: float = 0.01) -> None:
    for _ in range(times):
        breaker.acquire()
        breaker.record_success(duration)


def sample(name: str, circuit: str, state: str) -> float:
    return REGISTRY.get_sample_value(name, {"circuit": circuit, "state": state}) or 0.0


class TestConsecutiveFailures:
    def test_closed_circuit_admits_calls(self, clock):
        """A new circuit is closed and admits every call."""
        breaker = breaker_for(clock)
        succeed(breaker, 100)
        assert CircuitState.CLOSED == breaker.state

    def test_opens_after_five_failures_in_a_row_by_default(self, clock):
        """Five failures in a row open the circuit for 30 s, whatever the window holds."""
        breaker = breaker_for(clock)
        fail(breaker, 4)
        assert CircuitState.CLOSED == breaker.state
        fail(breaker)
        assert CircuitState.OPEN == breaker.state
        with pytest.raises(CircuitOpenError) as raised:
            breaker.acquire()
        assert breaker.name == raised.value.circuit
        assert 30.0 == pytest.approx(raised.value.retry_after)
        assert "30" == raised.value.headers["Retry-After"]

    def test_a_success_resets_the_run(self, clock):
        """A success between failures starts the count of failures in a row again."""
        breaker = breaker_for(clock, minimum_calls=1000, window_size=1000)
        fail(breaker, 4)
        succeed(breaker)
        fail(breaker, 4)
        assert CircuitState.CLOSED == breaker.state

    def test_ignored_results_neither_count_nor_reset(self, clock):
        """An error that is not the dependency's fault does not break a run of failures."""
        breaker = breaker_for(clock, minimum_calls=1000, window_size=1000)
        fail(breaker, 4)
        breaker.acquire()
        breaker.record_ignored()
        assert 4 == breaker.snapshot().calls
        fail(breaker)
        assert CircuitState.OPEN == breaker.state

    def test_zero_switches_the_rule_off(self, clock):
        """consecutive_failures=0 leaves only the rate rule."""
        breaker = breaker_for(clock, consecutive_failures=0, minimum_calls=1000, window_size=1000)
        fail(breaker, 500)
        assert CircuitState.CLOSED == breaker.state


class TestCountWindow:
    def test_opens_at_the_threshold_once_minimum_calls_are_seen(self, clock):
        """Half the calls failing opens the circuit, but only once 10 calls were seen."""
        breaker = breaker_for(clock, consecutive_failures=0, minimum_calls=10, window_size=20)
        for _ in range(4):
            fail(breaker)
            succeed(breaker)
        fail(breaker)
        assert CircuitState.CLOSED == breaker.state  # 5 of 9: under the minimum
        succeed(breaker)
        assert CircuitState.CLOSED == breaker.state  # a success never opens
        fail(breaker)
        assert CircuitState.OPEN == breaker.state  # 6 of 11

    def test_below_the_threshold_stays_closed(self, clock):
        """A failure rate under the threshold never opens the circuit."""
        breaker = breaker_for(clock, consecutive_failures=0, minimum_calls=10, window_size=20)
        for _ in range(100):
            fail(breaker)
            succeed(breaker, 2)
        assert CircuitState.CLOSED == breaker.state

    def test_only_the_last_window_size_calls_count(self, clock):
        """Failures that slid out of the window no longer count."""
        breaker = breaker_for(
            clock,
            consecutive_failures=0,
            minimum_calls=4,
            window_size=4,
            failure_rate_threshold=0.5,
        )
        succeed(breaker)
        fail(breaker)
        succeed(breaker, 4)  # the failure slides out
        fail(breaker)  # 1 of the last 4; 2 of 7 overall
        assert CircuitState.CLOSED == breaker.state
        assert 0.25 == breaker.snapshot().failure_rate

    def test_minimum_calls_is_capped_at_the_window_size(self, clock):
        """A count window of 4 can open after 4 calls even when minimum_calls says 10."""
        breaker = breaker_for(clock, consecutive_failures=0, minimum_calls=10, window_size=4)
        fail(breaker, 4)
        assert CircuitState.OPEN == breaker.state


class TestTimeWindow:
    def test_opens_on_the_rate_of_the_last_seconds(self, clock):
        """Calls spread over the window count together."""
        breaker = breaker_for(
            clock, window="time", window_size=10, minimum_calls=4, consecutive_failures=0
        )
        succeed(breaker, 2)
        clock.advance(5)
        fail(breaker)
        assert CircuitState.CLOSED == breaker.state
        fail(breaker)
        assert CircuitState.OPEN == breaker.state

    def test_calls_older_than_the_window_expire(self, clock):
        """Failures more than window_size seconds old no longer count."""
        breaker = breaker_for(
            clock, window="time", window_size=10, minimum_calls=4, consecutive_failures=0
        )
        fail(breaker, 3)
        clock.advance(11)
        assert 0 == breaker.snapshot().calls
        succeed(breaker, 3)
        fail(breaker)
        assert CircuitState.CLOSED == breaker.state
        assert 0.25 == breaker.snapshot().failure_rate

    def test_expiry_goes_bucket_by_bucket(self, clock):
        """Each second's bucket leaves the window on its own."""
        breaker = breaker_for(clock, window="time", window_size=3, minimum_calls=1000)
        for _ in range(3):
            succeed(breaker, 2)
            clock.advance(1)
        assert 4 == breaker.snapshot().calls  # the first second's calls are out
        clock.advance(1)
        assert 2 == breaker.snapshot().calls
        clock.advance(3600 * 24)
        assert 0 == breaker.snapshot().calls
        succeed(breaker)
        assert 1 == breaker.snapshot().calls


class TestSlowCalls:
    def test_slow_successes_count_as_failures(self, clock):
        """Successes slower than slow_call_threshold count as failures in both rules."""
        breaker = breaker_for(clock, slow_call_threshold=0.5, consecutive_failures=3)
        succeed(breaker, 2, duration=0.6)
        assert CircuitState.CLOSED == breaker.state
        succeed(breaker, duration=0.6)
        assert CircuitState.OPEN == breaker.state

    def test_calls_at_the_threshold_are_not_slow(self, clock):
        """Only calls slower than the threshold count as failures."""
        breaker = breaker_for(clock, slow_call_threshold=0.5, consecutive_failures=3)
        succeed(breaker, 10, duration=0.5)
        assert CircuitState.CLOSED == breaker.state
        assert 0.0 == breaker.snapshot().failure_rate

    def test_zero_switches_the_rule_off(self, clock):
        """With slow_call_threshold=0 a success is a success however long it took."""
        breaker = breaker_for(clock, consecutive_failures=3)
        succeed(breaker, 10, duration=3600.0)
        assert CircuitState.CLOSED == breaker.state


class TestOpenAndHalfOpen:
    def test_rejects_until_the_open_period_ends(self, clock):
        """An open circuit rejects every call, telling how long until the next probe."""
        breaker = breaker_for(clock, open_duration=30.0)
        fail(breaker, 5)
        clock.advance(29.5)
        with pytest.raises(CircuitOpenError) as raised:
            breaker.acquire()
        assert 0.5 == pytest.approx(raised.value.retry_after)
        assert "1" == raised.value.headers["Retry-After"]
        clock.advance(0.5)
        breaker.acquire()
        assert CircuitState.HALF_OPEN == breaker.state

    def test_half_open_admits_only_the_probes(self, clock):
        """Half-open admits half_open_probes calls; the others are rejected as if open."""
        breaker = breaker_for(clock, half_open_probes=2)
        fail(breaker, 5)
        clock.advance(30)
        breaker.acquire()
        breaker.acquire()
        with pytest.raises(CircuitOpenError) as raised:
            breaker.acquire()
        assert 1.0 == raised.value.retry_after

    def test_all_probes_succeeding_close_it_with_a_fresh_window(self, clock):
        """The circuit closes once every probe succeeded; the old failures are forgotten."""
        breaker = breaker_for(clock, half_open_probes=2)
        fail(breaker, 5)
        clock.advance(30)
        succeed(breaker)
        assert CircuitState.HALF_OPEN == breaker.state
        succeed(breaker)
        assert CircuitState.CLOSED == breaker.state
        assert 0 == breaker.snapshot().calls
        fail(breaker, 4)
        assert CircuitState.CLOSED == breaker.state

    def test_a_failing_probe_reopens_it_for_another_period(self, clock):
        """One failed probe opens the circuit again for open_duration."""
        breaker = breaker_for(clock, half_open_probes=3, open_duration=10.0)
        fail(breaker, 5)
        clock.advance(10)
        succeed(breaker)
        breaker.acquire()
        breaker.record_failure(0.01)
        assert CircuitState.OPEN == breaker.state
        with pytest.raises(CircuitOpenError) as raised:
            breaker.acquire()
        assert 10.0 == pytest.approx(raised.value.retry_after)

    def test_a_slow_probe_reopens_it(self, clock):
        """A probe slower than slow_call_threshold is a failed probe."""
        breaker = breaker_for(clock, slow_call_threshold=1.0)
        fail(breaker, 5)
        clock.advance(30)
        breaker.acquire()
        breaker.record_success(2.0)
        assert CircuitState.OPEN == breaker.state

    def test_an_ignored_probe_gives_its_place_back(self, clock):
        """A probe ending in an error that is not the dependency's lets another probe in."""
        breaker = breaker_for(clock, half_open_probes=1)
        fail(breaker, 5)
        clock.advance(30)
        breaker.acquire()
        breaker.record_ignored()
        assert CircuitState.HALF_OPEN == breaker.state
        succeed(breaker)
        assert CircuitState.CLOSED == breaker.state

    def test_results_of_calls_admitted_before_opening_are_not_counted(self, clock):
        """Results arriving while open change nothing: not the state, not the next probe."""
        breaker = breaker_for(clock)
        breaker.acquire()  # a slow call in flight while the circuit opens
        fail(breaker, 5)
        next_probe = breaker.snapshot().next_probe
        breaker.record_success(0.01)
        breaker.record_failure(0.01)
        breaker.record_ignored()
        assert CircuitState.OPEN == breaker.state
        assert next_probe == breaker.snapshot().next_probe

    async def test_concurrent_callers_never_exceed_the_probes(self, clock):
        """Under 200 concurrent callers, at most half_open_probes calls run while half-open."""
        breaker = breaker_for(clock, half_open_probes=3)
        fail(breaker, 5)
        clock.advance(30)
        running = 0
        most = 0
        admitted = 0
        release = asyncio.Event()

        async def call() -> None:
            nonlocal running, most, admitted
            try:
                breaker.acquire()
            except CircuitOpenError:
                return
            admitted += 1
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1
            breaker.record_success(0.01)

        tasks = [asyncio.create_task(call()) for _ in range(200)]
        await asyncio.sleep(0)
        release.set()
        await asyncio.gather(*tasks)
        assert 3 == most == admitted
        assert CircuitState.CLOSED == breaker.state


class TestSnapshot:
    def test_failure_rate_is_unknown_until_minimum_calls(self, clock):
        """The failure rate is None until the window holds minimum_calls calls."""
        breaker = breaker_for(clock, minimum_calls=4, consecutive_failures=0)
        succeed(breaker, 2)
        fail(breaker)
        assert CircuitSnapshot(breaker.name, CircuitState.CLOSED, None, 3, clock.wall(), None) == (
            breaker.snapshot()
        )
        succeed(breaker)
        assert 0.25 == breaker.snapshot().failure_rate

    def test_open_circuit_reports_since_and_next_probe_in_epoch_seconds(self, clock):
        """An open circuit says when it opened and when it admits probes (wall-clock time)."""
        breaker = breaker_for(clock, open_duration=30.0)
        clock.advance(7)
        fail(breaker, 5)
        opened = clock.wall()
        clock.advance(10)
        snapshot = breaker.snapshot()
        assert CircuitState.OPEN == snapshot.state
        assert pytest.approx((opened, opened + 30.0)) == (snapshot.since, snapshot.next_probe)

    def test_reads_half_open_once_the_period_passed(self, clock):
        """Reading the state after the open period shows half-open, with no next probe."""
        breaker = breaker_for(clock)
        fail(breaker, 5)
        clock.advance(31)
        snapshot = breaker.snapshot()
        assert (CircuitState.HALF_OPEN, None) == (snapshot.state, snapshot.next_probe)


class TestTransitionsAreObservable:
    def test_every_transition_is_counted_and_shown(self, clock):
        """Each transition counts in bastion_circuit_transitions_total and moves the state gauge."""
        breaker = breaker_for(clock)
        name = breaker.name
        states = [state.value for state in CircuitState]
        assert [1.0, 0.0, 0.0] == [sample("bastion_circuit_state", name, s) for s in states]
        fail(breaker, 5)
        assert [0.0, 1.0, 0.0] == [sample("bastion_circuit_state", name, s) for s in states]
        clock.advance(30)
        succeed(breaker)
        assert [1.0, 0.0, 0.0] == [sample("bastion_circuit_state", name, s) for s in states]
        counted = [sample("bastion_circuit_transitions_total", name, s) for s in states]
        assert [1.0, 1.0, 1.0] == counted

    def test_opening_warns_with_the_counts_and_closing_informs(self, clock):
        """Opening is a warning carrying the rule and counts; closing and half-open are info."""
        breaker = breaker_for(clock, consecutive_failures=0, minimum_calls=4, window_size=4)
        with capture_logs() as logs:
            succeed(breaker)
            fail(breaker, 3)
            clock.advance(30)
            succeed(breaker)
        events = [(log["log_level"], log["event"]) for log in logs]
        assert [
            ("warning", "circuit opened"),
            ("info", "circuit half-open"),
            ("info", "circuit closed"),
        ] == events
        opened = logs[0]
        assert (breaker.name, "failure rate", 0.75, 4, 3) == (
            opened["circuit"],
            opened["reason"],
            opened["failure_rate"],
            opened["calls"],
            opened["failures"],
        )

    def test_listeners_hear_of_opening_and_closing_only(self, clock):
        """Listeners get a snapshot on opening and closing, not on half-open."""
        breaker = breaker_for(clock)
        heard: list[CircuitSnapshot] = []
        breaker.add_listener(heard.append)
        fail(breaker, 5)
        opened = clock.wall()
        clock.advance(30)
        succeed(breaker)
        assert [CircuitState.OPEN, CircuitState.CLOSED] == [s.state for s in heard]
        assert pytest.approx((opened, opened + 30)) == (heard[0].since, heard[0].next_probe)
        assert pytest.approx(clock.wall()) == heard[1].since
        assert heard[1].next_probe is None

    def test_a_failing_listener_does_not_fail_the_call(self, clock):
        """A listener that raises is logged; the transition and the caller are unaffected."""
        breaker = breaker_for(clock)

        def broken(snapshot: CircuitSnapshot) -> None:
            raise RuntimeError("listener bug")

        breaker.add_listener(broken)
        with capture_logs() as logs:
            fail(breaker, 5)
        assert CircuitState.OPEN == breaker.state
        assert "circuit listener failed" in [log["event"] for log in logs]


class TestRemoteTransitions:
    def test_remote_open_opens_until_the_remote_deadline(self, clock):
        """A later remote OPEN opens the breaker until the remote's open_until, silently."""
        breaker = breaker_for(clock)
        heard: list[CircuitSnapshot] = []
        breaker.add_listener(heard.append)
        assert breaker.apply_remote(CircuitState.OPEN, clock.wall() + 1, clock.wall() + 20)
        with pytest.raises(CircuitOpenError) as raised:
            breaker.acquire()
        assert 20.0 == pytest.approx(raised.value.retry_after)
        assert [] == heard
        assert 1.0 == sample("bastion_circuit_state", breaker.name, "open")

    def test_older_or_expired_remote_transitions_are_ignored(self, clock):
        """A remote transition older than the local one, or an OPEN already over, is ignored."""
        breaker = breaker_for(clock)
        clock.advance(5)
        fail(breaker, 5)
        assert not breaker.apply_remote(CircuitState.CLOSED, clock.wall() - 1, None)
        assert CircuitState.OPEN == breaker.state
        closed = breaker_for(clock)
        assert not closed.apply_remote(CircuitState.OPEN, clock.wall() + 1, clock.wall() - 1)
        assert CircuitState.CLOSED == closed.state

    def test_remote_close_closes_with_a_fresh_window(self, clock):
        """A later remote CLOSED closes an open breaker and forgets its failures."""
        breaker = breaker_for(clock)
        fail(breaker, 5)
        assert breaker.apply_remote(CircuitState.CLOSED, clock.wall() + 1, None)
        assert CircuitState.CLOSED == breaker.state
        assert 0 == breaker.snapshot().calls
        assert not breaker.apply_remote(CircuitState.CLOSED, clock.wall() + 1, None)

    def test_local_transitions_after_a_remote_one_stay_ordered(self, clock):
        """A transition made locally after applying a remote one is later than it."""
        breaker = breaker_for(clock)
        future = clock.wall() + 60  # the other instance's clock is ahead
        assert breaker.apply_remote(CircuitState.CLOSED, future, None)
        fail(breaker, 5)
        assert breaker.snapshot().since > future

    def test_remote_records_that_are_not_transitions_are_ignored(self, clock):
        """Only OPEN with an end, or CLOSED, can come from another instance."""
        breaker = breaker_for(clock)
        assert not breaker.apply_remote(CircuitState.HALF_OPEN, clock.wall() + 1, None)
        assert not breaker.apply_remote(CircuitState.OPEN, clock.wall() + 1, None)
        assert CircuitState.CLOSED == breaker.state


class TestValidation:
    @pytest.mark.parametrize(
        ("setting", "value"),
        [
            ("failure_rate_threshold", 1.5),
            ("window", "sliding"),
            ("window_size", 0),
            ("minimum_calls", 0),
            ("consecutive_failures", -1),
            ("open_duration", -1.0),
            ("half_open_probes", 0),
            ("slow_call_threshold", -0.5),
        ],
    )
    def test_each_impossible_setting_is_refused(self, clock, setting, value):
        """A policy built by hand with an impossible breaker setting is refused, naming it."""
        with pytest.raises(ValueError, match=f"{setting}="):
            breaker_for(clock, **{setting: value})

    def test_out_of_range_settings_are_named(self, clock):
        """A policy with impossible breaker settings is refused, naming each setting."""
        with pytest.raises(ValueError, match="half_open_probes=0") as raised:
            breaker_for(clock, half_open_probes=0, failure_rate_threshold=0.0)
        assert "failure_rate_threshold=0.0" in str(raised.value)

    def test_a_name_is_required(self, clock):
        """A circuit without a name is refused."""
        with pytest.raises(ValueError, match="name"):
            CircuitBreaker("", default_policy("x", "http"))
