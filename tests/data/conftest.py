"""Fixtures for the migration tests: a clean database per test, and host trees on disk.

Migration tests need an empty database: the version tables they check for must
not be left over from another test. SQLite gets a fresh file per test already;
on PostgreSQL these tests use one extra database of their own, created beside
the session's database, emptied before each test and dropped at the end, so no
other test's state is disturbed.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import asyncpg
import pytest
from migration_support import ENV_PY, Revision, revision_source
from sqlalchemy.engine import make_url

from bastion.data import Database
from bastion.settings import DatabaseSettings


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[..., Path]:
    """Write an Alembic tree (env.py and revisions) under the test's temp dir."""

    def make(*revisions: Revision, name: str = "tree", env: str = ENV_PY) -> Path:
        directory = tmp_path / name
        (directory / "versions").mkdir(parents=True)
        (directory / "env.py").write_text(env)
        for revision in revisions:
            (directory / "versions" / f"{revision[0]}.py").write_text(revision_source(revision))
        return directory

    return make


async def _pg_execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://", 1))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def _migration_databases() -> Iterator[dict[str, str]]:
    created: dict[str, str] = {}  # database name -> admin URL
    yield created
    for name, admin in created.items():
        asyncio.run(_pg_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


def _empty_postgres(session_url: str, created: dict[str, str]) -> str:
    url = make_url(session_url)
    name = f"{url.database}_migrations"
    admin = url.set(database="postgres").render_as_string(hide_password=False)
    target = url.set(database=name).render_as_string(hide_password=False)
    if name not in created:
        asyncio.run(_pg_execute(admin, f'CREATE DATABASE "{name}"'))
        created[name] = admin
    asyncio.run(_pg_execute(target, "DROP SCHEMA public CASCADE", "CREATE SCHEMA public"))
    return target


@pytest.fixture
def db_url(database_url: str, _migration_databases: dict[str, str]) -> str:
    """An empty database, on SQLite and on PostgreSQL (ids follow ``database_url``)."""
    if database_url.startswith("sqlite"):
        return database_url
    return _empty_postgres(database_url, _migration_databases)


@pytest.fixture
def pg_db_url(postgres_url: str, _migration_databases: dict[str, str]) -> str:
    """An empty PostgreSQL database, for behaviour only PostgreSQL has (advisory locks)."""
    return _empty_postgres(postgres_url, _migration_databases)


@pytest.fixture
async def database(db_url: str) -> AsyncIterator[Database]:
    """The shared-database object a migrator runs on; its pool is closed afterwards."""
    db = Database(DatabaseSettings(url=db_url))
    yield db
    await db.aclose()
