"""The cross-tenant walk: every route of the app, called by tenant A with tenant B's ids.

The routes are read from the running app (bastion's identity routes, the
service's own, the operational ones), so a new route is walked as soon as it
exists, and :meth:`TestWalkCoversEveryRoute` fails until :data:`WALK` says
what body to send it. Each call is made twice: with B's ids, and with ids that
exist nowhere. Isolation holds when

- the two answers are the same (status and error code): B's resources are
  indistinguishable from nothing;
- called by A's owner, who holds every permission in A, a route naming one of
  B's resources answers 404, never 403 or 2xx; an operator's route (``/admin``)
  refuses A outright (401 or 403), whatever it names, except the audit routes
  (``/admin/audit``), which a tenant admin reads for its own tenant: B's audit
  entries answer 404 there;
- no answer (body, headers, or the claims of a token in the body) carries
  anything of B: ids, slug, names, titles, addresses, key prefixes;
- afterwards B's document, tenant, members, key and invitation are unchanged.

The calls come from an address outside ``http.admin_allowed_networks`` (which
admits loopback by default), as a tenant's client would: from inside them the
caller would be an operator, who may see every tenant.

Tenant slugs are global, so creating a tenant (or signing up with one) with a
slug B already holds is refused as a conflict; no body here reuses B's slug
for that reason: the conflict is inherent to unique slugs, not a leak of B's data.
"""

from __future__ import annotations

import base64
import re
import secrets
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import sqlalchemy as sa

from bastion._routes import route_entries
from bastion.audit._tables import entries
from bastion.identity import Roles
from bastion.testing import TestMember, create_member, member_token

PASSWORD = "walk-the-tenants-1"
JWT = re.compile(r"eyJ[A-Za-z0-9_-]+\.([A-Za-z0-9_-]+)\.[A-Za-z0-9_-]*")
OPERATOR_PREFIX = "/admin/"
AUDIT_PREFIX = "/admin/audit"
"""Under the operators' prefix, yet open to a tenant admin (``audit:read``) for its own tenant."""
CLIENT_ADDRESS = ("203.0.113.7", 40000)
"""A tenant's client on the internet (TEST-NET-3), not on the operators' loopback."""
ID_PARAMS = {"tenant_id", "document_id", "user_id", "key_id", "invitation_id", "entry_id"}
"""Path parameters that name a tenant's resource, and so must answer 404 to another tenant."""
GLOBAL_PARAMS = {"key", "name"}
"""Path parameters that name no tenant's resource: feature flag keys and segment names,
which only operators reach (``/admin/features``, ``/admin/segments``)."""


def unique_email(label: str) -> str:
    return f"{label}-{secrets.token_hex(5)}@example.test"


@dataclass
class Target:
    """The ids a call names: tenant B's, or ones that exist nowhere."""

    tenant_id: str
    tenant_slug: str
    document_id: str
    user_id: str
    key_id: str
    invitation_id: str
    invitation_token: str
    owner_email: str
    entry_id: str
    key: str = "assistant"
    name: str = "staff"

    @classmethod
    def nowhere(cls) -> Target:
        return cls(
            tenant_id=str(uuid.uuid4()),
            tenant_slug=f"t-{secrets.token_hex(6)}",
            document_id=str(uuid.uuid4()),
            user_id=str(uuid.uuid4()),
            key_id=str(uuid.uuid4()),
            invitation_id=str(uuid.uuid4()),
            invitation_token=secrets.token_urlsafe(32),
            owner_email=unique_email("nobody"),
            entry_id=str(uuid.uuid4()),
            key=f"flag-{secrets.token_hex(4)}",
            name=f"segment-{secrets.token_hex(4)}",
        )


@dataclass
class Walk:
    """Tenant A (the caller) and tenant B (the target), with what B must keep to itself."""

    app: Any
    client: Any
    outside: Any
    a_owner: TestMember
    a_key: str
    b: Target
    b_owner: TestMember
    b_member: TestMember
    b_key: str
    b_document: dict
    b_tenant_name: str
    markers: set[str] = field(default_factory=set)

    async def refresh_token(self) -> str:
        """A fresh refresh token of A's owner (each walked call may rotate or revoke one)."""
        response = await self.client.post(
            "/v1/auth/login",
            json={
                "email": self.a_owner.email,
                "password": PASSWORD,
                "tenant": self.a_owner.tenant_slug,
            },
        )
        assert 200 == response.status_code, response.text
        return response.json()["refresh_token"]


