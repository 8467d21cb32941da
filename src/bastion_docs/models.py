"""The tables of Bastion Docs: documents, owned by bastion's tenants and written by its users.

Tenants, users and their memberships are bastion's identity tables
(:mod:`bastion.identity`: ``bastion_tenants``, ``bastion_users``,
``bastion_memberships``, ``bastion_api_keys``); the service's own rows refer to
them by column object, so the two trees keep separate ``MetaData`` and bastion's
tree is applied first.

Every row that belongs to a tenant carries ``tenant_id``, and every query the
API runs goes through :func:`bastion.tenancy.scoped`, which adds the filter on
it; that filter is the isolation boundary between tenants. Indexes follow two
rules: every foreign key's columns lead an index (or the primary key or a
unique constraint), and every list endpoint's sort key follows ``tenant_id`` in
one, so a page is read from the index in order.

Schema changes go through the Alembic tree beside this module
(``bastion_docs:migrations``); ``versions/`` must describe exactly these tables.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Final

from sqlalchemy import (
    JSON,
    Boolean,
    CheckConstraint,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    Uuid,
    false,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from bastion.data.types import NAMING_CONVENTION, UtcDateTime, utc_now
from bastion.identity import api_keys, tenants, users
from bastion_docs.ids import uuid7

__all__ = [
    "DOCUMENT_TITLE_MAX",
    "Base",
    "Document",
    "UtcDateTime",
    "metadata",
    "utc_now",
]

DOCUMENT_TITLE_MAX: Final = 200

# Explicit constraint names, so migrations can refer to them and they are the
# same on SQLite and PostgreSQL.
metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Base(DeclarativeBase):
    """Declarative base bound to :data:`metadata`."""

    metadata = metadata
    type_annotation_map = {  # noqa: RUF012 -- SQLAlchemy reads this class attribute
        datetime: UtcDateTime,
        uuid.UUID: Uuid(),
    }


class Document(Base):
    """A titled text with tags, owned by a tenant and versioned on every change.

    Its author is a user (``created_by``) or, for documents written by an
    automation, an API key of the tenant (``created_by_api_key``); never both.
    Both are cleared, not cascaded, when the account or key row is deleted: the
    document belongs to the tenant, not to its author. Reading a ``sensitive``
    one is recorded in the audit trail (``document.read``).
    """

    __tablename__ = "documents"
    __table_args__ = (
        # The list endpoint: one tenant's documents, newest first, ties broken by id.
        Index(None, "tenant_id", "created_at", "id"),
        CheckConstraint("version >= 1", name="version_positive"),
        CheckConstraint("created_by IS NULL OR created_by_api_key IS NULL", name="one_author"),
    )

    id: Mapped[uuid.UUID] = mapped_column(primary_key=True, default=uuid7)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey(tenants.c.id, ondelete="CASCADE"))
    title: Mapped[str] = mapped_column(String(DOCUMENT_TITLE_MAX))
    body: Mapped[str] = mapped_column(Text)
    # JSONB on PostgreSQL so tag filters can use containment and a GIN index later.
    tags: Mapped[list[str]] = mapped_column(JSON().with_variant(JSONB(), "postgresql"))
    # Indexed: a foreign key's own side gets no index by itself, and without one every
    # delete of a user (or key) would scan documents to clear the reference.
    created_by: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey(users.c.id, ondelete="SET NULL"), index=True
    )
    created_by_api_key: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey(api_keys.c.id, ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utc_now)
    updated_at: Mapped[datetime] = mapped_column(default=utc_now)
    version: Mapped[int] = mapped_column(Integer, default=1)
    sensitive: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
