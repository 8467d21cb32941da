"""Append-only guards: each forbidden statement fails on migrated tables; pruning's path passes."""

from __future__ import annotations

import datetime as dt
import importlib.resources
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from audit_guard_support import GuardedPostgres, guarded_postgres, migrate
from sqlalchemy import Insert, column, insert, select, text
from sqlalchemy import table as lightweight_table
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import DBAPIError, IntegrityError

from bastion.audit._guards import (
    GUARD_SQLSTATE,
    check_guards,
    enter_prune_path,
    guard_statements,
    install_guards,
    leave_prune_path,
)
from bastion.audit._tables import APPEND_ONLY_TABLES, checkpoints, entries, nodes, pruned, segments
from bastion.data import Database, MigrationTree
from bastion.settings import DatabaseSettings

LEAF = bytes(32)
NOW = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def entry_row(log_id: str = "global", seq: int = 0, leaf_hash: bytes = LEAF) -> dict:
    return {
        "log_id": log_id,
        "seq": seq,
        "id": uuid.uuid4(),
        "occurred_at": NOW,
        "action": "auth.login.success",
        "outcome": "success",
        "actor_type": "user",
        "details": "{}",
        "leaf_hash": leaf_hash,
    }


SEGMENT_ID = uuid.uuid4()
ROWS = {
    "bastion_audit_entries": (entries, entry_row()),
    "bastion_audit_nodes": (nodes, {"log_id": "global", "level": 8, "index": 0, "hash": LEAF}),
    "bastion_audit_checkpoints": (
        checkpoints,
        {
            "id": uuid.uuid4(),
            "log_id": "global",
            "tree_size": 1,
            "root_hash": LEAF,
            "created_at": NOW,
            "key_name": "k",
            "note": "n",
        },
    ),
    "bastion_audit_segments": (
        segments,
        {
            "id": SEGMENT_ID,
            "log_id": "global",
            "entry_count": 1,
            "first_seq": 0,
            "last_seq": 0,
            "tree_size": 1,
            "archive_name": "a",
            "archive_sha256": LEAF,
            "created_at": NOW,
        },
    ),
    "bastion_audit_pruned": (
        pruned,
        {"log_id": "other", "seq": 0, "leaf_hash": LEAF, "segment_id": SEGMENT_ID},
    ),
}
"""One row of every append-only table."""

FORBIDDEN = {
    "UPDATE": "UPDATE {table} SET log_id = log_id",
    "DELETE": "DELETE FROM {table}",
    "TRUNCATE": "TRUNCATE {table}",
}


MERGE = (
    "MERGE INTO {table} AS t USING (SELECT 'global' AS log_id) AS s ON t.log_id = s.log_id "
    "WHEN MATCHED THEN DELETE"
)
"""MERGE deleting the rows it matches (PostgreSQL 15+)."""


def upsert(dialect: str, name: str) -> Insert:
    """``INSERT .. ON CONFLICT (primary key) DO UPDATE`` of a row already in table ``name``."""
    table, row = ROWS[name]
    statement = (postgresql.insert if dialect == "postgresql" else sqlite.insert)(table).values(row)
    keys = [column.name for column in table.primary_key.columns]
    return statement.on_conflict_do_update(
        index_elements=keys, set_={keys[0]: statement.excluded[keys[0]]}
    )


def replaced(name: str) -> dict:
    """The row of table ``name`` in ``ROWS``, its keys kept and every other column changed."""
    table, row = ROWS[name]
    keys = {column.name for column in table.primary_key.columns}
    changed = {"leaf_hash": b"\x01" * 32, "hash": b"\x01" * 32, "root_hash": b"\x01" * 32}
    changed |= {"archive_sha256": b"\x01" * 32, "note": "forged", "segment_id": uuid.uuid4()}
    if "id" not in keys:
        changed["id"] = uuid.uuid4()
    return {**row, **{name: value for name, value in changed.items() if name in row}}


def sqlstate(error: DBAPIError) -> str | None:
    return getattr(error.orig, "sqlstate", None) or getattr(
        getattr(error.orig, "__cause__", None), "sqlstate", None
    )