Body = Callable[[Walk, Target], Awaitable[Any]] | None


def body(payload: Callable[[Walk, Target], Any]) -> Body:
    async def make(walk: Walk, target: Target) -> Any:
        return payload(walk, target)

    return make


async def _refresh_into(walk: Walk, target: Target) -> Any:
    return {"refresh_token": await walk.refresh_token(), "tenant": target.tenant_slug}


async def _logout(walk: Walk, target: Target) -> Any:
    return {"refresh_token": await walk.refresh_token()}


def _fresh_slug(_walk: Walk, _target: Target) -> dict:
    return {"name": "Walked", "slug": f"t-{secrets.token_hex(6)}"}


WALK: dict[tuple[str, str], Body] = {
    # Operational endpoints: no tenant, no ids.
    ("GET", "/api/openapi.json"): None,
    ("GET", "/api/docs"): None,
    ("GET", "/docs/oauth2-redirect"): None,
    ("GET", "/health/live"): None,
    ("GET", "/health/ready"): None,
    ("GET", "/health/circuits"): None,
    ("GET", "/admin/migrations"): None,
    ("GET", "/admin/deprecations"): None,
    ("POST", "/admin/ratelimit/unlock"): body(lambda w, t: {"identifier": t.owner_email}),
    ("GET", "/metrics"): None,
    # The audit trail: operators read every tenant's entries, a tenant admin only its own.
    ("GET", "/admin/audit"): None,
    ("GET", "/admin/audit/entries/{entry_id}"): None,
    ("GET", "/admin/audit/entries/{entry_id}/proof"): None,
    ("GET", "/admin/audit/consistency"): None,
    ("GET", "/admin/audit/checkpoints"): None,
    ("POST", "/admin/audit/checkpoints"): None,
    ("GET", "/.well-known/jwks.json"): None,
    # Feature flags: the caller's client-visible flags; the operators' flags and segments.
    ("GET", "/api/features"): None,
    ("GET", "/admin/features"): None,
    ("POST", "/admin/features"): body(lambda w, t: {"key": t.key, "enabled": True}),
    ("GET", "/admin/features/export"): None,
    ("POST", "/admin/features/import"): body(lambda w, t: {"flags": []}),
    ("GET", "/admin/features/{key}"): None,
    ("PUT", "/admin/features/{key}"): body(lambda w, t: {"key": t.key, "enabled": False}),
    ("DELETE", "/admin/features/{key}"): None,
    ("POST", "/admin/features/{key}/toggle"): body(lambda w, t: {"enabled": False}),
    ("POST", "/admin/features/{key}/evaluate"): body(
        lambda w, t: {"context": {"tenantId": t.tenant_id}}
    ),
    ("GET", "/admin/features/{key}/history"): None,
    ("GET", "/admin/segments"): None,
    ("GET", "/admin/segments/{name}"): None,
    ("PUT", "/admin/segments/{name}"): body(lambda w, t: {"name": t.name}),
    ("DELETE", "/admin/segments/{name}"): None,
    # Operators' views of every tenant, behind the /admin access policy.
    ("GET", "/admin/tenants/usage"): None,
    ("PATCH", "/admin/tenants/{tenant_id}/settings"): body(
        lambda w, t: {"quotas": {"requests_per_day": 1}}
    ),
    # Accounts: B's addresses, slug and tokens in the bodies.
    ("POST", "/v1/auth/signup"): body(
        lambda w, t: {"email": t.owner_email, "password": PASSWORD + "-signup"}
    ),
    ("POST", "/v1/auth/verify-email"): body(lambda w, t: {"token": t.invitation_token}),
    ("POST", "/v1/auth/login"): body(
        lambda w, t: {"email": w.a_owner.email, "password": PASSWORD, "tenant": t.tenant_slug}
    ),
    ("POST", "/v1/auth/refresh"): _refresh_into,
    ("POST", "/v1/auth/logout"): _logout,
    ("POST", "/v1/auth/logout-all"): None,
    ("POST", "/v1/auth/password/change"): body(
        lambda w, t: {"current_password": "not-the-password", "new_password": PASSWORD + "-new"}
    ),
    ("POST", "/v1/auth/password/reset-request"): body(lambda w, t: {"email": t.owner_email}),
    ("POST", "/v1/auth/password/reset"): body(
        lambda w, t: {"token": t.invitation_token, "new_password": PASSWORD + "-reset"}
    ),
    ("GET", "/v1/auth/me"): None,
    # Tenants and members.
    ("POST", "/v1/tenants"): body(_fresh_slug),
    ("GET", "/v1/tenants"): None,
    ("GET", "/v1/tenants/{tenant_id}"): None,
    ("PATCH", "/v1/tenants/{tenant_id}"): body(lambda w, t: {"name": "Taken over"}),
    ("GET", "/v1/tenants/{tenant_id}/members"): None,
    ("POST", "/v1/tenants/{tenant_id}/members/invitations"): body(
        lambda w, t: {"email": unique_email("walk-invitee"), "role": "viewer"}
    ),
    ("GET", "/v1/tenants/{tenant_id}/members/invitations"): None,
    ("DELETE", "/v1/tenants/{tenant_id}/members/invitations/{invitation_id}"): None,
    ("POST", "/v1/tenants/invitations/accept"): body(lambda w, t: {"token": t.invitation_token}),
    ("PATCH", "/v1/tenants/{tenant_id}/members/{user_id}"): body(lambda w, t: {"role": "viewer"}),
    ("DELETE", "/v1/tenants/{tenant_id}/members/{user_id}"): None,
    ("GET", "/v1/tenants/{tenant_id}/usage"): None,
    # API keys.
    ("POST", "/v1/api-keys"): body(lambda w, t: {"name": "walk", "scopes": ["documents:read"]}),
    ("GET", "/v1/api-keys"): None,
    ("GET", "/v1/api-keys/{key_id}"): None,
    ("DELETE", "/v1/api-keys/{key_id}"): None,
    # The service's own routes.
    ("POST", "/v1/documents"): body(lambda w, t: {"title": "Walked"}),
    ("GET", "/v1/documents"): None,
    ("GET", "/v1/documents/{document_id}"): None,
    ("PATCH", "/v1/documents/{document_id}"): body(lambda w, t: {"title": "Taken over"}),
    ("DELETE", "/v1/documents/{document_id}"): None,
    ("POST", "/v1/assistant/ask"): body(lambda w, t: {"question": w.b_document["title"]}),
}
"""Every route of the app, by method and template, and the body a walked call sends."""

