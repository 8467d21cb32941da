"""What install() wires between identity and the other components."""

from __future__ import annotations

import base64
import json

import pytest
from fastapi import APIRouter, Depends, FastAPI
from wiring_support import (
    bearer,
    identity_app,
    identity_of,
    identity_overrides,
    make_member,
    running,
)

import bastion
from bastion.errors import ConfigurationError
from bastion.identity import LoggingSender, generate_jwks, memberships, require, requires
from bastion.identity._events import (
    SecurityEvent,
    SecurityEventKind,
    on_security_event,
    remove_security_listener,
)


async def test_a_lockout_of_the_login_throttle_is_a_security_event():
    """The audit trail will record lockouts: install() forwards them as security events."""
    app = FastAPI()
    runtime = bastion.install(
        app,
        database={"enabled": False},
        ratelimit={"store_url": "memory://", "login": {"lockout_threshold": 2}},
    )
    assert runtime.ratelimit is not None
    seen: list[SecurityEvent] = []

    async def listener(event: SecurityEvent) -> None:
        seen.append(event)

    on_security_event(listener)
    try:
        login = runtime.ratelimit.login
        await login.record_failure("someone@example.org", "192.0.2.7")
        assert [] == seen
        await login.record_failure("someone@example.org", "192.0.2.7")
    finally:
        remove_security_listener(listener)
    (event,) = seen
    assert SecurityEventKind.LOCKOUT == event.kind
    assert "192.0.2.7" == event.ip
    # The identifier is personal data: the event carries its hash only.
    assert "someone@example.org" not in repr(event)


async def test_guarded_operations_list_401_and_403_in_openapi():
    """An operation behind a permission check documents 401 and 403; an open one does not."""
    app = FastAPI()
    bastion.install(app, database={"enabled": False})

    @app.get("/open")
    async def open_route() -> dict:
        return {}

    @app.get("/docs-list", dependencies=[Depends(require("documents:read"))])
    async def listed() -> dict:
        return {}

    @app.post("/docs-write")
    @requires("documents:write")
    async def written() -> dict:
        return {}

    paths = app.openapi()["paths"]
    for path, method in (("/docs-list", "get"), ("/docs-write", "post")):
        responses = paths[path][method]["responses"]
        assert {"401", "403"} <= set(responses), path
        assert ["UNAUTHENTICATED"] == responses["401"]["x-error-codes"]
        assert ["FORBIDDEN"] == responses["403"]["x-error-codes"]
    assert not {"401", "403"} & set(paths["/open"]["get"]["responses"])


class TestWhatInstallBuilds:
    async def test_identity_is_on_the_runtime_with_the_settings_parts(self, sqlite_url, tmp_path):
        """install() builds Identity from the settings: roles, keys, mail, quotas on the limiter."""
        _, runtime = identity_app(**identity_overrides(sqlite_url, tmp_path))
        identity = identity_of(runtime)

        assert runtime.database is identity.database
        assert {"owner", "admin", "member", "viewer"} == identity.roles.names
        assert "members:owners" in identity.roles.permissions_for(["owner"])
        assert "tenant:read" in identity.roles.permissions_for(["viewer"])
        assert isinstance(identity.mail, LoggingSender)
        assert runtime.ratelimit is not None
        assert runtime.ratelimit.login is identity.login
        assert identity.tenant_quotas is not None
        # Without Redis there is no deny list: access tokens then live until they expire.
        assert None is identity.deny_list
        assert None is identity.tokens.deny_list
        await identity.database.aclose()

    async def test_no_database_means_no_identity_and_one_line_why(self, capsys):
        """Identity configured without a database: runtime.identity is None, the log says why."""
        app = FastAPI()
        runtime = bastion.install(
            app, database={"enabled": False}, identity={"routes": True}, logging={"format": "json"}
        )

        assert None is runtime.identity
        lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
        assert ["identity off: it needs the database (database.enabled is off)"] == [
            line["event"] for line in lines if "identity" in line["event"]
        ]

    def test_identity_disabled_builds_nothing(self, sqlite_url, tmp_path):
        """identity.enabled off: no Identity, no identity routes, no generated secrets."""
        app = FastAPI()
        overrides = identity_overrides(sqlite_url, tmp_path)
        overrides["identity"] = {"enabled": False}
        # The audit trail would generate its own key there; it is not this test's subject.
        overrides["audit"] = {"enabled": False}
        runtime = bastion.install(app, **overrides)

        assert None is runtime.identity
        assert not [route for route in app.routes if "jwks" in getattr(route, "path", "")]
        assert not (tmp_path / "dev-secrets").exists()

    async def test_routes_mount_under_the_prefix_with_the_jwks(self, sqlite_url, tmp_path):
        """The auth, tenants and API-key routes live under route_prefix; the JWKS at the root."""
        overrides = identity_overrides(sqlite_url, tmp_path, identity={"route_prefix": "/api"})
        app, runtime = identity_app(**overrides)
        async with running(app) as client:
            jwks = await client.get("/.well-known/jwks.json")
        paths = set(app.openapi()["paths"])

        assert identity_of(runtime).keys.public_jwks() == jwks.json()
        assert "/api/auth/login" in paths
        assert any(path.startswith("/api/tenants") for path in paths)
        assert any(path.startswith("/api/api-keys") for path in paths)
        assert not any(path.startswith("/v1/") for path in paths)

    def test_routes_off_mounts_none(self, sqlite_url, tmp_path):
        """identity.routes off: identity works, its routes and the JWKS are not mounted."""
        overrides = identity_overrides(sqlite_url, tmp_path, identity={"routes": False})
        app, runtime = identity_app(**overrides)

        assert runtime.identity is not None
        assert not [path for path in app.openapi()["paths"] if "/auth/" in path]
        assert not [route for route in app.routes if "jwks" in getattr(route, "path", "")]

    def test_the_operator_usage_route_is_an_admin_route(self, sqlite_url, tmp_path):
        """GET /admin/tenants/usage is mounted beside the other operator routes."""
        app, _ = identity_app(**identity_overrides(sqlite_url, tmp_path))

        assert "/admin/tenants/usage" in {getattr(route, "path", "") for route in app.routes}


