"""Helpers shared by the migration tests: host-tree revisions and database inspection."""

from __future__ import annotations

import asyncio
import textwrap
from collections.abc import Awaitable, Callable
from typing import TypeVar

from sqlalchemy import inspect, text

from bastion.data import Database
from bastion.settings import DatabaseSettings

T = TypeVar("T")

BASTION_REVISIONS = (
    "0001_baseline",
    "0002_identity",
    "0003_audit",
    "0004_flags",
    "0005_idempotency",
)
"""Bastion's own tree, oldest first."""
BASTION_APPLIED = [("bastion", revision) for revision in BASTION_REVISIONS]
"""``(tree, revision)`` of bastion's tree as an upgrade applies it."""

ENV_PY = "from bastion.data import run_alembic_env\n\nrun_alembic_env(None)\n"

Revision = tuple[str, str | None, str, str, str]
"""(id, down revision, upgrade body, downgrade body, message)."""

WIDGETS: Revision = (
    "a1",
    None,
    'op.create_table("widgets", sa.Column("id", sa.Integer, primary_key=True))',
    'op.drop_table("widgets")',
    "Create widgets.",
)
GADGETS: Revision = (
    "a2",
    "a1",
    'op.create_table("gadgets", sa.Column("id", sa.Integer, primary_key=True))',
    'op.drop_table("gadgets")',
    "Create gadgets.",
)
HALF_WAY: Revision = (
    "b2",
    "a1",
    'op.create_table("half", sa.Column("id", sa.Integer, primary_key=True))\n'
    'raise RuntimeError("boom half-way")',
    "pass",
    "Fail after creating a table.",
)


def revision_source(revision: Revision) -> str:
    """The text of an Alembic revision file."""
    ident, down, upgrade, downgrade, message = revision
    return (
        f'"""{message}"""\n\n'
        "import sqlalchemy as sa\n"
        "from alembic import op\n\n"
        f"revision = {ident!r}\n"
        f"down_revision = {down!r}\n"
        "branch_labels = None\n"
        "depends_on = None\n\n\n"
        f"def upgrade():\n{textwrap.indent(upgrade, '    ')}\n\n\n"
        f"def downgrade():\n{textwrap.indent(downgrade, '    ')}\n"
    )


async def table_names(db: Database) -> list[str]:
    """Every table in the database, sorted."""
    async with db.engine.connect() as connection:
        return await connection.run_sync(lambda sync: sorted(inspect(sync).get_table_names()))


async def version_rows(db: Database, table: str) -> list[str]:
    """The revisions recorded in a version table; empty when it does not exist."""
    if table not in await table_names(db):
        return []
    async with db.engine.connect() as connection:
        rows = await connection.execute(text(f"SELECT version_num FROM {table}"))  # noqa: S608 -- fixed test names
        return sorted(row[0] for row in rows)


async def execute(db: Database, *statements: str) -> None:
    """Run statements in one committed transaction."""
    async with db.engine.begin() as connection:
        for statement in statements:
            await connection.execute(text(statement))


def with_database(url: str, action: Callable[[Database], Awaitable[T]]) -> T:
    """Run ``action`` on a database of its own, from a test that is not async."""

    async def run() -> T:
        db = Database(DatabaseSettings(url=url))
        try:
            return await action(db)
        finally:
            await db.aclose()

    return asyncio.run(run())


HISTORY_TABLE = "bastion_migration_history"


async def history_rows(db: Database) -> list[dict]:
    """Every row of the migration history, oldest first; empty when the table does not exist."""
    if HISTORY_TABLE not in await table_names(db):
        return []
    async with db.engine.connect() as connection:
        rows = await connection.execute(text(f"SELECT * FROM {HISTORY_TABLE} ORDER BY id"))  # noqa: S608 -- fixed test names
        return [dict(row) for row in rows.mappings()]


async def schema_snapshot(db: Database) -> dict:
    """Tables with columns and indexes, plus every version table's and the history's rows."""

    def inspect_schema(sync) -> dict:
        inspector = inspect(sync)
        return {
            table: {
                "columns": [
                    (column["name"], str(column["type"]), column["nullable"])
                    for column in inspector.get_columns(table)
                ],
                "indexes": sorted(
                    (index["name"], tuple(index["column_names"]))
                    for index in inspector.get_indexes(table)
                ),
            }
            for table in sorted(inspector.get_table_names())
        }

    async with db.engine.connect() as connection:
        schema = await connection.run_sync(inspect_schema)
    versions = {
        table: await version_rows(db, table) for table in schema if table.endswith("_version")
    }
    return {"schema": schema, "versions": versions, "history": await history_rows(db)}
