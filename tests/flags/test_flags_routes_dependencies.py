"""FastAPI dependencies: the request's evaluation context, ``CurrentFlags``, dark routes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import secrets

import pytest
from fastapi import Depends, FastAPI

import bastion
from bastion.errors import InvalidInput
from bastion.flags._dependencies import (
    CurrentFlags,
    FlagContext,
    add_context_builder,
    context_from_mapping,
    feature_required,
)
from bastion.testing import create_member, lifespan_client

TOKEN = secrets.token_urlsafe(32)
OPERATOR = {"authorization": f"Bearer {TOKEN}"}
FAST_PASSWORDS = {"time_cost": 1, "memory_cost": 8}


def make_app(database_url: str, **flags) -> FastAPI:
    app = FastAPI()
    bastion.install(
        app,
        database={"url": database_url},
        migrations={"mode": "auto"},
        logging={"level": "WARNING", "format": "json"},
        http={"admin_token": TOKEN},
        identity={"passwords": FAST_PASSWORDS},
        audit={"mode": "sync", "checkpoint_interval": 0},
        flags={"store_url": "memory://", **flags},
    )

    @app.get("/context")
    async def context(context: FlagContext) -> dict:
        fields = dataclasses.asdict(context)
        fields.pop("_flat", None)
        fields["roles"] = list(context.roles)
        return fields

    @app.get("/beta", dependencies=[Depends(feature_required("beta"))])
    async def dark() -> dict:
        return {"beta": True}

    @app.get("/check")
    async def check(flags: CurrentFlags, context: FlagContext) -> dict:
        return {"beta": flags.is_enabled("beta", context), "revision": flags.revision}

    return app


async def member(app, role: str):
    slug = secrets.token_hex(4)
    return await create_member(app, tenant_slug=f"t-{slug}", email=f"{slug}@example.org", role=role)


class TestFlagContext:
    async def test_principal_tenant_roles_and_address(self, sqlite_url):
        """A member's request gives its user id, session, tenant, roles and the client address."""
        app = make_app(sqlite_url, app_name="docs")
        async with lifespan_client(app) as client:
            admin = await member(app, "admin")
            body = (await client.get("/context", headers=admin.headers)).json()
        assert (str(admin.user_id), str(admin.tenant_id)) == (body["user_id"], body["tenant_id"])
        assert ["admin"] == body["roles"]
        assert ("127.0.0.1", "development", "docs") == (
            body["ip"],
            body["environment"],
            body["app_name"],
        )

    async def test_anonymous_caller(self, sqlite_url):
        """Without credentials the context has no user, tenant or roles, but an address."""
        app = make_app(sqlite_url, environment="staging")
        async with lifespan_client(app) as client:
            body = (await client.get("/context")).json()
        assert (None, None, [], "127.0.0.1") == (
            body["user_id"],
            body["tenant_id"],
            body["roles"],
            body["ip"],
        )
        assert "staging" == body["environment"]


class TestFeatureRequired:
    async def test_dark_route_is_404_until_on_for_the_caller(self, sqlite_url):
        """The route is 404 for callers the flag is off for, 200 for those it is on for."""
        app = make_app(sqlite_url)
        async with lifespan_client(app) as client:
            admin = await member(app, "admin")
            viewer = await member(app, "viewer")
            missing = await client.get("/beta", headers=admin.headers)
            flag = {
                "key": "beta",
                "enabled": True,
                "rules": [
                    {"constraints": [{"context": "roles", "operator": "IN", "values": ["admin"]}]}
                ],
            }
            created = await client.post("/admin/features", json=flag, headers=OPERATOR)
            assert 201 == created.status_code, created.text
            as_admin = await client.get("/beta", headers=admin.headers)
            as_viewer = await client.get("/beta", headers=viewer.headers)
            checked = (await client.get("/check", headers=admin.headers)).json()
            await client.post(
                "/admin/features/beta/toggle",
                json={"enabled": False},
                headers={**OPERATOR, "if-match": created.headers["etag"]},
            )
            switched_off = await client.get("/beta", headers=admin.headers)
        assert (404, "NOT_FOUND") == (missing.status_code, missing.json()["code"])
        assert 200 == as_admin.status_code
        assert 404 == as_viewer.status_code
        assert True is checked["beta"]
        assert checked["revision"] > 0
        assert 404 == switched_off.status_code


