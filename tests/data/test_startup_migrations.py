"""Start-up migrations: ``migrations.mode`` check refuses to start, auto upgrades; both verify."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from migration_support import BASTION_REVISIONS, GADGETS, WIDGETS, history_rows, version_rows

import bastion
from bastion.data import MigrationTree, Migrator
from bastion.errors import ConfigurationError
from bastion.testing import lifespan_client


@pytest.fixture
def tree_dir(make_tree):
    return make_tree(WIDGETS, GADGETS)


async def upgrade_then_edit(database, tree_dir, revision="head"):
    """Apply the trees, then change an applied revision file (a1) after the fact."""
    trees = [
        MigrationTree.bastion(),
        MigrationTree.from_location("app", str(tree_dir), "app_version"),
    ]
    await Migrator(database, trees).upgrade(revision)
    path = tree_dir / "versions" / "a1.py"
    path.write_text(path.read_text() + "\n# edited after release\n")


def make_app(db_url, tree_dir, mode):
    app = FastAPI()
    runtime = bastion.install(
        app,
        database={"url": db_url},
        migrations={"mode": mode, "app_tree": str(tree_dir), "app_version_table": "app_version"},
    )
    return app, runtime


class TestStartupMigrations:
    async def test_check_mode_refuses_to_start_naming_pending_revisions(self, db_url, tree_dir):
        """With revisions pending, check mode stops start-up and names each of them."""
        app, runtime = make_app(db_url, tree_dir, "check")

        with pytest.raises(ConfigurationError) as caught:
            async with lifespan_client(app):
                pass

        pending = ", ".join([*(f"bastion:{rev}" for rev in BASTION_REVISIONS), "app:a1", "app:a2"])
        assert pending in str(caught.value)
        assert [] == await version_rows(runtime.database, "app_version")
        await runtime.database.aclose()

    async def test_check_mode_starts_when_up_to_date(self, db_url, tree_dir, database):
        """Once upgraded, check mode lets the app start and serve."""
        trees = [
            MigrationTree.bastion(),
            MigrationTree.from_location("app", str(tree_dir), "app_version"),
        ]
        await Migrator(database, trees).upgrade()
        app, _ = make_app(db_url, tree_dir, "check")

        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")

        assert 200 == response.status_code

    async def test_auto_mode_upgrades_at_start(self, db_url, tree_dir):
        """Auto mode applies bastion's tree and the app's before serving."""
        app, runtime = make_app(db_url, tree_dir, "auto")

        async with lifespan_client(app):
            pending = await runtime.migrator.pending()
            recorded = await version_rows(runtime.database, "app_version")

        assert {} == pending
        assert ["a2"] == recorded

    async def test_auto_mode_records_its_tool(self, db_url, tree_dir):
        """Revisions applied at start-up are recorded with tool ``start-up (auto)``."""
        app, runtime = make_app(db_url, tree_dir, "auto")

        async with lifespan_client(app):
            rows = await history_rows(runtime.database)

        assert {"start-up (auto)"} == {row["tool"] for row in rows}

    @pytest.mark.parametrize("mode", ["auto", "check"])
    async def test_modified_revision_refuses_start_up(self, db_url, tree_dir, database, mode):
        """In auto and check mode an edited applied revision stops start-up, named tree:revision."""
        await upgrade_then_edit(database, tree_dir, "a1")
        app, runtime = make_app(db_url, tree_dir, mode)

        with pytest.raises(ConfigurationError, match=r"modified since they were applied: app:a1"):
            async with lifespan_client(app):
                pass

        assert ["a1"] == await version_rows(database, "app_version")
        await runtime.database.aclose()

    async def test_check_mode_names_modified_and_pending_together(self, db_url, tree_dir, database):
        """Check mode reports the modified revision and the pending ones in one message."""
        await upgrade_then_edit(database, tree_dir, "a1")
        app, runtime = make_app(db_url, tree_dir, "check")

        with pytest.raises(ConfigurationError) as caught:
            async with lifespan_client(app):
                pass

        assert "app:a1" in str(caught.value)
        assert "pending migrations (migrations.mode=check): app:a2" in str(caught.value)
        await runtime.database.aclose()

    async def test_off_mode_does_not_verify(self, db_url, tree_dir, database):
        """Off mode starts even with a modified revision: it checks nothing."""
        await upgrade_then_edit(database, tree_dir)
        app, _ = make_app(db_url, tree_dir, "off")

        async with lifespan_client(app) as client:
            response = await client.get("/health/live")

        assert 200 == response.status_code

    async def test_lock_timeout_setting_reaches_the_migrator(self, db_url, tree_dir):
        """migrations.lock_timeout is the start-up migrator's lock timeout."""
        app = FastAPI()
        runtime = bastion.install(
            app, database={"url": db_url}, migrations={"mode": "off", "lock_timeout": 7.5}
        )

        assert 7.5 == runtime.migrator.lock_timeout
        await runtime.database.aclose()
