"""The flag store: versions, optimistic concurrency, history, audit, segments, import, schedule."""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import AsyncIterator

import orjson
import pytest
from flags_store_support import audit_rows, boolean_flag, change_rows, fresh_tables, sync_audit
from prometheus_client import REGISTRY
from sqlalchemy import update

from bastion.audit import Actor
from bastion.data import Database
from bastion.flags._engine import FlagSet
from bastion.flags._errors import (
    FlagExists,
    FlagNotFound,
    FlagVersionMismatch,
    InvalidFlag,
    SegmentInUse,
    SegmentNotFound,
    StoredFlagInvalid,
)
from bastion.flags._model import (
    Constraint,
    Flag,
    Operator,
    Rule,
    ScheduledChange,
    Segment,
    TenantOverride,
    Variant,
)
from bastion.flags._store import SCHEDULE_ACTOR, FlagStore
from bastion.flags._tables import flags as flags_table
from bastion.settings import DatabaseSettings

ALICE = Actor.user("alice")
BOB = Actor.user("bob")
T0 = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)

BETA_USERS = Segment(
    name="beta-users",
    id=7,
    constraints=(Constraint(context="userId", operator=Operator.IN, values=("u1", "u2")),),
)


def in_segment(key: str, *segments: str | int) -> Flag:
    return Flag(key=key, enabled=True, rules=(Rule(segments=segments),))


@pytest.fixture(params=["sqlite", "postgres"])
async def url(request, sqlite_url: str, _module_postgres) -> str:
    """The database URL, on SQLite and on PostgreSQL (a module database of its own)."""
    if request.param == "sqlite":
        return sqlite_url
    request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
    return _module_postgres


@pytest.fixture
async def database(url: str) -> AsyncIterator[Database]:
    """Empty flag and audit tables."""
    database = await fresh_tables(url)
    yield database
    await database.aclose()


class Clock:
    """A settable clock: the store's now."""

    def __init__(self, now: dt.datetime = T0) -> None:
        self.now = now

    def __call__(self) -> dt.datetime:
        return self.now


@pytest.fixture
def clock() -> Clock:
    """The store's clock, at ``T0`` until a test moves it."""
    return Clock()


@pytest.fixture
def store(database: Database, clock: Clock) -> FlagStore:
    """A store recording into a ``sync`` audit log on the same database, its clock at ``T0``."""
    # A fixed clock: schedule entries around T0 must not fall due with the real time.
    return FlagStore(database, audit=sync_audit(database), clock=clock)


