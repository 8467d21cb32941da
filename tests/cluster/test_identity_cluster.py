"""Identity across two real `bastion serve` processes sharing PostgreSQL and Redis."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass

import httpx
import pytest

from bastion.data import Database
from bastion.identity import PasswordHasher, generate_jwks
from bastion.identity._directory import add_membership, create_tenant, create_user
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


@dataclass(frozen=True, slots=True)
class Member:
    """An account made for a test: its id and address (the password is ``PASSWORD``)."""

    id: uuid.UUID
    email: str


async def tenant_with_members(postgres_url: str, *roles: str) -> tuple[uuid.UUID, list[Member]]:
    """Create a tenant and one verified member per role, directly in the shared database.

    Invitations go through the mail sender, which the test cannot read in another
    process: the rows are written as ``bastion users create`` writes them.
    """
    hasher = PasswordHasher(PEPPER, time_cost=1, memory_cost=8, hash_concurrency=1)
    database = Database(DatabaseSettings(url=postgres_url))
    suffix = secrets.token_hex(5)
    try:
        password_hash = await hasher.hash(PASSWORD)
        async with database.session() as session:
            tenant = await create_tenant(session, f"Cluster {suffix}", f"cluster-{suffix}")
            members = []
            for index, role in enumerate(roles):
                user = await create_user(
                    session,
                    f"{role}-{index}-{suffix}@example.com",
                    password_hash=password_hash,
                    verified=True,
                )
                await add_membership(session, tenant.id, user.id, role)
                members.append(Member(user.id, user.email))
    finally:
        await database.aclose()
        await hasher.aclose()
    return tenant.id, members


async def log_in(client: httpx.AsyncClient, base_url: str, member: Member) -> dict[str, str]:
    """Log ``member`` in to its only tenant; return the token response."""
    answer = await client.post(
        base_url + "/v1/auth/login", json={"email": member.email, "password": PASSWORD}
    )
    assert 200 == answer.status_code, answer.text
    tokens: dict[str, str] = answer.json()
    return tokens


def bearer(tokens: dict[str, str]) -> dict[str, str]:
    """The Authorization header for a token response's access token."""
    return {"authorization": f"Bearer {tokens['access_token']}"}


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


async def test_role_change_on_one_instance_applies_on_another_at_once(
    serve_cluster, postgres_url, redis_url, redis_prefix
):
    """An admin demoted to viewer on A is refused an admin route on B on its very next request."""
    env = identity_env(postgres_url, redis_url, redis_prefix)
    a = serve_cluster(APP, env=env)
    b = serve_cluster(APP, env=env)
    tenant_id, (owner, admin) = await tenant_with_members(postgres_url, "owner", "admin")
    async with httpx.AsyncClient(timeout=10) as client:
        owner_auth = bearer(await log_in(client, a.url, owner))
        admin_auth = bearer(await log_in(client, a.url, admin))
        # Twice: B now holds the admin's permissions in its process, not only in Redis.
        for _ in range(2):
            listed = await client.get(b.url + "/v1/api-keys", headers=admin_auth)
            assert 200 == listed.status_code, f"{listed.text}\n{b.describe()}"
        changed = await client.patch(
            f"{a.url}/v1/tenants/{tenant_id}/members/{admin.id}",
            json={"role": "viewer"},
            headers=owner_auth,
        )
        assert 200 == changed.status_code, f"{changed.text}\n{a.describe()}"
        # No sleep, no retry: the next request is the one that must see the change.
        refused = await client.get(b.url + "/v1/api-keys", headers=admin_auth)
        # The token itself is still good: what a viewer may do, it may still do.
        members = await client.get(f"{b.url}/v1/tenants/{tenant_id}/members", headers=admin_auth)
    assert 403 == refused.status_code, f"{refused.text}\n{b.describe()}"
    assert "FORBIDDEN" == refused.json()["code"]
    assert 200 == members.status_code, members.text
    assert {"owner", "viewer"} == {member["role"] for member in members.json()}


async def test_member_removed_on_one_instance_is_refused_on_another_at_once(
    serve_cluster, postgres_url, redis_url, redis_prefix
):
    """A member removed on A is refused on B at its next request, and so is its refresh token."""
    env = identity_env(postgres_url, redis_url, redis_prefix)
    a = serve_cluster(APP, env=env)
    b = serve_cluster(APP, env=env)
    tenant_id, (owner, member) = await tenant_with_members(postgres_url, "owner", "member")
    members_url = f"/v1/tenants/{tenant_id}/members"
    async with httpx.AsyncClient(timeout=10) as client:
        owner_auth = bearer(await log_in(client, a.url, owner))
        tokens = await log_in(client, a.url, member)
        for _ in range(2):
            listed = await client.get(b.url + members_url, headers=bearer(tokens))
            assert 200 == listed.status_code, f"{listed.text}\n{b.describe()}"
        removed = await client.delete(f"{a.url}{members_url}/{member.id}", headers=owner_auth)
        assert 204 == removed.status_code, f"{removed.text}\n{a.describe()}"
        refused = await client.get(b.url + members_url, headers=bearer(tokens))
        refreshed = await client.post(
            b.url + "/v1/auth/refresh", json={"refresh_token": tokens["refresh_token"]}
        )
    assert 403 == refused.status_code, f"{refused.text}\n{b.describe()}"
    assert "FORBIDDEN" == refused.json()["code"]
    assert 401 == refreshed.status_code, f"{refreshed.text}\n{b.describe()}"
    assert "UNAUTHENTICATED" == refreshed.json()["code"]
