"""IdentityMiddleware through HTTP: which credentials bind which principal, and refusals."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import secrets
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import REGISTRY
from wiring_support import (
    bearer,
    identity_app,
    identity_of,
    identity_overrides,
    make_tenant,
    running,
    store_api_key,
)

from bastion.identity import generate_jwks
from bastion.identity._api_key_store import deny_list_entry
from bastion.identity._tables import api_keys
from bastion.identity._tokens import ACCESS_TOKEN_TYPE
from bastion.testing import LocalOidcIssuer


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(header: dict, claims: dict, signature: bytes) -> str:
    """A compact JWS with the given parts (no key involved)."""
    head = b64(json.dumps(header).encode())
    body = b64(json.dumps(claims).encode())
    return f"{head}.{body}.{b64(signature)}"


def good_claims(identity) -> dict:
    now = int(time.time())
    return {
        "iss": identity.tokens.issuer,
        "aud": identity.tokens.audience,
        "sub": str(uuid.uuid4()),
        "tid": str(uuid.uuid4()),
        "roles": ["owner"],
        "jti": str(uuid.uuid4()),
        "iat": now,
        "exp": now + 600,
    }


class TestAccessTokens:
    async def test_a_token_binds_the_principal_and_the_request_context(
        self, database_url, tmp_path
    ):
        """A valid token makes its subject the principal, with tenant, session and token id."""
        app, runtime = identity_app(**identity_overrides(database_url, tmp_path))
        user, tenant = str(uuid.uuid4()), str(uuid.uuid4())
        async with running(app) as client:
            issued = identity_of(runtime).tokens.issue(
                user, tenant, ["member"], extra={"sid": "family-1"}
            )
            response = await client.get("/me", headers=bearer(issued.token))

        assert 200 == response.status_code, response.text
        assert {
            "subject": user,
            "kind": "user",
            "tenant_id": tenant,
            "roles": ["member"],
            "scopes": None,
            "session_id": "family-1",
            "token_id": issued.token_id,
            "context": [user, tenant, None],
        } == response.json()

    async def test_a_token_for_no_tenant_binds_a_tenantless_principal(self, sqlite_url, tmp_path):
        """``tid: ""`` acts for no tenant: authenticated, but 403 where a tenant is needed."""
        app, runtime = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            token = identity_of(runtime).tokens.issue("u-1", "", []).token
            me = await client.get("/me", headers=bearer(token))
            tenant = await client.get("/tenant", headers=bearer(token))

        assert (200, None) == (me.status_code, me.json()["tenant_id"])
        assert (403, "FORBIDDEN") == (tenant.status_code, tenant.json()["code"])

    async def test_an_expired_token_is_named_on_a_protected_route_only(self, sqlite_url, tmp_path):
        """An expired token: 401 saying so where a caller is needed; a public route answers."""
        app, runtime = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            token = identity_of(runtime).tokens.issue("u-1", "t-1", [], ttl=-120).token
            protected = await client.get("/me", headers=bearer(token))
            public = await client.get("/public", headers=bearer(token))

        assert 401 == protected.status_code
        assert "The access token expired." == protected.json()["detail"]
        assert 'error="invalid_token"' in protected.headers["www-authenticate"]
        assert "expired" in protected.headers["www-authenticate"]
        assert 200 == public.status_code

    async def test_no_credentials_is_a_bearer_challenge(self, sqlite_url, tmp_path):
        """Without credentials a protected route asks for a bearer token."""
        app, _ = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            response = await client.get("/me")

        assert (401, 'Bearer realm="bastion"') == (
            response.status_code,
            response.headers["www-authenticate"],
        )

    async def test_another_authorization_scheme_is_not_judged(self, sqlite_url, tmp_path):
        """``Basic`` credentials are not identity's: the request is anonymous, not refused."""
        app, _ = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            response = await client.get("/me", headers={"authorization": "Basic dTpw"})

        assert 'Bearer realm="bastion"' == response.headers["www-authenticate"]

    async def test_alg_none_is_refused(self, database_url, tmp_path):
        """A token whose header says ``alg: none`` is refused, whatever its claims."""
        app, runtime = identity_app(**identity_overrides(database_url, tmp_path))
        identity = identity_of(runtime)
        kid = identity.keys.signing_key.kid
        token = forged(
            {"alg": "none", "typ": ACCESS_TOKEN_TYPE, "kid": kid}, good_claims(identity), b"x"
        )
        async with running(app) as client:
            response = await client.get("/me", headers=bearer(token))

        assert (401, "The access token is invalid.") == (
            response.status_code,
            response.json()["detail"],
        )

    async def test_hs256_signed_with_the_public_key_is_refused(self, database_url, tmp_path):
        """Key confusion: an HS256 token keyed with the published public key is refused."""
        app, runtime = identity_app(**identity_overrides(database_url, tmp_path))
        identity = identity_of(runtime)
        async with running(app) as client:
            jwks = (await client.get("/.well-known/jwks.json")).json()
            (public,) = jwks["keys"]
            header = {"alg": "HS256", "typ": ACCESS_TOKEN_TYPE, "kid": public["kid"]}
            head_body = forged(header, good_claims(identity), b"").rsplit(".", 1)[0]
            refused = []
            # Whatever bytes of the public key an attacker would try as the HMAC secret.
            for secret in (json.dumps(public).encode(), public["x"].encode()):
                mac = hmac.new(secret, head_body.encode(), hashlib.sha256).digest()
                response = await client.get("/me", headers=bearer(f"{head_body}.{b64(mac)}"))
                refused.append(response.status_code)

        assert [401, 401] == refused

    async def test_a_token_of_another_key_is_refused(self, sqlite_url, tmp_path):
        """A well-formed token signed by a key this service does not hold is refused."""
        app, _ = identity_app(**identity_overrides(sqlite_url, tmp_path))
        other, _ = identity_app(**identity_overrides(sqlite_url, tmp_path / "other"))
        async with running(app) as client, running(other):
            token = identity_of(other.state.bastion).tokens.issue("u-1", "t-1", []).token
            response = await client.get("/me", headers=bearer(token))

        assert 401 == response.status_code

    async def test_rate_limits_key_on_the_principal(self, sqlite_url, tmp_path):
        """Two users behind one address have a bucket each: limits see the principal."""
        overrides = identity_overrides(
            sqlite_url, tmp_path, ratelimit={"store_url": "memory://", "default": "2/minute"}
        )
        app, runtime = identity_app(**overrides)
        async with running(app) as client:
            tokens = identity_of(runtime).tokens
            ada = bearer(tokens.issue("ada", "t-1", []).token)
            bob = bearer(tokens.issue("bob", "t-1", []).token)
            ada_codes = [(await client.get("/public", headers=ada)).status_code for _ in range(3)]
            bob_code = (await client.get("/public", headers=bob)).status_code

        assert ([200, 200, 429], 200) == (ada_codes, bob_code)


