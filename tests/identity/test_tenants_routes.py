"""/v1/tenants: tenants, members, invitations and usage, through HTTP on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import timedelta

import pytest
from prometheus_client import REGISTRY
from sqlalchemy import select, text, update
from tenancy_support import Service, bearer, oidc_settings, running, unprefixed_subjects

from bastion.data.types import utc_now
from bastion.identity._mail import MailDeliveryError
from bastion.identity._tables import api_keys, memberships, one_time_tokens, refresh_families
from bastion.settings import IDENTITY_PERMISSIONS
from bastion.testing import LocalOidcIssuer


@pytest.fixture
async def service(database_url):
    async with running(database_url) as running_service:
        yield running_service


def _invitation_token(service: Service, email: str) -> str:
    message = service.identity.mail.last(purpose="invitation", to=email)
    match = re.search(r"token=([A-Za-z0-9_-]{43})", message.text)
    assert match is not None
    return match.group(1)


def _members_rejections() -> float:
    labels = {"quota": "members"}
    return REGISTRY.get_sample_value("bastion_tenant_quota_rejections_total", labels) or 0.0


async def _role(service: Service, tenant, user) -> str | None:
    async with service.identity.database.sessions() as session:
        return await session.scalar(
            select(memberships.c.role).where(
                memberships.c.tenant_id == tenant.id, memberships.c.user_id == user.id
            )
        )


class TestTenants:
    async def test_the_creator_becomes_owner_and_sees_the_tenant_listed(self, service):
        """POST /tenants makes the caller owner; GET /tenants lists it with that role."""
        user = await service.user()
        headers = service.headers(user, None)
        created = await service.client.post(
            "/v1/tenants",
            json={"name": "Acme", "slug": "acme-" + uuid.uuid4().hex[:6]},
            headers=headers,
        )
        assert 201 == created.status_code
        assert "owner" == created.json()["role"]
        listed = await service.client.get("/v1/tenants", headers=headers)
        assert [created.json()["id"]] == [each["id"] for each in listed.json()]
        assert "owner" == listed.json()[0]["role"]

    async def test_a_taken_slug_is_a_conflict_and_a_bad_one_invalid(self, service):
        """A slug is unique (409) and lowercase letters, digits and inner hyphens (422)."""
        user = await service.user()
        headers = service.headers(user, None)
        slug = "dup-" + uuid.uuid4().hex[:6]
        first = await service.client.post(
            "/v1/tenants", json={"name": "A", "slug": slug}, headers=headers
        )
        again = await service.client.post(
            "/v1/tenants", json={"name": "B", "slug": slug}, headers=headers
        )
        bad = await service.client.post(
            "/v1/tenants", json={"name": "C", "slug": "Not OK"}, headers=headers
        )
        assert (201, 409, 422) == (first.status_code, again.status_code, bad.status_code)
        assert "CONFLICT" == again.json()["code"]

    async def test_an_api_key_manages_no_tenants(self, service):
        """API keys can neither create tenants nor list a user's tenants."""
        owner = await service.user()
        tenant = await service.tenant(owner)
        created = await service.client.post(
            "/v1/api-keys",
            json={"name": "k", "scopes": ["tenant:read"]},
            headers=service.headers(owner, tenant),
        )
        key = {"Authorization": f"Bearer {created.json()['key']}"}
        made = await service.client.post(
            "/v1/tenants", json={"name": "A", "slug": "a"}, headers=key
        )
        listed = await service.client.get("/v1/tenants", headers=key)
        assert (403, 403) == (made.status_code, listed.status_code)

    async def test_an_external_subject_is_refused_not_a_server_error(self, service):
        """A token whose subject is no user id of this service manages nothing (403)."""
        token = service.identity.tokens.issue("google-oauth2|42", "", []).token
        response = await service.client.post(
            "/v1/tenants",
            json={"name": "A", "slug": "ext-" + uuid.uuid4().hex[:6]},
            headers={"Authorization": f"Bearer {token}"},
        )
        assert 403 == response.status_code

    async def test_no_credentials_is_401(self, service):
        """Creating a tenant needs a caller."""
        response = await service.client.post("/v1/tenants", json={"name": "A", "slug": "a"})
        assert 401 == response.status_code

    async def test_another_tenants_id_reads_as_absent(self, service):
        """A caller sees its own tenant; another tenant's id answers 404, as a missing one."""
        alice, bob = await service.user(), await service.user()
        mine, theirs = await service.tenant(alice), await service.tenant(bob)
        headers = service.headers(alice, mine)
        own = await service.client.get(f"/v1/tenants/{mine.id}", headers=headers)
        other = await service.client.get(f"/v1/tenants/{theirs.id}", headers=headers)
        missing = await service.client.get(f"/v1/tenants/{uuid.uuid4()}", headers=headers)
        assert 200 == own.status_code
        assert (404, 404) == (other.status_code, missing.status_code)
        assert other.json()["code"] == missing.json()["code"] == "NOT_FOUND"
        members = await service.client.get(f"/v1/tenants/{theirs.id}/members", headers=headers)
        assert 404 == members.status_code

    async def test_renaming_needs_tenant_update(self, service):
        """An admin renames the tenant; a viewer is refused 403."""
        owner, viewer = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, viewer, "viewer")
        renamed = await service.client.patch(
            f"/v1/tenants/{tenant.id}",
            json={"name": "New name"},
            headers=service.headers(owner, tenant),
        )
        refused = await service.client.patch(
            f"/v1/tenants/{tenant.id}",
            json={"name": "Nope"},
            headers=service.headers(viewer, tenant),
        )
        assert "New name" == renamed.json()["name"]
        assert 403 == refused.status_code


