"""Identity: tenants, users, memberships, refresh token families, API keys, single-use tokens.

Revision ID: 0002_identity
Revises: 0001_baseline
Create Date: 2026-12-07 10:00:00

Hand-written to match bastion.identity._tables, with frozen copies of its types
so this revision does not change when the tables do.
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_identity"
down_revision: str | Sequence[str] | None = "0001_baseline"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_TIMESTAMP = sa.DateTime(timezone=True)
_JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")


def _fk(table: str, column: str, target: str, ondelete: str) -> sa.ForeignKeyConstraint:
    return sa.ForeignKeyConstraint(
        [column],
        [f"{target}.id"],
        name=op.f(f"fk_{table}_{column}_{target}"),
        ondelete=ondelete,
    )


def upgrade() -> None:
    """Create the identity tables."""
    op.create_table(
        "bastion_tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("settings", _JSON, nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_tenants")),
        sa.UniqueConstraint("slug", name=op.f("uq_bastion_tenants_slug")),
    )
    op.create_table(
        "bastion_users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("password_hash", sa.String(512), nullable=True),
        sa.Column("email_verified_at", _TIMESTAMP, nullable=True),
        sa.Column("password_changed_at", _TIMESTAMP, nullable=True),
        sa.Column("disabled_at", _TIMESTAMP, nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_users")),
        sa.UniqueConstraint("email", name=op.f("uq_bastion_users_email")),
    )
    op.create_table(
        "bastion_memberships",
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("role", sa.String(64), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("tenant_id", "user_id", name=op.f("pk_bastion_memberships")),
        _fk("bastion_memberships", "tenant_id", "bastion_tenants", "CASCADE"),
        _fk("bastion_memberships", "user_id", "bastion_users", "CASCADE"),
    )
    op.create_index(op.f("ix_bastion_memberships_user_id"), "bastion_memberships", ["user_id"])
    op.create_table(
        "bastion_refresh_families",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("user_id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("last_used_at", _TIMESTAMP, nullable=False),
        sa.Column("expires_at", _TIMESTAMP, nullable=False),
        sa.Column("revoked_at", _TIMESTAMP, nullable=True),
        sa.Column("revoked_reason", sa.String(32), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_refresh_families")),
        _fk("bastion_refresh_families", "user_id", "bastion_users", "CASCADE"),
        _fk("bastion_refresh_families", "tenant_id", "bastion_tenants", "SET NULL"),
    )
    op.create_index(
        op.f("ix_bastion_refresh_families_user_id"), "bastion_refresh_families", ["user_id"]
    )
    op.create_index(
        op.f("ix_bastion_refresh_families_tenant_id"), "bastion_refresh_families", ["tenant_id"]
    )
    op.create_table(
        "bastion_refresh_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("family_id", sa.Uuid(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("used_at", _TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_refresh_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_bastion_refresh_tokens_token_hash")),
        _fk("bastion_refresh_tokens", "family_id", "bastion_refresh_families", "CASCADE"),
    )
    op.create_index(
        op.f("ix_bastion_refresh_tokens_family_id"), "bastion_refresh_tokens", ["family_id"]
    )
    op.create_table(
        "bastion_api_keys",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("scopes", _JSON, nullable=False),
        sa.Column("prefix", sa.String(64), nullable=False),
        sa.Column("public_id", sa.String(32), nullable=False),
        sa.Column("hash", sa.LargeBinary(32), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("expires_at", _TIMESTAMP, nullable=True),
        sa.Column("last_used_at", _TIMESTAMP, nullable=True),
        sa.Column("revoked_at", _TIMESTAMP, nullable=True),
        sa.Column("created_by", sa.Uuid(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_api_keys")),
        sa.UniqueConstraint("public_id", name=op.f("uq_bastion_api_keys_public_id")),
        _fk("bastion_api_keys", "tenant_id", "bastion_tenants", "CASCADE"),
        _fk("bastion_api_keys", "created_by", "bastion_users", "SET NULL"),
    )
    op.create_index(op.f("ix_bastion_api_keys_created_by"), "bastion_api_keys", ["created_by"])
    op.create_index(
        op.f("ix_bastion_api_keys_tenant_id_created_at"),
        "bastion_api_keys",
        ["tenant_id", "created_at"],
    )
    op.create_table(
        "bastion_one_time_tokens",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("purpose", sa.String(32), nullable=False),
        sa.Column("subject", sa.String(254), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(32), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=True),
        sa.Column("data", _JSON, nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.Column("expires_at", _TIMESTAMP, nullable=False),
        sa.Column("used_at", _TIMESTAMP, nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_bastion_one_time_tokens")),
        sa.UniqueConstraint("token_hash", name=op.f("uq_bastion_one_time_tokens_token_hash")),
        sa.CheckConstraint(
            "purpose IN ('email_verification', 'password_reset', 'invitation')",
            name=op.f("ck_bastion_one_time_tokens_purpose"),
        ),
        _fk("bastion_one_time_tokens", "tenant_id", "bastion_tenants", "CASCADE"),
    )
    op.create_index(
        op.f("ix_bastion_one_time_tokens_purpose_subject"),
        "bastion_one_time_tokens",
        ["purpose", "subject"],
    )
    op.create_index(
        op.f("ix_bastion_one_time_tokens_tenant_id"), "bastion_one_time_tokens", ["tenant_id"]
    )


def downgrade() -> None:
    """Drop the identity tables, children first."""
    for table in (
        "bastion_one_time_tokens",
        "bastion_api_keys",
        "bastion_refresh_tokens",
        "bastion_refresh_families",
        "bastion_memberships",
        "bastion_users",
        "bastion_tenants",
    ):
        op.drop_table(table)