class TestFlagWrites:
    async def test_create_then_get_and_list(self, store):
        """A created flag is read back at version 1, by whom it was written."""
        created = await store.create(boolean_flag(description="the new editor"), actor=ALICE)

        stored = await store.get("new-editor")
        assert (1, "user:alice", "the new editor") == (
            stored.version,
            stored.updated_by,
            stored.flag.description,
        )
        assert created.etag == stored.etag
        assert ["new-editor"] == [item.flag.key for item in await store.list()]

    async def test_create_refuses_a_taken_key(self, store):
        """Create only creates: a second create of one key is a 409, not an overwrite."""
        await store.create(boolean_flag(), actor=ALICE)

        with pytest.raises(FlagExists):
            await store.create(boolean_flag(enabled=True), actor=BOB)
        assert not (await store.get("new-editor")).flag.enabled

    async def test_update_bumps_version_and_etag(self, store):
        """Each change makes a new version and a new ETag."""
        first = await store.create(boolean_flag(), actor=ALICE)

        second = await store.update(boolean_flag(owner="team-a"), expected_version=1, actor=BOB)

        assert (2, "team-a", "user:bob") == (second.version, second.flag.owner, second.updated_by)
        assert first.etag != second.etag

    async def test_stale_version_is_refused_with_the_current_one(self, store):
        """A write against a version that moved is a 412 carrying the current version."""
        await store.create(boolean_flag(), actor=ALICE)
        await store.toggle("new-editor", True, expected_version=1, actor=ALICE)

        with pytest.raises(FlagVersionMismatch) as raised:
            await store.update(boolean_flag(owner="x"), expected_version=1, actor=BOB)

        assert 2 == raised.value.current_version
        assert 412 == raised.value.status
        assert (await store.get("new-editor")).flag.owner is None

    async def test_no_expected_version_means_no_precondition(self, store):
        """``expected_version=None`` (the CLI's --force) writes over whatever version is there."""
        await store.create(boolean_flag(), actor=ALICE)
        await store.toggle("new-editor", True, expected_version=None, actor=ALICE)

        stored = await store.toggle("new-editor", False, expected_version=None, actor=BOB)

        assert (3, False) == (stored.version, stored.flag.enabled)

    async def test_missing_flag_is_not_found(self, store):
        """Writes to a key that does not exist are 404s."""
        with pytest.raises(FlagNotFound):
            await store.toggle("nope", True, expected_version=None, actor=ALICE)
        with pytest.raises(FlagNotFound):
            await store.delete("nope", expected_version=None, actor=ALICE)
        with pytest.raises(FlagNotFound):
            await store.get("nope")

    async def test_concurrent_writers_of_one_version_one_wins(self, store, url):
        """Two updates against the same version, at once, from two pools: one commits, one 412s."""
        await store.create(boolean_flag(), actor=ALICE)
        other = Database(DatabaseSettings(url=url))
        try:
            rival = FlagStore(other, audit=sync_audit(other))
            results = await asyncio.gather(
                store.update(boolean_flag(owner="alice"), expected_version=1, actor=ALICE),
                rival.update(boolean_flag(owner="bob"), expected_version=1, actor=BOB),
                return_exceptions=True,
            )
        finally:
            await other.aclose()

        mismatches = [r for r in results if isinstance(r, FlagVersionMismatch)]
        winners = [r for r in results if not isinstance(r, BaseException)]
        assert (1, 1) == (len(mismatches), len(winners))
        assert 2 == mismatches[0].current_version
        assert winners[0].flag.owner == (await store.get("new-editor")).flag.owner

    async def test_delete_keeps_history_and_frees_the_key(self, store, clock):
        """A deleted flag is gone but its history stays; a re-created one has a new ETag."""
        first = await store.create(boolean_flag(), actor=ALICE)
        await store.delete("new-editor", expected_version=1, actor=BOB)

        with pytest.raises(FlagNotFound):
            await store.get("new-editor")
        clock.now += dt.timedelta(seconds=1)
        again = await store.create(boolean_flag(), actor=ALICE)

        assert ["create", "delete", "create"] == [
            change.action for change in reversed(await store.history("new-editor"))
        ]
        assert 1 == again.version
        assert first.etag != again.etag


