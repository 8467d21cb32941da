"""Baseline of bastion's own schema: no tables yet.

Later issues add the bastion_* tables (audit log, outbox, flags...) as revisions
on top of this one. Its only effect is to create bastion_alembic_version, so a
database can be told apart from one bastion never touched.

Revision ID: 0001_baseline
Revises:
Create Date: 2026-11-22 01:27:05
"""

from collections.abc import Sequence

revision: str = "0001_baseline"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing to create: the baseline only anchors the tree."""


def downgrade() -> None:
    """Nothing to drop."""
