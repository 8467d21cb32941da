"""The /v1/auth routes end to end through HTTP, on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import bcrypt
import httpx
import pytest
from auth_support import (
    NEW_PASSWORD,
    PASSWORD,
    bearer,
    link_token,
    login,
    make_app,
    signup_verified,
    unique_email,
    unique_slug,
)
from prometheus_client import REGISTRY
from sqlalchemy import func, select, update

from bastion.data.types import utc_now
from bastion.identity._directory import (
    add_membership,
    create_tenant,
    create_user,
    find_user_by_email,
)
from bastion.identity._events import (
    SecurityEvent,
    SecurityEventKind,
    on_security_event,
    remove_security_listener,
)
from bastion.identity._tables import users
from bastion.ratelimit._login import identifier_hash
from bastion.testing import lifespan_client


@pytest.fixture
def app_and_runtime(database_url: str):
    """An app on the parametrized database, not yet started."""
    return make_app(database_url)


@pytest.fixture
def runtime(app_and_runtime):
    """What install() returned."""
    return app_and_runtime[1]


@pytest.fixture
def identity(runtime):
    """The identity component of the app."""
    assert runtime.identity is not None
    return runtime.identity


@pytest.fixture
async def client(app_and_runtime) -> AsyncIterator[httpx.AsyncClient]:
    """A client of the started app, over https so Secure cookies are kept."""
    async with lifespan_client(app_and_runtime[0], base_url="https://testserver") as c:
        yield c


def hashes(operation: str) -> float:
    """Password hashes (``hash``), verifications (``verify``) or dummy ones (``dummy``) so far."""
    value = REGISTRY.get_sample_value(
        "bastion_identity_password_hash_duration_seconds_count", {"operation": operation}
    )
    return value or 0.0


def problem_of(response: httpx.Response) -> dict:
    """The problem body without its per-request member."""
    body = response.json()
    body.pop("correlation_id", None)
    return body


async def add_tenant(identity, email: str, role: str = "member"):
    """Make the user with ``email`` a member of a new tenant."""
    async with identity.database.session() as session:
        user = await find_user_by_email(session, email)
        tenant = await create_tenant(session, "Second", unique_slug())
        await add_membership(session, tenant.id, user.id, role)
    return tenant


class TestSignup:
    async def test_signup_verify_login(self, client, identity):
        """Sign-up mails a link; after following it, login answers an OAuth token response."""
        email, slug = unique_email("ada"), unique_slug()
        response = await client.post(
            "/v1/auth/signup",
            json={
                "email": email.upper(),
                "password": PASSWORD,
                "display_name": "Ada",
                "tenant": {"name": "Acme", "slug": slug},
            },
        )
        assert 202 == response.status_code
        mail = identity.mail.last(purpose="verification", to=email)
        assert "https://" in mail.text or "http://" in mail.text
        refused = await login(client, email)
        assert 403 == refused.status_code
        assert "email_not_verified" == refused.json()["reason"]
        verified = await client.post("/v1/auth/verify-email", json={"token": link_token(mail.text)})
        assert 200 == verified.status_code, verified.text
        # The tenant waited for the proof of the address: it is created by the verification.
        assert (True, None) == (verified.json()["email_verified"], verified.json()["reason"])
        assert {"slug": slug, "name": "Acme", "role": "owner"} == {
            key: verified.json()["tenant"][key] for key in ("slug", "name", "role")
        }
        response = await login(client, email)
        assert 200 == response.status_code, response.text
        assert "no-store" == response.headers["cache-control"]
        body = response.json()
        assert "bearer" == body["token_type"]
        assert identity.settings.identity.tokens.access_ttl == body["expires_in"]
        assert {"slug": slug, "name": "Acme", "role": "owner"} == {
            key: body["tenant"][key] for key in ("slug", "name", "role")
        }
        claims = identity.tokens.verify(body["access_token"])
        assert body["tenant"]["id"] == claims.tenant
        assert ("owner",) == claims.roles
        assert isinstance(claims.extra["sid"], str)
        me = await client.get("/v1/auth/me", headers=bearer(body["access_token"]))
        assert 200 == me.status_code, me.text
        assert {"email": email, "display_name": "Ada", "email_verified": True} == {
            key: me.json()["user"][key] for key in ("email", "display_name", "email_verified")
        }
        assert slug == me.json()["tenant"]["slug"]

    async def test_verification_link_works_once(self, client, identity):
        """A verification token is single-use."""
        email = unique_email()
        await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        token = link_token(identity.mail.last(purpose="verification", to=email).text)
        assert (
            200 == (await client.post("/v1/auth/verify-email", json={"token": token})).status_code
        )
        again = await client.post("/v1/auth/verify-email", json={"token": token})
        assert 401 == again.status_code
        assert "UNAUTHENTICATED" == again.json()["code"]

    async def test_answers_do_not_reveal_an_existing_account(self, client, identity):
        """Signing up with a taken address answers exactly like a new one."""
        email = await signup_verified(client, identity)
        identity.mail.clear()
        fresh = await client.post(
            "/v1/auth/signup", json={"email": unique_email(), "password": PASSWORD}
        )
        before = hashes("hash")
        taken = await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        assert (fresh.status_code, fresh.json()) == (taken.status_code, taken.json())
        # The password was hashed although no account was made: the same cost either way.
        assert before + 1 == hashes("hash")
        # A verified account gets no mail at all.
        with pytest.raises(LookupError):
            identity.mail.last(to=email)

    async def test_unverified_account_gets_a_fresh_link(self, client, identity):
        """Signing up again before verifying mails a new link; the old one stops working."""
        email = unique_email()
        await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        old = link_token(identity.mail.last(purpose="verification", to=email).text)
        again = await client.post(
            "/v1/auth/signup", json={"email": email, "password": NEW_PASSWORD}
        )
        assert 202 == again.status_code
        new = link_token(identity.mail.last(purpose="verification", to=email).text)
        assert old != new
        assert 401 == (await client.post("/v1/auth/verify-email", json={"token": old})).status_code
        assert 200 == (await client.post("/v1/auth/verify-email", json={"token": new})).status_code
        # The followed link carried the second sign-up's password: that one counts now.
        assert 401 == (await login(client, email)).status_code
        assert 200 == (await login(client, email, NEW_PASSWORD)).status_code

    async def test_concurrent_signups_for_one_address_make_one_account(self, client, identity):
        """Two sign-ups racing for one address both answer 202; one account exists."""
        email = unique_email("race")
        responses = await asyncio.gather(
            *(
                client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
                for _ in range(2)
            )
        )
        assert [202, 202] == [response.status_code for response in responses]
        async with identity.database.sessions() as session:
            count = await session.scalar(
                select(func.count()).select_from(users).where(users.c.email == email)
            )
        assert 1 == count

    async def test_weak_password_is_refused_with_field_errors(self, client):
        """The policy's refusals are 422 with one error per rule, never echoing the password."""
        response = await client.post(
            "/v1/auth/signup", json={"email": unique_email(), "password": "password123"}
        )
        assert 422 == response.status_code
        body = response.json()
        assert "INVALID_INPUT" == body["code"]
        assert {"too_short", "common"} <= {error["code"] for error in body["errors"]}
        assert "password123" not in response.text

    async def test_a_taken_tenant_slug_does_not_change_the_answer(self, client, identity):
        """A slug in use is no 409 at sign-up: 202, and the verification says slug_taken."""
        slug = unique_slug()
        await signup_verified(client, identity, tenant={"name": "A", "slug": slug})
        email = unique_email()
        response = await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "tenant": {"name": "B", "slug": slug}},
        )
        assert 202 == response.status_code, response.text
        token = link_token(identity.mail.last(purpose="verification", to=email).text)
        verified = await client.post("/v1/auth/verify-email", json={"token": token})
        assert 200 == verified.status_code
        assert {"email_verified": True, "tenant": None, "reason": "slug_taken"} == verified.json()
        assert 200 == (await login(client, email)).status_code

    @pytest.mark.parametrize(
        ("body", "code"),
        [
            ({"email": "not-an-address", "password": PASSWORD}, "INVALID_INPUT"),
            ({"email": "a@example.com", "password": PASSWORD, "admin": True}, "INVALID_INPUT"),
            ({"email": "a@example.com", "password": "x" * 5000}, "INPUT_TOO_LONG"),
            ({"email": "a@example.com"}, "INVALID_INPUT"),
        ],
        ids=["bad-address", "extra-field", "huge-password", "missing-password"],
    )
    async def test_malformed_bodies_are_422(self, client, body, code):
        """Bad input is a 422 problem, never a 500; only too long is INPUT_TOO_LONG."""
        response = await client.post("/v1/auth/signup", json=body)
        assert 422 == response.status_code
        assert code == response.json()["code"]