async def fill(db: Database) -> None:
    """One row in every append-only table."""
    async with db.engine.begin() as connection:
        for table, row in ROWS.values():
            await connection.execute(insert(table).values(row))


@pytest.fixture(scope="module")
def _guarded(_postgres_session_url) -> Iterator[GuardedPostgres | None]:
    if _postgres_session_url is None:
        yield None
        return
    with guarded_postgres() as guarded:
        yield guarded


@pytest.fixture
async def guarded(request, _guarded) -> GuardedPostgres:
    """The migrated PostgreSQL database, with one row in every append-only table."""
    request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
    assert _guarded is not None
    owner = Database(DatabaseSettings(url=_guarded.owner_url))
    try:
        async with owner.engine.connect() as connection:
            present = await connection.scalar(text("SELECT count(*) FROM bastion_audit_entries"))
        if not present:
            await fill(owner)
    finally:
        await owner.aclose()
    return _guarded


@pytest.fixture
async def sqlite_db(tmp_path: Path) -> AsyncIterator[Database]:
    """A migrated SQLite database with one row in every append-only table."""
    url = f"sqlite+aiosqlite:///{tmp_path / 'guards.db'}"
    await migrate(url)
    db = Database(DatabaseSettings(url=url))
    await fill(db)
    yield db
    await db.aclose()


PRUNED_SEQ = 5
COVERING = (None, 5, 5)
"""A segment of the entry's own log over [5, 5] (log None: the entry's)."""
UNCOVERING = {
    "unknown": None,
    "other-log": ("global", 0, 10),
    "before": (None, 0, 4),
    "after": (None, 6, 10),
}
"""Segments that do not cover an entry at seq 5: (log, first_seq, last_seq), or no segment row."""


async def archive(url: str, log_id: str, segment: tuple[str | None, int, int] | None) -> None:
    """Entry ``log_id``/5, its leaf in bastion_audit_pruned, under ``segment`` (None: no row)."""
    segment_id = uuid.uuid4()
    db = Database(DatabaseSettings(url=url))
    try:
        async with db.engine.begin() as connection:
            await connection.execute(insert(entries).values(entry_row(log_id, PRUNED_SEQ)))
            if segment is not None:
                owner, first, last = segment
                row = {**ROWS["bastion_audit_segments"][1], "id": segment_id}
                row |= {"log_id": owner or log_id, "first_seq": first, "last_seq": last}
                await connection.execute(insert(segments).values(row))
            await connection.execute(
                insert(pruned).values(
                    log_id=log_id, seq=PRUNED_SEQ, leaf_hash=LEAF, segment_id=segment_id
                )
            )
    finally:
        await db.aclose()


async def prune_as(url: str, log_id: str) -> int:
    """Delete ``log_id``'s entries through the prune path as ``url``'s role; the rows deleted."""
    db = Database(DatabaseSettings(url=url))
    try:
        async with db.engine.begin() as connection:
            await enter_prune_path(connection, log_id)
            deleted = await connection.execute(
                text("DELETE FROM bastion_audit_entries WHERE log_id = :log_id"), {"log_id": log_id}
            )
            await leave_prune_path(connection, log_id)
    finally:
        await db.aclose()
    return deleted.rowcount


async def run_as(url: str, *statements: str) -> None:
    """Run statements in one transaction as ``url``'s role."""
    db = Database(DatabaseSettings(url=url))
    try:
        async with db.engine.begin() as connection:
            for statement in statements:
                await connection.execute(text(statement))
    finally:
        await db.aclose()


