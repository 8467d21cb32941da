"""Who may call the service: bastion's credentials, the service's permissions, its roles."""

from __future__ import annotations

import uuid

import pytest

from bastion.identity import Roles
from bastion.testing import create_member, lifespan_client, member_token
from bastion_docs.app import DOCUMENT_PERMISSIONS

PROBLEM = "application/problem+json"
IF_V1 = {"If-Match": '"v1"'}
"""The ETag of a document never changed: writes need one (428 without)."""


def problem(response) -> tuple[int, str, str]:
    return response.status_code, response.headers["content-type"], response.json()["code"]


def tampered(token: str) -> str:
    """The token with its signature changed: same header and claims, a signature no key made."""
    head, _, signature = token.rpartition(".")
    return f"{head}.{'A' if signature[0] != 'A' else 'B'}{signature[1:]}"


class TestAuthentication:
    @pytest.mark.parametrize("credential", ["missing", "garbage", "tampered", "expired"])
    async def test_no_valid_credential_is_unauthenticated(self, app, client, workspace, credential):
        """Without a valid access token every service route is 401 with a Bearer challenge."""
        token = {
            "garbage": "not-a-token",
            "tampered": tampered(workspace.owner.token),
            "expired": app.state.bastion.identity.tokens.issue(
                str(workspace.owner.user_id), workspace.id, ["owner"], ttl=-600
            ).token,
        }.get(credential)
        headers = {} if token is None else {"Authorization": f"Bearer {token}"}
        responses = [
            await client.get("/v1/documents", headers=headers),
            await client.get("/v1/documents/00000000-0000-7000-8000-000000000000", headers=headers),
            await client.post("/v1/documents", json={"title": "x"}, headers=headers),
            await client.post("/v1/assistant/ask", json={"question": "x"}, headers=headers),
        ]
        assert [(401, PROBLEM, "UNAUTHENTICATED")] * 4 == [problem(r) for r in responses]
        assert all(r.headers["www-authenticate"].startswith("Bearer") for r in responses)

    async def test_authentication_comes_before_validation(self, client):
        """An anonymous, invalid write is 401, not 422: nothing is validated for strangers."""
        response = await client.post("/v1/documents", json={"title": "x" * 500})
        assert (401, PROBLEM, "UNAUTHENTICATED") == problem(response)

    async def test_a_real_token_is_accepted(self, client, workspace):
        """The token create_member signs is what the middleware accepts."""
        response = await client.get("/v1/documents", headers=workspace.owner.headers)
        assert 200 == response.status_code


class TestPermissions:
    async def test_viewer_reads_but_cannot_write(
        self, client, workspace, add_member, create_document
    ):
        """A viewer can read, list and ask; POST, PATCH and DELETE are 403 FORBIDDEN."""
        viewer = await add_member(workspace, "viewer")
        doc = await create_document(workspace.owner)
        url = f"/v1/documents/{doc['id']}"
        assert 200 == (await client.get(url, headers=viewer.headers)).status_code
        listed = await client.get("/v1/documents", headers=viewer.headers)
        assert [doc["id"]] == [item["id"] for item in listed.json()["items"]]
        asked = await client.post(
            "/v1/assistant/ask", json={"question": "title"}, headers=viewer.headers
        )
        assert 200 == asked.status_code
        writes = [
            await client.post("/v1/documents", json={"title": "x"}, headers=viewer.headers),
            await client.patch(url, json={"title": "x"}, headers=viewer.headers | IF_V1),
            await client.delete(url, headers=viewer.headers | IF_V1),
        ]
        assert [(403, PROBLEM, "FORBIDDEN")] * 3 == [problem(r) for r in writes]
        assert doc == (await client.get(url, headers=workspace.owner.headers)).json()

    @pytest.mark.parametrize("role", ["member", "admin", "owner"])
    async def test_members_and_up_write_documents(self, client, workspace, add_member, role):
        """Members, admins and owners create, change and delete; the author is recorded."""
        writer = await add_member(workspace, role)
        created = await client.post("/v1/documents", json={"title": "m"}, headers=writer.headers)
        url = created.headers["location"]
        etag = {"If-Match": created.headers["etag"]}
        patched = await client.patch(url, json={"body": "b"}, headers=writer.headers | etag)
        etag = {"If-Match": patched.headers["etag"]}
        deleted = await client.delete(url, headers=writer.headers | etag)
        assert (201, 200, 204) == (created.status_code, patched.status_code, deleted.status_code)
        assert str(writer.user_id) == created.json()["created_by"]

    async def test_a_token_for_a_tenant_without_membership_grants_nothing(
        self, app, client, new_workspace, create_document
    ):
        """A signed token naming a tenant the user is not a member of reads nothing there."""
        a, b = await new_workspace("A"), await new_workspace("B")
        await create_document(b.owner, "B's")
        stray = {"Authorization": f"Bearer {member_token(app, a.owner.user_id, b.id, 'owner')}"}
        responses = [
            await client.get("/v1/documents", headers=stray),
            await client.post("/v1/documents", json={"title": "x"}, headers=stray),
        ]
        assert [(403, PROBLEM, "FORBIDDEN")] * 2 == [problem(r) for r in responses]

    async def test_a_forbidden_answer_does_not_name_the_permission(
        self, client, workspace, add_member
    ):
        """The 403 says no more than FORBIDDEN: what a caller lacks is not disclosed."""
        viewer = await add_member(workspace, "viewer")
        response = await client.post("/v1/documents", json={"title": "x"}, headers=viewer.headers)
        assert "documents:" not in response.text


