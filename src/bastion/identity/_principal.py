"""The principal: who a request acts as, and where the request keeps it.

Identity middleware (a user's access token, an API key, a trusted service)
builds one :class:`Principal` per request and binds it with
:func:`bind_principal`; permission checks read it back with
:func:`current_principal`. Binding also fills in ``tenant_id``, ``user_id`` and
``api_key_id`` of the current :class:`~bastion.context.RequestContext`, so logs
and audit see who acted without importing identity.
"""

from __future__ import annotations

import contextvars
from dataclasses import dataclass, field
from typing import Annotated, Final, Literal

from fastapi import Depends

from bastion.context import current_context
from bastion.errors import BastionError, Unauthenticated

__all__ = [
    "BEARER_CHALLENGE",
    "Authenticated",
    "Principal",
    "PrincipalKind",
    "authenticated",
    "bind_principal",
    "clear_auth_failure",
    "current_principal",
    "record_auth_failure",
    "unbind_principal",
]

BEARER_CHALLENGE: Final = 'Bearer realm="bastion"'
"""The ``WWW-Authenticate`` challenge of a request without credentials (RFC 6750)."""

PrincipalKind = Literal["user", "api_key", "service"]


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller.

    Args:
        subject: the user id, the API key id (never its secret) or the service name.
        kind: ``user`` (an access token), ``api_key`` or ``service`` (a trusted caller).
        tenant_id: the tenant the request acts for; ``None`` when it names none.
        roles: role names the credential carries (a token's ``roles`` claim). For a
            user they are informative only: permissions come from the permission
            cache, so a role change applies before the token expires.
        scopes: what an API key may do (permission strings, wildcards allowed);
            ``None`` for users and services.
        session_id: the refresh-token family an access token belongs to (its
            ``sid`` claim), so logout can end that session; ``None`` otherwise.
        token_id: the access token's ``jti`` (what logout puts on the deny list).
        issuer: the external OIDC issuer that vouched for a user; ``None`` for
            bastion's own tokens. Such a user's permissions are those of its
            mapped ``roles``: it has no membership here.
    """

    subject: str
    kind: PrincipalKind = "user"
    tenant_id: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    scopes: frozenset[str] | None = None
    session_id: str | None = None
    token_id: str | None = None
    issuer: str | None = None

    @property
    def user_id(self) -> str | None:
        """The user id when the caller is a user, else ``None``."""
        return self.subject if self.kind == "user" else None


_current: Final[contextvars.ContextVar[Principal | None]] = contextvars.ContextVar(
    "bastion_principal", default=None
)


def current_principal() -> Principal | None:
    """Return the principal of the request being served, or ``None`` (anonymous)."""
    return _current.get()


def bind_principal(principal: Principal | None) -> contextvars.Token[Principal | None]:
    """Make ``principal`` the request's caller; return the token for :func:`unbind_principal`.

    Also copies its tenant and id into the current request context, when there is one.

    Example:
        >>> token = bind_principal(Principal("u-1", tenant_id="t-1"))
        >>> try:
        ...     await app(scope, receive, send)
        ... finally:
        ...     unbind_principal(token)
    """
    context = current_context()
    if context is not None and principal is not None:
        context.tenant_id = principal.tenant_id
        if principal.kind == "api_key":
            context.api_key_id = principal.subject
        else:
            context.user_id = principal.subject
    return _current.set(principal)


def unbind_principal(token: contextvars.Token[Principal | None]) -> None:
    """Restore the principal that was current before :func:`bind_principal`."""
    _current.reset(token)


_failure: Final[contextvars.ContextVar[BastionError | None]] = contextvars.ContextVar(
    "bastion_auth_failure", default=None
)


def record_auth_failure(error: BastionError | None) -> contextvars.Token[BastionError | None]:
    """Keep why the request's credentials were refused, for :func:`authenticated` to raise.

    Identity middleware rejects nothing by itself (a public route still answers a
    request with an expired token); a route that needs a caller raises this
    error, so the client learns its token expired rather than that it sent none.
    Usually an :class:`~bastion.errors.Unauthenticated`; a
    :class:`~bastion.errors.ServiceUnavailable` when the credentials could not
    be checked (a deny list that fails closed, an unreachable issuer).
    """
    return _failure.set(error)


def clear_auth_failure(token: contextvars.Token[BastionError | None]) -> None:
    """Restore the failure that was recorded before :func:`record_auth_failure`."""
    _failure.reset(token)


async def authenticated() -> Principal:
    """FastAPI dependency: the request's principal, or 401.

    A coroutine although it awaits nothing: FastAPI runs plain functions in a
    worker thread, which costs more than the lookup.

    Raises:
        Unauthenticated: no credentials (with a ``Bearer`` challenge), or the
            refusal identity recorded for the credentials sent.
        ServiceUnavailable: the credentials sent could not be checked now.
    """
    principal = _current.get()
    if principal is not None:
        return principal
    failure = _failure.get()
    if failure is not None:
        raise failure
    raise Unauthenticated(
        "This operation needs credentials: an access token or an API key.",
        headers={"WWW-Authenticate": BEARER_CHALLENGE},
    )


Authenticated = Annotated[Principal, Depends(authenticated)]
"""Route parameter type: the authenticated caller (401 without one)."""
