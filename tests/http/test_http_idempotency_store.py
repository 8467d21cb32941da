"""The idempotency stores behave alike: memory, Redis (real) and SQL (SQLite and PostgreSQL)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
import redis.asyncio as redis_asyncio
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import func, select

from bastion.data import Database, MigrationTree, Migrator
from bastion.errors import ConfigurationError
from bastion.http._idempotency_store import (
    IdempotencyStoreError,
    MemoryIdempotencyStore,
    RedisIdempotencyStore,
    SqlIdempotencyStore,
    StoredResponse,
    build_idempotency_store,
    idempotency_store_kind,
)
from bastion.http._tables import idempotency_keys, idempotency_metadata
from bastion.settings import DatabaseSettings, load_settings

LOCK = 30.0
TTL = 3600.0
RESPONSE = StoredResponse(
    201, ((b"content-type", b"application/json"), (b"location", b"/x/1")), b'{"id": 1}'
)


class FakeClock:
    """Both clocks the stores take: monotonic seconds and the UTC instant, moved by hand."""

    def __init__(self) -> None:
        self.seconds = 1000.0
        self.start = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)

    def monotonic(self) -> float:
        return self.seconds

    def utc(self) -> datetime:
        return self.start + timedelta(seconds=self.seconds)

    def advance(self, seconds: float) -> None:
        self.seconds += seconds


def digest() -> str:
    return secrets.token_hex(32)


def token() -> str:
    return secrets.token_hex(16)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=["memory", "redis", "sqlite", "postgres"])
async def store(request, clock, sqlite_url, _module_postgres) -> AsyncIterator[object]:
    """Each backend, empty; memory and SQL on the fake clock (Redis expires keys itself)."""
    if request.param == "memory":
        yield MemoryIdempotencyStore(clock=clock.monotonic)
        return
    if request.param == "redis":
        url = request.getfixturevalue("redis_url")
        prefix = request.getfixturevalue("redis_prefix")
        client = redis_asyncio.from_url(url)
        store = RedisIdempotencyStore(client, key_prefix=prefix, own_client=True)
        yield store
        await store.stop()
        return
    if request.param == "sqlite":
        url = sqlite_url
    else:
        request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
        url = _module_postgres
    database = Database(DatabaseSettings(url=url))
    async with database.engine.begin() as connection:
        await connection.run_sync(idempotency_metadata.drop_all)
        await connection.run_sync(idempotency_metadata.create_all)
    yield SqlIdempotencyStore(database, clock=clock.utc, purge_interval=0, purge_batch=3)
    await database.aclose()


async def expire(store, clock: FakeClock, seconds: float) -> None:
    """Let ``seconds`` pass for the store: the fake clock, or Redis's own (see below)."""
    if isinstance(store, RedisIdempotencyStore):
        # Redis measures expiry on its own clock; the tests give Redis keys a lock
        # of a few milliseconds instead and wait, bounded, for it to pass.
        for _ in range(200):
            if not await store.client.keys(store.prefix + "*"):
                return
            await asyncio.sleep(0.01)
        raise AssertionError("redis never expired the key")
    clock.advance(seconds)


def short_lock(store) -> float:
    return 0.02 if isinstance(store, RedisIdempotencyStore) else LOCK


class TestAcquire:
    async def test_a_free_key_is_taken(self, store):
        """The first request with a key holds it."""
        assert None is await store.acquire(digest(), digest(), token(), lock_timeout=LOCK)

    async def test_a_held_key_returns_the_request_in_progress(self, store):
        """A second request finds the first in progress, with the first's fingerprint."""
        key, first = digest(), digest()
        await store.acquire(key, first, token(), lock_timeout=LOCK)
        record = await store.acquire(key, digest(), token(), lock_timeout=LOCK)
        assert record is not None
        assert first == record.fingerprint
        assert not record.complete

    async def test_a_completed_key_returns_the_response(self, store):
        """Once complete, every request with the key gets the stored response."""
        key, fingerprint, holder = digest(), digest(), token()
        await store.acquire(key, fingerprint, holder, lock_timeout=LOCK)
        assert await store.complete(key, fingerprint, holder, RESPONSE, ttl=TTL)
        record = await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)
        assert record is not None
        assert RESPONSE == record.response
        assert fingerprint == record.fingerprint

    async def test_keys_are_independent(self, store):
        """Holding one key says nothing about another."""
        await store.acquire(digest(), digest(), token(), lock_timeout=LOCK)
        assert None is await store.acquire(digest(), digest(), token(), lock_timeout=LOCK)

    async def test_binary_body_and_empty_headers_survive(self, store):
        """Any body bytes (newlines, NULs) and no headers at all come back as stored."""
        key, fingerprint, holder = digest(), digest(), token()
        response = StoredResponse(200, (), b"\n\x00\xff" * 100)
        await store.acquire(key, fingerprint, holder, lock_timeout=LOCK)
        await store.complete(key, fingerprint, holder, response, ttl=TTL)
        record = await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)
        assert record is not None
        assert response == record.response


