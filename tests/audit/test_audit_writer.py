"""The audit writer: the append path, sync and async modes, back-pressure, concurrent appenders."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid

import pytest
from sqlalchemy import Column, Integer, MetaData, Table, func, insert, select, text
from sqlalchemy.exc import IntegrityError

from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._event import AuditEvent
from bastion.audit._merkle import root_of
from bastion.audit._subjects import SubjectKeys
from bastion.audit._tables import entries, logs, nodes
from bastion.audit._writer import AuditLog, AuditUnavailable
from bastion.data import Database, transaction
from bastion.observability.metrics import AUDIT_DROPPED
from bastion.settings import AuditSettings, DatabaseSettings

MASTER = b"m" * 32
TENANT_A = uuid.UUID("0192a0e4-6a53-7c1e-9f5e-00000000000a")
TENANT_B = uuid.UUID("0192a0e4-6a53-7c1e-9f5e-00000000000b")

scratch_metadata = MetaData()
documents = Table(
    "audit_writer_documents", scratch_metadata, Column("id", Integer, primary_key=True)
)


def make_log(database, **settings) -> AuditLog:
    keys = SubjectKeys(database=database, master_key=MASTER, cache_ttl=60)
    return AuditLog(
        AuditSettings(**settings), database=database, subject_keys=keys, sleep=_short_sleep
    )


async def _short_sleep(seconds: float) -> None:
    # Retry backoff bounded for tests: the writer still yields, without waiting out seconds.
    await asyncio.sleep(min(seconds, 0.01))


def event(action: str = "tenant.update", **fields) -> AuditEvent:
    return AuditEvent(action=action, **fields)


async def rows_of(database, log_id: str = "global") -> list[tuple]:
    async with database.session() as session:
        result = await session.execute(
            select(*(entries.c[name] for name in ENCODED_COLUMNS), entries.c.leaf_hash)
            .where(entries.c.log_id == log_id)
            .order_by(entries.c.seq)
        )
        return [tuple(row) for row in result]


async def count_entries(database) -> int:
    async with database.session() as session:
        return (await session.execute(select(func.count()).select_from(entries))).scalar_one()


async def head_of(database, log_id: str = "global"):
    async with database.session() as session:
        return (await session.execute(select(logs).where(logs.c.log_id == log_id))).one()


async def assert_consistent(database, log_id: str = "global") -> int:
    """The log's seqs are 0..n-1, each leaf is its row's hash, and the head's root covers them."""
    rows = await rows_of(database, log_id)
    leaves = [entry_leaf_hash(row[:-1]) for row in rows]
    assert list(range(len(rows))) == [row[1] for row in rows]
    assert leaves == [row[-1] for row in rows]
    head = await head_of(database, log_id)
    assert (len(rows), root_of(leaves)) == (head.size, head.root_hash)
    return len(rows)


