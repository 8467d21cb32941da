"""Sign-up against pre-hijacking and enumeration: links carry the password; work after the 202."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from auth_support import (
    NEW_PASSWORD,
    PASSWORD,
    link_token,
    login,
    make_app,
    signup_verified,
    unique_email,
    unique_slug,
)
from sqlalchemy import insert, select
from sqlalchemy.exc import OperationalError

from bastion.identity._accounts import InvalidRefreshToken, RefreshTokens
from bastion.identity._directory import create_tenant, find_tenant, find_user_by_email
from bastion.identity._one_time import TokenPurpose
from bastion.identity._tables import one_time_tokens
from bastion.testing import lifespan_client

ATTACKER_PASSWORD = "the attacker's own passphrase"


@pytest.fixture
def app_and_runtime(database_url: str):
    """An app on the parametrized database, not yet started."""
    return make_app(database_url)


@pytest.fixture
def identity(app_and_runtime):
    """The identity component of the app."""
    return app_and_runtime[1].identity


@pytest.fixture
async def client(app_and_runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the started app."""
    async with lifespan_client(app_and_runtime[0], base_url="https://testserver") as c:
        yield c


async def signup(client: httpx.AsyncClient, email: str, password: str, **extra) -> None:
    response = await client.post(
        "/v1/auth/signup", json={"email": email, "password": password, **extra}
    )
    assert 202 == response.status_code, response.text


def verification_token(identity, email: str) -> str:
    return link_token(identity.mail.last(purpose="verification", to=email).text)


async def user_of(identity, email: str):
    async with identity.database.sessions() as session:
        return await find_user_by_email(session, email)


async def tenant_of(identity, slug: str):
    async with identity.database.sessions() as session:
        return await find_tenant(session, slug)


class TestPreHijacking:
    async def test_the_password_of_the_followed_link_counts(self, client, identity):
        """An earlier unverified sign-up of the address keeps neither its password nor its name."""
        email = unique_email("victim")
        attacker_slug, victim_slug = unique_slug(), unique_slug()
        await signup(
            client,
            email,
            ATTACKER_PASSWORD,
            display_name="Mallory",
            tenant={"name": "Trap", "slug": attacker_slug},
        )
        await signup(
            client,
            email,
            PASSWORD,
            display_name="Victoria",
            tenant={"name": "Mine", "slug": victim_slug},
        )
        verified = await client.post(
            "/v1/auth/verify-email", json={"token": verification_token(identity, email)}
        )
        assert 200 == verified.status_code, verified.text
        assert victim_slug == verified.json()["tenant"]["slug"]
        assert 401 == (await login(client, email, ATTACKER_PASSWORD)).status_code
        assert 200 == (await login(client, email, PASSWORD)).status_code
        assert "Victoria" == (await user_of(identity, email)).display_name
        assert await tenant_of(identity, attacker_slug) is None

    async def test_of_two_links_surviving_a_race_only_the_newer_counts(self, client, identity):
        """Two sign-ups racing may both leave a link; the older one is refused, unspent."""
        email = unique_email()
        await signup(client, email, ATTACKER_PASSWORD)
        older = verification_token(identity, email)
        user = await user_of(identity, email)
        # What the racing issue leaves: a newer row beside the older, neither deleted.
        newer = identity.one_time.new(
            TokenPurpose.EMAIL_VERIFICATION,
            str(user.id),
            data={"password_hash": await identity.hasher.hash(PASSWORD), "display_name": "V"},
        )
        record = newer.record
        async with identity.database.session() as session:
            await session.execute(
                insert(one_time_tokens).values(
                    id=uuid.UUID(record.id),
                    purpose=record.purpose.value,
                    subject=record.subject,
                    token_hash=record.token_hash,
                    tenant_id=None,
                    data=dict(record.data),
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    used_at=None,
                )
            )
        refused = await client.post("/v1/auth/verify-email", json={"token": older})
        assert 401 == refused.status_code
        verified = await client.post("/v1/auth/verify-email", json={"token": newer.token})
        assert 200 == verified.status_code
        assert 401 == (await login(client, email, ATTACKER_PASSWORD)).status_code
        assert 200 == (await login(client, email, PASSWORD)).status_code

    async def test_verification_revokes_every_session_of_the_account(self, client, identity):
        """Sessions of the account from before the address was proven stop working."""
        email = unique_email()
        await signup(client, email, ATTACKER_PASSWORD)
        user = await user_of(identity, email)
        refresh = RefreshTokens(identity.database, ttl=3600)
        async with identity.database.session() as session:
            earlier = await refresh.start(session, user.id, None)
        await signup(client, email, PASSWORD)
        verified = await client.post(
            "/v1/auth/verify-email", json={"token": verification_token(identity, email)}
        )
        assert 200 == verified.status_code
        with pytest.raises(InvalidRefreshToken):
            await refresh.rotate(earlier.token)

    async def test_no_password_hash_outlives_the_link(self, client, identity):
        """A followed link's data is emptied: the submitted hash is kept in the account only."""
        email = unique_email()
        await signup(client, email, ATTACKER_PASSWORD)
        await signup(client, email, PASSWORD)
        token = verification_token(identity, email)
        assert (
            200 == (await client.post("/v1/auth/verify-email", json={"token": token})).status_code
        )
        user = await user_of(identity, email)
        async with identity.database.sessions() as session:
            rows = (
                await session.execute(
                    select(one_time_tokens.c.data).where(one_time_tokens.c.subject == str(user.id))
                )
            ).scalars()
            assert [{}] == list(rows)

    async def test_a_reset_voids_a_pending_verification_link(self, client, identity):
        """After a reset proved the mailbox, an older verification link applies nothing."""
        email = unique_email()
        slug = unique_slug()
        await signup(client, email, PASSWORD)
        await signup(client, email, ATTACKER_PASSWORD, tenant={"name": "Trap", "slug": slug})
        pending = verification_token(identity, email)
        await client.post("/v1/auth/password/reset-request", json={"email": email})
        reset = link_token(identity.mail.last(purpose="password_reset", to=email).text)
        done = await client.post(
            "/v1/auth/password/reset", json={"token": reset, "new_password": NEW_PASSWORD}
        )
        assert 204 == done.status_code, done.text
        late = await client.post("/v1/auth/verify-email", json={"token": pending})
        assert 401 == late.status_code
        assert 200 == (await login(client, email, NEW_PASSWORD)).status_code
        assert await tenant_of(identity, slug) is None


