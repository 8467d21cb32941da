"""Bastion Docs' indexes, read back from the database after start-up migrations.

Two rules, checked by reflection on SQLite and PostgreSQL alike:

- every foreign key's columns lead an index, the primary key or a unique
  constraint, so checking or cascading a reference never scans the table;
- every list endpoint's tenant filter and sort key are the leading columns of
  one index, so a page is read from the index in order.
"""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text

from bastion_docs.models import metadata

# The list endpoints: table, the columns they filter on, then the columns they sort by.
LIST_ENDPOINTS = {
    "GET /v1/documents": ("documents", ("tenant_id",), ("created_at", "id")),
}


def reflect(connection):
    inspector = inspect(connection)
    tables = {}
    for table in metadata.tables:
        leading = [tuple(index["column_names"]) for index in inspector.get_indexes(table)]
        leading += [tuple(u["column_names"]) for u in inspector.get_unique_constraints(table)]
        leading.append(tuple(inspector.get_pk_constraint(table)["constrained_columns"]))
        foreign_keys = [
            tuple(fk["constrained_columns"]) for fk in inspector.get_foreign_keys(table)
        ]
        tables[table] = (leading, foreign_keys)
    return tables


async def reflected(app):
    async with app.state.bastion.database.engine.connect() as connection:
        return await connection.run_sync(reflect)


class TestServiceIndexes:
    async def test_every_foreign_key_leads_an_index(self, app, client):
        """Each foreign key's columns are the first columns of an index, PK or unique constraint."""
        tables = await reflected(app)
        unindexed = [
            (table, columns)
            for table, (indexes, foreign_keys) in tables.items()
            for columns in foreign_keys
            if not any(index[: len(columns)] == columns for index in indexes)
        ]
        assert sum(len(fks) for _, fks in tables.values()) >= 3
        assert [] == unindexed

    @pytest.mark.parametrize("endpoint", sorted(LIST_ENDPOINTS))
    async def test_list_filter_and_sort_lead_an_index(self, app, client, endpoint):
        """The tenant filter then the sort key are an index's leading columns."""
        table, filters, sort = LIST_ENDPOINTS[endpoint]
        wanted = filters + sort
        indexes, _ = (await reflected(app))[table]
        assert wanted in [index[: len(wanted)] for index in indexes], indexes

    async def test_index_revision_reverts_and_reapplies(self, app, client):
        """Revision 0002 drops its index on downgrade and builds it again on upgrade (with 0003)."""
        migrator = app.state.bastion.migrator

        async def has_index() -> bool:
            indexes, _ = (await reflected(app))["documents"]
            return ("created_by",) in indexes

        # Past 0003 on the way down, which drops a column: consent is needed.
        reverted = await migrator.downgrade("app", "0001", allow_destructive=True)
        without = await has_index()
        reapplied = await migrator.upgrade()
        assert (["0004", "0003", "0002"], False, ["0002", "0003", "0004"], True) == (
            [r.revision for r in reverted],
            without,
            [r.revision for r in reapplied],
            await has_index(),
        )

    @pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
    async def test_concurrent_builds_left_no_invalid_index(self, app, client):
        """On PostgreSQL every index of the service's tables is valid (no failed CONCURRENTLY)."""
        async with app.state.bastion.database.engine.connect() as connection:
            invalid = (
                await connection.execute(
                    text(
                        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indexrelid "
                        "JOIN pg_class t ON t.oid = i.indrelid "
                        "WHERE NOT i.indisvalid AND t.relname = ANY(:tables)"
                    ),
                    {"tables": sorted(metadata.tables)},
                )
            ).all()
        assert [] == invalid
