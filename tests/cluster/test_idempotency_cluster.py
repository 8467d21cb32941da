"""One Idempotency-Key executes once across instances behind nginx: on Redis, and on PostgreSQL.

Two `bastion serve` processes of ``idempotency_app`` run behind one Debian nginx
(round robin), sharing either the test Redis (the Redis store) or a PostgreSQL
database of the test's own with no Redis configured (the SQL store). For each of
several keys, many copies of one POST are fired at once through nginx; the app
counts its executions per key in Redis. Whatever the interleaving, each key
executed exactly once, and every answer is the original (201), its replay (201,
``Idempotent-Replayed: true``, the same body) or 409 while it runs. Waits are
real time (processes and a request that works for a while), each bounded.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from collections.abc import Iterator

import asyncpg
import httpx
import pytest
import redis
from nginx_support import PROXY_ADDRESS, run_async, unavailable

APP = "tests.cluster.idempotency_app:app"
COPIES = 24
KEYS = 4
WORK_SECONDS = "0.3"

pytestmark = [pytest.mark.slow, pytest.mark.redis]


def _env(counter_url: str, counter_prefix: str) -> dict[str, str]:
    return {
        "IDEMPOTENCY_TEST_COUNTER_URL": counter_url,
        "IDEMPOTENCY_TEST_COUNTER_PREFIX": counter_prefix,
        "IDEMPOTENCY_TEST_WORK_SECONDS": WORK_SECONDS,
        "BASTION_HTTP__TRUSTED_PROXIES": json.dumps([f"{PROXY_ADDRESS}/32"]),
        "BASTION_LOGGING__LEVEL": "WARNING",
        "BASTION_LOGGING__ACCESS_LOG": "false",
        "BASTION_IDENTITY__ENABLED": "false",
        "BASTION_AUDIT__ENABLED": "false",
        "BASTION_FLAGS__ENABLED": "false",
        "BASTION_RATELIMIT__ENABLED": "false",
    }


@pytest.fixture(scope="module")
def counter(_redis_session) -> Iterator[tuple[str, str, redis.Redis]]:
    """The test Redis the app counts executions in, under a prefix of this module's own."""
    if _redis_session is None:
        unavailable("redis", "the shared Redis is unreachable")
    url, prefix = _redis_session
    client = redis.Redis.from_url(url)
    yield url, f"{prefix}idem-cluster-{secrets.token_hex(3)}:", client
    client.close()


async def _fire(url: str, key: str) -> list[httpx.Response]:
    """COPIES copies of one POST at once, each on its own connection."""
    limits = httpx.Limits(max_connections=COPIES, max_keepalive_connections=COPIES)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=15.0) as client:
        return await asyncio.gather(
            *(
                client.post("/charges", json={"amount": 42}, headers={"Idempotency-Key": key})
                for _ in range(COPIES)
            )
        )


async def _settled(url: str, key: str) -> httpx.Response:
    """Ask again until the key's answer is stored (its holder done): bounded to 10 s."""
    async with httpx.AsyncClient(base_url=url, timeout=15.0) as client:
        for _ in range(100):
            response = await client.post(
                "/charges", json={"amount": 42}, headers={"Idempotency-Key": key}
            )
            if response.status_code != 409:
                return response
            await asyncio.sleep(0.1)
    raise AssertionError(f"key {key} still in progress after 10 s")


async def _count_records(url: str) -> int:
    connection = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return int(await connection.fetchval("SELECT count(*) FROM bastion_idempotency_keys"))
    finally:
        await connection.close()


def _check_once(url: str, counter: tuple[str, str, redis.Redis]) -> None:
    _, prefix, client = counter
    for _ in range(KEYS):
        key = str(uuid.uuid4())
        responses = run_async(_fire(url, key))
        settled = run_async(_settled(url, key))
        executions = int(client.get(prefix + key) or 0)
        assert 1 == executions, f"key {key} executed {executions} times"
        statuses = sorted({response.status_code for response in responses})
        assert set(statuses) <= {201, 409}, statuses
        originals = [r for r in responses if r.status_code == 201]
        assert originals, "no copy got the original or a replay"
        assert 201 == settled.status_code
        assert "true" == settled.headers["idempotent-replayed"]
        for response in [*originals, settled]:
            assert {"execution": 1, "amount": 42} == {
                name: response.json()[name] for name in ("execution", "amount")
            }
            assert "/charges/1" == response.headers["location"]
        conflicts = [r for r in responses if r.status_code == 409]
        for response in conflicts:
            assert "CONFLICT" == response.json()["code"]
            assert "1" == response.headers["retry-after"]


def test_one_execution_per_key_on_redis(service_group, nginx_proxy, counter):
    """Two instances sharing Redis: each key's many concurrent copies execute once."""
    url, prefix, _ = counter
    env = {
        **_env(url, prefix),
        "BASTION_REDIS__URL": url,
        "BASTION_REDIS__KEY_PREFIX": f"{prefix}bastion:",
        "BASTION_DATABASE__ENABLED": "false",
    }
    services = service_group(2, APP, env)
    proxy = nginx_proxy([service.port for service in services])
    _check_once(proxy.url, counter)
    # Both instances served: the guarantee held across processes, not within one.
    assert 2 == len(proxy.upstreams_used())
    # The records are in the shared Redis, one per key.
    assert KEYS == len(counter[2].keys(f"{prefix}bastion:idempotency:*"))


@pytest.fixture
def cluster_database(postgres_url, scratch_postgres) -> Iterator[str]:
    """A PostgreSQL database of the test's own (the instances migrate it at start-up)."""
    with scratch_postgres(f"idem_{secrets.token_hex(3)}") as url:
        yield url


@pytest.mark.postgres
def test_one_execution_per_key_on_postgres(
    service_group, nginx_proxy, counter, cluster_database, tmp_path
):
    """Two instances sharing PostgreSQL (no Redis configured: the SQL store): each key's
    many concurrent copies execute once."""
    url, prefix, _ = counter
    env = {
        **_env(url, prefix),
        "BASTION_DATABASE__URL": cluster_database,
        "BASTION_MIGRATIONS__MODE": "auto",
        "BASTION_SECRETS__DEVELOPMENT_DIRECTORY": str(tmp_path / "secrets"),
    }
    services = service_group(2, APP, env)
    proxy = nginx_proxy([service.port for service in services])
    try:
        _check_once(proxy.url, counter)
        assert 2 == len(proxy.upstreams_used())
        # The records are in the shared database's table, one per key.
        assert KEYS == run_async(_count_records(cluster_database))
    finally:
        # Stopped before the database is dropped: their pools would hold it open.
        proxy.stop()
        for service in services:
            service.kill()