@pytest.mark.postgres
class TestPostgresOwner:
    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    @pytest.mark.parametrize("verb", list(FORBIDDEN))
    async def test_owner_lacks_the_privilege(self, guarded, table, verb):
        """The role that ran the migrations may not UPDATE, DELETE or TRUNCATE an audit table."""
        with pytest.raises(DBAPIError) as caught:
            await run_as(guarded.owner_url, FORBIDDEN[verb].format(table=table))

        assert "42501" == sqlstate(caught.value)

    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    async def test_owner_upsert_is_refused(self, guarded, table):
        """INSERT .. ON CONFLICT DO UPDATE needs the UPDATE privilege the owner lacks."""
        db = Database(DatabaseSettings(url=guarded.owner_url))
        try:
            with pytest.raises(DBAPIError) as caught:
                async with db.engine.begin() as connection:
                    await connection.execute(upsert("postgresql", table))
        finally:
            await db.aclose()

        assert "42501" == sqlstate(caught.value)

    async def test_owner_inserts_and_selects(self, guarded):
        """INSERT and SELECT stay open to the owner (the application's writes and reads)."""
        db = Database(DatabaseSettings(url=guarded.owner_url))
        try:
            async with db.engine.begin() as connection:
                await connection.execute(insert(entries).values(entry_row("inserted", 0)))
                count = await connection.scalar(
                    text("SELECT count(*) FROM bastion_audit_entries WHERE log_id = 'inserted'")
                )
        finally:
            await db.aclose()

        assert 1 == count


@pytest.mark.postgres
class TestPostgresSuperuser:
    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    @pytest.mark.parametrize("verb", list(FORBIDDEN))
    async def test_triggers_refuse_a_superuser(self, guarded, table, verb):
        """A superuser, whom grants do not stop, is refused by the triggers."""
        with pytest.raises(DBAPIError, match="append-only") as caught:
            await run_as(guarded.superuser_url, FORBIDDEN[verb].format(table=table))

        assert GUARD_SQLSTATE == sqlstate(caught.value)

    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    async def test_upsert_refuses_a_superuser(self, guarded, table):
        """INSERT .. ON CONFLICT DO UPDATE fires the UPDATE statement trigger, which refuses it."""
        db = Database(DatabaseSettings(url=guarded.superuser_url))
        try:
            with pytest.raises(DBAPIError, match=r"UPDATE on \w+ is refused") as caught:
                async with db.engine.begin() as connection:
                    await connection.execute(upsert("postgresql", table))
        finally:
            await db.aclose()

        assert GUARD_SQLSTATE == sqlstate(caught.value)

    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    async def test_merge_refuses_a_superuser(self, guarded, table):
        """MERGE .. WHEN MATCHED THEN DELETE fires the DELETE statement trigger: refused."""
        with pytest.raises(DBAPIError, match=r"DELETE on \w+ is refused") as caught:
            await run_as(guarded.superuser_url, MERGE.format(table=table))

        assert GUARD_SQLSTATE == sqlstate(caught.value)

    async def test_update_matching_no_row_is_refused(self, guarded):
        """The statement-level trigger refuses an UPDATE even when it would change nothing."""
        with pytest.raises(DBAPIError, match="append-only"):
            await run_as(
                guarded.superuser_url, "UPDATE bastion_audit_nodes SET level = 0 WHERE false"
            )

    async def test_superuser_with_the_setting_cannot_prune(self, guarded):
        """The prune setting does not let a superuser delete: membership must be explicit."""
        with pytest.raises(DBAPIError, match="append-only"):
            await run_as(
                guarded.superuser_url,
                "SET LOCAL bastion.audit_prune = 'on'",
                "DELETE FROM bastion_audit_entries WHERE log_id = 'global'",
            )


