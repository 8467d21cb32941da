"""The service's main flows over HTTP with real credentials: sign-up to documents, invitations,
role changes, API keys. Mail is read from the app's logging sender, as a developer would."""

from __future__ import annotations

import dataclasses
import re
import secrets
import uuid

import pytest

from bastion.testing import LocalOidcIssuer, TestMember, create_member, lifespan_client

PASSWORD = "quiet-lantern-harbour-58"
PROBLEM = "application/problem+json"


def unique_email(label: str) -> str:
    return f"{label}-{secrets.token_hex(5)}@example.test"


def mailed_token(app, purpose: str, to: str) -> str:
    """The single-use token in the latest message of ``purpose`` sent to ``to``."""
    message = app.state.bastion.identity.mail.last(purpose=purpose, to=to)
    return re.search(r"token=([A-Za-z0-9_-]+)", message.text).group(1)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def log_in(client, email: str, tenant: str | None = None) -> str:
    payload = {"email": email, "password": PASSWORD} | ({"tenant": tenant} if tenant else {})
    response = await client.post("/v1/auth/login", json=payload)
    assert 200 == response.status_code, response.text
    return response.json()["access_token"]


class TestSignUpToDocuments:
    async def test_a_new_user_signs_up_verifies_logs_in_and_writes(self, app, client):
        """Sign-up with a tenant, the mailed link, login: the token writes documents as its user."""
        email, slug = unique_email("founder"), f"t-{secrets.token_hex(6)}"
        signed_up = await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "tenant": {"name": "New", "slug": slug}},
        )
        verified = await client.post(
            "/v1/auth/verify-email", json={"token": mailed_token(app, "verification", email)}
        )
        token = await log_in(client, email)
        me = (await client.get("/v1/auth/me", headers=bearer(token))).json()
        created = await client.post("/v1/documents", json={"title": "First"}, headers=bearer(token))
        assert (202, 200, 201) == (
            signed_up.status_code,
            verified.status_code,
            created.status_code,
        )
        assert (slug, "owner") == (me["tenant"]["slug"], me["tenant"]["role"])
        assert me["user"]["id"] == created.json()["created_by"]

    async def test_an_unverified_user_cannot_log_in(self, client):
        """Until the mailed link is followed there is no token, so no document access."""
        email = unique_email("unverified")
        await client.post(
            "/v1/auth/signup",
            json={
                "email": email,
                "password": PASSWORD,
                "tenant": {"name": "U", "slug": f"t-{secrets.token_hex(6)}"},
            },
        )
        response = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert response.status_code in {401, 403}


class TestInvitations:
    async def test_an_invited_viewer_reads_then_writes_once_promoted(
        self, app, client, workspace, create_document
    ):
        """Invite, sign up with the invitation, read; a role change lets the same token write."""
        doc = await create_document(workspace.owner, "Shared plan")
        email = unique_email("colleague")
        invited = await client.post(
            f"/v1/tenants/{workspace.id}/members/invitations",
            json={"email": email, "role": "viewer"},
            headers=workspace.owner.headers,
        )
        assert 201 == invited.status_code, invited.text
        joined = await client.post(
            "/v1/auth/signup",
            json={
                "email": email,
                "password": PASSWORD,
                "invitation": mailed_token(app, "invitation", email),
            },
        )
        assert 202 == joined.status_code, joined.text
        token = await log_in(client, email, workspace.slug)
        read = await client.get(f"/v1/documents/{doc['id']}", headers=bearer(token))
        refused = await client.post("/v1/documents", json={"title": "x"}, headers=bearer(token))
        me = (await client.get("/v1/auth/me", headers=bearer(token))).json()
        promoted = await client.patch(
            f"/v1/tenants/{workspace.id}/members/{me['user']['id']}",
            json={"role": "member"},
            headers=workspace.owner.headers,
        )
        allowed = await client.post("/v1/documents", json={"title": "x"}, headers=bearer(token))
        assert (200, 403, 200, 201) == (
            read.status_code,
            refused.status_code,
            promoted.status_code,
            allowed.status_code,
        )

    async def test_an_existing_user_accepts_and_logs_into_the_tenant(
        self, app, client, workspace, create_document
    ):
        """A verified user accepts an invitation, then logs in to the tenant by its slug."""
        doc = await create_document(workspace.owner, "Shared plan")
        email = unique_email("guest")
        await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD},
        )
        await client.post(
            "/v1/auth/verify-email", json={"token": mailed_token(app, "verification", email)}
        )
        invited = await client.post(
            f"/v1/tenants/{workspace.id}/members/invitations",
            json={"email": email, "role": "viewer"},
            headers=workspace.owner.headers,
        )
        assert 201 == invited.status_code, invited.text
        accepted = await client.post(
            "/v1/tenants/invitations/accept",
            json={"token": mailed_token(app, "invitation", email)},
            headers=bearer(await log_in(client, email)),
        )
        token = await log_in(client, email, workspace.slug)
        read = await client.get(f"/v1/documents/{doc['id']}", headers=bearer(token))
        assert (200, 200) == (accepted.status_code, read.status_code)

    async def test_a_removed_member_is_refused_at_once(
        self, client, workspace, add_member, create_document
    ):
        """Removing a member takes effect on their unexpired token at the next request."""
        member: TestMember = await add_member(workspace, "member")
        doc = await create_document(member, "Theirs")
        removed = await client.delete(
            f"/v1/tenants/{workspace.id}/members/{member.user_id}",
            headers=workspace.owner.headers,
        )
        after = await client.get(f"/v1/documents/{doc['id']}", headers=member.headers)
        assert (204, 403) == (removed.status_code, after.status_code)
        # The document stays with the tenant, still attributed to its author.
        kept = await client.get(f"/v1/documents/{doc['id']}", headers=workspace.owner.headers)
        assert str(member.user_id) == kept.json()["created_by"]


