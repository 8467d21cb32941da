"""Data-subject keys: sealing personal fields, caching keys, and erasure by key destruction."""

from __future__ import annotations

import datetime as dt

import pytest
from sqlalchemy import func, select

from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._event import Actor, AuditEvent
from bastion.audit._subjects import (
    SubjectKeys,
    anonymous_subject,
    subject_for_login,
    subject_for_user,
)
from bastion.audit._tables import entries, subject_keys
from bastion.audit._writer import AuditLog, AuditUnavailable
from bastion.observability.metrics import AUDIT_SUBJECT_DECRYPT_FAILURES
from bastion.settings import AuditSettings

MASTER = b"m" * 32


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def keys_on(database, *, ttl: float = 60.0, clock=None) -> SubjectKeys:
    return SubjectKeys(
        database=database, master_key=MASTER, cache_ttl=ttl, clock=clock or FakeClock()
    )


async def stored_rows(database) -> list[tuple]:
    async with database.session() as session:
        result = await session.execute(
            select(*(entries.c[name] for name in ENCODED_COLUMNS)).order_by(entries.c.seq)
        )
        return [tuple(row) for row in result]


async def key_count(database) -> int:
    async with database.session() as session:
        return (await session.execute(select(func.count()).select_from(subject_keys))).scalar_one()


class TestSubjectNames:
    def test_names(self):
        """Users, login identifiers and anonymous months have their own subject forms."""
        march = dt.datetime(2026, 3, 31, 23, 30, tzinfo=dt.timezone(dt.timedelta(hours=-2)))
        assert ("user:7", "login:ab12", "anonymous:2026-04") == (
            subject_for_user(7),
            subject_for_login("ab12"),
            anonymous_subject(march),
        )


class TestMasterKey:
    async def test_short_master_key_is_refused(self, sqlite_url):
        """An encryption key under 256 bits raises ValueError."""
        from bastion.data import Database
        from bastion.settings import DatabaseSettings

        database = Database(DatabaseSettings(url=sqlite_url))
        try:
            with pytest.raises(ValueError, match="32 bytes"):
                SubjectKeys(database=database, master_key=b"short", cache_ttl=1)
        finally:
            await database.aclose()


class TestSealing:
    async def test_round_trip(self, database):
        """A sealed value opens with its subject and field."""
        keys = keys_on(database)
        async with database.session() as session:
            key = (await keys.keys_for(session, {"user:1"}))["user:1"]
        sealed = keys.seal(key, "user:1", "ip", "203.0.113.7")
        assert "203.0.113.7" == await keys.open("user:1", "ip", sealed)

    async def test_none_stays_none(self, database):
        """Nothing to seal gives nothing, and nothing opens to nothing."""
        keys = keys_on(database)
        assert None is keys.seal(b"k" * 32, "user:1", "ip", None)
        assert None is await keys.open("user:1", "ip", None)

    async def test_other_field_or_subject_does_not_open(self, database):
        """A ciphertext moved to another field or subject opens to None and is counted."""
        keys = keys_on(database)
        async with database.session() as session:
            found = await keys.keys_for(session, {"user:1", "user:2"})
        sealed = keys.seal(found["user:1"], "user:1", "ip", "203.0.113.7")
        before = AUDIT_SUBJECT_DECRYPT_FAILURES._value.get()
        opened = await keys.open_many(
            [("user:1", "user_agent", sealed), ("user:2", "ip", sealed), ("user:1", "ip", sealed)]
        )
        assert [None, None, "203.0.113.7"] == opened
        assert 2 == AUDIT_SUBJECT_DECRYPT_FAILURES._value.get() - before

    async def test_tampered_ciphertext_does_not_open(self, database):
        """A flipped byte makes the field open to None."""
        keys = keys_on(database)
        async with database.session() as session:
            key = (await keys.keys_for(session, {"user:1"}))["user:1"]
        sealed = bytearray(keys.seal(key, "user:1", "email", "a@example.com"))
        sealed[-1] ^= 1
        assert None is await keys.open("user:1", "email", bytes(sealed))

    async def test_another_instance_reads_the_stored_key(self, database):
        """Keys are stored wrapped, so a second instance (same master key) opens the fields."""
        keys = keys_on(database)
        async with database.session() as session:
            key = (await keys.keys_for(session, {"user:1"}))["user:1"]
        sealed = keys.seal(key, "user:1", "ip", "192.0.2.1")
        assert "192.0.2.1" == await keys_on(database).open("user:1", "ip", sealed)