class TestSecretsAtStartUp:
    def test_production_refuses_weak_secrets_one_line_each(self, sqlite_url, tmp_path):
        """In production install() stops on unfit secrets: one line per problem, no value."""
        app = FastAPI()
        k = base64.urlsafe_b64encode(b"0123456789abcdef").rstrip(b"=").decode()
        weak_hs256 = json.dumps({"keys": [{"kty": "oct", "kid": "hs", "alg": "HS256", "k": k}]})
        with pytest.raises(ConfigurationError) as caught:
            bastion.install(
                app,
                environment="production",
                database={"url": sqlite_url},
                identity={
                    "passwords": {"pepper": "changeme"},
                    "tokens": {"signing_keys": weak_hs256},
                },
                audit={"enabled": False},
                logging={"enabled": False},
            )
        lines = str(caught.value).splitlines()[1:]

        assert [
            "- BASTION_IDENTITY__PASSWORDS__PEPPER",
            "- BASTION_IDENTITY__TOKENS__SIGNING_KEYS",
            "- BASTION_IDENTITY__API_KEYS__SECRET",
        ] == [" ".join(line.split()[:2]) for line in lines]
        assert "changeme" not in str(caught.value).replace("placeholder", "")
        assert k not in str(caught.value)
        assert None is getattr(app.state, "bastion", None)

    def test_development_generates_the_pepper_and_api_key_secret(self, sqlite_url, tmp_path):
        """In development the missing pepper and API-key secret are generated and kept."""
        overrides = identity_overrides(sqlite_url, tmp_path)
        overrides["identity"]["api_keys"] = {}
        _, first = identity_app(**overrides)
        _, second = identity_app(**overrides)

        settings = identity_of(first).settings.identity
        assert settings.passwords.pepper is not None
        assert settings.api_keys.secret is not None
        # Kept on disk: every worker and restart hash with the same secrets.
        assert settings.api_keys.secret == identity_of(second).settings.identity.api_keys.secret


class TestOpenApi:
    def test_security_schemes_and_operations_that_need_a_caller(self, sqlite_url, tmp_path):
        """The document declares both credentials; operations needing a caller name them."""
        app, _ = identity_app(**identity_overrides(sqlite_url, tmp_path))
        document = app.openapi()
        schemes = document["components"]["securitySchemes"]
        paths = document["paths"]

        assert ("http", "bearer", "JWT") == (
            schemes["accessToken"]["type"],
            schemes["accessToken"]["scheme"],
            schemes["accessToken"]["bearerFormat"],
        )
        assert ("apiKey", "header", "X-API-Key") == (
            schemes["apiKey"]["type"],
            schemes["apiKey"]["in"],
            schemes["apiKey"]["name"],
        )
        expected = [{"accessToken": []}, {"apiKey": []}]
        for path in ("/me", "/tenant", "/read"):
            operation = paths[path]["get"]
            assert expected == operation["security"], path
            assert "401" in operation["responses"], path
        assert "403" in paths["/read"]["get"]["responses"]
        assert "403" not in paths["/me"]["get"]["responses"]
        assert "security" not in paths["/public"]["get"]
        assert "401" not in paths["/public"]["get"]["responses"]

    def test_included_routers_are_documented_as_guarded(self, sqlite_url, tmp_path):
        """A permission check inside an included router still lists 401/403 and security."""
        app, _ = identity_app(**identity_overrides(sqlite_url, tmp_path))
        inner = APIRouter(prefix="/inner")

        @inner.get("/guarded", dependencies=[Depends(require("tenant:update"))])
        async def guarded() -> dict:
            return {}

        outer = APIRouter(prefix="/outer")
        outer.include_router(inner)
        app.include_router(outer)
        operation = app.openapi()["paths"]["/outer/inner/guarded"]["get"]

        assert {"401", "403"} <= set(operation["responses"])
        assert "security" in operation


