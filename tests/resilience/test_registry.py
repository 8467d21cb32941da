"""The registry: dependencies, kinds and circuits, /health/circuits, readiness, lookups."""

from __future__ import annotations

import dataclasses
from datetime import datetime

import orjson
import pytest
from starlette.requests import Request

from bastion.errors import ConfigurationError
from bastion.resilience import (
    CircuitOpenError,
    CircuitState,
    DependencyError,
    Resilience,
    current_resilience,
    pipeline,
    resilient,
    use_resilience,
)
from bastion.resilience._registry import CriticalCircuitOpen
from bastion.settings import ResilienceSettings

EPOCH = 1_800_000_000.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def wall(self) -> float:
        return EPOCH + self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(autouse=True)
def _no_current_registry():
    """Each test starts and ends without a current registry."""
    use_resilience(None)
    yield
    use_resilience(None)


def registry(clock: FakeClock | None = None, **dependencies) -> Resilience:
    settings = ResilienceSettings(dependencies=dependencies)
    if clock is None:
        return Resilience(settings)
    return Resilience(settings, clock=clock, wall=clock.wall)


def open_circuit(resilience: Resilience, circuit: str) -> None:
    breaker = resilience.breaker(circuit)
    while breaker.state is CircuitState.CLOSED:
        breaker.acquire()
        breaker.record_failure(0.01)


async def circuits_body(resilience: Resilience) -> tuple[int, str, dict]:
    response = await resilience.circuits_endpoint(Request({"type": "http", "method": "GET"}))
    return response.status_code, response.headers["content-type"], orjson.loads(response.body)


class TestRegistration:
    def test_dependencies_in_the_settings_are_registered_at_construction(self):
        """Every dependency named in the settings has a closed circuit before any call."""
        resilience = registry(llm={"kind": "http"}, search={})
        assert [("llm", CircuitState.CLOSED, 0), ("search", CircuitState.CLOSED, 0)] == [
            (snapshot.name, snapshot.state, snapshot.calls) for snapshot in resilience.snapshots()
        ]

    def test_registering_twice_gives_the_same_pipeline(self):
        """register() is idempotent; pipeline() returns what register() made."""
        resilience = registry()
        first = resilience.register("payments", "http")
        assert first is resilience.register("payments", "http")
        assert first is resilience.register("payments")
        assert first is resilience.pipeline("payments")

    def test_the_kind_decides_the_defaults(self):
        """A dependency gets its class's defaults: database 10 s a try, 30 s total, 3 retries."""
        resilience = registry()
        database = resilience.register("database", "database").policy
        request_redis = resilience.register("redis_request", "redis_request").policy
        assert ("database", 10.0, 30.0, 3) == (
            database.kind,
            database.timeout,
            database.total_timeout,
            database.retries,
        )
        assert (0.1, 0, "redis") == (
            request_redis.timeout,
            request_redis.retries,
            request_redis.circuit,
        )

    def test_settings_override_the_kind_and_its_defaults(self):
        """The settings' fields, and their kind, win over the code's."""
        resilience = registry(llm={"kind": "http", "timeout": 2.5})
        policy = resilience.register("llm", "custom").policy
        assert ("http", 2.5, 30.0) == (policy.kind, policy.timeout, policy.total_timeout)

    def test_a_settings_entry_without_kind_takes_the_registered_one(self):
        """A configured dependency without a kind takes the kind the code gives; same circuit."""
        resilience = registry(database={"timeout": 5})
        breaker = resilience.breaker("database")
        assert "custom" == resilience.pipeline("database").policy.kind
        policy = resilience.register("database", "database").policy
        assert ("database", 5.0, 30.0) == (policy.kind, policy.timeout, policy.total_timeout)
        assert breaker is resilience.breaker("database")
        assert breaker is resilience.pipeline("database").breaker

    def test_a_circuit_no_pipeline_uses_any_more_is_dropped(self):
        """Given its kind, redis_request moves to the `redis` circuit; its own one goes."""
        resilience = registry(redis_request={})
        assert ["redis_request"] == [snapshot.name for snapshot in resilience.snapshots()]
        resilience.register("redis_request", "redis_request")
        assert ["redis"] == [snapshot.name for snapshot in resilience.snapshots()]

    def test_conflicting_kinds_are_refused(self):
        """A dependency registered with one kind cannot be registered with another."""
        resilience = registry()
        resilience.register("payments", "http")
        with pytest.raises(ConfigurationError, match=r"payments.*'http'.*resilience.dependencies"):
            resilience.register("payments", "database")

    def test_first_use_registers_a_custom_dependency(self):
        """pipeline() of an unknown name registers it with the custom defaults."""
        resilience = registry()
        assert "custom" == resilience.pipeline("geo").policy.kind
        assert ["geo"] == [snapshot.name for snapshot in resilience.snapshots()]

    @pytest.mark.parametrize("name", ["", "a b", "x" * 101, "naïve", "a/b"])
    def test_invalid_names_are_refused(self, name):
        """Names end up in metric labels and Redis fields: letters, digits and _.:- only."""
        with pytest.raises(ValueError, match="invalid dependency name"):
            registry().register(name)

    def test_invalid_names_in_the_settings_are_a_configuration_error(self):
        """A bad name under resilience.dependencies fails at construction, naming the section."""
        with pytest.raises(ConfigurationError, match=r"resilience\.dependencies"):
            registry(**{"bad name": {}})

    def test_unknown_kinds_are_refused(self):
        """A kind that is not a dependency class is refused, listing the classes."""
        with pytest.raises(ValueError, match="unknown dependency kind 'mainframe'"):
            registry().register("x", "mainframe")


