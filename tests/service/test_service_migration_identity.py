"""Revision 0003: the service's own tenants and users move into bastion's identity tables.

Run on a database of its own (the session's PostgreSQL database is already at
head), brought to revision 0002 with the rows the old schema allowed, then
upgraded, downgraded and upgraded again.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta

import pytest
import sqlalchemy as sa

from bastion.data import Database, MigrationTree, Migrator
from bastion.settings import DatabaseSettings
from bastion_docs.app import MIGRATIONS

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
TIMESTAMP = sa.DateTime(timezone=True)

OLD_TENANTS = sa.table(
    "tenants",
    sa.column("id", sa.Uuid()),
    sa.column("name", sa.String()),
    sa.column("slug", sa.String()),
    sa.column("created_at", TIMESTAMP),
)
OLD_USERS = sa.table(
    "users",
    sa.column("id", sa.Uuid()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("email", sa.String()),
    sa.column("display_name", sa.String()),
    sa.column("role", sa.String()),
    sa.column("created_at", TIMESTAMP),
)
DOCUMENTS = sa.table(
    "documents",
    sa.column("id", sa.Uuid()),
    sa.column("tenant_id", sa.Uuid()),
    sa.column("title", sa.String()),
    sa.column("body", sa.Text()),
    sa.column("tags", sa.JSON()),
    sa.column("created_by", sa.Uuid()),
    sa.column("created_at", TIMESTAMP),
    sa.column("updated_at", TIMESTAMP),
    sa.column("version", sa.Integer()),
)
USERS = sa.table(
    "bastion_users",
    sa.column("id", sa.Uuid()),
    sa.column("email", sa.String()),
    sa.column("display_name", sa.String()),
    sa.column("password_hash", sa.String()),
    sa.column("email_verified_at", TIMESTAMP),
    sa.column("created_at", TIMESTAMP),
)
TENANTS = sa.table(
    "bastion_tenants",
    sa.column("id", sa.Uuid()),
    sa.column("slug", sa.String()),
    sa.column("name", sa.String()),
    sa.column("settings", sa.JSON()),
)
MEMBERSHIPS = sa.table(
    "bastion_memberships",
    sa.column("tenant_id", sa.Uuid()),
    sa.column("user_id", sa.Uuid()),
    sa.column("role", sa.String()),
)

ACME, GLOBEX = uuid.uuid4(), uuid.uuid4()
# Ann is in both tenants (the same address, differently cased); the ACME row is older.
ANN_ACME, ANN_GLOBEX = uuid.uuid4(), uuid.uuid4()
BOB = uuid.uuid4()
# Two ACME rows whose addresses differ as stored but fold to one ("ß" folds to "ss").
STRASSE_VIEWER, STRASSE_ADMIN = uuid.uuid4(), uuid.uuid4()
# Bob's address is already a bastion user (made by `bastion users create`, say).
BOB_GLOBAL = uuid.uuid4()


def _user(user_id, tenant_id, email, role, minutes):
    return {
        "id": user_id,
        "tenant_id": tenant_id,
        "email": email,
        "display_name": email.split("@")[0],
        "role": role,
        "created_at": T0 + timedelta(minutes=minutes),
    }


def _document(tenant_id, author, title):
    return {
        "id": uuid.uuid4(),
        "tenant_id": tenant_id,
        "title": title,
        "body": "",
        "tags": [],
        "created_by": author,
        "created_at": T0,
        "updated_at": T0,
        "version": 1,
    }


@pytest.fixture
async def migrator(empty_database_url):
    """Bastion's and the service's trees on a database of their own, bastion's at head."""
    database = Database(DatabaseSettings(url=empty_database_url))
    trees = [
        MigrationTree.bastion(),
        MigrationTree.from_location("app", MIGRATIONS, "alembic_version"),
    ]
    try:
        yield Migrator(database, trees)
    finally:
        await database.aclose()


async def _fill_old_schema(database: Database) -> dict[str, uuid.UUID]:
    documents = {
        "ann-acme": _document(ACME, ANN_ACME, "ann in acme"),
        "ann-globex": _document(GLOBEX, ANN_GLOBEX, "ann in globex"),
        "bob": _document(ACME, BOB, "bob"),
        "strasse": _document(ACME, STRASSE_VIEWER, "strasse"),
    }
    async with database.session() as session:
        await session.execute(
            sa.insert(OLD_TENANTS),
            [
                {"id": ACME, "name": "Acme", "slug": "acme", "created_at": T0},
                {"id": GLOBEX, "name": "Globex", "slug": "globex", "created_at": T0},
            ],
        )
        await session.execute(
            sa.insert(OLD_USERS),
            [
                _user(ANN_ACME, ACME, "ann@example.test", "owner", 1),
                _user(ANN_GLOBEX, GLOBEX, "Ann@Example.TEST", "viewer", 2),
                _user(BOB, ACME, "bob@example.test", "member", 3),
                _user(STRASSE_VIEWER, ACME, "straße@example.test", "viewer", 4),
                _user(STRASSE_ADMIN, ACME, "STRASSE@example.test", "admin", 5),
            ],
        )
        await session.execute(sa.insert(DOCUMENTS), list(documents.values()))
        await session.execute(
            sa.insert(USERS).values(
                id=BOB_GLOBAL,
                email="bob@example.test",
                display_name="Bob",
                password_hash="$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ$aGFzaGhhc2g",
                email_verified_at=T0,
                created_at=T0,
            )
        )
    return {name: row["id"] for name, row in documents.items()}


