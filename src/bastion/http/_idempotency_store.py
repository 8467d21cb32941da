"""Idempotency stores: where keys are held while in progress and responses kept for replay.

One interface, three backends, chosen by URL (:func:`build_idempotency_store`):

- :class:`MemoryIdempotencyStore`: one process. Every operation runs without an
  ``await`` inside, so on one event loop each is atomic.
- :class:`RedisIdempotencyStore`: one round trip per operation. Acquire is a Lua
  script that either takes the key (``SET ... PX lock_timeout``) or returns what
  holds it; complete and release are scripts guarded by the holder's value, so a
  request whose lock expired (and was taken over) cannot overwrite its successor.
  The in-progress key expires with its lock: a crashed holder's key is free again
  after ``lock_timeout``, and the first retry to ask takes it, atomically.
- :class:`SqlIdempotencyStore`: the ``bastion_idempotency_keys`` table on SQLite
  or PostgreSQL. Acquire is ``INSERT ... ON CONFLICT DO NOTHING RETURNING``; a
  row past its expiry (a crashed holder, or a response past its replay window) is
  taken over by a conditional ``UPDATE ... WHERE expires_at <= now``, which one
  request alone can win; complete and release check the holder's token. Expired
  rows are deleted by a periodic purge, in batches.

A store that cannot answer raises :class:`IdempotencyStoreError` (native errors
chained); the middleware then answers 503 rather than run the request without
the guarantee.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, Literal, Protocol

import orjson
import structlog
from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite

from bastion.backends import BackendKind, backend_kind, import_optional
from bastion.errors import ConfigurationError
from bastion.http._tables import (
    DIGEST_LENGTH,
    STATE_COMPLETE,
    STATE_IN_PROGRESS,
    idempotency_keys,
    idempotency_metadata,
)

if TYPE_CHECKING:
    from bastion.data import Database
    from bastion.settings import Settings

__all__ = [
    "IdempotencyRecord",
    "IdempotencyStore",
    "IdempotencyStoreError",
    "MemoryIdempotencyStore",
    "RedisIdempotencyStore",
    "SqlIdempotencyStore",
    "StoredResponse",
    "build_idempotency_store",
    "idempotency_store_kind",
]

logger = structlog.get_logger("bastion.http.idempotency")

StoreKind = Literal["memory", "redis", "sql"]

DEFAULT_PURGE_INTERVAL: Final = 60.0
"""Seconds between two purges of expired rows (SQL) or entries (memory)."""
DEFAULT_PURGE_BATCH: Final = 1000
"""Rows one purge statement deletes at most: short transactions, short locks."""

Header = tuple[bytes, bytes]


class IdempotencyStoreError(Exception):
    """The store could not answer (Redis or the database down, a timeout); the cause is chained."""


@dataclass(frozen=True, slots=True)
class StoredResponse:
    """A response kept for replay.

    Attributes:
        status: the HTTP status the app answered.
        headers: the headers kept (raw ASGI pairs, lowercase names).
        body: the whole body.
    """

    status: int
    headers: tuple[Header, ...]
    body: bytes


@dataclass(frozen=True, slots=True)
class IdempotencyRecord:
    """What holds a key: a request in progress, or a stored response.

    Attributes:
        fingerprint: the hex SHA-256 of the request that took the key.
        response: the stored response; ``None`` while that request is in progress.
    """

    fingerprint: str
    response: StoredResponse | None = None

    @property
    def complete(self) -> bool:
        """Whether the response is stored (else a request holds the key)."""
        return self.response is not None


class IdempotencyStore(Protocol):
    """Holds idempotency keys and their responses; every backend behaves alike.

    Keys are opaque (the middleware's scoped digest); ``token`` names the request
    that holds a key, so only it can complete or release it.
    """

    kind: StoreKind

    async def acquire(
        self, key: str, fingerprint: str, token: str, *, lock_timeout: float
    ) -> IdempotencyRecord | None:
        """Take ``key`` for the request ``token`` until ``lock_timeout`` seconds pass.

        Returns:
            ``None`` when taken (the key was free, or its holder's lock or its
            response's replay window had expired); else what holds it.

        Raises:
            IdempotencyStoreError: the store did not answer.
        """
        ...

    async def complete(
        self, key: str, fingerprint: str, token: str, response: StoredResponse, *, ttl: float
    ) -> bool:
        """Store the response of the request holding ``key``, for ``ttl`` seconds.

        Returns:
            Whether it was stored: ``False`` when ``token`` no longer holds the key.

        Raises:
            IdempotencyStoreError: the store did not answer.
        """
        ...

    async def release(self, key: str, fingerprint: str, token: str) -> bool:
        """Free ``key`` without a response, so that a retry executes again.

        Returns:
            Whether it was released: ``False`` when ``token`` no longer held it.

        Raises:
            IdempotencyStoreError: the store did not answer.
        """
        ...

    async def start(self) -> None:
        """Start background work (the purge); called once at start-up."""
        ...

    async def stop(self) -> None:
        """Stop background work and close what the store owns."""
        ...

    async def ping(self) -> None:
        """Readiness: raise when the store cannot answer."""
        ...


def _encode_headers(headers: tuple[Header, ...]) -> bytes:
    return orjson.dumps(
        [[name.decode("latin-1"), value.decode("latin-1")] for name, value in headers]
    )


def _decode_headers(raw: bytes | str) -> tuple[Header, ...]:
    return tuple(
        (str(name).encode("latin-1"), str(value).encode("latin-1"))
        for name, value in orjson.loads(raw)
    )


# -- memory ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    token: str | None
    expires_at: float
    response: StoredResponse | None


class MemoryIdempotencyStore:
    """Keys and responses in this process's memory: right for one process only.

    Expired entries are dropped every ``purge_every`` acquisitions, so memory is
    bounded by the responses of one replay window.

    Args:
        clock: seconds on a monotonic clock (a test's fake clock).
        purge_every: acquisitions between two sweeps of expired entries.
    """

    kind: StoreKind = "memory"

    def __init__(
        self, *, clock: Callable[[], float] = time.monotonic, purge_every: int = 1024
    ) -> None:
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._purge_every = purge_every
        self._until_purge = purge_every

    async def acquire(
        self, key: str, fingerprint: str, token: str, *, lock_timeout: float
    ) -> IdempotencyRecord | None:
        """Take ``key``, or return what holds it (see :class:`IdempotencyStore`)."""
        now = self._clock()
        self._until_purge -= 1
        if self._until_purge <= 0:
            self.purge()
        entry = self._entries.get(key)
        if entry is not None and entry.expires_at > now:
            return IdempotencyRecord(entry.fingerprint, entry.response)
        self._entries[key] = _Entry(fingerprint, token, now + lock_timeout, None)
        return None

    async def complete(
        self, key: str, fingerprint: str, token: str, response: StoredResponse, *, ttl: float
    ) -> bool:
        """Store the holder's response (see :class:`IdempotencyStore`)."""
        entry = self._entries.get(key)
        if entry is None or entry.token != token or entry.response is not None:
            return False
        self._entries[key] = _Entry(fingerprint, None, self._clock() + ttl, response)
        return True

    async def release(self, key: str, fingerprint: str, token: str) -> bool:
        """Free the holder's key (see :class:`IdempotencyStore`)."""
        entry = self._entries.get(key)
        if entry is None or entry.token != token or entry.response is not None:
            return False
        del self._entries[key]
        return True

    def purge(self) -> int:
        """Drop expired entries; return how many."""
        self._until_purge = self._purge_every
        now = self._clock()
        expired = [key for key, entry in self._entries.items() if entry.expires_at <= now]
        for key in expired:
            del self._entries[key]
        return len(expired)

    async def start(self) -> None:
        """Nothing runs in the background."""

    async def stop(self) -> None:
        """Forget every key."""
        self._entries.clear()

    async def ping(self) -> None:
        """Always ready."""


# -- Redis ----------------------------------------------------------------------------------

_IN_PROGRESS: Final = b"P"
_COMPLETE: Final = b"C"


def _script(name: str) -> str:
    return resources.files("bastion.http").joinpath(name).read_text("utf-8")


class RedisIdempotencyStore:
    r"""Keys and responses in Redis, one round trip per operation (see the module docstring).

    A value is ``P<token><fingerprint>`` while in progress, and
    ``C<fingerprint><json status and headers>\\n<body>`` once complete: fixed-width
    heads, so the scripts compare whole values and parse nothing.

    Args:
        client: a ``redis.asyncio.Redis`` (bytes replies: ``decode_responses`` off).
        key_prefix: put before every key (``redis.key_prefix``).
        own_client: close ``client`` at :meth:`stop` (a client made for this store).
    """

    kind: StoreKind = "redis"

    def __init__(self, client: Any, *, key_prefix: str = "", own_client: bool = False) -> None:
        self.client = client
        self.prefix = f"{key_prefix}idempotency:"
        self._own = own_client
        self._acquire = client.register_script(_script("idempotency_acquire.lua"))
        self._complete = client.register_script(_script("idempotency_complete.lua"))
        self._release = client.register_script(_script("idempotency_release.lua"))

    async def _run(self, script: Any, key: str, *args: Any) -> Any:
        try:
            return await script(keys=[self.prefix + key], args=list(args))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise IdempotencyStoreError(f"redis: {type(exc).__name__}") from exc

    async def acquire(
        self, key: str, fingerprint: str, token: str, *, lock_timeout: float
    ) -> IdempotencyRecord | None:
        """Take ``key``, or return what holds it (see :class:`IdempotencyStore`)."""
        held = _IN_PROGRESS + token.encode() + fingerprint.encode()
        value = await self._run(self._acquire, key, held, _milliseconds(lock_timeout))
        return None if value is None else _decode(value)

    async def complete(
        self, key: str, fingerprint: str, token: str, response: StoredResponse, *, ttl: float
    ) -> bool:
        """Store the holder's response (see :class:`IdempotencyStore`)."""
        held = _IN_PROGRESS + token.encode() + fingerprint.encode()
        head = orjson.dumps(
            {"s": response.status, "h": orjson.Fragment(_encode_headers(response.headers))}
        )
        record = _COMPLETE + fingerprint.encode() + head + b"\n" + response.body
        return bool(await self._run(self._complete, key, held, record, _milliseconds(ttl)))

    async def release(self, key: str, fingerprint: str, token: str) -> bool:
        """Free the holder's key (see :class:`IdempotencyStore`)."""
        held = _IN_PROGRESS + token.encode() + fingerprint.encode()
        return bool(await self._run(self._release, key, held))

    async def start(self) -> None:
        """Nothing runs in the background: Redis expires keys itself."""

    async def stop(self) -> None:
        """Close the client when the store made it."""
        if self._own:
            await self.client.aclose()

    async def ping(self) -> None:
        """Readiness: Redis answers ``PING``."""
        try:
            await self.client.ping()
        except Exception as exc:
            raise IdempotencyStoreError(f"redis: {type(exc).__name__}") from exc


def _milliseconds(seconds: float) -> int:
    # PX refuses 0: a key must live at least a millisecond.
    return max(1, int(seconds * 1000))


def _decode(value: bytes) -> IdempotencyRecord:
    if value[:1] == _IN_PROGRESS:
        # P + 32 hex of token + 64 hex of fingerprint.
        return IdempotencyRecord(value[33 : 33 + DIGEST_LENGTH].decode())
    fingerprint = value[1 : 1 + DIGEST_LENGTH].decode()
    head, _, body = value[1 + DIGEST_LENGTH :].partition(b"\n")
    meta = orjson.loads(head)
    headers = tuple((str(n).encode("latin-1"), str(v).encode("latin-1")) for n, v in meta["h"])
    return IdempotencyRecord(fingerprint, StoredResponse(int(meta["s"]), headers, body))


# -- SQL ------------------------------------------------------------------------------------


def _utc_now() -> datetime:
    return datetime.now(UTC)


class SqlIdempotencyStore:
    """Keys and responses in ``bastion_idempotency_keys`` (SQLite or PostgreSQL).

    Expiry compares with this process's clock: instances sharing a database should
    keep their clocks in sync (NTP), as the lock timeout is measured across them.

    Args:
        database: the database holding the table (made by migration ``0005_idempotency``).
        clock: the current UTC instant (a test's fake clock).
        purge_interval: seconds between two purges of expired rows; 0 disables.
        purge_batch: rows one purge statement deletes at most.
        own_database: a database made for this store: its table is created at
            :meth:`start` when missing (bastion's migrations run on ``database.url``
            only), and it is closed at :meth:`stop`.
    """

    kind: StoreKind = "sql"

    def __init__(
        self,
        database: Database,
        *,
        clock: Callable[[], datetime] = _utc_now,
        purge_interval: float = DEFAULT_PURGE_INTERVAL,
        purge_batch: int = DEFAULT_PURGE_BATCH,
        own_database: bool = False,
    ) -> None:
        self.database = database
        self._clock = clock
        self._purge_interval = purge_interval
        self._purge_batch = purge_batch
        self._own = own_database
        self._task: asyncio.Task[None] | None = None
        self._insert: Any = (
            postgresql.insert if database.kind is BackendKind.POSTGRES else sqlite.insert
        )

    async def acquire(
        self, key: str, fingerprint: str, token: str, *, lock_timeout: float
    ) -> IdempotencyRecord | None:
        """Take ``key``, or return what holds it (see :class:`IdempotencyStore`)."""
        table = idempotency_keys
        # A row released between our insert and our read is gone: ask again, a few times.
        for _ in range(3):
            now = self._clock()
            held = {
                "fingerprint": fingerprint,
                "state": STATE_IN_PROGRESS,
                "token": token,
                "expires_at": now + timedelta(seconds=lock_timeout),
                "status": None,
                "headers": None,
                "body": None,
                "created_at": now,
            }
            try:
                async with self.database.engine.begin() as connection:
                    inserted = await connection.execute(
                        self._insert(table)
                        .values(key=key, **held)
                        .on_conflict_do_nothing(index_elements=[table.c.key])
                        .returning(table.c.key)
                    )
                    if inserted.first() is not None:
                        return None
                    # Past its expiry (a crashed holder, a response out of its window):
                    # the condition is re-checked on the row under its lock, so one
                    # request alone takes it over.
                    taken = await connection.execute(
                        update(table)
                        .where(table.c.key == key, table.c.expires_at <= now)
                        .values(**held)
                        .returning(table.c.key)
                    )
                    if taken.first() is not None:
                        return None
                    row = (
                        await connection.execute(
                            select(
                                table.c.fingerprint,
                                table.c.state,
                                table.c.status,
                                table.c.headers,
                                table.c.body,
                            ).where(table.c.key == key)
                        )
                    ).first()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise IdempotencyStoreError(f"database: {type(exc).__name__}") from exc
            if row is None:
                continue
            if row.state != STATE_COMPLETE:
                return IdempotencyRecord(row.fingerprint)
            response = StoredResponse(
                int(row.status), _decode_headers(row.headers or "[]"), bytes(row.body or b"")
            )
            return IdempotencyRecord(row.fingerprint, response)
        raise IdempotencyStoreError("database: the key changed hands three times in a row")

    async def complete(
        self, key: str, fingerprint: str, token: str, response: StoredResponse, *, ttl: float
    ) -> bool:
        """Store the holder's response (see :class:`IdempotencyStore`)."""
        table = idempotency_keys
        statement = (
            update(table)
            .where(
                table.c.key == key,
                table.c.token == token,
                table.c.state == STATE_IN_PROGRESS,
            )
            .values(
                state=STATE_COMPLETE,
                token=None,
                expires_at=self._clock() + timedelta(seconds=ttl),
                status=response.status,
                headers=_encode_headers(response.headers).decode(),
                body=response.body,
            )
            .returning(table.c.key)
        )
        return await self._changed(statement)

    async def release(self, key: str, fingerprint: str, token: str) -> bool:
        """Free the holder's key (see :class:`IdempotencyStore`)."""
        table = idempotency_keys
        statement = (
            delete(table)
            .where(
                table.c.key == key,
                table.c.token == token,
                table.c.state == STATE_IN_PROGRESS,
            )
            .returning(table.c.key)
        )
        return await self._changed(statement)

    async def _changed(self, statement: Any) -> bool:
        try:
            async with self.database.engine.begin() as connection:
                return (await connection.execute(statement)).first() is not None
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise IdempotencyStoreError(f"database: {type(exc).__name__}") from exc

    async def purge(self) -> int:
        """Delete expired rows in batches; return how many.

        Raises:
            IdempotencyStoreError: the database did not answer.
        """
        table = idempotency_keys
        total = 0
        while True:
            expired = (
                select(table.c.key)
                .where(table.c.expires_at <= self._clock())
                .limit(self._purge_batch)
                .scalar_subquery()
            )
            try:
                async with self.database.engine.begin() as connection:
                    deleted = (
                        await connection.execute(delete(table).where(table.c.key.in_(expired)))
                    ).rowcount
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                raise IdempotencyStoreError(f"database: {type(exc).__name__}") from exc
            total += deleted
            if deleted < self._purge_batch:
                return total

    async def _purge_forever(self) -> None:
        while True:
            await asyncio.sleep(self._purge_interval)
            try:
                deleted = await self.purge()
            except IdempotencyStoreError as exc:
                # The next round tries again; expired rows only take space meanwhile.
                logger.warning("idempotency purge failed", error=str(exc))
            else:
                if deleted:
                    logger.debug("idempotency keys purged", deleted=deleted)

    async def start(self) -> None:
        """Create the table in a database of the store's own; start the periodic purge."""
        if self._own:
            async with self.database.engine.begin() as connection:
                await connection.run_sync(idempotency_metadata.create_all, checkfirst=True)
        if self._purge_interval > 0 and self._task is None:
            self._task = asyncio.create_task(
                self._purge_forever(), name="bastion idempotency purge"
            )

    async def stop(self) -> None:
        """Stop the purge; close a database of the store's own."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._own:
            await self.database.aclose()

    async def ping(self) -> None:
        """Readiness: the table answers a read."""
        try:
            async with self.database.engine.connect() as connection:
                await connection.execute(select(idempotency_keys.c.key).limit(1))
        except Exception as exc:
            raise IdempotencyStoreError(f"database: {type(exc).__name__}") from exc


# -- choice ---------------------------------------------------------------------------------


def idempotency_store_kind(settings: Settings) -> StoreKind:
    """Which backend :func:`build_idempotency_store` picks for ``settings`` (no connection).

    ``http.idempotency.store_url`` when set; else Redis when ``redis.url`` is set;
    else the database when it is on; else memory.
    """
    url = settings.http.idempotency.store_url
    if url is None:
        if settings.redis.enabled and settings.redis.url is not None:
            return "redis"
        return "sql" if settings.database.enabled else "memory"
    kind = backend_kind(url)
    if kind is BackendKind.MEMORY:
        return "memory"
    if kind is BackendKind.REDIS:
        return "redis"
    if kind in (BackendKind.SQLITE, BackendKind.POSTGRES):
        return "sql"
    raise ConfigurationError(
        f"http.idempotency.store_url must be memory://, a Redis URL or a SQL URL, not {kind.value}"
    )


def build_idempotency_store(
    settings: Settings, *, redis: Any, database: Database | None
) -> IdempotencyStore:
    """Build the store ``settings`` choose (nothing connects yet).

    ``http.idempotency.store_url`` wins: ``memory://``; a Redis URL (a client of
    the store's own); a SQL URL (the shared database when it is ``database.url``,
    else an engine of the store's own, whose table is created at start). Unset:
    the shared Redis client, else the shared database, else memory.

    Example:
        >>> runtime = app.state.bastion
        >>> store = build_idempotency_store(
        ...     runtime.settings, redis=runtime.redis, database=runtime.database
        ... )

    Args:
        settings: the effective settings.
        redis: the shared ``redis.asyncio`` client, or ``None``.
        database: the shared database, or ``None`` when it is off.

    Raises:
        ConfigurationError: ``store_url`` names another kind of backend.
    """
    kind = idempotency_store_kind(settings)
    url = settings.http.idempotency.store_url
    prefix = settings.redis.key_prefix
    if kind == "memory":
        return MemoryIdempotencyStore()
    if kind == "redis":
        if url is None:
            return RedisIdempotencyStore(redis, key_prefix=prefix)
        redis_asyncio: Any = import_optional("redis.asyncio")
        client = redis_asyncio.from_url(
            url,
            socket_timeout=settings.redis.socket_timeout,
            socket_connect_timeout=settings.redis.socket_timeout,
        )
        return RedisIdempotencyStore(client, key_prefix=prefix, own_client=True)
    if url is None or (database is not None and url == database.settings.url.get_secret_value()):
        if database is None:  # pragma: no cover -- the kind says the database is on
            raise ConfigurationError("the idempotency SQL store needs the database")
        return SqlIdempotencyStore(database)
    from bastion.data import Database  # noqa: PLC0415 -- only a store of its own needs it
    from bastion.settings import DatabaseSettings  # noqa: PLC0415 -- as above

    own = Database(DatabaseSettings(url=url), name="idempotency")
    return SqlIdempotencyStore(own, own_database=True)
