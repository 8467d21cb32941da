"""The permission cache: effective permissions and role definitions, shared across instances.

Two layers sit in front of the loaders (the database):

* a local dict per process, which answers a hit without leaving the process;
* Redis (optional), which shares loaded values between instances and carries
  the invalidations.

Invalidation is by version. Three counters live in Redis: a global one, one
per tenant and one per (user, tenant). Every cached value is tagged with the
versions that were current *before* its loader ran; a change (a role assigned,
a role's permissions edited) increments the narrowest counter that covers it
and publishes the change on a channel. A value is served only while its tags
equal the current counters, so a value loaded before a change is never served
after it, whichever instance loaded it.

The guarantee, by mode (``verify_every_request``):

* ``True`` (the default): every lookup reads the counters (and the shared
  value) in one ``MGET``, one round trip, even on a local hit. An instance
  sees a change made on another instance on its very next request: a change
  whose ``INCR`` has returned is seen by every request whose first lookup
  starts after it. Within one request the first answer is kept (one round trip
  per request, one consistent snapshot), except that an invalidation made by
  the request itself is seen by its later checks.
* ``False``: a local hit makes no round trip. Published changes drop local
  values as they arrive (a few ms); a value is in any case re-checked against
  the counters once it is ``local_ttl`` seconds old, which bounds staleness
  when a message is lost (the subscriber's connection dropped).

Keys (``{p}`` is ``redis.key_prefix``; ids are length-prefixed so that ids
holding ``:`` cannot collide)::

    {p}authz:v:g                          global version
    {p}authz:v:t:<len>:<tenant>           tenant version
    {p}authz:v:u:<len>:<tenant>:<user>    user-in-tenant version
    {p}authz:p:<len>:<tenant>:<user>      effective permissions, TTL permission_ttl
    {p}authz:r:<len>:<tenant>             role definitions, TTL role_ttl
    {p}authz:invalidate                   the pub/sub channel

When Redis fails or is slower than ``timeout``, lookups go to the loader
(nothing is cached: a change could not be seen), Redis is left alone for
``retry_after`` seconds, and the outage is logged once through
:class:`~bastion.resilience.Degradation`. Concurrent misses of one key in
one process share one load (the stampede guard).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Final, Self

import orjson
import structlog

from bastion.context import RequestContext, current_context
from bastion.observability.metrics import CACHE_REQUESTS
from bastion.resilience import Degradation
from bastion.settings import AuthorizationSettings

__all__ = [
    "PermissionCache",
    "PermissionsLoader",
    "RolesLoader",
]

logger = structlog.get_logger("bastion.identity")

PermissionsLoader = Callable[[str, str], Awaitable[Iterable[str]]]
"""``(user_id, tenant_id) -> permissions``: a user's effective permissions in a tenant."""
RolesLoader = Callable[[str | None], Awaitable[Mapping[str, Iterable[str]]]]
"""``tenant_id -> {role: permissions}``: role definitions of a tenant (``None``: global)."""

DEFAULT_TIMEOUT: Final = 0.05
DEFAULT_RETRY_AFTER: Final = 1.0
DEFAULT_LOCAL_TTL: Final = 1.0
DEFAULT_HIT_RATE_WINDOW: Final = 300.0
# A window with fewer lookups says nothing about the hit rate (a quiet instance
# after start-up misses on almost every lookup).
MIN_WINDOW_LOOKUPS: Final = 100
_CHANNEL: Final = "authz:invalidate"
# Errors that mean "Redis is not usable now": redis-py's own, a timeout, a socket error.
_REDIS_DOWN: tuple[type[BaseException], ...] = (TimeoutError, OSError, ConnectionError)
try:  # pragma: no branch -- redis is installed wherever Redis is configured
    from redis.exceptions import RedisError

    _REDIS_DOWN = (*_REDIS_DOWN, RedisError)
except ImportError:  # pragma: no cover -- memory-only installs
    pass


# The request whose lookups are memoized, and their answers. Keyed by the request's
# context object, so a task serving several requests (a test client) never carries
# one request's answers into the next.
_request_memo: Final[contextvars.ContextVar[tuple[RequestContext, dict[Any, Any]] | None]] = (
    contextvars.ContextVar("bastion_permission_memo", default=None)
)