@pytest.mark.redis
@pytest.mark.postgres
class TestRevocationAcrossInstances:
    async def test_a_revoked_token_is_refused_by_another_instance(
        self, postgres_url, redis_url, redis_prefix, tmp_path
    ):
        """A jti denied on instance A is refused by instance B on its very next request."""
        jwks = generate_jwks("EdDSA")
        shared = {"jwks": jwks, "redis": (redis_url, redis_prefix)}
        a, runtime_a = identity_app(**identity_overrides(postgres_url, tmp_path / "a", **shared))
        b, _ = identity_app(**identity_overrides(postgres_url, tmp_path / "b", **shared))
        async with running(a), running(b) as client_b:
            identity_a = identity_of(runtime_a)
            issued = identity_a.tokens.issue(str(uuid.uuid4()), str(uuid.uuid4()), [])
            before = await client_b.get("/me", headers=bearer(issued.token))
            assert identity_a.deny_list is not None
            await identity_a.deny_list.revoke(issued.token_id, issued.expires_at)
            after = await client_b.get("/me", headers=bearer(issued.token))

        assert (200, 401) == (before.status_code, after.status_code)
        assert "The access token is invalid." == after.json()["detail"]

    async def test_log_out_everywhere_reaches_every_instance(
        self, postgres_url, redis_url, redis_prefix, tmp_path
    ):
        """Every token of a subject issued before the mark is refused on the other instance."""
        jwks = generate_jwks("EdDSA")
        shared = {"jwks": jwks, "redis": (redis_url, redis_prefix)}
        a, runtime_a = identity_app(**identity_overrides(postgres_url, tmp_path / "a", **shared))
        b, _ = identity_app(**identity_overrides(postgres_url, tmp_path / "b", **shared))
        user = str(uuid.uuid4())
        async with running(a), running(b) as client_b:
            identity_a = identity_of(runtime_a)
            token = identity_a.tokens.issue(user, str(uuid.uuid4()), []).token
            assert identity_a.deny_list is not None
            await identity_a.deny_list.revoke_subject(user, before=time.time() + 1)
            response = await client_b.get("/me", headers=bearer(token))

        assert 401 == response.status_code

    async def test_a_deny_list_failing_closed_answers_503_where_a_caller_is_needed(
        self, sqlite_url, tmp_path
    ):
        """Redis unreachable and ``fail_open`` off: 503 on a protected route, public answers."""
        overrides = identity_overrides(
            sqlite_url,
            tmp_path,
            identity={
                "store_url": "redis://127.0.0.1:1/0",
                "deny_list": {"fail_open": False, "timeout": 0.05},
            },
        )
        app, runtime = identity_app(**overrides)
        async with running(app) as client:
            token = identity_of(runtime).tokens.issue("u-1", "t-1", []).token
            protected = await client.get("/me", headers=bearer(token))
            public = await client.get("/public", headers=bearer(token))

        assert (503, "SERVICE_UNAVAILABLE") == (
            protected.status_code,
            protected.json()["code"],
        )
        assert 200 == public.status_code