HEADERS: dict[tuple[str, str], dict[str, str]] = {
    # B's document is at version 1: even its right ETag finds nothing from tenant A.
    ("PATCH", "/v1/documents/{document_id}"): {"If-Match": '"v1"'},
    ("DELETE", "/v1/documents/{document_id}"): {"If-Match": '"v1"'},
}
"""Headers a walked call needs besides its credential (the writes' preconditions)."""

HOLDS_A_SECRET = {("POST", "/v1/tenants/invitations/accept")}
"""Calls whose body is one of B's single-use tokens itself: 256 random bits only the
invitee's mailbox holds. A valid token sent by the wrong account may be refused
differently from a made-up one (it is not spent, so the invitee can still use it);
that tells the caller nothing it did not hold already. The call must still be
refused, reveal nothing, and change nothing."""


def app_operations(app) -> set[tuple[str, str]]:
    """Every (method, template) the app serves; HEAD is GET's twin."""
    return {
        (method, entry.template)
        for entry in route_entries(app.router.routes)
        if entry.template is not None
        for method in entry.methods or {"GET"}
        if method != "HEAD"
    }


def path_params(template: str) -> set[str]:
    return set(re.findall(r"{(\w+)(?::\w+)?}", template))


def revealed(walk: Walk, response) -> set[str]:
    """What of B's the response shows: in its body, its headers, or inside a token it carries."""
    texts = [response.text, *response.headers.values()]
    for match in JWT.finditer(response.text):
        payload = match.group(1)
        texts.append(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)).decode())
    return {marker for marker in walk.markers for text in texts if marker.lower() in text.lower()}


