"""Fixtures of the identity tests that work on the tables directly (no app, no migrations)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bastion.data import Database
from bastion.identity._tables import identity_metadata
from bastion.settings import DatabaseSettings


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request, sqlite_url: str, _module_postgres) -> AsyncIterator[Database]:
    """Empty identity tables (made by ``create_all``) on SQLite or PostgreSQL."""
    if request.param == "sqlite":
        url = sqlite_url
    else:
        request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
        url = _module_postgres
    db = Database(DatabaseSettings(url=url))
    async with db.engine.begin() as connection:
        await connection.run_sync(identity_metadata.drop_all)
        await connection.run_sync(identity_metadata.create_all)
    yield db
    await db.aclose()