class TestChangesAndAudit:
    async def test_each_write_has_a_change_row_with_before_and_after(self, store, database):
        """History names who changed what, with the definition before and after."""
        await store.create(boolean_flag(), actor=ALICE)
        await store.toggle("new-editor", True, expected_version=1, actor=BOB)

        latest, first = await store.history("new-editor")

        assert ("toggle", 2, "user:bob") == (latest.action, latest.version, latest.actor)
        assert (False, True) == (latest.before["enabled"], latest.after["enabled"])
        assert ("create", None) == (first.action, first.before)
        assert latest.id > first.id

    async def test_revision_is_the_last_change(self, store):
        """The set's revision starts at 0 and moves with every write."""
        assert 0 == await store.revision()
        await store.create(boolean_flag(), actor=ALICE)
        after_create = await store.revision()
        await store.toggle("new-editor", True, expected_version=None, actor=ALICE)

        assert 0 < after_create < await store.revision()
        revision, flags, segments = await store.snapshot()
        assert (await store.revision(), ["new-editor"], []) == (
            revision,
            [flag.key for flag in flags],
            segments,
        )

    async def test_audit_events_name_fields_not_values(self, store, database):
        """Audit details carry the version and the changed field names, never the values."""
        await store.create(boolean_flag(), actor=ALICE)
        await store.update(
            boolean_flag(description="secret plan", enabled=True), expected_version=1, actor=BOB
        )
        await store.toggle("new-editor", False, expected_version=2, actor=BOB)
        await store.delete("new-editor", expected_version=3, actor=ALICE)

        assert [
            ("flag.create", "new-editor", {"version": 1}),
            ("flag.update", "new-editor", {"version": 2, "changed": ["description", "enabled"]}),
            ("flag.toggle", "new-editor", {"version": 3, "changed": ["enabled"], "enabled": False}),
            ("flag.delete", "new-editor", {"version": 3}),
        ] == await audit_rows(database)

    async def test_refused_write_leaves_no_trace(self, store, database):
        """A write refused inside its transaction leaves no change row and no audit entry."""
        await store.create(boolean_flag(), actor=ALICE)
        before = (len(await change_rows(database)), len(await audit_rows(database)))

        with pytest.raises(FlagVersionMismatch):
            await store.toggle("new-editor", True, expected_version=5, actor=BOB)
        with pytest.raises(InvalidFlag):
            await store.update(in_segment("new-editor", "ghosts"), expected_version=1, actor=BOB)

        assert before == (len(await change_rows(database)), len(await audit_rows(database)))

    async def test_without_audit_the_store_still_versions(self, database):
        """With the audit trail off, writes still get versions and change rows."""
        store = FlagStore(database)
        await store.create(boolean_flag(), actor=ALICE)

        assert ([], 1) == (await audit_rows(database), len(await change_rows(database)))

    async def test_on_change_gets_the_revision_after_commit(self, store):
        """The hook runs after the commit with the new revision; its failure is not raised."""
        seen: list[tuple[int, int]] = []

        async def on_change(revision: int) -> None:
            seen.append((revision, await store.revision()))
            raise RuntimeError("propagation down")

        store.on_change = on_change
        await store.create(boolean_flag(), actor=ALICE)

        assert [(await store.revision(),) * 2] == seen


class TestSegments:
    async def test_flag_citing_an_unknown_segment_is_invalid(self, store):
        """A rule that names a segment which does not exist is a 422, by name or by id."""
        with pytest.raises(InvalidFlag) as raised:
            await store.create(in_segment("a", "beta-users"), actor=ALICE)
        assert 422 == raised.value.status

        await store.put_segment(BETA_USERS, expected_version=0, actor=ALICE)
        await store.create(in_segment("a", "beta-users"), actor=ALICE)
        await store.create(in_segment("b", 7), actor=ALICE)
        with pytest.raises(InvalidFlag):
            await store.create(in_segment("c", 8), actor=ALICE)

    async def test_segment_in_use_cannot_be_deleted(self, store, database):
        """Deleting a segment a flag cites is a 409 naming the flag; once unused it goes."""
        await store.put_segment(BETA_USERS, expected_version=None, actor=ALICE)
        await store.create(in_segment("a", 7), actor=ALICE)

        with pytest.raises(SegmentInUse) as raised:
            await store.delete_segment("beta-users", expected_version=None, actor=ALICE)
        assert (409, ["a"]) == (raised.value.status, raised.value.flags)

        await store.delete("a", expected_version=None, actor=ALICE)
        await store.delete_segment("beta-users", expected_version=1, actor=BOB)
        with pytest.raises(SegmentNotFound):
            await store.get_segment("beta-users")
        assert [
            ("flag.segment.update", "beta-users", {"version": 1}),
            ("flag.segment.delete", "beta-users", {"version": 1}),
        ] == [row for row in await audit_rows(database) if row[0].startswith("flag.segment")]

    async def test_segment_versions_are_checked(self, store):
        """A segment write against a moved version is a 412; create-only refuses an existing one."""
        first = await store.put_segment(BETA_USERS, expected_version=0, actor=ALICE)
        changed = BETA_USERS.model_copy(update={"description": "early adopters"})
        second = await store.put_segment(changed, expected_version=1, actor=ALICE)

        with pytest.raises(FlagVersionMismatch):
            await store.put_segment(BETA_USERS, expected_version=1, actor=BOB)
        with pytest.raises(FlagVersionMismatch):
            await store.put_segment(BETA_USERS, expected_version=0, actor=BOB)
        with pytest.raises(SegmentNotFound):
            await store.put_segment(Segment(name="other"), expected_version=3, actor=BOB)
        assert (1, 2, "early adopters") == (
            first.version,
            second.version,
            (await store.get_segment("beta-users")).segment.description,
        )
        assert ["update", "create"] == [
            change.action for change in await store.history("beta-users", kind="segment")
        ]
        assert first.etag != second.etag
        assert second.etag == (await store.get_segment("beta-users")).etag

    async def test_changing_a_cited_segment_id_is_refused(self, store):
        """A segment's Unleash id that rules cite cannot change under them."""
        await store.put_segment(BETA_USERS, expected_version=None, actor=ALICE)
        await store.create(in_segment("a", 7), actor=ALICE)

        with pytest.raises(InvalidFlag):
            await store.put_segment(
                BETA_USERS.model_copy(update={"id": 8}), expected_version=None, actor=ALICE
            )


