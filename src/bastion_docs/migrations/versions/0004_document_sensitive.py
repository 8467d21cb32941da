"""Documents can be marked sensitive: reading one is recorded in the audit trail.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-07

Adds ``documents.sensitive``, a boolean that is false for every existing row.
The server default makes the ``ADD COLUMN`` a metadata-only change on
PostgreSQL 11 and later (no table rewrite, no long lock) and fills the column
on SQLite; the model keeps the same default so both sides agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "documents",
        sa.Column("sensitive", sa.Boolean(), nullable=False, server_default=sa.false()),
    )


def downgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_column("sensitive")
