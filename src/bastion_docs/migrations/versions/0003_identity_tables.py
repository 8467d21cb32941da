"""Documents belong to bastion's tenants and users; the service's own tables go.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-07

Bastion's identity tables (its tree's ``0002_identity``, applied before this
tree) replace the service's ``tenants`` and ``users``. The rows move over:

- each tenant becomes a ``bastion_tenants`` row with the same id, slug, name and
  creation time, and no settings overrides;
- users become global: one ``bastion_users`` row per e-mail address (compared
  NFKC case-folded, as bastion stores them). When an address had a user in
  several tenants, the oldest of those rows keeps its id and the others are
  folded into it: each tenant gets a membership with that tenant's old role,
  and ``documents.created_by`` is repointed to the kept id. Two rows of one
  tenant that fold to the same address keep the stronger role;
- no one has a password (``password_hash`` NULL) or a verified address: the old
  accounts had neither. A user sets a password through the password reset
  (``POST /v1/auth/password/reset-request``).

Rows already present in bastion's tables (a tenant with the same id, a user
with the same address, a membership) are kept as they are, so a downgrade
followed by an upgrade finds its way back.

``documents`` then refers to ``bastion_tenants`` and ``bastion_users``; its
author is a user or an API key (``created_by_api_key``, new), never both, and
both are cleared rather than cascaded when the account or key row is deleted.

Downgrade rebuilds ``tenants`` and ``users`` from bastion's tables, which it
leaves in place: one ``users`` row per membership (a user of several tenants
keeps its id in its oldest membership and gets a new id in the others, and that
tenant's documents follow); a role that is not one of the four old ones becomes
``viewer``. Documents whose author is an API key, a deleted account or a user
no longer in the tenant are attributed to a placeholder viewer of the tenant,
``former-author@<slug>.invalid``. Lost on the way down: passwords and
everything else the old ``users`` table has no column for, and which API key
wrote a document.

The previous version reads ``tenants`` and ``users`` on every request: stop it
before this revision runs (no rolling upgrade across it).

Rendered offline (``--sql``) the script has the schema changes only, with a
comment saying so: the rows move in Python, folding addresses as bastion does.

On SQLite the foreign-key changes rebuild ``documents`` (batch mode) twice:
once to drop the old references before the rows move, once to add the new
ones, which SQLite checks row by row as the table is copied.
"""

from __future__ import annotations

import unicodedata
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Final

import sqlalchemy as sa
from alembic import context, op
from sqlalchemy.dialects import postgresql

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

destroys = ["tenants", "users"]
# The previous version of the service reads tenants and users on every request, so this
# revision cannot run while it serves: it is applied with the old version stopped. The
# lock-avoiding forms (NOT VALID then VALIDATE, CREATE INDEX CONCURRENTLY) buy nothing
# then, and the index is on a column this revision adds, all NULL.
lint_ignore = [
    "add-check-not-valid",
    "add-foreign-key-not-valid",
    "create-index-not-concurrently",
    "drop-table",
]

# Frozen copies of the types and tables involved: a revision must not change when the
# models or bastion's tables do.
_TIMESTAMP: Final = sa.DateTime(timezone=True)
_JSON: Final = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
_OLD_ROLES: Final = ("owner", "admin", "member", "viewer")
# Of two roles for one membership, the one earlier here wins.
_ROLE_RANK: Final = {role: rank for rank, role in enumerate(_OLD_ROLES)}
_PLACEHOLDER_ROLE: Final = "viewer"
# The rows move in Python (addresses are folded as bastion folds them, which SQLite's SQL
# cannot do), so a rendered script has the schema changes only, and says so.
_OFFLINE_WARNING: Final = (
    "-- bastion_docs 0003: the rows of tenants and users are moved by an online upgrade "
    "only (bastion migrate upgrade); this script does not move them"
)
# Rows per statement where a list of ids is sent (SQLite allows 32766 parameters).
_CHUNK: Final = 500

