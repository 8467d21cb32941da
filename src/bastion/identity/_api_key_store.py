"""The API-key store of the request path: records by public id, cached in process.

Every request with an API key needs the key's record (:meth:`ApiKeyStore.get`)
before :meth:`~bastion.identity.ApiKeys.check` compares digests. The store
answers from a bounded LRU dict for ``ttl`` seconds, so a busy key costs one
query per ``ttl`` per instance, not one per request. Unknown public ids are
cached too, for a shorter time (``negative_ttl``), so a flood of made-up keys
with valid checksums does not reach the database on every request; the caller
still runs ``ApiKeys.check`` with ``None``, whose dummy comparison keeps an
unknown key as slow as a wrong one.

Revocation across instances: the revoking instance drops its own entry
(:meth:`ApiKeyStore.forget`) and writes the key's id to the deny list until
every other instance's cached copy has expired (``ttl``). A cached record is
checked against the deny list before it is served (one ``MGET``, pipelined with
concurrent callers); a record read from the database needs no check, since its
``revoked_at`` is current. Without Redis (no deny list) another instance may
accept a revoked key for at most ``ttl`` seconds (documented).

Revoking is two steps, shared by ``DELETE /api-keys/{id}`` and the member routes
(a removed member's keys, a demoted member's keys beyond its new role): inside
the caller's transaction :func:`revoke_api_keys` sets ``revoked_at``; after the
commit :func:`announce_revoked` drops the cached records, writes the deny list
and emits ``api_key_revoked``.

``last_used_at`` is written in the background (:meth:`ApiKeyStore.touch`), at
most once per ``touch_interval`` per key and instance, with a conditional
``UPDATE`` so that instances together write at most about once per interval. A
failed write is logged and forgotten: it never fails the request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, Final

import structlog
from sqlalchemy import or_, select, update

from bastion.identity._api_keys import ApiKeyRecord, ApiKeys, LastUsedPolicy
from bastion.identity._events import SecurityEventKind, emit_security_event
from bastion.identity._tables import api_keys as api_keys_table

if TYPE_CHECKING:
    from sqlalchemy import ColumnElement
    from sqlalchemy.ext.asyncio import AsyncSession

    from bastion.data import Database
    from bastion.identity._deny_list import RedisDenyList
    from bastion.identity._runtime import Identity

__all__ = [
    "DEFAULT_NEGATIVE_TTL",
    "DEFAULT_STORE_SIZE",
    "ApiKeyStore",
    "RevokedApiKey",
    "announce_revoked",
    "deny_list_entry",
    "record_from_row",
    "revoke_api_keys",
]

logger = structlog.get_logger("bastion.identity")

DEFAULT_STORE_SIZE: Final = 10_000
"""Records (and unknown ids) kept in process at most; the least recently used go first."""
DEFAULT_NEGATIVE_TTL: Final = 5.0
"""Seconds an unknown public id is remembered as unknown."""


def deny_list_entry(key_id: str) -> str:
    """Return the deny-list name of an API key id (kept apart from token ``jti``s)."""
    return "api_key:" + key_id


def record_from_row(row: Any) -> ApiKeyRecord:
    """Return the :class:`ApiKeyRecord` of a ``bastion_api_keys`` row."""
    return ApiKeyRecord(
        id=str(row.id),
        tenant=str(row.tenant_id),
        name=row.name,
        scopes=tuple(row.scopes or ()),
        prefix=row.prefix,
        public_id=row.public_id,
        hash=bytes(row.hash),
        created_at=row.created_at,
        expires_at=row.expires_at,
        last_used_at=row.last_used_at,
        revoked_at=row.revoked_at,
        created_by=str(row.created_by) if row.created_by is not None else None,
    )


@dataclass(frozen=True, slots=True)
class RevokedApiKey:
    """A key :func:`revoke_api_keys` just revoked: what :func:`announce_revoked` needs."""

    id: str
    public_id: str
    prefix: str
    expires_at: datetime | None


async def revoke_api_keys(
    session: AsyncSession, *where: ColumnElement[bool], now: datetime
) -> list[RevokedApiKey]:
    """Set ``revoked_at`` on the live keys matching ``where``, in the caller's transaction.

    Keys revoked already are left as they are. After the commit, pass the result to
    :func:`announce_revoked`: until then other instances may still serve cached copies.

    Returns:
        The keys revoked by this call.
    """
    rows = await session.execute(
        update(api_keys_table)
        .where(api_keys_table.c.revoked_at.is_(None), *where)
        .values(revoked_at=now)
        .returning(
            api_keys_table.c.id,
            api_keys_table.c.public_id,
            api_keys_table.c.prefix,
            api_keys_table.c.expires_at,
        )
    )
    return [RevokedApiKey(str(row.id), row.public_id, row.prefix, row.expires_at) for row in rows]


async def announce_revoked(
    identity: Identity,
    revoked: Iterable[RevokedApiKey],
    now: datetime,
    *,
    reason: str | None = None,
) -> None:
    """Make committed revocations take effect everywhere, and record them.

    Drops this instance's cached records, puts each key on the deny list (with
    Redis) and emits ``api_key_revoked`` (with ``reason`` when given).

    Raises:
        ServiceUnavailable: the deny list cannot be written and fails closed.
    """
    store = identity.api_key_store
    ttl = identity.settings.identity.api_keys.cache_ttl
    for key in revoked:
        if store is not None:
            store.forget(key.public_id)
        if identity.deny_list is not None:
            # Other instances may serve their cached copy for up to cache_ttl: deny
            # the key until that has run out (or the key expires, if sooner).
            until = now + timedelta(seconds=ttl + 1)
            if key.expires_at is not None:
                until = min(until, key.expires_at)
            await identity.deny_list.revoke(deny_list_entry(key.id), until.timestamp())
        details = {"key_prefix": key.prefix} | ({"reason": reason} if reason else {})
        await emit_security_event(
            SecurityEventKind.API_KEY_REVOKED, subject=key.id, details=details
        )


class ApiKeyStore:
    """API-key records by public id from the database, behind an in-process cache.

    Example:
        >>> store = ApiKeyStore(database, identity.api_keys, ttl=30, deny_list=deny)
        >>> verified = await identity.api_keys.authenticate(presented, store.get)
        >>> await store.touch(verified.record)

    Args:
        database: where ``bastion_api_keys`` lives.
        api_keys: the key maker (its clock stamps ``last_used_at``).
        ttl: seconds a found record is served from memory
            (``identity.api_keys.cache_ttl``).
        touch_interval: seconds between two ``last_used_at`` writes of one key
            (``identity.api_keys.touch_interval``).
        deny_list: revoked key ids across instances, or ``None`` without Redis.
        negative_ttl: seconds an unknown public id is remembered (at most ``ttl``).
        max_entries: records and unknown ids kept at most.
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        database: Database,
        api_keys: ApiKeys,
        *,
        ttl: float | timedelta = 30.0,
        touch_interval: float | timedelta = 60.0,
        deny_list: RedisDenyList | None = None,
        negative_ttl: float | timedelta = DEFAULT_NEGATIVE_TTL,
        max_entries: int = DEFAULT_STORE_SIZE,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be at least 1")
        self._database = database
        self._api_keys = api_keys
        self._ttl = _seconds(ttl)
        self._negative_ttl = min(_seconds(negative_ttl), self._ttl)
        self._deny_list = deny_list
        self._max = max_entries
        self._clock = clock
        self._interval = _seconds(touch_interval)
        self._last_used = LastUsedPolicy(self._interval, max_keys=max_entries)
        # public id -> (monotonic expiry, record or None for "unknown")
        self._entries: OrderedDict[str, tuple[float, ApiKeyRecord | None]] = OrderedDict()
        # Concurrent misses of one id share one query.
        self._loading: dict[str, asyncio.Future[ApiKeyRecord | None]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def ttl(self) -> float:
        """Seconds a found record is served from memory."""
        return self._ttl

    def __len__(self) -> int:
        return len(self._entries)

    async def get(self, public_id: str) -> ApiKeyRecord | None:
        """Return the record with this public id, or ``None`` when there is none.

        Raises:
            ServiceUnavailable: a cached record's deny-list check failed and the
                deny list fails closed.
        """
        now = self._clock()
        entry = self._entries.get(public_id)
        if entry is not None and entry[0] > now:
            self._entries.move_to_end(public_id)
            record = entry[1]
            if record is None or self._deny_list is None or record.revoked_at is not None:
                return record
            if await self._deny_list.is_revoked(deny_list_entry(record.id)):
                self.forget(public_id)
                return None
            return record
        pending = self._loading.get(public_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[ApiKeyRecord | None] = asyncio.get_running_loop().create_future()
        self._loading[public_id] = future
        try:
            record = await self._load(public_id)
        except BaseException as exc:
            future.set_exception(exc)
            # Retrieved here so a failure nobody else awaited is not reported as lost.
            future.exception()
            raise
        finally:
            self._loading.pop(public_id, None)
        future.set_result(record)
        self._remember(public_id, record, now)
        return record

    async def _load(self, public_id: str) -> ApiKeyRecord | None:
        async with self._database.sessions() as session:
            row = (
                await session.execute(
                    select(api_keys_table).where(api_keys_table.c.public_id == public_id)
                )
            ).one_or_none()
        return None if row is None else record_from_row(row)

    def _remember(self, public_id: str, record: ApiKeyRecord | None, now: float) -> None:
        life = self._ttl if record is not None else self._negative_ttl
        if life <= 0:
            return
        entries = self._entries
        entries[public_id] = (now + life, record)
        entries.move_to_end(public_id)
        while len(entries) > self._max:
            entries.popitem(last=False)

    def forget(self, public_id: str) -> None:
        """Drop the cached record of ``public_id`` (after a revocation on this instance)."""
        self._entries.pop(public_id, None)

    async def touch(self, record: ApiKeyRecord) -> None:
        """Record that ``record`` was just used, in the background, at most once per interval.

        Returns at once; the write never raises into the caller.
        """
        now = datetime.now(UTC)
        if not self._last_used.due(record, now):
            return
        task = asyncio.get_running_loop().create_task(self._write_last_used(record.id, now))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def rehash(self, record: ApiKeyRecord, new_hash: bytes) -> None:
        """Store ``new_hash`` for a key that verified under a previous server secret.

        For :attr:`~bastion.identity.ApiKeyVerification.rehash`: once every live key
        has been used after a rotation, the old secret can leave ``previous_secrets``.
        Written in the background, like :meth:`touch`; the cached copy is dropped so
        the next lookup reads the new hash.
        """
        self.forget(record.public_id)
        task = asyncio.get_running_loop().create_task(self._write_hash(record.id, new_hash))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _write_hash(self, key_id: str, new_hash: bytes) -> None:
        try:
            async with self._database.session() as session:
                await session.execute(
                    update(api_keys_table)
                    .where(api_keys_table.c.id == uuid.UUID(key_id))
                    .values(hash=new_hash)
                )
        except Exception as exc:  # noqa: BLE001 -- the old hash still verifies; next use retries
            logger.warning("api key rehash not written", error=type(exc).__name__)

    async def _write_last_used(self, key_id: str, now: datetime) -> None:
        column = api_keys_table.c.last_used_at
        try:
            async with self._database.session() as session:
                await session.execute(
                    update(api_keys_table)
                    .where(
                        api_keys_table.c.id == uuid.UUID(key_id),
                        # Another instance may have written it within the interval.
                        or_(column.is_(None), column < now - timedelta(seconds=self._interval)),
                    )
                    .values(last_used_at=now)
                )
        except Exception as exc:  # noqa: BLE001 -- a lost last-used time must never fail a request
            logger.warning("api key last_used_at not written", error=type(exc).__name__)

    async def aclose(self) -> None:
        """Wait for the pending ``last_used_at`` writes (bounded), then clear the cache."""
        tasks = list(self._tasks)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=5.0)
            for task in pending:
                task.cancel()
        self._entries.clear()


def _seconds(value: float | timedelta) -> float:
    return value.total_seconds() if isinstance(value, timedelta) else float(value)
