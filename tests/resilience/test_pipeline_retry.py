"""Retries in the pipeline: what is retried, backoff, Retry-After, budget, sharing, PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import socket
import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bastion.resilience import (
    CircuitBreaker,
    DependencyError,
    Pipeline,
    Policy,
    default_policy,
)


class Naps:
    """An injected sleep: records each backoff, returns at once."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


class Failing:
    """Fails ``failures`` times with ``error``, then returns ``"ok"``; counts attempts."""

    def __init__(self, error: type[BaseException], failures: int = 1_000) -> None:
        self.error = error
        self.failures = failures
        self.calls = 0

    async def __call__(self) -> str:
        self.calls += 1
        await asyncio.sleep(0)
        if self.calls <= self.failures:
            raise self.error
        return "ok"


def policy(**changes: Any) -> Policy:
    """The custom class's defaults (no timeouts), fast backoff, a budget that never binds."""
    base = dataclasses.replace(
        default_policy("dep", "custom"),
        timeout=0.0,
        total_timeout=0.0,
        backoff_initial=0.001,
        backoff_max=0.01,
        retry_budget_ratio=0.0,
        retry_budget_min_per_second=0.0,
    )
    return dataclasses.replace(base, **changes)


def metric(name: str, dependency: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, {"dependency": dependency, **labels}) or 0.0


@pytest.fixture
def name() -> str:
    return f"dep-{uuid.uuid4().hex[:10]}"


class TestWhatIsRetried:
    async def test_transient_failures_are_retried(self, name):
        """A failure that clears is absorbed: the caller sees the answer; each retry is counted."""
        pipeline = Pipeline(name, policy(retries=3), breaker=None, sleep=Naps())
        callee = Failing(ConnectionResetError, failures=2)
        assert "ok" == await pipeline.call(callee)
        assert 3 == callee.calls
        assert 2 == metric("bastion_retries_total", name)
        assert 1 == metric("bastion_resilience_calls_total", name, outcome="success")

    async def test_unsafe_operations_are_not_retried_after_reaching_the_dependency(self, name):
        """A non-idempotent call that may have reached the dependency is tried once."""
        pipeline = Pipeline(name, policy(retries=3), breaker=None, sleep=Naps())
        callee = Failing(ConnectionResetError)
        with pytest.raises(DependencyError):
            await pipeline.with_options(idempotent=False).call(callee)
        assert 1 == callee.calls

    async def test_unsafe_operations_are_retried_when_never_sent(self, name):
        """A refused connection proves nothing was sent: safe to retry even a POST."""
        pipeline = Pipeline(name, policy(retries=3), breaker=None, sleep=Naps())
        callee = Failing(ConnectionRefusedError)
        with pytest.raises(DependencyError):
            await pipeline.with_options(idempotent=False).call(callee)
        assert 4 == callee.calls

    async def test_retry_unsafe_policy(self, name):
        """An operator may allow retrying unsafe operations for a dependency."""
        pipeline = Pipeline(name, policy(retries=2, retry_unsafe=True), breaker=None, sleep=Naps())
        callee = Failing(ConnectionResetError)
        with pytest.raises(DependencyError):
            await pipeline.with_options(idempotent=False).call(callee)
        assert 3 == callee.calls

    async def test_failed_results_are_retried_and_the_last_is_returned(self, name):
        """A result marked failed is retried; when none is left, the caller gets the last one."""
        breaker_policy = policy(retries=2, consecutive_failures=0)
        breaker = CircuitBreaker(name, breaker_policy)
        pipeline = Pipeline(name, breaker_policy, breaker=breaker, sleep=Naps())
        statuses = iter([503, 502, 500])

        async def request() -> int:
            return next(statuses)

        status = await pipeline.with_options(is_failure=lambda code: code >= 500).call(request)
        assert 500 == status
        assert 1 == metric("bastion_resilience_calls_total", name, outcome="failure")
        snapshot = breaker.snapshot()
        assert 3 == snapshot.calls

    async def test_a_result_that_recovers(self, name):
        """A failed result followed by a good one: the good one is returned as a success."""
        chosen = policy(retries=2)
        breaker = CircuitBreaker(name, chosen)
        pipeline = Pipeline(name, chosen, breaker=breaker, sleep=Naps())
        statuses = iter([503, 200])

        async def request() -> int:
            return next(statuses)

        assert 200 == await pipeline.with_options(is_failure=lambda code: code >= 500).call(request)
        assert 1 == metric("bastion_resilience_calls_total", name, outcome="success")
        assert 2 == breaker.snapshot().calls  # the failed result and the good one

    async def test_a_broken_is_failure_is_an_application_error(self, name):
        """is_failure raising is the caller's bug: it passes through; the circuit is not charged."""
        chosen = policy(retries=2)
        breaker = CircuitBreaker(name, chosen)
        pipeline = Pipeline(name, chosen, breaker=breaker, sleep=Naps())

        async def request() -> int:
            return 200

        with pytest.raises(ZeroDivisionError):
            await pipeline.with_options(is_failure=lambda code: code / 0).call(request)
        assert 0 == breaker.snapshot().calls