class TestInvitations:
    async def test_an_invitation_is_mailed_and_accepted_once(self, service):
        """The invitee joins with the invited role; the same token then fails."""
        owner, invitee = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        invited = await service.client.post(
            f"/v1/tenants/{tenant.id}/members/invitations",
            json={"email": invitee.email.upper(), "role": "admin"},
            headers=service.headers(owner, tenant),
        )
        assert 201 == invited.status_code
        token = _invitation_token(service, invitee.email)
        headers = service.headers(invitee, None)
        accepted = await service.client.post(
            "/v1/tenants/invitations/accept", json={"token": token}, headers=headers
        )
        assert 200 == accepted.status_code
        assert "admin" == await _role(service, tenant, invitee)
        again = await service.client.post(
            "/v1/tenants/invitations/accept", json={"token": token}, headers=headers
        )
        assert 401 == again.status_code

    async def test_another_account_cannot_accept_nor_spend_it(self, service):
        """An invitation for one address is refused to another account and stays usable."""
        owner, invitee, stranger = await service.user(), await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.client.post(
            f"/v1/tenants/{tenant.id}/members/invitations",
            json={"email": invitee.email},
            headers=service.headers(owner, tenant),
        )
        token = _invitation_token(service, invitee.email)
        refused = await service.client.post(
            "/v1/tenants/invitations/accept",
            json={"token": token},
            headers=service.headers(stranger, None),
        )
        accepted = await service.client.post(
            "/v1/tenants/invitations/accept",
            json={"token": token},
            headers=service.headers(invitee, None),
        )
        assert (403, 200) == (refused.status_code, accepted.status_code)
        assert "member" == await _role(service, tenant, invitee)
        assert await _role(service, tenant, stranger) is None

    async def test_no_one_grants_above_their_own_role(self, service):
        """An admin cannot invite an owner; a member cannot invite at all."""
        owner, admin, member = await service.user(), await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        await service.join(tenant, member, "member")
        path = f"/v1/tenants/{tenant.id}/members/invitations"
        as_owner = await service.client.post(
            path,
            json={"email": "x@example.org", "role": "owner"},
            headers=service.headers(admin, tenant),
        )
        by_member = await service.client.post(
            path, json={"email": "y@example.org"}, headers=service.headers(member, tenant)
        )
        unknown = await service.client.post(
            path,
            json={"email": "z@example.org", "role": "emperor"},
            headers=service.headers(owner, tenant),
        )
        assert (403, 403, 422) == (as_owner.status_code, by_member.status_code, unknown.status_code)

    async def test_pending_invitations_are_listed_and_withdrawn(self, service):
        """A withdrawn invitation leaves the list and its token stops working."""
        owner, invitee = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        headers = service.headers(owner, tenant)
        path = f"/v1/tenants/{tenant.id}/members/invitations"
        made = await service.client.post(path, json={"email": invitee.email}, headers=headers)
        token = _invitation_token(service, invitee.email)
        listed = await service.client.get(path, headers=headers)
        assert [made.json()["id"]] == [each["id"] for each in listed.json()]
        withdrawn = await service.client.delete(f"{path}/{made.json()['id']}", headers=headers)
        assert 204 == withdrawn.status_code
        assert [] == (await service.client.get(path, headers=headers)).json()
        accepted = await service.client.post(
            "/v1/tenants/invitations/accept",
            json={"token": token},
            headers=service.headers(invitee, None),
        )
        assert 401 == accepted.status_code

    async def test_accepting_as_a_member_keeps_the_role(self, service):
        """A member who accepts an invitation (made before it joined) keeps its role."""
        owner, invitee = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.client.post(
            f"/v1/tenants/{tenant.id}/members/invitations",
            json={"email": invitee.email, "role": "viewer"},
            headers=service.headers(owner, tenant),
        )
        await service.join(tenant, invitee, "admin")
        token = _invitation_token(service, invitee.email)
        response = await service.client.post(
            "/v1/tenants/invitations/accept",
            json={"token": token},
            headers=service.headers(invitee, None),
        )
        assert (200, "admin") == (response.status_code, response.json()["role"])
        assert "admin" == await _role(service, tenant, invitee)

    async def test_an_existing_member_is_not_invited_again(self, service):
        """Inviting a member's address is a conflict."""
        owner, member = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, member, "member")
        response = await service.client.post(
            f"/v1/tenants/{tenant.id}/members/invitations",
            json={"email": member.email},
            headers=service.headers(owner, tenant),
        )
        assert 409 == response.status_code