class TestSync:
    async def test_own_transaction(self, database):
        """Without a session the entry is committed before record() returns."""
        audit = make_log(database, mode="sync")
        entry_id = await audit.record(event())
        rows = await rows_of(database)
        assert [entry_id] == [row[2] for row in rows]
        assert 1 == await assert_consistent(database)

    async def test_commits_with_the_callers_change(self, database):
        """In the caller's session the entry commits together with the change."""
        await _create_documents(database)
        audit = make_log(database, mode="sync")
        async with database.session() as session:
            await session.execute(insert(documents).values(id=1))
            await audit.record(event(), session=session)
        assert (1, 1) == (await count_entries(database), await _count_documents(database))

    async def test_rolls_back_with_the_callers_change(self, database):
        """When the caller's transaction rolls back, the entry and the change both vanish."""
        await _create_documents(database)
        audit = make_log(database, mode="sync")

        async def change_then_fail() -> None:
            async with database.session() as session:
                await session.execute(insert(documents).values(id=1))
                await audit.record(event(ip="192.0.2.1"), session=session)
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await change_then_fail()
        assert (0, 0) == (await count_entries(database), await _count_documents(database))
        await audit.record(event())
        assert 1 == await assert_consistent(database)

    async def test_invalid_event_stores_nothing(self, database):
        """A refused event raises ValueError and leaves no row, not even a head."""
        audit = make_log(database, mode="sync")
        with pytest.raises(ValueError, match="catalogue"):
            await audit.record(event("document.frobnicate"))
        async with database.session() as session:
            heads = (await session.execute(select(func.count()).select_from(logs))).scalar_one()
        assert (0, 0) == (await count_entries(database), heads)

    async def test_duplicate_id_fails_the_callers_transaction(self, database):
        """In sync mode an event id already stored raises IntegrityError to the caller."""
        audit = make_log(database, mode="sync")
        first = event()
        await audit.record(first)
        with pytest.raises(IntegrityError):
            await audit.record(first)
        assert 1 == await assert_consistent(database)

    async def test_joins_the_unit_of_work_the_task_is_in(self, database):
        """Without a session, inside transaction() the entry commits or rolls back with the unit."""
        await _create_documents(database)
        audit = make_log(database, mode="sync")

        async def change_then_fail() -> None:
            async with transaction(database=database) as session:
                await session.execute(insert(documents).values(id=1))
                await audit.record(event())
                raise RuntimeError("boom")

        with pytest.raises(RuntimeError, match="boom"):
            await change_then_fail()
        assert (0, 0) == (await count_entries(database), await _count_documents(database))
        async with transaction(database=database) as session:
            await session.execute(insert(documents).values(id=1))
            await audit.record(event())
        assert (1, 1) == (await count_entries(database), await _count_documents(database))

    async def test_unit_of_another_database_is_not_joined(self, database, tmp_path):
        """Inside a unit of work on another database the entry gets a transaction of its own."""
        other = Database(DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/other.db"))
        audit = make_log(database, mode="sync")

        async def record_then_fail() -> None:
            async with transaction(database=other):
                await audit.record(event())
                raise RuntimeError("boom")

        try:
            with pytest.raises(RuntimeError, match="boom"):
                await record_then_fail()
            assert 1 == await count_entries(database)
        finally:
            await other.aclose()

    async def test_registered_action(self, database):
        """An app's registered action is recorded."""
        audit = make_log(database, mode="sync")
        audit.register_actions({"document.update": "A document was edited."})
        await audit.record(event("document.update"))
        assert 1 == await count_entries(database)


class TestAppend:
    async def test_tiles_appear_at_256_leaves(self, database):
        """The level-8 tile is stored when the 256th leaf completes it, with that subtree's root."""
        audit = make_log(database, mode="sync")
        async with database.session() as session:
            await audit.append(session, [_prepared(audit) for _ in range(255)])
        assert [] == await _tiles(database)
        async with database.session() as session:
            await audit.append(session, [_prepared(audit) for _ in range(2)])
        leaves = [row[-1] for row in await rows_of(database)]
        assert [(8, 0, root_of(leaves[:256]))] == await _tiles(database)
        assert 257 == await assert_consistent(database)

    async def test_positions_follow_each_log(self, database):
        """append() returns each row's (log_id, seq), numbering every log from 0."""
        audit = make_log(database, mode="sync", partition="tenant")
        rows = [
            _prepared(audit, tenant_id=TENANT_A),
            _prepared(audit, tenant_id=TENANT_B),
            _prepared(audit),
            _prepared(audit, tenant_id=TENANT_A),
        ]
        async with database.session() as session:
            positions = await audit.append(session, rows)
        assert [
            (f"tenant/{TENANT_A}", 0),
            (f"tenant/{TENANT_B}", 0),
            ("system", 0),
            (f"tenant/{TENANT_A}", 1),
        ] == positions
        for log_id in (f"tenant/{TENANT_A}", f"tenant/{TENANT_B}", "system"):
            await assert_consistent(database, log_id)

    async def test_log_id_for(self, database):
        """log_id_for follows the partition setting."""
        by_tenant = make_log(database, partition="tenant")
        assert (f"tenant/{TENANT_A}", "system", "global") == (
            by_tenant.log_id_for(TENANT_A),
            by_tenant.log_id_for(None),
            make_log(database).log_id_for(TENANT_A),
        )

    async def test_personal_fields_are_sealed(self, database):
        """E-mail, IP and user agent are stored encrypted, never in clear."""
        audit = make_log(database, mode="sync")
        await audit.record(event(ip="203.0.113.7", user_agent="curl/8"))
        row = (await rows_of(database))[0]
        assert b"203.0.113.7" not in row[15]
        assert b"curl/8" not in row[16]
        assert None is row[14]


class TestAsync:
    async def test_flush_commits_everything_accepted(self, database):
        """flush() returns once every event recorded before it is committed, in batches."""
        audit = make_log(database, batch_size=100, flush_interval=0.001)
        try:
            ids = [await audit.record(event(ip="192.0.2.1")) for _ in range(250)]
            await audit.flush()
            assert 0 == audit.buffered
            assert ids == [row[2] for row in await rows_of(database)]
            assert 250 == await assert_consistent(database)
        finally:
            await audit.stop()

    async def test_rollback_leaves_no_entry(self, database):
        """An entry recorded in a session that rolls back is never written; its place is freed."""
        audit = make_log(database, flush_interval=0.001)
        try:

            async def record_then_fail() -> None:
                async with database.session() as session:
                    await audit.record(event(), session=session)
                    assert 1 == audit.buffered
                    raise RuntimeError("boom")

            with pytest.raises(RuntimeError, match="boom"):
                await record_then_fail()
            await audit.flush()
            assert (0, 0) == (audit.buffered, await count_entries(database))
        finally:
            await audit.stop()

    async def test_commit_queues_the_entry(self, database):
        """An entry recorded in a session is queued when it commits, then written by flush()."""
        await _create_documents(database)
        audit = make_log(database, flush_interval=0.001)
        try:
            async with database.session() as session:
                await session.execute(insert(documents).values(id=1))
                entry_id = await audit.record(event(), session=session)
                await audit.flush()
                assert 0 == await count_entries(database)
            await audit.flush()
            assert [entry_id] == [row[2] for row in await rows_of(database)]
            assert 0 == audit.buffered
        finally:
            await audit.stop()

    async def test_savepoint_rollback_takes_its_entry(self, database):
        """An entry of a rolled-back savepoint is dropped; one of a released savepoint commits."""
        audit = make_log(database, flush_interval=0.001)
        try:
            async with database.session() as session:
                kept = await audit.record(event(), session=session)
                async with session.begin_nested():
                    released = await audit.record(event(), session=session)
                savepoint = await session.begin_nested()
                await audit.record(event(), session=session)
                await savepoint.rollback()
                assert 2 == audit.buffered
            await audit.flush()
            assert [kept, released] == [row[2] for row in await rows_of(database)]
            assert 0 == audit.buffered
        finally:
            await audit.stop()

    async def test_places_are_released_on_rollback(self, database):
        """Rolled-back entries give their places back: a full buffer accepts again at once."""
        audit = make_log(database, buffer_size=2, enqueue_timeout=0.2)

        async def record_twice_then_fail() -> None:
            async with database.session() as session:
                await audit.record(event(), session=session)
                await audit.record(event(), session=session)
                raise RuntimeError("boom")

        try:
            for _ in range(3):
                with pytest.raises(RuntimeError, match="boom"):
                    await record_twice_then_fail()
            assert 0 == audit.buffered
        finally:
            await audit.stop()

    async def test_refused_event_is_dropped_and_the_others_commit(self, database):
        """An event the database refuses is dropped alone and counted; the rest commit in order."""
        audit = make_log(database, flush_interval=0.001)
        # NUL is refused by PostgreSQL's text; an unpaired surrogate by the UTF-8 encoding.
        bad_details = "\x00" if database.kind.value == "postgres" else "\ud800"
        before = AUDIT_DROPPED.labels("rejected")._value.get()
        try:
            batch = [_prepared(audit) for _ in range(5)]
            batch[3] = dataclasses.replace(batch[3], details=bad_details)
            for _ in batch:
                await audit._reserve()
            audit._queue(batch)
            await audit.flush()
            stored = [row[2] for row in await rows_of(database)]
            assert [entry.id for entry in batch if entry is not batch[3]] == stored
            assert 4 == await assert_consistent(database)
            assert (1, 0) == (
                AUDIT_DROPPED.labels("rejected")._value.get() - before,
                audit.buffered,
            )
        finally:
            await audit.stop()

    async def test_invalid_event_is_refused_before_buffering(self, database):
        """A refused event raises at once and is never buffered."""
        audit = make_log(database)
        try:
            with pytest.raises(ValueError, match="outcome"):
                await audit.record(event(outcome="perhaps"))
            assert 0 == audit.buffered
        finally:
            await audit.stop()

    async def test_back_pressure_then_unavailable(self, database):
        """A full buffer makes record() wait, then raise AuditUnavailable; nothing is dropped."""
        audit = make_log(database, buffer_size=2, batch_size=1, enqueue_timeout=0.2)
        await audit.record(event())
        await audit.flush()
        blocker = await database.engine.connect()
        try:
            await blocker.begin()
            # Holds the head: its row lock (PostgreSQL) or the write lock (SQLite).
            await blocker.execute(text("UPDATE bastion_audit_logs SET size = size"))
            await audit.record(event())
            await audit.record(event())
            with pytest.raises(AuditUnavailable):
                await audit.record(event())
            with pytest.raises(AuditUnavailable, match="full"):
                await audit.health_check()
            assert 2 == audit.buffered
        finally:
            await blocker.rollback()
            await blocker.close()
        await audit.flush()
        await audit.health_check()
        assert 3 == await assert_consistent(database)
        await audit.stop()

    async def test_stop_drains(self, database):
        """stop() commits what is buffered; record() afterwards raises AuditUnavailable."""
        audit = make_log(database, flush_interval=10)
        await audit.start()
        for _ in range(5):
            await audit.record(event())
        await audit.stop()
        assert 5 == await count_entries(database)
        with pytest.raises(AuditUnavailable):
            await audit.record(event())

    async def test_duplicate_id_is_dropped_not_retried_forever(self, database):
        """An event id already stored is dropped from its batch; the others commit."""
        audit = make_log(database, flush_interval=0.001)
        try:
            first = event()
            await audit.record(first)
            await audit.flush()
            await audit.record(first)
            await audit.record(event())
            await audit.flush()
            assert 2 == await assert_consistent(database)
        finally:
            await audit.stop()


class TestOutage:
    async def test_unreachable_database_keeps_the_batch(self, tmp_path):
        """With the database down the batch is kept, readiness fails, stop counts the loss."""
        database = Database(
            DatabaseSettings(url=f"sqlite+aiosqlite:///{tmp_path}/missing/audit.db")
        )
        keys = SubjectKeys(database=database, master_key=MASTER, cache_ttl=60)
        audit = AuditLog(
            AuditSettings(flush_interval=0.001),
            database=database,
            subject_keys=keys,
            sleep=_short_sleep,
            drain_timeout=0.1,
        )
        before = AUDIT_DROPPED.labels("shutdown")._value.get()
        try:
            await audit.record(event())
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.2):
                    await audit.flush()
            assert 1 == audit.buffered
            with pytest.raises(AuditUnavailable, match="cannot commit"):
                await audit.health_check()
            await audit.stop()
            assert 1 == AUDIT_DROPPED.labels("shutdown")._value.get() - before
            with pytest.raises(AuditUnavailable, match="stopped"):
                await audit.flush()
        finally:
            await database.aclose()


