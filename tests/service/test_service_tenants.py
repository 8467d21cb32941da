"""Tenants, users, roles and the X-Debug-User identity stand-in."""

from __future__ import annotations

import secrets
import uuid

import pytest

PROBLEM = "application/problem+json"


def problem(response) -> tuple[int, str, str]:
    return response.status_code, response.headers["content-type"], response.json()["code"]


class TestCreateTenant:
    async def test_tenant_is_created_with_its_owner(self, client):
        """POST /v1/tenants answers 201 with the tenant and an owner to act as."""
        slug = f"t-{secrets.token_hex(6)}"
        response = await client.post(
            "/v1/tenants",
            json={
                "name": "Acme Corp",
                "slug": slug,
                "owner_email": "Ann.Lee@Acme.Example",
                "owner_display_name": "Ann Lee",
            },
        )
        body = response.json()
        assert 201 == response.status_code
        assert ("Acme Corp", slug) == (body["tenant"]["name"], body["tenant"]["slug"])
        assert {
            "id": body["owner"]["id"],
            "tenant_id": body["tenant"]["id"],
            "email": "ann.lee@acme.example",
            "display_name": "Ann Lee",
            "role": "owner",
            "created_at": body["tenant"]["created_at"],
        } == body["owner"]

    async def test_display_name_defaults_to_local_part(self, client):
        """Without a display name, the owner is called by the part before the @."""
        response = await client.post(
            "/v1/tenants",
            json={"name": "X", "slug": f"t-{secrets.token_hex(6)}", "owner_email": "bo@x.example"},
        )
        assert "bo" == response.json()["owner"]["display_name"]

    async def test_duplicate_slug_is_conflict(self, client):
        """A second tenant with a taken slug is 409 CONFLICT."""
        payload = {"name": "A", "slug": f"t-{secrets.token_hex(6)}", "owner_email": "a@a.example"}
        assert 201 == (await client.post("/v1/tenants", json=payload)).status_code
        again = await client.post("/v1/tenants", json={**payload, "owner_email": "b@b.example"})
        assert (409, PROBLEM, "CONFLICT") == problem(again)

    async def test_current_tenant_and_me(self, client, new_workspace):
        """The caller reads their own tenant and user."""
        ws = await new_workspace("Globex")
        tenant = await client.get("/v1/tenants/current", headers=ws.owner.headers)
        me = await client.get("/v1/users/me", headers=ws.owner.headers)
        assert ws.tenant == tenant.json()
        assert (ws.owner.id, ws.id, "owner") == (
            me.json()["id"],
            me.json()["tenant_id"],
            me.json()["role"],
        )


class TestAddUser:
    @pytest.mark.parametrize("role", ["owner", "admin", "member", "viewer"])
    async def test_owner_adds_any_role(self, client, new_workspace, role):
        """An owner can add a user with any role to their tenant."""
        ws = await new_workspace()
        response = await client.post(
            "/v1/users",
            json={"email": "new@example.com", "display_name": "New", "role": role},
            headers=ws.owner.headers,
        )
        body = response.json()
        assert (201, role, ws.id) == (response.status_code, body["role"], body["tenant_id"])
        me = await client.get("/v1/users/me", headers={"X-Debug-User": body["id"]})
        assert body == me.json()

    async def test_role_defaults_to_member(self, client, new_workspace):
        """A user added without a role is a member."""
        ws = await new_workspace()
        response = await client.post(
            "/v1/users", json={"email": "m@example.com"}, headers=ws.owner.headers
        )
        assert ("member", "m") == (response.json()["role"], response.json()["display_name"])

    async def test_admin_adds_but_not_owners(self, client, new_workspace, add_member):
        """An admin can add members but not owners: no one grants more than they hold."""
        ws = await new_workspace()
        admin = await add_member(ws, "admin")
        member = await client.post(
            "/v1/users", json={"email": "x@example.com", "role": "member"}, headers=admin.headers
        )
        owner = await client.post(
            "/v1/users", json={"email": "y@example.com", "role": "owner"}, headers=admin.headers
        )
        assert 201 == member.status_code
        assert (403, PROBLEM, "FORBIDDEN") == problem(owner)

    @pytest.mark.parametrize("role", ["member", "viewer"])
    async def test_members_and_viewers_cannot_add(self, client, new_workspace, add_member, role):
        """Only owners and admins add users; others get 403 FORBIDDEN."""
        ws = await new_workspace()
        caller = await add_member(ws, role)
        response = await client.post(
            "/v1/users", json={"email": "z@example.com"}, headers=caller.headers
        )
        assert (403, PROBLEM, "FORBIDDEN") == problem(response)

    async def test_duplicate_email_in_tenant_is_conflict(self, client, new_workspace):
        """Emails are unique within a tenant, ignoring case."""
        ws = await new_workspace()
        first = await client.post(
            "/v1/users", json={"email": "dup@example.com"}, headers=ws.owner.headers
        )
        second = await client.post(
            "/v1/users", json={"email": "DUP@example.com"}, headers=ws.owner.headers
        )
        assert 201 == first.status_code
        assert (409, PROBLEM, "CONFLICT") == problem(second)

    async def test_same_email_in_two_tenants(self, client, new_workspace):
        """Another tenant's addresses are invisible: the same email is no conflict there."""
        a, b = await new_workspace(), await new_workspace()
        for ws in (a, b):
            response = await client.post(
                "/v1/users", json={"email": "shared@example.com"}, headers=ws.owner.headers
            )
            assert 201 == response.status_code


