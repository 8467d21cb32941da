"""What install() wires for resilience: the registry, /health/circuits, readiness, the stores."""

from __future__ import annotations

import json

import pytest
from fastapi import FastAPI

import bastion
from bastion.errors import ConfigurationError
from bastion.resilience import CircuitState, current_resilience
from bastion.testing import lifespan_client


def make_app(sqlite_url: str, **overrides) -> tuple[FastAPI, bastion.Bastion]:
    app = FastAPI()
    overrides.setdefault("database", {"url": sqlite_url})
    runtime = bastion.install(app, logging={"level": "WARNING"}, **overrides)
    return app, runtime


def trip(runtime: bastion.Bastion, circuit: str) -> None:
    """Open ``circuit`` the way failed calls do."""
    breaker = runtime.resilience.breaker(circuit)
    while breaker.state is not CircuitState.OPEN:
        breaker.acquire()
        breaker.record_failure(0.01)


class TestCircuitsEndpoint:
    async def test_lists_the_database_from_the_first_request(self, sqlite_url):
        """Before any call, /health/circuits lists the database circuit, closed."""
        app, _ = make_app(sqlite_url)
        async with lifespan_client(app) as client:
            response = await client.get("/health/circuits")
        assert 200 == response.status_code
        assert "no-store" == response.headers["cache-control"]
        [database] = response.json()["circuits"]
        assert {"name": "database", "state": "closed", "next_probe": None} == {
            key: database[key] for key in ("name", "state", "next_probe")
        }
        assert database["since"].endswith("Z")

    async def test_lists_redis_when_configured(self, sqlite_url, redis_url, redis_prefix):
        """With Redis configured its circuit is listed too (redis_request shares it)."""
        app, runtime = make_app(sqlite_url, redis={"url": redis_url, "key_prefix": redis_prefix})
        async with lifespan_client(app) as client:
            body = (await client.get("/health/circuits")).json()
        assert ["database", "redis"] == [circuit["name"] for circuit in body["circuits"]]
        assert runtime.resilience.shared
        assert "redis" == runtime.resilience.pipeline("redis_request").policy.circuit

    async def test_shows_an_open_circuit(self, sqlite_url):
        """An open circuit is shown open, with the time of its next probe."""
        app, runtime = make_app(
            sqlite_url, resilience={"dependencies": {"payments": {"open_duration": 30}}}
        )
        async with lifespan_client(app) as client:
            trip(runtime, "payments")
            body = (await client.get("/health/circuits")).json()
        payments = next(c for c in body["circuits"] if c["name"] == "payments")
        assert "open" == payments["state"]
        assert payments["next_probe"] is not None

    async def test_answered_before_the_app_routes(self, sqlite_url):
        """A catch-all route of the app does not shadow the endpoint."""
        app, _ = make_app(sqlite_url)

        @app.get("/{path:path}")
        async def everything(path: str) -> dict[str, str]:
            return {"path": path}

        async with lifespan_client(app) as client:
            assert "circuits" in (await client.get("/health/circuits")).json()

    async def test_follows_the_health_access_policy(self, sqlite_url):
        """With a health token, the endpoint needs it, like the other probes."""
        app, _ = make_app(sqlite_url, health={"token": "probe-token-123"})
        async with lifespan_client(app) as client:
            refused = await client.get("/health/circuits")
            admitted = await client.get(
                "/health/circuits", headers={"Authorization": "Bearer probe-token-123"}
            )
        assert 403 == refused.status_code
        assert "FORBIDDEN" == refused.json()["code"]
        assert 200 == admitted.status_code

    async def test_under_the_health_prefix_and_out_of_the_info_log(self, sqlite_url, capsysbinary):
        """Mounted under health.path_prefix; no info-level access line, unlike app routes."""
        app = FastAPI()
        bastion.install(
            app,
            database={"url": sqlite_url},
            health={"path_prefix": "/_status"},
            logging={"level": "INFO", "format": "json"},
        )

        @app.get("/items")
        async def items() -> dict[str, str]:
            return {}

        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/_status/circuits")).status_code
            assert 200 == (await client.get("/items")).status_code
        lines = [json.loads(line) for line in capsysbinary.readouterr().out.splitlines()]
        routes = [line["route"] for line in lines if line["logger"] == "bastion.access"]
        assert ["/items"] == routes

    async def test_absent_when_resilience_is_off(self, sqlite_url):
        """resilience.enabled=false: no registry, no route, no deadline on requests."""
        app, runtime = make_app(sqlite_url, resilience={"enabled": False})
        async with lifespan_client(app) as client:
            response = await client.get("/health/circuits")
        assert 404 == response.status_code
        assert runtime.resilience is None
        assert runtime.database.pipeline is None


