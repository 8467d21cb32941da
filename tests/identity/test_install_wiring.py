"""What install() wires between identity and the other components."""

from __future__ import annotations

from fastapi import Depends, FastAPI

import bastion
from bastion.identity import require, requires
from bastion.identity._events import (
    SecurityEvent,
    SecurityEventKind,
    on_security_event,
    remove_security_listener,
)


async def test_a_lockout_of_the_login_throttle_is_a_security_event():
    """The audit trail will record lockouts: install() forwards them as security events."""
    app = FastAPI()
    runtime = bastion.install(
        app,
        database={"enabled": False},
        ratelimit={"store_url": "memory://", "login": {"lockout_threshold": 2}},
    )
    assert runtime.ratelimit is not None
    seen: list[SecurityEvent] = []

    async def listener(event: SecurityEvent) -> None:
        seen.append(event)

    on_security_event(listener)
    try:
        login = runtime.ratelimit.login
        await login.record_failure("someone@example.org", "192.0.2.7")
        assert [] == seen
        await login.record_failure("someone@example.org", "192.0.2.7")
    finally:
        remove_security_listener(listener)
    (event,) = seen
    assert SecurityEventKind.LOCKOUT == event.kind
    assert "192.0.2.7" == event.ip
    # The identifier is personal data: the event carries its hash only.
    assert "someone@example.org" not in repr(event)


async def test_guarded_operations_list_401_and_403_in_openapi():
    """An operation behind a permission check documents 401 and 403; an open one does not."""
    app = FastAPI()
    bastion.install(app, database={"enabled": False})

    @app.get("/open")
    async def open_route() -> dict:
        return {}

    @app.get("/docs-list", dependencies=[Depends(require("documents:read"))])
    async def listed() -> dict:
        return {}

    @app.post("/docs-write")
    @requires("documents:write")
    async def written() -> dict:
        return {}

    paths = app.openapi()["paths"]
    for path, method in (("/docs-list", "get"), ("/docs-write", "post")):
        responses = paths[path][method]["responses"]
        assert {"401", "403"} <= set(responses), path
        assert ["UNAUTHENTICATED"] == responses["401"]["x-error-codes"]
        assert ["FORBIDDEN"] == responses["403"]["x-error-codes"]
    assert not {"401", "403"} & set(paths["/open"]["get"]["responses"])
