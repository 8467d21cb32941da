"""Start-up warns when an idempotency key's lock may expire while its request still runs."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from structlog.testing import capture_logs

import bastion
from bastion.http import idempotent
from bastion.testing import lifespan_client

OFF = {"database": {"enabled": False}, "audit": {"enabled": False}, "flags": {"enabled": False}}


async def _warnings(**overrides: Any) -> list[dict[str, Any]]:
    app = FastAPI()

    @app.post("/payments")
    @idempotent()
    async def pay() -> dict[str, bool]:
        return {"ok": True}

    bastion.install(app, **{**OFF, **overrides})
    with capture_logs() as logs:
        async with lifespan_client(app):
            pass
    return [entry for entry in logs if "lock_timeout" in entry["event"]]


async def test_defaults_do_not_warn() -> None:
    """The 60 s lock outlasts the 30 s request deadline: nothing to say."""
    assert [] == await _warnings()


async def test_a_deadline_past_the_lock_warns() -> None:
    """A route deadline as long as the lock, or no deadline at all, is a start-up warning."""
    [warning] = await _warnings(
        resilience={"route_deadlines": {"/payments": 90}},
        http={"idempotency": {"lock_timeout": 60}},
    )
    assert 90 == warning["longest_deadline"]
    [unbounded] = await _warnings(resilience={"request_deadline": 0})
    assert unbounded["longest_deadline"] is None
