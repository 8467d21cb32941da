"""Audit: entries, log heads, tiles, checkpoints, subject keys, segments and pruned leaves.

Revision ID: 0003_audit
Revises: 0002_identity
Create Date: 2026-12-07 13:00:00

Hand-written to match bastion.audit._tables, with frozen copies of its types so
this revision does not change when the tables do. The append-only guards
(grants and triggers) are installed after the tables, from this revision's own
frozen SQL files beside it (``0003_audit_guards.<dialect>.sql``, copies of
bastion/audit/sql's version 1): a later change to the guards is a new revision.
"""

import re
from collections.abc import Sequence
from pathlib import Path

import sqlalchemy as sa
from alembic import op

revision: str = "0003_audit"
down_revision: str | Sequence[str] | None = "0002_identity"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the audit tables and their append-only guards."""
    op.create_table(
        "bastion_audit_entries",
        sa.Column("log_id", sa.String(100), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("occurred_at", _TIMESTAMP, nullable=False),
        sa.Column("action", sa.String(100), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("actor_type", sa.String(16), nullable=False),
        sa.Column("actor_id", sa.String(255), nullable=True),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("resource_type", sa.String(100), nullable=True),
        sa.Column("resource_id", sa.String(255), nullable=True),
        sa.Column("request_id", sa.String(128), nullable=True),
        sa.Column("trace_id", sa.String(32), nullable=True),
        sa.Column("subject", sa.String(200), nullable=True),
        sa.Column("email", sa.LargeBinary(), nullable=True),
        sa.Column("ip", sa.LargeBinary(), nullable=True),
        sa.Column("user_agent", sa.LargeBinary(), nullable=True),
        sa.Column("details", sa.Text(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("log_id", "seq", name=op.f("pk_bastion_audit_entries")),
        sa.CheckConstraint("seq >= 0", name=op.f("ck_bastion_audit_entries_seq_not_negative")),
        sa.UniqueConstraint("id", name=op.f("uq_bastion_audit_entries_id")),
    )
    for columns in (
        ("tenant_id", "id"),
        ("actor_id", "id"),
        ("action", "id"),
        ("resource_type", "resource_id", "id"),
        ("occurred_at",),
    ):
        op.create_index(
            op.f("ix_bastion_audit_entries_" + "_".join(columns)),
            "bastion_audit_entries",
            list(columns),
        )
    op.create_table(
        "bastion_audit_logs",
        sa.Column("log_id", sa.String(100), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("frontier", sa.LargeBinary(), nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("log_id", name=op.f("pk_bastion_audit_logs")),
    )
    op.create_table(
        "bastion_audit_nodes",
        sa.Column("log_id", sa.String(100), nullable=False),
        sa.Column("level", sa.SmallInteger(), nullable=False),
        sa.Column("index", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.PrimaryKeyConstraint("log_id", "level", "index", name=op.f("pk_bastion_audit_nodes")),
    )
    op.create_table(
        "bastion_audit_checkpoints",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("log_id", sa.String(100), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("root_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("key_name", sa.String(200), nullable=False),
        sa.Column("note", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_audit_checkpoints")),
        sa.CheckConstraint(
            "tree_size >= 0", name=op.f("ck_bastion_audit_checkpoints_tree_size_not_negative")
        ),
    )
    op.create_index(
        op.f("ix_bastion_audit_checkpoints_log_id_tree_size"),
        "bastion_audit_checkpoints",
        ["log_id", "tree_size"],
    )
    op.create_table(
        "bastion_audit_subject_keys",
        sa.Column("subject", sa.String(200), nullable=False),
        sa.Column("wrapped_key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("subject", name=op.f("pk_bastion_audit_subject_keys")),
    )
    op.create_table(
        "bastion_audit_segments",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("log_id", sa.String(100), nullable=False),
        sa.Column("entry_count", sa.Integer(), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("tree_size", sa.BigInteger(), nullable=False),
        sa.Column("archive_name", sa.String(500), nullable=False),
        sa.Column("archive_sha256", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_audit_segments")),
    )
    op.create_table(
        "bastion_audit_pruned",
        sa.Column("log_id", sa.String(100), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("leaf_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("segment_id", sa.Uuid(), nullable=False),
        sa.PrimaryKeyConstraint("log_id", "seq", name=op.f("pk_bastion_audit_pruned")),
        sa.CheckConstraint("seq >= 0", name=op.f("ck_bastion_audit_pruned_seq_not_negative")),
    )
    _install_guards()


def _install_guards() -> None:
    """Run this revision's guard SQL for the dialect; its statements end with a line ``;``."""
    dialect = op.get_context().dialect.name
    source = Path(__file__).with_name(f"0003_audit_guards.{dialect}.sql").read_text("utf-8")
    for statement in re.split(r"^;[ \t]*$", source, flags=re.MULTILINE):
        lines = [line.strip() for line in statement.splitlines()]
        if any(line and not line.startswith("--") for line in lines):
            op.execute(statement.strip())


def downgrade() -> None:
    """Drop the audit tables (and with them their guards)."""
    for table in (
        "bastion_audit_pruned",
        "bastion_audit_segments",
        "bastion_audit_subject_keys",
        "bastion_audit_checkpoints",
        "bastion_audit_nodes",
        "bastion_audit_logs",
        "bastion_audit_entries",
    ):
        op.drop_table(table)
    if op.get_context().dialect.name == "postgresql":
        # Triggers go with their tables, their functions do not; the role is
        # cluster-wide (other databases may use it) and stays.
        op.execute("DROP FUNCTION IF EXISTS bastion_audit_refuse(), bastion_audit_check_pruned()")
    else:
        op.drop_table("bastion_audit_prune_grants")
