"""bastion.testing.create_member: tenants' members with real tokens, for any app's tests."""

from __future__ import annotations

import secrets
import uuid

import pytest

import bastion
from bastion.testing import TestMember, create_member, lifespan_client, member_token

FAST_PASSWORDS = {"time_cost": 1, "memory_cost": 8}
PASSWORD = "tidy-orchard-window-73"


def unique(label: str) -> tuple[str, str]:
    """A fresh slug and address: the session's PostgreSQL database is shared."""
    token = secrets.token_hex(5)
    return f"{label}-{token}", f"{label}-{token}@example.test"


@pytest.fixture
def app(database_url):
    """A plain app with bastion installed (not the reference service)."""
    return bastion.create_app(
        database={"url": database_url},
        migrations={"mode": "auto"},
        logging={"level": "WARNING", "format": "json"},
        identity={"passwords": FAST_PASSWORDS},
    )


class TestCreateMember:
    async def test_the_member_is_who_the_token_says(self, app):
        """The tenant, user and membership exist, and the headers authenticate as them."""
        slug, email = unique("acme")
        async with lifespan_client(app) as client:
            member = await create_member(app, tenant_slug=slug, email=email, role="admin")
            me = await client.get("/v1/auth/me", headers=member.headers)
        body = me.json()
        assert 200 == me.status_code, me.text
        assert (str(member.user_id), email, slug, "admin") == (
            body["user"]["id"],
            body["user"]["email"],
            body["tenant"]["slug"],
            body["tenant"]["role"],
        )

    async def test_a_password_logs_in(self, app):
        """A member created with a password logs in over HTTP like any user."""
        slug, email = unique("login")
        async with lifespan_client(app) as client:
            member = await create_member(
                app, tenant_slug=slug, email=email, role="owner", password=PASSWORD
            )
            login = await client.post("/v1/auth/login", json={"email": email, "password": PASSWORD})
        assert (200, PASSWORD) == (login.status_code, member.password)

    async def test_an_existing_user_joins_another_tenant(self, app):
        """The same address in a second tenant is the same user, with a second membership."""
        first, email = unique("first")
        second, _ = unique("second")
        async with lifespan_client(app):
            one = await create_member(app, tenant_slug=first, email=email, role="owner")
            two = await create_member(
                app, tenant_slug=second, email=email.upper(), role="viewer", password=PASSWORD
            )
        assert (one.user_id, None) == (two.user_id, two.password)
        assert one.tenant_id != two.tenant_id

    async def test_refusals(self, app):
        """An unknown role or an existing membership is a ValueError, and nothing is written."""
        slug, email = unique("refused")
        async with lifespan_client(app):
            with pytest.raises(ValueError, match="roles"):
                await create_member(app, tenant_slug=slug, email=email, role="emperor")
            await create_member(app, tenant_slug=slug, email=email, role="member")
            with pytest.raises(ValueError, match="already a member"):
                await create_member(app, tenant_slug=slug, email=email, role="owner")

    async def test_member_token_for_another_tenant_grants_nothing(self, app):
        """A token for a tenant the user is not in authenticates but holds no permission."""
        slug, email = unique("mine")
        other, other_email = unique("theirs")
        async with lifespan_client(app) as client:
            member = await create_member(app, tenant_slug=slug, email=email, role="owner")
            stranger = await create_member(app, tenant_slug=other, email=other_email, role="owner")
            token = member_token(app, member.user_id, stranger.tenant_id, "owner")
            response = await client.get(
                f"/v1/tenants/{stranger.tenant_id}/members",
                headers={"Authorization": f"Bearer {token}"},
            )
        assert response.status_code in {403, 404}

    def test_repr_shows_no_credential(self):
        """Neither the token nor the address appears in a failing test's output."""
        member = TestMember(
            user_id=uuid.uuid4(),
            tenant_id=uuid.uuid4(),
            tenant_slug="acme",
            email="ann@example.test",
            role="owner",
            token="eyJ.secret.token",
        )
        assert "ann@" not in repr(member)
        assert "secret" not in repr(member)

    def test_an_app_without_identity_is_refused(self, sqlite_url):
        """Without the identity component there is nothing to make members with."""
        app = bastion.create_app(database={"url": sqlite_url}, identity={"enabled": False})
        with pytest.raises(RuntimeError, match="identity"):
            member_token(app, "u", "t", "owner")
