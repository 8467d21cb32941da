"""ApiKeyStore: the request path's cached lookup of API-key records, revocation and last use."""

from __future__ import annotations

import asyncio
import uuid

import pytest
import redis.asyncio
from sqlalchemy import delete, select
from tenancy_support import bearer, running

from bastion.identity._api_key_store import ApiKeyStore, deny_list_entry
from bastion.identity._deny_list import RedisDenyList
from bastion.identity._tables import api_keys
from bastion.settings import IdentitySettings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def service(database_url):
    async with running(database_url) as running_service:
        yield running_service


async def _stored_key(service):
    owner = await service.user()
    tenant = await service.tenant(owner)
    created = service.identity.api_keys.create(str(tenant.id), "k", ["tenant:read"])
    record = created.record
    async with service.identity.database.session() as session:
        await session.execute(
            api_keys.insert().values(
                id=uuid.UUID(record.id),
                tenant_id=tenant.id,
                name=record.name,
                scopes=list(record.scopes),
                prefix=record.prefix,
                public_id=record.public_id,
                hash=record.hash,
                created_at=record.created_at,
            )
        )
    return record


async def _drop(service, record) -> None:
    async with service.identity.database.session() as session:
        await session.execute(delete(api_keys).where(api_keys.c.id == uuid.UUID(record.id)))


class TestCache:
    async def test_a_found_record_is_served_from_memory_for_ttl(self, service):
        """Within ttl the record comes from memory (even with the row gone); then from the table."""
        clock = Clock()
        store = ApiKeyStore(
            service.identity.database, service.identity.api_keys, ttl=30, clock=clock
        )
        record = await _stored_key(service)
        assert record.hash == (await store.get(record.public_id)).hash
        await _drop(service, record)
        clock.now += 29
        assert record.id == (await store.get(record.public_id)).id
        clock.now += 2
        assert await store.get(record.public_id) is None

    async def test_an_unknown_id_is_remembered_briefly(self, service):
        """A miss is kept for negative_ttl: a flood of made-up ids does not reach the database."""
        clock = Clock()
        store = ApiKeyStore(
            service.identity.database,
            service.identity.api_keys,
            ttl=30,
            negative_ttl=5,
            clock=clock,
        )
        record = await _stored_key(service)
        await _drop(service, record)
        assert await store.get(record.public_id) is None
        await _stored_key_with(service, record)
        clock.now += 4
        assert await store.get(record.public_id) is None
        clock.now += 2
        assert record.id == (await store.get(record.public_id)).id

    async def test_the_cache_is_bounded_and_forgets(self, service):
        """Past max_entries the least recently used goes; forget() drops one at once."""
        store = ApiKeyStore(service.identity.database, service.identity.api_keys, max_entries=2)
        for public_id in ("a" * 12, "b" * 12, "c" * 12):
            await store.get(public_id)
        assert 2 == len(store)
        store.forget("c" * 12)
        assert 1 == len(store)

    async def test_concurrent_misses_share_one_query(self, service):
        """Ten requests for one uncached key make one query."""
        store = ApiKeyStore(service.identity.database, service.identity.api_keys)
        record = await _stored_key(service)
        loads = 0
        load = store._load

        async def counted(public_id):
            nonlocal loads
            loads += 1
            await asyncio.sleep(0.01)
            return await load(public_id)

        store._load = counted
        found = await asyncio.gather(*(store.get(record.public_id) for _ in range(10)))
        assert 1 == loads
        assert {record.id} == {each.id for each in found}


async def _stored_key_with(service, record) -> None:
    async with service.identity.database.session() as session:
        await session.execute(
            api_keys.insert().values(
                id=uuid.UUID(record.id),
                tenant_id=uuid.UUID(record.tenant),
                name=record.name,
                scopes=list(record.scopes),
                prefix=record.prefix,
                public_id=record.public_id,
                hash=record.hash,
                created_at=record.created_at,
            )
        )


class TestRevocation:
    async def test_a_cached_record_on_the_deny_list_is_refused(
        self, service, redis_url, redis_prefix
    ):
        """Another instance's revocation reaches this one's cache through the deny list."""
        client = redis.asyncio.Redis.from_url(redis_url)
        deny = RedisDenyList.from_settings(IdentitySettings(), client, key_prefix=redis_prefix)
        try:
            store = ApiKeyStore(
                service.identity.database, service.identity.api_keys, ttl=60, deny_list=deny
            )
            record = await _stored_key(service)
            assert await store.get(record.public_id) is not None
            await deny.revoke(deny_list_entry(record.id), until=10**10)
            assert await store.get(record.public_id) is None
        finally:
            await deny.aclose()
            await client.aclose()


class TestTouch:
    async def test_last_used_is_written_once_per_interval(self, service):
        """The first use writes last_used_at in the background; a second one soon after does not."""
        store = ApiKeyStore(service.identity.database, service.identity.api_keys, touch_interval=60)
        record = await _stored_key(service)
        await store.touch(record)
        await store.touch(record)
        assert 1 == len(store._tasks)
        await store.aclose()
        async with service.identity.database.sessions() as session:
            used = await session.scalar(
                select(api_keys.c.last_used_at).where(api_keys.c.id == uuid.UUID(record.id))
            )
        assert used is not None

    async def test_a_failed_write_never_raises(self, service):
        """A last-used write that fails is logged and dropped."""
        store = ApiKeyStore(service.identity.database, service.identity.api_keys)
        record = await _stored_key(service)
        broken = record.__class__(
            **{**{f: getattr(record, f) for f in record.__slots__}, "id": "not-a-uuid"}
        )
        await store.touch(broken)
        await store.aclose()


class TestRehash:
    async def test_the_new_hash_is_stored_and_read_back(self, service):
        """rehash() writes the new hash in the background; the next lookup reads it."""
        store = ApiKeyStore(service.identity.database, service.identity.api_keys)
        record = await _stored_key(service)
        stale = b"\x00" * 32
        async with service.identity.database.session() as session:
            await session.execute(
                api_keys.update().where(api_keys.c.id == uuid.UUID(record.id)).values(hash=stale)
            )
        await store.rehash(record, record.hash)
        await store.aclose()
        assert record.hash == (await store.get(record.public_id)).hash


class TestMemberRemovalAcrossInstances:
    async def test_a_removed_members_key_is_refused_by_every_instance(
        self, database_url, redis_url, redis_prefix
    ):
        """Removed on one instance, the member's key cached by another is refused there (401)."""
        shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}}
        async with (
            running(database_url, **shared) as first,
            running(database_url, **shared) as second,
        ):
            owner, admin = await first.user(), await first.user()
            tenant = await first.tenant(owner)
            await first.join(tenant, admin, "admin")
            key = await first.key(admin, tenant, ["tenant:read"])
            path = f"/v1/tenants/{tenant.id}"
            # The second instance now serves the key's record from its cache.
            assert 200 == (await second.client.get(path, headers=bearer(key["key"]))).status_code
            removed = await first.client.delete(
                f"{path}/members/{admin.id}", headers=first.headers(owner, tenant)
            )
            after = await second.client.get(path, headers=bearer(key["key"]))
            assert (204, 401) == (removed.status_code, after.status_code)
