"""An import is audited flag by flag, as single writes are, in its own transaction."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from flags_store_support import (
    MASTER,
    audit_rows,
    boolean_flag,
    change_rows,
    fresh_tables,
    sync_audit,
)
from sqlalchemy import select

from bastion.audit import Actor, AuditLog
from bastion.audit._subjects import SubjectKeys
from bastion.audit._tables import entries
from bastion.data import Database
from bastion.errors import InvalidInput
from bastion.flags._model import Constraint, Flag, Operator, Rule, Segment
from bastion.flags._store import OPERATOR_MAX, FlagStore, check_operator
from bastion.settings import AuditSettings

ALICE = Actor.user("alice")
OPERATOR = Actor.system("operator")
STAFF = Segment(
    name="staff",
    constraints=(Constraint(context="roles", operator=Operator.IN, values=("admin",)),),
)


def cites_staff(key: str) -> Flag:
    return Flag(key=key, enabled=True, rules=(Rule(segments=("staff",)),))


@pytest.fixture(params=["sqlite", "postgres"])
async def database(request, sqlite_url: str, _module_postgres) -> AsyncIterator[Database]:
    """Empty flag and audit tables, on SQLite and on PostgreSQL."""
    url = sqlite_url
    if request.param == "postgres":
        request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
        url = _module_postgres
    database = await fresh_tables(url)
    yield database
    await database.aclose()


@pytest.fixture
def store(database: Database) -> FlagStore:
    """A store recording into a ``sync`` audit log on the same database."""
    return FlagStore(database, audit=sync_audit(database))


class TestImportAudit:
    async def test_each_flag_and_segment_written_has_its_event(self, store, database):
        """Creates, updates and deletes of an import are each audited, then the summary."""
        await store.create(boolean_flag("changed"), actor=ALICE)
        await store.create(boolean_flag("same"), actor=ALICE)
        await store.create(boolean_flag("gone"), actor=ALICE)
        await store.put_segment(
            Segment(name="old", constraints=STAFF.constraints), expected_version=None, actor=ALICE
        )
        before = len(await audit_rows(database))

        await store.import_flags(
            [boolean_flag("changed", enabled=True), boolean_flag("same"), cites_staff("new")],
            [STAFF],
            actor=OPERATOR,
            replace=True,
        )

        via = {"via": "import"}
        assert [
            ("flag.segment.update", "staff", {"version": 1, **via}),
            ("flag.update", "changed", {"version": 2, "changed": ["enabled"], **via}),
            ("flag.create", "new", {"version": 1, **via}),
            ("flag.delete", "gone", {"version": 1, **via}),
            ("flag.segment.delete", "old", {"version": 1, **via}),
            (
                "flag.import",
                None,
                {
                    "created": 1,
                    "updated": 1,
                    "unchanged": 1,
                    "deleted": 1,
                    "segments_created": 1,
                    "segments_updated": 0,
                    "segments_deleted": 1,
                    "replace": True,
                },
            ),
        ] == (await audit_rows(database))[before:]

    async def test_events_name_the_actor_and_the_claimed_operator(self, store, database):
        """Each event of an import is by its actor, with the operator's claimed name."""
        await store.import_flags(
            [boolean_flag("a"), boolean_flag("b")], [], actor=OPERATOR, operator="alice"
        )

        async with database.session() as session:
            rows = (
                await session.execute(
                    select(entries.c.action, entries.c.actor_type, entries.c.actor_id)
                    .where(entries.c.action.startswith("flag."))
                    .order_by(entries.c.seq)
                )
            ).all()
        assert [
            ("flag.create", "system", "operator"),
            ("flag.create", "system", "operator"),
            ("flag.import", "system", "operator"),
        ] == [tuple(row) for row in rows]
        assert {"alice"} == {details["operator"] for _, _, details in await audit_rows(database)}
        assert {"system:operator (claimed: alice)"} == {
            row.actor for row in await change_rows(database)
        }
        assert "system:operator (claimed: alice)" == (await store.get("a")).updated_by

    async def test_an_event_refused_mid_import_undoes_the_whole_import(self, database):
        """The trail refusing one event rolls back the flags, changes and events before it."""
        audit = sync_audit(database)
        recorded = 0
        record = audit.record

        async def refuse_the_third(event, *, session=None):
            nonlocal recorded
            recorded += 1
            if recorded == 3:
                raise RuntimeError("audit trail refused the event")
            return await record(event, session=session)

        audit.record = refuse_the_third
        store = FlagStore(database, audit=audit)

        with pytest.raises(RuntimeError):
            await store.import_flags(
                [boolean_flag("a"), boolean_flag("b"), boolean_flag("c")], [], actor=OPERATOR
            )

        assert ([], [], []) == (
            await store.list(),
            await change_rows(database),
            await audit_rows(database),
        )

    async def test_unchanged_import_records_nothing(self, store, database):
        """Importing what is stored records no event at all."""
        await store.import_flags([boolean_flag("a")], [STAFF], actor=OPERATOR)
        before = await audit_rows(database)

        await store.import_flags([boolean_flag("a")], [STAFF], actor=OPERATOR)

        assert before == await audit_rows(database)

    async def test_a_large_import_is_one_transaction_of_events(self, store, database):
        """Five hundred flags: one event each plus the summary, one revision move."""
        revision = await store.revision()
        keys = [f"bulk-{index:03}" for index in range(500)]

        report = await store.import_flags([boolean_flag(key) for key in keys], [], actor=OPERATOR)

        created = [row[1] for row in await audit_rows(database) if row[0] == "flag.create"]
        assert (keys, 500) == (created, len(report.created))
        assert revision + 500 == report.revision