class TestRoles:
    async def test_viewer_reads_but_cannot_write(
        self, client, new_workspace, add_member, create_document
    ):
        """A viewer can read and list; POST, PATCH and DELETE are 403 FORBIDDEN."""
        ws = await new_workspace()
        viewer = await add_member(ws, "viewer")
        doc = await create_document(ws.owner)
        url = f"/v1/documents/{doc['id']}"
        assert 200 == (await client.get(url, headers=viewer.headers)).status_code
        listed = await client.get("/v1/documents", headers=viewer.headers)
        assert [doc["id"]] == [item["id"] for item in listed.json()["items"]]
        writes = [
            await client.post("/v1/documents", json={"title": "x"}, headers=viewer.headers),
            await client.patch(url, json={"title": "x"}, headers=viewer.headers),
            await client.delete(url, headers=viewer.headers),
        ]
        assert [(403, PROBLEM, "FORBIDDEN")] * 3 == [problem(r) for r in writes]
        unchanged = await client.get(url, headers=ws.owner.headers)
        assert doc == unchanged.json()

    async def test_member_writes_documents(self, client, new_workspace, add_member):
        """A member can create, change and delete documents of their tenant."""
        ws = await new_workspace()
        member = await add_member(ws, "member")
        created = await client.post("/v1/documents", json={"title": "m"}, headers=member.headers)
        url = created.headers["location"]
        patched = await client.patch(url, json={"body": "b"}, headers=member.headers)
        deleted = await client.delete(url, headers=member.headers)
        assert (201, 200, 204) == (created.status_code, patched.status_code, deleted.status_code)
        assert member.id == created.json()["created_by"]


class TestDebugUserStandIn:
    @pytest.mark.parametrize(
        "headers",
        [
            pytest.param({}, id="missing"),
            pytest.param({"X-Debug-User": ""}, id="empty"),
            pytest.param({"X-Debug-User": "admin"}, id="malformed"),
            pytest.param({"X-Debug-User": str(uuid.uuid4())}, id="unknown"),
        ],
    )
    async def test_no_valid_user_is_unauthenticated(self, client, headers):
        """Without a known user id every /v1 route but bootstrap is 401 UNAUTHENTICATED."""
        responses = [
            await client.get("/v1/documents", headers=headers),
            await client.get("/v1/users/me", headers=headers),
            await client.get("/v1/tenants/current", headers=headers),
            await client.post("/v1/documents", json={"title": "x"}, headers=headers),
        ]
        assert [(401, PROBLEM, "UNAUTHENTICATED")] * 4 == [problem(r) for r in responses]
        assert all("DebugUser" in r.headers["www-authenticate"] for r in responses)

    async def test_authentication_comes_before_validation(self, client):
        """An anonymous, invalid write is 401, not 422: nothing is validated for strangers."""
        response = await client.post("/v1/documents", json={"title": "x" * 500})
        assert (401, PROBLEM, "UNAUTHENTICATED") == problem(response)