async def test_an_undelivered_mail_changes_nothing_for_the_client(database_url, capsys):
    """A sender that fails: sign-up still answers 202, and the failure is logged by class."""

    class Broken:
        async def send(self, message):
            raise ConnectionRefusedError("smtp down")

    app, runtime = make_app(database_url)
    runtime.identity.mail = Broken()
    async with lifespan_client(app) as client:
        email = unique_email()
        response = await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
    assert 202 == response.status_code
    logged = capsys.readouterr().out
    assert "identity mail not sent" in logged
    assert "ConnectionRefusedError" in logged
    assert email not in logged


async def test_an_invitation_for_an_existing_account_is_left_unspent(database_url):
    """Sign-up with a valid invitation for a taken address answers 202 and spends nothing."""
    from bastion.identity._one_time import TokenPurpose

    app, runtime = make_app(database_url)
    identity = runtime.identity
    async with lifespan_client(app) as client:
        email = await signup_verified(client, identity)
        async with identity.database.session() as session:
            tenant = await create_tenant(session, "Inviting", unique_slug())
        issued = await identity.one_time.issue(
            TokenPurpose.INVITATION, email, tenant=str(tenant.id), data={"role": "member"}
        )
        response = await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "invitation": issued.token},
        )
        assert 202 == response.status_code
        forged = await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "invitation": "A" * 43},
        )
        assert 401 == forged.status_code
        record = await identity.one_time.consume(TokenPurpose.INVITATION, issued.token)
    assert email == record.subject


