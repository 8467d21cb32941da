"""The operational paths (probes, metrics) are matched by segment, not by string prefix."""

from __future__ import annotations

from fastapi import FastAPI

import bastion
from bastion._routes import PathSet
from bastion.testing import lifespan_client


def test_an_entry_covers_itself_and_below_never_a_longer_name() -> None:
    """'/metrics' covers /metrics and /metrics/x, not /metrics-exports; '/health/' its children."""
    paths = PathSet(["/health/", "/metrics", ""])
    assert paths.matches("/metrics")
    assert paths.matches("/metrics/x")
    assert paths.matches("/health/ready")
    assert not paths.matches("/metrics-exports")
    assert not paths.matches("/healthz")
    assert not PathSet([])


async def test_an_app_route_named_like_metrics_is_guarded() -> None:
    """A route /metrics-exports gets the request guards like any other route."""
    app = FastAPI()

    @app.post("/metrics-exports")
    async def export(body: dict[str, object]) -> dict[str, int]:
        return {"keys": len(body)}

    bastion.install(
        app, database={"enabled": False}, audit={"enabled": False}, flags={"enabled": False}
    )
    nested = "[" * 100 + "]" * 100
    async with lifespan_client(app) as client:
        response = await client.post(
            "/metrics-exports",
            content=nested.encode(),
            headers={"content-type": "application/json"},
        )
    assert 422 == response.status_code
    assert "too_deep" == response.json()["errors"][0]["code"]
