"""Bastion Docs ships a rate limit: its default, how configuration overrides it, what a 429 is."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from bastion_docs.app import DEFAULT_RATE_LIMIT, create_app


def service(sqlite_url: str, **overrides: Any) -> FastAPI:
    """The service as it ships: no ratelimit override unless the test gives one."""
    return create_app(
        database={"url": sqlite_url},
        migrations={"mode": "auto"},
        logging={"level": "WARNING", "format": "json"},
        **overrides,
    )


@asynccontextmanager
async def started(app: FastAPI, peer: str = "192.0.2.50") -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=app, client=(peer, 4000))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        app.router.lifespan_context(app),
    ):
        yield client


class TestShippedDefault:
    async def test_the_service_limits_every_route_by_default(self, sqlite_url):
        """Out of the box: 20 a second (burst 20) and 1000 an hour per client, on every route."""
        app = service(sqlite_url)
        assert DEFAULT_RATE_LIMIT == app.state.bastion.settings.ratelimit.default
        async with started(app) as client:
            first = await client.get("/v1/documents")
            assert 401 == first.status_code
            assert (
                '"default-1s";q=20;w=1, "default-3600s";q=1000;w=3600'
                == first.headers["ratelimit-policy"]
            )
            assert "19" == first.headers["x-ratelimit-remaining"]
            started_at = time.monotonic()
            codes = [(await client.get("/v1/documents")).status_code for _ in range(40)]
            elapsed = time.monotonic() - started_at
        admitted = codes.count(401)
        assert 429 in codes
        # The burst that was left (19), plus what refilled at 20/s while sending.
        assert 19 <= admitted <= 19 + 20 * elapsed + 1

    async def test_a_429_is_the_services_problem_document(self, sqlite_url):
        """The rejection is problem+json RATE_LIMITED with Retry-After and the headers."""
        app = service(sqlite_url, ratelimit={"default": "1/minute"})
        async with started(app) as client:
            await client.get("/v1/documents")
            response = await client.get("/v1/documents", headers={"X-Request-Id": "svc-1"})
        assert 429 == response.status_code
        assert "application/problem+json" == response.headers["content-type"]
        assert {
            "code": "RATE_LIMITED",
            "correlation_id": "svc-1",
        }.items() <= response.json().items()
        assert int(response.headers["retry-after"]) >= 59
        assert "0" == response.headers["x-ratelimit-remaining"]

    async def test_the_probes_are_never_limited(self, sqlite_url):
        """Load balancers can probe as often as they like."""
        app = service(sqlite_url, ratelimit={"default": "1/minute"})
        async with started(app) as client:
            codes = [(await client.get("/health/live")).status_code for _ in range(5)]
        assert [200] * 5 == codes


class TestOverrides:
    async def test_the_environment_overrides_the_default(self, sqlite_url, monkeypatch):
        """BASTION_RATELIMIT__DEFAULT replaces the shipped limit."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "2/minute")
        app = service(sqlite_url)
        async with started(app) as client:
            codes = [(await client.get("/v1/documents")).status_code for _ in range(3)]
        assert [401, 401, 429] == codes

    async def test_an_empty_value_switches_it_off(self, sqlite_url, monkeypatch):
        """BASTION_RATELIMIT__DEFAULT= (empty) runs the service without a default limit."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "")
        app = service(sqlite_url)
        assert app.state.bastion.settings.ratelimit.default is None
        async with started(app) as client:
            response = await client.get("/v1/documents")
        assert "ratelimit-policy" not in response.headers

    async def test_a_toml_file_overrides_the_default(self, sqlite_url, monkeypatch, tmp_path):
        """bastion.toml's [ratelimit] default is honoured too."""
        config = tmp_path / "bastion.toml"
        config.write_text('[ratelimit]\ndefault = "7/minute"\n')
        monkeypatch.setenv("BASTION_CONFIG_FILE", str(config))
        assert "7/minute" == service(sqlite_url).state.bastion.settings.ratelimit.default

    async def test_keyword_arguments_override_the_default(self, sqlite_url):
        """create_app(ratelimit=...) wins over the shipped default."""
        app = service(sqlite_url, ratelimit={"default": "5/second"})
        assert "5/second" == app.state.bastion.settings.ratelimit.default

    async def test_behind_a_trusted_proxy_clients_are_counted_apart(self, sqlite_url, monkeypatch):
        """With the proxy trusted, each forwarded client has its own allowance."""
        monkeypatch.setenv("BASTION_HTTP__TRUSTED_PROXIES", '["10.0.0.0/8"]')
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "1/minute")
        app = service(sqlite_url)
        async with started(app, peer="10.0.0.9") as proxy:
            codes = [
                (
                    await proxy.get("/v1/documents", headers={"X-Forwarded-For": client_ip})
                ).status_code
                for client_ip in ("198.51.100.1", "198.51.100.2", "198.51.100.1")
            ]
        assert [401, 401, 429] == codes


@pytest.mark.parametrize("limit", ["lots", "5 per fortnight"])
def test_an_invalid_limit_stops_start_up(sqlite_url, monkeypatch, limit):
    """A bad BASTION_RATELIMIT__DEFAULT is a configuration error naming the variable."""
    from bastion.errors import ConfigurationError

    monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", limit)
    with pytest.raises(ConfigurationError, match="BASTION_RATELIMIT__DEFAULT"):
        service(sqlite_url)