class TestOwnership:
    async def test_release_frees_the_key(self, store):
        """A released key is taken by the next request, which executes again."""
        key, fingerprint, holder = digest(), digest(), token()
        await store.acquire(key, fingerprint, holder, lock_timeout=LOCK)
        assert await store.release(key, fingerprint, holder)
        assert None is await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)

    async def test_only_the_holder_completes(self, store):
        """Another request's token cannot store a response under a held key."""
        key, fingerprint = digest(), digest()
        await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)
        assert not await store.complete(key, fingerprint, token(), RESPONSE, ttl=TTL)

    async def test_only_the_holder_releases(self, store):
        """Another request's token cannot free a held key."""
        key, fingerprint = digest(), digest()
        await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)
        assert not await store.release(key, fingerprint, token())
        assert None is not await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)

    async def test_a_completed_key_cannot_be_released(self, store):
        """A stored response stays for its window even if its holder asks to release."""
        key, fingerprint, holder = digest(), digest(), token()
        await store.acquire(key, fingerprint, holder, lock_timeout=LOCK)
        await store.complete(key, fingerprint, holder, RESPONSE, ttl=TTL)
        assert not await store.release(key, fingerprint, holder)


class TestExpiry:
    async def test_a_crashed_holder_is_taken_over_after_its_lock(self, store, clock):
        """Past the lock timeout a retry takes the key; the crashed holder can no longer
        complete it."""
        key, fingerprint, crashed = digest(), digest(), token()
        await store.acquire(key, fingerprint, crashed, lock_timeout=short_lock(store))
        await expire(store, clock, LOCK + 1)
        retry = token()
        assert None is await store.acquire(key, fingerprint, retry, lock_timeout=LOCK)
        assert not await store.complete(key, fingerprint, crashed, RESPONSE, ttl=TTL)
        assert await store.complete(key, fingerprint, retry, RESPONSE, ttl=TTL)

    async def test_takeover_is_won_by_exactly_one_retry(self, store, clock):
        """Many retries racing for an expired lock: one takes it, the rest see it held."""
        key, fingerprint = digest(), digest()
        await store.acquire(key, fingerprint, token(), lock_timeout=short_lock(store))
        await expire(store, clock, LOCK + 1)
        results = await asyncio.gather(
            *(store.acquire(key, fingerprint, token(), lock_timeout=LOCK) for _ in range(8))
        )
        assert 1 == sum(result is None for result in results)

    async def test_a_response_expires_after_its_ttl(self, store, clock):
        """After the replay window the key is free again."""
        key, fingerprint, holder = digest(), digest(), token()
        ttl = 0.02 if isinstance(store, RedisIdempotencyStore) else TTL
        await store.acquire(key, fingerprint, holder, lock_timeout=LOCK)
        await store.complete(key, fingerprint, holder, RESPONSE, ttl=ttl)
        await expire(store, clock, TTL + 1)
        assert None is await store.acquire(key, fingerprint, token(), lock_timeout=LOCK)

    async def test_concurrent_acquires_take_the_key_once(self, store):
        """N requests racing for a free key: exactly one holds it."""
        key, fingerprint = digest(), digest()
        results = await asyncio.gather(
            *(store.acquire(key, fingerprint, token(), lock_timeout=LOCK) for _ in range(10))
        )
        assert 1 == sum(result is None for result in results)


class TestMemoryPurge:
    async def test_expired_entries_are_swept(self, clock):
        """Every purge_every acquisitions, expired entries leave memory."""
        store = MemoryIdempotencyStore(clock=clock.monotonic, purge_every=3)
        for _ in range(2):
            await store.acquire(digest(), digest(), token(), lock_timeout=1)
        clock.advance(2)
        await store.acquire(digest(), digest(), token(), lock_timeout=1)
        assert 1 == len(store._entries)
        await store.stop()
        assert {} == store._entries


class TestSqlPurge:
    @pytest.fixture(params=["sqlite", "postgres"])
    async def sql(self, request, clock, sqlite_url, _module_postgres):
        if request.param == "sqlite":
            url = sqlite_url
        else:
            request.getfixturevalue("postgres_url")
            url = _module_postgres
        database = Database(DatabaseSettings(url=url))
        async with database.engine.begin() as connection:
            await connection.run_sync(idempotency_metadata.drop_all)
            await connection.run_sync(idempotency_metadata.create_all)
        yield SqlIdempotencyStore(database, clock=clock.utc, purge_interval=0, purge_batch=3)
        await database.aclose()

    async def test_purge_deletes_expired_rows_in_batches(self, sql, clock):
        """Expired rows (locks and responses) go, in batches smaller than their number;
        live ones stay."""
        for _ in range(7):
            await sql.acquire(digest(), digest(), token(), lock_timeout=10)
        key, fingerprint, holder = digest(), digest(), token()
        await sql.acquire(key, fingerprint, holder, lock_timeout=10)
        await sql.complete(key, fingerprint, holder, RESPONSE, ttl=TTL)
        clock.advance(11)
        assert 7 == await sql.purge()
        async with sql.database.engine.connect() as connection:
            left = await connection.scalar(select(func.count()).select_from(idempotency_keys))
        assert 1 == left

    async def test_purge_task_starts_and_stops(self, sql):
        """The periodic purge runs as a task from start to stop."""
        sql._purge_interval = 3600
        await sql.start()
        assert sql._task is not None
        await sql.stop()
        assert sql._task is None

    async def test_ping_checks_the_table(self, sql):
        """Readiness reads the table: present, it passes."""
        await sql.ping()


