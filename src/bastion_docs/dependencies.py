"""Route dependencies shared by every router: the database, a request's session, the audit trail."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from bastion.data import Database

if TYPE_CHECKING:
    from bastion.audit import AuditLog

__all__ = ["Audit", "DbSession", "audit_trail", "database", "db_session"]


async def database(request: Request) -> Database:
    """Return the shared database bastion installed on the app.

    A coroutine, though it awaits nothing: FastAPI runs plain functions in a
    worker thread, which costs more than the whole lookup. ``create_app``
    refuses to build the app without a database, so there always is one.
    """
    db: Database = request.app.state.bastion.database
    return db


async def db_session(db: Annotated[Database, Depends(database)]) -> AsyncIterator[AsyncSession]:
    """Yield the request's one session; closing it rolls back whatever was not committed.

    A request costs one connection checkout and one transaction (the caller's
    permissions come from bastion's permission cache, not from this session).
    Routes that write call
    ``commit()`` themselves before answering: the answer must not claim a
    change that a failed commit would then undo.
    """
    async with db.sessions() as session:
        yield session


DbSession = Annotated[AsyncSession, Depends(db_session)]
"""Route parameter type: the request's database session."""


async def audit_trail(request: Request) -> AuditLog | None:
    """Return the app's audit recorder, or ``None`` when ``audit.enabled`` is off."""
    audit = request.app.state.bastion.audit
    return None if audit is None else audit.log


# The type as a string: FastAPI needs only the dependency, and checkers resolve it.
Audit = Annotated["AuditLog | None", Depends(audit_trail)]
"""Route parameter type: the audit recorder (``None`` when the audit trail is off)."""
