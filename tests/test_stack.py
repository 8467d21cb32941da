"""What install() does to an app beyond the request path."""

import gc

import pytest
from fastapi import FastAPI
from sqlalchemy import text

import bastion
from bastion.data import transaction
from bastion.data._transaction import default_database
from bastion.errors import ConfigurationError
from bastion.testing import lifespan_client


class TestStartupFreeze:
    async def test_startup_objects_are_frozen_out_of_the_collector(self, sqlite_url):
        """Once the app has started, what start-up made is in the permanent generation."""
        gc.unfreeze()
        app = FastAPI()
        bastion.install(app, database={"url": sqlite_url})
        try:
            async with lifespan_client(app):
                frozen = gc.get_freeze_count()
        finally:
            gc.unfreeze()
        assert frozen > 0


class TestInstallOnce:
    def test_second_install_is_refused(self, sqlite_url):
        """Installing bastion twice on one app is a configuration error, not a double stack."""
        app = FastAPI()
        bastion.install(app, database={"url": sqlite_url})
        with pytest.raises(ConfigurationError, match="already called"):
            bastion.install(app, database={"url": sqlite_url})


class TestDefaultDatabase:
    async def test_transactions_use_the_installed_database(self, sqlite_url):
        """In a started app transaction() needs no database; after shutdown it needs one."""
        app = FastAPI()
        runtime = bastion.install(app, database={"url": sqlite_url})
        async with lifespan_client(app):
            async with transaction() as session:
                await session.execute(text("CREATE TABLE marks (id INTEGER PRIMARY KEY)"))
                await session.execute(text("INSERT INTO marks (id) VALUES (1)"))
            async with runtime.database.session() as session:
                assert 1 == (await session.execute(text("SELECT count(*) FROM marks"))).scalar()
        with pytest.raises(ConfigurationError, match="no database"):
            async with transaction():
                pass

    async def test_stopping_an_older_app_keeps_the_newer_default(self, sqlite_url, tmp_path):
        """Stopping one app leaves the default that a later-started app set."""
        first, second = FastAPI(), FastAPI()
        bastion.install(first, database={"url": sqlite_url})
        runtime = bastion.install(
            second, database={"url": f"sqlite+aiosqlite:///{tmp_path}/second.db"}
        )
        first_client, second_client = lifespan_client(first), lifespan_client(second)
        await first_client.__aenter__()
        await second_client.__aenter__()
        await first_client.__aexit__(None, None, None)
        try:
            assert runtime.database is default_database()
        finally:
            await second_client.__aexit__(None, None, None)
        assert default_database() is None
