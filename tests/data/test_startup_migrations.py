"""Start-up migrations: ``migrations.mode`` check refuses to start, auto upgrades."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from migration_support import GADGETS, WIDGETS, version_rows

import bastion
from bastion.data import MigrationTree, Migrator
from bastion.errors import ConfigurationError
from bastion.testing import lifespan_client


@pytest.fixture
def tree_dir(make_tree):
    return make_tree(WIDGETS, GADGETS)


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

        assert "bastion:0001_baseline, app:a1, app:a2" in str(caught.value)
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