class TestMembersQuota:
    async def test_invitations_stop_at_the_members_quota(self, database_url):
        """With members = 2, the owner invites one; the next is 429 naming the quota."""
        async with running(database_url, tenancy={"quotas": {"members": 2}}) as service:
            owner = await service.user()
            tenant = await service.tenant(owner)
            path = f"/v1/tenants/{tenant.id}/members/invitations"
            headers = service.headers(owner, tenant)
            first = await service.client.post(
                path, json={"email": "one@example.org"}, headers=headers
            )
            before = _members_rejections()
            second = await service.client.post(
                path, json={"email": "two@example.org"}, headers=headers
            )
            assert (201, 429) == (first.status_code, second.status_code)
            assert "QUOTA_EXCEEDED" == second.json()["code"]
            assert "members" == second.json()["quota"]
            assert before + 1 == _members_rejections()

    async def test_a_full_tenant_refuses_acceptance_and_keeps_the_token(self, database_url):
        """Accepting into a full tenant is 429; once a place frees up the same token works."""
        async with running(database_url, tenancy={"quotas": {"members": 2}}) as service:
            owner, invitee, filler = (
                await service.user(),
                await service.user(),
                await service.user(),
            )
            tenant = await service.tenant(owner)
            owner_headers = service.headers(owner, tenant)
            await service.client.post(
                f"/v1/tenants/{tenant.id}/members/invitations",
                json={"email": invitee.email},
                headers=owner_headers,
            )
            token = _invitation_token(service, invitee.email)
            await service.join(tenant, filler, "member")
            accept = {"json": {"token": token}, "headers": service.headers(invitee, None)}
            full = await service.client.post("/v1/tenants/invitations/accept", **accept)
            assert 429 == full.status_code
            await service.client.delete(
                f"/v1/tenants/{tenant.id}/members/{filler.id}", headers=owner_headers
            )
            joined = await service.client.post("/v1/tenants/invitations/accept", **accept)
            assert 200 == joined.status_code

    async def test_a_tenant_override_raises_its_members_quota(self, database_url):
        """The tenant's own quota replaces the setting."""
        async with running(database_url, tenancy={"quotas": {"members": 1}}) as service:
            owner = await service.user()
            tenant = await service.tenant(owner, settings={"quotas": {"members": 3}})
            response = await service.client.post(
                f"/v1/tenants/{tenant.id}/members/invitations",
                json={"email": "one@example.org"},
                headers=service.headers(owner, tenant),
            )
            assert 201 == response.status_code