def _part(value: str | None) -> str:
    text = value or ""
    return f"{len(text)}:{text}"


@dataclass(slots=True)
class _Entry:
    versions: tuple[int, ...]
    value: Any
    expires: float
    checked: float


class _HitRate:
    """Hits and misses over a window; warns once per window when the rate is low."""

    __slots__ = ("cache", "hit", "hits", "miss", "misses", "threshold", "window", "window_end")

    def __init__(self, cache: str, threshold: float, window: float, now: float) -> None:
        self.cache = cache
        self.threshold = threshold
        self.window = window
        self.window_end = now + window
        self.hits = 0
        self.misses = 0
        # Bound children: .labels() costs ~1 µs per call on the hot path.
        self.hit: Any = CACHE_REQUESTS.labels(cache, "hit")
        self.miss: Any = CACHE_REQUESTS.labels(cache, "miss")

    def record(self, hit: bool, now: float) -> None:
        if now >= self.window_end:
            self._close(now)
        if hit:
            self.hits += 1
            self.hit.inc()
        else:
            self.misses += 1
            self.miss.inc()

    def _close(self, now: float) -> None:
        total = self.hits + self.misses
        if total >= MIN_WINDOW_LOOKUPS and self.hits / total < self.threshold:
            logger.warning(
                "cache hit rate low",
                cache=self.cache,
                hit_rate=round(self.hits / total, 3),
                threshold=self.threshold,
                lookups=total,
                window_seconds=self.window,
            )
        self.hits = self.misses = 0
        self.window_end = now + self.window


class _MgetBatcher:
    """Sends the MGETs of concurrent lookups together: one round trip in flight at a time.

    Alone, a lookup sends its MGET at once. While one is in flight, later lookups
    queue, and the whole queue goes as one pipeline when it returns. Every queued
    command is sent after its lookup began, so a change whose ``INCR`` returned
    before a lookup began is still seen by it (joining a round trip already in
    flight would break that). Without this, 50 concurrent checks opened 50 pooled
    connections, and on a loaded host some connects outlasted the 50 ms timeout.
    """

    __slots__ = ("_busy", "_queue", "_redis", "_tasks", "_timeout")

    def __init__(self, redis: Any, timeout: float) -> None:
        self._redis = redis
        self._timeout = timeout
        self._busy = False
        self._queue: list[tuple[list[str], asyncio.Future[list[Any]]]] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def mget(self, keys: list[str]) -> list[Any]:
        if not self._busy:
            self._busy = True
            try:
                result: list[Any] = await self._redis.mget(keys)
            finally:
                self._busy = False
                if self._queue:
                    self._flush()
            return result
        future: asyncio.Future[list[Any]] = asyncio.get_running_loop().create_future()
        self._queue.append((keys, future))
        return await future

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        # Waiters are not left hanging: each has its own timeout.
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def _flush(self) -> None:
        batch, self._queue = self._queue, []
        self._busy = True
        task = asyncio.create_task(self._send(batch))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send(self, batch: list[tuple[list[str], asyncio.Future[list[Any]]]]) -> None:
        try:
            async with asyncio.timeout(self._timeout):
                pipe = self._redis.pipeline(transaction=False)
                for keys, _ in batch:
                    pipe.mget(keys)
                results = await pipe.execute()
        except Exception as exc:  # noqa: BLE001 -- handed to every waiter, which classifies it
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
        else:
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
        finally:
            self._busy = False
            if self._queue:
                self._flush()


class _Layer:
    """One kind of cached value: its TTL, loader, keys and local copies."""

    __slots__ = ("decode", "encode", "loader", "local", "name", "rate", "ttl")

    def __init__(
        self,
        name: str,
        *,
        ttl: float,
        loader: Callable[..., Awaitable[Any]],
        encode: Callable[[Any], Any],
        decode: Callable[[Any], Any],
        rate: _HitRate,
    ) -> None:
        self.name = name
        self.ttl = ttl
        self.loader = loader
        self.encode = encode
        self.decode = decode
        self.rate = rate
        self.local: dict[tuple[str | None, ...], _Entry] = {}


