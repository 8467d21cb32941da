"""HTTP routes for tenants, members and invitations (``/v1/tenants``).

A caller only ever sees the tenant its credential acts for: any other tenant's
id answers 404 ``NOT_FOUND``, exactly as an id that does not exist, never 403.
Permissions come from ``identity.roles`` (the defaults in
:data:`~bastion.settings.IDENTITY_PERMISSIONS`): ``tenant:read``,
``tenant:update``, ``members:read``, ``members:invite``, ``members:manage``,
``members:owners`` and ``usage:read``.

Role grants never escalate: a caller grants (by invitation or role change) only
a role whose permissions it holds all of, changes only members whose role it
could grant, and touches the owner role only with ``members:owners``. A tenant
always keeps one owner: removing or demoting the last one answers 409
``CONFLICT``; on PostgreSQL the owner rows are locked (``FOR UPDATE``) for the
check, so two owners demoting each other at once cannot leave none.

A member's authority ends with its membership, in the same transaction: removing
a member revokes its refresh sessions and the API keys it made in the tenant,
and withdraws the invitations it sent there; a role change revokes its keys
whose scopes the new role does not grant and withdraws its invitations to roles
it may no longer grant. Both lock the tenant row, as key creation does, so a key
cannot be made between the check and the change.

Only users of this service are members: API keys, trusted services and users of
an external OIDC issuer (whatever their subject looks like) are refused 403
where a user is needed.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Final
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

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
from bastion.identity._accounts import RefreshTokens
from bastion.identity._api_key_store import (
    RevokedApiKey,
    announce_revoked,
    revoke_api_keys,
)
from bastion.identity._directory import (
    add_membership,
    create_tenant,
    find_tenant,
    get_user,
    membership_role,
    normalise_email,
    user_memberships,
)
from bastion.identity._events import SecurityEventKind, emit_security_event
from bastion.identity._mail import INVITATION_TEMPLATE
from bastion.identity._one_time import (
    InvalidOneTimeToken,
    OneTimeTokenRecord,
    TokenPurpose,
)
from bastion.identity._principal import Authenticated, Principal
from bastion.identity._rbac import grants, require
from bastion.identity._tables import (
    EMAIL_MAX,
    NAME_MAX,
    SLUG_MAX,
    api_keys,
    memberships,
    one_time_tokens,
    tenants,
    users,
)
from bastion.observability.metrics import TENANT_QUOTA_REJECTIONS
from bastion.ratelimit import QuotaExceeded
from bastion.tenancy._quotas import members_limit, tenant_usage

if TYPE_CHECKING:
    from bastion.identity._runtime import Identity

__all__ = [
    "InvitationAccepted",
    "accept_invitation",
    "local_user_id",
    "tenants_router",
]

# Retry-After of a full members quota: it frees up when an owner acts, not on a clock.
_MEMBERS_RETRY: Final = 3600.0


def _members_full() -> QuotaExceeded:
    TENANT_QUOTA_REJECTIONS.labels(quota="members").inc()
    return QuotaExceeded(_MEMBERS_RETRY, quota="members")


# -- bodies and answers -----------------------------------------------------------------


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)


class TenantCreate(_Body):
    """``POST /tenants``."""

    name: str = Field(min_length=1, max_length=NAME_MAX)
    slug: str = Field(
        min_length=1, max_length=SLUG_MAX, pattern=r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$"
    )


class TenantUpdate(_Body):
    """``PATCH /tenants/{id}``."""

    name: str = Field(min_length=1, max_length=NAME_MAX)


class InvitationCreate(_Body):
    """``POST /tenants/{id}/members/invitations``."""

    email: str = Field(min_length=3, max_length=EMAIL_MAX, pattern=r"^[^@\s]+@[^@\s]+$")
    role: str | None = Field(default=None, min_length=1, max_length=64)


class InvitationAccept(_Body):
    """``POST /tenants/invitations/accept``."""

    token: str = Field(min_length=1, max_length=128)


class RoleChange(_Body):
    """``PATCH /tenants/{id}/members/{user_id}``."""

    role: str = Field(min_length=1, max_length=64)


class TenantOut(BaseModel):
    """A tenant, with the caller's role in it."""

    id: uuid.UUID
    slug: str
    name: str
    created_at: datetime
    role: str | None = None


