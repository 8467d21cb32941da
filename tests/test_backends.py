"""Backend URLs: which engine a URL names, redaction, optional imports, shared stores."""

import pytest
from sqlalchemy import text

from bastion.backends import (
    BackendKind,
    MissingDependency,
    SharedStateBackend,
    backend_kind,
    import_optional,
    redact_url,
    shared_state_backends,
)
from bastion.data import Database
from bastion.errors import ConfigurationError
from bastion.settings import DatabaseSettings, load_settings

SHARED_STATE_SECTIONS = ["flags", "http", "identity", "jobs", "ratelimit", "realtime", "resilience"]


class TestBackendKind:
    @pytest.mark.parametrize(
        ("url", "kind"),
        [
            ("memory://", BackendKind.MEMORY),
            ("redis://127.0.0.1:6379/0", BackendKind.REDIS),
            ("rediss://cache:6380/0", BackendKind.REDIS),
            ("unix:///run/redis.sock", BackendKind.REDIS),
            ("sqlite+aiosqlite:///./var/bastion.db", BackendKind.SQLITE),
            ("postgresql+asyncpg://u:p@db/app", BackendKind.POSTGRES),
            ("postgresql://db/app", BackendKind.POSTGRES),
            ("nats://127.0.0.1:4222", BackendKind.NATS),
            ("amqp://guest:guest@127.0.0.1:5672/", BackendKind.AMQP),
            ("AMQPS://mq:5671/", BackendKind.AMQP),
        ],
    )
    def test_scheme_names_the_kind(self, url, kind):
        """The URL's scheme, in any case, decides the backend family."""
        assert kind == backend_kind(url)

    def test_unknown_scheme_lists_the_known_ones(self):
        """An unknown scheme is a configuration error that says what would work."""
        with pytest.raises(ConfigurationError, match=r"unknown backend scheme 'kafka' \(known: "):
            backend_kind("kafka://broker:9092")


class TestRedactUrl:
    @pytest.mark.parametrize(
        ("url", "shown"),
        [
            (
                "postgresql+asyncpg://app:s3cret@db:5432/app",
                "postgresql+asyncpg://app:***@db:5432/app",
            ),
            ("redis://:s3cret@cache:6379/0", "redis://***@cache:6379/0"),
            ("amqp://guest:s3cret@mq/vhost?heartbeat=30", "amqp://guest:***@mq/vhost?heartbeat=30"),
            ("redis://cache:6379/0", "redis://cache:6379/0"),
            ("sqlite+aiosqlite:///./var/bastion.db", "sqlite+aiosqlite:///./var/bastion.db"),
            ("memory://", "memory://"),
        ],
    )
    def test_password_is_masked_and_the_rest_kept(self, url, shown):
        """Only the password is replaced; scheme, user, host, port, path and query stay."""
        assert shown == redact_url(url)


class TestImportOptional:
    def test_installed_module_is_returned(self):
        """An installed library is imported and returned."""
        assert "json" == import_optional("json").__name__

    @pytest.mark.parametrize(
        ("module", "extra"),
        [
            ("redis.no_such_module", "redis"),
            ("asyncpg.no_such_module", "postgres"),
            ("aio_pika.no_such_module", "rabbitmq"),
            ("nats.no_such_module", "nats"),
            ("no_such_library", "all"),
        ],
    )
    def test_missing_module_names_the_extra(self, module, extra):
        """A missing library fails with the pip command that installs its extra."""
        with pytest.raises(MissingDependency) as caught:
            import_optional(module)
        assert f'pip install "bastion[{extra}]"' in str(caught.value)
        assert isinstance(caught.value, ConfigurationError)


class TestSharedStateBackends:
    def test_memory_by_default(self):
        """With no Redis configured, every shared-state component is in process memory."""
        backends = shared_state_backends(load_settings())
        assert SHARED_STATE_SECTIONS == sorted(backend.section for backend in backends)
        assert {BackendKind.MEMORY} == {backend.kind for backend in backends}

    def test_shared_redis_is_used_by_everyone(self):
        """redis.url becomes the store of every component that names none."""
        settings = load_settings(redis={"url": "redis://cache:6379/0"})
        assert {"redis://cache:6379/0"} == {b.url for b in shared_state_backends(settings)}

    def test_own_store_url_wins_and_disabled_components_are_left_out(self):
        """A section's store_url beats redis.url; a switched-off component has no store."""
        settings = load_settings(
            redis={"url": "redis://cache:6379/0"},
            ratelimit={"store_url": "redis://limits:6379/1"},
            flags={"enabled": False},
        )
        backends = {b.section: b for b in shared_state_backends(settings)}
        assert SharedStateBackend("ratelimit", "redis://limits:6379/1") == backends["ratelimit"]
        assert "flags" not in backends


class TestDatabaseUrl:
    @pytest.mark.parametrize(
        ("url", "driver"),
        [
            ("postgres://app@db/app", "postgresql+asyncpg"),
            ("postgresql://app@db/app", "postgresql+asyncpg"),
            ("postgresql+asyncpg://app@db/app", "postgresql+asyncpg"),
            ("sqlite:///{tmp}/a.db", "sqlite+aiosqlite"),
            ("sqlite+aiosqlite:///{tmp}/a.db", "sqlite+aiosqlite"),
        ],
    )
    async def test_driverless_urls_get_the_async_driver(self, url, driver, tmp_path):
        """postgres://, postgresql:// and sqlite:// URLs run on asyncpg and aiosqlite."""
        database = Database(DatabaseSettings(url=url.format(tmp=tmp_path)))
        try:
            assert driver == database.engine.url.drivername
        finally:
            await database.aclose()

    async def test_display_url_hides_the_password(self):
        """What start-up logs of the database URL carries no password."""
        database = Database(DatabaseSettings(url="postgresql+asyncpg://app:s3cret@db/app"))
        try:
            assert "postgresql+asyncpg://app:***@db/app" == database.display_url
        finally:
            await database.aclose()

    async def test_in_memory_sqlite_sessions(self):
        """An in-memory SQLite database works through sessions and ping."""
        database = Database(DatabaseSettings(url="sqlite+aiosqlite:///:memory:"))
        try:
            await database.ping()
            async with database.session() as session:
                assert 1 == (await session.execute(text("SELECT 1"))).scalar_one()
        finally:
            await database.aclose()

    async def test_session_rolls_back_on_error(self, sqlite_url):
        """A session whose block raises commits nothing."""
        database = Database(DatabaseSettings(url=sqlite_url))
        try:
            async with database.session() as session:
                await session.execute(text("CREATE TABLE t (x INTEGER)"))

            async def insert_then_fail() -> None:
                async with database.session() as session:
                    await session.execute(text("INSERT INTO t VALUES (1)"))
                    raise RuntimeError("abort")

            with pytest.raises(RuntimeError):
                await insert_then_fail()
            async with database.session() as session:
                assert 0 == (await session.execute(text("SELECT count(*) FROM t"))).scalar_one()
        finally:
            await database.aclose()
