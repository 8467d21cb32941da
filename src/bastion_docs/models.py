"""The tables of Bastion Docs: tenants, their users, and documents.

Every row that belongs to a tenant carries ``tenant_id``, and every query the
API runs filters on it; that filter is the isolation boundary between tenants.
Indexes follow two rules: every foreign key's columns lead an index (or the
primary key or a unique constraint), and every list endpoint's sort key follows
``tenant_id`` in one, so a page is read from the index in order.

A user belongs to exactly one tenant, and email addresses are unique within a
tenant, not globally: a global constraint would let one tenant learn, through
a conflict, that an address is registered with another.

Schema changes go through the Alembic tree beside this module
(``bastion_docs:migrations``); ``versions/`` must describe exactly these tables.
"""

from __future__ import annotations

import enum
import uuid
from datetime import UTC, datetime
from typing import Any, Final

from sqlalchemy import (
    JSON,
    CheckConstraint,
    DateTime,
    Dialect,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bastion_docs.ids import uuid7

__all__ = [
    "DOCUMENT_TITLE_MAX",
    "Base",
    "Document",
    "Role",
    "Tenant",
    "User",
    "UtcDateTime",
    "metadata",
    "utc_now",
]

DOCUMENT_TITLE_MAX: Final = 200
EMAIL_MAX: Final = 254  # RFC 5321's limit on a forward path, less the angle brackets
NAME_MAX: Final = 200
SLUG_MAX: Final = 63

# Explicit constraint names, so migrations can refer to them and they are the
# same on SQLite and PostgreSQL.
NAMING_CONVENTION: Final = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Role(enum.StrEnum):
    """What a user may do in their tenant, from most to least powerful."""

    OWNER = "owner"
    ADMIN = "admin"
    MEMBER = "member"
    VIEWER = "viewer"

    @property
    def can_write(self) -> bool:
        """Whether the role may create, change and delete documents."""
        return self is not Role.VIEWER

    @property
    def can_manage_users(self) -> bool:
        """Whether the role may add users to its tenant."""
        return self in {Role.OWNER, Role.ADMIN}


_ROLE_VALUES: Final = ", ".join(f"'{role.value}'" for role in Role)


def utc_now() -> datetime:
    """Return the current instant, timezone-aware in UTC."""
    return datetime.now(UTC)


class UtcDateTime(TypeDecorator[datetime]):
    """A timestamp stored in UTC and always read back timezone-aware.

    PostgreSQL's ``timestamptz`` keeps the offset, but SQLite stores text and
    hands back naive values; normalising on both sides makes the two alike.
    Naive values are refused rather than guessed at.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        """Convert to UTC before storing; SQLite's text form then sorts by instant."""
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetimes are ambiguous; pass a timezone-aware value")
        return value.astimezone(UTC)

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        """Attach UTC to what SQLite returns; convert what PostgreSQL returns."""
        if value is None:
            return None
        if not isinstance(value, datetime):
            raise TypeError(f"expected a datetime from the driver, got {type(value).__name__}")
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Base(DeclarativeBase):
    """Declarative base bound to :data:`metadata`."""

    metadata = metadata
    type_annotation_map = {  # noqa: RUF012 -- SQLAlchemy reads this class attribute
        datetime: UtcDateTime,
        uuid.UUID: Uuid(),
    }


class Tenant(Base):
    """An organisation: the unit of isolation."""

    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    slug: Mapped[str] = mapped_column(String(SLUG_MAX), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class User(Base):
    """A person's account in one tenant, with their role there."""

    __tablename__ = "users"
    __table_args__ = (
        UniqueConstraint("tenant_id", "email"),
        CheckConstraint(f"role IN ({_ROLE_VALUES})", name="role"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    email: Mapped[str] = mapped_column(String(EMAIL_MAX))
    display_name: Mapped[str] = mapped_column(String(NAME_MAX))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[datetime] = mapped_column(default=utc_now)


class Document(Base):
    """A titled text with tags, owned by a tenant and versioned on every change."""

    __tablename__ = "documents"
    __table_args__ = (
        # The list endpoint: one tenant's documents, newest first, ties broken by id.
        Index(None, "tenant_id", "created_at", "id"),
        CheckConstraint("version >= 1", name="version_positive"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(DOCUMENT_TITLE_MAX))
    body: Mapped[str] = mapped_column(Text)
    # JSONB on PostgreSQL so tag filters can use containment and a GIN index later.
    tags: Mapped[list[str]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))
    # Indexed: a foreign key's own side gets no index by itself, and without one every
    # delete of a user would scan documents to check the reference.
    created_by: Mapped[uuid.UUID] = mapped_column(ForeignKey("users.id"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
    version: Mapped[int] = mapped_column(Integer, default=1)