class TestApiKeys:
    async def test_an_api_key_authenticates_in_either_header(self, database_url, tmp_path):
        """A stored key works as ``X-API-Key`` and as a bearer token, acting for its tenant."""
        app, runtime = identity_app(**identity_overrides(database_url, tmp_path))
        async with running(app) as client:
            identity = identity_of(runtime)
            tenant = str(await make_tenant(identity))
            created = identity.api_keys.create(tenant, "ci", ["tenant:read"])
            await store_api_key(identity, created)
            by_header = await client.get("/me", headers={"x-api-key": created.key})
            by_bearer = await client.get("/me", headers=bearer(created.key))

        for response in (by_header, by_bearer):
            assert 200 == response.status_code, response.text
            body = response.json()
            assert (created.record.id, "api_key", tenant, ["tenant:read"]) == (
                body["subject"],
                body["kind"],
                body["tenant_id"],
                body["scopes"],
            )
            assert [None, tenant, created.record.id] == body["context"]

    async def test_an_api_key_holds_its_scopes_only(self, sqlite_url, tmp_path):
        """A key's scopes are its permissions: granted ones pass, others are 403."""
        app, runtime = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            identity = identity_of(runtime)
            created = identity.api_keys.create(
                str(await make_tenant(identity)), "ci", ["tenant:read"]
            )
            await store_api_key(identity, created)
            read = await client.get("/read", headers={"x-api-key": created.key})
            manage = await client.get("/manage", headers={"x-api-key": created.key})

        assert (200, 403) == (read.status_code, manage.status_code)

    async def test_a_wrong_key_is_refused(self, sqlite_url, tmp_path):
        """An unknown key, a key with a wrong secret and garbage are all the same 401."""
        app, runtime = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            identity = identity_of(runtime)
            created = identity.api_keys.create(str(await make_tenant(identity)), "ci", [])
            await store_api_key(identity, created)
            unknown = identity.api_keys.create(created.record.tenant, "never stored", []).key
            # Another last character (1 in 62 keys already ends in any given one).
            altered = created.key[:-1] + ("x" if created.key[-1] != "x" else "y")
            attempts = [unknown, altered, "bk_live_nonsense"]
            responses = [await client.get("/me", headers={"x-api-key": key}) for key in attempts]

        assert [(401, "The API key is invalid.")] * 3 == [
            (r.status_code, r.json()["detail"]) for r in responses
        ]

    async def test_a_used_key_records_its_last_use(self, sqlite_url, tmp_path):
        """Using a key writes its ``last_used_at`` (in the background, once per interval)."""
        app, runtime = identity_app(**identity_overrides(sqlite_url, tmp_path))
        async with running(app) as client:
            identity = identity_of(runtime)
            created = identity.api_keys.create(str(await make_tenant(identity)), "ci", [])
            await store_api_key(identity, created)
            await client.get("/me", headers={"x-api-key": created.key})
        # Shutdown waits for the pending write.
        async with identity.database.sessions() as session:
            used = await session.scalar(
                api_keys.select()
                .with_only_columns(api_keys.c.last_used_at)
                .where(api_keys.c.id == uuid.UUID(created.record.id))
            )
        await identity.database.aclose()

        assert used is not None

    async def test_a_key_of_a_previous_secret_is_rehashed_on_use(self, sqlite_url, tmp_path):
        """After a secret rotation a used key's hash moves to the new secret, so the old
        secret can be dropped without breaking the key."""
        old_secret, new_secret = secrets.token_urlsafe(48), secrets.token_urlsafe(48)

        def app_with(api_key_settings):
            return identity_app(
                **identity_overrides(sqlite_url, tmp_path, identity={"api_keys": api_key_settings})
            )

        before, runtime = app_with({"secret": old_secret})
        async with running(before):
            identity = identity_of(runtime)
            created = identity.api_keys.create(str(await make_tenant(identity)), "ci", [])
            await store_api_key(identity, created)
        rotated, _ = app_with({"secret": new_secret, "previous_secrets": [old_secret]})
        async with running(rotated) as client:
            during = await client.get("/me", headers={"x-api-key": created.key})
        # Shutdown waited for the background write; now the old secret can go.
        after, _ = app_with({"secret": new_secret})
        async with running(after) as client:
            dropped = await client.get("/me", headers={"x-api-key": created.key})

        assert (200, 200) == (during.status_code, dropped.status_code), dropped.text

    @pytest.mark.redis
    @pytest.mark.postgres
    async def test_a_revoked_key_is_refused_at_once_by_another_instance(
        self, postgres_url, redis_url, redis_prefix, tmp_path
    ):
        """Revoked on A (database and deny list), B refuses it although it had it cached."""
        shared = {"jwks": generate_jwks("EdDSA"), "redis": (redis_url, redis_prefix)}
        a, runtime_a = identity_app(**identity_overrides(postgres_url, tmp_path / "a", **shared))
        b, _ = identity_app(**identity_overrides(postgres_url, tmp_path / "b", **shared))
        async with running(a), running(b) as client_b:
            identity_a = identity_of(runtime_a)
            created = identity_a.api_keys.create(str(await make_tenant(identity_a)), "ci", [])
            await store_api_key(identity_a, created)
            key = {"x-api-key": created.key}
            before = await client_b.get("/me", headers=key)
            # What DELETE /v1/api-keys/{id} does on instance A.
            now = datetime.now(UTC)
            async with identity_a.database.session() as session:
                await session.execute(
                    api_keys.update()
                    .where(api_keys.c.id == uuid.UUID(created.record.id))
                    .values(revoked_at=now)
                )
            assert identity_a.deny_list is not None
            until = now + timedelta(seconds=identity_a.settings.identity.api_keys.cache_ttl + 1)
            await identity_a.deny_list.revoke(deny_list_entry(created.record.id), until.timestamp())
            after = await client_b.get("/me", headers=key)

        assert (200, 401) == (before.status_code, after.status_code)