class TestMembers:
    async def test_a_role_change_applies_to_the_next_request(self, service):
        """Demoted to viewer, an admin's same token can no longer rename the tenant."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        admin_headers = service.headers(admin, tenant)
        before = await service.client.patch(
            f"/v1/tenants/{tenant.id}", json={"name": "By admin"}, headers=admin_headers
        )
        changed = await service.client.patch(
            f"/v1/tenants/{tenant.id}/members/{admin.id}",
            json={"role": "viewer"},
            headers=service.headers(owner, tenant),
        )
        after = await service.client.patch(
            f"/v1/tenants/{tenant.id}", json={"name": "Again"}, headers=admin_headers
        )
        assert (200, 200, 403) == (before.status_code, changed.status_code, after.status_code)
        assert "viewer" == changed.json()["role"]

    async def test_the_last_owner_is_never_removed_or_demoted(self, service):
        """Demoting or removing the only owner is a conflict; with a second owner it works."""
        owner, other = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        headers = service.headers(owner, tenant)
        demote = await service.client.patch(
            f"/v1/tenants/{tenant.id}/members/{owner.id}", json={"role": "admin"}, headers=headers
        )
        leave = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{owner.id}", headers=headers
        )
        assert (409, 409) == (demote.status_code, leave.status_code)
        await service.join(tenant, other, "owner")
        left = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{owner.id}", headers=headers
        )
        assert 204 == left.status_code
        assert await _role(service, tenant, owner) is None

    async def test_an_admin_cannot_touch_an_owner(self, service):
        """Changing or removing an owner needs members:owners."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        headers = service.headers(admin, tenant)
        demote = await service.client.patch(
            f"/v1/tenants/{tenant.id}/members/{owner.id}", json={"role": "viewer"}, headers=headers
        )
        remove = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{owner.id}", headers=headers
        )
        assert (403, 403) == (demote.status_code, remove.status_code)
        assert "owner" == await _role(service, tenant, owner)

    async def test_removal_revokes_the_members_sessions_in_that_tenant(self, service):
        """The removed member's refresh families for the tenant end; others stay."""
        owner, member = await service.user(), await service.user()
        tenant, elsewhere = await service.tenant(owner), await service.tenant(member)
        await service.join(tenant, member, "member")
        now = utc_now()
        families = {tenant.id: uuid.uuid4(), elsewhere.id: uuid.uuid4()}
        async with service.identity.database.session() as session:
            for tid, fid in families.items():
                await session.execute(
                    refresh_families.insert().values(
                        id=fid,
                        user_id=member.id,
                        tenant_id=tid,
                        created_at=now,
                        last_used_at=now,
                        expires_at=now + timedelta(days=1),
                    )
                )
        removed = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{member.id}", headers=service.headers(owner, tenant)
        )
        assert 204 == removed.status_code
        async with service.identity.database.sessions() as session:
            rows = {
                row.id: row.revoked_reason
                for row in await session.execute(
                    select(refresh_families).where(refresh_families.c.user_id == member.id)
                )
            }
        assert {families[tenant.id]: "membership_removed", families[elsewhere.id]: None} == rows

    async def test_a_member_may_leave_without_members_manage(self, service):
        """Anyone may remove themself; removing someone else needs members:manage."""
        owner, member, other = await service.user(), await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, member, "member")
        await service.join(tenant, other, "member")
        headers = service.headers(member, tenant)
        other_removed = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{other.id}", headers=headers
        )
        left = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{member.id}", headers=headers
        )
        assert (403, 204) == (other_removed.status_code, left.status_code)

    async def test_members_are_listed_with_roles(self, service):
        """GET members lists every member with its role."""
        owner, viewer = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, viewer, "viewer")
        response = await service.client.get(
            f"/v1/tenants/{tenant.id}/members", headers=service.headers(viewer, tenant)
        )
        assert {str(owner.id): "owner", str(viewer.id): "viewer"} == {
            each["user_id"]: each["role"] for each in response.json()
        }