@pytest.mark.parametrize("mode", ["closed", "invite_only"])
async def test_signup_modes_refuse_without_invitation(database_url, mode):
    """closed refuses every sign-up; invite_only refuses one without an invitation."""
    app, _ = make_app(database_url, identity={"signup": mode})
    async with lifespan_client(app) as client:
        response = await client.post(
            "/v1/auth/signup", json={"email": unique_email(), "password": PASSWORD}
        )
    assert 403 == response.status_code
    expected = "signup_closed" if mode == "closed" else "invitation_required"
    assert expected == response.json()["reason"]


async def test_invite_only_signup_with_an_invitation_joins_the_tenant(database_url):
    """An invitation token for the address creates a verified account in the inviting tenant."""
    from bastion.identity._one_time import TokenPurpose

    app, runtime = make_app(database_url, identity={"signup": "invite_only"})
    identity = runtime.identity
    async with lifespan_client(app) as client:
        async with identity.database.session() as session:
            tenant = await create_tenant(session, "Inviting", unique_slug())
        email = unique_email("invitee")
        wrong = await identity.one_time.issue(
            TokenPurpose.INVITATION, unique_email(), tenant=str(tenant.id), data={"role": "viewer"}
        )
        refused = await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "invitation": wrong.token},
        )
        assert 401 == refused.status_code
        issued = await identity.one_time.issue(
            TokenPurpose.INVITATION, email, tenant=str(tenant.id), data={"role": "viewer"}
        )
        response = await client.post(
            "/v1/auth/signup",
            json={"email": email, "password": PASSWORD, "invitation": issued.token},
        )
        assert 202 == response.status_code, response.text
        logged_in = await login(client, email)
        assert 200 == logged_in.status_code, logged_in.text
        assert {"slug": tenant.slug, "role": "viewer"} == {
            key: logged_in.json()["tenant"][key] for key in ("slug", "role")
        }