@pytest.mark.postgres
class TestPostgresMaintenance:
    async def test_member_with_the_setting_deletes_archived_entries(self, guarded):
        """A direct member of the maintenance role, with the setting, deletes an archived entry."""
        await archive(guarded.owner_url, "prunable", COVERING)

        deleted = await prune_as(guarded.maintenance_url, "prunable")

        assert 1 == deleted

    @pytest.mark.parametrize("segment", list(UNCOVERING))
    async def test_entry_without_a_covering_segment_is_refused(self, guarded, segment):
        """A leaf archived under a segment unknown, of another log or not covering it: refused."""
        log_id = f"uncovered-{segment}"
        await archive(guarded.owner_url, log_id, UNCOVERING[segment])

        with pytest.raises(DBAPIError, match="not archived") as caught:
            await prune_as(guarded.maintenance_url, log_id)

        assert GUARD_SQLSTATE == sqlstate(caught.value)

    async def test_member_without_the_setting_is_refused(self, guarded):
        """Membership alone does not delete: the transaction must opt in."""
        with pytest.raises(DBAPIError, match="append-only"):
            await run_as(guarded.maintenance_url, "DELETE FROM bastion_audit_entries")

    async def test_entry_not_archived_is_refused(self, guarded):
        """The maintenance path deletes no entry whose leaf is not in bastion_audit_pruned."""
        with pytest.raises(DBAPIError, match="not archived"):
            await run_as(
                guarded.maintenance_url,
                "SET LOCAL bastion.audit_prune = 'on'",
                "DELETE FROM bastion_audit_entries WHERE log_id = 'global'",
            )

    @pytest.mark.parametrize("verb", ["UPDATE", "TRUNCATE"])
    async def test_member_may_not_update_or_truncate(self, guarded, verb):
        """The maintenance role deletes entries; it may not UPDATE or TRUNCATE them."""
        with pytest.raises(DBAPIError) as caught:
            await run_as(
                guarded.maintenance_url,
                "SET LOCAL bastion.audit_prune = 'on'",
                FORBIDDEN[verb].format(table="bastion_audit_entries"),
            )

        assert "42501" == sqlstate(caught.value)


@pytest.mark.postgres
class TestPostgresCheck:
    async def test_migrated_database_has_every_guard(self, guarded):
        """check_guards finds nothing missing after the migrations."""
        db = Database(DatabaseSettings(url=guarded.owner_url))
        try:
            async with db.engine.connect() as connection:
                problems = await check_guards(connection)
        finally:
            await db.aclose()

        assert [] == problems

    async def test_reports_disabled_trigger_and_grant(self, guarded):
        """A disabled trigger and a role granted UPDATE are each reported."""
        db = Database(DatabaseSettings(url=guarded.superuser_url))
        try:
            async with db.engine.connect() as connection, connection.begin() as transaction:
                await connection.execute(
                    text(
                        "ALTER TABLE bastion_audit_nodes DISABLE TRIGGER bastion_audit_append_only"
                    )
                )
                await connection.execute(
                    text("GRANT UPDATE ON bastion_audit_checkpoints TO PUBLIC")
                )
                problems = await check_guards(connection)
                await transaction.rollback()
        finally:
            await db.aclose()

        assert [
            "trigger bastion_audit_append_only on bastion_audit_nodes is disabled",
            "role PUBLIC holds UPDATE on bastion_audit_checkpoints",
        ] == problems

    @pytest.mark.parametrize(
        ("statement", "problem"),
        [
            (
                "ALTER TABLE bastion_audit_pruned ENABLE REPLICA TRIGGER bastion_audit_append_only",
                "trigger bastion_audit_append_only on bastion_audit_pruned fires only in replica "
                "mode (ENABLE REPLICA TRIGGER), not in ordinary sessions",
            ),
            (
                "SET LOCAL session_replication_role = replica",
                "session_replication_role is 'replica' in this session: "
                "the guard triggers do not fire in it",
            ),
            (
                "ALTER DATABASE {database} SET session_replication_role = replica",
                "session_replication_role defaults to 'replica' for every role in {database}: "
                "the guard triggers do not fire in those sessions",
            ),
            (
                "ALTER ROLE {owner} SET session_replication_role = replica",
                "session_replication_role defaults to 'replica' for {owner} in every database: "
                "the guard triggers do not fire in those sessions",
            ),
            (
                "GRANT SET ON PARAMETER session_replication_role TO {owner}",
                "role {owner} may SET session_replication_role: "
                "it can turn the guard triggers off in its sessions",
            ),
        ],
        ids=["replica-trigger", "session", "database-default", "role-default", "grant-set"],
    )
    async def test_reports_what_lets_triggers_be_skipped(self, guarded, statement, problem):
        """A trigger fired only in replica mode, or replica mode in reach, is reported."""
        names = {"database": guarded.name, "owner": guarded.owner}
        db = Database(DatabaseSettings(url=guarded.superuser_url))
        try:
            async with db.engine.connect() as connection, connection.begin() as transaction:
                await connection.execute(text(statement.format(**names)))
                problems = await check_guards(connection)
                await transaction.rollback()
        finally:
            await db.aclose()

        assert [problem.format(**names)] == problems

    async def test_install_guards_on_create_all_tables(self, database):
        """install_guards gives tables made by create_all every guard (the current SQL)."""
        async with database.engine.begin() as connection:
            before = await check_guards(connection)
            await install_guards(connection)
        async with database.engine.connect() as connection:
            after = await check_guards(connection)

        assert before
        assert [] == after


