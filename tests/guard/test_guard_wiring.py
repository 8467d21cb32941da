"""bastion.install alone puts the request guard on, and ``guard.enabled = false`` takes it off.

The app is built with ``bastion.install`` and nothing else (no ``add_middleware``).
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request

import bastion
from bastion.guard._middleware import GuardMiddleware
from bastion.ratelimit import RateLimitMiddleware
from bastion.testing import lifespan_client

OFF: dict[str, Any] = {
    "database": {"enabled": False},
    "audit": {"enabled": False},
    "flags": {"enabled": False},
    "logging": {"level": "WARNING", "format": "json"},
}


def make_app(**overrides: Any) -> tuple[FastAPI, Any, list[bytes]]:
    app = FastAPI()
    received: list[bytes] = []

    @app.post("/items")
    async def create(request: Request) -> dict[str, int]:
        body = await request.body()
        received.append(body)
        return {"size": len(body)}

    @app.put("/items/{item_id}")
    async def replace(item_id: int, item: dict[str, int]) -> dict[str, int]:
        return item

    runtime = bastion.install(app, **{**OFF, **overrides})
    return app, runtime, received


def guards(app: FastAPI) -> int:
    return [entry.cls for entry in app.user_middleware].count(GuardMiddleware)


class TestGuardWiring:
    async def test_on_by_default(self):
        """By default a body over its route's limit is 413 and an unlisted media type 415,
        before the app runs; the refusals are problems with the security headers, and
        OpenAPI lists them."""
        app, runtime, received = make_app(guard={"body_limits": {"default": 64}})
        assert 1 == guards(app)
        assert runtime.guard is not None
        layers = [entry.cls for entry in app.user_middleware]
        # Inside the limiter: a refused request still counts against its client's limit.
        assert layers.index(RateLimitMiddleware) < layers.index(GuardMiddleware)
        async with lifespan_client(app) as client:
            large = await client.post(
                "/items",
                content=b"[" + b"1," * 40 + b"1]",
                headers={"Content-Type": "application/json"},
            )
            csv = await client.post("/items", content=b"a,b", headers={"Content-Type": "text/csv"})
            ok = await client.post("/items", json=[1, 2])
            schema = (await client.get("/openapi.json")).json()
        assert 413 == large.status_code
        assert "PAYLOAD_TOO_LARGE" == large.json()["code"]
        assert 415 == csv.status_code
        assert "UNSUPPORTED_MEDIA_TYPE" == csv.json()["code"]
        assert "nosniff" == csv.headers["x-content-type-options"]
        assert 200 == ok.status_code
        assert [b"[1,2]"] == received
        # Every operation lists the guard's answers, with or without a declared body.
        for path, operation in (("/items/{item_id}", "put"), ("/items", "post")):
            responses = schema["paths"][path][operation]["responses"]
            assert {"413", "414", "415", "431"} <= set(responses)

    async def test_off_when_disabled(self):
        """``guard.enabled = false``: no guard layer, a screening runtime that screens
        nothing; the app gets what the client sent, and OpenAPI does not promise the
        guard's answers."""
        app, runtime, received = make_app(guard={"enabled": False, "body_limits": {"default": 64}})
        assert 0 == guards(app)
        assert runtime.guard is not None
        assert not runtime.guard.settings.enabled
        body = b"[" + b"1," * 40 + b"1]"
        async with lifespan_client(app) as client:
            large = await client.post(
                "/items", content=body, headers={"Content-Type": "application/json"}
            )
            csv = await client.post("/items", content=b"a,b", headers={"Content-Type": "text/csv"})
            schema = (await client.get("/openapi.json")).json()
        assert 200 == large.status_code == csv.status_code
        assert [body, b"a,b"] == received
        responses = schema["paths"]["/items/{item_id}"]["put"]["responses"]
        assert not {"413", "414", "415", "431"} & set(responses)