class TestLogin:
    async def test_unknown_account_and_wrong_password_answer_alike(self, client, identity):
        """An unknown address and a wrong password are one 401 with one body."""
        email = await signup_verified(client, identity)
        wrong = await login(client, email, "not the right password")
        before = hashes("dummy")
        unknown = await login(client, unique_email(), "not the right password")
        assert 401 == wrong.status_code == unknown.status_code
        assert problem_of(wrong) == problem_of(unknown)
        # The unknown address cost a verification too, against the dummy hash.
        assert before + 1 == hashes("dummy")

    async def test_unverified_account_with_a_wrong_password_is_just_401(self, client):
        """The unverified state is told only to someone who knows the password."""
        email = unique_email()
        await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        assert 401 == (await login(client, email, "not the right password")).status_code
        assert 403 == (await login(client, email)).status_code

    async def test_several_tenants_must_be_chosen(self, client, identity):
        """With two tenants and none named: 409 listing them; naming one picks it."""
        first = unique_slug()
        email = await signup_verified(client, identity, tenant={"name": "First", "slug": first})
        second = await add_tenant(identity, email, "viewer")
        response = await login(client, email)
        assert 409 == response.status_code
        listed = {(each["slug"], each["role"]) for each in response.json()["tenants"]}
        assert {(first, "owner"), (second.slug, "viewer")} == listed
        chosen = await login(client, email, tenant=second.slug)
        assert 200 == chosen.status_code
        assert ("viewer",) == identity.tokens.verify(chosen.json()["access_token"]).roles
        foreign = unique_slug()
        await signup_verified(client, identity, tenant={"name": "X", "slug": foreign})
        for slug in (foreign, "no-such-tenant"):
            refused = await login(client, email, tenant=slug)
            assert 403 == refused.status_code
            assert "not_a_member" == refused.json()["reason"]

    async def test_user_without_tenant_gets_a_tenantless_token(self, client, identity):
        """A user in no tenant logs in; the token's tid is empty and /me names no tenant."""
        email = await signup_verified(client, identity)
        response = await login(client, email)
        assert 200 == response.status_code
        assert response.json()["tenant"] is None
        assert "" == identity.tokens.verify(response.json()["access_token"]).tenant
        me = await client.get("/v1/auth/me", headers=bearer(response.json()["access_token"]))
        assert 200 == me.status_code, me.text
        assert (None, []) == (me.json()["tenant"], me.json()["memberships"])

    async def test_imported_bcrypt_hash_is_replaced_at_login(self, client, identity):
        """An imported bcrypt hash verifies once and is stored again as Argon2id."""
        email = unique_email("imported")
        imported = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
        async with identity.database.session() as session:
            await create_user(session, email, password_hash=imported, verified=True)
        assert 200 == (await login(client, email)).status_code
        async with identity.database.sessions() as session:
            stored = (await find_user_by_email(session, email)).password_hash
        assert stored.startswith("$argon2id$")
        assert 200 == (await login(client, email)).status_code

    async def test_disabled_account_answers_like_a_wrong_password(self, client, identity):
        """The right password of a disabled account gets the wrong-password answer."""
        email = await signup_verified(client, identity)
        async with identity.database.session() as session:
            await session.execute(
                update(users).where(users.c.email == email).values(disabled_at=utc_now())
            )
        disabled = await login(client, email)
        unknown = await login(client, unique_email())
        assert 401 == disabled.status_code
        assert problem_of(unknown) == problem_of(disabled)

    async def test_security_events_name_no_address(self, client, identity):
        """Failure and success are security events; the failure names the address by hash only."""
        email = await signup_verified(client, identity)
        seen: list[SecurityEvent] = []
        on_security_event(seen.append)
        try:
            await login(client, email, "not the right password")
            response = await login(client, email)
        finally:
            remove_security_listener(seen.append)
        failed, succeeded = (
            [event for event in seen if event.kind is kind]
            for kind in (SecurityEventKind.LOGIN_FAILED, SecurityEventKind.LOGIN_SUCCEEDED)
        )
        assert [identifier_hash(email)] == [event.subject for event in failed]
        assert ["bad_password"] == [event.details["reason"] for event in failed]
        sid = identity.tokens.verify(response.json()["access_token"]).extra["sid"]
        assert [sid] == [event.details["token_family_id"] for event in succeeded]
        assert all(email not in repr(event.as_dict()) for event in seen)

    async def test_lockout_after_five_failures(self, client, identity):
        """The fifth consecutive failure locks the address: even the right password gets 429."""
        email = await signup_verified(client, identity)
        for _ in range(5):
            assert 401 == (await login(client, email, "not the right password")).status_code
        locked = await login(client, email)
        assert 429 == locked.status_code
        assert "ACCOUNT_LOCKED" == locked.json()["code"]
        assert "retry-after" in locked.headers

    async def test_openapi_lists_the_error_codes(self, app_and_runtime):
        """The login operation documents every code it can answer."""
        responses = app_and_runtime[0].openapi()["paths"]["/v1/auth/login"]["post"]["responses"]
        assert ["UNAUTHENTICATED"] == responses["401"]["x-error-codes"]
        assert ["ACCOUNT_LOCKED", "RATE_LIMITED"] == responses["429"]["x-error-codes"]
        assert {"403", "409", "422", "503"} <= set(responses)