class TestImport:
    async def test_merge_creates_updates_and_skips_unchanged(self, store, database):
        """A merge import creates new flags, updates changed ones, and leaves equal ones alone."""
        await store.create(boolean_flag("same"), actor=ALICE)
        await store.create(boolean_flag("changed"), actor=ALICE)
        await store.create(boolean_flag("kept"), actor=ALICE)

        report = await store.import_flags(
            [boolean_flag("same"), boolean_flag("changed", enabled=True), in_segment("new", 7)],
            [BETA_USERS],
            actor=BOB,
        )

        assert (["new"], ["changed"], ["same"], [], ["beta-users"]) == (
            report.created,
            report.updated,
            report.unchanged,
            report.deleted,
            report.segments_created,
        )
        assert report.revision == await store.revision()
        versions = {stored.flag.key: stored.version for stored in await store.list()}
        assert {"same": 1, "changed": 2, "kept": 1, "new": 1} == versions
        imports = [row for row in await audit_rows(database) if row[0] == "flag.import"]
        assert [
            (
                "flag.import",
                None,
                {
                    "created": 1,
                    "updated": 1,
                    "unchanged": 1,
                    "deleted": 0,
                    "segments_created": 1,
                    "segments_updated": 0,
                    "segments_deleted": 0,
                    "replace": False,
                },
            )
        ] == imports

    async def test_reimport_changes_nothing(self, store, database):
        """Importing what is stored writes no version, no change row and no audit event."""
        await store.import_flags([boolean_flag("a")], [BETA_USERS], actor=ALICE)
        revision = await store.revision()
        rows = len(await change_rows(database))

        report = await store.import_flags([boolean_flag("a")], [BETA_USERS], actor=ALICE)

        assert (False, ["a"], revision) == (report.changed, report.unchanged, report.revision)
        assert rows == len(await change_rows(database))
        assert 1 == len([row for row in await audit_rows(database) if row[0] == "flag.import"])

    async def test_replace_deletes_what_the_import_lacks(self, store):
        """A replacing import leaves exactly the imported flags and segments."""
        await store.put_segment(BETA_USERS, expected_version=None, actor=ALICE)
        await store.create(in_segment("old", "beta-users"), actor=ALICE)
        await store.create(boolean_flag("kept"), actor=ALICE)

        report = await store.import_flags(
            [boolean_flag("kept", enabled=True)], [], actor=BOB, replace=True
        )

        assert (["old"], ["beta-users"], ["kept"]) == (
            report.deleted,
            report.segments_deleted,
            report.updated,
        )
        assert ["kept"] == [stored.flag.key for stored in await store.list()]
        assert [] == await store.segments()
        assert "import" == (await store.history("old"))[0].action

    async def test_invalid_import_writes_nothing(self, store):
        """An import citing a segment it does not hold (on replace) is refused whole."""
        await store.put_segment(BETA_USERS, expected_version=None, actor=ALICE)

        with pytest.raises(InvalidFlag):
            await store.import_flags(
                [boolean_flag("a"), in_segment("b", "beta-users")], [], actor=BOB, replace=True
            )
        with pytest.raises(InvalidFlag):
            await store.import_flags([boolean_flag("a"), boolean_flag("a")], [], actor=BOB)

        assert [] == await store.list()
        assert 1 == len(await store.segments())