class TestUsage:
    async def test_usage_reports_the_members_quota(self, database_url):
        """GET usage needs usage:read and counts members against the quota."""
        async with running(database_url, tenancy={"quotas": {"members": 5}}) as service:
            owner, viewer = await service.user(), await service.user()
            tenant = await service.tenant(owner)
            await service.join(tenant, viewer, "viewer")
            response = await service.client.get(
                f"/v1/tenants/{tenant.id}/usage", headers=service.headers(owner, tenant)
            )
            refused = await service.client.get(
                f"/v1/tenants/{tenant.id}/usage", headers=service.headers(viewer, tenant)
            )
            assert 403 == refused.status_code
            assert {"limit": 5, "used": 2, "remaining": 3, "resets_at": None} == response.json()[
                "quotas"
            ]["members"]

    async def test_usage_reports_the_request_quotas(self, database_url):
        """The request quotas show their limit, this period's use and its end."""
        async with running(database_url, tenancy={"quotas": {"requests_per_day": 100}}) as service:
            owner = await service.user()
            tenant = await service.tenant(owner)
            headers = service.headers(owner, tenant)
            await service.client.get(f"/v1/tenants/{tenant.id}", headers=headers)
            quotas = (
                await service.client.get(f"/v1/tenants/{tenant.id}/usage", headers=headers)
            ).json()["quotas"]
            day = quotas["requests_per_day"]
            # The read of the tenant and the usage request itself.
            assert (100, 2, 98) == (day["limit"], day["used"], day["remaining"])
            assert day["resets_at"].endswith(("T00:00:00Z", "T00:00:00+00:00"))
            assert quotas["api_calls_per_month"]["limit"] is None


async def test_two_owners_demoting_each_other_at_once_leave_one(postgres_url):
    """On PostgreSQL the owner rows are locked: of two crossed demotions exactly one wins."""
    async with running(postgres_url) as service:
        first, second = await service.user(), await service.user()
        tenant = await service.tenant(first)
        await service.join(tenant, second, "owner")

        async def demote(actor, target):
            return await service.client.patch(
                f"/v1/tenants/{tenant.id}/members/{target.id}",
                json={"role": "admin"},
                headers=service.headers(actor, tenant),
            )

        # Hold the owner rows so both requests are past their permission checks (both
        # still owners) and queued on the lock before either can write: the race is
        # forced, not hoped for.
        async with service.identity.database.engine.connect() as blocker:
            held = await blocker.begin()
            await blocker.execute(
                select(memberships.c.user_id)
                .where(memberships.c.tenant_id == tenant.id, memberships.c.role == "owner")
                .with_for_update()
            )
            crossed = [
                asyncio.create_task(demote(first, second)),
                asyncio.create_task(demote(second, first)),
            ]
            await _until_lock_waiters(blocker, 2)
            await held.rollback()
        answers = await asyncio.gather(*crossed)
        roles = {await _role(service, tenant, first), await _role(service, tenant, second)}

    # The loser is refused either as the last owner's demoter (409) or, when the
    # winner's invalidation reached its re-check first, as an admin now (403).
    winner, loser = sorted(answer.status_code for answer in answers)
    assert (200, True) == (winner, loser in {403, 409})
    assert {"owner", "admin"} == roles


async def _until_lock_waiters(connection, count: int) -> None:
    # A row-lock wait is a wait on the holder's transaction id, which has no database:
    # the waiting sessions are found through their backends instead.
    waiting = text(
        "SELECT count(*) FROM pg_locks JOIN pg_stat_activity USING (pid) "
        "WHERE NOT pg_locks.granted AND pg_stat_activity.datname = current_database()"
    )
    for _ in range(500):
        if await connection.scalar(waiting) >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} requests never queued on the lock")


async def _invite(service: Service, tenant, inviter, email: str, role: str):
    return await service.client.post(
        f"/v1/tenants/{tenant.id}/members/invitations",
        json={"email": email, "role": role},
        headers=service.headers(inviter, tenant),
    )


async def _pending(service: Service, tenant, owner) -> set[str]:
    listed = await service.client.get(
        f"/v1/tenants/{tenant.id}/members/invitations", headers=service.headers(owner, tenant)
    )
    assert 200 == listed.status_code
    return {each["email"] for each in listed.json()}


