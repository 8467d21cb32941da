"""Harness check: the service fixtures reach real services."""

import asyncpg
import redis.asyncio as aioredis


async def test_postgres_database_is_reachable(postgres_url):
    """The session database accepts connections."""
    conn = await asyncpg.connect(postgres_url.replace("+asyncpg", ""))
    assert 1 == await conn.fetchval("select 1")
    await conn.close()


async def test_redis_is_reachable(redis_url, redis_prefix):
    """The test Redis answers and the prefix is writable."""
    client = aioredis.from_url(redis_url)
    await client.set(redis_prefix + "k", "v")
    assert b"v" == await client.get(redis_prefix + "k")
    await client.aclose()