class TestHealth:
    @pytest.mark.redis
    async def test_identity_dependencies_are_readiness_checks(
        self, sqlite_url, redis_url, redis_prefix, tmp_path
    ):
        """The deny list and permission cache are checked; neither is critical by default."""
        overrides = identity_overrides(sqlite_url, tmp_path, redis=(redis_url, redis_prefix))
        app, _ = identity_app(**overrides)
        async with running(app) as client:
            checks = (await client.get("/health/ready")).json()["checks"]

        assert ("ok", False) == (
            checks["identity_deny_list"]["status"],
            checks["identity_deny_list"]["critical"],
        )
        assert ("ok", False) == (
            checks["identity_permission_cache"]["status"],
            checks["identity_permission_cache"]["critical"],
        )

    @pytest.mark.redis
    def test_a_deny_list_that_fails_closed_is_critical(
        self, sqlite_url, redis_url, redis_prefix, tmp_path
    ):
        """With fail_open off, an unreachable deny list makes the instance unready."""
        overrides = identity_overrides(
            sqlite_url,
            tmp_path,
            redis=(redis_url, redis_prefix),
            identity={"deny_list": {"fail_open": False}},
        )
        _, runtime = identity_app(**overrides)

        [check] = [c for c in runtime.health.checks if c.name == "identity_deny_list"]
        assert check.critical


@pytest.mark.redis
@pytest.mark.postgres
class TestPermissionCacheAcrossInstances:
    async def test_a_role_change_on_one_instance_is_seen_by_the_next_request_on_another(
        self, postgres_url, redis_url, redis_prefix, tmp_path
    ):
        """Role changed and invalidated on A: B's very next request has the new permissions."""
        shared = {"jwks": generate_jwks("EdDSA"), "redis": (redis_url, redis_prefix)}
        a, runtime_a = identity_app(**identity_overrides(postgres_url, tmp_path / "a", **shared))
        b, _ = identity_app(**identity_overrides(postgres_url, tmp_path / "b", **shared))
        async with running(a), running(b) as client_b:
            identity_a = identity_of(runtime_a)
            member = await make_member(identity_a, "viewer")
            token = identity_a.tokens.issue(
                str(member.user_id), str(member.tenant_id), ["viewer"]
            ).token
            # Twice: the second answer comes from B's warm cache.
            before = [(await client_b.get("/manage", headers=bearer(token))).status_code] * 2
            async with identity_a.database.session() as session:
                await session.execute(
                    memberships.update()
                    .where(
                        memberships.c.user_id == member.user_id,
                        memberships.c.tenant_id == member.tenant_id,
                    )
                    .values(role="admin")
                )
            await identity_a.permissions.invalidate_user(str(member.user_id), str(member.tenant_id))
            after = await client_b.get("/manage", headers=bearer(token))

        assert ([403, 403], 200) == (before, after.status_code)


class TestTwoAppsInOneProcess:
    async def test_each_request_is_checked_by_its_own_apps_authorizer(self, tmp_path):
        """Two apps, two databases: A's member passes A's check, though B started last."""
        a, runtime_a = identity_app(
            **identity_overrides(f"sqlite+aiosqlite:///{tmp_path / 'a.db'}", tmp_path / "a")
        )
        b, _ = identity_app(
            **identity_overrides(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}", tmp_path / "b")
        )
        async with running(a) as client_a, running(b):
            identity_a = identity_of(runtime_a)
            member = await make_member(identity_a, "admin")
            token = identity_a.tokens.issue(
                str(member.user_id), str(member.tenant_id), ["admin"]
            ).token
            response = await client_a.get("/manage", headers=bearer(token))

        assert 200 == response.status_code