class TestContextBuilders:
    async def test_builders_add_attributes_everywhere_the_context_is_built(self, sqlite_url):
        """An app's builders (sync and async) reach FlagContext, dark routes and /api/features."""
        app = make_app(sqlite_url)
        emails = {}

        def plan(connection, context):
            context.properties["plan"] = connection.headers.get("x-plan", "free")

        async def email(connection, context):
            context.email = emails.get(context.user_id)
            context.app_version = connection.headers.get("x-app-version")

        add_context_builder(app, plan)
        add_context_builder(app, email)
        async with lifespan_client(app) as client:
            admin = await member(app, "admin")
            emails[str(admin.user_id)] = "ada@staff.example.org"
            body = (await client.get("/context", headers={**admin.headers, "x-plan": "pro"})).json()
            staff_only = {
                "context": "emailDomain",
                "operator": "IN",
                "values": ["staff.example.org"],
            }
            for key in ("beta", "client-beta"):
                flag = {
                    "key": key,
                    "enabled": True,
                    "client_visible": True,
                    "rules": [{"constraints": [staff_only]}],
                }
                created = await client.post("/admin/features", json=flag, headers=OPERATOR)
                assert 201 == created.status_code, created.text
            dark = await client.get("/beta", headers=admin.headers)
            anonymous_dark = await client.get("/beta")
            features = (await client.get("/api/features", headers=admin.headers)).json()["flags"]
            newer = {"context": "appVersion", "operator": "SEMVER_GTE", "value": "9.0.0"}
            flag = {"key": "v9", "enabled": True, "client_visible": True}
            flag["rules"] = [{"constraints": [newer]}]
            assert (
                201
                == (await client.post("/admin/features", json=flag, headers=OPERATOR)).status_code
            )
            # The app's version wins over the one the query claims; a bad claim is still 422.
            pinned = await client.get(
                "/api/features", params={"appVersion": "1.0.0"}, headers={"x-app-version": "9.0.0"}
            )
            bad = await client.get(
                "/api/features",
                params={"appVersion": "nonsense!"},
                headers={"x-app-version": "9.0.0"},
            )

        assert ("ada@staff.example.org", {"plan": "pro"}) == (body["email"], body["properties"])
        assert (200, 404) == (dark.status_code, anonymous_dark.status_code)
        assert features["client-beta"]["enabled"] is True
        assert pinned.json()["flags"]["v9"]["enabled"] is True
        assert 422 == bad.status_code

    async def test_principal_carries_no_email(self, sqlite_url):
        """Without a builder, no e-mail is set: bastion's credentials carry none."""
        app = make_app(sqlite_url)
        async with lifespan_client(app) as client:
            admin = await member(app, "admin")
            body = (await client.get("/context", headers=admin.headers)).json()
        assert (str(admin.user_id), None) == (body["user_id"], body["email"])


class TestContextFromMapping:
    def test_canonical_snake_case_and_unleash_names(self):
        """Canonical, snake_case and Unleash ``properties`` names land in the right places."""
        context = context_from_mapping(
            {
                "user_id": "u-1",
                "tenantId": "t-1",
                "ip": "10.0.0.1",
                "roles": ["admin"],
                "appVersion": "2.1.0",
                "properties": {"plan": "pro"},
                "region": "eu",
            }
        )
        assert ("u-1", "t-1", "10.0.0.1", ("admin",), "2.1.0") == (
            context.user_id,
            context.tenant_id,
            context.ip,
            tuple(context.roles),
            context.app_version,
        )
        assert {"plan": "pro", "region": "eu"} == dict(context.properties)

    def test_current_time_is_utc(self):
        """An ISO time without a zone is UTC; one with a zone is converted."""
        naive = context_from_mapping({"currentTime": "2026-01-02T03:04:05"})
        zoned = context_from_mapping({"current_time": "2026-01-02T04:04:05+01:00"})
        expected = dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.UTC)
        assert (expected, expected) == (naive.current_time, zoned.current_time)

    def test_numbers_are_ids(self):
        """A numeric user id is read as its text."""
        assert "42" == context_from_mapping({"userId": 42}).user_id

    @pytest.mark.parametrize(
        ("name", "value"),
        [("roles", 5), ("userId", True), ("currentTime", "yesterday"), ("properties", [1])],
    )
    def test_wrong_kinds_are_field_errors(self, name, value):
        """A value of the wrong kind is a 422 naming the field."""
        with pytest.raises(InvalidInput) as caught:
            context_from_mapping({name: value}, field="body.context")
        assert [f"body.context.{name}"] == [error.field for error in caught.value.errors]
