"""What install() does to an app beyond the request path."""

import gc

import pytest
from fastapi import FastAPI

import bastion
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
