"""Degradation: an outage of a non-critical dependency is logged and counted once, not per call."""

from __future__ import annotations

import gc
import uuid

import pytest
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.resilience import Degradation
from bastion.resilience._degraded import SETTLE


@pytest.fixture
def dependency() -> str:
    """A dependency name of this test's own: outages are process-wide per name."""
    return f"dep-{uuid.uuid4().hex[:8]}"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def outages(dependency: str) -> float:
    return REGISTRY.get_sample_value("bastion_dependency_outages_total", {"dependency": dependency})


def degraded_gauge(dependency: str) -> float:
    return REGISTRY.get_sample_value("bastion_dependency_degraded", {"dependency": dependency})


class TestDegradation:
    def test_an_outage_is_logged_and_counted_once(self, dependency):
        """A thousand failures in a row make one warning, one outage, and the gauge at 1."""
        degradation = Degradation(dependency, feature="cache")
        with capture_logs() as logs:
            for _ in range(1000):
                degradation.failed(ConnectionError("refused"))
        assert degradation.degraded
        assert [("warning", "dependency unavailable: running degraded")] == [
            (log["log_level"], log["event"]) for log in logs
        ]
        assert (dependency, "cache", "ConnectionError") == (
            logs[0]["dependency"],
            logs[0]["feature"],
            logs[0]["error"],
        )
        assert (1.0, 1.0) == (outages(dependency), degraded_gauge(dependency))

    def test_recovery_is_logged_once_and_clears_the_gauge(self, dependency, clock):
        """The first success a settle period after the last failure logs once, clears the gauge."""
        degradation = Degradation(dependency, clock=clock)
        degradation.failed(TimeoutError())
        clock.now += SETTLE
        with capture_logs() as logs:
            for _ in range(1000):
                degradation.recovered()
        assert not degradation.degraded
        assert ["dependency available again"] == [log["event"] for log in logs]
        assert (1.0, 0.0) == (outages(dependency), degraded_gauge(dependency))

    def test_each_outage_counts(self, dependency, clock):
        """A second outage after a recovery is counted again."""
        degradation = Degradation(dependency, clock=clock)
        for _ in range(3):
            degradation.failed(OSError())
            clock.now += SETTLE
            degradation.recovered()
        assert 3.0 == outages(dependency)

    def test_a_failure_soon_after_a_success_is_the_same_outage(self, dependency, clock):
        """Successes and failures alternating right after a dependency comes back (pooled
        connections from before the outage failing one by one) make one outage, which ends on
        the first success a settle period after the last failure."""
        degradation = Degradation(dependency, clock=clock)
        with capture_logs() as logs:
            degradation.failed(ConnectionError())
            for _ in range(5):
                clock.now += SETTLE / 4
                degradation.recovered()
                clock.now += SETTLE / 4
                degradation.failed(ConnectionResetError())
            clock.now += SETTLE / 2
            degradation.recovered()
            assert degradation.degraded
            clock.now += SETTLE / 2
            degradation.recovered()
        assert not degradation.degraded
        assert [
            "dependency unavailable: running degraded",
            "dependency available again",
        ] == [log["event"] for log in logs]
        assert (1.0, 0.0) == (outages(dependency), degraded_gauge(dependency))

    def test_a_stopped_feature_leaves_the_outage_without_claiming_recovery(self, dependency):
        """forget(): no recovery line, the gauge back at 0, and the next outage counted."""
        degradation = Degradation(dependency)
        degradation.failed(ConnectionError())
        with capture_logs() as logs:
            degradation.forget()
        assert ([], 0.0) == (logs, degraded_gauge(dependency))
        Degradation(dependency).failed(ConnectionError())
        assert 2.0 == outages(dependency)

    def test_successes_outside_an_outage_log_nothing(self, dependency):
        """Reporting successes while healthy is silent."""
        degradation = Degradation(dependency)
        with capture_logs() as logs:
            degradation.recovered()
        assert [] == logs
        assert not degradation.degraded

    def test_the_error_text_is_never_logged(self, dependency):
        """Only the error's class is logged: its text may carry addresses or secrets."""
        degradation = Degradation(dependency)
        with capture_logs() as logs:
            degradation.failed(ConnectionError("redis://:s3cret@10.0.0.7:6379 refused"))
        assert "s3cret" not in repr(logs)
        assert "10.0.0.7" not in repr(logs)


class TestSharedOutage:
    def test_features_of_one_dependency_count_one_outage(self, dependency):
        """Two features seeing the same dependency fail count one outage between them."""
        limits = Degradation(dependency, feature="rate limits")
        flags = Degradation(dependency, feature="flags")
        limits.failed(ConnectionError())
        flags.failed(ConnectionError())
        assert 1.0 == outages(dependency)

    def test_the_outage_ends_when_every_feature_recovered(self, dependency, clock):
        """The gauge stays at 1 while any feature still runs degraded."""
        limits = Degradation(dependency, feature="rate limits", clock=clock)
        flags = Degradation(dependency, feature="flags", clock=clock)
        limits.failed(ConnectionError())
        flags.failed(ConnectionError())
        clock.now += SETTLE
        limits.recovered()
        assert 1.0 == degraded_gauge(dependency)
        flags.recovered()
        assert 0.0 == degraded_gauge(dependency)

    def test_a_dropped_feature_does_not_hold_the_outage_open(self, dependency):
        """A degraded feature that was garbage-collected does not hide the next outage."""
        Degradation(dependency).failed(ConnectionError())
        gc.collect()
        Degradation(dependency).failed(ConnectionError())
        assert 2.0 == outages(dependency)

    def test_a_name_is_required(self):
        """A degradation without a dependency name is refused."""
        with pytest.raises(ValueError, match="name"):
            Degradation("")
