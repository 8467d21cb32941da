"""Users of an external OIDC issuer are not accounts here, whatever their subject looks like."""

from __future__ import annotations

import dataclasses

import pytest
from auth_support import PASSWORD, bearer, login, make_app, signup_verified
from sqlalchemy import select

from bastion.identity._directory import find_user_by_email
from bastion.identity._tables import users
from bastion.testing import LocalOidcIssuer, lifespan_client

AUDIENCE = "api://docs"


@pytest.fixture
def issuer():
    """A local OpenID Connect issuer on a free port."""
    with LocalOidcIssuer() as running:
        yield running


class TestExternalUsers:
    @pytest.mark.parametrize(
        ("method", "path", "body"),
        [
            ("GET", "/v1/auth/me", None),
            ("POST", "/v1/auth/logout-all", None),
            (
                "POST",
                "/v1/auth/password/change",
                {"current_password": PASSWORD, "new_password": "an external takeover attempt"},
            ),
        ],
        ids=["me", "logout-all", "password-change"],
    )
    async def test_a_subject_equal_to_a_local_user_id_is_refused(
        self, database_url, issuer, method, path, body
    ):
        """sub = a local user's id from a configured issuer: 403, and the account is untouched."""
        app, runtime = make_app(
            database_url, identity={"oidc": {"idp": {"issuer": issuer.url, "audience": AUDIENCE}}}
        )
        identity = runtime.identity
        # Settings-built issuers prefix subjects with their name; an application's own
        # OidcProvider has none by default, so its subjects can be local user ids.
        for provider in identity.oidc.values():
            provider.mapping = dataclasses.replace(provider.mapping, subject_prefix="")
        async with lifespan_client(app, base_url="https://testserver") as client:
            email = await signup_verified(client, identity)
            session = (await login(client, email)).json()
            async with identity.database.sessions() as db:
                victim = await find_user_by_email(db, email)
            token = issuer.mint(str(victim.id), audience=AUDIENCE)
            response = await client.request(method, path, json=body, headers=bearer(token))
            assert 403 == response.status_code, response.text
            assert "external_identity" == response.json()["reason"]
            kept = await client.post(
                "/v1/auth/refresh", json={"refresh_token": session["refresh_token"]}
            )
            assert 200 == kept.status_code
            assert 200 == (await login(client, email)).status_code
            async with identity.database.sessions() as db:
                stored = await db.scalar(
                    select(users.c.password_hash).where(users.c.id == victim.id)
                )
            assert victim.password_hash == stored
