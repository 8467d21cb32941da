"""Identity across two real `bastion serve` processes sharing PostgreSQL and Redis."""

from __future__ import annotations

import secrets

import httpx
import pytest

from bastion.data import Database
from bastion.identity import PasswordHasher, generate_jwks
from bastion.identity._directory import create_user
from bastion.settings import DatabaseSettings

APP = "tests.cluster.identity_app:app"
PASSWORD = "correct horse battery staple"
PEPPER = secrets.token_urlsafe(48)

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.redis]


def identity_env(postgres_url: str, redis_url: str, prefix: str) -> dict[str, str]:
    """One deployment: shared database, Redis, secrets; cheap Argon2; the default lockout."""
    return {
        "BASTION_DATABASE__URL": postgres_url,
        "BASTION_MIGRATIONS__MODE": "auto",
        "BASTION_REDIS__URL": redis_url,
        "BASTION_REDIS__KEY_PREFIX": prefix,
        "BASTION_LOGGING__LEVEL": "INFO",
        "BASTION_IDENTITY__PASSWORDS__PEPPER": PEPPER,
        "BASTION_IDENTITY__PASSWORDS__TIME_COST": "1",
        "BASTION_IDENTITY__PASSWORDS__MEMORY_COST": "8",
        "BASTION_IDENTITY__API_KEYS__SECRET": secrets.token_urlsafe(48),
        "BASTION_IDENTITY__TOKENS__SIGNING_KEYS": generate_jwks(),
        # The IP allowance (5 per 15 minutes by default) would answer RATE_LIMITED
        # before the lockout is looked at: the test is about the lockout.
        "BASTION_RATELIMIT__LOGIN__IP_LIMIT": "100 per 15 minutes",
    }


async def verified_user(postgres_url: str) -> str:
    """Create a verified account directly (no mail round trip) and return its address."""
    address = f"cluster-{secrets.token_hex(5)}@example.com"
    hasher = PasswordHasher(PEPPER, time_cost=1, memory_cost=8, hash_concurrency=1)
    database = Database(DatabaseSettings(url=postgres_url))
    try:
        async with database.session() as session:
            await create_user(
                session, address, password_hash=await hasher.hash(PASSWORD), verified=True
            )
    finally:
        await database.aclose()
        await hasher.aclose()
    return address


async def test_lockout_on_one_instance_holds_on_another(
    serve_cluster, postgres_url, redis_url, redis_prefix
):
    """Five failed logins on A lock the address: B refuses the right password with 429."""
    env = identity_env(postgres_url, redis_url, redis_prefix)
    a = serve_cluster(APP, env=env)
    b = serve_cluster(APP, env=env)
    address = await verified_user(postgres_url)
    login = "/v1/auth/login"
    async with httpx.AsyncClient(timeout=10) as client:
        right = {"email": address, "password": PASSWORD}
        assert 200 == (await client.post(b.url + login, json=right)).status_code
        wrong = {"email": address, "password": "not the right password"}
        for _ in range(5):
            assert 401 == (await client.post(a.url + login, json=wrong)).status_code
        locked = await client.post(b.url + login, json=right)
    assert 429 == locked.status_code, f"{locked.text}\n{b.describe()}"
    assert "ACCOUNT_LOCKED" == locked.json()["code"]
    assert int(locked.headers["retry-after"]) > 0