class TestAuthorityEndsWithTheMembership:
    async def test_a_removed_members_keys_are_refused_at_once(self, service):
        """Removing an admin revokes the keys it made there: the next request with one is 401."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        theirs = await service.key(admin, tenant, ["members:read", "api_keys:manage"])
        kept = await service.key(owner, tenant, ["members:read"])
        members = f"/v1/tenants/{tenant.id}/members"
        # Used once first, so the key's record sits in the store's cache.
        assert 200 == (await service.client.get(members, headers=bearer(theirs["key"]))).status_code
        removed = await service.client.delete(
            f"{members}/{admin.id}", headers=service.headers(owner, tenant)
        )
        assert 204 == removed.status_code
        listed = await service.client.get(members, headers=bearer(theirs["key"]))
        managed = await service.client.get("/v1/api-keys", headers=bearer(theirs["key"]))
        other = await service.client.get(members, headers=bearer(kept["key"]))
        assert (401, 401, 200) == (listed.status_code, managed.status_code, other.status_code)
        async with service.identity.database.sessions() as session:
            revoked_at = await session.scalar(
                select(api_keys.c.revoked_at).where(api_keys.c.id == uuid.UUID(theirs["id"]))
            )
        assert revoked_at is not None

    async def test_a_member_who_leaves_takes_its_keys_along(self, service):
        """Leaving the tenant revokes the keys one made there too."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        key = await service.key(admin, tenant, ["tenant:read"])
        left = await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{admin.id}", headers=service.headers(admin, tenant)
        )
        after = await service.client.get(f"/v1/tenants/{tenant.id}", headers=bearer(key["key"]))
        assert (204, 401) == (left.status_code, after.status_code)

    async def test_a_demotion_revokes_the_keys_beyond_the_new_role(self, service):
        """Demoted to viewer, an admin's api_keys:manage key is 401; its members:read key works."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        manage = await service.key(admin, tenant, ["api_keys:manage"])
        read = await service.key(admin, tenant, ["members:read"])
        assert (
            200
            == (await service.client.get("/v1/api-keys", headers=bearer(manage["key"]))).status_code
        )
        demoted = await service.client.patch(
            f"/v1/tenants/{tenant.id}/members/{admin.id}",
            json={"role": "viewer"},
            headers=service.headers(owner, tenant),
        )
        assert 200 == demoted.status_code
        managed = await service.client.get("/v1/api-keys", headers=bearer(manage["key"]))
        members = await service.client.get(
            f"/v1/tenants/{tenant.id}/members", headers=bearer(read["key"])
        )
        assert (401, 200) == (managed.status_code, members.status_code)

    async def test_a_removed_inviters_invitations_are_withdrawn(self, service):
        """The invitations an admin sent stop working when it is removed; the owner's stay."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        assert (
            201
            == (await _invite(service, tenant, admin, "by-admin@example.org", "admin")).status_code
        )
        assert (
            201
            == (await _invite(service, tenant, owner, "by-owner@example.org", "viewer")).status_code
        )
        token = _invitation_token(service, "by-admin@example.org")
        await service.client.delete(
            f"/v1/tenants/{tenant.id}/members/{admin.id}", headers=service.headers(owner, tenant)
        )
        assert {"by-owner@example.org"} == await _pending(service, tenant, owner)
        invitee = await service.user("by-admin@example.org")
        accepted = await service.client.post(
            "/v1/tenants/invitations/accept",
            json={"token": token},
            headers=service.headers(invitee, None),
        )
        assert 401 == accepted.status_code
        assert await _role(service, tenant, invitee) is None

    async def test_a_demoted_inviters_invitations_go_with_its_authority(self, service):
        """Demoted to member (no members:invite), an admin's pending invitations are withdrawn."""
        owner, admin = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        await service.join(tenant, admin, "admin")
        await _invite(service, tenant, admin, "a@example.org", "admin")
        await _invite(service, tenant, owner, "b@example.org", "admin")
        await service.client.patch(
            f"/v1/tenants/{tenant.id}/members/{admin.id}",
            json={"role": "member"},
            headers=service.headers(owner, tenant),
        )
        assert {"b@example.org"} == await _pending(service, tenant, owner)

    async def test_an_invitation_to_a_role_no_longer_defined_is_a_conflict(self, service):
        """Accepting an invitation whose role left identity.roles is 409, and joins nothing."""
        owner, invitee = await service.user(), await service.user()
        tenant = await service.tenant(owner)
        made = await _invite(service, tenant, owner, invitee.email, "admin")
        token = _invitation_token(service, invitee.email)
        # As if the service restarted with "admin" renamed in identity.roles.
        async with service.identity.database.session() as session:
            await session.execute(
                update(one_time_tokens)
                .where(one_time_tokens.c.id == uuid.UUID(made.json()["id"]))
                .values(data={"role": "administrator", "invited_by": str(owner.id)})
            )
        accepted = await service.client.post(
            "/v1/tenants/invitations/accept",
            json={"token": token},
            headers=service.headers(invitee, None),
        )
        assert 409 == accepted.status_code
        assert await _role(service, tenant, invitee) is None