class TestKeysFor:
    async def test_one_key_per_subject(self, database):
        """Asking twice, or from two instances, gives the same key; one row per subject."""
        first, second = keys_on(database), keys_on(database)
        async with database.session() as session:
            a = await first.keys_for(session, {"user:1", "user:2"})
        async with database.session() as session:
            b = await second.keys_for(session, {"user:2", "user:1"})
        assert a == b
        assert 2 == await key_count(database)

    async def test_rolled_back_key_is_not_cached(self, database):
        """A key created in a transaction that rolls back is forgotten, not reused."""
        keys = keys_on(database)
        session_factory = database.sessions
        async with session_factory() as session, session.begin():
            lost = (await keys.keys_for(session, {"user:9"}))["user:9"]
            await session.rollback()
        async with database.session() as session:
            kept = (await keys.keys_for(session, {"user:9"}))["user:9"]
        assert lost != kept
        sealed = keys.seal(kept, "user:9", "ip", "192.0.2.1")
        assert "192.0.2.1" == await keys_on(database).open("user:9", "ip", sealed)

    async def test_cache_expires(self, database):
        """After cache_ttl the key is read again, so another instance's erasure is seen."""
        clock = FakeClock()
        keys = keys_on(database, ttl=10, clock=clock)
        async with database.session() as session:
            key = (await keys.keys_for(session, {"user:1"}))["user:1"]
        sealed = keys.seal(key, "user:1", "ip", "192.0.2.1")
        await keys_on(database).erase("user:1")
        assert "192.0.2.1" == await keys.open("user:1", "ip", sealed)
        clock.now += 11
        assert None is await keys.open("user:1", "ip", sealed)


class TestErasure:
    async def test_erasure_shreds_fields_and_keeps_leaves(self, database):
        """After erase the personal fields open to None while every leaf hash is unchanged."""
        keys = keys_on(database)
        audit = AuditLog(AuditSettings(mode="sync"), database=database, subject_keys=keys)
        actor = Actor.user("42", email="ada@example.com")
        await audit.record(AuditEvent(action="auth.login.success", actor=actor, ip="192.0.2.1"))
        before = await stored_rows(database)
        subject, email = before[0][13], before[0][14]
        assert "ada@example.com" == await keys.open(subject, "email", email)

        assert await keys.erase("user:42")
        after = await stored_rows(database)
        assert [entry_leaf_hash(row) for row in before] == [entry_leaf_hash(row) for row in after]
        assert None is await keys.open(subject, "email", email)
        assert None is await keys_on(database).open(subject, "email", email)
        assert not await keys.erase("user:42")

    async def test_new_key_after_erasure(self, database):
        """A later event of an erased subject is sealed under a new, readable key."""
        keys = keys_on(database)
        audit = AuditLog(AuditSettings(mode="sync"), database=database, subject_keys=keys)
        await audit.record(AuditEvent(action="auth.logout", actor=Actor.user("5"), ip="192.0.2.1"))
        await keys.erase("user:5")
        await audit.record(AuditEvent(action="auth.logout", actor=Actor.user("5"), ip="192.0.2.2"))
        rows = await stored_rows(database)
        opened = await keys.open_many([(row[13], "ip", row[15]) for row in rows])
        assert [None, "192.0.2.2"] == opened


class TestUnreadableKeys:
    async def test_key_that_does_not_unwrap_reads_as_unreadable(self, database):
        """A key wrapped under another encryption key reads as unreadable; the rest still opens."""
        writer_keys = keys_on(database)
        audit = AuditLog(AuditSettings(mode="sync"), database=database, subject_keys=writer_keys)
        await audit.record(AuditEvent(action="auth.logout", actor=Actor.user("1"), ip="192.0.2.1"))
        await audit.record(AuditEvent(action="auth.logout", actor=Actor.user("2"), ip="192.0.2.2"))
        rows = await stored_rows(database)
        # User 1's key re-wrapped under a different master key: a changed
        # audit.encryption_key, or a row replaced by someone without the key.
        stranger = SubjectKeys(database=database, master_key=b"x" * 32, cache_ttl=60)
        async with database.session() as session:
            await session.execute(
                subject_keys.update()
                .where(subject_keys.c.subject == "user:1")
                .values(wrapped_key=stranger._wrap("user:1", b"k" * 32))
            )
        failures = AUDIT_SUBJECT_DECRYPT_FAILURES._value.get()

        opened = await keys_on(database).open_many([(row[13], "ip", row[15]) for row in rows])

        assert [None, "192.0.2.2"] == opened
        assert AUDIT_SUBJECT_DECRYPT_FAILURES._value.get() == failures + 1

    async def test_recording_for_a_key_that_does_not_unwrap_is_refused_with_503(self, database):
        """Sync recording under an unusable stored key answers AuditUnavailable, storing nothing."""
        keys = keys_on(database)
        audit = AuditLog(AuditSettings(mode="sync"), database=database, subject_keys=keys)
        await audit.record(AuditEvent(action="auth.logout", actor=Actor.user("1"), ip="192.0.2.1"))
        stranger = SubjectKeys(database=database, master_key=b"x" * 32, cache_ttl=60)
        async with database.session() as session:
            await session.execute(
                subject_keys.update()
                .where(subject_keys.c.subject == "user:1")
                .values(wrapped_key=stranger._wrap("user:1", b"k" * 32))
            )
        fresh = AuditLog(
            AuditSettings(mode="sync"), database=database, subject_keys=keys_on(database)
        )

        with pytest.raises(AuditUnavailable, match="does not unwrap") as raised:
            await fresh.record(
                AuditEvent(action="auth.logout", actor=Actor.user("1"), ip="192.0.2.9")
            )

        assert 503 == raised.value.status
        assert 1 == len(await stored_rows(database))
