"""/v1/api-keys: create (shown once), list, read, revoke; scopes never escalate; one tenant only."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import delete
from tenancy_support import running

from bastion.identity._tables import memberships


@pytest.fixture
async def service(database_url):
    async with running(
        database_url, identity={"api_keys": {"max_per_tenant": 2}}
    ) as running_service:
        yield running_service


async def _admin(service):
    owner = await service.user()
    tenant = await service.tenant(owner)
    return owner, tenant, service.headers(owner, tenant)


class TestCreate:
    async def test_the_key_is_shown_once_and_works(self, service):
        """The creation answer holds the key; listings never do; the key authenticates."""
        _, tenant, headers = await _admin(service)
        created = await service.client.post(
            "/v1/api-keys", json={"name": "ci", "scopes": ["tenant:read"]}, headers=headers
        )
        assert 201 == created.status_code
        body = created.json()
        assert body["key"].startswith(body["prefix"] + "_")
        assert "no-store" == created.headers["cache-control"]
        listed = await service.client.get("/v1/api-keys", headers=headers)
        assert [body["id"]] == [each["id"] for each in listed.json()]
        assert "key" not in listed.json()[0]
        with_key = await service.client.get(
            f"/v1/tenants/{tenant.id}", headers={"Authorization": f"Bearer {body['key']}"}
        )
        assert 200 == with_key.status_code

    async def test_scopes_beyond_the_creators_are_refused(self, service):
        """An admin cannot give a key members:owners or a wildcard it does not hold."""
        _, tenant, _ = await _admin(service)
        admin = await service.user()
        await service.join(tenant, admin, "admin")
        headers = service.headers(admin, tenant)
        for scopes in (["members:owners"], ["*"], ["members:*"]):
            response = await service.client.post(
                "/v1/api-keys", json={"name": "x", "scopes": scopes}, headers=headers
            )
            assert 403 == response.status_code, scopes
            assert "permission" not in response.json()

    async def test_a_key_cannot_make_keys(self, service):
        """Keys are made by users, whatever the key's scopes."""
        _, _, headers = await _admin(service)
        created = await service.client.post(
            "/v1/api-keys", json={"name": "k", "scopes": ["api_keys:manage"]}, headers=headers
        )
        response = await service.client.post(
            "/v1/api-keys",
            json={"name": "child", "scopes": []},
            headers={"Authorization": f"Bearer {created.json()['key']}"},
        )
        assert 403 == response.status_code

    async def test_the_tenant_limit_counts_live_keys(self, service):
        """Past max_per_tenant live keys, creation is a conflict until one is revoked."""
        _, _, headers = await _admin(service)
        ids = []
        for name in ("a", "b"):
            made = await service.client.post(
                "/v1/api-keys", json={"name": name, "scopes": []}, headers=headers
            )
            ids.append(made.json()["id"])
        third = await service.client.post(
            "/v1/api-keys", json={"name": "c", "scopes": []}, headers=headers
        )
        assert 409 == third.status_code
        await service.client.delete(f"/v1/api-keys/{ids[0]}", headers=headers)
        fourth = await service.client.post(
            "/v1/api-keys", json={"name": "d", "scopes": []}, headers=headers
        )
        assert 201 == fourth.status_code

    async def test_a_past_expiry_or_naive_time_is_invalid(self, service):
        """expires_at must be a future, timezone-aware instant."""
        _, _, headers = await _admin(service)
        past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
        naive = (datetime.now(UTC) + timedelta(hours=1)).replace(tzinfo=None).isoformat()
        for value in (past, naive):
            response = await service.client.post(
                "/v1/api-keys",
                json={"name": "x", "scopes": [], "expires_at": value},
                headers=headers,
            )
            assert 422 == response.status_code

    async def test_a_viewer_cannot_manage_keys(self, service):
        """api_keys:manage is needed."""
        _, tenant, _ = await _admin(service)
        viewer = await service.user()
        await service.join(tenant, viewer, "viewer")
        response = await service.client.get("/v1/api-keys", headers=service.headers(viewer, tenant))
        assert 403 == response.status_code

    async def test_the_membership_row_decides_not_a_stale_cache(self, service):
        """Creation re-reads the membership under the tenant lock: a stale cache grants nothing."""
        _, tenant, _ = await _admin(service)
        admin = await service.user()
        await service.join(tenant, admin, "admin")
        headers = service.headers(admin, tenant)
        # Loads the admin's permissions into the cache...
        assert 200 == (await service.client.get("/v1/api-keys", headers=headers)).status_code
        # ...then the membership goes without the cache hearing of it (another
        # instance's removal whose invalidation has not arrived yet).
        async with service.identity.database.session() as session:
            await session.execute(
                delete(memberships).where(
                    memberships.c.tenant_id == tenant.id, memberships.c.user_id == admin.id
                )
            )
        made = await service.client.post(
            "/v1/api-keys", json={"name": "late", "scopes": ["tenant:read"]}, headers=headers
        )
        assert 403 == made.status_code


class TestRevoke:
    async def test_a_revoked_key_is_refused_at_once(self, service):
        """After DELETE the key answers 401 on the next request (the cache is dropped)."""
        _, tenant, headers = await _admin(service)
        created = (
            await service.client.post(
                "/v1/api-keys", json={"name": "ci", "scopes": ["tenant:read"]}, headers=headers
            )
        ).json()
        key_headers = {"Authorization": f"Bearer {created['key']}"}
        assert (
            200
            == (
                await service.client.get(f"/v1/tenants/{tenant.id}", headers=key_headers)
            ).status_code
        )
        revoked = await service.client.delete(f"/v1/api-keys/{created['id']}", headers=headers)
        again = await service.client.delete(f"/v1/api-keys/{created['id']}", headers=headers)
        assert (204, 204) == (revoked.status_code, again.status_code)
        assert (
            401
            == (
                await service.client.get(f"/v1/tenants/{tenant.id}", headers=key_headers)
            ).status_code
        )
        shown = await service.client.get(f"/v1/api-keys/{created['id']}", headers=headers)
        assert shown.json()["revoked_at"] is not None

    async def test_another_tenants_key_reads_as_absent(self, service):
        """Reading or revoking another tenant's key id answers 404 and changes nothing."""
        _, _, theirs = await _admin(service)
        _, _, mine = await _admin(service)
        created = (
            await service.client.post(
                "/v1/api-keys", json={"name": "x", "scopes": []}, headers=theirs
            )
        ).json()
        read = await service.client.get(f"/v1/api-keys/{created['id']}", headers=mine)
        revoke = await service.client.delete(f"/v1/api-keys/{created['id']}", headers=mine)
        missing = await service.client.get(f"/v1/api-keys/{uuid.uuid4()}", headers=mine)
        assert (404, 404, 404) == (read.status_code, revoke.status_code, missing.status_code)
        still = await service.client.get(f"/v1/api-keys/{created['id']}", headers=theirs)
        assert still.json()["revoked_at"] is None
        assert [] == (await service.client.get("/v1/api-keys", headers=mine)).json()