class TestRefresh:
    async def test_rotation_and_reuse_detection(self, client, identity):
        """Each refresh answers a new pair; replaying a spent token kills the whole family."""
        email = await signup_verified(client, identity)
        first = (await login(client, email)).json()
        second = await client.post(
            "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert 200 == second.status_code, second.text
        assert "no-store" == second.headers["cache-control"]
        assert first["refresh_token"] != second.json()["refresh_token"]
        sid = identity.tokens.verify(first["access_token"]).extra["sid"]
        assert sid == identity.tokens.verify(second.json()["access_token"]).extra["sid"]
        replay = await client.post(
            "/v1/auth/refresh", json={"refresh_token": first["refresh_token"]}
        )
        assert 401 == replay.status_code
        newest = await client.post(
            "/v1/auth/refresh", json={"refresh_token": second.json()["refresh_token"]}
        )
        assert 401 == newest.status_code

    async def test_concurrent_refreshes_with_one_token(self, client, identity):
        """Two refreshes with the same token at once: exactly one answers 200."""
        email = await signup_verified(client, identity)
        token = (await login(client, email)).json()["refresh_token"]
        responses = await asyncio.gather(
            *(client.post("/v1/auth/refresh", json={"refresh_token": token}) for _ in range(2))
        )
        statuses = sorted(response.status_code for response in responses)
        # The other finds the token spent (401), or on SQLite, where the audit trail's
        # writer commits too, may run out of busy retries first (409, "retry").
        assert 200 == statuses[0]
        assert statuses[1] in {401, 409}

    async def test_switching_tenant(self, client, identity):
        """refresh with a tenant the user belongs to answers a token for that tenant."""
        first = unique_slug()
        email = await signup_verified(client, identity, tenant={"name": "First", "slug": first})
        second = await add_tenant(identity, email, "member")
        pair = (await login(client, email, tenant=first)).json()
        switched = await client.post(
            "/v1/auth/refresh", json={"refresh_token": pair["refresh_token"], "tenant": second.slug}
        )
        assert 200 == switched.status_code, switched.text
        assert str(second.id) == identity.tokens.verify(switched.json()["access_token"]).tenant
        assert "member" == switched.json()["tenant"]["role"]

    async def test_without_a_token_is_401(self, client):
        """No body and no cookie: 401."""
        assert 401 == (await client.post("/v1/auth/refresh")).status_code


class TestCookieDelivery:
    async def test_cookie_attributes_and_round_trip(self, client, identity):
        """Cookie mode: HttpOnly, Secure, SameSite=Strict, scoped to /v1/auth; not in the body."""
        email = await signup_verified(client, identity)
        response = await login(client, email, refresh_token_delivery="cookie")
        assert 200 == response.status_code
        assert "refresh_token" not in response.json()
        header = response.headers["set-cookie"]
        attributes = {part.strip().split("=")[0].lower() for part in header.split(";")}
        assert {"httponly", "secure", "samesite", "path", "max-age"} <= attributes
        assert "samesite=strict" in header.lower()
        assert "path=/v1/auth" in header.lower()
        assert f"max-age={int(identity.settings.identity.tokens.refresh_ttl)}" in header.lower()
        old = client.cookies.get("bastion_refresh")
        # A cookie-authenticated write proves its origin: the page echoes the CSRF cookie.
        csrf = {"Origin": "https://testserver", "X-CSRF-Token": client.cookies["bastion_csrf"]}
        refreshed = await client.post("/v1/auth/refresh", headers=csrf)
        assert 200 == refreshed.status_code, refreshed.text
        assert "refresh_token" not in refreshed.json()
        assert old != client.cookies.get("bastion_refresh")
        logged_out = await client.post("/v1/auth/logout", headers=csrf)
        assert 204 == logged_out.status_code
        assert client.cookies.get("bastion_refresh") is None
        client.cookies.set("bastion_refresh", old, domain="testserver", path="/v1/auth")
        client.cookies.set("bastion_csrf", csrf["X-CSRF-Token"], domain="testserver", path="/")
        assert 401 == (await client.post("/v1/auth/refresh", headers=csrf)).status_code


class TestLogout:
    async def test_logout_revokes_the_session_and_is_idempotent(self, client, identity):
        """Logout ends the refresh family; logging out again still answers 204."""
        email = await signup_verified(client, identity)
        pair = (await login(client, email)).json()
        other = (await login(client, email)).json()
        for _ in range(2):
            response = await client.post(
                "/v1/auth/logout",
                json={"refresh_token": pair["refresh_token"]},
                headers=bearer(pair["access_token"]),
            )
            assert 204 == response.status_code
        gone = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert 401 == gone.status_code
        # Another session of the same user is untouched.
        kept = await client.post("/v1/auth/refresh", json={"refresh_token": other["refresh_token"]})
        assert 200 == kept.status_code

    async def test_logout_by_access_token_alone(self, client, identity):
        """The access token's sid names the family to end."""
        email = await signup_verified(client, identity)
        pair = (await login(client, email)).json()
        response = await client.post("/v1/auth/logout", headers=bearer(pair["access_token"]))
        assert 204 == response.status_code
        gone = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert 401 == gone.status_code

    async def test_logout_all_ends_every_session(self, client, identity):
        """logout-all needs a user and ends every refresh family of that user."""
        assert 401 == (await client.post("/v1/auth/logout-all")).status_code
        email = await signup_verified(client, identity)
        pairs = [(await login(client, email)).json() for _ in range(2)]
        response = await client.post(
            "/v1/auth/logout-all", headers=bearer(pairs[0]["access_token"])
        )
        assert 204 == response.status_code
        for pair in pairs:
            refused = await client.post(
                "/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]}
            )
            assert 401 == refused.status_code


class TestPasswords:
    async def test_change(self, client, identity):
        """A change needs the current password, ends other sessions and answers a new pair."""
        email = await signup_verified(client, identity)
        pair = (await login(client, email)).json()
        other = (await login(client, email)).json()
        wrong = await client.post(
            "/v1/auth/password/change",
            json={"current_password": "not the right password", "new_password": NEW_PASSWORD},
            headers=bearer(pair["access_token"]),
        )
        assert 403 == wrong.status_code
        weak = await client.post(
            "/v1/auth/password/change",
            json={"current_password": PASSWORD, "new_password": "short"},
            headers=bearer(pair["access_token"]),
        )
        assert 422 == weak.status_code
        changed = await client.post(
            "/v1/auth/password/change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
            headers=bearer(pair["access_token"]),
        )
        assert 200 == changed.status_code, changed.text
        for old in (pair, other):
            refused = await client.post(
                "/v1/auth/refresh", json={"refresh_token": old["refresh_token"]}
            )
            assert 401 == refused.status_code
        fresh = await client.post(
            "/v1/auth/refresh", json={"refresh_token": changed.json()["refresh_token"]}
        )
        assert 200 == fresh.status_code
        assert 401 == (await login(client, email)).status_code
        assert 200 == (await login(client, email, NEW_PASSWORD)).status_code

    async def test_change_answers_for_the_same_tenant(self, client, identity):
        """The new pair after a change acts for the tenant the caller's token acted for."""
        slug = unique_slug()
        email = await signup_verified(client, identity, tenant={"name": "Kept", "slug": slug})
        await add_tenant(identity, email, "viewer")
        pair = (await login(client, email, tenant=slug)).json()
        changed = await client.post(
            "/v1/auth/password/change",
            json={"current_password": PASSWORD, "new_password": NEW_PASSWORD},
            headers=bearer(pair["access_token"]),
        )
        assert 200 == changed.status_code, changed.text
        assert (slug, "owner") == (
            changed.json()["tenant"]["slug"],
            changed.json()["tenant"]["role"],
        )
        assert pair["tenant"]["id"] == identity.tokens.verify(changed.json()["access_token"]).tenant

    async def test_reset(self, client, identity):
        """A reset link sets a new password once, verifies the address and ends every session."""
        email = unique_email()
        await client.post("/v1/auth/signup", json={"email": email, "password": PASSWORD})
        unknown = await client.post(
            "/v1/auth/password/reset-request", json={"email": unique_email()}
        )
        known = await client.post("/v1/auth/password/reset-request", json={"email": email})
        assert (202, unknown.json()) == (known.status_code, known.json())
        token = link_token(identity.mail.last(purpose="password_reset", to=email).text)
        weak = await client.post(
            "/v1/auth/password/reset", json={"token": token, "new_password": "password"}
        )
        assert 422 == weak.status_code
        # The refused password did not spend the link.
        done = await client.post(
            "/v1/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD}
        )
        assert 204 == done.status_code, done.text
        again = await client.post(
            "/v1/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD}
        )
        assert 401 == again.status_code
        # The account was never verified by its link; the reset proved the mailbox.
        response = await login(client, email, NEW_PASSWORD)
        assert 200 == response.status_code, response.text

    async def test_reset_ends_existing_sessions(self, client, identity):
        """Sessions opened before a reset are revoked by it."""
        email = await signup_verified(client, identity)
        pair = (await login(client, email)).json()
        await client.post("/v1/auth/password/reset-request", json={"email": email})
        token = link_token(identity.mail.last(purpose="password_reset", to=email).text)
        done = await client.post(
            "/v1/auth/password/reset", json={"token": token, "new_password": NEW_PASSWORD}
        )
        assert 204 == done.status_code
        gone = await client.post("/v1/auth/refresh", json={"refresh_token": pair["refresh_token"]})
        assert 401 == gone.status_code
