"""A dependency that cannot be reached answers a retryable 503; other database errors stay 500."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from sqlalchemy import text
from structlog.testing import capture_logs

import bastion
from bastion.testing import lifespan_client

UNREACHABLE = "postgresql+asyncpg://nobody:pw-never-shown@127.0.0.1:1/none"


def app_on(url: str) -> FastAPI:
    app = FastAPI()
    runtime = bastion.install(
        app,
        database={"url": url, "connect_timeout": 1},
        migrations={"mode": "off"},
        logging={"level": "WARNING", "format": "json"},
        # Without migrations there are no audit or flag tables; their start-up reads
        # would count against the database's circuit, which these tests watch on their own.
        audit={"enabled": False},
        flags={"enabled": False},
    )

    @app.get("/sql/{statement}")
    async def run(statement: str) -> dict[str, str]:
        queries = {
            "terminate": "SELECT pg_terminate_backend(pg_backend_pid())",
            "typo": "SELEC 1",
            "one": "SELECT 1",
        }
        async with runtime.database.session() as session:
            await session.execute(text(queries[statement]))
        return {"ok": statement}

    return app


def assert_unavailable(response) -> None:
    assert 503 == response.status_code
    assert "application/problem+json" == response.headers["content-type"]
    assert "SERVICE_UNAVAILABLE" == response.json()["code"]
    assert "5" == response.headers["retry-after"]
    assert "127.0.0.1" not in response.text
    assert "pw-never-shown" not in response.text


class TestDependencyUnreachable:
    async def test_refused_connection_is_a_503(self):
        """A database that refuses connections gives a 503 problem and a warning, not a 500."""
        async with lifespan_client(app_on(UNREACHABLE)) as client:
            with capture_logs() as logs:
                response = await client.get("/sql/one")
        assert_unavailable(response)
        assert [("warning", "ConnectionRefusedError")] == [
            (log["log_level"], log["error"])
            for log in logs
            if log["event"] == "dependency unreachable"
        ]

    async def test_connection_lost_mid_request_is_a_503(self, postgres_url):
        """A connection the server drops during the request gives a 503; the next one works."""
        async with lifespan_client(app_on(postgres_url)) as client:
            assert_unavailable(await client.get("/sql/terminate"))
            assert 200 == (await client.get("/sql/one")).status_code

    @pytest.mark.parametrize("backend", ["sqlite", "postgres"])
    async def test_other_database_errors_stay_500(self, backend, sqlite_url, request):
        """A broken statement is a bug: a 500 problem, never dressed up as an outage."""
        url = sqlite_url if backend == "sqlite" else request.getfixturevalue("postgres_url")
        async with lifespan_client(app_on(url)) as client:
            response = await client.get("/sql/typo")
        assert 500 == response.status_code
        assert "INTERNAL" == response.json()["code"]
