"""Idempotency keys: one row per scoped key, in progress or holding its response.

Revision ID: 0005_idempotency
Revises: 0004_flags
Create Date: 2026-12-07 19:10:00

Hand-written to match bastion.http._tables, with frozen copies of its types so
this revision does not change when the table does.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_idempotency"
down_revision: str | Sequence[str] | None = "0004_flags"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)


def upgrade() -> None:
    """Create the idempotency-key table."""
    op.create_table(
        "bastion_idempotency_keys",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("fingerprint", sa.String(64), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("token", sa.String(32), nullable=True),
        sa.Column("expires_at", _TIMESTAMP, nullable=False),
        sa.Column("status", sa.Integer(), nullable=True),
        sa.Column("headers", sa.Text(), nullable=True),
        sa.Column("body", sa.LargeBinary(), nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_bastion_idempotency_keys")),
        sa.CheckConstraint(
            "state IN ('in_progress', 'complete')",
            name=op.f("ck_bastion_idempotency_keys_state_known"),
        ),
    )
    op.create_index(
        op.f("ix_bastion_idempotency_keys_expires_at"),
        "bastion_idempotency_keys",
        ["expires_at"],
    )


def downgrade() -> None:
    """Drop the idempotency-key table (stored responses go with it; retries execute again)."""
    op.drop_table("bastion_idempotency_keys")
