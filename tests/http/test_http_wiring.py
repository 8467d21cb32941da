"""bastion.install alone puts the API-convention layers on, and the settings take them off.

Each test builds its app with ``bastion.install`` and nothing else (no
``add_middleware``): what an application gets by default is what is tested.
"""

from __future__ import annotations

import secrets
import uuid
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

import bastion
from bastion.http._idempotency import IdempotencyMiddleware
from bastion.http._security import SecurityMiddleware
from bastion.http._versioning import VersioningMiddleware
from bastion.identity import generate_jwks
from bastion.testing import lifespan_client

OFF: dict[str, Any] = {
    "database": {"enabled": False},
    "audit": {"enabled": False},
    "flags": {"enabled": False},
    "ratelimit": {"enabled": False},
    "logging": {"level": "WARNING", "format": "json"},
}
IDENTITY = {
    "passwords": {"pepper": secrets.token_urlsafe(48), "time_cost": 1, "memory_cost": 8},
    "api_keys": {"secret": secrets.token_urlsafe(48)},
    "tokens": {"signing_keys": generate_jwks()},
}
# Far from any clock the tests run under: one deprecation long past its sunset, one
# whose sunset is centuries away.
DEPRECATIONS = {
    "/v1/": {"deprecated_at": "2020-01-01T00:00:00", "sunset_at": "2999-01-01T00:00:00"},
    "/v0/": {"deprecated_at": "2019-01-01T00:00:00", "sunset_at": "2020-01-01T00:00:00"},
}


def layers(app: FastAPI) -> list[type]:
    return [entry.cls for entry in app.user_middleware]


def make_app(**overrides: Any) -> tuple[FastAPI, Any, list[str]]:
    """An app with a plain, a versioned, a retired and a keyed route; bastion installed."""
    app = FastAPI()
    calls: list[str] = []

    @app.get("/plain")
    async def plain() -> dict[str, bool]:
        calls.append("plain")
        return {"ok": True}

    @app.get("/v1/items")
    async def v1_items() -> dict[str, bool]:
        calls.append("v1")
        return {"ok": True}

    @app.get("/v0/items")
    async def v0_items() -> dict[str, bool]:
        calls.append("v0")
        return {"ok": True}

    @app.post("/payments", status_code=201)
    @bastion.http.idempotent()
    async def pay(request: Request) -> JSONResponse:
        calls.append("pay")
        payload = await request.json()
        return JSONResponse({"n": calls.count("pay"), **payload}, status_code=201)

    settings = {**OFF, **overrides}
    http = settings.pop("http", {})
    versioning = {"deprecations": DEPRECATIONS, **http.get("versioning", {})}
    runtime = bastion.install(app, http={**http, "versioning": versioning}, **settings)
    return app, runtime, calls


class TestSecurityLayer:
    async def test_on_by_default_and_off_with_http_disabled(self):
        """Every answer, a 404 included, carries the security headers by default;
        ``http.enabled = false`` removes the layer."""
        app, _, _ = make_app()
        assert 1 == layers(app).count(SecurityMiddleware)
        async with lifespan_client(app) as client:
            ok = await client.get("/plain")
            missing = await client.get("/nowhere")
        for response in (ok, missing):
            assert "nosniff" == response.headers["x-content-type-options"]
            assert "DENY" == response.headers["x-frame-options"]
        # Once: a doubled layer would still look right here, so the raw list is checked.
        assert ["nosniff"] == ok.headers.get_list("x-content-type-options")

        app, _, _ = make_app(http={"enabled": False})
        assert SecurityMiddleware not in layers(app)
        async with lifespan_client(app) as client:
            response = await client.get("/plain")
        assert 200 == response.status_code
        assert "x-content-type-options" not in response.headers

    async def test_cors_from_the_settings(self):
        """An origin listed in ``http.cors.allow_origins`` is answered by the wired layer."""
        origin = "https://app.example.com"
        app, _, _ = make_app(http={"cors": {"allow_origins": [origin]}})
        async with lifespan_client(app) as client:
            response = await client.get("/plain", headers={"Origin": origin})
        assert origin == response.headers["access-control-allow-origin"]


