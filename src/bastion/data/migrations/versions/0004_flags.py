"""Feature flags: flags, segments and their change log.

Revision ID: 0004_flags
Revises: 0003_audit
Create Date: 2026-12-07 16:00:00

Hand-written to match bastion.flags._tables, with frozen copies of its types so
this revision does not change when the tables do.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_flags"
down_revision: str | Sequence[str] | None = "0003_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)
# SQLite autoincrements only an INTEGER PRIMARY KEY.
_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    """Create the flag, segment and change tables."""
    op.create_table(
        "bastion_flags",
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_bastion_flags")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_bastion_flags_version_positive")),
    )
    op.create_table(
        "bastion_flag_segments",
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("definition", sa.Text(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("updated_at", _TIMESTAMP, nullable=False),
        sa.Column("updated_by", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_bastion_flag_segments")),
        sa.CheckConstraint("version >= 1", name=op.f("ck_bastion_flag_segments_version_positive")),
    )
    op.create_table(
        "bastion_flag_changes",
        sa.Column("id", _ID, autoincrement=True, nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("key", sa.String(200), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("actor", sa.String(255), nullable=True),
        sa.Column("at", _TIMESTAMP, nullable=False),
        sa.Column("before", sa.Text(), nullable=True),
        sa.Column("after", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_flag_changes")),
        sa.CheckConstraint(
            "kind IN ('flag', 'segment')", name=op.f("ck_bastion_flag_changes_kind_known")
        ),
        sqlite_autoincrement=True,
    )
    op.create_index(
        op.f("ix_bastion_flag_changes_kind_key_id"),
        "bastion_flag_changes",
        ["kind", "key", "id"],
    )


def downgrade() -> None:
    """Drop the flag tables (the flags and their history go with them)."""
    op.drop_table("bastion_flag_changes")
    op.drop_table("bastion_flag_segments")
    op.drop_table("bastion_flags")