class TestBackoff:
    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        retries=st.integers(1, 6),
        initial=st.floats(0.0, 1.0),
        ceiling=st.floats(0.0, 3.0),
    )
    def test_every_wait_is_within_its_bound(self, retries, initial, ceiling):
        """Wait n is in [0, min(backoff_max, backoff_initial * 2**n)]; attempts = retries + 1."""
        naps = Naps()
        chosen = policy(retries=retries, backoff_initial=initial, backoff_max=ceiling)
        pipeline = Pipeline("backoff", chosen, breaker=None, sleep=naps)
        callee = Failing(ConnectionResetError)

        async def scenario() -> None:
            with pytest.raises(DependencyError):
                await pipeline.call(callee)

        asyncio.run(scenario())
        assert retries + 1 == callee.calls
        assert retries == len(naps.waits)
        for n, wait in enumerate(naps.waits):
            assert 0.0 <= wait <= min(ceiling, initial * 2**n) + 1e-12

    async def test_waits_are_jittered(self, name):
        """Full jitter: waits of concurrent callers differ, so they do not retry in step."""
        naps = Naps()
        chosen = policy(retries=1, backoff_initial=1.0, backoff_max=1.0)
        pipeline = Pipeline(name, chosen, breaker=None, sleep=naps)
        for _ in range(20):
            with pytest.raises(DependencyError):
                await pipeline.call(Failing(ConnectionResetError))
        assert len(set(naps.waits)) > 15


class TestRetryAfter:
    async def test_the_dependency_chooses_the_wait(self, name):
        """A Retry-After within backoff_max is waited instead of the backoff."""
        naps = Naps()
        pipeline = Pipeline(name, policy(retries=2, backoff_max=1.0), breaker=None, sleep=naps)
        statuses = iter([429, 429, 200])

        async def request() -> int:
            return next(statuses)

        options = pipeline.with_options(
            is_failure=lambda code: code in {429, 503}, retry_after=lambda _outcome: 0.25
        )
        assert 200 == await options.call(request)
        assert [0.25, 0.25] == naps.waits

    async def test_a_wait_longer_than_backoff_max_ends_the_call(self, name):
        """A dependency asking for more than backoff_max is not waited for: the call fails now."""
        naps = Naps()
        pipeline = Pipeline(name, policy(retries=3, backoff_max=1.0), breaker=None, sleep=naps)
        callee = Failing(ConnectionResetError)
        with pytest.raises(DependencyError):
            await pipeline.with_options(retry_after=lambda _exc: 30.0).call(callee)
        assert 1 == callee.calls
        assert [] == naps.waits

    async def test_a_wait_past_the_deadline_ends_the_call(self, name):
        """A Retry-After ending after the total deadline is not waited for."""
        naps = Naps()
        chosen = policy(retries=3, backoff_max=5.0, total_timeout=1.0)
        pipeline = Pipeline(name, chosen, breaker=None, sleep=naps)
        callee = Failing(ConnectionResetError)
        with pytest.raises(DependencyError):
            await pipeline.with_options(retry_after=lambda _exc: 2.0).call(callee)
        assert 1 == callee.calls

    async def test_no_hint_means_the_backoff(self, name):
        """When the dependency says nothing (None), the jittered backoff applies."""
        naps = Naps()
        chosen = policy(retries=2, backoff_initial=0.5, backoff_max=0.5)
        pipeline = Pipeline(name, chosen, breaker=None, sleep=naps)
        with pytest.raises(DependencyError):
            await pipeline.with_options(retry_after=lambda _exc: None).call(
                Failing(ConnectionResetError)
            )
        assert 2 == len(naps.waits)
        assert all(0 <= wait <= 0.5 for wait in naps.waits)


