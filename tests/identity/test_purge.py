"""The purge of spent single-use tokens and dead refresh families, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import pytest
import structlog
from prometheus_client import REGISTRY
from sqlalchemy import func, insert, select
from wiring_support import identity_app, identity_of, identity_overrides, running

from bastion.data import Database
from bastion.identity import purge_expired
from bastion.identity._directory import create_user
from bastion.identity._purge import run_purges
from bastion.identity._tables import (
    one_time_tokens,
    refresh_families,
    refresh_tokens,
)

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)
KEEP = timedelta(days=7)
LONG_AGO = NOW - KEEP - timedelta(hours=1)
LATELY = NOW - timedelta(hours=1)


async def add_one_time(
    db: Database, *, expires_at: datetime, used_at: datetime | None = None
) -> uuid.UUID:
    """A single-use token row that expires (and was used) when given."""
    row_id = uuid.uuid4()
    async with db.session() as session:
        await session.execute(
            insert(one_time_tokens).values(
                id=row_id,
                purpose="password_reset",
                subject=str(uuid.uuid4()),
                token_hash=secrets.token_bytes(32),
                tenant_id=None,
                data={},
                created_at=min(expires_at, used_at or expires_at) - timedelta(hours=1),
                expires_at=expires_at,
                used_at=used_at,
            )
        )
    return row_id


async def add_family(
    db: Database, *, expires_at: datetime, revoked_at: datetime | None = None, tokens: int = 1
) -> uuid.UUID:
    """A refresh family of a new user with ``tokens`` tokens (all but the last used)."""
    family_id = uuid.uuid4()
    async with db.session() as session:
        user = await create_user(session, f"u-{secrets.token_hex(5)}@example.com")
        await session.execute(
            insert(refresh_families).values(
                id=family_id,
                user_id=user.id,
                tenant_id=None,
                created_at=expires_at - timedelta(days=30),
                last_used_at=expires_at - timedelta(days=30),
                expires_at=expires_at,
                revoked_at=revoked_at,
                revoked_reason=None if revoked_at is None else "logout",
            )
        )
        for index in range(tokens):
            await session.execute(
                insert(refresh_tokens).values(
                    id=uuid.uuid4(),
                    family_id=family_id,
                    token_hash=secrets.token_bytes(32),
                    created_at=expires_at - timedelta(days=30),
                    used_at=None if index == tokens - 1 else expires_at - timedelta(days=30),
                )
            )
    return family_id


async def ids(db: Database, column) -> set[uuid.UUID]:
    async with db.session() as session:
        return set((await session.scalars(select(column))).all())


async def count(db: Database, table) -> int:
    async with db.session() as session:
        return int(await session.scalar(select(func.count()).select_from(table)) or 0)


def purged_metric(table: str) -> float:
    return REGISTRY.get_sample_value("bastion_identity_purged_rows_total", {"table": table}) or 0.0


class TestPurgeExpired:
    async def test_rows_past_the_grace_are_deleted_and_live_ones_kept(self, database):
        """Spent more than keep ago: deleted with their tokens; live or lately spent: kept."""
        await add_one_time(database, expires_at=LONG_AGO, used_at=LONG_AGO)
        await add_one_time(database, expires_at=LONG_AGO)
        # An invitation used long ago that would still be valid: used is what counts.
        await add_one_time(database, expires_at=NOW + timedelta(days=1), used_at=LONG_AGO)
        used_lately = await add_one_time(database, expires_at=NOW + KEEP, used_at=LATELY)
        expired_lately = await add_one_time(database, expires_at=LATELY)
        unused = await add_one_time(database, expires_at=NOW + timedelta(hours=1))
        await add_family(database, expires_at=NOW + KEEP, revoked_at=LONG_AGO, tokens=3)
        await add_family(database, expires_at=LONG_AGO, tokens=2)
        live = await add_family(database, expires_at=NOW + timedelta(days=1), tokens=2)
        revoked_lately = await add_family(database, expires_at=NOW + KEEP, revoked_at=LATELY)

        counts = await purge_expired(database, now=NOW, keep=KEEP)

        assert {"one_time_tokens": 3, "refresh_families": 2, "refresh_tokens": 5} == counts
        assert {used_lately, expired_lately, unused} == await ids(database, one_time_tokens.c.id)
        assert {live, revoked_lately} == await ids(database, refresh_families.c.id)
        assert {live, revoked_lately} == await ids(database, refresh_tokens.c.family_id)
        assert 3 == await count(database, refresh_tokens)

    async def test_a_second_purge_finds_nothing(self, database):
        """Deletes are idempotent: a later purge (another instance's) deletes nothing more."""
        await add_one_time(database, expires_at=LONG_AGO)
        await add_family(database, expires_at=LONG_AGO)
        await purge_expired(database, now=NOW, keep=KEEP)
        again = await purge_expired(database, now=NOW, keep=KEEP)
        assert {"one_time_tokens": 0, "refresh_families": 0, "refresh_tokens": 0} == again

    async def test_concurrent_purges_delete_each_row_once(self, database):
        """Instances purging at the same moment delete every spent row once between them."""
        for _ in range(6):
            await add_one_time(database, expires_at=LONG_AGO)
        results = await asyncio.gather(
            *(purge_expired(database, now=NOW, keep=KEEP, batch=2) for _ in range(3))
        )
        assert 6 == sum(result["one_time_tokens"] for result in results)
        assert 0 == await count(database, one_time_tokens)

    async def test_a_backlog_larger_than_a_batch_is_deleted_in_batches(self, database):
        """More spent rows than a batch: the purge loops until none is left."""
        for _ in range(11):
            await add_one_time(database, expires_at=LONG_AGO)
        for _ in range(5):
            await add_family(database, expires_at=LONG_AGO, tokens=2)
        kept = await add_one_time(database, expires_at=NOW + timedelta(hours=1))

        counts = await purge_expired(database, now=NOW, keep=KEEP, batch=4)

        assert {"one_time_tokens": 11, "refresh_families": 5, "refresh_tokens": 10} == counts
        assert {kept} == await ids(database, one_time_tokens.c.id)
        assert 0 == await count(database, refresh_families)

    async def test_deleted_rows_are_counted_by_table(self, database):
        """bastion_identity_purged_rows_total counts the deleted rows by table."""
        before = purged_metric("refresh_tokens")
        await add_family(database, expires_at=LONG_AGO, tokens=3)
        await purge_expired(database, now=NOW, keep=KEEP)
        assert 3 == purged_metric("refresh_tokens") - before

    async def test_a_negative_grace_or_an_empty_batch_is_refused(self, database):
        """keep below 0 or batch below 1 is a ValueError, not a purge of everything."""
        with pytest.raises(ValueError, match="keep"):
            await purge_expired(database, keep=-1)
        with pytest.raises(ValueError, match="batch"):
            await purge_expired(database, batch=0)


class TestRunPurges:
    async def test_each_wait_is_jittered_and_a_failure_is_retried(self, sqlite_url, monkeypatch):
        """Waits spread around the interval; a failed purge is logged and the next one runs."""
        waits: list[float] = []
        outcomes: list[object] = [ConnectionError("down"), {"one_time_tokens": 1}]

        async def fake_purge(database, *, keep, batch):
            outcome = outcomes.pop(0)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        async def sleep(seconds: float) -> None:
            waits.append(seconds)
            if len(waits) == 3:
                raise asyncio.CancelledError

        monkeypatch.setattr("bastion.identity._purge.purge_expired", fake_purge)
        with structlog.testing.capture_logs() as logs, pytest.raises(asyncio.CancelledError):
            await run_purges(object(), interval=100, keep=0, sleep=sleep, jitter=lambda: 0.5)
        assert [50.0, 100.0, 100.0] == waits
        assert [] == outcomes
        failed = [entry for entry in logs if entry["event"] == "identity purge failed"]
        assert [{"event": "identity purge failed", "error": "ConnectionError"}] == [
            {key: entry[key] for key in ("event", "error")} for entry in failed
        ]


class TestPeriodicPurge:
    async def test_the_app_purges_while_running_and_stops_the_task_at_shutdown(
        self, sqlite_url, tmp_path
    ):
        """start-up starts the periodic purge; shutdown cancels it and leaves no task."""
        app, runtime = identity_app(
            **identity_overrides(
                sqlite_url, tmp_path, identity={"purge_interval": 0.01, "purge_after": 0}
            )
        )
        identity = identity_of(runtime)
        async with running(app):
            task = identity.purge_task
            assert task is not None
            await add_one_time(identity.database, expires_at=datetime.now(UTC) - timedelta(1))
            # Real time: the task runs on its own schedule; 5 s bounds a stuck loop.
            for _ in range(500):
                if not await count(identity.database, one_time_tokens):
                    break
                await asyncio.sleep(0.01)
            else:
                pytest.fail("the periodic purge did not delete the expired token in 5 s")
        assert identity.purge_task is None
        assert task.done()

    async def test_an_interval_of_zero_starts_no_task(self, sqlite_url, tmp_path):
        """identity.purge_interval = 0 turns the periodic purge off."""
        app, runtime = identity_app(
            **identity_overrides(sqlite_url, tmp_path, identity={"purge_interval": 0})
        )
        async with running(app):
            assert identity_of(runtime).purge_task is None