class TestSchedule:
    def scheduled(self, *changes: tuple[int, bool]) -> Flag:
        return boolean_flag(
            "launch",
            schedule=tuple(
                ScheduledChange(at=T0 + dt.timedelta(hours=h), enabled=on) for h, on in changes
            ),
        )

    async def test_due_changes_are_persisted_and_dropped(self, store, database):
        """At a due time the switch takes the last due value; later entries stay scheduled."""
        await store.create(self.scheduled((1, True), (2, False), (5, True)), actor=ALICE)

        assert [] == await store.apply_due(T0)
        applied = await store.apply_due(T0 + dt.timedelta(hours=3))

        stored = await store.get("launch")
        assert (["launch"], False, 2) == (applied, stored.flag.enabled, stored.version)
        assert [T0 + dt.timedelta(hours=5)] == [change.at for change in stored.flag.schedule]
        latest = (await store.history("launch"))[0]
        assert ("schedule", "system:flags.schedule") == (latest.action, latest.actor)
        assert (
            "flag.schedule",
            "launch",
            {"version": 2, "changed": ["schedule"], "enabled": False},
        ) == (await audit_rows(database))[-1]
        assert SCHEDULE_ACTOR.id == "flags.schedule"

    async def test_instances_racing_apply_it_once(self, store, url, database):
        """Stores applying one due change at once write one version, one change row, one event."""
        await store.create(self.scheduled((1, True)), actor=ALICE)
        others = [Database(DatabaseSettings(url=url)) for _ in range(3)]
        try:
            stores = [store, *(FlagStore(db, audit=sync_audit(db)) for db in others)]
            results = await asyncio.gather(
                *(each.apply_due(T0 + dt.timedelta(hours=1)) for each in stores)
            )
        finally:
            for db in others:
                await db.aclose()

        assert [["launch"]] == [result for result in results if result]
        stored = await store.get("launch")
        assert (True, 2, ()) == (stored.flag.enabled, stored.version, stored.flag.schedule)
        assert 1 == len([row for row in await change_rows(database) if row.action == "schedule"])
        assert 1 == len([row for row in await audit_rows(database) if row[0] == "flag.schedule"])


def _at(hours: float) -> dt.datetime:
    return T0 + dt.timedelta(hours=hours)


class TestWritesFoldDueSchedule:
    async def test_create_folds_an_entry_already_due(self, store, database):
        """A flag created with a past entry is stored without it, its switch as the entry set it."""
        flag = boolean_flag(
            "launch",
            schedule=(
                ScheduledChange(at=_at(-1), enabled=True),
                ScheduledChange(at=_at(1), enabled=False),
            ),
        )

        created = await store.create(flag, actor=ALICE)

        stored = await store.get("launch")
        assert (True, [_at(1)]) == (stored.flag.enabled, [c.at for c in stored.flag.schedule])
        assert created.flag == stored.flag
        after = orjson.loads((await change_rows(database))[-1].after)
        assert (True, 1) == (after["enabled"], len(after["schedule"]))

    async def test_toggle_after_an_entry_fell_due_wins(self, store, clock):
        """Toggled after an entry fell due, the toggle is what is stored and served; apply_due
        then finds nothing."""
        await store.create(
            boolean_flag("launch", schedule=(ScheduledChange(at=_at(1), enabled=True),)),
            actor=ALICE,
        )
        clock.now = _at(2)

        toggled = await store.toggle("launch", False, expected_version=1, actor=BOB)

        assert (False, ()) == (toggled.flag.enabled, toggled.flag.schedule)
        served = FlagSet.from_flags([toggled.flag], now=_at(2))
        assert not served.is_enabled("launch")
        assert [] == await store.apply_due(_at(2))
        stored = await store.get("launch")
        assert (False, 2) == (stored.flag.enabled, stored.version)

    async def test_update_and_import_fold_too(self, store, clock):
        """Update and import fold due entries; importing the same file again changes nothing."""
        due = (ScheduledChange(at=_at(-1), enabled=True),)
        await store.create(boolean_flag("a"), actor=ALICE)

        updated = await store.update(
            boolean_flag("a", schedule=due), expected_version=1, actor=ALICE
        )
        imported = [boolean_flag("b", schedule=due)]
        first = await store.import_flags(imported, actor=ALICE)
        again = await store.import_flags(imported, actor=ALICE)

        assert (True, ()) == (updated.flag.enabled, updated.flag.schedule)
        stored = await store.get("b")
        assert (True, ()) == (stored.flag.enabled, stored.flag.schedule)
        assert (["b"], ["b"]) == (first.created, again.unchanged)