class TestTrustedHeader:
    def overrides(self, sqlite_url, tmp_path):
        return identity_overrides(
            sqlite_url,
            tmp_path,
            tenancy={
                "trusted_header": "X-Tenant-Id",
                "trusted_networks": ["10.0.0.0/8"],
                "trusted_roles": ["viewer"],
            },
        )

    async def test_a_trusted_network_names_its_tenant(self, sqlite_url, tmp_path):
        """From a trusted network the header makes the caller a service of that tenant."""
        app, _ = identity_app(**self.overrides(sqlite_url, tmp_path))
        tenant = str(uuid.uuid4())
        async with running(app, client=("10.1.2.3", 4000)) as client:
            me = await client.get("/me", headers={"x-tenant-id": tenant})
            read = await client.get("/read", headers={"x-tenant-id": tenant})
            manage = await client.get("/manage", headers={"x-tenant-id": tenant})

        assert 200 == me.status_code
        assert ("internal", "service", tenant, ["viewer"]) == (
            me.json()["subject"],
            me.json()["kind"],
            me.json()["tenant_id"],
            me.json()["roles"],
        )
        assert (200, 403) == (read.status_code, manage.status_code)

    async def test_the_header_means_nothing_from_elsewhere(self, sqlite_url, tmp_path):
        """From any other address the header is ignored: the caller stays anonymous."""
        app, _ = identity_app(**self.overrides(sqlite_url, tmp_path))
        async with running(app, client=("192.0.2.7", 4000)) as client:
            response = await client.get("/me", headers={"x-tenant-id": str(uuid.uuid4())})

        assert (401, 'Bearer realm="bastion"') == (
            response.status_code,
            response.headers["www-authenticate"],
        )

    async def test_a_header_that_is_no_tenant_id_is_refused(self, sqlite_url, tmp_path):
        """A trusted caller naming no tenant id gets a 401 where a caller is needed."""
        app, _ = identity_app(**self.overrides(sqlite_url, tmp_path))
        async with running(app, client=("10.1.2.3", 4000)) as client:
            response = await client.get("/me", headers={"x-tenant-id": "acme"})

        assert (401, "The tenant header does not name a tenant id.") == (
            response.status_code,
            response.json()["detail"],
        )

    async def test_a_token_wins_over_the_header(self, sqlite_url, tmp_path):
        """With a token and the header, the token's user is the caller."""
        app, runtime = identity_app(**self.overrides(sqlite_url, tmp_path))
        async with running(app, client=("10.1.2.3", 4000)) as client:
            token = identity_of(runtime).tokens.issue("u-1", "t-1", []).token
            headers = {**bearer(token), "x-tenant-id": str(uuid.uuid4())}
            response = await client.get("/me", headers=headers)

        assert ("u-1", "user") == (response.json()["subject"], response.json()["kind"])