def outcome(response) -> tuple[int, str | None]:
    code = None
    if response.headers.get("content-type", "").startswith("application/problem+json"):
        code = response.json().get("code")
    return response.status_code, code


async def call(walk: Walk, headers: dict, method: str, template: str, target: Target):
    params = {name: getattr(target, name) for name in path_params(template)}
    url = template.format(**params)
    make = WALK[(method, template)]
    payload = None if make is None else await make(walk, target)
    headers = headers | HEADERS.get((method, template), {})
    return await walk.outside.request(
        method, url, headers=headers, **({} if payload is None else {"json": payload})
    )


async def _api_key(client, member: TestMember, scopes: list[str]) -> tuple[str, str, str]:
    response = await client.post(
        "/v1/api-keys", json={"name": "walk", "scopes": scopes}, headers=member.headers
    )
    assert 201 == response.status_code, response.text
    created = response.json()
    return created["key"], created["id"], created["prefix"]


async def _audit_entry_of(app, document_id: str) -> str:
    """The id of the audit entry that recorded the creation of a document."""
    audit = app.state.bastion.audit
    await audit.log.flush()
    async with app.state.bastion.database.session() as session:
        entry = await session.scalar(
            sa.select(entries.c.id).where(
                entries.c.resource_id == document_id, entries.c.action == "document.create"
            )
        )
    assert entry is not None
    return str(entry)


@pytest.fixture
async def walk(app, client) -> AsyncIterator[Walk]:
    """Tenant A's owner and API key; tenant B with a member, a document, a key, an invitation."""
    a_slug, b_slug = f"a-{secrets.token_hex(5)}", f"b-{secrets.token_hex(5)}"
    a_owner = await create_member(
        app, tenant_slug=a_slug, email=unique_email("a-owner"), role="owner", password=PASSWORD
    )
    b_owner = await create_member(
        app,
        tenant_slug=b_slug,
        tenant_name=f"B name {secrets.token_hex(4)}",
        email=unique_email("b-owner"),
        role="owner",
        password=PASSWORD,
    )
    b_member = await create_member(
        app, tenant_slug=b_slug, email=unique_email("b-member"), role="member"
    )
    settings = app.state.bastion.settings.identity
    roles = Roles(
        {name: role.permissions for name, role in settings.roles.items()},
        inherits={name: role.inherits for name, role in settings.roles.items()},
    )
    everything = sorted(roles.permissions_for([settings.owner_role]))
    a_key, _, _ = await _api_key(client, a_owner, everything)
    b_key, b_key_id, b_key_prefix = await _api_key(client, b_owner, ["documents:read"])
    document = await client.post(
        "/v1/documents",
        json={"title": f"B secret {secrets.token_hex(4)}", "body": "confidential"},
        headers=b_owner.headers,
    )
    assert 201 == document.status_code, document.text
    invitee = unique_email("b-invitee")
    invited = await client.post(
        f"/v1/tenants/{b_owner.tenant_id}/members/invitations",
        json={"email": invitee, "role": "member"},
        headers=b_owner.headers,
    )
    assert 201 == invited.status_code, invited.text
    mail = app.state.bastion.identity.mail.last(purpose="invitation", to=invitee)
    token = re.search(r"token=([A-Za-z0-9_-]+)", mail.text).group(1)
    tenant = (await client.get(f"/v1/tenants/{b_owner.tenant_id}", headers=b_owner.headers)).json()
    b = Target(
        tenant_id=str(b_owner.tenant_id),
        tenant_slug=b_slug,
        document_id=document.json()["id"],
        user_id=str(b_member.user_id),
        key_id=b_key_id,
        invitation_id=invited.json()["id"],
        invitation_token=token,
        owner_email=b_owner.email,
        entry_id=await _audit_entry_of(app, document.json()["id"]),
    )
    transport = httpx.ASGITransport(app=app, client=CLIENT_ADDRESS)
    outside = httpx.AsyncClient(transport=transport, base_url="http://testserver")
    walk = Walk(
        app,
        client,
        outside,
        a_owner,
        a_key,
        b,
        b_owner,
        b_member,
        b_key,
        document.json(),
        tenant["name"],
    )
    walk.markers = {
        b.tenant_id,
        b.tenant_slug,
        tenant["name"],
        b.document_id,
        document.json()["title"],
        b.user_id,
        str(b_owner.user_id),
        b_owner.email,
        b_member.email,
        invitee,
        b.key_id,
        b.invitation_id,
        b_key_prefix,
    }
    async with outside:
        yield walk


