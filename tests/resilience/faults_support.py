"""Helpers of the fault-injection scenarios: the service, its circuits, timed requests.

Every scenario runs Bastion Docs in-process with a FaultProxy between it and one
dependency; the proxy is switched while requests run, and each request's wall
time is measured against the bound its policy promises.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable
from typing import Any, TypeVar

import httpx
import pytest

from bastion.testing import create_member
from bastion_docs.app import create_app

T = TypeVar("T")

# A loaded 2-CPU machine runs five test suites at once: every time bound gets this margin.
MARGIN = 1.5


def service(database_url: str, *, database: dict[str, Any] | None = None, **overrides: Any):
    """Bastion Docs as the scenarios run it: start-up migrations, warnings-only JSON logs."""
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    # The limiter degrades on Redis faults too; these scenarios pin the circuits' lines.
    overrides.setdefault("ratelimit", {"enabled": False})
    return create_app(
        database={**(database or {}), "url": database_url},
        migrations={"mode": "auto"},
        **overrides,
    )


async def timed(awaitable: Awaitable[T]) -> tuple[T, float]:
    """Await, and return the result with the wall time it took."""
    started = time.monotonic()
    result = await awaitable
    return result, time.monotonic() - started


async def new_owner(app) -> dict[str, str]:
    """Create a tenant and its owner in the started app; return the headers that act as them."""
    slug = f"t-{secrets.token_hex(6)}"
    owner = await create_member(app, tenant_slug=slug, email=f"owner@{slug}.example", role="owner")
    return owner.headers


async def circuit(client: httpx.AsyncClient, name: str) -> dict[str, Any]:
    """The entry of ``name`` in /health/circuits."""
    response = await client.get("/health/circuits")
    assert 200 == response.status_code, response.text
    return next(entry for entry in response.json()["circuits"] if entry["name"] == name)


async def wait_for_state(
    client: httpx.AsyncClient, name: str, state: str, *, within: float
) -> dict[str, Any]:
    """Poll /health/circuits until ``name`` is in ``state``; fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        entry = await circuit(client, name)
        if entry["state"] == state:
            return entry
        if time.monotonic() > deadline:
            pytest.fail(f"circuit {name} still {entry['state']} after {within} s, not {state}")
        await asyncio.sleep(0.05)