class TestOidc:
    async def test_a_token_of_a_configured_issuer_binds_its_mapped_principal(
        self, sqlite_url, tmp_path
    ):
        """A token whose iss is a configured issuer is verified by it and mapped to a user."""
        tenant = str(uuid.uuid4())
        with LocalOidcIssuer() as issuer:
            overrides = identity_overrides(
                sqlite_url,
                tmp_path,
                identity={
                    "oidc": {
                        "corp": {
                            "issuer": issuer.url,
                            "audience": "api://docs",
                            "default_tenant": tenant,
                            "role_map": {"staff": "viewer"},
                        }
                    }
                },
            )
            app, _ = identity_app(**overrides)
            async with running(app) as client:
                token = issuer.mint("alice", audience="api://docs", roles=["staff", "x"])
                me = await client.get("/me", headers=bearer(token))
                read = await client.get("/read", headers=bearer(token))
                manage = await client.get("/manage", headers=bearer(token))
                wrong_audience = await client.get(
                    "/me", headers=bearer(issuer.mint("alice", audience="other"))
                )

        assert 200 == me.status_code, me.text
        assert ("corp:alice", "user", tenant, ["viewer"]) == (
            me.json()["subject"],
            me.json()["kind"],
            me.json()["tenant_id"],
            me.json()["roles"],
        )
        assert (200, 403, 401) == (
            read.status_code,
            manage.status_code,
            wrong_audience.status_code,
        )


def attempts(method: str, outcome: str) -> float:
    value = REGISTRY.get_sample_value(
        "bastion_auth_attempts_total", {"method": method, "outcome": outcome}
    )
    return value or 0.0


class TestMetrics:
    async def test_each_credential_is_counted_once_by_method_and_outcome(
        self, sqlite_url, tmp_path
    ):
        """bastion_auth_attempts_total counts every presented credential's outcome."""
        overrides = identity_overrides(
            sqlite_url,
            tmp_path,
            tenancy={"trusted_header": "X-Tenant-Id", "trusted_networks": ["127.0.0.0/8"]},
        )
        app, runtime = identity_app(**overrides)
        labels = [
            ("token", "success"),
            ("token", "expired"),
            ("token", "invalid"),
            ("api_key", "invalid"),
            ("trusted", "success"),
        ]
        before = [attempts(*label) for label in labels]
        async with running(app) as client:
            tokens = identity_of(runtime).tokens
            await client.get("/public", headers=bearer(tokens.issue("u", "t", []).token))
            await client.get("/public", headers=bearer(tokens.issue("u", "t", [], ttl=-120).token))
            await client.get("/public", headers=bearer("nonsense"))
            await client.get("/public", headers={"x-api-key": "bk_live_nonsense"})
            await client.get("/public", headers={"x-tenant-id": str(uuid.uuid4())})
            # Operational routes have access rules of their own: their tokens are not counted.
            await client.get("/health/live", headers=bearer("nonsense"))
        after = [attempts(*label) for label in labels]

        assert [1.0] * len(labels) == [b - a for a, b in zip(before, after, strict=True)]