class MemberOut(BaseModel):
    """A member of a tenant."""

    user_id: uuid.UUID
    email: str
    display_name: str
    role: str
    joined_at: datetime


class InvitationOut(BaseModel):
    """A pending invitation (the token itself went by e-mail and is never shown again)."""

    id: uuid.UUID
    email: str
    role: str
    created_at: datetime
    expires_at: datetime


class UsageOut(BaseModel):
    """One quota of a tenant: its limit (``None``: unlimited) and the current period's use."""

    limit: int | None
    used: int
    remaining: int | None
    resets_at: datetime | None


class TenantUsageOut(BaseModel):
    """``GET /tenants/{id}/usage``."""

    tenant_id: uuid.UUID
    quotas: dict[str, UsageOut]


# -- helpers ----------------------------------------------------------------------------


def _identity(request: Request) -> Identity:
    identity: Identity = request.app.state.bastion.identity
    return identity


def _own_tenant(principal: Principal, tenant_id: uuid.UUID) -> uuid.UUID:
    """Return ``tenant_id`` when the caller acts for it; else 404, as for a missing tenant."""
    if principal.tenant_id is None or principal.tenant_id != str(tenant_id):
        raise NotFound("No such tenant.")
    return tenant_id


def local_user_id(principal: Principal) -> uuid.UUID | None:
    """Return the caller's id in ``bastion_users``, or ``None`` for any other caller.

    API keys and services are no users, and neither is a user of an external
    OIDC issuer, even when its subject happens to be a UUID: such an account has
    no row here, and its subject may equal a local user's id.
    """
    if principal.kind != "user" or principal.issuer is not None:
        return None
    try:
        return uuid.UUID(principal.subject)
    except ValueError:
        return None


def _user(principal: Principal) -> uuid.UUID:
    """Return the caller's user id; API keys, services and external accounts manage nothing."""
    user_id = local_user_id(principal)
    if user_id is None:
        if principal.kind == "user" and principal.issuer is not None:
            raise Forbidden(
                "Only a user of this service can do this; an account of an external"
                " identity provider has no membership here."
            )
        raise Forbidden("Only a user of this service can do this; an API key cannot.")
    return user_id


def _check_role(identity: Identity, role: str) -> None:
    if role not in identity.roles.names:
        known = ", ".join(sorted(identity.roles.names))
        raise InvalidInput(
            errors=[FieldError("body.role", "invalid", f"role must be one of {known}.")]
        )


def _covers(identity: Identity, granted: frozenset[str], role: str) -> bool:
    """Return whether ``granted`` covers every permission of ``role`` (wildcards included)."""
    return all(grants(granted, permission) for permission in identity.roles.permissions_for([role]))


def _can_grant(identity: Identity, granted: frozenset[str], role: str) -> bool:
    """Return whether a holder of ``granted`` may grant ``role`` (the owner role needs more)."""
    if role == identity.settings.identity.owner_role and not grants(granted, "members:owners"):
        return False
    return _covers(identity, granted, role)


async def _may_grant(identity: Identity, principal: Principal, role: str) -> None:
    """Refuse unless the caller could hold ``role``: it has every permission the role grants."""
    owner = identity.settings.identity.owner_role
    granted = await identity.authorizer.permissions(principal)
    if role == owner and not grants(granted, "members:owners"):
        raise Forbidden(
            "Granting or changing the owner role needs the permission 'members:owners'.",
            extra={"permission": "members:owners"},
        )
    if not _covers(identity, granted, role):
        raise Forbidden("A role can be granted only by a member holding all its permissions.")


def _check_address(email: str) -> None:
    """Refuse an address the mail senders cannot deliver to, as sign-up does (422)."""
    # Imported here: _auth_routes imports this module (accept_invitation) at its top,
    # so a top-level import either way round would be a cycle. The pattern is
    # private there; reused, not copied, so both routes accept the same addresses.
    from bastion.identity._auth_routes import _EMAIL_PATTERN  # noqa: PLC0415 -- import cycle

    if re.fullmatch(_EMAIL_PATTERN, email) is None:
        raise InvalidInput(
            errors=[FieldError("body.email", "invalid_address", "The e-mail address is not valid.")]
        )