async def _snapshot(database: Database):
    async with database.session() as session:
        tenants = (await session.execute(sa.select(TENANTS).order_by(TENANTS.c.id))).all()
        users = (await session.execute(sa.select(USERS))).all()
        memberships = (await session.execute(sa.select(MEMBERSHIPS))).all()
        authors = dict(
            (await session.execute(sa.select(DOCUMENTS.c.title, DOCUMENTS.c.created_by))).all()
        )
    by_email = {user.email: user for user in users}
    return tenants, by_email, {tuple(m) for m in memberships}, authors


async def _tables(database: Database) -> set[str]:
    async with database.engine.connect() as connection:
        return set(await connection.run_sync(lambda c: sa.inspect(c).get_table_names()))


class TestIdentityDataMigration:
    async def test_upgrade_moves_rows_into_bastion_tables(self, migrator):
        """Tenants keep their ids, addresses become one user each, roles become memberships."""
        await migrator.upgrade(tree="bastion")
        await migrator.upgrade("0002", tree="app")
        documents = await _fill_old_schema(migrator.database)
        applied = await migrator.upgrade()
        tenants, users, memberships, authors = await _snapshot(migrator.database)
        assert ["0003", "0004"] == [r.revision for r in applied]
        assert {ACME: ("acme", "Acme", {}), GLOBEX: ("globex", "Globex", {})} == {
            t.id: (t.slug, t.name, t.settings) for t in tenants
        }
        ann, bob, strasse = (
            users["ann@example.test"],
            users["bob@example.test"],
            users["strasse@example.test"],
        )
        assert 3 == len(users)
        # The oldest row of an address keeps its id; an existing bastion user keeps its own.
        assert (ANN_ACME, BOB_GLOBAL, STRASSE_VIEWER) == (ann.id, bob.id, strasse.id)
        assert (None, None) == (ann.password_hash, ann.email_verified_at)
        assert bob.password_hash is not None
        assert {
            (ACME, ANN_ACME, "owner"),
            (GLOBEX, ANN_ACME, "viewer"),
            (ACME, BOB_GLOBAL, "member"),
            # Two rows of one tenant folded into one user: the stronger role wins.
            (ACME, STRASSE_VIEWER, "admin"),
        } == memberships
        assert {
            "ann in acme": ANN_ACME,
            "ann in globex": ANN_ACME,
            "bob": BOB_GLOBAL,
            "strasse": STRASSE_VIEWER,
        } == authors
        assert 4 == len(documents)
        assert not {"tenants", "users"} & await _tables(migrator.database)

    async def test_documents_refer_to_bastion_tables(self, migrator):
        """After the upgrade a document's tenant and author must exist in bastion's tables."""
        await migrator.upgrade()
        async with migrator.database.engine.connect() as connection:
            foreign_keys = await connection.run_sync(
                lambda c: sa.inspect(c).get_foreign_keys("documents")
            )
        assert {
            (("tenant_id",), "bastion_tenants", "CASCADE"),
            (("created_by",), "bastion_users", "SET NULL"),
            (("created_by_api_key",), "bastion_api_keys", "SET NULL"),
        } == {
            (
                tuple(fk["constrained_columns"]),
                fk["referred_table"],
                (fk.get("options") or {}).get("ondelete", "").upper(),
            )
            for fk in foreign_keys
        }

    async def test_downgrade_rebuilds_per_tenant_users(self, migrator):
        """Down again, each membership is a users row and every document has an author there."""
        await migrator.upgrade(tree="bastion")
        await migrator.upgrade("0002", tree="app")
        await _fill_old_schema(migrator.database)
        await migrator.upgrade()
        # A document whose author is not a user (an API key wrote it).
        orphan = _document(GLOBEX, None, "by a key")
        async with migrator.database.session() as session:
            await session.execute(sa.insert(DOCUMENTS), [orphan])
        reverted = await migrator.downgrade("app", "0002", allow_destructive=True)
        async with migrator.database.session() as session:
            rows = (await session.execute(sa.select(OLD_USERS))).all()
            authors = (
                await session.execute(
                    sa.select(DOCUMENTS.c.title, OLD_USERS.c.email, OLD_USERS.c.tenant_id).join(
                        OLD_USERS, OLD_USERS.c.id == DOCUMENTS.c.created_by
                    )
                )
            ).all()
        assert ["0004", "0003"] == [r.revision for r in reverted]
        assert {
            (ACME, "ann@example.test", "owner"),
            (GLOBEX, "ann@example.test", "viewer"),
            (ACME, "bob@example.test", "member"),
            (ACME, "strasse@example.test", "admin"),
            (GLOBEX, "former-author@globex.invalid", "viewer"),
        } == {(row.tenant_id, row.email, row.role) for row in rows}
        assert ANN_ACME in {row.id for row in rows}
        # Every document's author is a users row of the document's own tenant.
        assert {
            ("ann in acme", "ann@example.test", ACME),
            ("ann in globex", "ann@example.test", GLOBEX),
            ("bob", "bob@example.test", ACME),
            ("strasse", "strasse@example.test", ACME),
            ("by a key", "former-author@globex.invalid", GLOBEX),
        } == set(authors)

    async def test_upgrade_after_downgrade_keeps_bastion_rows(self, migrator):
        """Upgrading again finds the rows already in bastion's tables and adds none twice."""
        await migrator.upgrade(tree="bastion")
        await migrator.upgrade("0002", tree="app")
        await _fill_old_schema(migrator.database)
        await migrator.upgrade()
        before = await _snapshot(migrator.database)
        await migrator.downgrade("app", "0002", allow_destructive=True)
        applied = await migrator.upgrade()
        assert ["0003", "0004"] == [r.revision for r in applied]
        assert before == await _snapshot(migrator.database)
