"""New database connections go through the database pipeline; pooled ones pay nothing."""

from __future__ import annotations

import asyncio
import secrets
import time

import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

import bastion
from bastion.data import Database
from bastion.resilience import CircuitOpenError, CircuitState, Resilience
from bastion.settings import DatabaseSettings, ResilienceSettings
from bastion.testing import FaultProxy, lifespan_client

# A circuit that opens after two failed connects and probes again half a second later.
QUICK = {
    "timeout": 1.0,
    "total_timeout": 2.0,
    "retries": 1,
    "backoff_initial": 0.01,
    "backoff_max": 0.02,
    "consecutive_failures": 2,
    "open_duration": 0.5,
}


def successes(name: str) -> float:
    labels = {"dependency": name, "outcome": "success"}
    return REGISTRY.get_sample_value("bastion_resilience_calls_total", labels) or 0.0


def guarded(url: str, **policy) -> tuple[Database, Resilience, str]:
    """A Database whose connections go through a pipeline of a name of its own."""
    name = f"db-{secrets.token_hex(3)}"
    resilience = Resilience(ResilienceSettings(dependencies={name: {**QUICK, **policy}}))
    pipeline = resilience.register(name, "database")
    settings = DatabaseSettings(url=url, pool_size=2, max_overflow=0, connect_timeout=1)
    return Database(settings, pipeline=pipeline), resilience, name


async def select_one(database: Database) -> int:
    async with database.session() as session:
        return (await session.execute(text("SELECT 1"))).scalar_one()


@pytest.fixture
def proxy(postgres_url):
    with FaultProxy(postgres_url, name="database-pipeline") as faults:
        yield faults


class TestConnections:
    async def test_pooled_connections_pay_nothing(self, database_url):
        """Forty sequential sessions open one connection: one pipeline call, not forty."""
        database, _, name = guarded(database_url)
        try:
            before = successes(name)
            for _ in range(40):
                assert 1 == await select_one(database)
            assert 1.0 == successes(name) - before
        finally:
            await database.aclose()

    async def test_each_new_connection_is_one_call(self, postgres_url):
        """Two connections in use at once: two pipeline calls."""
        database, _, name = guarded(postgres_url)
        try:
            before = successes(name)
            async with database.engine.connect() as first, database.engine.connect() as second:
                await first.execute(text("SELECT 1"))
                await second.execute(text("SELECT 1"))
            assert 2.0 == successes(name) - before
        finally:
            await database.aclose()

    async def test_refused_connects_are_retried_then_the_driver_error_surfaces(self, proxy):
        """A refused connect is retried, then raised as the driver's own error, as without."""
        database, resilience, name = guarded(
            proxy.url_for("postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"),
            consecutive_failures=0,
        )
        proxy.refuse()
        try:
            with pytest.raises(ConnectionRefusedError):  # as without a pipeline
                await select_one(database)
            # Each attempt passes the breaker: both were counted as failures.
            assert QUICK["retries"] + 1 == resilience.breaker(name).snapshot().calls
        finally:
            await database.aclose()


class TestCircuit:
    async def test_outage_opens_the_circuit_and_recovery_closes_it(self, postgres_url, proxy):
        """Outage: failures, then fast 503s with Retry-After; restored: served again."""
        app = FastAPI()
        runtime = bastion.install(
            app,
            database={
                "url": proxy.url_for(postgres_url),
                "pool_size": 1,
                "max_overflow": 0,
                "connect_timeout": 1,
            },
            migrations={"mode": "off"},
            logging={"level": "ERROR"},
            resilience={"dependencies": {"database": QUICK}},
        )

        @app.get("/one")
        async def one() -> dict[str, int]:
            return {"one": await select_one(runtime.database)}

        breaker = runtime.resilience.breaker("database")
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/one")).status_code
            proxy.outage()
            failed = [await client.get("/one") for _ in range(2)]
            assert [503, 503] == [response.status_code for response in failed]
            assert CircuitState.OPEN is breaker.state

            started = time.monotonic()
            fast = await client.get("/one")
            elapsed = time.monotonic() - started
            assert 503 == fast.status_code
            assert "SERVICE_UNAVAILABLE" == fast.json()["code"]
            assert "1" == fast.headers["retry-after"]
            assert "127.0.0.1" not in fast.text
            assert elapsed < 0.1
            circuits = (await client.get("/health/circuits")).json()["circuits"]
            assert "open" == circuits[0]["state"]

            proxy.restore()
            await asyncio.sleep(QUICK["open_duration"] + 0.1)
            assert 200 == (await client.get("/one")).status_code
            assert CircuitState.CLOSED is breaker.state

    async def test_open_circuit_raises_circuit_open_through_sqlalchemy(self, proxy):
        """Inside SQLAlchemy the open circuit surfaces as CircuitOpenError itself."""
        database, _, name = guarded(
            proxy.url_for("postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"),
            retries=0,
            consecutive_failures=1,
            open_duration=30,
        )
        proxy.refuse()
        try:
            with pytest.raises(ConnectionRefusedError):
                await select_one(database)
            with pytest.raises(CircuitOpenError) as raised:
                await select_one(database)
            assert name == raised.value.circuit
            assert 29 < raised.value.retry_after <= 30
        finally:
            await database.aclose()

    async def test_lost_connection_of_a_statement_counts(self, postgres_url):
        """A statement whose connection the server killed is a failure on the circuit."""
        database, resilience, name = guarded(postgres_url, consecutive_failures=1)
        try:
            with pytest.raises(DBAPIError):
                async with database.session() as session:
                    await session.execute(text("SELECT pg_terminate_backend(pg_backend_pid())"))
            assert CircuitState.OPEN is resilience.breaker(name).state
        finally:
            await database.aclose()

    async def test_other_statement_errors_do_not_count(self, postgres_url):
        """A broken statement is a bug, not the database failing: the circuit stays closed."""
        database, resilience, name = guarded(postgres_url, consecutive_failures=1)
        try:
            with pytest.raises(DBAPIError):
                async with database.session() as session:
                    await session.execute(text("SELEC 1"))
            assert CircuitState.CLOSED is resilience.breaker(name).state
            assert 1 == await select_one(database)
        finally:
            await database.aclose()
