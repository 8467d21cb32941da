"""The audit tables: entries, log heads, tiles, checkpoints, subject keys and pruning records.

SQLAlchemy Core tables on their own :data:`audit_metadata`, versioned by
bastion's Alembic tree (``0003_audit``), which also installs the append-only
guards (grants and triggers) on the tables marked so below.

- ``bastion_audit_entries`` (append-only): one row per event, one column per
  field, so operators query it with SQL. ``(log_id, seq)`` is the entry's
  position in its log's Merkle tree. ``leaf_hash`` is a copy kept to serve
  proofs fast; verification never trusts it and re-derives every leaf from the
  columns.
- ``bastion_audit_logs``: each log's head (size, root, compact range). Mutable and
  untrusted: it only saves appenders from re-reading the tree; it is locked
  (``FOR UPDATE``) by each append, which makes every log's writer single.
- ``bastion_audit_nodes`` (append-only): perfect-subtree hashes at every eighth
  level (tiles of 256), so a proof reads O(256 log n) hashes, not the whole log.
- ``bastion_audit_checkpoints`` (append-only): signed notes (C2SP
  tlog-checkpoint) committing to a log's size and root.
- ``bastion_audit_subject_keys``: each data subject's key, wrapped; deleting the
  row is crypto-shredding (the entries stay, their personal fields unreadable).
- ``bastion_audit_pruned`` (append-only) and ``bastion_audit_segments``
  (append-only): pruned entries keep their leaf hash, and the segment that
  archived them names its file and its SHA-256.
"""

from __future__ import annotations

from typing import Final

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    Column,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    SmallInteger,
    String,
    Table,
    Text,
    Uuid,
)

from bastion.data.types import NAMING_CONVENTION, UtcDateTime

__all__ = [
    "ACTION_MAX",
    "APPEND_ONLY_TABLES",
    "LOG_ID_MAX",
    "audit_metadata",
    "checkpoints",
    "entries",
    "logs",
    "nodes",
    "pruned",
    "segments",
    "subject_keys",
]

LOG_ID_MAX: Final = 100
ACTION_MAX: Final = 100
OUTCOME_MAX: Final = 16
ACTOR_TYPE_MAX: Final = 16
ACTOR_ID_MAX: Final = 255
RESOURCE_TYPE_MAX: Final = 100
RESOURCE_ID_MAX: Final = 255
REQUEST_ID_MAX: Final = 128
TRACE_ID_MAX: Final = 32
SUBJECT_MAX: Final = 200
KEY_NAME_MAX: Final = 200

audit_metadata = MetaData(naming_convention=NAMING_CONVENTION)

entries = Table(
    "bastion_audit_entries",
    audit_metadata,
    Column("log_id", String(LOG_ID_MAX), nullable=False),
    Column("seq", BigInteger(), nullable=False),
    Column("id", Uuid(), nullable=False, unique=True),
    Column("occurred_at", UtcDateTime(), nullable=False),
    Column("action", String(ACTION_MAX), nullable=False),
    Column("outcome", String(OUTCOME_MAX), nullable=False),
    Column("actor_type", String(ACTOR_TYPE_MAX), nullable=False),
    Column("actor_id", String(ACTOR_ID_MAX), nullable=True),
    Column("tenant_id", Uuid(), nullable=True),
    Column("resource_type", String(RESOURCE_TYPE_MAX), nullable=True),
    Column("resource_id", String(RESOURCE_ID_MAX), nullable=True),
    Column("request_id", String(REQUEST_ID_MAX), nullable=True),
    Column("trace_id", String(TRACE_ID_MAX), nullable=True),
    # Which subject's key encrypts email, ip and user_agent ("user:<id>", ...).
    Column("subject", String(SUBJECT_MAX), nullable=True),
    Column("email", LargeBinary(), nullable=True),
    Column("ip", LargeBinary(), nullable=True),
    Column("user_agent", LargeBinary(), nullable=True),
    # Canonical JSON text (sorted keys, no spaces): a JSON column would renormalise
    # numbers and key order, and the leaf hash covers these exact characters.
    Column("details", Text(), nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    PrimaryKeyConstraint("log_id", "seq"),
    # A position far out of range would make verification walk to it; refuse it here.
    CheckConstraint("seq >= 0", name="seq_not_negative"),
    # The filters of GET /admin/audit, each with id to keep its cursor on the index.
    Index(None, "tenant_id", "id"),
    Index(None, "actor_id", "id"),
    Index(None, "action", "id"),
    Index(None, "resource_type", "resource_id", "id"),
    Index(None, "occurred_at"),
)

logs = Table(
    "bastion_audit_logs",
    audit_metadata,
    Column("log_id", String(LOG_ID_MAX), primary_key=True),
    Column("size", BigInteger(), nullable=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    # CompactRange.to_bytes(): one 32-byte hash per set bit of size, largest first.
    Column("frontier", LargeBinary(), nullable=False),
    Column("updated_at", UtcDateTime(), nullable=False),
)

nodes = Table(
    "bastion_audit_nodes",
    audit_metadata,
    Column("log_id", String(LOG_ID_MAX), nullable=False),
    Column("level", SmallInteger(), nullable=False),
    Column("index", BigInteger(), nullable=False),
    Column("hash", LargeBinary(32), nullable=False),
    PrimaryKeyConstraint("log_id", "level", "index"),
)

checkpoints = Table(
    "bastion_audit_checkpoints",
    audit_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("log_id", String(LOG_ID_MAX), nullable=False),
    Column("tree_size", BigInteger(), nullable=False),
    Column("root_hash", LargeBinary(32), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
    Column("key_name", String(KEY_NAME_MAX), nullable=False),
    # The whole signed note: body (origin, size, root, timestamp) and signature lines.
    Column("note", Text(), nullable=False),
    Index(None, "log_id", "tree_size"),
    CheckConstraint("tree_size >= 0", name="tree_size_not_negative"),
)

subject_keys = Table(
    "bastion_audit_subject_keys",
    audit_metadata,
    Column("subject", String(SUBJECT_MAX), primary_key=True),
    # AES-256-GCM key wrapped under audit.encryption_key: nonce || ciphertext.
    Column("wrapped_key", LargeBinary(), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

segments = Table(
    "bastion_audit_segments",
    audit_metadata,
    Column("id", Uuid(), primary_key=True),
    Column("log_id", String(LOG_ID_MAX), nullable=False),
    Column("entry_count", Integer(), nullable=False),
    Column("first_seq", BigInteger(), nullable=False),
    Column("last_seq", BigInteger(), nullable=False),
    Column("tree_size", BigInteger(), nullable=False),
    Column("archive_name", String(500), nullable=False),
    Column("archive_sha256", LargeBinary(32), nullable=False),
    Column("created_at", UtcDateTime(), nullable=False),
)

pruned = Table(
    "bastion_audit_pruned",
    audit_metadata,
    Column("log_id", String(LOG_ID_MAX), nullable=False),
    Column("seq", BigInteger(), nullable=False),
    Column("leaf_hash", LargeBinary(32), nullable=False),
    Column("segment_id", Uuid(), nullable=False),
    PrimaryKeyConstraint("log_id", "seq"),
    CheckConstraint("seq >= 0", name="seq_not_negative"),
)

APPEND_ONLY_TABLES: Final = (
    "bastion_audit_entries",
    "bastion_audit_nodes",
    "bastion_audit_checkpoints",
    "bastion_audit_segments",
    "bastion_audit_pruned",
)
"""Tables no statement may UPDATE, DELETE or TRUNCATE (entries: DELETE only to prune)."""