class TestWriterConnection:
    async def test_a_killed_connection_is_replaced(self, database):
        """The writer's own connection, killed between batches, is replaced; nothing is lost."""
        if database.kind.value != "postgres":
            pytest.skip("terminating a backend needs PostgreSQL")
        audit = make_log(database, flush_interval=0.001)
        try:
            await audit.record(event())
            await audit.flush()
            async with database.engine.connect() as connection:
                killed = await connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                    )
                )
                assert killed.all()
            await audit.record(event())
            await audit.flush()
            assert 2 == await assert_consistent(database)
        finally:
            await audit.stop()


class TestConcurrentWriters:
    async def test_two_instances_share_a_log(self, database):
        """Two AuditLogs on two engines appending at once leave one gapless, consistent log."""
        if database.kind.value != "postgres":
            pytest.skip("two engines contending for the head lock need PostgreSQL")
        other = Database(DatabaseSettings(url=database.settings.url))
        first = make_log(database, batch_size=50, flush_interval=0.001)
        second = make_log(other, batch_size=50, flush_interval=0.001)
        try:

            async def burst(audit: AuditLog) -> None:
                for _ in range(400):
                    await audit.record(event(ip="192.0.2.1"))
                await audit.flush()

            await asyncio.gather(burst(first), burst(second))
            assert 800 == await assert_consistent(database)
        finally:
            await first.stop()
            await second.stop()
            await other.aclose()


def _prepared(audit: AuditLog, **fields):
    return audit._preparer.prepare(event(**fields))


async def _tiles(database) -> list[tuple]:
    async with database.session() as session:
        result = await session.execute(
            select(nodes.c.level, nodes.c.index, nodes.c.hash).order_by(
                nodes.c.level, nodes.c.index
            )
        )
        return [tuple(row) for row in result]


async def _create_documents(database) -> None:
    async with database.engine.begin() as connection:
        await connection.run_sync(scratch_metadata.drop_all)
        await connection.run_sync(scratch_metadata.create_all)


async def _count_documents(database) -> int:
    async with database.session() as session:
        return (await session.execute(select(func.count()).select_from(documents))).scalar_one()