class TestInvitationDelivery:
    @pytest.mark.parametrize(
        "address",
        ["jörg@example.org", "a@localhost", "x@under_score.example.org"],
        ids=["non-ascii-local", "undotted-domain", "bad-label"],
    )
    async def test_an_undeliverable_address_leaves_no_invitation(self, database_url, address):
        """A refused address is 422 and nothing is left pending against the members quota."""
        async with running(database_url, tenancy={"quotas": {"members": 2}}) as service:
            owner = await service.user()
            tenant = await service.tenant(owner)
            refused = await _invite(service, tenant, owner, address, "viewer")
            assert 422 == refused.status_code
            assert set() == await _pending(service, tenant, owner)
            later = await _invite(service, tenant, owner, "fine@example.org", "viewer")
            assert 201 == later.status_code

    async def test_a_failed_send_withdraws_the_invitation(self, service, monkeypatch):
        """When the mail server refuses the message the answer is its error and no row stays."""
        owner = await service.user()
        tenant = await service.tenant(owner)

        async def refuse(message):
            raise MailDeliveryError("recipient_refused", 550)

        monkeypatch.setattr(service.identity.mail, "send", refuse)
        failed = await _invite(service, tenant, owner, "nobody@example.org", "viewer")
        assert 502 == failed.status_code
        monkeypatch.undo()
        assert set() == await _pending(service, tenant, owner)


class TestWildcardGrants:
    async def test_a_wildcard_holder_grants_what_it_holds(self, database_url):
        """A role with members:* may invite and promote to a role made of members: permissions."""
        roles = {
            **{name: role.model_dump() for name, role in IDENTITY_PERMISSIONS.items()},
            "steward": {"permissions": ["members:*"]},
            "reader": {"permissions": ["members:read"]},
        }
        async with running(database_url, identity={"roles": roles}) as service:
            owner, steward, member = (
                await service.user(),
                await service.user(),
                await service.user(),
            )
            tenant = await service.tenant(owner)
            await service.join(tenant, steward, "steward")
            await service.join(tenant, member, "reader")
            invited = await _invite(service, tenant, steward, "new@example.org", "reader")
            beyond = await _invite(service, tenant, steward, "nope@example.org", "viewer")
            assert (201, 403) == (invited.status_code, beyond.status_code)
            promoted = await service.client.patch(
                f"/v1/tenants/{tenant.id}/members/{member.id}",
                json={"role": "steward"},
                headers=service.headers(steward, tenant),
            )
            assert 200 == promoted.status_code


@pytest.fixture
def oidc_issuer():
    with LocalOidcIssuer() as issuer:
        yield issuer


class TestExternalAccounts:
    async def test_an_external_subject_equal_to_a_local_id_is_not_that_user(
        self, database_url, oidc_issuer
    ):
        """An OIDC user whose sub is a member's id cannot act as that member: 403, member kept."""
        async with running(database_url, identity=oidc_settings(oidc_issuer.url)) as service:
            owner, member = await service.user(), await service.user()
            tenant = await service.tenant(owner)
            await service.join(tenant, member, "member")
            unprefixed_subjects(service)
            token = oidc_issuer.mint(str(member.id), tenant=str(tenant.id), roles=[])
            left = await service.client.delete(
                f"/v1/tenants/{tenant.id}/members/{member.id}", headers=bearer(token)
            )
            assert 403 == left.status_code
            assert "external identity provider" in left.json()["detail"]
            assert "member" == await _role(service, tenant, member)

    async def test_an_external_admin_makes_no_api_keys(self, database_url, oidc_issuer):
        """An OIDC user mapped to admin is refused keys (403), whether or not its sub is a row."""
        async with running(database_url, identity=oidc_settings(oidc_issuer.url)) as service:
            owner = await service.user()
            tenant = await service.tenant(owner)
            unprefixed_subjects(service)
            for subject in (str(owner.id), str(uuid.uuid4())):
                token = oidc_issuer.mint(subject, tenant=str(tenant.id), roles=["admin"])
                made = await service.client.post(
                    "/v1/api-keys",
                    json={"name": "k", "scopes": ["tenant:read"]},
                    headers=bearer(token),
                )
                assert 403 == made.status_code, made.text
            # A tenant claim that is no row here is refused the same way, not a 500.
            token = oidc_issuer.mint(str(uuid.uuid4()), tenant=str(uuid.uuid4()), roles=["admin"])
            made = await service.client.post(
                "/v1/api-keys", json={"name": "k", "scopes": []}, headers=bearer(token)
            )
            assert 403 == made.status_code, made.text