class TestTrustedService:
    async def test_a_trusted_caller_writes_without_a_recorded_author(self, service, sqlite_url):
        """A caller trusted by network naming its tenant by header writes as its roles allow."""
        app = service(
            sqlite_url,
            tenancy={"trusted_header": "X-Tenant-Id", "trusted_networks": ["127.0.0.1/32"]},
        )
        async with lifespan_client(app) as client:
            owner = await create_member(
                app, tenant_slug="trusted", email="owner@trusted.test", role="owner"
            )
            created = await client.post(
                "/v1/documents",
                json={"title": "From the importer"},
                headers={"X-Tenant-Id": str(owner.tenant_id)},
            )
            listed = await client.get("/v1/documents", headers=owner.headers)
        assert 201 == created.status_code, created.text
        assert (None, None) == (
            created.json()["created_by"],
            created.json()["created_by_api_key"],
        )
        assert [created.json()["id"]] == [item["id"] for item in listed.json()["items"]]

    async def test_a_tenant_that_does_not_exist_is_refused(self, service, database_url):
        """A trusted caller naming no tenant of this service gets 403, not a database 500."""
        app = service(
            database_url,
            tenancy={"trusted_header": "X-Tenant-Id", "trusted_networks": ["127.0.0.1/32"]},
        )
        async with lifespan_client(app) as client:
            created = await client.post(
                "/v1/documents",
                json={"title": "Nowhere"},
                headers={"X-Tenant-Id": str(uuid.uuid4())},
            )
        assert (403, "FORBIDDEN") == (created.status_code, created.json()["code"])


class TestServiceRoles:
    def test_the_service_extends_bastions_roles(self, app):
        """Viewers read documents, members write them, admins and owners inherit both."""
        settings = app.state.bastion.settings.identity
        roles = Roles(
            {name: role.permissions for name, role in settings.roles.items()},
            inherits={name: role.inherits for name, role in settings.roles.items()},
        )
        granted = {
            name: {"documents:read", "documents:write"} & roles.permissions_for([name])
            for name in ("viewer", "member", "admin", "owner")
        }
        assert {
            "viewer": {"documents:read"},
            "member": {"documents:read", "documents:write"},
            "admin": {"documents:read", "documents:write"},
            "owner": {"documents:read", "documents:write"},
        } == granted
        # Bastion's own permissions are kept.
        assert "members:manage" in roles.permissions_for(["admin"])
        assert {"viewer": ("documents:read",), "member": ("documents:write",)} == (
            DOCUMENT_PERMISSIONS
        )

    def test_configured_roles_replace_the_services(self, service, sqlite_url):
        """identity.roles set by the operator is used as given, without the service's additions."""
        roles = {
            "reader": {"permissions": ["documents:read"]},
            "owner": {"permissions": ["*"]},
        }
        app = service(sqlite_url, identity={"roles": roles, "invite_role": "reader"})
        configured = app.state.bastion.settings.identity.roles
        assert {"reader": ["documents:read"], "owner": ["*"]} == {
            name: role.permissions for name, role in configured.items()
        }

    def test_roles_from_the_environment_replace_the_services(
        self, service, sqlite_url, monkeypatch
    ):
        """BASTION_IDENTITY__ROLES wins over the service's roles, like any other source."""
        monkeypatch.setenv(
            "BASTION_IDENTITY__ROLES",
            '{"owner": {"permissions": ["*"]}, "member": {"permissions": ["documents:read"]}}',
        )
        app = service(sqlite_url)
        configured = app.state.bastion.settings.identity.roles
        assert ["documents:read"] == configured["member"].permissions
        assert {"owner", "member"} == set(configured)
