"""Tenants, users and memberships in the database: the few queries everything shares.

Routes, the command line, the permission cache's loader and applications'
tests use these; each takes the caller's session and leaves committing to it,
so a caller can combine several in one transaction.
"""

from __future__ import annotations

import re
import unicodedata
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from sqlalchemy import func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from bastion._ids import uuid7
from bastion.data.types import utc_now
from bastion.identity._tables import EMAIL_MAX, NAME_MAX, SLUG_MAX, memberships, tenants, users

__all__ = [
    "Membership",
    "TenantRecord",
    "UserRecord",
    "add_membership",
    "count_owners",
    "create_tenant",
    "create_user",
    "find_tenant",
    "find_user_by_email",
    "get_user",
    "membership_role",
    "normalise_email",
    "user_memberships",
    "valid_slug",
]

_SLUG: Final = re.compile(rf"[a-z0-9](?:[a-z0-9-]{{0,{SLUG_MAX - 2}}}[a-z0-9])?")


def normalise_email(email: str) -> str:
    """Return the stored form of an address: NFKC, trimmed and case-folded.

    The local part is case-sensitive in theory and case-insensitive in every
    mailbox provider that matters; one account per folded address stops two
    accounts that differ only by case.
    """
    return unicodedata.normalize("NFKC", email).strip().casefold()


def valid_slug(slug: str) -> bool:
    """Whether ``slug`` is 1-63 lowercase letters, digits and inner hyphens."""
    return _SLUG.fullmatch(slug) is not None


@dataclass(frozen=True, slots=True)
class TenantRecord:
    """A row of ``bastion_tenants``."""

    id: uuid.UUID
    slug: str
    name: str
    settings: dict[str, Any]
    created_at: datetime


@dataclass(frozen=True, slots=True)
class UserRecord:
    """A row of ``bastion_users`` (the password hash stays in the database layer's hands)."""

    id: uuid.UUID
    email: str
    display_name: str
    password_hash: str | None
    email_verified_at: datetime | None
    password_changed_at: datetime | None
    disabled_at: datetime | None
    created_at: datetime

    def __repr__(self) -> str:
        # The address is personal data and the hash a secret: neither goes into logs.
        return f"UserRecord(id={self.id!s})"


@dataclass(frozen=True, slots=True)
class Membership:
    """A user's role in one tenant."""

    tenant: TenantRecord
    role: str


async def create_tenant(
    session: AsyncSession, name: str, slug: str, *, settings: dict[str, Any] | None = None
) -> TenantRecord:
    """Insert a tenant.

    Raises:
        ValueError: an empty or too long name, or a malformed slug.
        sqlalchemy.exc.IntegrityError: the slug is taken (on flush or commit).
    """
    if not name.strip() or len(name) > NAME_MAX:
        raise ValueError(f"a tenant name must be 1 to {NAME_MAX} characters")
    if not valid_slug(slug):
        raise ValueError("a slug is 1 to 63 lowercase letters, digits and inner hyphens")
    record = TenantRecord(uuid7(), slug, name.strip(), dict(settings or {}), utc_now())
    await session.execute(
        insert(tenants).values(
            id=record.id,
            slug=record.slug,
            name=record.name,
            settings=record.settings,
            created_at=record.created_at,
        )
    )
    return record


async def create_user(
    session: AsyncSession,
    email: str,
    *,
    password_hash: str | None = None,
    display_name: str | None = None,
    verified: bool = False,
) -> UserRecord:
    """Insert a user (the address is stored normalised).

    Raises:
        ValueError: a malformed address.
        sqlalchemy.exc.IntegrityError: the address is taken.
    """
    folded = normalise_email(email)
    local, _, domain = folded.partition("@")
    if not local or not domain or len(folded) > EMAIL_MAX:
        raise ValueError("not an e-mail address")
    now = utc_now()
    name = (display_name or local)[:NAME_MAX]
    record = UserRecord(
        uuid7(),
        folded,
        name,
        password_hash,
        now if verified else None,
        now if password_hash else None,
        None,
        now,
    )
    await session.execute(
        insert(users).values(
            id=record.id,
            email=record.email,
            display_name=record.display_name,
            password_hash=record.password_hash,
            email_verified_at=record.email_verified_at,
            password_changed_at=record.password_changed_at,
            disabled_at=None,
            created_at=record.created_at,
        )
    )
    return record


async def add_membership(
    session: AsyncSession, tenant_id: uuid.UUID, user_id: uuid.UUID, role: str
) -> None:
    """Make ``user_id`` a member of ``tenant_id`` with ``role``.

    Raises:
        sqlalchemy.exc.IntegrityError: already a member, or no such tenant or user.
    """
    await session.execute(
        insert(memberships).values(
            tenant_id=tenant_id, user_id=user_id, role=role, created_at=utc_now()
        )
    )


def _tenant(row: Any) -> TenantRecord:
    return TenantRecord(row.id, row.slug, row.name, dict(row.settings or {}), row.created_at)


def _user(row: Any) -> UserRecord:
    return UserRecord(
        row.id,
        row.email,
        row.display_name,
        row.password_hash,
        row.email_verified_at,
        row.password_changed_at,
        row.disabled_at,
        row.created_at,
    )


async def find_tenant(session: AsyncSession, key: str | uuid.UUID) -> TenantRecord | None:
    """Return the tenant with this id (a UUID or its text) or slug, else ``None``."""
    if isinstance(key, uuid.UUID):
        condition = tenants.c.id == key
    else:
        try:
            condition = tenants.c.id == uuid.UUID(key)
        except ValueError:
            condition = tenants.c.slug == key
    row = (await session.execute(select(tenants).where(condition))).one_or_none()
    return None if row is None else _tenant(row)


async def get_user(session: AsyncSession, user_id: uuid.UUID) -> UserRecord | None:
    """Return the user with this id, else ``None``."""
    row = (await session.execute(select(users).where(users.c.id == user_id))).one_or_none()
    return None if row is None else _user(row)


async def find_user_by_email(session: AsyncSession, email: str) -> UserRecord | None:
    """Return the user with this address (compared normalised), else ``None``."""
    folded = normalise_email(email)
    row = (await session.execute(select(users).where(users.c.email == folded))).one_or_none()
    return None if row is None else _user(row)


async def membership_role(
    session: AsyncSession, user_id: uuid.UUID, tenant_id: uuid.UUID
) -> str | None:
    """Return the user's role in the tenant, or ``None`` when not a member."""
    role: str | None = await session.scalar(
        select(memberships.c.role).where(
            memberships.c.user_id == user_id, memberships.c.tenant_id == tenant_id
        )
    )
    return role


async def user_memberships(session: AsyncSession, user_id: uuid.UUID) -> list[Membership]:
    """Return the user's memberships, oldest tenant first."""
    rows = await session.execute(
        select(tenants, memberships.c.role)
        .join(memberships, memberships.c.tenant_id == tenants.c.id)
        .where(memberships.c.user_id == user_id)
        .order_by(tenants.c.created_at, tenants.c.id)
    )
    return [Membership(_tenant(row), row.role) for row in rows]


async def count_owners(session: AsyncSession, tenant_id: uuid.UUID, owner_role: str) -> int:
    """Return how many members of the tenant hold ``owner_role``."""
    count: int = (
        await session.scalar(
            select(func.count())
            .select_from(memberships)
            .where(memberships.c.tenant_id == tenant_id, memberships.c.role == owner_role)
        )
        or 0
    )
    return count
