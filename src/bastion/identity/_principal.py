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
from typing import Final, Literal

from bastion.context import current_context

__all__ = [
    "Principal",
    "PrincipalKind",
    "bind_principal",
    "current_principal",
    "unbind_principal",
]

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
    """

    subject: str
    kind: PrincipalKind = "user"
    tenant_id: str | None = None
    roles: frozenset[str] = field(default_factory=frozenset)
    scopes: frozenset[str] | None = None

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