class TestSqlite:
    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    @pytest.mark.parametrize("verb", ["UPDATE", "DELETE"])
    async def test_forbidden_statement_raises(self, sqlite_db, table, verb):
        """Each UPDATE and DELETE of an audit table aborts with the guard's message."""
        with pytest.raises(IntegrityError, match="append-only"):
            async with sqlite_db.engine.begin() as connection:
                await connection.execute(text(FORBIDDEN[verb].format(table=table)))

    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    async def test_insert_or_replace_is_refused(self, sqlite_db, table):
        """INSERT OR REPLACE over an existing row aborts, and the row stays as it was."""
        model, row = ROWS[table]
        with pytest.raises(IntegrityError, match="append-only"):
            async with sqlite_db.engine.begin() as connection:
                await connection.execute(
                    insert(model).prefix_with("OR REPLACE").values(replaced(table))
                )
        async with sqlite_db.engine.connect() as connection:
            stored = (await connection.execute(select(model))).mappings().all()

        assert [row] == [{name: item[name] for name in row} for item in stored]

    async def test_insert_or_replace_of_an_entry_id_is_refused(self, sqlite_db):
        """An entry at a new position but with a recorded id does not replace that entry."""
        recorded = ROWS["bastion_audit_entries"][1]
        with pytest.raises(IntegrityError, match="append-only"):
            async with sqlite_db.engine.begin() as connection:
                await connection.execute(
                    insert(entries).prefix_with("OR REPLACE").values({**recorded, "seq": 7})
                )

    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    async def test_insert_or_replace_naming_a_rowid_is_refused(self, sqlite_db, table):
        """New keys but a taken rowid: REPLACE would delete the row owning that rowid."""
        model, row = ROWS[table]
        with_rowid = lightweight_table(
            table, *(column(item.name, item.type) for item in model.columns), column("rowid")
        )
        fresh = {**row, "log_id": "fresh"} | ({"id": uuid.uuid4()} if "id" in row else {})
        async with sqlite_db.engine.connect() as connection:
            fresh["rowid"] = await connection.scalar(select(column("rowid")).select_from(model))
        with pytest.raises(IntegrityError, match="append-only"):
            async with sqlite_db.engine.begin() as connection:
                await connection.execute(insert(with_rowid).prefix_with("OR REPLACE").values(fresh))

    @pytest.mark.parametrize("table", APPEND_ONLY_TABLES)
    async def test_upsert_is_refused(self, sqlite_db, table):
        """INSERT .. ON CONFLICT DO UPDATE over an existing row aborts (an UPDATE)."""
        with pytest.raises(IntegrityError, match="append-only"):
            async with sqlite_db.engine.begin() as connection:
                await connection.execute(upsert("sqlite", table))

    async def test_new_rows_are_inserted(self, sqlite_db):
        """The checks refuse taken keys only: rows at new keys go in, many at once."""
        async with sqlite_db.engine.begin() as connection:
            await connection.execute(
                insert(entries), [entry_row("appended", seq) for seq in range(3)]
            )
            count = await connection.scalar(
                text("SELECT count(*) FROM bastion_audit_entries WHERE log_id = 'appended'")
            )

        assert 3 == count

    async def test_prune_grant_lets_archived_entries_go(self, sqlite_db):
        """With the log's grant row and its leaf archived, an entry may be deleted."""
        async with sqlite_db.engine.begin() as connection:
            await connection.execute(
                insert(pruned).values(log_id="global", seq=0, leaf_hash=LEAF, segment_id=SEGMENT_ID)
            )
            await enter_prune_path(connection, "global")
            deleted = await connection.execute(text("DELETE FROM bastion_audit_entries"))
            await leave_prune_path(connection, "global")
            grants = await connection.scalar(
                text("SELECT count(*) FROM bastion_audit_prune_grants")
            )

        assert (1, 0) == (deleted.rowcount, grants)

    async def test_grant_without_archived_leaf_is_refused(self, sqlite_db):
        """A grant row alone does not delete an entry whose leaf is not archived."""

        async def prune() -> None:
            async with sqlite_db.engine.begin() as connection:
                await enter_prune_path(connection, "global")
                await connection.execute(text("DELETE FROM bastion_audit_entries"))

        with pytest.raises(IntegrityError, match="append-only"):
            await prune()

    async def test_covering_segment_lets_the_entry_go(self, sqlite_db):
        """With the grant, an entry archived under a segment of its log covering it is deleted."""
        await archive(str(sqlite_db.engine.url), "prunable", COVERING)

        deleted = await prune_as(str(sqlite_db.engine.url), "prunable")

        assert 1 == deleted

    @pytest.mark.parametrize("segment", list(UNCOVERING))
    async def test_entry_without_a_covering_segment_is_refused(self, sqlite_db, segment):
        """A leaf archived under a segment unknown, of another log or not covering it: refused."""
        await archive(str(sqlite_db.engine.url), "uncovered", UNCOVERING[segment])

        with pytest.raises(IntegrityError, match="append-only"):
            await prune_as(str(sqlite_db.engine.url), "uncovered")

    async def test_check_guards_names_a_missing_replace_trigger(self, sqlite_db):
        """A dropped INSERT OR REPLACE trigger is reported as such."""
        async with sqlite_db.engine.begin() as connection:
            await connection.execute(text("DROP TRIGGER bastion_audit_pruned_no_replace"))
            problems = await check_guards(connection)

        assert [
            "trigger bastion_audit_pruned_no_replace is missing: INSERT OR REPLACE on "
            "bastion_audit_pruned is not refused"
        ] == problems

    async def test_check_guards(self, sqlite_db):
        """check_guards finds nothing missing after the migrations, and names a dropped trigger."""
        async with sqlite_db.engine.connect() as connection:
            before = await check_guards(connection)
        async with sqlite_db.engine.begin() as connection:
            await connection.execute(text("DROP TRIGGER bastion_audit_nodes_no_delete"))
        async with sqlite_db.engine.connect() as connection:
            after = await check_guards(connection)

        assert [] == before
        assert [
            "trigger bastion_audit_nodes_no_delete is missing: DELETE on bastion_audit_nodes "
            "is not refused"
        ] == after


class TestFrozenCopies:
    @pytest.mark.parametrize("dialect", ["postgresql", "sqlite"])
    def test_migration_copy_matches_current_guards(self, dialect):
        """0003_audit installs the current guards (a change to them needs a new revision)."""
        versions = Path(str(MigrationTree.bastion().directory())) / "versions"
        frozen = (versions / f"0003_audit_guards.{dialect}.sql").read_text("utf-8")
        current = importlib.resources.files("bastion.audit") / "sql" / f"guards.{dialect}.sql"

        assert current.read_text("utf-8") == frozen

    def test_statements_are_split_on_semicolon_lines(self):
        """Each statement of the file is one item, function bodies whole."""
        statements = guard_statements("postgresql")

        assert 8 == len(statements)
        assert "CREATE OR REPLACE FUNCTION bastion_audit_refuse()" in statements[3]
        assert statements[3].endswith("END\n$$")

    def test_unknown_dialect(self):
        """Only PostgreSQL and SQLite have guards."""
        with pytest.raises(ValueError, match="mysql"):
            guard_statements("mysql")
