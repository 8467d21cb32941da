"""Roles, permission checks, the FastAPI dependency and decorator, and the principal."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import httpx
import pytest
import redis.asyncio as redis_asyncio
from fastapi import Depends, FastAPI

import bastion
from bastion.context import RequestContext, bind, unbind
from bastion.errors import ConfigurationError, Forbidden, Unauthenticated
from bastion.identity._permission_cache import PermissionCache
from bastion.identity._principal import (
    Principal,
    bind_principal,
    current_principal,
    unbind_principal,
)
from bastion.identity._rbac import (
    Authorizer,
    Roles,
    bind_prefetched_permissions,
    current_authorizer,
    grants,
    protected_operations,
    require,
    requires,
    unbind_prefetched_permissions,
    use_authorizer,
)

ROLES = Roles(
    {
        "viewer": {"documents:read"},
        "member": {"documents:write"},
        "admin": {"members:*"},
        "owner": {"tenant:delete"},
    },
    inherits={"member": ["viewer"], "admin": ["member"], "owner": ["admin"]},
)


@pytest.fixture(autouse=True)
def _authorizer() -> Iterator[None]:
    use_authorizer(Authorizer(ROLES))
    yield
    use_authorizer(None)


class TestGrants:
    @pytest.mark.parametrize(
        ("granted", "permission", "expected"),
        [
            ({"documents:read"}, "documents:read", True),
            ({"documents:read"}, "documents:write", False),
            ({"documents:*"}, "documents:write", True),
            ({"documents:*"}, "documentsx:write", False),
            ({"a:*"}, "a:b:c", True),
            ({"a:b:*"}, "a:b:c", True),
            ({"a:b:*"}, "a:c", False),
            ({"*"}, "anything:at:all", True),
            (set(), "documents:read", False),
        ],
    )
    def test_wildcards(self, granted, permission, expected):
        """Exact grants, trailing `:*` wildcards per segment and `*` for everything."""
        assert expected == grants(frozenset(granted), permission)


class TestRoles:
    def test_inheritance_is_transitive(self):
        """An owner holds what admins, members and viewers hold."""
        assert {"documents:read", "documents:write", "members:*", "tenant:delete"} == set(
            ROLES.permissions_for(["owner"])
        )

    def test_union_and_unknown_roles(self):
        """Several roles add up; an unknown role grants nothing."""
        assert frozenset({"documents:read"}) == ROLES.permissions_for(["viewer", "ghost"])
        assert frozenset() == ROLES.permissions_for([])

    def test_cycle_is_refused(self):
        """Roles that inherit in a cycle stop start-up with the cycle named."""
        with pytest.raises(ConfigurationError, match="cycle"):
            Roles({"a": set(), "b": set()}, inherits={"a": ["b"], "b": ["a"]})

    def test_undefined_parent_is_refused(self):
        """Inheriting from an undefined role is a configuration error."""
        with pytest.raises(ConfigurationError, match="ghost"):
            Roles({"a": set()}, inherits={"a": ["ghost"]})

    def test_empty_permission_is_refused(self):
        """An empty permission string is a configuration error."""
        with pytest.raises(ConfigurationError, match="empty"):
            Roles({"a": {""}})

    def test_as_mapping_and_names(self):
        """as_mapping gives effective permissions, usable as a roles loader's answer."""
        assert {"viewer", "member", "admin", "owner"} == ROLES.names
        assert frozenset({"documents:read"}) == ROLES.as_mapping()["viewer"]

    async def test_loader_from_assignments(self):
        """Roles.loader turns a role-assignment lookup into a permissions loader."""

        async def assignments(user_id: str, tenant_id: str) -> list[str]:
            return ["member"] if (user_id, tenant_id) == ("u1", "t1") else []

        load = ROLES.loader(assignments)
        assert frozenset({"documents:read", "documents:write"}) == await load("u1", "t1")
        assert frozenset() == await load("u1", "t2")


