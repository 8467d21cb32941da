"""HTTP routes for a tenant's API keys (``/v1/api-keys``).

Every route needs ``api_keys:manage`` and acts on the caller's tenant only
(:func:`~bastion.tenancy.scoped`): another tenant's key id answers 404. A key
is made by a user of this service who is a member of the tenant (never by
another key, a service or an external issuer's account), and carries only
scopes its creator holds (no escalation); the whole key is in the creation
answer and nowhere else. A key lives no longer than its creator's authority:
removing the member revokes its keys, and a role change revokes those whose
scopes the new role does not grant (see :mod:`bastion.identity._tenant_routes`).
Revoking sets ``revoked_at``, drops this instance's cached record and, with
Redis, puts the key's id on the deny list until every other instance's
cached copy has expired, so every instance refuses the key at once.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Final

from fastapi import APIRouter, Depends, Query, Request, Response, status
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field
from sqlalchemy import func, select

from bastion.data.types import utc_now
from bastion.errors import (
    Conflict,
    ErrorCode,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    problem_responses,
)
from bastion.identity._api_key_store import (
    announce_revoked,
    record_from_row,
    revoke_api_keys,
)
from bastion.identity._api_keys import ApiKeyRecord
from bastion.identity._directory import membership_role
from bastion.identity._events import SecurityEventKind, emit_security_event
from bastion.identity._principal import Principal
from bastion.identity._rbac import grants, require
from bastion.identity._tables import NAME_MAX, api_keys, tenants
from bastion.identity._tenant_routes import local_user_id
from bastion.tenancy import TenantId, scoped

if TYPE_CHECKING:
    from bastion.identity._runtime import Identity

__all__ = ["api_keys_router"]

MAX_SCOPES: Final = 64
_SCOPE_PATTERN: Final = r"^[A-Za-z0-9_.:*-]{1,128}$"
_LIST_MAX: Final = 500

# Module level: with postponed annotations FastAPI resolves them in the module's globals.
_Manage = Annotated[Principal, Depends(require("api_keys:manage"))]


class ApiKeyCreate(BaseModel):
    """``POST /api-keys``."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    name: str = Field(min_length=1, max_length=NAME_MAX)
    scopes: list[Annotated[str, Field(pattern=_SCOPE_PATTERN)]] = Field(max_length=MAX_SCOPES)
    expires_at: AwareDatetime | None = None


class ApiKeyOut(BaseModel):
    """A key as listed: never its secret."""

    id: uuid.UUID
    prefix: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None
    last_used_at: datetime | None
    revoked_at: datetime | None
    created_by: uuid.UUID | None


class ApiKeyCreated(BaseModel):
    """A new key: ``key`` is shown this once."""

    key: str
    id: uuid.UUID
    prefix: str
    name: str
    scopes: list[str]
    created_at: datetime
    expires_at: datetime | None


def _out(record: ApiKeyRecord) -> ApiKeyOut:
    return ApiKeyOut(
        id=uuid.UUID(record.id),
        prefix=record.prefix,
        name=record.name,
        scopes=list(record.scopes),
        created_at=record.created_at,
        expires_at=record.expires_at,
        last_used_at=record.last_used_at,
        revoked_at=record.revoked_at,
        created_by=uuid.UUID(record.created_by) if record.created_by else None,
    )


def _identity(request: Request) -> Identity:
    identity: Identity = request.app.state.bastion.identity
    return identity


