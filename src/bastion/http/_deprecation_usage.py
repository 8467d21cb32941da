"""Who still calls deprecated routes: per day, per route, per client, counted across instances.

Operators retiring an API version need to know whom to tell. The metric
``bastion_http_deprecated_requests_total`` says how much a deprecated route is
still used, but cannot say by whom (a client label would be unbounded);
:class:`DeprecationUsage` keeps that in shared state instead.

The request path only increments a counter in a dict: a batch of
``(day, method, route, client, tenant) -> (count, last seen)`` is written every
``flush_interval`` seconds by a background task, and once more at shutdown. On
Redis one flush is one pipeline: ``HINCRBY`` per entry into the day's hash,
``ZADD GT`` into the day's last-seen sorted set (the later instant wins whichever
instance writes last), and ``EXPIREAT`` so a day disappears ``retention_days``
after it ends. A Redis failure is logged and counted, and the batch is kept for
the next flush (bounded by ``max_pending``): a request never fails or waits for it.

A client is the principal's ``kind:subject`` (``api_key:<key id>``,
``user:<user id>``, ``service:<name>``) and its tenant, or ``anonymous``: never an
address or an e-mail.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

import orjson
import structlog

from bastion.errors import ServiceUnavailable
from bastion.observability.metrics import HTTP_DEPRECATED_REQUESTS as DEPRECATED_REQUESTS
from bastion.observability.metrics import (
    HTTP_DEPRECATION_USAGE_DROPPED as DEPRECATION_USAGE_DROPPED,
)
from bastion.observability.metrics import (
    HTTP_DEPRECATION_USAGE_FLUSH_FAILURES as DEPRECATION_USAGE_FLUSH_FAILURES,
)
from bastion.observability.metrics import HTTP_SUNSET_REQUESTS as SUNSET_REQUESTS

__all__ = [
    "ANONYMOUS",
    "DEPRECATED_REQUESTS",
    "DEPRECATION_USAGE_DROPPED",
    "DEPRECATION_USAGE_FLUSH_FAILURES",
    "SUNSET_REQUESTS",
    "DeprecatedCall",
    "DeprecationUsage",
]

logger = structlog.get_logger("bastion.http")

ANONYMOUS: Final = "anonymous"
DAY: Final = 86_400
DEFAULT_FLUSH_INTERVAL: Final = 5.0
DEFAULT_RETENTION_DAYS: Final = 30
DEFAULT_MAX_PENDING: Final = 10_000
_MAX_CLIENT: Final = 200
_NAMESPACE: Final = "http:deprecations:"

# (day number since the epoch, method, route template, client, tenant or "")
_Key = tuple[int, str, str, str, str]


@dataclass(frozen=True, slots=True)
class DeprecatedCall:
    """How often one client called one deprecated route over the report's days.

    Attributes:
        route: the route template (``/v1/documents/{document_id}``).
        method: the HTTP method.
        client: ``api_key:<id>``, ``user:<id>``, ``service:<name>`` or ``anonymous``.
        tenant: the tenant the calls acted for, or ``None``.
        count: calls in the period.
        last_seen: the latest call (UTC), to the second.
    """

    route: str
    method: str
    client: str
    tenant: str | None
    count: int
    last_seen: datetime

    def as_dict(self) -> dict[str, Any]:
        """The JSON form of the admin route."""
        return {
            "route": self.route,
            "method": self.method,
            "client": self.client,
            "tenant": self.tenant,
            "count": self.count,
            "last_seen": self.last_seen.isoformat().replace("+00:00", "Z"),
        }


class DeprecationUsage:
    """Counts deprecated-route calls per day, route and client; in memory or on Redis.

    Args:
        redis: a ``redis.asyncio`` client (``http.store_url``, else ``redis.url``);
            ``None`` keeps the counts in this process (``memory://``).
        key_prefix: prefix of every Redis key (``redis.key_prefix``).
        flush_interval: seconds between writes of the in-process batch.
        retention_days: days a day's counts are kept after it ends.
        max_pending: distinct entries the batch holds between flushes; calls that
            would add more are dropped (and counted in
            ``bastion_http_deprecation_usage_dropped_total``).
        clock: the wall clock, in seconds since the epoch (tests inject one).

    Example:
        >>> usage = DeprecationUsage(redis=client, key_prefix="svc:")
        >>> await usage.start()
        >>> usage.record("GET", "/v1/documents", client="api_key:k1", tenant="t1")
        >>> await usage.report(days=7)
    """

    def __init__(
        self,
        *,
        redis: Any = None,
        key_prefix: str = "bastion:",
        flush_interval: float = DEFAULT_FLUSH_INTERVAL,
        retention_days: int = DEFAULT_RETENTION_DAYS,
        max_pending: int = DEFAULT_MAX_PENDING,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if flush_interval <= 0:
            raise ValueError("flush_interval must be positive")
        if retention_days < 1:
            raise ValueError("retention_days must be at least 1")
        self._redis = redis
        self._prefix = key_prefix + _NAMESPACE
        self.flush_interval = flush_interval
        self.retention_days = retention_days
        self._max_pending = max_pending
        self._clock = clock
        # key -> [count, last seen]; lists, so an increment allocates nothing.
        self._pending: dict[_Key, list[float]] = {}
        # The memory backend's totals, same shape; days past retention are pruned.
        self._memory: dict[_Key, list[float]] = {}
        self._task: asyncio.Task[None] | None = None
        self._flushing = asyncio.Lock()

    @property
    def shared(self) -> bool:
        """Whether the counts live in Redis, shared by every instance."""
        return self._redis is not None

    def record(self, method: str, route: str, *, client: str, tenant: str | None) -> None:
        """Count one call; synchronous and in memory (written by the next flush)."""
        now = self._clock()
        key = (int(now // DAY), method, route, client[:_MAX_CLIENT], tenant or "")
        entry = self._pending.get(key)
        if entry is not None:
            entry[0] += 1
            entry[1] = now
            return
        if len(self._pending) >= self._max_pending:
            DEPRECATION_USAGE_DROPPED.inc()
            return
        self._pending[key] = [1, now]

    @property
    def pending(self) -> int:
        """Calls counted in this process and not yet flushed."""
        return int(sum(entry[0] for entry in self._pending.values()))

    async def flush(self) -> bool:
        """Write the batch; return whether it was written (``False``: kept for the next).

        Never raises for a store failure: it is logged and counted.
        """
        async with self._flushing:
            batch, self._pending = self._pending, {}
            if not batch:
                return True
            if self._redis is None:
                _merge(self._memory, batch.items())
                self._prune(self._clock())
                return True
            try:
                await self._write(batch)
            except Exception as exc:  # noqa: BLE001 -- any store failure: keep the batch, log
                DEPRECATION_USAGE_FLUSH_FAILURES.inc()
                logger.warning(
                    "deprecation usage not flushed",
                    error=type(exc).__name__,
                    entries=len(batch),
                )
                self._restore(batch)
                return False
            return True

    def _restore(self, batch: dict[_Key, list[float]]) -> None:
        """Put a failed batch back under what was recorded since, within ``max_pending``."""
        merged = batch
        for key, entry in self._pending.items():
            if key in merged:
                merged[key][0] += entry[0]
                merged[key][1] = max(merged[key][1], entry[1])
            elif len(merged) < self._max_pending:
                merged[key] = entry
            else:
                DEPRECATION_USAGE_DROPPED.inc(entry[0])
        self._pending = merged

    async def _write(self, batch: dict[_Key, list[float]]) -> None:
        pipe = self._redis.pipeline(transaction=False)
        expiries: dict[int, int] = {}
        for (day, method, route, client, tenant), (count, seen) in batch.items():
            field = _field(method, route, client, tenant)
            counts, seen_key = self._keys(day)
            pipe.hincrby(counts, field, int(count))
            pipe.zadd(seen_key, {field: int(seen)}, gt=True)
            expiries[day] = (day + 1 + self.retention_days) * DAY
        for day, at in expiries.items():
            for key in self._keys(day):
                pipe.expireat(key, at)
        await pipe.execute()

    def _keys(self, day: int) -> tuple[str, str]:
        stamp = time.strftime("%Y%m%d", time.gmtime(day * DAY))
        return f"{self._prefix}{stamp}", f"{self._prefix}{stamp}:seen"

    def _prune(self, now: float) -> None:
        oldest = int(now // DAY) - self.retention_days
        for key in [key for key in self._memory if key[0] < oldest]:
            del self._memory[key]

    async def report(self, days: int = 7) -> list[DeprecatedCall]:
        """Calls to deprecated routes over the last ``days`` days (today included).

        This process's batch is flushed first. Sorted by count, largest first.

        Raises:
            ServiceUnavailable: the shared store cannot be read (503).
        """
        if days < 1:
            raise ValueError("days must be at least 1")
        await self.flush()
        today = int(self._clock() // DAY)
        first = today - days + 1
        totals: dict[tuple[str, str, str, str], list[float]] = {}
        if self._redis is None:
            rows: Iterable[tuple[tuple[str, str, str, str], int, float]] = (
                (key[1:], int(count), seen)
                for key, (count, seen) in self._memory.items()
                if first <= key[0] <= today
            )
        else:
            rows = await self._read(range(first, today + 1))
        for key, count, seen in rows:
            entry = totals.setdefault(key, [0, 0.0])
            entry[0] += count
            entry[1] = max(entry[1], seen)
        calls = [
            DeprecatedCall(
                route=route,
                method=method,
                client=client,
                tenant=tenant or None,
                count=int(count),
                last_seen=datetime.fromtimestamp(int(seen), UTC),
            )
            for (method, route, client, tenant), (count, seen) in totals.items()
        ]
        calls.sort(key=lambda call: (-call.count, call.route, call.method, call.client))
        return calls

    async def _read(self, days: range) -> list[tuple[tuple[str, str, str, str], int, float]]:
        pipe = self._redis.pipeline(transaction=False)
        for day in days:
            counts, seen = self._keys(day)
            pipe.hgetall(counts)
            pipe.zrange(seen, 0, -1, withscores=True)
        try:
            replies = await pipe.execute()
        except Exception as exc:
            logger.warning("deprecation usage unreadable", error=type(exc).__name__)
            raise ServiceUnavailable(
                "The deprecation usage cannot be read from the shared store now.",
                headers={"Retry-After": "5"},
            ) from exc
        rows: list[tuple[tuple[str, str, str, str], int, float]] = []
        for counts, seen in zip(replies[::2], replies[1::2], strict=True):
            last = {_text(member): float(score) for member, score in seen}
            for raw_field, raw_count in counts.items():
                field = _text(raw_field)
                key = _unfield(field)
                if key is not None:
                    rows.append((key, int(raw_count), last.get(field, 0.0)))
        return rows

    async def start(self) -> None:
        """Start flushing every ``flush_interval`` seconds."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="bastion deprecation usage")

    async def stop(self) -> None:
        """Stop the flushing task and write what is left."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_interval)
            # Shielded: stop() cancelling this task mid-write must not lose the batch
            # already taken out of ``_pending``; its own flush waits for this one.
            await asyncio.shield(self.flush())


def _merge(into: dict[_Key, list[float]], entries: Iterable[tuple[_Key, list[float]]]) -> None:
    for key, (count, seen) in entries:
        entry = into.get(key)
        if entry is None:
            into[key] = [count, seen]
        else:
            entry[0] += count
            entry[1] = max(entry[1], seen)


def _field(method: str, route: str, client: str, tenant: str) -> bytes:
    # JSON, not a separator: templates, client ids and tenants may hold any character.
    return orjson.dumps([method, route, client, tenant])


def _unfield(field: str) -> tuple[str, str, str, str] | None:
    try:
        parts = orjson.loads(field)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(parts, list) or len(parts) != 4 or not all(isinstance(p, str) for p in parts):  # noqa: PLR2004 -- the field's four parts
        return None
    return parts[0], parts[1], parts[2], parts[3]


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
