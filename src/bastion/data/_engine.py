"""The shared SQLAlchemy async engine, its pool, and sessions.

With a resilience pipeline (``install`` passes the ``database`` one), opening a
new connection goes through it: attempts timed, refused or timed-out connects
retried with backoff, and the circuit breaker consulted, so during an outage
requests that need a new connection fail fast with a 503 instead of each
waiting out the connect timeout. Handing out a pooled connection costs nothing
more: SQLAlchemy calls ``do_connect`` only to open one.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event, text
from sqlalchemy.engine import Dialect, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.pool import NullPool
from sqlalchemy.util import await_only, greenlet_spawn

from bastion.backends import BackendKind, backend_kind, import_optional, redact_url
from bastion.data._instrumentation import InstrumentedQueuePool, instrument
from bastion.errors import ConfigurationError
from bastion.resilience import CircuitState, DependencyError, DependencyTimeoutError
from bastion.settings import DatabaseSettings

if TYPE_CHECKING:
    from opentelemetry.trace import TracerProvider
    from sqlalchemy.engine import ExceptionContext
    from sqlalchemy.pool import ConnectionPoolEntry

    from bastion.resilience import Pipeline

__all__ = ["Database"]


class Database:
    """The engine and session factory every component shares.

    The engine's pool and statements are measured: ``db_client_connection_*``
    gauges and wait times labelled with ``name``, a duration histogram by SQL
    verb, and a rate-limited warning when callers queue for a connection or a
    statement is slower than ``settings.slow_query_threshold``.

    Args:
        settings: the ``database`` section.
        name: the ``db_client_connection_pool_name`` label of this database's
            pool metrics; give each ``Database`` of a process its own.
        trace: a CLIENT span per statement made inside a sampled trace (the
            statement's template, never its values); ``install`` passes
            ``tracing.enabled and tracing.trace_database``. Off, the engine
            carries no tracing listener.
        tracer_provider: the provider of the statements' spans; the global one
            when omitted. ``install`` passes the app's, so they reach its exporter.
        pipeline: the resilience pipeline new connections are opened through
            (``install`` passes the ``database`` one); statements that lose their
            connection count as failures of its circuit too. ``None``: connections
            are opened directly.

    Example:
        >>> db = Database(DatabaseSettings(url="sqlite+aiosqlite:///./var/app.db"))
        >>> async with db.session() as session:
        ...     await session.execute(text("select 1"))
        >>> await db.aclose()
    """

    def __init__(
        self,
        settings: DatabaseSettings,
        *,
        name: str = "default",
        trace: bool = False,
        tracer_provider: TracerProvider | None = None,
        pipeline: Pipeline | None = None,
    ) -> None:
        self.settings = settings
        self.name = name
        url = async_url(settings.url.get_secret_value())
        self.kind = backend_kind(url)
        self.display_url = redact_url(url)
        self.engine: AsyncEngine = _create_engine(url, settings, self.kind)
        instrument(
            self.engine, name=name, settings=settings, trace=trace, tracer_provider=tracer_provider
        )
        self.pipeline = pipeline
        if pipeline is not None:
            _guard_connections(self.engine, pipeline)
        self.sessions: async_sessionmaker[AsyncSession] = async_sessionmaker(
            self.engine, expire_on_commit=False
        )

    @asynccontextmanager
    async def session(self) -> AsyncIterator[AsyncSession]:
        """Yield a session in a transaction: committed on success, rolled back on error."""
        async with self.sessions() as session, session.begin():
            yield session

    async def ping(self) -> None:
        """Run a trivial query; raises when the database cannot be reached."""
        async with self.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def aclose(self) -> None:
        """Close every pooled connection."""
        await self.engine.dispose()


# The URLs people copy from elsewhere name no driver, or a synchronous one; the
# async engine needs the async driver of the same database.
_ASYNC_DRIVERS = {
    "postgres": "postgresql+asyncpg",
    "postgresql": "postgresql+asyncpg",
    "sqlite": "sqlite+aiosqlite",
}


def async_url(url: str) -> str:
    """Return ``url`` with the async driver bastion uses when it names none.

    Example:
        >>> async_url("postgres://app@db/app")
        'postgresql+asyncpg://app@db/app'
    """
    scheme, separator, rest = url.partition("://")
    return _ASYNC_DRIVERS.get(scheme.lower(), scheme) + separator + rest


def _create_engine(url: str, settings: DatabaseSettings, kind: BackendKind) -> AsyncEngine:
    # The pool SQLAlchemy picks for PostgreSQL and SQLite files, measured.
    options: dict[str, Any] = {
        "echo": settings.echo,
        "pool_pre_ping": settings.pool_pre_ping,
        "poolclass": InstrumentedQueuePool,
    }
    if kind is BackendKind.SQLITE:
        _ensure_directory(url)
        options["connect_args"] = {"timeout": settings.connect_timeout}
        if ":memory:" in url or url.rstrip("/").endswith("sqlite+aiosqlite:"):
            # Each pooled connection to :memory: would be a separate empty database.
            options["poolclass"] = NullPool
        else:
            # pool_size and max_overflow stay SQLAlchemy's (5 and 10) on SQLite, as
            # their settings say; how long a caller may queue applies to any pool.
            options["pool_timeout"] = settings.pool_timeout
        engine = create_async_engine(url, **options)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    if kind is BackendKind.POSTGRES:
        import_optional("asyncpg")
        options.update(
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout,
            pool_recycle=settings.pool_recycle,
            connect_args={"timeout": settings.connect_timeout},
        )
        return create_async_engine(url, **options)
    raise ConfigurationError(f"database.url must be SQLite or PostgreSQL, not {kind.value}")


def _ensure_directory(url: str) -> None:
    database = make_url(url).database
    if database and database != ":memory:":
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets readers proceed during a write; busy_timeout makes a second writer
    # wait instead of failing at once; SQLite leaves foreign keys off by default.
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _guard_connections(engine: AsyncEngine, pipeline: Pipeline) -> None:
    """Open new connections through ``pipeline``; count lost connections on its circuit."""

    def connect(
        dialect: Dialect,
        _record: ConnectionPoolEntry,
        cargs: tuple[Any, ...],
        cparams: dict[str, Any],
    ) -> Any:
        # SQLAlchemy calls this inside the greenlet that runs the pool's sync code:
        # await_only hands the coroutine to the event loop, and the driver's own
        # await_only inside dialect.connect needs a greenlet of its own.
        return await_only(_connect(pipeline, dialect, cargs, cparams))

    def lost(context: ExceptionContext) -> None:
        # A statement whose connection died: the database's fault, as a failed
        # connect is. Only a closed circuit counts it: a half-open one is deciding
        # on its probes (connects), and an open one counts nothing.
        breaker = pipeline.breaker
        if (
            context.is_disconnect
            and not context.is_pre_ping
            and context.connection is not None
            and breaker is not None
            and breaker.state is CircuitState.CLOSED
        ):
            breaker.record_failure(0.0)

    event.listen(engine.sync_engine, "do_connect", connect)
    event.listen(engine.sync_engine, "handle_error", lost)


async def _connect(
    pipeline: Pipeline, dialect: Dialect, cargs: tuple[Any, ...], cparams: dict[str, Any]
) -> Any:
    try:
        return await pipeline.call(greenlet_spawn, dialect.connect, *cargs, **cparams)
    except DependencyError as exc:
        # Connecting failed on every attempt: surface the driver's own error, as
        # without a pipeline, so the data layer's handling (a 503 "dependency
        # unreachable", readiness naming the error) stays the same. A timeout and
        # an open circuit are already 503s of their own.
        cause = exc.__cause__
        if isinstance(exc, DependencyTimeoutError) or not isinstance(cause, Exception):
            raise
    # Raised outside the handler, so the driver's error does not chain back to
    # the DependencyError that carries it.
    raise cause
