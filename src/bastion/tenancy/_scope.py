"""The tenant filter every query of tenant-owned data goes through."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, TypeVar

from fastapi import Depends
from sqlalchemy.sql import Delete, Select, Update

from bastion.errors import Forbidden
from bastion.identity._principal import authenticated

__all__ = ["TenantId", "current_tenant_id", "scoped"]

S = TypeVar("S", Select[Any], Update, Delete)


async def current_tenant_id() -> uuid.UUID:
    """FastAPI dependency: the tenant the authenticated caller acts for.

    Raises:
        Unauthenticated: no caller.
        Forbidden: the caller acts for no tenant (a user who belongs to none yet).
    """
    principal = await authenticated()
    if principal.tenant_id is None:
        raise Forbidden("This operation acts within a tenant; this credential names none.")
    try:
        return uuid.UUID(principal.tenant_id)
    except ValueError:
        # An external issuer's tenant claim that is not one of ours names no tenant here.
        raise Forbidden("This credential's tenant is not a tenant of this service.") from None


TenantId = Annotated[uuid.UUID, Depends(current_tenant_id)]
"""Route parameter type: the caller's tenant id."""


def scoped(statement: S, entity: Any, tenant_id: uuid.UUID) -> S:
    """Confine ``statement`` to the rows of ``tenant_id``.

    Args:
        statement: a ``select``, ``update`` or ``delete``.
        entity: the mapped class or table whose ``tenant_id`` column is filtered.
        tenant_id: the caller's tenant (:data:`TenantId`), never a value the
            request names.

    Raises:
        TypeError: ``entity`` has no ``tenant_id`` column: such a table is not
            tenant-owned and must not be read through this helper.
    """
    column = getattr(entity, "tenant_id", None)
    if column is None and hasattr(entity, "c"):
        column = getattr(entity.c, "tenant_id", None)
    if column is None:
        raise TypeError(f"{entity!r} has no tenant_id column")
    return statement.where(column == tenant_id)