async def _revoke_member_keys(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    user_id: uuid.UUID,
    allowed: frozenset[str] | None,
    now: datetime,
) -> list[RevokedApiKey]:
    """Revoke the live keys ``user_id`` made in the tenant: all, or those beyond ``allowed``."""
    mine = (
        api_keys.c.tenant_id == tenant_id,
        api_keys.c.created_by == user_id,
    )
    if allowed is None:
        return await revoke_api_keys(session, *mine, now=now)
    rows = await session.execute(
        select(api_keys.c.id, api_keys.c.scopes).where(*mine, api_keys.c.revoked_at.is_(None))
    )
    beyond = [
        row.id for row in rows if not all(grants(allowed, scope) for scope in row.scopes or ())
    ]
    if not beyond:
        return []
    return await revoke_api_keys(session, api_keys.c.id.in_(beyond), now=now)


async def _withdraw_invitations_by(
    session: AsyncSession,
    identity: Identity,
    tenant_id: uuid.UUID,
    inviter: uuid.UUID,
    granted: frozenset[str] | None,
) -> int:
    """Delete the pending invitations ``inviter`` sent: all, or those ``granted`` cannot grant.

    Returns:
        How many were deleted.
    """
    rows = await session.execute(
        select(one_time_tokens.c.id, one_time_tokens.c.data).where(
            one_time_tokens.c.tenant_id == tenant_id,
            one_time_tokens.c.purpose == TokenPurpose.INVITATION.value,
            one_time_tokens.c.used_at.is_(None),
        )
    )
    default = identity.settings.identity.invite_role
    doomed = []
    # Few rows (pending invitations of one tenant) and a JSON field: filtered here,
    # not in SQL, whose JSON operators differ between SQLite and PostgreSQL.
    for row in rows:
        data = row.data or {}
        if data.get("invited_by") != str(inviter):
            continue
        role = str(data.get("role") or default)
        if (
            granted is None
            or not grants(granted, "members:invite")
            or not _can_grant(identity, granted, role)
        ):
            doomed.append(row.id)
    if doomed:
        await session.execute(delete(one_time_tokens).where(one_time_tokens.c.id.in_(doomed)))
    return len(doomed)


async def _owner_ids(session: AsyncSession, tenant_id: uuid.UUID, owner_role: str) -> list[Any]:
    # FOR UPDATE (PostgreSQL; SQLite serialises writers anyway): two owners demoting
    # each other at once queue here, and the second sees the first's change.
    rows = await session.execute(
        select(memberships.c.user_id)
        .where(memberships.c.tenant_id == tenant_id, memberships.c.role == owner_role)
        .with_for_update()
    )
    return [row.user_id for row in rows]


async def _refuse_last_owner(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, owner_role: str
) -> None:
    owners = await _owner_ids(session, tenant_id, owner_role)
    if owners == [user_id]:
        raise Conflict("A tenant keeps at least one owner; make another member owner first.")


async def _lock_tenant(session: AsyncSession, tenant_id: uuid.UUID) -> None:
    # Counting against a quota, then adding: concurrent joins of one tenant queue on
    # its row (PostgreSQL), so two cannot both take the last place.
    await session.execute(select(tenants.c.id).where(tenants.c.id == tenant_id).with_for_update())