class TestEtagPreconditions:
    async def test_etag_of_a_deleted_flag_does_not_match_its_successor(self, store, clock):
        """An If-Match read before a delete and re-create is refused (412) though the version
        matches."""
        old = await store.create(boolean_flag(), actor=ALICE)
        await store.delete("new-editor", expected_version=1, actor=ALICE)
        clock.now += dt.timedelta(seconds=1)
        new = await store.create(boolean_flag(), actor=ALICE)

        for write in (
            store.update(
                boolean_flag(owner="x"), expected_version=None, expected_etag=old.etag, actor=BOB
            ),
            store.toggle(
                "new-editor", True, expected_version=None, expected_etag=old.etag, actor=BOB
            ),
            store.delete("new-editor", expected_version=None, expected_etag=old.etag, actor=BOB),
        ):
            with pytest.raises(FlagVersionMismatch) as refused:
                await write
            assert (1, new.etag) == (refused.value.current_version, refused.value.current_etag)

        toggled = await store.toggle(
            "new-editor", True, expected_version=None, expected_etag=new.etag, actor=BOB
        )
        assert 2 == toggled.version

    async def test_segment_etags_are_checked(self, store):
        """put_segment and delete_segment refuse a stale ETag; a missing segment is not found."""
        stored = await store.put_segment(BETA_USERS, expected_version=0, actor=ALICE)
        changed = await store.put_segment(
            BETA_USERS.model_copy(update={"description": "v2"}),
            expected_version=None,
            expected_etag=stored.etag,
            actor=ALICE,
        )

        with pytest.raises(FlagVersionMismatch):
            await store.put_segment(
                BETA_USERS, expected_version=None, expected_etag=stored.etag, actor=BOB
            )
        with pytest.raises(FlagVersionMismatch):
            await store.delete_segment(
                "beta-users", expected_version=None, expected_etag=stored.etag, actor=BOB
            )
        with pytest.raises(SegmentNotFound):
            await store.put_segment(
                BETA_USERS.model_copy(update={"name": "other", "id": None}),
                expected_version=None,
                expected_etag=stored.etag,
                actor=BOB,
            )
        await store.delete_segment(
            "beta-users", expected_version=None, expected_etag=changed.etag, actor=BOB
        )
        assert [] == await store.segments()


class TestImportPreconditions:
    async def test_fields_limit_what_an_import_sets_on_a_stored_flag(self, store):
        """An import limited to some fields keeps the stored flag's others (owner, tenants)."""
        await store.create(
            boolean_flag(owner="team-a", tenants={"t1": TenantOverride(enabled=True)}),
            actor=ALICE,
        )

        report = await store.import_flags(
            [boolean_flag(enabled=True, description="from unleash")],
            actor=BOB,
            fields=frozenset({"description", "enabled", "rules"}),
        )

        stored = (await store.get("new-editor")).flag
        assert ["new-editor"] == report.updated
        assert (True, "from unleash", "team-a", ["t1"]) == (
            stored.enabled,
            stored.description,
            stored.owner,
            list(stored.tenants),
        )

    async def test_a_merge_that_is_invalid_names_the_flag(self, store):
        """Kept fields that no longer fit the imported ones make a 422 naming the flag."""
        await store.create(
            boolean_flag(
                variants=(Variant(name="blue"),),
                tenants={"t1": TenantOverride(enabled=True, variant="blue")},
            ),
            actor=ALICE,
        )

        with pytest.raises(InvalidFlag, match="new-editor") as refused:
            await store.import_flags([boolean_flag()], actor=BOB, fields=frozenset({"variants"}))

        assert 422 == refused.value.status
        assert 1 == (await store.get("new-editor")).version

    async def test_expected_revision_is_checked(self, store):
        """An import prepared against another revision is refused with the current one."""
        await store.create(boolean_flag("a"), actor=ALICE)
        revision = await store.revision()

        with pytest.raises(FlagVersionMismatch) as refused:
            await store.import_flags([boolean_flag("b")], actor=BOB, expected_revision=revision - 1)
        report = await store.import_flags(
            [boolean_flag("b")], actor=BOB, expected_revision=revision
        )

        assert revision == refused.value.current_version
        assert ["b"] == report.created