_tenants = sa.table(
    "tenants",
    sa.column("id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("slug", sa.String()),
    sa.column("created_at", _TIMESTAMP),
)
_users = sa.table(
    "users",
    sa.column("id", sa.Uuid()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("email", sa.String()),
    sa.column("display_name", sa.String()),
    sa.column("role", sa.String()),
    sa.column("created_at", _TIMESTAMP),
)
_documents = sa.table(
    "documents",
    sa.column("id", sa.Uuid()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("created_by", sa.Uuid()),
)
_bastion_tenants = sa.table(
    "bastion_tenants",
    sa.column("id", sa.Uuid()),
    sa.column("slug", sa.String()),
    sa.column("name", sa.String()),
    sa.column("settings", _JSON),
    sa.column("created_at", _TIMESTAMP),
)
_bastion_users = sa.table(
    "bastion_users",
    sa.column("id", sa.Uuid()),
    sa.column("email", sa.String()),
    sa.column("display_name", sa.String()),
    sa.column("password_hash", sa.String()),
    sa.column("email_verified_at", _TIMESTAMP),
    sa.column("password_changed_at", _TIMESTAMP),
    sa.column("disabled_at", _TIMESTAMP),
    sa.column("created_at", _TIMESTAMP),
)
_memberships = sa.table(
    "bastion_memberships",
    sa.column("tenant_id", sa.Uuid()),
    sa.column("user_id", sa.Uuid()),
    sa.column("role", sa.String()),
    sa.column("created_at", _TIMESTAMP),
)


def _fold(email: str) -> str:
    # bastion.identity.normalise_email as of this revision.
    return unicodedata.normalize("NFKC", email).strip().casefold()


def _chunks(values: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(values), _CHUNK):
        yield values[start : start + _CHUNK]


def _insert(bind: sa.Connection, table: sa.TableClause, rows: list[dict[str, Any]]) -> None:
    for chunk in _chunks(rows):
        bind.execute(sa.insert(table), list(chunk))


def _repoint(bind: sa.Connection, moves: Iterable[tuple[uuid.UUID, uuid.UUID, uuid.UUID]]) -> None:
    """Set ``created_by`` to the new id of each ``(tenant, old author, new author)``."""
    statement = (
        sa.update(_documents)
        .where(
            _documents.c.tenant_id == sa.bindparam("tenant"),
            _documents.c.created_by == sa.bindparam("old"),
        )
        .values(created_by=sa.bindparam("new"))
    )
    rows = [{"tenant": tenant, "old": old, "new": new} for tenant, old, new in moves if old != new]
    for chunk in _chunks(rows):
        bind.execute(statement, list(chunk))


def upgrade() -> None:
    with op.batch_alter_table("documents") as batch:
        batch.drop_constraint(op.f("fk_documents_tenant_id_tenants"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_documents_created_by_users"), type_="foreignkey")
        batch.alter_column("created_by", existing_type=sa.Uuid(), nullable=True)
        batch.add_column(sa.Column("created_by_api_key", sa.Uuid(), nullable=True))
        batch.create_check_constraint(
            op.f("ck_documents_one_author"), "created_by IS NULL OR created_by_api_key IS NULL"
        )
    if context.is_offline_mode():
        op.execute(_OFFLINE_WARNING)
    else:
        bind = op.get_bind()
        _move_tenants(bind)
        _move_users(bind)
    with op.batch_alter_table("documents") as batch:
        batch.create_foreign_key(
            op.f("fk_documents_tenant_id_bastion_tenants"),
            "bastion_tenants",
            ["tenant_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_foreign_key(
            op.f("fk_documents_created_by_bastion_users"),
            "bastion_users",
            ["created_by"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_foreign_key(
            op.f("fk_documents_created_by_api_key_bastion_api_keys"),
            "bastion_api_keys",
            ["created_by_api_key"],
            ["id"],
            ondelete="SET NULL",
        )
        batch.create_index(op.f("ix_documents_created_by_api_key"), ["created_by_api_key"])
    op.drop_table("users")
    op.drop_table("tenants")


def _move_tenants(bind: sa.Connection) -> None:
    present = set(bind.scalars(sa.select(_bastion_tenants.c.id)))
    rows = [
        {
            "id": row.id,
            "slug": row.slug,
            "name": row.name,
            "settings": {},
            "created_at": row.created_at,
        }
        for row in bind.execute(sa.select(_tenants))
        if row.id not in present
    ]
    _insert(bind, _bastion_tenants, rows)


def _move_users(bind: sa.Connection) -> None:
    old = bind.execute(
        sa.select(_users).order_by(_users.c.created_at, _users.c.id)
    ).all()  # oldest first: the oldest row of an address keeps its id
    kept: dict[str, uuid.UUID] = {}
    folded_emails = sorted({_fold(row.email) for row in old})
    for chunk in _chunks(folded_emails):
        query = sa.select(_bastion_users.c.email, _bastion_users.c.id).where(
            _bastion_users.c.email.in_(chunk)
        )
        kept.update((email, user_id) for email, user_id in bind.execute(query))
    new_users: list[dict[str, Any]] = []
    roles: dict[tuple[uuid.UUID, uuid.UUID], dict[str, Any]] = {}
    moves: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]] = []
    for row in old:
        email = _fold(row.email)
        user_id = kept.get(email)
        if user_id is None:
            user_id = kept[email] = row.id
            new_users.append(
                {
                    "id": row.id,
                    "email": email,
                    "display_name": row.display_name,
                    "password_hash": None,
                    "email_verified_at": None,
                    "password_changed_at": None,
                    "disabled_at": None,
                    "created_at": row.created_at,
                }
            )
        moves.append((row.tenant_id, row.id, user_id))
        membership = roles.get((row.tenant_id, user_id))
        if membership is None or _ROLE_RANK[row.role] < _ROLE_RANK[membership["role"]]:
            roles[(row.tenant_id, user_id)] = {
                "tenant_id": row.tenant_id,
                "user_id": user_id,
                "role": row.role,
                "created_at": row.created_at,
            }
    _insert(bind, _bastion_users, new_users)
    user_ids = sorted({user_id for _, user_id in roles})
    present: set[tuple[uuid.UUID, uuid.UUID]] = set()
    for chunk in _chunks(user_ids):
        query = sa.select(_memberships.c.tenant_id, _memberships.c.user_id).where(
            _memberships.c.user_id.in_(chunk)
        )
        present.update((tenant, user) for tenant, user in bind.execute(query))
    _insert(bind, _memberships, [row for key, row in roles.items() if key not in present])
    _repoint(bind, moves)


def downgrade() -> None:
    op.create_table(
        "tenants",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("slug", sa.String(63), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tenants")),
        sa.UniqueConstraint("slug", name=op.f("uq_tenants_slug")),
    )
    op.create_table(
        "users",
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("tenant_id", sa.Uuid(), nullable=False),
        sa.Column("email", sa.String(254), nullable=False),
        sa.Column("display_name", sa.String(200), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", _TIMESTAMP, nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_users")),
        sa.UniqueConstraint("tenant_id", "email", name=op.f("uq_users_tenant_id_email")),
        sa.CheckConstraint(
            "role IN ('owner', 'admin', 'member', 'viewer')", name=op.f("ck_users_role")
        ),
        sa.ForeignKeyConstraint(
            ["tenant_id"],
            ["tenants.id"],
            name=op.f("fk_users_tenant_id_tenants"),
            ondelete="CASCADE",
        ),
    )
    with op.batch_alter_table("documents") as batch:
        batch.drop_index(op.f("ix_documents_created_by_api_key"))
        batch.drop_constraint(
            op.f("fk_documents_created_by_api_key_bastion_api_keys"), type_="foreignkey"
        )
        batch.drop_constraint(op.f("fk_documents_created_by_bastion_users"), type_="foreignkey")
        batch.drop_constraint(op.f("fk_documents_tenant_id_bastion_tenants"), type_="foreignkey")
        batch.drop_constraint(op.f("ck_documents_one_author"), type_="check")
        batch.drop_column("created_by_api_key")
    if context.is_offline_mode():
        op.execute(_OFFLINE_WARNING)
    else:
        _restore_tenants_and_users(op.get_bind())
    with op.batch_alter_table("documents") as batch:
        batch.alter_column("created_by", existing_type=sa.Uuid(), nullable=False)
        batch.create_foreign_key(
            op.f("fk_documents_tenant_id_tenants"),
            "tenants",
            ["tenant_id"],
            ["id"],
            ondelete="CASCADE",
        )
        batch.create_foreign_key(
            op.f("fk_documents_created_by_users"), "users", ["created_by"], ["id"]
        )


def _restore_tenants_and_users(bind: sa.Connection) -> None:
    tenants = bind.execute(sa.select(_bastion_tenants)).all()
    _insert(
        bind,
        _tenants,
        [{"id": t.id, "name": t.name, "slug": t.slug, "created_at": t.created_at} for t in tenants],
    )
    members = bind.execute(
        sa.select(
            _memberships.c.tenant_id,
            _memberships.c.user_id,
            _memberships.c.role,
            _bastion_users.c.email,
            _bastion_users.c.display_name,
            _bastion_users.c.created_at,
        )
        .join(_bastion_users, _bastion_users.c.id == _memberships.c.user_id)
        .order_by(_memberships.c.created_at, _memberships.c.tenant_id)
    ).all()
    rows: list[dict[str, Any]] = []
    # (tenant, global user id) -> the id of its users row in that tenant.
    local: dict[tuple[uuid.UUID, uuid.UUID], uuid.UUID] = {}
    taken: set[uuid.UUID] = set()
    for member in members:
        # The oldest membership keeps the user's id; ids are unique across tenants.
        row_id = member.user_id if member.user_id not in taken else uuid.uuid4()
        taken.add(row_id)
        local[(member.tenant_id, member.user_id)] = row_id
        rows.append(
            {
                "id": row_id,
                "tenant_id": member.tenant_id,
                "email": member.email,
                "display_name": member.display_name,
                "role": member.role if member.role in _ROLE_RANK else _PLACEHOLDER_ROLE,
                "created_at": member.created_at,
            }
        )
    authors = bind.execute(
        sa.select(_documents.c.tenant_id, _documents.c.created_by).distinct()
    ).all()
    slugs = {t.id: t.slug for t in tenants}
    created = {t.id: t.created_at for t in tenants}
    placeholders: dict[uuid.UUID, uuid.UUID] = {}
    moves: list[tuple[uuid.UUID, uuid.UUID, uuid.UUID]] = []
    orphaned: set[uuid.UUID] = set()
    for tenant_id, author in authors:
        row_id = None if author is None else local.get((tenant_id, author))
        if row_id is not None:
            moves.append((tenant_id, author, row_id))
            continue
        if tenant_id not in placeholders:
            placeholders[tenant_id] = uuid.uuid4()
            rows.append(
                {
                    "id": placeholders[tenant_id],
                    "tenant_id": tenant_id,
                    "email": f"former-author@{slugs[tenant_id]}.invalid",
                    "display_name": "Former author",
                    "role": _PLACEHOLDER_ROLE,
                    "created_at": created[tenant_id],
                }
            )
        if author is None:
            orphaned.add(tenant_id)
        else:
            moves.append((tenant_id, author, placeholders[tenant_id]))
    _insert(bind, _users, rows)
    _repoint(bind, moves)
    for tenant_id in orphaned:
        bind.execute(
            sa.update(_documents)
            .where(_documents.c.tenant_id == tenant_id, _documents.c.created_by.is_(None))
            .values(created_by=placeholders[tenant_id])
        )
