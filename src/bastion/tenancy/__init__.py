"""Tenancy: which tenant a request acts for, and confining every query to it.

Example:
    >>> from bastion.tenancy import scoped, TenantId
    >>> @app.get("/v1/documents/{document_id}")
    ... async def read(document_id: UUID, tenant: TenantId, session: DbSession) -> Out:
    ...     doc = await session.scalar(scoped(select(Document), Document, tenant)
    ...                                .where(Document.id == document_id))
    ...     if doc is None:
    ...         raise NotFound  # another tenant's id reads as absent, never as forbidden
"""

from bastion.tenancy._scope import TenantId, current_tenant_id, scoped

__all__ = ["TenantId", "current_tenant_id", "scoped"]