class TestCircuits:
    def test_pipelines_naming_one_circuit_share_its_breaker(self):
        """redis and redis_request report to the one circuit `redis`."""
        resilience = registry()
        background = resilience.register("redis", "redis")
        request_path = resilience.register("redis_request", "redis_request")
        assert background.breaker is request_path.breaker is resilience.breaker("redis")
        assert ["redis"] == [snapshot.name for snapshot in resilience.snapshots()]

    def test_the_circuit_takes_the_settings_of_its_own_dependency(self, clock):
        """A shared circuit takes the settings of the dependency named like it."""
        resilience = registry(
            clock,
            redis_request={"kind": "redis_request"},
            redis={"kind": "redis", "consecutive_failures": 2},
        )
        open_circuit(resilience, "redis")
        assert 2 == resilience.breaker("redis").snapshot().calls

    def test_an_empty_circuit_name_means_no_breaker(self):
        """circuit = "" switches the breaker off: no circuit is listed for it."""
        resilience = registry(audit_sink={"circuit": ""})
        assert resilience.pipeline("audit_sink").breaker is None
        assert [] == resilience.snapshots()

    def test_a_breaker_left_out_of_the_order_is_not_listed(self):
        """An order without circuit_breaker has no circuit to show."""
        resilience = registry(cache={"order": ["timeout"]})
        assert resilience.pipeline("cache").breaker is None
        assert [] == resilience.snapshots()

    def test_an_unknown_circuit_is_a_key_error(self):
        """breaker() of a circuit nobody uses says so."""
        with pytest.raises(KeyError, match="no circuit named 'nope'"):
            registry().breaker("nope")


class TestCircuitsEndpoint:
    async def test_lists_every_circuit_sorted_with_its_state(self, clock):
        """GET /health/circuits: name, state, failure rate, calls, since, next probe (RFC 3339)."""
        resilience = registry(clock, search={}, llm={"kind": "http"})
        open_circuit(resilience, "llm")
        status, content_type, body = await circuits_body(resilience)
        assert (200, "application/json") == (status, content_type)
        llm, search = body["circuits"]
        assert ("llm", "open", None, 5) == (
            llm["name"],
            llm["state"],
            llm["failure_rate"],
            llm["calls"],
        )
        assert llm["since"].endswith("Z")
        assert 30.0 == pytest.approx(
            (
                datetime.fromisoformat(llm["next_probe"]) - datetime.fromisoformat(llm["since"])
            ).total_seconds(),
            abs=0.01,
        )
        assert {
            "name": "search",
            "state": "closed",
            "failure_rate": None,
            "calls": 0,
            "since": "2027-01-15T08:16:40.000Z",
            "next_probe": None,
        } == search

    async def test_failure_rate_once_minimum_calls_seen(self, clock):
        """The failure rate appears once the window holds minimum_calls calls."""
        resilience = registry(clock, search={"minimum_calls": 2, "failure_rate_threshold": 0.9})
        breaker = resilience.breaker("search")
        for record in (breaker.record_success, breaker.record_failure, breaker.record_success):
            breaker.acquire()
            record(0.01)
        _, _, body = await circuits_body(resilience)
        assert 0.3333 == body["circuits"][0]["failure_rate"]