class TestVersioningLayer:
    async def test_on_by_default(self):
        """Configured deprecations get their headers, a retired version answers 410
        without running the app, and /admin/deprecations is mounted."""
        app, runtime, calls = make_app()
        assert runtime.deprecations is not None
        assert 1 == layers(app).count(VersioningMiddleware)
        async with lifespan_client(app) as client:
            current = await client.get("/v1/items")
            retired = await client.get("/v0/items")
            plain = await client.get("/plain")
            report = await client.get("/admin/deprecations")
        assert 200 == current.status_code
        assert "deprecation" in current.headers
        assert "sunset" in current.headers
        assert 410 == retired.status_code
        assert "VERSION_SUNSET" == retired.json()["code"]
        # The security layer is outside: the refusal carries its headers too.
        assert "nosniff" == retired.headers["x-content-type-options"]
        assert "deprecation" not in plain.headers
        assert ["v1", "plain"] == calls
        assert 200 == report.status_code

    async def test_off_when_disabled(self):
        """``http.versioning.enabled = false``: no headers, no 410, no admin route."""
        app, runtime, calls = make_app(http={"versioning": {"enabled": False}})
        assert runtime.deprecations is None
        assert VersioningMiddleware not in layers(app)
        async with lifespan_client(app) as client:
            current = await client.get("/v1/items")
            retired = await client.get("/v0/items")
            report = await client.get("/admin/deprecations")
        assert "deprecation" not in current.headers
        assert 200 == retired.status_code
        assert ["v1", "v0"] == calls
        assert 404 == report.status_code

    async def test_usage_names_the_principal_identity_bound(self, sqlite_url):
        """Identity runs inside the versioning layer: the usage report names the caller of
        a deprecated route by the principal of its access token, never by its address."""
        app, runtime, _ = make_app(
            database={"url": sqlite_url}, identity=IDENTITY, audit={"enabled": False}
        )
        assert runtime.identity is not None
        token = runtime.identity.tokens.issue("u-1", "t-1", []).token
        async with lifespan_client(app) as client:
            await client.get("/v1/items", headers={"Authorization": f"Bearer {token}"})
            await client.get("/v1/items")
            report = await client.get("/admin/deprecations")
        assert 200 == report.status_code, report.text
        rows = {
            (row["client"], row["tenant"]): row["count"] for row in report.json()["deprecations"]
        }
        assert 1 == rows[("user:u-1", "t-1")]
        assert 2 == sum(rows.values())


class TestIdempotencyLayer:
    async def test_on_by_default(self):
        """A keyed retry replays the stored answer; OpenAPI documents the header."""
        app, runtime, calls = make_app()
        assert runtime.idempotency is not None
        assert 1 == layers(app).count(IdempotencyMiddleware)
        # Innermost: the principal is bound and the guards have judged the request.
        assert IdempotencyMiddleware is layers(app)[-1]
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        async with lifespan_client(app) as client:
            first = await client.post("/payments", json={"a": 1}, headers=headers)
            second = await client.post("/payments", json={"a": 1}, headers=headers)
            schema = (await client.get("/openapi.json")).json()
        assert 201 == first.status_code == second.status_code
        assert "true" == second.headers["idempotent-replayed"]
        assert ["pay"] == calls
        parameters = schema["paths"]["/payments"]["post"]["parameters"]
        assert "Idempotency-Key" in [parameter["name"] for parameter in parameters]

    async def test_off_when_disabled(self):
        """``http.idempotency.enabled = false``: keys are ignored and not documented."""
        app, runtime, calls = make_app(http={"idempotency": {"enabled": False}})
        assert runtime.idempotency is None
        assert IdempotencyMiddleware not in layers(app)
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        async with lifespan_client(app) as client:
            await client.post("/payments", json={"a": 1}, headers=headers)
            second = await client.post("/payments", json={"a": 1}, headers=headers)
            schema = (await client.get("/openapi.json")).json()
        assert "idempotent-replayed" not in second.headers
        assert ["pay", "pay"] == calls
        parameters = schema["paths"]["/payments"]["post"].get("parameters", [])
        assert "Idempotency-Key" not in [parameter["name"] for parameter in parameters]

    async def test_a_request_the_guard_refuses_takes_no_key(self):
        """The request guard runs outside idempotency: a refused request (415) leaves the
        key free, so the corrected retry executes instead of being called a reuse."""
        app, _, calls = make_app()
        headers = {"Idempotency-Key": str(uuid.uuid4())}
        async with lifespan_client(app) as client:
            refused = await client.post(
                "/payments", content=b"a,b", headers={**headers, "Content-Type": "text/csv"}
            )
            retried = await client.post("/payments", json={"a": 1}, headers=headers)
        assert 415 == refused.status_code
        assert 201 == retried.status_code
        assert "idempotent-replayed" not in retried.headers
        assert ["pay"] == calls


@pytest.mark.parametrize("section", ["versioning", "idempotency"])
async def test_http_disabled_turns_every_convention_off(section):
    """``http.enabled = false`` takes the versioning and idempotency layers off with the
    security layer, whatever their own switches say."""
    app, runtime, _ = make_app(http={"enabled": False, section: {"enabled": True}})
    assert runtime.deprecations is None
    assert runtime.idempotency is None
    assert not {SecurityMiddleware, VersioningMiddleware, IdempotencyMiddleware} & set(layers(app))