def _encode_permissions(value: frozenset[str]) -> list[str]:
    return sorted(value)


def _decode_permissions(raw: Any) -> frozenset[str]:
    return frozenset(raw)


def _encode_roles(value: Mapping[str, frozenset[str]]) -> dict[str, list[str]]:
    return {role: sorted(perms) for role, perms in value.items()}


def _decode_roles(raw: Any) -> dict[str, frozenset[str]]:
    return {role: frozenset(perms) for role, perms in raw.items()}


async def _no_roles(tenant_id: str | None) -> Mapping[str, Iterable[str]]:
    return {}


class PermissionCache:
    """Effective permissions per (user, tenant) and role definitions per tenant, cached.

    Example:
        >>> cache = PermissionCache(load_permissions, redis=client, key_prefix="bastion:")
        >>> async with cache:
        ...     perms = await cache.permissions("user-1", "tenant-1")
        ...     await cache.invalidate_user("user-1", "tenant-1")  # after a role change

    Args:
        permissions_loader: ``(user_id, tenant_id) -> permissions``, from the database.
        roles_loader: ``tenant_id -> {role: permissions}``; without it :meth:`roles`
            answers ``{}``.
        redis: a ``redis.asyncio.Redis`` client; ``None`` keeps everything in this
            process (one instance only: no other instance sees invalidations).
        key_prefix: prefix of every key and of the channel (``redis.key_prefix``).
        permission_ttl: seconds effective permissions stay cached.
        role_ttl: seconds role definitions stay cached.
        timeout: seconds one Redis round trip may take before the loader is used.
        retry_after: seconds Redis is left alone after a failure.
        verify_every_request: check versions on every lookup (one round trip; a
            change is seen by the next lookup on every instance) rather than rely
            on pub/sub with ``local_ttl`` as the bound.
        local_ttl: with ``verify_every_request`` off, seconds a local value is
            trusted without a round trip.
        hit_rate_warning: a window whose hit rate is under this logs a warning.
        hit_rate_window: seconds per hit-rate window.
        clock: a monotonic clock (tests pass a fake one).
    """

    def __init__(
        self,
        permissions_loader: PermissionsLoader,
        roles_loader: RolesLoader | None = None,
        *,
        redis: Any = None,
        key_prefix: str = "bastion:",
        permission_ttl: float = 300.0,
        role_ttl: float = 600.0,
        timeout: float = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_RETRY_AFTER,
        verify_every_request: bool = True,
        local_ttl: float = DEFAULT_LOCAL_TTL,
        hit_rate_warning: float = 0.7,
        hit_rate_window: float = DEFAULT_HIT_RATE_WINDOW,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if permission_ttl <= 0 or role_ttl <= 0:
            raise ValueError("cache TTLs must be positive")
        self._redis = redis
        self._batcher = _MgetBatcher(redis, timeout) if redis is not None else None
        self._prefix = key_prefix + "authz:"
        self._channel = key_prefix + _CHANNEL
        self._timeout = timeout
        self._retry_after = retry_after
        self._verify = verify_every_request
        self._local_ttl = local_ttl
        self._clock = clock
        now = clock()
        self._permissions = _Layer(
            "permissions",
            ttl=permission_ttl,
            loader=permissions_loader,
            encode=_encode_permissions,
            decode=_decode_permissions,
            rate=_HitRate("permissions", hit_rate_warning, hit_rate_window, now),
        )
        self._roles = _Layer(
            "roles",
            ttl=role_ttl,
            loader=roles_loader or _no_roles,
            encode=_encode_roles,
            decode=_decode_roles,
            rate=_HitRate("roles", hit_rate_warning, hit_rate_window, now),
        )
        # A version counter must outlive every value tagged with it: were it to
        # expire first, it would read 0 again and match values tagged before its
        # first increment.
        self._version_ttl = int(2 * max(permission_ttl, role_ttl)) + 60
        self._skip_until = 0.0
        self._degradation = Degradation("redis", feature="permission cache")
        # Bumped by every invalidation this process learns of; a load that started
        # before one does not store its (possibly stale) result locally.
        self._epoch = 0
        self._inflight: dict[tuple[Any, ...], asyncio.Task[Any]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._subscribed = asyncio.Event()

    @classmethod
    def from_settings(
        cls,
        settings: AuthorizationSettings,
        permissions_loader: PermissionsLoader,
        roles_loader: RolesLoader | None = None,
        *,
        redis: Any = None,
        key_prefix: str = "bastion:",
    ) -> Self:
        """Build a cache from the ``identity.authorization`` settings section.

        Args:
            settings: the section.
            permissions_loader: see the class.
            roles_loader: see the class.
            redis: the client of ``identity.store_url`` (``None`` for ``memory://``).
            key_prefix: ``redis.key_prefix``.
        """
        return cls(
            permissions_loader,
            roles_loader,
            redis=redis,
            key_prefix=key_prefix,
            permission_ttl=settings.permission_ttl,
            role_ttl=settings.role_ttl,
            timeout=settings.timeout,
            verify_every_request=settings.verify_every_request,
            local_ttl=settings.local_ttl,
            hit_rate_warning=settings.hit_rate_warning,
            hit_rate_window=settings.hit_rate_window,
        )

    # -- lifecycle -------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def start(self) -> None:
        """Subscribe to invalidations from other instances (no-op without Redis).

        Returns once subscribed, or after ``1`` second when Redis does not answer
        (the listener keeps trying; with ``verify_every_request`` nothing depends
        on it but memory).
        """
        if self._redis is None or self._listener is not None:
            return
        # Open a pooled connection now: the first lookup would otherwise pay the
        # connect under the request-path timeout, and on a busy host fall back.
        with contextlib.suppress(*_REDIS_DOWN):
            async with asyncio.timeout(1.0):
                await self._redis.ping()
        self._listener = asyncio.create_task(self._listen(), name="bastion-permission-cache")
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(1.0):
                await self._subscribed.wait()

    async def aclose(self) -> None:
        """Stop listening and drop local values; the Redis client stays open (the caller's)."""
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None
        if self._batcher is not None:
            await self._batcher.aclose()
        self._degradation.forget()
        self.clear_local()

    async def ping(self) -> bool:
        """Return whether the shared layer answers (always ``True`` without Redis)."""
        if self._redis is None:
            return True
        try:
            async with asyncio.timeout(self._timeout):
                await self._redis.ping()
        except _REDIS_DOWN:
            return False
        return True

    # -- lookups ---------------------------------------------------------------------

    async def permissions(self, user_id: str, tenant_id: str) -> frozenset[str]:
        """Return the effective permissions of ``user_id`` in ``tenant_id``.

        Raises:
            Exception: whatever the loader raises on a miss (nothing is cached then).
        """
        value: frozenset[str] = await self._lookup(self._permissions, (tenant_id, user_id))
        return value

    async def roles(self, tenant_id: str | None = None) -> Mapping[str, frozenset[str]]:
        """Return the role definitions of ``tenant_id`` (``None``: the global ones)."""
        value: Mapping[str, frozenset[str]] = await self._lookup(self._roles, (tenant_id,))
        return value

    async def _lookup(self, layer: _Layer, ident: tuple[str | None, ...]) -> Any:
        now = self._clock()
        entry = layer.local.get(ident)
        if entry is not None and entry.expires <= now:
            del layer.local[ident]
            entry = None
        redis = self._redis
        if redis is None:
            if entry is not None:
                layer.rate.record(True, now)
                return entry.value
            layer.rate.record(False, now)
            return await self._load(layer, ident, (), share=False)
        if entry is not None and not self._verify and now - entry.checked < self._local_ttl:
            layer.rate.record(True, now)
            return entry.value
        # One answer per request: a request that checks several permissions (a
        # dependency, then a decorated service call) pays one round trip, and
        # sees one consistent snapshot.
        context = current_context()
        memo_key = (self, layer.name, ident)
        memo = _request_memo.get()
        if context is not None and memo is not None and memo[0] is context:
            if memo_key in memo[1]:
                layer.rate.record(True, now)
                return memo[1][memo_key]
        else:
            memo = None
        if now < self._skip_until:
            layer.rate.record(False, now)
            value = await self._load(layer, ident, None, share=False)
        else:
            value = await self._lookup_shared(layer, ident, entry, now)
        if context is not None:
            if memo is None:
                memo = (context, {})
                _request_memo.set(memo)
            memo[1][memo_key] = value
        return value

    async def _lookup_shared(
        self,
        layer: _Layer,
        ident: tuple[str | None, ...],
        entry: _Entry | None,
        now: float,
    ) -> Any:
        batcher: Any = self._batcher
        keys = self._version_keys(ident)
        keys.append(self._entry_key(layer, ident))
        try:
            # One round trip for the counters and the shared value, on a hit as on a
            # miss: the counters are what makes another instance's change visible.
            async with asyncio.timeout(self._timeout):
                raw = await batcher.mget(keys)
        except _REDIS_DOWN as exc:
            self._down(exc, now)
            layer.rate.record(False, now)
            return await self._load(layer, ident, None, share=False)
        self._degradation.recovered()
        versions = tuple(int(v) if v else 0 for v in raw[:-1])
        if entry is not None and entry.versions == versions:
            entry.checked = now
            layer.rate.record(True, now)
            return entry.value
        shared = raw[-1]
        if shared is not None:
            try:
                stored = orjson.loads(shared)
                if tuple(stored["v"]) == versions:
                    value = layer.decode(stored["d"])
                    layer.local[ident] = _Entry(versions, value, now + layer.ttl, now)
                    layer.rate.record(True, now)
                    return value
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                # A value this version cannot read (written by another release):
                # reload and overwrite it.
                pass
        layer.rate.record(False, now)
        return await self._load(layer, ident, versions, share=True)

    async def _load(
        self,
        layer: _Layer,
        ident: tuple[str | None, ...],
        versions: tuple[int, ...] | None,
        *,
        share: bool,
    ) -> Any:
        """Run the loader once per key and versions in this process; waiters share its result."""
        # The versions and the epoch are part of the key: a lookup that read newer
        # counters, or began after an invalidation this process knows of, must not
        # take a value whose load began before the change.
        flight_key = (layer.name, ident, versions, self._epoch)
        task = self._inflight.get(flight_key)
        if task is None:
            task = asyncio.ensure_future(self._load_once(layer, ident, versions, share=share))
            self._inflight[flight_key] = task
            task.add_done_callback(lambda _: self._inflight.pop(flight_key, None))
        # Shielded: a waiter's cancellation (its client went away) must not cancel
        # the load the other waiters share.
        return await asyncio.shield(task)

    async def _load_once(
        self,
        layer: _Layer,
        ident: tuple[str | None, ...],
        versions: tuple[int, ...] | None,
        *,
        share: bool,
    ) -> Any:
        epoch = self._epoch
        # Local idents are (tenant, user) so a tenant's values can be found; the
        # loader takes (user, tenant).
        if layer is self._permissions:
            value: Any = frozenset(await layer.loader(ident[1], ident[0]))
        else:
            value = _freeze_roles(await layer.loader(ident[0]))
        if versions is None:
            # Redis down: nothing is cached, since no change could be seen.
            return value
        now = self._clock()
        if epoch == self._epoch:
            layer.local[ident] = _Entry(versions, value, now + layer.ttl, now)
        if share and self._redis is not None:
            body = orjson.dumps({"v": versions, "d": layer.encode(value)})
            try:
                async with asyncio.timeout(self._timeout):
                    await self._redis.set(
                        self._entry_key(layer, ident), body, ex=max(1, int(layer.ttl))
                    )
            except _REDIS_DOWN as exc:
                self._down(exc, now)
        return value

    # -- invalidation ----------------------------------------------------------------

    async def invalidate_user(self, user_id: str, tenant_id: str) -> bool:
        """Drop the permissions of one user in one tenant, on every instance.

        Call it after the user's roles in the tenant change (assigned, removed).

        Returns:
            Whether the change reached Redis (always ``True`` without Redis). When
            it did not, other instances may serve the old permissions until
            ``permission_ttl`` runs out; a warning is logged.
        """
        return await self._invalidate("u", tenant_id, user_id)

    async def invalidate_tenant(self, tenant_id: str) -> bool:
        """Drop a tenant's role definitions and every member's permissions, on every instance.

        Call it after a role of the tenant is created, edited or deleted.
        """
        return await self._invalidate("t", tenant_id, None)

    async def invalidate_all(self) -> bool:
        """Drop everything, on every instance (a global role definition changed)."""
        return await self._invalidate("g", None, None)

    def clear_local(self) -> None:
        """Drop this process's local values (Redis keeps its own)."""
        self._epoch += 1
        self._permissions.local.clear()
        self._roles.local.clear()

    async def _invalidate(self, scope: str, tenant_id: str | None, user_id: str | None) -> bool:
        # A request that changes roles and then checks again sees its own change.
        _request_memo.set(None)
        self._drop_local(scope, tenant_id, user_id)
        if self._redis is None:
            return True
        if scope == "g":
            key = self._prefix + "v:g"
        elif scope == "t":
            key = self._prefix + "v:t:" + _part(tenant_id)
        else:
            key = self._prefix + "v:u:" + _part(tenant_id) + ":" + _part(user_id)
        message = orjson.dumps([scope, tenant_id, user_id])
        try:
            # Not under the request-path timeout: a change is rare and must land.
            pipe = self._redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self._version_ttl)
            pipe.publish(self._channel, message)
            await pipe.execute()
        except _REDIS_DOWN as exc:
            logger.warning(
                "permission change not shared: other instances keep cached permissions "
                "until their TTL",
                scope=scope,
                error=type(exc).__name__,
            )
            return False
        return True

    def _drop_local(self, scope: str, tenant_id: str | None, user_id: str | None) -> None:
        self._epoch += 1
        if scope == "g":
            self.clear_local()
        elif scope == "t":
            for layer in (self._permissions, self._roles):
                for ident in [i for i in layer.local if i[0] == tenant_id]:
                    del layer.local[ident]
        else:
            self._permissions.local.pop((tenant_id, user_id), None)

    async def _listen(self) -> None:
        """Drop local values as other instances publish changes; resubscribe after a failure."""
        redis: Any = self._redis
        while True:
            pubsub = redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                # Messages published while unsubscribed are lost: start clean.
                self.clear_local()
                self._subscribed.set()
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    if message is None:
                        continue
                    try:
                        scope, tenant_id, user_id = orjson.loads(message["data"])
                    except (orjson.JSONDecodeError, ValueError, TypeError):
                        continue
                    self._drop_local(str(scope), tenant_id, user_id)
            except _REDIS_DOWN as exc:
                self._subscribed.clear()
                self._down(exc, self._clock())
                await asyncio.sleep(self._retry_after)
            finally:
                with contextlib.suppress(*_REDIS_DOWN):
                    await pubsub.aclose()

    # -- helpers ---------------------------------------------------------------------

    def _version_keys(self, ident: tuple[str | None, ...]) -> list[str]:
        prefix = self._prefix
        keys = [prefix + "v:g"]
        tenant = ident[0]
        if tenant is not None:
            keys.append(prefix + "v:t:" + _part(tenant))
            if len(ident) > 1:
                keys.append(prefix + "v:u:" + _part(tenant) + ":" + _part(ident[1]))
        return keys

    def _entry_key(self, layer: _Layer, ident: tuple[str | None, ...]) -> str:
        if layer is self._permissions:
            return self._prefix + "p:" + _part(ident[0]) + ":" + _part(ident[1])
        return self._prefix + "r:" + _part(ident[0])

    def _down(self, exc: BaseException, now: float) -> None:
        self._skip_until = now + self._retry_after
        # Values cached before the outage may miss changes made during it.
        self.clear_local()
        self._degradation.failed(exc)


def _freeze_roles(raw: Mapping[str, Iterable[str]]) -> dict[str, frozenset[str]]:
    return {str(role): frozenset(perms) for role, perms in raw.items()}