async def _member_count(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    count: int = (
        await session.scalar(
            select(func.count())
            .select_from(memberships)
            .where(memberships.c.tenant_id == tenant_id)
        )
        or 0
    )
    return count


async def _pending_invitations(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    count: int = (
        await session.scalar(
            select(func.count())
            .select_from(one_time_tokens)
            .where(
                one_time_tokens.c.tenant_id == tenant_id,
                one_time_tokens.c.purpose == TokenPurpose.INVITATION.value,
                one_time_tokens.c.used_at.is_(None),
                one_time_tokens.c.expires_at > utc_now(),
            )
        )
        or 0
    )
    return count


def _tenant_out(record: Any, role: str | None = None) -> TenantOut:
    return TenantOut(
        id=record.id, slug=record.slug, name=record.name, created_at=record.created_at, role=role
    )


# -- invitations, shared with sign-up -------------------------------------------------------


@dataclass(frozen=True, slots=True)
class InvitationAccepted:
    """What accepting an invitation did.

    Attributes:
        tenant_id: the tenant joined.
        user_id: the new member.
        role: the role given.
        joined: ``False`` when the user was a member already (the role is unchanged).
    """

    tenant_id: uuid.UUID
    user_id: uuid.UUID
    role: str
    joined: bool


async def accept_invitation(
    session: AsyncSession, identity: Identity, record: OneTimeTokenRecord, user_id: uuid.UUID
) -> InvitationAccepted:
    """Make ``user_id`` a member of the invitation's tenant, with the invitation's role.

    For sign-up with an invitation token as well as ``POST /tenants/invitations/accept``:
    the caller has consumed ``record`` and commits ``session``; after the commit it calls
    ``identity.permissions.invalidate_user(str(user_id), str(result.tenant_id))`` and emits
    ``member_joined`` (when ``joined``).

    Raises:
        InvalidOneTimeToken: ``record`` is not an invitation to a tenant that still exists.
        Forbidden: the invitation is for another e-mail address than the user's.
        Conflict: the role the invitation grants is no longer one of ``identity.roles``.
        QuotaExceeded: the tenant has as many members as its ``members`` quota allows.
    """
    if record.purpose is not TokenPurpose.INVITATION or record.tenant is None:
        raise InvalidOneTimeToken
    user = await get_user(session, user_id)
    if user is None or normalise_email(user.email) != record.subject:
        raise Forbidden("This invitation is for another e-mail address.")
    tenant = await find_tenant(session, uuid.UUID(record.tenant))
    if tenant is None:
        raise InvalidOneTimeToken
    role = str(record.data.get("role") or identity.settings.identity.invite_role)
    current = await membership_role(session, user_id, tenant.id)
    if current is not None:
        return InvitationAccepted(tenant.id, user_id, current, joined=False)
    if role not in identity.roles.names:
        # The roles changed since the invitation was sent: what it promised is gone.
        raise Conflict("The role this invitation grants no longer exists; ask for a new one.")
    limit = members_limit(identity.settings, tenant.settings)
    if limit is not None:
        await _lock_tenant(session, tenant.id)
        if await _member_count(session, tenant.id) >= limit:
            raise _members_full()
    await add_membership(session, tenant.id, user_id, role)
    return InvitationAccepted(tenant.id, user_id, role, joined=True)


def _invitation_link(identity: Identity, token: str) -> str:
    base = identity.settings.identity.mail.link_base.rstrip("/")
    return f"{base}/invitations/accept?token={quote(token, safe='')}"


# -- the router ---------------------------------------------------------------------------


def tenants_router() -> APIRouter:  # noqa: PLR0915 -- one closure per route, read top to bottom
    """Build the router for ``/tenants``: tenants, members, invitations and usage.

    Returns:
        A router with prefix ``/tenants``; the app mounts it under ``identity.route_prefix``.
    """
    router = APIRouter(prefix="/tenants", tags=["tenants"])
    # Leaving needs no permission, removing someone else does: checked in the route.
    manage_members = require("members:manage")

    @router.post(
        "",
        status_code=status.HTTP_201_CREATED,
        response_model=TenantOut,
        responses=problem_responses(ErrorCode.CONFLICT),
    )
    async def create(body: TenantCreate, request: Request, principal: Authenticated) -> TenantOut:
        """Create a tenant; the caller becomes its owner."""
        identity = _identity(request)
        user_id = _user(principal)
        owner = identity.settings.identity.owner_role
        try:
            async with identity.database.session() as session:
                record = await create_tenant(session, body.name, body.slug)
                await add_membership(session, record.id, user_id, owner)
        except IntegrityError:
            raise Conflict("This slug is taken.", extra={"field": "slug"}) from None
        except ValueError as exc:
            raise InvalidInput(errors=[FieldError("body", "invalid", str(exc))]) from None
        await identity.permissions.invalidate_user(str(user_id), str(record.id))
        await emit_security_event(
            SecurityEventKind.TENANT_CREATED, subject=str(record.id), tenant=str(record.id)
        )
        return _tenant_out(record, owner)

    @router.get("", response_model=list[TenantOut])
    async def list_tenants(request: Request, principal: Authenticated) -> list[TenantOut]:
        """The tenants the caller is a member of, with its role in each."""
        identity = _identity(request)
        user_id = _user(principal)
        async with identity.database.sessions() as session:
            found = await user_memberships(session, user_id)
        return [_tenant_out(each.tenant, each.role) for each in found]

    @router.get(
        "/{tenant_id}", response_model=TenantOut, responses=problem_responses(ErrorCode.NOT_FOUND)
    )
    async def read(
        tenant_id: uuid.UUID,
        request: Request,
        principal: Annotated[Principal, Depends(require("tenant:read"))],
    ) -> TenantOut:
        """The caller's tenant."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        async with identity.database.sessions() as session:
            record = await find_tenant(session, tenant_id)
            user_id = local_user_id(principal)
            role = None if user_id is None else await membership_role(session, user_id, tenant_id)
        if record is None:
            raise NotFound("No such tenant.")
        return _tenant_out(record, role)

    @router.patch(
        "/{tenant_id}", response_model=TenantOut, responses=problem_responses(ErrorCode.NOT_FOUND)
    )
    async def rename(
        tenant_id: uuid.UUID,
        body: TenantUpdate,
        request: Request,
        principal: Annotated[Principal, Depends(require("tenant:update"))],
    ) -> TenantOut:
        """Rename the caller's tenant (the slug never changes: links and logins name it)."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        async with identity.database.session() as session:
            await session.execute(
                update(tenants).where(tenants.c.id == tenant_id).values(name=body.name)
            )
            record = await find_tenant(session, tenant_id)
        if record is None:
            raise NotFound("No such tenant.")
        await emit_security_event(
            SecurityEventKind.TENANT_UPDATED, subject=str(tenant_id), details={"field": "name"}
        )
        return _tenant_out(record)

    @router.get(
        "/{tenant_id}/members",
        response_model=list[MemberOut],
        responses=problem_responses(ErrorCode.NOT_FOUND),
    )
    async def members(
        tenant_id: uuid.UUID,
        request: Request,
        principal: Annotated[Principal, Depends(require("members:read"))],
    ) -> list[MemberOut]:
        """The tenant's members, oldest first."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        async with identity.database.sessions() as session:
            rows = await session.execute(
                select(
                    users.c.id,
                    users.c.email,
                    users.c.display_name,
                    memberships.c.role,
                    memberships.c.created_at,
                )
                .join(memberships, memberships.c.user_id == users.c.id)
                .where(memberships.c.tenant_id == tenant_id)
                .order_by(memberships.c.created_at, users.c.id)
            )
            return [
                MemberOut(
                    user_id=row.id,
                    email=row.email,
                    display_name=row.display_name,
                    role=row.role,
                    joined_at=row.created_at,
                )
                for row in rows
            ]

    @router.post(
        "/{tenant_id}/members/invitations",
        status_code=status.HTTP_201_CREATED,
        response_model=InvitationOut,
        responses=problem_responses(
            ErrorCode.NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.QUOTA_EXCEEDED
        ),
    )
    async def invite(
        tenant_id: uuid.UUID,
        body: InvitationCreate,
        request: Request,
        principal: Annotated[Principal, Depends(require("members:invite"))],
    ) -> InvitationOut:
        """Invite an address to the tenant: a single-use link goes to it by e-mail."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        inviter = _user(principal)
        role = body.role or identity.settings.identity.invite_role
        _check_role(identity, role)
        await _may_grant(identity, principal, role)
        _check_address(body.email)
        email = normalise_email(body.email)
        issued = identity.one_time.new(
            TokenPurpose.INVITATION,
            email,
            tenant=str(tenant_id),
            data={"role": role, "invited_by": str(inviter)},
        )
        record = issued.record
        async with identity.database.session() as session:
            tenant = await find_tenant(session, tenant_id)
            if tenant is None:
                raise NotFound("No such tenant.")
            # Rendered before anything is written: a message the mail layer refuses
            # (422) leaves no invitation behind to count against the members quota.
            message = INVITATION_TEMPLATE.render(
                email,
                link=_invitation_link(identity, issued.token),
                expires_in=record.expires_at - record.created_at,
                service=identity.settings.tracing.service_name,
                tenant=tenant.name,
            )
            already = await session.scalar(
                select(memberships.c.user_id)
                .join(users, users.c.id == memberships.c.user_id)
                .where(memberships.c.tenant_id == tenant_id, users.c.email == email)
            )
            if already is not None:
                raise Conflict("This address is a member already.")
            # Only the newest invitation of an address to this tenant works; other
            # tenants' invitations to the same address stay valid.
            await session.execute(
                delete(one_time_tokens).where(
                    one_time_tokens.c.purpose == TokenPurpose.INVITATION.value,
                    one_time_tokens.c.subject == email,
                    one_time_tokens.c.tenant_id == tenant_id,
                    one_time_tokens.c.used_at.is_(None),
                )
            )
            limit = members_limit(identity.settings, tenant.settings)
            if limit is not None:
                await _lock_tenant(session, tenant_id)
                taken = await _member_count(session, tenant_id)
                taken += await _pending_invitations(session, tenant_id)
                if taken >= limit:
                    raise _members_full()
            await session.execute(
                one_time_tokens.insert().values(
                    id=uuid.UUID(record.id),
                    purpose=record.purpose.value,
                    subject=record.subject,
                    token_hash=record.token_hash,
                    tenant_id=tenant_id,
                    data=dict(record.data),
                    created_at=record.created_at,
                    expires_at=record.expires_at,
                    used_at=None,
                )
            )
        try:
            await identity.mail.send(message)
        except Exception:
            # Not sent, so its link exists nowhere: withdraw the row, which would
            # otherwise sit pending against the members quota, and answer the error.
            async with identity.database.session() as session:
                await session.execute(
                    delete(one_time_tokens).where(one_time_tokens.c.id == uuid.UUID(record.id))
                )
            raise
        await emit_security_event(
            SecurityEventKind.MEMBER_INVITED, subject=record.id, details={"role": role}
        )
        return InvitationOut(
            id=uuid.UUID(record.id),
            email=email,
            role=role,
            created_at=record.created_at,
            expires_at=record.expires_at,
        )

    @router.get(
        "/{tenant_id}/members/invitations",
        response_model=list[InvitationOut],
        responses=problem_responses(ErrorCode.NOT_FOUND),
    )
    async def invitations(
        tenant_id: uuid.UUID,
        request: Request,
        principal: Annotated[Principal, Depends(require("members:invite"))],
    ) -> list[InvitationOut]:
        """The tenant's pending invitations (unused and unexpired), newest first."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        async with identity.database.sessions() as session:
            rows = await session.execute(
                select(one_time_tokens)
                .where(
                    one_time_tokens.c.tenant_id == tenant_id,
                    one_time_tokens.c.purpose == TokenPurpose.INVITATION.value,
                    one_time_tokens.c.used_at.is_(None),
                    one_time_tokens.c.expires_at > utc_now(),
                )
                .order_by(one_time_tokens.c.created_at.desc())
            )
            return [
                InvitationOut(
                    id=row.id,
                    email=row.subject,
                    role=str(
                        (row.data or {}).get("role") or identity.settings.identity.invite_role
                    ),
                    created_at=row.created_at,
                    expires_at=row.expires_at,
                )
                for row in rows
            ]

    @router.delete(
        "/{tenant_id}/members/invitations/{invitation_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        responses=problem_responses(ErrorCode.NOT_FOUND),
    )
    async def revoke_invitation(
        tenant_id: uuid.UUID,
        invitation_id: uuid.UUID,
        request: Request,
        principal: Annotated[Principal, Depends(require("members:invite"))],
    ) -> Response:
        """Withdraw a pending invitation: its link stops working."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        async with identity.database.session() as session:
            result = await session.execute(
                delete(one_time_tokens).where(
                    one_time_tokens.c.id == invitation_id,
                    one_time_tokens.c.tenant_id == tenant_id,
                    one_time_tokens.c.purpose == TokenPurpose.INVITATION.value,
                    one_time_tokens.c.used_at.is_(None),
                )
            )
        if not getattr(result, "rowcount", 0):
            raise NotFound("No such invitation.")
        await emit_security_event(SecurityEventKind.INVITATION_REVOKED, subject=str(invitation_id))
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.post(
        "/invitations/accept",
        response_model=TenantOut,
        responses=problem_responses(
            ErrorCode.FORBIDDEN, ErrorCode.CONFLICT, ErrorCode.QUOTA_EXCEEDED
        ),
    )
    async def accept(
        body: InvitationAccept, request: Request, principal: Authenticated
    ) -> TenantOut:
        """Join the tenant of an invitation sent to the caller's address."""
        identity = _identity(request)
        user_id = _user(principal)
        digest = identity.one_time.lookup_hash(TokenPurpose.INVITATION, body.token)
        now = utc_now()
        async with identity.database.session() as session:
            row = (
                await session.execute(
                    select(one_time_tokens)
                    .where(
                        one_time_tokens.c.token_hash == digest,
                        one_time_tokens.c.purpose == TokenPurpose.INVITATION.value,
                        one_time_tokens.c.used_at.is_(None),
                        one_time_tokens.c.expires_at > now,
                    )
                    .with_for_update()
                )
            ).one_or_none()
            if row is None:
                raise InvalidOneTimeToken
            record = OneTimeTokenRecord(
                id=str(row.id),
                purpose=TokenPurpose.INVITATION,
                subject=row.subject,
                token_hash=bytes(row.token_hash),
                created_at=row.created_at,
                expires_at=row.expires_at,
                tenant=str(row.tenant_id) if row.tenant_id is not None else None,
                data=dict(row.data or {}),
            )
            # Checked before the token is spent: a wrong account must not burn it.
            result = await accept_invitation(session, identity, record, user_id)
            await session.execute(
                update(one_time_tokens)
                .where(one_time_tokens.c.id == row.id, one_time_tokens.c.used_at.is_(None))
                .values(used_at=now)
            )
            tenant = await find_tenant(session, result.tenant_id)
        await identity.permissions.invalidate_user(str(user_id), str(result.tenant_id))
        if result.joined:
            await emit_security_event(
                SecurityEventKind.MEMBER_JOINED,
                subject=str(user_id),
                tenant=str(result.tenant_id),
                details={"role": result.role},
            )
        if tenant is None:
            raise InvalidOneTimeToken
        return _tenant_out(tenant, result.role)

    @router.patch(
        "/{tenant_id}/members/{user_id}",
        response_model=MemberOut,
        responses=problem_responses(ErrorCode.NOT_FOUND, ErrorCode.CONFLICT),
    )
    async def change_role(
        tenant_id: uuid.UUID,
        user_id: uuid.UUID,
        body: RoleChange,
        request: Request,
        principal: Annotated[Principal, Depends(require("members:manage"))],
    ) -> MemberOut:
        """Give a member another role."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        _user(principal)
        _check_role(identity, body.role)
        owner = identity.settings.identity.owner_role
        await _may_grant(identity, principal, body.role)
        now = utc_now()
        async with identity.database.session() as session:
            # What the member made under its old role must not outlast it: invitations
            # it may no longer send, keys with scopes the new role does not grant.
            # Invitations first: accepting one locks its row, then the tenant's, and
            # this takes the same order, so the two cannot deadlock.
            allowed = identity.roles.permissions_for([body.role])
            withdrawn = await _withdraw_invitations_by(
                session, identity, tenant_id, user_id, allowed
            )
            # Key creation takes this lock too: no key is made under the old role
            # after the keys below are checked.
            await _lock_tenant(session, tenant_id)
            current = await membership_role(session, user_id, tenant_id)
            if current is None:
                raise NotFound("No such member.")
            # Changing a member is granting its current role back: the same rule applies.
            await _may_grant(identity, principal, current)
            if current == owner and body.role != owner:
                await _refuse_last_owner(session, tenant_id, user_id, owner)
            await session.execute(
                update(memberships)
                .where(memberships.c.tenant_id == tenant_id, memberships.c.user_id == user_id)
                .values(role=body.role)
            )
            revoked = await _revoke_member_keys(session, tenant_id, user_id, allowed, now)
            row = (
                await session.execute(
                    select(users.c.email, users.c.display_name, memberships.c.created_at)
                    .join(memberships, memberships.c.user_id == users.c.id)
                    .where(memberships.c.tenant_id == tenant_id, users.c.id == user_id)
                )
            ).one()
        await identity.permissions.invalidate_user(str(user_id), str(tenant_id))
        await announce_revoked(identity, revoked, now, reason="role_changed")
        if current != body.role:
            await emit_security_event(
                SecurityEventKind.ROLE_CHANGED,
                subject=str(user_id),
                details={
                    "from_role": current,
                    "to_role": body.role,
                    "api_keys_revoked": len(revoked),
                    "invitations_withdrawn": withdrawn,
                },
            )
        return MemberOut(
            user_id=user_id,
            email=row.email,
            display_name=row.display_name,
            role=body.role,
            joined_at=row.created_at,
        )

    @router.delete(
        "/{tenant_id}/members/{user_id}",
        status_code=status.HTTP_204_NO_CONTENT,
        response_class=Response,
        responses=problem_responses(ErrorCode.NOT_FOUND, ErrorCode.CONFLICT, ErrorCode.FORBIDDEN),
    )
    async def remove(
        tenant_id: uuid.UUID, user_id: uuid.UUID, request: Request, principal: Authenticated
    ) -> Response:
        """Remove a member (``members:manage``), or leave the tenant (anyone, for themself)."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        caller = _user(principal)
        owner = identity.settings.identity.owner_role
        leaving = caller == user_id
        if not leaving:
            await manage_members()
        now = utc_now()
        async with identity.database.session() as session:
            # The invitations it sent end with its membership (rows before the tenant
            # lock, as in change_role); so do its keys, below.
            withdrawn = await _withdraw_invitations_by(session, identity, tenant_id, user_id, None)
            # Key creation takes this lock too (see change_role).
            await _lock_tenant(session, tenant_id)
            current = await membership_role(session, user_id, tenant_id)
            if current is None:
                raise NotFound("No such member.")
            if not leaving:
                await _may_grant(identity, principal, current)
            if current == owner:
                await _refuse_last_owner(session, tenant_id, user_id, owner)
            await session.execute(
                delete(memberships).where(
                    memberships.c.tenant_id == tenant_id, memberships.c.user_id == user_id
                )
            )
            # Its sessions acting for this tenant end with the membership, in the same
            # transaction: both happen or neither.
            refresh = RefreshTokens(
                identity.database, ttl=identity.settings.identity.tokens.refresh_ttl
            )
            revoked = len(await refresh.revoke_tenant_member(user_id, tenant_id, session=session))
            # So do the API keys it made here: they carried its authority.
            keys = await _revoke_member_keys(session, tenant_id, user_id, None, now)
        await identity.permissions.invalidate_user(str(user_id), str(tenant_id))
        await announce_revoked(identity, keys, now, reason="member_removed")
        await emit_security_event(
            SecurityEventKind.MEMBER_REMOVED,
            subject=str(user_id),
            details={
                "role": current,
                "left": leaving,
                "sessions_revoked": revoked,
                "api_keys_revoked": len(keys),
                "invitations_withdrawn": withdrawn,
            },
        )
        return Response(status_code=status.HTTP_204_NO_CONTENT)

    @router.get(
        "/{tenant_id}/usage",
        response_model=TenantUsageOut,
        responses=problem_responses(ErrorCode.NOT_FOUND),
    )
    async def usage(
        tenant_id: uuid.UUID,
        request: Request,
        principal: Annotated[Principal, Depends(require("usage:read"))],
    ) -> TenantUsageOut:
        """The tenant's quotas: each one's limit and the current period's use."""
        identity = _identity(request)
        _own_tenant(principal, tenant_id)
        async with identity.database.sessions() as session:
            tenant = await find_tenant(session, tenant_id)
            if tenant is None:
                raise NotFound("No such tenant.")
            count = await _member_count(session, tenant_id)
        found = await tenant_usage(identity, tenant, count)
        return TenantUsageOut(
            tenant_id=tenant_id,
            quotas={name: UsageOut(**value) for name, value in found.items()},
        )

    return router