class TestOperatorName:
    @pytest.mark.parametrize(
        "name", ["", "   ", "a\nb", "a\rb", "tab\there", "x" * (OPERATOR_MAX + 1), "rtl\u202eoff"]
    )
    async def test_bad_names_are_refused_before_anything_is_written(self, store, database, name):
        """A claimed name that is empty, multi-line, too long or invisible is 422, nothing kept."""
        with pytest.raises(InvalidInput) as raised:
            await store.create(boolean_flag("a"), actor=OPERATOR, operator=name)

        assert ["operator"] == [error.field for error in raised.value.errors]
        assert ([], []) == (await store.list(), await audit_rows(database))

    def test_names_are_trimmed_and_may_be_any_script(self):
        """Surrounding space is dropped; letters of any script, dots and @ are kept."""
        assert "Zoë O'Brien-Łukasz@ops" == check_operator("  Zoë O'Brien-Łukasz@ops ")
        assert check_operator(None) is None


class TestLargeImportsInAsyncMode:
    async def test_an_import_larger_than_the_buffer_commits_and_is_audited_flag_by_flag(
        self, database
    ):
        """In async mode an import's events are staged on its transaction only while they
        fit a quarter of the buffer; beyond that they follow the commit, so an import larger
        than the whole buffer neither fails nor takes the buffer from other requests."""
        keys = SubjectKeys(database=database, master_key=MASTER, cache_ttl=60)
        audit = AuditLog(
            AuditSettings(mode="async", buffer_size=40, enqueue_timeout=1.0),
            database=database,
            subject_keys=keys,
        )
        await audit.start()
        try:
            store = FlagStore(database, audit=audit)
            small = [boolean_flag(f"small-{n}") for n in range(10)]
            large = [boolean_flag(f"large-{n}") for n in range(60)]
            await store.import_flags(small, [], actor=OPERATOR)
            await store.import_flags(large, [], actor=OPERATOR)
            await audit.flush()
        finally:
            await audit.stop()

        created = [key for action, key, _ in await audit_rows(database) if action == "flag.create"]
        assert sorted(f.key for f in small + large) == sorted(created)
        assert 2 == sum(1 for row in await audit_rows(database) if row[0] == "flag.import")