class TestReadiness:
    async def test_an_open_critical_circuit_fails_readiness(self, clock):
        """Readiness fails, naming the circuit, while a critical dependency's circuit is open."""
        resilience = registry(clock, database={"kind": "database", "critical": True})
        await resilience.readiness_check()
        open_circuit(resilience, "database")
        with pytest.raises(CriticalCircuitOpen, match="circuit open: database"):
            await resilience.readiness_check()

    async def test_non_critical_circuits_do_not_fail_readiness(self, clock):
        """An open circuit of a dependency not marked critical leaves readiness alone."""
        resilience = registry(clock, llm={"kind": "http"})
        open_circuit(resilience, "llm")
        await resilience.readiness_check()

    async def test_readiness_passes_again_once_probes_are_admitted(self, clock):
        """After the open period the circuit reads half-open: the instance gets probe traffic."""
        resilience = registry(clock, database={"critical": True, "open_duration": 5})
        open_circuit(resilience, "database")
        clock.now += 5
        await resilience.readiness_check()


class TestCurrentRegistry:
    def test_without_a_registry_the_error_names_install(self):
        """Looking up a pipeline before install() says how to get a registry."""
        with pytest.raises(RuntimeError, match=r"bastion.install\(app\)"):
            current_resilience()
        with pytest.raises(RuntimeError, match="use_resilience"):
            pipeline("llm")

    def test_pipeline_uses_the_current_registry(self):
        """pipeline(name) is the current registry's pipeline for name."""
        resilience = registry()
        use_resilience(resilience)
        assert resilience.pipeline("llm") is pipeline("llm")


class TestResilientDecorator:
    async def test_can_be_applied_before_install(self):
        """@resilient at import time resolves the pipeline at the first call."""
        calls = 0

        @resilient("payments")
        async def charge(amount: int) -> str:
            """Charge an amount."""
            nonlocal calls
            calls += 1
            raise ConnectionError("refused")

        resilience = registry(payments={"retries": 0, "consecutive_failures": 2})
        use_resilience(resilience)
        for _ in range(2):
            with pytest.raises(DependencyError):
                await charge(10)
        with pytest.raises(CircuitOpenError):
            await charge(10)
        assert 2 == calls
        assert ("charge", "Charge an amount.") == (charge.__name__, charge.__doc__)

    async def test_fallback_answers_for_the_dependency(self):
        """The fallback gets the failure and its result is returned."""

        async def cached(exc: BaseException) -> str:
            return f"cached after {type(exc).__name__}"

        @resilient("quotes", fallback=cached)
        async def quote() -> str:
            raise ConnectionError("refused")

        use_resilience(registry(quotes={"retries": 0}))
        assert "cached after DependencyError" == await quote()

    async def test_follows_the_current_registry(self):
        """A new current registry (a new app) is used from the next call on."""

        @resilient("search")
        async def search() -> str:
            return "found"

        first, second = registry(), registry()
        use_resilience(first)
        assert "found" == await search()
        use_resilience(second)
        assert "found" == await search()
        assert (1, 1) == (
            first.breaker("search").snapshot().calls,
            second.breaker("search").snapshot().calls,
        )

    def test_only_coroutine_functions(self):
        """Decorating a plain function is refused at decoration time."""
        with pytest.raises(TypeError, match="coroutine functions"):
            resilient("x")(lambda: None)

    def test_invalid_names_fail_at_decoration(self):
        """A bad name fails where the decorator is applied, not at the first call."""
        with pytest.raises(ValueError, match="invalid dependency name"):
            resilient("not a name")


def test_the_policy_is_frozen():
    """A registered pipeline's policy cannot be changed behind the registry's back."""
    policy = registry().register("x", "http").policy
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.timeout = 1.0  # type: ignore[misc]
