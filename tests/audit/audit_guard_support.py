"""Helpers of the guard and retention tests: migrated databases owned by an ordinary role."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass

import asyncpg

from bastion.data import Database, MigrationTree, Migrator
from bastion.settings import DatabaseSettings

POSTGRES_ADMIN_URL = os.environ.get(
    "BASTION_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)


def _dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


def _with_user(url: str, user: str, database: str) -> str:
    """``url`` with its user and database replaced (trust authentication: no password)."""
    scheme, _, rest = url.partition("://")
    host = rest.rpartition("@")[2].partition("/")[0]
    return f"{scheme}://{user}@{host}/{database}"


async def admin(*statements: str, database: str | None = None) -> None:
    """Run statements as the superuser, each in its own implicit transaction."""
    url = (
        POSTGRES_ADMIN_URL
        if database is None
        else _with_user(POSTGRES_ADMIN_URL, _superuser(), database)
    )
    conn = await asyncpg.connect(_dsn(url), timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


def _superuser() -> str:
    rest = POSTGRES_ADMIN_URL.partition("://")[2]
    return rest.rpartition("@")[0].partition(":")[0] or "postgres"


@dataclass(frozen=True)
class GuardedPostgres:
    """A database migrated by ``owner_url``'s role, plus a maintenance login."""

    name: str
    owner_url: str
    superuser_url: str
    maintenance_url: str
    owner: str
    maintainer: str


async def migrate(url: str) -> None:
    """Run bastion's migrations on ``url`` as its role."""
    db = Database(DatabaseSettings(url=url))
    try:
        await Migrator(db, [MigrationTree.bastion()]).upgrade()
    finally:
        await db.aclose()


@contextlib.contextmanager
def guarded_postgres() -> Iterator[GuardedPostgres]:
    """A scratch database owned by a new non-superuser LOGIN role that ran the migrations.

    Also a LOGIN role granted ``bastion_audit_maintenance``. The roles and the
    database are dropped on exit; ``bastion_audit_maintenance`` is cluster-wide
    and shared by every database the suite migrates, so it stays.
    """
    token = secrets.token_hex(4)
    owner = f"bastion_test_app_{token}"
    maintainer = f"bastion_test_maint_{token}"
    name = f"bastion_test_{os.getpid()}_guards_{token}"
    asyncio.run(
        admin(
            f"CREATE ROLE {owner} LOGIN",
            f"CREATE DATABASE {name} OWNER {owner}",
        )
    )
    try:
        owner_url = _with_user(POSTGRES_ADMIN_URL, owner, name)
        asyncio.run(migrate(owner_url))
        # The owner lacks CREATEROLE: the migration left the role to the DBA
        # unless an earlier run (or a parallel test) made it.
        asyncio.run(_ensure_maintenance_role(name))
        asyncio.run(admin(f"CREATE ROLE {maintainer} LOGIN IN ROLE bastion_audit_maintenance"))
        yield GuardedPostgres(
            name=name,
            owner_url=owner_url,
            superuser_url=_with_user(POSTGRES_ADMIN_URL, _superuser(), name),
            maintenance_url=_with_user(POSTGRES_ADMIN_URL, maintainer, name),
            owner=owner,
            maintainer=maintainer,
        )
    finally:
        asyncio.run(
            admin(
                f"DROP DATABASE IF EXISTS {name} WITH (FORCE)",
                f"DROP ROLE IF EXISTS {maintainer}",
                f"DROP ROLE IF EXISTS {owner}",
            )
        )


async def _ensure_maintenance_role(database: str) -> None:
    """Create the maintenance role if missing and (re)apply the guards' grants to it."""
    with contextlib.suppress(asyncpg.DuplicateObjectError, asyncpg.UniqueViolationError):
        await admin(
            "DO $$ BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
            "'bastion_audit_maintenance') THEN CREATE ROLE bastion_audit_maintenance NOLOGIN; "
            "END IF; END $$"
        )
    await admin(
        "GRANT SELECT, DELETE ON bastion_audit_entries TO bastion_audit_maintenance",
        "GRANT SELECT, INSERT ON bastion_audit_pruned, bastion_audit_segments "
        "TO bastion_audit_maintenance",
        database=database,
    )