class TestFailures:
    async def test_redis_down_raises_store_error(self):
        """A Redis that does not answer is an IdempotencyStoreError, not a driver error."""
        client = redis_asyncio.from_url(
            "redis://127.0.0.1:1/0", socket_timeout=0.2, socket_connect_timeout=0.2
        )
        store = RedisIdempotencyStore(client, own_client=True)
        with pytest.raises(IdempotencyStoreError):
            await store.acquire(digest(), digest(), token(), lock_timeout=LOCK)
        with pytest.raises(IdempotencyStoreError):
            await store.ping()
        await store.stop()

    async def test_missing_table_raises_store_error(self, sqlite_url):
        """A database without the table (migrations not run) is a store error, and not ready."""
        database = Database(DatabaseSettings(url=sqlite_url))
        store = SqlIdempotencyStore(database, purge_interval=0)
        with pytest.raises(IdempotencyStoreError):
            await store.acquire(digest(), digest(), token(), lock_timeout=LOCK)
        with pytest.raises(IdempotencyStoreError):
            await store.complete(digest(), digest(), token(), RESPONSE, ttl=TTL)
        with pytest.raises(IdempotencyStoreError):
            await store.purge()
        with pytest.raises(IdempotencyStoreError):
            await store.ping()
        await database.aclose()


class TestChoice:
    def test_memory_without_redis_or_database(self):
        """Nothing configured: memory."""
        settings = load_settings(database={"enabled": False})
        assert "memory" == idempotency_store_kind(settings)
        assert isinstance(
            build_idempotency_store(settings, redis=None, database=None), MemoryIdempotencyStore
        )

    def test_database_when_on_and_no_redis(self, sqlite_url):
        """The database is on and Redis is not configured: the SQL store on the shared database."""
        settings = load_settings(database={"url": sqlite_url})
        database = Database(settings.database)
        store = build_idempotency_store(settings, redis=None, database=database)
        assert isinstance(store, SqlIdempotencyStore)
        assert database is store.database

    def test_redis_wins_over_the_database(self, sqlite_url):
        """With redis.url set, the shared Redis client holds the keys."""
        settings = load_settings(database={"url": sqlite_url}, redis={"url": "redis://h:6379/0"})
        client = redis_asyncio.from_url("redis://h:6379/0")
        store = build_idempotency_store(settings, redis=client, database=None)
        assert isinstance(store, RedisIdempotencyStore)
        assert client is store.client

    def test_store_url_wins(self, sqlite_url, tmp_path):
        """http.idempotency.store_url overrides the shared backends, with a client of its own."""
        own = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
        for url, expected in (
            ("memory://", MemoryIdempotencyStore),
            ("redis://h:6379/1", RedisIdempotencyStore),
            (own, SqlIdempotencyStore),
        ):
            settings = load_settings(
                database={"url": sqlite_url},
                redis={"url": "redis://h:6379/0"},
                http={"idempotency": {"store_url": url}},
            )
            assert isinstance(
                build_idempotency_store(settings, redis=None, database=None), expected
            )

    async def test_a_sql_store_of_its_own_creates_its_table(self, tmp_path):
        """A SQL store_url that is not the shared database gets its table at start."""
        url = f"sqlite+aiosqlite:///{tmp_path / 'keys.db'}"
        settings = load_settings(
            database={"enabled": False}, http={"idempotency": {"store_url": url}}
        )
        store = build_idempotency_store(settings, redis=None, database=None)
        await store.start()
        try:
            assert None is await store.acquire(digest(), digest(), token(), lock_timeout=LOCK)
        finally:
            await store.stop()

    def test_other_backends_are_refused(self):
        """A broker URL cannot hold idempotency keys."""
        settings = load_settings(http={"idempotency": {"store_url": "nats://h:4222"}})
        with pytest.raises(ConfigurationError, match="store_url"):
            idempotency_store_kind(settings)


class TestMigration:
    async def test_migration_matches_the_table(self, database_url):
        """Bastion's migrations make exactly the table the store uses."""
        database = Database(DatabaseSettings(url=database_url))
        try:
            await Migrator(database, [MigrationTree.bastion()]).upgrade()
            async with database.engine.connect() as connection:
                diffs = await connection.run_sync(
                    lambda sync: compare_metadata(
                        MigrationContext.configure(sync), idempotency_metadata
                    )
                )
        finally:
            await database.aclose()
        ours = [diff for diff in diffs if "bastion_idempotency_keys" in repr(diff)]
        assert [] == ours