class TestAuthorizer:
    async def test_user_permissions_come_from_the_cache(self):
        """A user's token roles are ignored when a cache is configured: assignments rule."""

        async def load(user_id: str, tenant_id: str) -> set[str]:
            return {"documents:read"}

        authorizer = Authorizer(ROLES, PermissionCache(load))
        user = Principal("u1", tenant_id="t1", roles=frozenset({"owner"}))
        assert frozenset({"documents:read"}) == await authorizer.permissions(user)
        with pytest.raises(Forbidden):
            await authorizer.check(user, "tenant:delete")

    async def test_user_without_tenant_holds_nothing(self):
        """With a cache, a user acting for no tenant holds no permission."""

        async def load(user_id: str, tenant_id: str) -> set[str]:
            raise AssertionError("not called")

        authorizer = Authorizer(ROLES, PermissionCache(load))
        assert frozenset() == await authorizer.permissions(Principal("u1"))

    async def test_external_user_holds_its_mapped_roles(self):
        """A user an OIDC issuer vouched for has no membership: its roles count, not the cache."""

        async def load(user_id: str, tenant_id: str) -> set[str]:
            raise AssertionError("not called")

        authorizer = Authorizer(ROLES, PermissionCache(load))
        user = Principal(
            "corp:u1", tenant_id="t1", roles=frozenset({"viewer"}), issuer="https://idp.example"
        )
        assert user == await authorizer.check(user, "documents:read")
        with pytest.raises(Forbidden):
            await authorizer.check(user, "tenant:delete")

    async def test_prefetched_permissions_of_the_same_principal_are_used(self):
        """The middleware's prefetched lookup answers this principal's check; no second lookup."""

        async def load(user_id: str, tenant_id: str) -> set[str]:
            raise AssertionError("not called")

        authorizer = Authorizer(ROLES, PermissionCache(load))
        user = Principal("u1", tenant_id="t1")
        other = Principal("u1", tenant_id="t1")
        prefetched = asyncio.get_running_loop().create_future()
        prefetched.set_result(frozenset({"documents:read"}))
        token = bind_prefetched_permissions(user, prefetched)
        try:
            assert user == await authorizer.check(user, "documents:read")
            # Another principal object (equal, not the same) does not take it.
            with pytest.raises(AssertionError, match="not called"):
                await authorizer.permissions(other)
        finally:
            unbind_prefetched_permissions(token)

    async def test_api_key_holds_its_scopes(self):
        """An API key's permissions are its scopes, whatever roles it names."""
        key = Principal(
            "k1", kind="api_key", tenant_id="t1", roles=frozenset({"owner"}), scopes=frozenset()
        )
        with pytest.raises(Forbidden):
            await Authorizer(ROLES).check(key, "documents:read")
        scoped = Principal("k1", kind="api_key", scopes=frozenset({"documents:*"}))
        assert scoped == await Authorizer(ROLES).check(scoped, "documents:write")

    async def test_service_holds_its_roles(self):
        """A trusted service's permissions are those of its roles."""
        service = Principal("billing", kind="service", roles=frozenset({"viewer"}))
        assert service == await Authorizer(ROLES).check(service, "documents:read")

    async def test_no_principal_is_unauthenticated(self):
        """Without a principal the check raises Unauthenticated."""
        with pytest.raises(Unauthenticated):
            await Authorizer(ROLES).check(None, "documents:read")

    async def test_sensitive_permission_is_not_named(self):
        """By default the Forbidden detail does not name the permission."""
        with pytest.raises(Forbidden) as caught:
            await Authorizer(ROLES).check(Principal("s", kind="service"), "secret:thing")
        assert "secret:thing" not in caught.value.detail
        assert {} == caught.value.extra

    def test_no_authorizer_is_a_configuration_error(self):
        """Checking with no authorizer installed fails loudly, never lets through."""
        use_authorizer(None)
        with pytest.raises(ConfigurationError):
            current_authorizer()

    def test_wildcard_requirement_is_refused(self):
        """A requirement is one permission, never a wildcard."""
        with pytest.raises(ValueError, match="wildcard"):
            require("documents:*")

    def test_requires_needs_a_coroutine_function(self):
        """@requires refuses a plain function."""
        with pytest.raises(TypeError):
            requires("documents:read")(lambda: None)  # type: ignore[arg-type]


class TestPrincipal:
    def test_binding_fills_the_request_context(self):
        """bind_principal copies tenant and user (or API key) ids into the request context."""
        context = RequestContext(request_id="r1")
        token = bind(context)
        try:
            inner = bind_principal(Principal("u1", tenant_id="t1"))
            assert ("t1", "u1") == (context.tenant_id, context.user_id)
            assert "u1" == current_principal().user_id
            unbind_principal(inner)
            inner = bind_principal(Principal("k1", kind="api_key", tenant_id="t2"))
            assert ("t2", "k1") == (context.tenant_id, context.api_key_id)
            assert current_principal().user_id is None
            unbind_principal(inner)
        finally:
            unbind(token)
        assert current_principal() is None


