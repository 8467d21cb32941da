"""Index documents.created_by, the one foreign key no index led.

Revision ID: 0002
Revises: 0001
Create Date: 2025-06-01

Every foreign key's columns now lead an index, so deleting or re-keying a user
does not scan ``documents`` to check the reference (PostgreSQL indexes the
referenced side of a foreign key, never the referencing one). The other keys
were led already: ``users.tenant_id`` by ``uq_users_tenant_id_email``, and
``documents.tenant_id`` by ``ix_documents_tenant_id_created_at_id``, which also
serves the document list (tenant, then newest first, ties by id).

``documents`` holds data when this runs, so on PostgreSQL the index is built
``CONCURRENTLY``: a plain ``CREATE INDEX`` holds a SHARE lock that blocks every
write to the table for the whole build. ``CONCURRENTLY`` cannot run inside a
transaction, hence the autocommit block; ``IF NOT EXISTS`` makes a re-run after
an interrupted build a no-op rather than an error (an interrupted concurrent
build leaves an INVALID index behind: drop it and re-run). On SQLite the
dialect ignores ``postgresql_concurrently`` and the autocommit block changes
nothing that matters: the statement is ``CREATE INDEX IF NOT EXISTS``.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.get_context().autocommit_block():
        op.create_index(
            op.f("ix_documents_created_by"),
            "documents",
            ["created_by"],
            postgresql_concurrently=True,
            if_not_exists=True,
        )


def downgrade() -> None:
    with op.get_context().autocommit_block():
        op.drop_index(
            op.f("ix_documents_created_by"),
            table_name="documents",
            postgresql_concurrently=True,
            if_exists=True,
        )