class TestReadiness:
    async def test_open_circuit_of_a_critical_dependency_fails_readiness(self, sqlite_url):
        """A dependency marked critical: its open circuit turns readiness to 503."""
        app, runtime = make_app(
            sqlite_url, resilience={"dependencies": {"database": {"critical": True}}}
        )
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/health/ready")).status_code
            trip(runtime, "database")
            response = await client.get("/health/ready")
        assert 503 == response.status_code
        circuits = response.json()["checks"]["circuits"]
        assert "fail" == circuits["status"]
        assert "database" in circuits["error"]

    async def test_no_check_unless_something_is_critical(self, sqlite_url):
        """By default an open circuit is not a readiness failure: no check is registered."""
        app, runtime = make_app(sqlite_url)
        async with lifespan_client(app) as client:
            trip(runtime, "database")
            response = await client.get("/health/ready")
        assert "circuits" not in response.json()["checks"]


class TestRegistry:
    async def test_current_while_the_app_runs(self, sqlite_url):
        """The app's registry is current from start-up to shutdown."""
        app, runtime = make_app(sqlite_url)
        async with lifespan_client(app):
            assert runtime.resilience is current_resilience()
        with pytest.raises(RuntimeError, match="install"):
            current_resilience()

    async def test_database_connects_through_its_pipeline(self, sqlite_url):
        """The database's new connections go through the registry's database pipeline."""
        _, runtime = make_app(sqlite_url)
        pipeline = runtime.resilience.pipeline("database")
        assert pipeline is runtime.database.pipeline
        assert "database" == pipeline.policy.kind

    async def test_dependencies_in_settings_are_registered(self, sqlite_url):
        """Every dependency the settings name is a circuit before the app makes a call."""
        app, _ = make_app(sqlite_url, resilience={"dependencies": {"llm": {"kind": "http"}}})
        async with lifespan_client(app) as client:
            body = (await client.get("/health/circuits")).json()
        assert ["database", "llm"] == [circuit["name"] for circuit in body["circuits"]]


class TestStore:
    async def test_shared_redis_by_default(self, sqlite_url, redis_url, redis_prefix):
        """No store_url and redis.url set: circuits are shared through the app's Redis."""
        _, runtime = make_app(sqlite_url, redis={"url": redis_url, "key_prefix": redis_prefix})
        assert runtime.resilience.shared

    async def test_memory_store_keeps_circuits_local(self, sqlite_url, redis_url, redis_prefix):
        """store_url=memory:// keeps circuits per process even with Redis configured."""
        _, runtime = make_app(
            sqlite_url,
            redis={"url": redis_url, "key_prefix": redis_prefix},
            resilience={"store_url": "memory://"},
        )
        assert not runtime.resilience.shared

    async def test_own_redis_store(self, sqlite_url, redis_url, redis_prefix):
        """An explicit Redis store_url gets a client of its own, closed at shutdown."""
        app, runtime = make_app(
            sqlite_url,
            redis={"key_prefix": redis_prefix},
            resilience={"store_url": redis_url},
        )
        assert runtime.resilience.shared
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/health/circuits")).status_code

    def test_other_store_is_refused(self, sqlite_url):
        """A store that cannot hold circuits is a configuration error naming the setting."""
        with pytest.raises(ConfigurationError, match=r"resilience\.store_url"):
            make_app(sqlite_url, resilience={"store_url": "nats://127.0.0.1:4222"})