class FakeIdentity:
    """Binds a principal from an ``x-test-user`` header (user:tenant:role), as identity will."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        principal = None
        for name, value in scope.get("headers", ()):
            if name == b"x-test-user":
                user, tenant, role = value.decode().split(":")
                principal = Principal(user, tenant_id=tenant, roles=frozenset({role}))
        token = bind_principal(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            unbind_principal(token)


def make_app() -> FastAPI:
    app = FastAPI()

    @app.get("/documents")
    async def list_documents(
        principal: Annotated[Principal, Depends(require("documents:read", sensitive=False))],
    ) -> dict[str, str]:
        return {"user": principal.subject}

    @app.delete("/tenant", dependencies=[Depends(require("tenant:delete"))])
    async def delete_tenant() -> dict[str, bool]:
        return {"deleted": True}

    @app.post("/documents")
    @requires("documents:write", sensitive=False)
    async def create_document() -> dict[str, bool]:
        return {"created": True}

    @app.get("/open")
    async def open_route() -> dict[str, bool]:
        return {"open": True}

    bastion.install(
        app, database={"enabled": False}, logging={"level": "WARNING", "format": "json"}
    )
    return app


@asynccontextmanager
async def started(app: Any) -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=FakeIdentity(app))
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        app.router.lifespan_context(app),
    ):
        yield client


def problem_of(response: httpx.Response) -> dict[str, Any]:
    assert "application/problem+json" == response.headers["content-type"]
    body: dict[str, Any] = response.json()
    assert {"type", "title", "status", "detail", "code", "correlation_id"} <= body.keys()
    assert response.headers["x-request-id"] == body["correlation_id"]
    return body


class TestFastAPI:
    async def test_dependency_lets_a_holder_through(self):
        """A viewer reads documents; the dependency answers the principal."""
        async with started(make_app()) as client:
            response = await client.get("/documents", headers={"x-test-user": "u1:t1:viewer"})
        assert 200 == response.status_code
        assert {"user": "u1"} == response.json()

    async def test_anonymous_gets_401(self):
        """Without a principal: 401 UNAUTHENTICATED in the problem envelope."""
        async with started(make_app()) as client:
            response = await client.get("/documents")
        assert 401 == response.status_code
        assert "UNAUTHENTICATED" == problem_of(response)["code"]

    async def test_non_sensitive_403_names_the_permission(self):
        """A 403 for a permission declared non-sensitive names it."""
        async with started(make_app()) as client:
            response = await client.post("/documents", headers={"x-test-user": "u1:t1:viewer"})
        assert 403 == response.status_code
        body = problem_of(response)
        assert "FORBIDDEN" == body["code"]
        assert "documents:write" == body["permission"]
        assert "documents:write" in body["detail"]

    async def test_sensitive_403_names_nothing(self):
        """A 403 for a sensitive permission (the default) does not name it."""
        async with started(make_app()) as client:
            response = await client.delete("/tenant", headers={"x-test-user": "u1:t1:admin"})
        assert 403 == response.status_code
        body = problem_of(response)
        assert "FORBIDDEN" == body["code"]
        assert "permission" not in body
        assert "tenant:delete" not in response.text

    async def test_decorator_lets_a_holder_through(self):
        """@requires runs the endpoint for a holder, and the owner may delete the tenant."""
        async with started(make_app()) as client:
            created = await client.post("/documents", headers={"x-test-user": "u1:t1:member"})
            deleted = await client.delete("/tenant", headers={"x-test-user": "u1:t1:owner"})
            anonymous = await client.post("/documents")
        assert (200, 200, 401) == (
            created.status_code,
            deleted.status_code,
            anonymous.status_code,
        )

    async def test_checks_go_through_the_cache(self, redis_url, redis_prefix):
        """With a cache, a role change applies on the next request, not at token expiry."""
        assigned = {("u1", "t1"): ["viewer"]}

        async def assignments(user_id: str, tenant_id: str) -> list[str]:
            return assigned.get((user_id, tenant_id), [])

        client_a = redis_asyncio.from_url(redis_url)
        client_b = redis_asyncio.from_url(redis_url)
        instance_a = PermissionCache(
            ROLES.loader(assignments), redis=client_a, key_prefix=redis_prefix
        )
        instance_b = PermissionCache(
            ROLES.loader(assignments), redis=client_b, key_prefix=redis_prefix
        )
        use_authorizer(Authorizer(ROLES, instance_b))
        try:
            async with started(make_app()) as client:
                headers = {"x-test-user": "u1:t1:owner"}  # the token's claim is ignored
                assert 403 == (await client.post("/documents", headers=headers)).status_code
                assigned[("u1", "t1")] = ["member"]
                await instance_a.invalidate_user("u1", "t1")
                assert 200 == (await client.post("/documents", headers=headers)).status_code
        finally:
            await client_a.aclose()
            await client_b.aclose()

    def test_openapi_lists_401_and_403_for_protected_operations(self):
        """protected_operations finds dependency- and decorator-guarded routes, not open ones."""
        app = make_app()
        assert {("GET", "/documents"), ("DELETE", "/tenant"), ("POST", "/documents")} == (
            protected_operations(app.router.routes)
        )


class TestCost:
    async def test_a_check_on_a_hit_is_cheap(self):
        """A permission check on a local hit stays in the microseconds (figure in the docs)."""

        async def load(user_id: str, tenant_id: str) -> set[str]:
            return {"documents:read"}

        authorizer = Authorizer(ROLES, PermissionCache(load))
        user = Principal("u1", tenant_id="t1")
        await authorizer.check(user, "documents:read")
        n = 2000
        start = time.perf_counter()
        for _ in range(n):
            await authorizer.check(user, "documents:read")
        per_check = (time.perf_counter() - start) / n
        # Generous: the figure is ~2 µs; a shared CI machine must not flake.
        assert per_check < 200e-6
