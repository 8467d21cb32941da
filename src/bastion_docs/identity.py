"""DEVELOPMENT STAND-IN for identity: the ``X-Debug-User`` header names the caller.

Anyone who knows a user's id can act as that user. This exists only until
bastion's identity component (passwords, tokens, API keys) replaces it; it
must not face the internet. :func:`bastion_docs.app.create_app` logs a warning
at start-up when ``environment`` is ``production``.

The caller's tenant is the tenant of their membership (a user belongs to one
tenant), never something the request names, so a request cannot choose which
tenant it acts for.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Annotated, Final

from fastapi import Depends, Security
from fastapi.security import APIKeyHeader
from sqlalchemy import select

from bastion import current_context
from bastion.errors import Unauthenticated
from bastion_docs.dependencies import DbSession
from bastion_docs.models import Role, User

__all__ = ["DEBUG_USER_HEADER", "Caller", "CurrentCaller", "current_caller"]

DEBUG_USER_HEADER: Final = "X-Debug-User"
STAND_IN_WARNING: Final = (
    "DEVELOPMENT STAND-IN, NOT AUTHENTICATION: the id of a user in the caller's tenant, "
    "as returned by POST /v1/tenants or POST /v1/users. Anyone who knows an id can act "
    "as that user. The identity issue replaces this header with real credentials."
)

_debug_user = APIKeyHeader(
    name=DEBUG_USER_HEADER,
    scheme_name="DebugUser",
    description=STAND_IN_WARNING,
    auto_error=False,
)
# RFC 9110 requires a challenge on every 401; this one names the stand-in scheme.
_CHALLENGE: Final = {"WWW-Authenticate": f'DebugUser header="{DEBUG_USER_HEADER}"'}


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling, for which tenant, with which role.

    Attributes:
        user_id: the caller's user id.
        tenant_id: the tenant every query of this request is confined to.
        role: the caller's role in that tenant.
    """

    user_id: uuid.UUID
    tenant_id: uuid.UUID
    role: Role


async def current_caller(
    session: DbSession, header: Annotated[str | None, Security(_debug_user)]
) -> Caller:
    """Resolve ``X-Debug-User`` to the caller (development stand-in).

    Args:
        session: the request's session, which the route then goes on using.
        header: the raw header value, if any.

    Returns:
        The caller, also recorded on the request context for logs.

    Raises:
        Unauthenticated: the header is missing, malformed or names no user.
    """
    if not header:
        raise Unauthenticated(f"Send the {DEBUG_USER_HEADER} header.", headers=_CHALLENGE)
    try:
        user_id = uuid.UUID(header)
    except ValueError:
        # Same answer as an unknown id: the caller learns nothing about the id format.
        raise Unauthenticated(
            f"{DEBUG_USER_HEADER} does not name a user.", headers=_CHALLENGE
        ) from None
    row = (
        await session.execute(select(User.tenant_id, User.role).where(User.id == user_id))
    ).one_or_none()
    if row is None:
        raise Unauthenticated(f"{DEBUG_USER_HEADER} does not name a user.", headers=_CHALLENGE)
    caller = Caller(user_id=user_id, tenant_id=row.tenant_id, role=Role(row.role))
    context = current_context()
    if context is not None:
        context.user_id = str(caller.user_id)
        context.tenant_id = str(caller.tenant_id)
    return caller


CurrentCaller = Annotated[Caller, Depends(current_caller)]
"""Route parameter type: the authenticated caller (development stand-in)."""