def _operator_failures(route: str, template: str, names_b: bool, against_b) -> list[tuple]:
    if template.startswith(AUDIT_PREFIX):
        if names_b and against_b.status_code != 404:
            return [(route, "audit entry of B not 404", outcome(against_b))]
        return []
    if against_b.status_code not in {401, 403}:
        return [(route, "operator route not refused", outcome(against_b))]
    return []


class TestWalkCoversEveryRoute:
    def test_every_route_has_a_walk_entry(self, app):
        """A route the walk does not know fails here: add it to WALK with the body it needs."""
        assert set() == app_operations(app) - set(WALK), "routes not walked"
        assert set() == set(WALK) - app_operations(app), "WALK names routes that do not exist"

    def test_every_id_parameter_has_a_target(self, app):
        """A path parameter the walk cannot fill with B's id fails here: add it to Target."""
        names = {name for _, template in app_operations(app) for name in path_params(template)}
        assert set() == names - ID_PARAMS - GLOBAL_PARAMS


class TestCrossTenantWalk:
    @pytest.mark.parametrize("caller", ["user", "api_key"])
    async def test_tenant_a_learns_nothing_of_tenant_b(self, walk, caller):
        """Every route answers A about B's ids exactly as about ids that exist nowhere."""
        failures = []
        for method, template in sorted(app_operations(walk.app)):
            if caller == "user":
                # A fresh token per call: the walk itself logs A out along the way.
                token = member_token(
                    walk.app, walk.a_owner.user_id, walk.a_owner.tenant_id, "owner"
                )
                headers = {"Authorization": f"Bearer {token}"}
            else:
                headers = {"Authorization": f"Bearer {walk.a_key}"}
            against_b = await call(walk, headers, method, template, walk.b)
            against_nothing = await call(walk, headers, method, template, Target.nowhere())
            route = f"{method} {template}"
            if against_b.status_code >= 500:
                failures.append((route, "server error", against_b.text))
            if (method, template) in HOLDS_A_SECRET:
                if against_b.status_code < 400:
                    failures.append((route, "accepted", outcome(against_b)))
            elif outcome(against_b) != outcome(against_nothing):
                failures.append(
                    (route, "B differs from nothing", outcome(against_b), outcome(against_nothing))
                )
            names_b = path_params(template) & ID_PARAMS
            if template.startswith(OPERATOR_PREFIX):
                failures += _operator_failures(route, template, bool(names_b), against_b)
            elif caller == "user" and names_b and against_b.status_code != 404:
                failures.append((route, "not 404", outcome(against_b)))
            leaked = revealed(walk, against_b)
            if leaked:
                failures.append((route, "revealed", sorted(leaked)))
        assert [] == failures
        await self._b_is_unchanged(walk)

    async def _b_is_unchanged(self, walk: Walk) -> None:
        client, owner, b = walk.client, walk.b_owner, walk.b
        document = await client.get(f"/v1/documents/{b.document_id}", headers=owner.headers)
        tenant = await client.get(f"/v1/tenants/{b.tenant_id}", headers=owner.headers)
        members = await client.get(f"/v1/tenants/{b.tenant_id}/members", headers=owner.headers)
        invitations = await client.get(
            f"/v1/tenants/{b.tenant_id}/members/invitations", headers=owner.headers
        )
        by_key = await client.get(
            "/v1/documents", headers={"Authorization": f"Bearer {walk.b_key}"}
        )
        assert walk.b_document == document.json()
        assert walk.b_tenant_name == tenant.json()["name"]
        assert {(str(owner.user_id), "owner"), (b.user_id, "member")} == {
            (m["user_id"], m["role"]) for m in members.json()
        }
        assert [b.invitation_id] == [i["id"] for i in invitations.json()]
        assert 200 == by_key.status_code
