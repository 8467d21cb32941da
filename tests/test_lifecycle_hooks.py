"""Start-up and shutdown hooks: order, failures, phases, and draining."""

import pytest
from fastapi import FastAPI

import bastion
from bastion.errors import ConfigurationError
from bastion.lifecycle import Lifecycle, Phase
from bastion.testing import lifespan_client


def recorder(calls: list[str], name: str, *, fail: bool = False):
    async def hook() -> None:
        calls.append(name)
        if fail:
            raise RuntimeError(f"{name} failed")

    return hook


class TestOrder:
    async def test_startup_runs_in_ascending_priority(self):
        """Lower priorities start first, whatever the registration order."""
        lifecycle, calls = Lifecycle(), []
        for name, priority in [("app", 100), ("pool", 10), ("migrations", 20), ("cache", 10)]:
            lifecycle.on_startup(name, recorder(calls, name), priority=priority)
        await lifecycle.startup()
        assert ["pool", "cache", "migrations", "app"] == calls

    async def test_shutdown_runs_in_descending_priority(self):
        """Higher priorities stop first, so what opened first closes last."""
        lifecycle, calls = Lifecycle(), []
        for name, priority in [("pool", 10), ("app", 100), ("migrations", 20)]:
            lifecycle.on_shutdown(name, recorder(calls, name), priority=priority)
        await lifecycle.shutdown()
        assert ["app", "migrations", "pool"] == calls

    async def test_equal_priorities_mirror_each_other(self):
        """Among equal priorities, start-up keeps registration order and shutdown reverses it."""
        lifecycle, calls = Lifecycle(), []
        for name in ("database", "redis", "broker"):
            lifecycle.on_startup(f"open {name}", recorder(calls, f"open {name}"), priority=10)
            lifecycle.on_shutdown(f"close {name}", recorder(calls, f"close {name}"), priority=10)
        await lifecycle.startup()
        await lifecycle.shutdown()
        assert [
            "open database",
            "open redis",
            "open broker",
            "close broker",
            "close redis",
            "close database",
        ] == calls


class TestFailures:
    async def test_failing_shutdown_hook_does_not_stop_the_others(self):
        """Every shutdown hook runs even when one before it raised."""
        lifecycle, calls = Lifecycle(), []
        lifecycle.on_shutdown("first", recorder(calls, "first"), priority=30)
        lifecycle.on_shutdown("broken", recorder(calls, "broken", fail=True), priority=20)
        lifecycle.on_shutdown("last", recorder(calls, "last"), priority=10)
        await lifecycle.shutdown()
        assert (["first", "broken", "last"], Phase.STOPPED) == (calls, lifecycle.phase)

    async def test_failing_startup_hook_stops_start_up(self):
        """A start-up hook that raises stops start-up: later hooks do not run, not ready."""
        lifecycle, calls = Lifecycle(), []
        lifecycle.on_startup("pool", recorder(calls, "pool"), priority=10)
        lifecycle.on_startup("migrations", recorder(calls, "migrations", fail=True), priority=20)
        lifecycle.on_startup("app", recorder(calls, "app"), priority=30)
        with pytest.raises(RuntimeError, match="migrations failed"):
            await lifecycle.startup()
        assert (["pool", "migrations"], False) == (calls, lifecycle.accepting)

    async def test_failed_start_up_still_closes_what_was_opened(self):
        """When an app's start-up fails, its shutdown hooks still run before the error surfaces."""
        app = FastAPI()
        runtime = bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        calls: list[str] = []
        runtime.lifecycle.on_startup("broken", recorder(calls, "broken", fail=True))
        runtime.lifecycle.on_shutdown("close pool", recorder(calls, "close pool"))
        with pytest.raises(RuntimeError, match="broken failed"):
            async with lifespan_client(app):
                pass
        assert ["broken", "close pool"] == calls


class TestPhases:
    async def test_phases_in_order(self):
        """starting, then ready after start-up, draining, and stopped after shutdown."""
        lifecycle = Lifecycle()
        seen = [lifecycle.phase]
        await lifecycle.startup()
        seen.append(lifecycle.phase)
        lifecycle.begin_drain()
        seen.append(lifecycle.phase)
        await lifecycle.shutdown()
        seen.append(lifecycle.phase)
        assert [Phase.STARTING, Phase.READY, Phase.DRAINING, Phase.STOPPED] == seen

    async def test_drain_during_start_up_sticks(self):
        """A drain that begins while start-up runs is not undone when start-up ends."""
        lifecycle = Lifecycle()

        async def signalled_during_migrations() -> None:
            lifecycle.begin_drain()

        lifecycle.on_startup("migrations", signalled_during_migrations)
        await lifecycle.startup()
        assert (Phase.DRAINING, False) == (lifecycle.phase, lifecycle.accepting)

    async def test_drain_after_stop_does_nothing(self):
        """begin_drain() on a stopped lifecycle leaves it stopped."""
        lifecycle = Lifecycle()
        await lifecycle.shutdown()
        lifecycle.begin_drain()
        assert Phase.STOPPED == lifecycle.phase


class TestDraining:
    def test_cut_off_requests_are_counted(self):
        """Requests cancelled by the shutdown timeout are counted."""
        lifecycle = Lifecycle()
        lifecycle.request_cut_off()
        lifecycle.request_cut_off()
        assert 2 == lifecycle.cut_off

    async def test_requests_are_counted_in_and_out(self):
        """The request middleware counts each request in and out."""
        app = FastAPI()
        runtime = bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        during: list[int] = []

        @app.get("/slow")
        async def slow() -> dict:
            during.append(runtime.lifecycle.in_flight)
            return {}

        async with lifespan_client(app) as client:
            await client.get("/slow")
        assert ([1], 0) == (during, runtime.lifecycle.in_flight)


class TestInstall:
    async def test_app_hooks_run_with_the_app_lifespan(self):
        """Hooks registered on the runtime run when the app starts and stops."""
        app = FastAPI()
        runtime = bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        calls: list[str] = []
        runtime.lifecycle.on_startup("open", recorder(calls, "open"))
        runtime.lifecycle.on_shutdown("close", recorder(calls, "close"))
        async with lifespan_client(app):
            assert (["open"], Phase.READY) == (calls, runtime.lifecycle.phase)
        assert (["open", "close"], Phase.STOPPED) == (calls, runtime.lifecycle.phase)

    def test_install_twice_is_refused(self):
        """A second install on the same app is a configuration error."""
        app = FastAPI()
        bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        with pytest.raises(ConfigurationError, match="already"):
            bastion.install(app)

    def test_settings_and_overrides_together_are_refused(self):
        """settings= and keyword overrides cannot be mixed."""
        with pytest.raises(ConfigurationError, match="not both"):
            bastion.install(FastAPI(), settings=bastion.Settings(), logging={"enabled": False})

    def test_create_app_returns_an_installed_fastapi_app(self):
        """create_app builds a FastAPI app with bastion on app.state."""
        app = bastion.create_app(database={"enabled": False}, logging={"enabled": False})
        assert isinstance(app, FastAPI)
        assert isinstance(app.state.bastion, bastion.Bastion)


class TestLifespanClient:
    async def test_plain_asgi_app_without_lifespan(self):
        """lifespan_client also drives a bare ASGI callable that has no router."""

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 204, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        async with lifespan_client(app) as client:
            assert 204 == (await client.get("/")).status_code