class TestApiKeys:
    async def _key(self, client, workspace, scopes: list[str]) -> dict:
        response = await client.post(
            "/v1/api-keys",
            json={"name": "automation", "scopes": scopes},
            headers=workspace.owner.headers,
        )
        assert 201 == response.status_code, response.text
        return response.json()

    async def test_a_document_written_by_a_key_names_the_key(self, client, workspace):
        """A key with documents:write creates documents; the key, not a user, is the author."""
        key = await self._key(client, workspace, ["documents:read", "documents:write"])
        created = await client.post(
            "/v1/documents", json={"title": "Imported"}, headers=bearer(key["key"])
        )
        listed = await client.get("/v1/documents", headers=workspace.owner.headers)
        assert 201 == created.status_code, created.text
        assert (None, key["id"]) == (
            created.json()["created_by"],
            created.json()["created_by_api_key"],
        )
        assert [(None, key["id"])] == [
            (item["created_by"], item["created_by_api_key"]) for item in listed.json()["items"]
        ]

    async def test_a_key_holds_only_its_scopes(self, client, workspace, create_document):
        """A read-only key reads but cannot write: 403 FORBIDDEN."""
        doc = await create_document(workspace.owner)
        key = await self._key(client, workspace, ["documents:read"])
        read = await client.get(f"/v1/documents/{doc['id']}", headers=bearer(key["key"]))
        write = await client.post("/v1/documents", json={"title": "x"}, headers=bearer(key["key"]))
        assert (200, 403) == (read.status_code, write.status_code)

    async def test_a_revoked_key_is_refused(self, client, workspace):
        """After DELETE /v1/api-keys/{id} the key authenticates no more."""
        key = await self._key(client, workspace, ["documents:read"])
        revoked = await client.delete(f"/v1/api-keys/{key['id']}", headers=workspace.owner.headers)
        after = await client.get("/v1/documents", headers=bearer(key["key"]))
        assert (204, 401) == (revoked.status_code, after.status_code)
        assert PROBLEM == after.headers["content-type"]


class TestMemberKeysEndWithTheMembership:
    async def _key(self, client, member: TestMember, scopes: list[str]) -> str:
        response = await client.post(
            "/v1/api-keys", json={"name": "automation", "scopes": scopes}, headers=member.headers
        )
        assert 201 == response.status_code, response.text
        return response.json()["key"]

    async def test_a_removed_admins_documents_key_is_refused_at_once(
        self, client, workspace, add_member
    ):
        """An admin's documents key stops working (401) the moment the admin is removed."""
        admin: TestMember = await add_member(workspace, "admin")
        key = await self._key(client, admin, ["documents:read", "documents:write"])
        before = await client.post("/v1/documents", json={"title": "x"}, headers=bearer(key))
        removed = await client.delete(
            f"/v1/tenants/{workspace.id}/members/{admin.user_id}",
            headers=workspace.owner.headers,
        )
        read = await client.get("/v1/documents", headers=bearer(key))
        write = await client.post("/v1/documents", json={"title": "y"}, headers=bearer(key))
        assert (201, 204, 401, 401) == (
            before.status_code,
            removed.status_code,
            read.status_code,
            write.status_code,
        )

    async def test_a_demoted_admin_keeps_only_the_keys_its_new_role_covers(
        self, client, workspace, add_member
    ):
        """Demoted to viewer, an admin's writing key is revoked; its reading key still reads."""
        admin: TestMember = await add_member(workspace, "admin")
        writer = await self._key(client, admin, ["documents:write"])
        reader = await self._key(client, admin, ["documents:read"])
        demoted = await client.patch(
            f"/v1/tenants/{workspace.id}/members/{admin.user_id}",
            json={"role": "viewer"},
            headers=workspace.owner.headers,
        )
        write = await client.post("/v1/documents", json={"title": "x"}, headers=bearer(writer))
        read = await client.get("/v1/documents", headers=bearer(reader))
        assert (200, 401, 200) == (demoted.status_code, write.status_code, read.status_code)


@pytest.fixture
def oidc_issuer():
    with LocalOidcIssuer() as issuer:
        yield issuer


class TestExternalAccounts:
    async def test_an_external_users_document_has_no_local_author(
        self, service, database_url, oidc_issuer
    ):
        """An OIDC user writes unattributed (201), as a trusted service does, whatever its sub."""
        oidc = {
            "external": {
                "issuer": oidc_issuer.url,
                "audience": "bastion",
                "tenant_claim": "tenant",
                "roles_claim": "roles",
            }
        }
        passwords = {"time_cost": 1, "memory_cost": 8}
        app = service(database_url, identity={"passwords": passwords, "oidc": oidc})
        async with lifespan_client(app) as client:
            owner = await create_member(
                app,
                tenant_slug=f"t-{secrets.token_hex(6)}",
                email=unique_email("owner"),
                role="owner",
            )
            # An application's own OidcProvider keeps subjects as sent (no name prefix),
            # so an issuer's sub can be a UUID, even a local user's id.
            for provider in app.state.bastion.identity.oidc.values():
                provider.mapping = dataclasses.replace(provider.mapping, subject_prefix="")
            for subject in (str(owner.user_id), str(uuid.uuid4())):
                token = oidc_issuer.mint(subject, tenant=str(owner.tenant_id), roles=["member"])
                created = await client.post(
                    "/v1/documents", json={"title": "From outside"}, headers=bearer(token)
                )
                assert 201 == created.status_code, created.text
                assert (None, None) == (
                    created.json()["created_by"],
                    created.json()["created_by_api_key"],
                )
