"""Tenants: bootstrap a new one with its owner, and read the caller's own."""

from __future__ import annotations

from fastapi import APIRouter
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from bastion.errors import Conflict, ErrorCode, NotFound, problem_responses
from bastion_docs.dependencies import DbSession
from bastion_docs.identity import CurrentCaller
from bastion_docs.ids import uuid7
from bastion_docs.models import NAME_MAX, Role, Tenant, User, utc_now
from bastion_docs.schemas import TenantCreate, TenantCreated, TenantOut, UserOut

__all__ = ["router"]

router = APIRouter(prefix="/tenants", tags=["tenants"])


@router.post(
    "",
    status_code=201,
    summary="Create a tenant and its owner",
    responses=problem_responses(ErrorCode.CONFLICT),
)
async def create_tenant(payload: TenantCreate, session: DbSession) -> TenantCreated:
    """Create a tenant and its first user, with the ``owner`` role.

    Open to anyone while identity is the ``X-Debug-User`` stand-in; the owner's
    id in the answer is what that header takes.

    Raises:
        Conflict: another tenant already has this slug.
    """
    now = utc_now()
    tenant = Tenant(id=uuid7(), name=payload.name, slug=payload.slug, created_at=now)
    owner = User(
        id=uuid7(),
        tenant_id=tenant.id,
        email=payload.owner_email,
        display_name=payload.owner_display_name or payload.owner_email.split("@", 1)[0][:NAME_MAX],
        role=Role.OWNER.value,
        created_at=now,
    )
    session.add(tenant)
    try:
        # The tenant row must exist before its owner's foreign key points at it.
        await session.flush()
        session.add(owner)
        await session.commit()
    except IntegrityError as exc:
        # The tenant is new, so the owner cannot clash with anyone: only the slug can.
        raise Conflict("A tenant with this slug already exists.") from exc
    return TenantCreated(
        tenant=TenantOut.model_validate(tenant), owner=UserOut.model_validate(owner)
    )


@router.get(
    "/current",
    summary="The caller's tenant",
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.NOT_FOUND),
)
async def current_tenant(caller: CurrentCaller, session: DbSession) -> TenantOut:
    """Return the tenant the caller belongs to.

    Raises:
        NotFound: the tenant was deleted while the request was in flight.
    """
    tenant = await session.scalar(select(Tenant).where(Tenant.id == caller.tenant_id))
    if tenant is None:
        raise NotFound("The tenant no longer exists.")
    return TenantOut.model_validate(tenant)
