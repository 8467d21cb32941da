"""The flag tables: flags, segments, and the change log whose last id is the set's revision.

SQLAlchemy Core tables on their own :data:`flags_metadata`, versioned by
bastion's Alembic tree (``0004_flags``).

- ``bastion_flags``: one row per flag; ``definition`` is the JSON of
  :meth:`Flag.model_dump` (``mode="json"``), validated again when read.
  ``version`` starts at 1 and rises by one per change: the optimistic-concurrency
  token behind the admin routes' ETags.
- ``bastion_flag_segments``: the same for segments.
- ``bastion_flag_changes``: one row per change of a flag or segment (who, when,
  the definition before and after). Its id is the *revision* of the whole set:
  every instance compares ``max(id)`` with the revision it compiled, one indexed
  read per poll. Writers serialise on this table (see
  :mod:`bastion.flags._store`), so ids are committed in order and a reader that
  has seen revision ``n`` has seen every change up to ``n``.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
)

from bastion.data.types import NAMING_CONVENTION, UtcDateTime

__all__ = [
    "ACTION_MAX",
    "ACTOR_MAX",
    "KEY_MAX",
    "changes",
    "flags",
    "flags_metadata",
    "segments",
]

KEY_MAX: Final = 200
"""Longest flag key or segment name (``bastion.flags._model.FLAG_KEY_MAX``)."""
ACTOR_MAX: Final = 255
"""``<actor type>:<actor id>`` of who made a change."""
ACTION_MAX: Final = 32

flags_metadata = MetaData(naming_convention=NAMING_CONVENTION)

# SQLite makes an autoincrementing key only of an INTEGER PRIMARY KEY (BIGINT is not
# an alias of the rowid); AUTOINCREMENT also stops it reusing the largest id, so the
# revision never goes back.
_ID = BigInteger().with_variant(Integer(), "sqlite")

flags = Table(
    "bastion_flags",
    flags_metadata,
    Column("key", String(KEY_MAX), primary_key=True),
    Column("definition", Text(), nullable=False),
    Column("version", Integer(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(ACTOR_MAX), nullable=True),
    CheckConstraint("version >= 1", name="version_positive"),
)

segments = Table(
    "bastion_flag_segments",
    flags_metadata,
    Column("name", String(KEY_MAX), primary_key=True),
    Column("definition", Text(), nullable=False),
    Column("version", Integer(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
    Column("updated_by", String(ACTOR_MAX), nullable=True),
    CheckConstraint("version >= 1", name="version_positive"),
)

changes = Table(
    "bastion_flag_changes",
    flags_metadata,
    Column("id", _ID, primary_key=True, autoincrement=True),
    Column("kind", String(16), nullable=False),
    Column("key", String(KEY_MAX), nullable=False),
    Column("action", String(ACTION_MAX), nullable=False),
    # The version the change produced; for a delete, the version deleted.
    Column("version", Integer(), nullable=False),
    Column("actor", String(ACTOR_MAX), nullable=True),
    Column("at", UtcDateTime(), nullable=False),
    Column("before", Text(), nullable=True),
    Column("after", Text(), nullable=True),
    CheckConstraint("kind IN ('flag', 'segment')", name="kind_known"),
    # A flag's history, newest first, without a sort.
    Index(None, "kind", "key", "id"),
    sqlite_autoincrement=True,
)