class TestTenantAtVerification:
    @pytest.mark.parametrize("account", ["verified", "unverified", "none"])
    async def test_signup_creates_no_tenant_whatever_the_address(self, client, identity, account):
        """Before the address is proven no tenant exists, so its slug tells nothing."""
        email = unique_email()
        if account == "verified":
            await signup_verified(client, identity, email=email)
        elif account == "unverified":
            await signup(client, email, PASSWORD)
        slug = unique_slug()
        await signup(client, email, PASSWORD, tenant={"name": "Probe", "slug": slug})
        assert await tenant_of(identity, slug) is None

    async def test_a_slug_taken_before_verification_still_verifies(self, client, identity):
        """The slug taken between sign-up and link: verified, no tenant, reason slug_taken."""
        email, slug = unique_email(), unique_slug()
        await signup(client, email, PASSWORD, tenant={"name": "Late", "slug": slug})
        async with identity.database.session() as session:
            await create_tenant(session, "First", slug)
        verified = await client.post(
            "/v1/auth/verify-email", json={"token": verification_token(identity, email)}
        )
        assert 200 == verified.status_code, verified.text
        assert {"email_verified": True, "tenant": None, "reason": "slug_taken"} == verified.json()
        logged_in = await login(client, email)
        assert 200 == logged_in.status_code
        assert logged_in.json()["tenant"] is None

    async def test_a_slug_taken_by_a_racing_transaction_still_verifies(
        self, client, identity, monkeypatch
    ):
        """The slug inserted between the look-up and the insert: re-run once, slug_taken."""
        import bastion.identity._auth_routes as routes

        email, slug = unique_email(), unique_slug()
        await signup(client, email, PASSWORD, tenant={"name": "Late", "slug": slug})
        async with identity.database.session() as session:
            await create_tenant(session, "First", slug)
        looked_up: list[str] = []

        async def blind_once(session, key):
            # The first look-up misses the slug, as one racing a concurrent insert would.
            looked_up.append(key)
            return None if len(looked_up) == 1 else await find_tenant(session, key)

        monkeypatch.setattr(routes, "find_tenant", blind_once)
        verified = await client.post(
            "/v1/auth/verify-email", json={"token": verification_token(identity, email)}
        )
        assert 200 == verified.status_code, verified.text
        assert {"email_verified": True, "tenant": None, "reason": "slug_taken"} == verified.json()
        assert [slug, slug] == looked_up
        assert 200 == (await login(client, email)).status_code

    async def test_an_invitation_signup_with_a_taken_slug_is_a_conflict(self, client, identity):
        """With an invitation the tenant is made at once, so its taken slug is still 409."""
        slug = unique_slug()
        async with identity.database.session() as session:
            inviting = await create_tenant(session, "Inviting", unique_slug())
            await create_tenant(session, "Taken", slug)
        email = unique_email("invitee")
        issued = await identity.one_time.issue(
            TokenPurpose.INVITATION, email, tenant=str(inviting.id), data={"role": "viewer"}
        )
        response = await client.post(
            "/v1/auth/signup",
            json={
                "email": email,
                "password": PASSWORD,
                "invitation": issued.token,
                "tenant": {"name": "Mine", "slug": slug},
            },
        )
        assert 409 == response.status_code
        assert "slug_taken" == response.json()["reason"]


@asynccontextmanager
async def _unreachable():
    raise OperationalError("connect", {}, ConnectionRefusedError("database down"))
    yield  # pragma: no cover -- never reached: the connection fails first


class TestWorkAfterTheAnswer:
    @pytest.mark.parametrize(
        ("path", "body"),
        [
            ("/v1/auth/signup", {"password": PASSWORD}),
            ("/v1/auth/password/reset-request", {}),
        ],
        ids=["signup", "reset-request"],
    )
    async def test_the_answer_does_not_wait_for_the_database(
        self, database_url, monkeypatch, capsys, path, body
    ):
        """With the database down the answer is still 202: the account work runs after it."""
        app, runtime = make_app(database_url)
        email = unique_email("outage")
        async with lifespan_client(app, base_url="https://testserver") as client:
            monkeypatch.setattr(runtime.identity.database, "session", _unreachable)
            monkeypatch.setattr(runtime.identity.database, "sessions", _unreachable)
            response = await client.post(path, json={"email": email, **body})
        assert 202 == response.status_code, response.text
        logged = capsys.readouterr().out
        assert "not completed" in logged
        assert "OperationalError" in logged
        assert email not in logged
