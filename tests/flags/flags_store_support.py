"""Helpers of the flag store and sync tests: tables made by ``create_all``, an audit log, rows."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
from sqlalchemy import select

from bastion.audit._subjects import SubjectKeys
from bastion.audit._tables import audit_metadata, entries
from bastion.audit._writer import AuditLog
from bastion.data import Database
from bastion.flags._model import Flag
from bastion.flags._tables import changes, flags_metadata
from bastion.settings import AuditSettings, DatabaseSettings

MASTER = b"f" * 32


async def fresh_tables(url: str) -> Database:
    """A database on ``url`` with empty flag and audit tables (no migrations, no guards)."""
    database = Database(DatabaseSettings(url=url))
    async with database.engine.begin() as connection:
        for metadata in (flags_metadata, audit_metadata):
            await connection.run_sync(metadata.drop_all)
            await connection.run_sync(metadata.create_all)
    return database


def sync_audit(database: Database) -> AuditLog:
    """An audit log in ``sync`` mode: each entry commits with the write that records it."""
    keys = SubjectKeys(database=database, master_key=MASTER, cache_ttl=60)
    return AuditLog(AuditSettings(mode="sync"), database=database, subject_keys=keys)


async def audit_rows(database: Database, prefix: str = "flag.") -> list[tuple[str, str, dict]]:
    """``(action, resource_id, details)`` of the audit entries whose action has ``prefix``."""
    async with database.session() as session:
        rows = await session.execute(
            select(entries.c.action, entries.c.resource_id, entries.c.details)
            .where(entries.c.action.startswith(prefix))
            .order_by(entries.c.seq)
        )
        return [(row.action, row.resource_id, orjson.loads(row.details)) for row in rows]


async def change_rows(database: Database) -> list[Any]:
    """Every row of ``bastion_flag_changes``, oldest first."""
    async with database.session() as session:
        return list(await session.execute(select(changes).order_by(changes.c.id)))


def boolean_flag(key: str = "new-editor", **fields: Any) -> Flag:
    """A boolean flag, off unless ``enabled=True`` is given."""
    return Flag(key=key, **fields)


async def eventually(predicate: Any, *, within: float, step: float = 0.01) -> bool:
    """Poll ``predicate()`` (sync or async) until true or ``within`` seconds passed; its last value.

    Real time on purpose: propagation between instances is what is measured.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value or loop.time() >= deadline:
            return bool(value)
        await asyncio.sleep(step)