class TestSegmentIds:
    async def test_put_refuses_an_id_another_segment_has(self, store):
        """Two segments cannot share an Unleash id: a rule citing it would be ambiguous."""
        await store.put_segment(BETA_USERS, expected_version=0, actor=ALICE)

        with pytest.raises(InvalidFlag, match="same id 7"):
            await store.put_segment(Segment(name="other", id=7), expected_version=0, actor=ALICE)
        # Its own id, kept on an update, is fine.
        await store.put_segment(
            BETA_USERS.model_copy(update={"description": "v2"}), expected_version=1, actor=ALICE
        )
        assert ["beta-users"] == [s.segment.name for s in await store.segments()]

    async def test_import_refuses_shared_ids(self, store):
        """An import whose segments share an id with each other or a stored one writes nothing."""
        await store.put_segment(BETA_USERS, expected_version=0, actor=ALICE)

        with pytest.raises(InvalidFlag, match="same id 7"):
            await store.import_flags([], [Segment(name="other", id=7)], actor=ALICE)
        with pytest.raises(InvalidFlag, match="same id 3"):
            await store.import_flags(
                [], [Segment(name="x", id=3), Segment(name="y", id=3)], actor=ALICE
            )

        assert ["beta-users"] == [s.segment.name for s in await store.segments()]


class TestInvalidStoredRows:
    async def _corrupt(self, database, key: str, definition: dict) -> None:
        async with database.engine.begin() as connection:
            await connection.execute(
                update(flags_table)
                .where(flags_table.c.key == key)
                .values(definition=orjson.dumps(definition).decode())
            )

    async def test_one_invalid_row_does_not_stop_loading(self, store, database):
        """snapshot() and list() skip a row that does not validate, count it; get() of it is a
        500."""
        for key in ("alpha", "broken", "zeta"):
            await store.create(boolean_flag(key, enabled=True), actor=ALICE)
        await self._corrupt(database, "broken", {"key": "broken", "type": "no-such-type"})

        _, loaded, _ = await store.snapshot()

        assert ["alpha", "zeta"] == [flag.key for flag in loaded]
        assert 1 == REGISTRY.get_sample_value("bastion_flags_invalid_rows")
        assert ["alpha", "zeta"] == [stored.flag.key for stored in await store.list()]
        with pytest.raises(StoredFlagInvalid) as failed:
            await store.get("broken")
        assert (500, "INTERNAL") == (failed.value.status, failed.value.code)
        # The rest of the set can still be written around it.
        report = await store.import_flags([boolean_flag("new")], actor=ALICE)
        assert ["new"] == report.created
        assert not await store.empty()

    async def test_unknown_fields_are_ignored_when_read(self, store, database):
        """A field a newer release stored is dropped on read, not fatal (rolling deploys)."""
        await store.create(boolean_flag("future", enabled=True), actor=ALICE)
        await self._corrupt(
            database, "future", {"key": "future", "enabled": True, "from_the_future": [1]}
        )

        stored = await store.get("future")
        _, loaded, _ = await store.snapshot()

        assert stored.flag.enabled
        assert ["future"] == [flag.key for flag in loaded]
        assert 0 == REGISTRY.get_sample_value("bastion_flags_invalid_rows")
