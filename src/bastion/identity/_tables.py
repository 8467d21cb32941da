"""The identity tables: tenants, users, memberships, refresh tokens, API keys, single-use tokens.

SQLAlchemy Core tables on their own :data:`identity_metadata`, versioned by
bastion's Alembic tree (``0002_identity``). Users are global (one account per
e-mail address, stored case-folded) and belong to tenants through memberships
that carry the role. Every secret is stored as a hash: refresh tokens and
single-use tokens as SHA-256 of 256 random bits (a keyed hash adds nothing to
a value no one can guess), API keys as HMAC-SHA256 under the server secret
(see :class:`~bastion.identity.ApiKeys`).

An application's own tables refer to these by column object, so they need not
share a ``MetaData``::

    created_by = mapped_column(ForeignKey(users.c.id))
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    JSON,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Table,
    Uuid,
)
from sqlalchemy.dialects.postgresql import JSONB

from bastion.data.types import NAMING_CONVENTION, UtcDateTime

__all__ = [
    "EMAIL_MAX",
    "NAME_MAX",
    "ROLE_MAX",
    "SLUG_MAX",
    "api_keys",
    "identity_metadata",
    "memberships",
    "one_time_tokens",
    "refresh_families",
    "refresh_tokens",
    "tenants",
    "users",
]

EMAIL_MAX: Final = 254  # RFC 5321's limit on a forward path, less the angle brackets
NAME_MAX: Final = 200
SLUG_MAX: Final = 63
ROLE_MAX: Final = 64
_HASH_BYTES: Final = 32

identity_metadata = MetaData(naming_convention=NAMING_CONVENTION)

_JSON = JSON().with_variant(JSONB(), "postgresql")

tenants = Table(
    "bastion_tenants",
    identity_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("slug", String(SLUG_MAX), nullable=False, unique=True),
    Column("name", String(NAME_MAX), nullable=False),
    # Per-tenant overrides: {"quotas": {...}, "ratelimit": {"default": "..."}}.
    Column("settings", _JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

users = Table(
    "bastion_users",
    identity_metadata,
    Column("id", Uuid(), primary_key=True),
    # Case-folded; unique across the service: users are global.
    Column("email", String(EMAIL_MAX), nullable=False, unique=True),
    Column("display_name", String(NAME_MAX), nullable=False),
    # NULL: no password (created by an operator or imported, until a reset sets one).
    Column("password_hash", String(512), nullable=True),
    Column("email_verified_at", UtcDateTime(), nullable=True),
    Column("password_changed_at", UtcDateTime(), nullable=True),
    Column("disabled_at", UtcDateTime(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
)

memberships = Table(
    "bastion_memberships",
    identity_metadata,
    Column("tenant_id", Uuid(), ForeignKey(tenants.c.id, ondelete="CASCADE"), nullable=False),
    Column("user_id", Uuid(), ForeignKey(users.c.id, ondelete="CASCADE"), nullable=False),
    Column("role", String(ROLE_MAX), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    PrimaryKeyConstraint("tenant_id", "user_id"),
    # "Which tenants is this user in" (login, refresh) reads this index.
    Index(None, "user_id"),
)

refresh_families = Table(
    "bastion_refresh_families",
    identity_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("user_id", Uuid(), ForeignKey(users.c.id, ondelete="CASCADE"), nullable=False),
    # The tenant the family's latest access token acts for; NULL before the user has one.
    Column("tenant_id", Uuid(), ForeignKey(tenants.c.id, ondelete="SET NULL"), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("last_used_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("revoked_at", UtcDateTime(), nullable=True),
    # A bastion.identity._accounts.RevocationReason value (logout, reuse, email_verified...).
    Column("revoked_reason", String(32), nullable=True),
    Index(None, "user_id"),
    Index(None, "tenant_id"),
)

refresh_tokens = Table(
    "bastion_refresh_tokens",
    identity_metadata,
    Column("id", Uuid(), primary_key=True),
    Column(
        "family_id",
        Uuid(),
        ForeignKey(refresh_families.c.id, ondelete="CASCADE"),
        nullable=False,
        index=True,
    ),
    Column("token_hash", LargeBinary(_HASH_BYTES), nullable=False, unique=True),
    Column("created_at", UtcDateTime(), nullable=False),
    # Set when the token is exchanged; presenting it again is reuse.
    Column("used_at", UtcDateTime(), nullable=True),
)

api_keys = Table(
    "bastion_api_keys",
    identity_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("tenant_id", Uuid(), ForeignKey(tenants.c.id, ondelete="CASCADE"), nullable=False),
    Column("name", String(NAME_MAX), nullable=False),
    Column("scopes", _JSON, nullable=False),
    Column("prefix", String(64), nullable=False),
    Column("public_id", String(32), nullable=False, unique=True),
    Column("hash", LargeBinary(_HASH_BYTES), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=True),
    Column("last_used_at", UtcDateTime(), nullable=True),
    Column("revoked_at", UtcDateTime(), nullable=True),
    Column(
        "created_by", Uuid(), ForeignKey(users.c.id, ondelete="SET NULL"), nullable=True, index=True
    ),
    # The list endpoint: one tenant's keys, newest first.
    Index(None, "tenant_id", "created_at"),
)

one_time_tokens = Table(
    "bastion_one_time_tokens",
    identity_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("purpose", String(32), nullable=False),
    # A user id, or an invitee's case-folded e-mail address.
    Column("subject", String(EMAIL_MAX), nullable=False),
    Column("token_hash", LargeBinary(_HASH_BYTES), nullable=False, unique=True),
    Column("tenant_id", Uuid(), ForeignKey(tenants.c.id, ondelete="CASCADE"), nullable=True),
    Column("data", _JSON, nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("used_at", UtcDateTime(), nullable=True),
    CheckConstraint(
        "purpose IN ('email_verification', 'password_reset', 'invitation')", name="purpose"
    ),
    # Superseding: "void the unused tokens of this purpose for this subject".
    Index(None, "purpose", "subject"),
    Index(None, "tenant_id"),
)