class TestBudget:
    async def test_budget_stops_a_retry_storm(self, name):
        """During an outage, retries stay within ratio x calls: the dependency is not hammered."""
        chosen = policy(retries=3, retry_budget_ratio=0.1, retry_budget_min_per_second=0.0)
        pipeline = Pipeline(name, chosen, breaker=None, sleep=Naps())
        attempts = 0
        for _ in range(100):
            callee = Failing(ConnectionResetError)
            with pytest.raises(DependencyError):
                await pipeline.call(callee)
            attempts += callee.calls
        retries = attempts - 100
        assert retries <= 0.1 * 100
        assert retries == metric("bastion_retries_total", name)
        # Every call ended wanting a retry the budget refused.
        assert 100 == metric("bastion_retry_budget_exhausted_total", name)


class TestSharing:
    async def test_one_pipeline_many_concurrent_calls(self, name):
        """200 concurrent calls through one pipeline each keep their own attempt count."""
        pipeline = Pipeline(name, policy(retries=3), breaker=None, sleep=Naps())
        callees = [Failing(ConnectionResetError, failures=n % 4) for n in range(200)]
        results = await asyncio.gather(*(pipeline.call(callee) for callee in callees))
        assert ["ok"] * 200 == results
        assert [n % 4 + 1 for n in range(200)] == [callee.calls for callee in callees]

    async def test_concurrent_failures_each_get_every_attempt(self, name):
        """Failing together, each of 200 calls makes exactly retries + 1 attempts."""
        pipeline = Pipeline(name, policy(retries=2), breaker=None, sleep=Naps())
        callees = [Failing(ConnectionResetError) for _ in range(200)]
        outcomes = await asyncio.gather(
            *(pipeline.call(callee) for callee in callees), return_exceptions=True
        )
        assert all(isinstance(outcome, DependencyError) for outcome in outcomes)
        assert [3] * 200 == [callee.calls for callee in callees]


class TestPostgres:
    async def test_database_down_ends_as_dependency_error(self, name):
        """PostgreSQL not there: retried, then a 502 chained to the refused connection."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        engine = create_async_engine(f"postgresql+asyncpg://postgres@127.0.0.1:{port}/x")
        chosen = dataclasses.replace(
            default_policy(name, "database"), backoff_initial=0.001, backoff_max=0.01
        )
        pipeline = Pipeline(name, chosen, breaker=CircuitBreaker(name, chosen))
        attempts = 0

        async def select_one() -> int:
            nonlocal attempts
            attempts += 1
            async with engine.connect() as connection:
                return int((await connection.execute(text("SELECT 1"))).scalar_one())

        try:
            with pytest.raises(DependencyError) as caught:
                await pipeline.call(select_one)
        finally:
            await engine.dispose()
        assert 4 == attempts
        assert isinstance(caught.value.__cause__, ConnectionRefusedError)
        assert 4 == pipeline.breaker.snapshot().calls

    async def test_database_up_answers(self, name, postgres_url):
        """The same pipeline around a live PostgreSQL returns the query's answer."""
        engine = create_async_engine(postgres_url)
        chosen = default_policy(name, "database")
        pipeline = Pipeline(name, chosen, breaker=CircuitBreaker(name, chosen))

        async def select_one() -> int:
            async with engine.connect() as connection:
                return int((await connection.execute(text("SELECT 41 + 1"))).scalar_one())

        try:
            assert 42 == await pipeline.call(select_one)
        finally:
            await engine.dispose()
