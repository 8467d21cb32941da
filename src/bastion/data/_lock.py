"""The migration lock: one migration run at a time per database, across processes and hosts.

PostgreSQL: a session-level advisory lock on the migrating connection, under
one constant key (:data:`ADVISORY_LOCK_KEY`). It is tied to the session, so a
holder that crashes, or whose connection drops, frees it; the server does the
bookkeeping.

SQLite: an exclusive ``flock`` (the ``filelock`` package) on
``<database file>.migrate.lock``; the operating system frees it when the
holding process dies. An in-memory database exists in one process only, whose
own lock already serialises runs.

Both are taken by polling (``pg_try_advisory_lock``, a non-blocking
``flock``) rather than a blocking call, so a waiter can say who holds the lock
while it waits and give up after ``migrations.lock_timeout`` with a message
naming the holder.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Protocol

import structlog
from filelock import FileLock, Timeout
from sqlalchemy import column, func, select, table
from tenacity import AsyncRetrying, RetryCallState, retry_if_result, stop_after_delay, wait_fixed

from bastion.data._errors import MigrationError

if TYPE_CHECKING:
    from sqlalchemy import Select
    from sqlalchemy.engine import URL
    from sqlalchemy.ext.asyncio import AsyncConnection

__all__ = ["ADVISORY_LOCK_KEY", "DEFAULT_POLL_INTERVAL", "LOCK_NAME", "migration_lock"]

logger = structlog.get_logger("bastion.migrations")

LOCK_NAME: Final = "bastion.migrations"
# The first 63 bits of the name's SHA-256: a constant that every version of
# bastion derives alike, positive so pg_locks' classid/objid split is plain.
ADVISORY_LOCK_KEY: Final = int.from_bytes(hashlib.sha256(LOCK_NAME.encode()).digest()[:8]) >> 1
DEFAULT_POLL_INTERVAL: Final = 0.1
"""Seconds between two attempts: a loser starts at most this long after the winner ends."""
_REPORT_EVERY: Final = 10.0
# PostgreSQL truncates application_name to NAMEDATALEN - 1 bytes.
_APPLICATION_NAME_MAX: Final = 63

_pg_locks = table(
    "pg_locks",
    column("pid"),
    column("locktype"),
    column("database"),
    column("classid"),
    column("objid"),
    column("objsubid"),
    column("granted"),
)
_pg_stat_activity = table(
    "pg_stat_activity", column("pid"), column("application_name"), column("client_addr")
)
_pg_database = table("pg_database", column("oid"), column("datname"))


class _Lock(Protocol):
    async def try_acquire(self) -> bool: ...

    async def holder(self) -> str: ...

    async def release(self) -> None: ...


@asynccontextmanager
async def migration_lock(
    connection: AsyncConnection,
    *,
    owner: str,
    lock_timeout: float,
    poll_interval: float = DEFAULT_POLL_INTERVAL,
) -> AsyncIterator[None]:
    """Hold the database's migration lock while the block runs.

    Args:
        connection: the migrating connection; on PostgreSQL the lock belongs to
            its session. It is left outside any transaction.
        owner: who is asking, as other waiters will see it (``tool: user@host pid N``).
        lock_timeout: seconds to wait for another holder before giving up.
        poll_interval: seconds between two attempts.

    Raises:
        MigrationError: the lock is still held after ``timeout``; the message
            names the holder.
    """
    lock = _lock_for(connection, owner)
    if lock is None:
        yield
        return
    await _acquire(lock, lock_timeout=lock_timeout, poll_interval=poll_interval)
    try:
        yield
    finally:
        await lock.release()


async def _acquire(lock: _Lock, *, lock_timeout: float, poll_interval: float) -> None:
    waiting = _WaitReport(lock, lock_timeout)
    retrying = AsyncRetrying(
        stop=stop_after_delay(lock_timeout),
        wait=wait_fixed(poll_interval),
        retry=retry_if_result(lambda acquired: acquired is False),
        before_sleep=waiting.report,
        retry_error_callback=lambda _state: False,
    )
    acquired: bool = await retrying(lock.try_acquire)
    if not acquired:
        holder = await lock.holder()
        raise MigrationError(
            f"another migration run holds the migration lock ({holder}); gave up after "
            f"{lock_timeout:g} s (migrations.lock_timeout)"
        )
    if waiting.reported_at is not None:
        logger.info("migration lock acquired")


class _WaitReport:
    """Logs that a run waits for the lock: at the first failed attempt, then every 10 s."""

    def __init__(self, lock: _Lock, timeout: float) -> None:
        self.lock = lock
        self.timeout = timeout
        self.reported_at: float | None = None

    async def report(self, state: RetryCallState) -> None:
        waited = state.seconds_since_start or 0.0
        if self.reported_at is None or waited - self.reported_at >= _REPORT_EVERY:
            self.reported_at = waited
            logger.warning(
                "waiting for the migration lock",
                holder=await self.lock.holder(),
                waited_s=round(waited, 1),
                timeout_s=self.timeout,
            )


def _lock_for(connection: AsyncConnection, owner: str) -> _Lock | None:
    url = connection.engine.url
    backend = url.get_backend_name()
    if backend == "postgresql":
        return _AdvisoryLock(connection, owner)
    if backend == "sqlite":
        path = _sqlite_file(url)
        return None if path is None else _FileMigrationLock(path, owner)
    return None


def _sqlite_file(url: URL) -> Path | None:
    """The database file, or ``None`` for an in-memory database (plain or ``file:`` URI)."""
    database = url.database or ""
    if database.startswith("file:"):
        if url.query.get("mode") == "memory" or database.startswith("file::memory:"):
            return None
        database = database.removeprefix("file:")
    if database in {"", ":memory:"}:
        return None
    return Path(database).expanduser().resolve()


class _AdvisoryLock:
    """``pg_try_advisory_lock`` on the migrating session, which names itself while it holds it."""

    def __init__(self, connection: AsyncConnection, owner: str) -> None:
        self.connection = connection
        self.owner = owner
        self._previous_name: str | None = None

    async def try_acquire(self) -> bool:
        if self._previous_name is None:
            # Waiters read application_name to say who holds the lock; the
            # session's own name comes back when the connection returns to the pool.
            self._previous_name = str(
                await self._scalar(select(func.current_setting("application_name")))
            )
            await self._set_name(self.owner)
        return bool(await self._scalar(select(func.pg_try_advisory_lock(ADVISORY_LOCK_KEY))))

    async def holder(self) -> str:
        query = (
            select(
                _pg_locks.c.pid,
                _pg_stat_activity.c.application_name,
                _pg_stat_activity.c.client_addr,
            )
            .select_from(
                _pg_locks.outerjoin(_pg_stat_activity, _pg_stat_activity.c.pid == _pg_locks.c.pid)
            )
            .where(
                _pg_locks.c.locktype == "advisory",
                _pg_locks.c.granted,
                # A bigint key is split across classid (high half) and objid (low half).
                _pg_locks.c.classid == ADVISORY_LOCK_KEY >> 32,
                _pg_locks.c.objid == ADVISORY_LOCK_KEY & 0xFFFFFFFF,
                _pg_locks.c.objsubid == 1,
                _pg_locks.c.database
                == select(_pg_database.c.oid)
                .where(_pg_database.c.datname == func.current_database())
                .scalar_subquery(),
            )
        )
        row = (await self.connection.execute(query)).first()
        await self.connection.commit()
        if row is None:
            return "holder unknown: it may have just released the lock"
        pid, name, address = row
        where = f", client {address}" if address is not None else ""
        return f"held by PostgreSQL backend pid {pid}, application_name {name or ''!r}{where}"

    async def release(self) -> None:
        # Best effort: if the connection broke, its session ended and freed the lock.
        with suppress(Exception):
            await self._scalar(select(func.pg_advisory_unlock(ADVISORY_LOCK_KEY)))
            if self._previous_name is not None:
                await self._set_name(self._previous_name)

    async def _set_name(self, name: str) -> None:
        await self._scalar(
            select(func.set_config("application_name", name[:_APPLICATION_NAME_MAX], False))
        )

    async def _scalar(self, query: Select[Any]) -> Any:
        result = await self.connection.scalar(query)
        # Outside any transaction again: Alembic must open each revision's own.
        await self.connection.commit()
        return result


class _FileMigrationLock:
    """An exclusive ``flock`` on ``<database>.migrate.lock``, whose content names the holder."""

    def __init__(self, database: Path, owner: str) -> None:
        self.path = database.with_name(database.name + ".migrate.lock")
        self.owner = owner
        self._lock = FileLock(self.path)

    async def try_acquire(self) -> bool:
        # Non-blocking: the event loop is never held waiting for another process.
        try:
            self._lock.acquire(blocking=False)
        except Timeout:
            return False
        self.path.write_text(self.owner + "\n")
        return True

    async def holder(self) -> str:
        try:
            owner = self.path.read_text().strip()
        except OSError:
            owner = ""
        return f"held by {owner} (lock file {self.path})" if owner else f"lock file {self.path}"

    async def release(self) -> None:
        self.path.write_text("")
        self._lock.release()
