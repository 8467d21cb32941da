"""The idempotency-key table: one row per scoped key, in progress or holding its response.

A SQLAlchemy Core table on its own :data:`idempotency_metadata`, versioned by
bastion's Alembic tree (``0005_idempotency``).

- ``key``: SHA-256 (hex) of the caller's scope, the route and the client's key;
  never the key itself, so the table holds nothing a caller sent but the response.
- ``state``: ``in_progress`` while a request holds the key (``token`` names the
  holder, ``expires_at`` is its lock expiry), ``complete`` once its response is
  stored (``expires_at`` is then the end of the replay window).
- ``expires_at`` drives the takeover of a crashed holder's key and the purge,
  hence its index.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Table,
    Text,
)

from bastion.data.types import NAMING_CONVENTION, UtcDateTime

__all__ = [
    "DIGEST_LENGTH",
    "STATE_COMPLETE",
    "STATE_IN_PROGRESS",
    "TOKEN_LENGTH",
    "idempotency_keys",
    "idempotency_metadata",
]

DIGEST_LENGTH: Final = 64
"""Hex SHA-256: the record key and the request fingerprint."""
TOKEN_LENGTH: Final = 32
"""Hex of the 128 random bits naming the request that holds a key."""
STATE_IN_PROGRESS: Final = "in_progress"
STATE_COMPLETE: Final = "complete"

idempotency_metadata = MetaData(naming_convention=NAMING_CONVENTION)

idempotency_keys = Table(
    "bastion_idempotency_keys",
    idempotency_metadata,
    Column("key", String(DIGEST_LENGTH), primary_key=True),
    Column("fingerprint", String(DIGEST_LENGTH), nullable=False),
    Column("state", String(16), nullable=False),
    # The holder while in progress; NULL once complete.
    Column("token", String(TOKEN_LENGTH), nullable=True),
    Column("expires_at", UtcDateTime(), nullable=False),
    Column("status", Integer(), nullable=True),
    # JSON list of [name, value] pairs (latin-1), as the app sent them.
    Column("headers", Text(), nullable=True),
    Column("body", LargeBinary(), nullable=True),
    Column("created_at", UtcDateTime(), nullable=False),
    CheckConstraint("state IN ('in_progress', 'complete')", name="state_known"),
    # The purge's batches and nothing else read by expiry.
    Index(None, "expires_at"),
)