def api_keys_router() -> APIRouter:  # noqa: PLR0915 -- one closure per route, read top to bottom
    """Build the router for ``/api-keys``.

    Returns:
        A router with prefix ``/api-keys``; the app mounts it under ``identity.route_prefix``.
    """
    router = APIRouter(prefix="/api-keys", tags=["api-keys"])
    no_store = {"cache-control": "no-store"}

    @router.post(
        "",
        status_code=status.HTTP_201_CREATED,
        response_model=ApiKeyCreated,
        responses=problem_responses(ErrorCode.CONFLICT),
    )
    async def create(
        body: ApiKeyCreate,
        request: Request,
        response: Response,
        principal: _Manage,
        tenant: TenantId,
    ) -> ApiKeyCreated:
        """Make a key for the caller's tenant; the answer holds the whole key, once."""
        identity = _identity(request)
        creator = local_user_id(principal)
        if creator is None:
            raise Forbidden(
                "API keys are made by users of this service: not by other keys, services"
                " or accounts of an external identity provider."
            )
        held = await identity.authorizer.permissions(principal)
        if not all(grants(held, scope) for scope in body.scopes):
            # Which scope is missing would tell the caller about permissions it lacks.
            raise Forbidden("A key can carry only scopes its creator holds.")
        if body.expires_at is not None and body.expires_at <= utc_now():
            raise InvalidInput(
                errors=[
                    FieldError("body.expires_at", "invalid", "expires_at must be in the future.")
                ]
            )
        limit = identity.settings.identity.api_keys.max_per_tenant
        created = identity.api_keys.create(
            str(tenant),
            body.name,
            body.scopes,
            expires_at=body.expires_at,
            created_by=str(creator),
        )
        record = created.record
        async with identity.database.session() as session:
            # Locks the tenant row: concurrent creations count one after the other.
            await session.execute(
                select(tenants.c.id).where(tenants.c.id == tenant).with_for_update()
            )
            # Checked again under the lock, from the membership itself: a removal or
            # demotion (which takes the same lock) cannot slip in between the check
            # and the insert, and a token naming a user or tenant that is no row
            # here is refused rather than failing on a foreign key.
            role = await membership_role(session, creator, tenant)
            if role is None:
                raise Forbidden("Only a member of this tenant can make its API keys.")
            held = identity.roles.permissions_for([role])
            if not all(grants(held, scope) for scope in body.scopes):
                raise Forbidden("A key can carry only scopes its creator holds.")
            live = await session.scalar(
                scoped(select(func.count()).select_from(api_keys), api_keys, tenant).where(
                    api_keys.c.revoked_at.is_(None)
                )
            )
            if (live or 0) >= limit:
                raise Conflict(
                    f"This tenant has {limit} live API keys, the most allowed; revoke one first.",
                    extra={"limit": limit},
                )
            await session.execute(
                api_keys.insert().values(
                    id=uuid.UUID(record.id),
                    tenant_id=tenant,
                    name=record.name,
                    scopes=list(record.scopes),
                    prefix=record.prefix,
                    public_id=record.public_id,
                    hash=record.hash,
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    last_used_at=None,
                    revoked_at=None,
                    created_by=creator,
                )
            )
        await emit_security_event(
            SecurityEventKind.API_KEY_CREATED,
            subject=record.id,
            details={"key_prefix": record.prefix, "scopes": len(record.scopes)},
        )
        response.headers.update(no_store)
        return ApiKeyCreated(
            key=created.key,
            id=uuid.UUID(record.id),
            prefix=record.prefix,
            name=record.name,
            scopes=list(record.scopes),
            created_at=record.created_at,
            expires_at=record.expires_at,
        )

    @router.get("", response_model=list[ApiKeyOut])
    async def list_keys(
        request: Request,
        principal: _Manage,
        tenant: TenantId,
        include_revoked: bool = False,
        limit: Annotated[int, Query(ge=1, le=_LIST_MAX)] = 100,
    ) -> list[ApiKeyOut]:
        """The tenant's keys, newest first (revoked ones only when asked)."""
        identity = _identity(request)
        statement = scoped(select(api_keys), api_keys, tenant)
        if not include_revoked:
            statement = statement.where(api_keys.c.revoked_at.is_(None))
        statement = statement.order_by(api_keys.c.created_at.desc(), api_keys.c.id.desc())
        async with identity.database.sessions() as session:
            rows = await session.execute(statement.limit(limit))
            return [_out(record_from_row(row)) for row in rows]

    async def _find(identity: Identity, tenant: uuid.UUID, key_id: uuid.UUID) -> Any:
        async with identity.database.sessions() as session:
            row = (
                await session.execute(
                    scoped(select(api_keys), api_keys, tenant).where(api_keys.c.id == key_id)
                )
            ).one_or_none()
        if row is None:
            raise NotFound("No such API key.")
        return row

    @router.get(
        "/{key_id}", response_model=ApiKeyOut, responses=problem_responses(ErrorCode.NOT_FOUND)
    )
    async def read(
        key_id: uuid.UUID, request: Request, principal: _Manage, tenant: TenantId
    ) -> ApiKeyOut:
        """One of the tenant's keys."""
        return _out(record_from_row(await _find(_identity(request), tenant, key_id)))

    @router.delete(
        "/{key_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        responses=problem_responses(ErrorCode.NOT_FOUND),
    )
    async def revoke(
        key_id: uuid.UUID, request: Request, principal: _Manage, tenant: TenantId
    ) -> Response:
        """Revoke a key: every instance refuses it from now on (idempotent)."""
        identity = _identity(request)
        now = utc_now()
        async with identity.database.session() as session:
            revoked = await revoke_api_keys(
                session,
                api_keys.c.tenant_id == tenant,  # scoped() takes selects only
                api_keys.c.id == key_id,
                now=now,
            )
        if not revoked:
            # Already revoked answers as a revocation; another tenant's id as nothing.
            await _find(identity, tenant, key_id)
            return Response(status_code=status.HTTP_204_NO_CONTENT)
        await announce_revoked(identity, revoked, now)
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    return router
