"""Revoking access tokens: seen by every instance sharing Redis, bounded by their TTL without."""

from __future__ import annotations

import asyncio
import time

from auth_support import NEW_PASSWORD, PASSWORD, bearer, login, make_app, signup_verified

from bastion.testing import lifespan_client


def two_instances(postgres_url: str, redis_url: str, redis_prefix: str):
    """Two apps of one deployment: one PostgreSQL, one Redis, one key prefix."""
    shared = {"redis": {"url": redis_url, "key_prefix": redis_prefix}}
    return make_app(postgres_url, **shared), make_app(postgres_url, **shared)


async def test_logout_on_one_instance_is_refused_by_another(postgres_url, redis_url, redis_prefix):
    """A token logged out on A answers 401 on B at once; B's other sessions carry on."""
    (app_a, runtime_a), (app_b, _) = two_instances(postgres_url, redis_url, redis_prefix)
    async with lifespan_client(app_a) as a, lifespan_client(app_b) as b:
        email = await signup_verified(a, runtime_a.identity)
        ended = (await login(a, email)).json()["access_token"]
        kept = (await login(b, email)).json()["access_token"]
        assert 200 == (await b.get("/v1/auth/me", headers=bearer(ended))).status_code
        assert 204 == (await a.post("/v1/auth/logout", headers=bearer(ended))).status_code
        refused = await b.get("/v1/auth/me", headers=bearer(ended))
        assert 401 == refused.status_code
        assert "UNAUTHENTICATED" == refused.json()["code"]
        assert 200 == (await b.get("/v1/auth/me", headers=bearer(kept))).status_code


async def test_logout_all_refuses_every_earlier_token_everywhere(
    postgres_url, redis_url, redis_prefix
):
    """After logout-all on A, every token issued before it is refused on B."""
    (app_a, runtime_a), (app_b, _) = two_instances(postgres_url, redis_url, redis_prefix)
    async with lifespan_client(app_a) as a, lifespan_client(app_b) as b:
        email = await signup_verified(a, runtime_a.identity)
        tokens = [(await login(client, email)).json()["access_token"] for client in (a, b)]
        # The mark is in whole seconds, as iat is: a token issued in the second of the
        # logout-all survives it (docs/identity.md). Real time, at most one second.
        await asyncio.sleep(1 - time.time() % 1 + 0.01)
        assert 204 == (await a.post("/v1/auth/logout-all", headers=bearer(tokens[0]))).status_code
        for token in tokens:
            assert 401 == (await b.get("/v1/auth/me", headers=bearer(token))).status_code


async def test_password_change_refuses_old_tokens_and_serves_the_new_pair(
    postgres_url, redis_url, redis_prefix
):
    """A password change on A: B refuses the old access token and accepts the new one."""
    (app_a, runtime_a), (app_b, _) = two_instances(postgres_url, redis_url, redis_prefix)
    async with lifespan_client(app_a) as a, lifespan_client(app_b) as b:
        email = await signup_verified(a, runtime_a.identity)
        old = (await login(a, email)).json()["access_token"]
        changed = await a.post(
            "/v1/auth/password/change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
            headers=bearer(old),
        )
        assert 200 == changed.status_code, changed.text
        assert 401 == (await b.get("/v1/auth/me", headers=bearer(old))).status_code
        new = changed.json()["access_token"]
        assert 200 == (await b.get("/v1/auth/me", headers=bearer(new))).status_code


async def test_without_redis_a_logged_out_access_token_lives_until_it_expires(sqlite_url):
    """No deny list: logout ends the refresh family only; the access token runs out its TTL."""
    app, runtime = make_app(sqlite_url)
    assert runtime.identity.deny_list is None
    async with lifespan_client(app) as client:
        email = await signup_verified(client, runtime.identity)
        pair = (await login(client, email)).json()
        assert (
            204
            == (
                await client.post("/v1/auth/logout", headers=bearer(pair["access_token"]))
            ).status_code
        )
        assert (
            200
            == (await client.get("/v1/auth/me", headers=bearer(pair["access_token"]))).status_code
        )
        refused = await client.post(
            "/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
        )
        assert 401 == refused.status_code
