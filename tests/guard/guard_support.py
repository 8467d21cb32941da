"""Helpers shared by the guard tests: a bare bastion app and an engine on empty tables.

Imported as ``from guard_support import ...``: this directory is on the path, as pytest
puts it (prepend mode), as tests/cluster does with ``nginx_support``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import bastion

PROBLEM = "application/problem+json"

OFF: dict[str, Any] = {
    "database": {"enabled": False},
    "audit": {"enabled": False},
    "flags": {"enabled": False},
}
"""Settings that switch off the layers needing a database."""


def install_bare(app: FastAPI) -> FastAPI:
    """Install bastion on ``app`` without database, audit, flags or logging; return it."""
    bastion.install(app, **OFF, logging={"enabled": False})
    return app


async def empty_engine(
    request: pytest.FixtureRequest, sqlite_url: str, module_postgres: str, metadata: MetaData
) -> AsyncIterator[AsyncEngine]:
    """Yield an engine on ``metadata``'s tables, emptied, on SQLite or PostgreSQL.

    For a fixture parametrised ``["sqlite", "postgres"]``: ``postgres`` fails in CI,
    and skips elsewhere, when the database is down.
    """
    if request.param == "sqlite":
        url = sqlite_url
    else:
        request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
        url = module_postgres
    engine = create_async_engine(url)
    async with engine.begin() as connection:
        await connection.run_sync(metadata.drop_all)
        await connection.run_sync(metadata.create_all)
    yield engine
    await engine.dispose()
