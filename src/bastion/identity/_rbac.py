"""Roles and permissions: definitions, checks, and the FastAPI dependency and decorator.

A permission is a string, ``resource:action`` by convention (``documents:read``).
A grant may end in ``*``: ``documents:*`` covers every action on documents and
``*`` covers everything. Roles map names to permission sets and may inherit
other roles; applications define their own :class:`Roles`.

A check answers ``401 UNAUTHENTICATED`` when the request has no principal and
``403 FORBIDDEN`` when the principal lacks the permission. The 403 names the
missing permission only when it is declared non-sensitive
(``require("documents:read", sensitive=False)``): by default a caller learns
nothing about what exists or what it would need.

Where permissions come from depends on the principal's kind: a user's come
from the permission cache (loaded from role assignments, so a role change
applies at once, not when the token expires), an API key's are its scopes,
and a trusted service's are those of the roles it carries.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Final, ParamSpec, TypeVar

from bastion._routes import depends_on, flattened_routes
from bastion.errors import ConfigurationError, Forbidden
from bastion.identity._permission_cache import PermissionCache
from bastion.identity._principal import Principal, authenticated, current_principal

__all__ = [
    "Authorizer",
    "Roles",
    "authenticated_operations",
    "bind_prefetched_permissions",
    "bind_request_authorizer",
    "current_authorizer",
    "grants",
    "protected_operations",
    "require",
    "requires",
    "unbind_prefetched_permissions",
    "unbind_request_authorizer",
    "use_authorizer",
]

P = ParamSpec("P")
R = TypeVar("R")

REQUIREMENT_ATTRIBUTE: Final = "__bastion_permission__"
"""Set on what :func:`require` and :func:`requires` return, so OpenAPI can list 401/403."""


def grants(granted: frozenset[str], permission: str) -> bool:
    """Return whether the set ``granted`` covers ``permission`` (wildcards included)."""
    if permission in granted:
        return True
    # Wildcards are the rare case: walk the prefixes only after the exact test.
    if "*" in granted:
        return True
    position = permission.rfind(":")
    while position > 0:
        if permission[: position + 1] + "*" in granted:
            return True
        position = permission.rfind(":", 0, position)
    return False


class Roles:
    """An application's roles: name to permissions, with inheritance.

    Example:
        >>> roles = Roles(
        ...     {
        ...         "viewer": {"documents:read"},
        ...         "member": {"documents:write"},
        ...         "admin": {"members:manage"},
        ...         "owner": {"tenant:delete"},
        ...     },
        ...     inherits={"member": ["viewer"], "admin": ["member"], "owner": ["admin"]},
        ... )
        >>> "documents:read" in roles.permissions_for(["admin"])
        True

    Args:
        definitions: each role's own permissions.
        inherits: each role's parents; a role has its parents' permissions too.

    Raises:
        ConfigurationError: a parent is not defined, a role inherits itself
            (directly or not), or a permission is empty.
    """

    __slots__ = ("_effective",)

    def __init__(
        self,
        definitions: Mapping[str, Iterable[str]],
        *,
        inherits: Mapping[str, Iterable[str]] | None = None,
    ) -> None:
        own = {role: frozenset(perms) for role, perms in definitions.items()}
        for role, perms in own.items():
            if any(not perm or not isinstance(perm, str) for perm in perms):
                raise ConfigurationError(f"role {role!r} has an empty or non-string permission")
        parents = {role: tuple(names) for role, names in (inherits or {}).items()}
        for role, names in parents.items():
            for name in (role, *names):
                if name not in own:
                    raise ConfigurationError(f"role {name!r} is inherited but not defined")
        effective: dict[str, frozenset[str]] = {}

        def resolve(role: str, path: tuple[str, ...]) -> frozenset[str]:
            if role in path:
                cycle = " -> ".join((*path, role))
                raise ConfigurationError(f"roles inherit in a cycle: {cycle}")
            if role not in effective:
                perms = set(own[role])
                for parent in parents.get(role, ()):
                    perms |= resolve(parent, (*path, role))
                effective[role] = frozenset(perms)
            return effective[role]

        for role in own:
            resolve(role, ())
        self._effective = effective

    @property
    def names(self) -> frozenset[str]:
        """Every defined role."""
        return frozenset(self._effective)

    def as_mapping(self) -> dict[str, frozenset[str]]:
        """Return every role with its effective permissions (a :class:`RolesLoader` result)."""
        return dict(self._effective)

    def permissions_for(self, roles: Iterable[str]) -> frozenset[str]:
        """Return the union of the permissions of ``roles``; unknown names grant nothing."""
        effective = self._effective
        granted: frozenset[str] = frozenset()
        for role in roles:
            perms = effective.get(role)
            if perms is not None:
                granted |= perms
        return granted

    def loader(
        self, assignments: Callable[[str, str], Awaitable[Iterable[str]]]
    ) -> Callable[[str, str], Awaitable[frozenset[str]]]:
        """Turn a role-assignment lookup into a permissions loader for :class:`PermissionCache`.

        Args:
            assignments: ``(user_id, tenant_id) -> role names`` (the memberships table).
        """

        async def load(user_id: str, tenant_id: str) -> frozenset[str]:
            return self.permissions_for(await assignments(user_id, tenant_id))

        return load


class Authorizer:
    """Decides whether a principal holds a permission.

    Args:
        roles: the application's roles (for services, and for users without a cache).
        cache: the permission cache users' permissions come from; without one, a
            user's permissions are those of the roles its token carries (stale until
            the token expires: fine for tests and single-service setups). Users of
            an external OIDC issuer always hold their mapped roles' permissions.
    """

    __slots__ = ("cache", "roles")

    def __init__(self, roles: Roles, cache: PermissionCache | None = None) -> None:
        self.roles = roles
        self.cache = cache

    async def permissions(self, principal: Principal) -> frozenset[str]:
        """Return what ``principal`` may do in its tenant."""
        if principal.kind == "api_key":
            return principal.scopes or frozenset()
        # A user of an external issuer has no membership here: its mapped roles count.
        if principal.kind == "user" and self.cache is not None and principal.issuer is None:
            if principal.tenant_id is None:
                # Permissions are per tenant: a user acting for none holds none.
                return frozenset()
            prefetched = _prefetched.get()
            if prefetched is not None and prefetched[0] is principal:
                return await prefetched[1]
            return await self.cache.permissions(principal.subject, principal.tenant_id)
        return self.roles.permissions_for(principal.roles)

    async def check(
        self, principal: Principal | None, permission: str, *, sensitive: bool = True
    ) -> Principal:
        """Return ``principal`` when it holds ``permission``.

        Raises:
            Unauthenticated: there is no principal.
            Forbidden: the principal lacks the permission; the permission is named
                in the body (``detail`` and ``permission``) only when not ``sensitive``.
        """
        if principal is None:
            # The refusal identity recorded (an expired token...), else "no credentials".
            principal = await authenticated()
        if grants(await self.permissions(principal), permission):
            return principal
        if sensitive:
            raise Forbidden
        raise Forbidden(
            f"This operation needs the permission {permission!r}.",
            extra={"permission": permission},
        )


_current: Authorizer | None = None


def use_authorizer(authorizer: Authorizer | None) -> None:
    """Make ``authorizer`` the one :func:`require` and :func:`requires` consult.

    ``bastion.install`` will call it at start-up; call it yourself outside an
    installed app (a worker, a test). ``None`` clears it.
    """
    global _current  # noqa: PLW0603 -- one process-wide authorizer, set at start-up
    _current = authorizer


_request_authorizer: Final[contextvars.ContextVar[Authorizer | None]] = contextvars.ContextVar(
    "bastion_request_authorizer", default=None
)


def bind_request_authorizer(
    authorizer: Authorizer,
) -> contextvars.Token[Authorizer | None]:
    """Make ``authorizer`` the one of the request being served (the identity middleware's).

    It wins over :func:`use_authorizer`'s: with two apps in one process (two
    instances in a test, a benchmark), each request is checked by its own app's
    roles and cache, not by whichever app started last.
    """
    return _request_authorizer.set(authorizer)


def unbind_request_authorizer(token: contextvars.Token[Authorizer | None]) -> None:
    """Restore the request authorizer that was bound before."""
    _request_authorizer.reset(token)


_prefetched: Final[
    contextvars.ContextVar[tuple[Principal, asyncio.Future[frozenset[str]]] | None]
] = contextvars.ContextVar("bastion_prefetched_permissions", default=None)


def bind_prefetched_permissions(
    principal: Principal, permissions: asyncio.Future[frozenset[str]]
) -> contextvars.Token[tuple[Principal, asyncio.Future[frozenset[str]]] | None]:
    """Let the request's checks of ``principal`` await ``permissions``, already in flight.

    The identity middleware starts the permission-cache lookup while the deny list
    is asked, so the two Redis round trips overlap instead of following each other.
    """
    return _prefetched.set((principal, permissions))


def unbind_prefetched_permissions(
    token: contextvars.Token[tuple[Principal, asyncio.Future[frozenset[str]]] | None],
) -> None:
    """Forget the prefetched permissions (at the end of the request)."""
    _prefetched.reset(token)


def current_authorizer() -> Authorizer:
    """Return the request's authorizer, else the one :func:`use_authorizer` set.

    Raises:
        ConfigurationError: none is set (answered as a 500: a protected route
            must never be served unchecked).
    """
    bound = _request_authorizer.get()
    if bound is not None:
        return bound
    if _current is None:
        raise ConfigurationError(
            "no authorizer: call bastion.identity.use_authorizer(Authorizer(roles, cache))"
        )
    return _current


def require(permission: str, *, sensitive: bool = True) -> Callable[[], Awaitable[Principal]]:
    """Return a FastAPI dependency that lets through only callers holding ``permission``.

    Example:
        >>> @app.get("/v1/documents")
        ... async def list_documents(
        ...     user: Annotated[Principal, Depends(require("documents:read"))],
        ... ) -> Page: ...

    Args:
        permission: the permission needed, such as ``documents:read``.
        sensitive: ``False`` names the permission in the 403 body.

    Returns:
        A dependency that answers the principal, or raises ``Unauthenticated`` (401)
        or ``Forbidden`` (403).
    """
    _validate(permission)

    async def dependency() -> Principal:
        return await current_authorizer().check(
            current_principal(), permission, sensitive=sensitive
        )

    setattr(dependency, REQUIREMENT_ATTRIBUTE, permission)
    return dependency


def requires(
    permission: str, *, sensitive: bool = True
) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Decorate an async function so that it runs only for callers holding ``permission``.

    Works on route endpoints and on any coroutine function called while serving a
    request (a service layer), since the principal is read from the request's context.

    Example:
        >>> @app.delete("/v1/documents/{id}")
        ... @requires("documents:delete")
        ... async def delete_document(id: str) -> None: ...

    Raises:
        TypeError: the decorated function is not a coroutine function.
    """
    _validate(permission)

    def decorate(function: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        if not inspect.iscoroutinefunction(function):
            raise TypeError("@requires decorates coroutine functions only")

        @functools.wraps(function)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            await current_authorizer().check(current_principal(), permission, sensitive=sensitive)
            return await function(*args, **kwargs)

        setattr(wrapper, REQUIREMENT_ATTRIBUTE, permission)
        return wrapper

    return decorate


def protected_operations(routes: Iterable[Any]) -> set[tuple[str, str]]:
    """Return ``(METHOD, path template)`` of every route a permission check guards.

    For the OpenAPI document: these operations list ``401`` and ``403``. A route is
    guarded when its endpoint was decorated with :func:`requires` or a
    :func:`require` dependency appears anywhere in its dependency tree.
    """
    found: set[tuple[str, str]] = set()
    for route in flattened_routes(routes):
        methods = getattr(route, "methods", None)
        path = getattr(route, "path", None)
        if not methods or path is None:
            continue
        guarded = hasattr(getattr(route, "endpoint", None), REQUIREMENT_ATTRIBUTE)
        dependant = getattr(route, "dependant", None)
        if not guarded and dependant is not None:
            guarded = depends_on(dependant, lambda call: hasattr(call, REQUIREMENT_ATTRIBUTE))
        if guarded:
            found.update((method, path) for method in methods)
    return found


def authenticated_operations(
    routes: Iterable[Any], *, dependencies: Iterable[Callable[..., Any]] = ()
) -> set[tuple[str, str]]:
    """Return ``(METHOD, path template)`` of every route that needs a caller.

    For the OpenAPI document's ``security``: the routes a permission check guards
    (:func:`protected_operations`), and those whose dependency tree holds
    :func:`~bastion.identity.authenticated` or one of ``dependencies`` (such as
    the tenancy's ``current_tenant_id``).
    """
    calls = {authenticated, *dependencies}
    found = protected_operations(routes)
    for route in flattened_routes(routes):
        methods = getattr(route, "methods", None)
        path = getattr(route, "path", None)
        dependant = getattr(route, "dependant", None)
        if (
            methods
            and path is not None
            and dependant is not None
            and depends_on(dependant, calls.__contains__)
        ):
            found.update((method, path) for method in methods)
    return found


def _validate(permission: str) -> None:
    if not permission or not isinstance(permission, str) or permission.endswith("*"):
        raise ValueError("a required permission is a non-empty string without a wildcard")
