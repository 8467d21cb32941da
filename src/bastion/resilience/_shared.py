"""Circuit state shared across instances through Redis: published transitions, periodic re-reads.

One hash, ``{prefix}circuits``, holds each circuit's latest transition (field:
the circuit's name; value: compact JSON ``{"c": name, "s": state, "t": since,
"u": open_until, "i": instance}``, times in epoch seconds). A local transition to
open or closed is written and published on the channel ``{prefix}circuits`` in
one round trip (``_shared.lua``, which keeps the latest ``since``), from a
background task: the call that made the transition never waits for Redis.

Every instance subscribes to the channel and applies the other instances'
transitions; because a message can be missed (a reconnect, an instance that
starts after the transition), each instance also re-reads the whole hash every
``state_refresh_interval`` (one HGETALL for all circuits) and applies what is
later than what it knows. No protected call ever makes a Redis call.

Every Redis call has ``state_timeout`` and no retry. While Redis is out the
breakers run on local state; the outage is logged once (``Degradation``), and
transitions that could not be published are published once Redis answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import os
import random
import secrets
import socket
from collections.abc import Mapping
from typing import Any, Final

import orjson
import structlog

from bastion.resilience._breaker import CircuitBreaker, CircuitSnapshot, CircuitState
from bastion.resilience._degraded import Degradation

__all__ = ["SharedCircuits"]

logger = structlog.get_logger("bastion.resilience")

_SCRIPT: Final = (
    importlib.resources.files("bastion.resilience").joinpath("_shared.lua").read_text("utf-8")
)
# Subscribing may open a new connection (TCP, maybe TLS, AUTH): it is given at
# least this long, as it is never on a request's path.
_SUBSCRIBE_TIMEOUT: Final = 1.0
# How long one read of the subscription waits for a message before looping.
_LISTEN_TIMEOUT: Final = 1.0
_BACKOFF_INITIAL: Final = 0.1
_BACKOFF_MAX: Final = 5.0


def _raise_if_cancelled() -> None:
    """Re-raise a cancellation that the Redis client swallowed.

    redis-py 8 can lose a ``cancel()`` that lands while it connects (the call
    returns normally; the task stays "cancelling"): without this check ``stop()``
    would wait for a subscriber that never ends.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def instance_id() -> str:
    """Return an id for this process's circuits: host, pid and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class SharedCircuits:
    """Publishes local transitions and applies remote ones for a set of breakers.

    Args:
        redis: a ``redis.asyncio.Redis`` client (bytes or decoded responses).
        breakers: the breakers by circuit name; read live, so circuits registered
            later take part too.
        key_prefix: prefix of the hash and the channel.
        refresh_interval: seconds between two re-reads of the hash.
        timeout: timeout of each Redis call.
        instance: this instance's id (a new one by default).
    """

    def __init__(
        self,
        redis: Any,
        breakers: Mapping[str, CircuitBreaker],
        *,
        key_prefix: str,
        refresh_interval: float,
        timeout: float,
        instance: str | None = None,
    ) -> None:
        self._redis = redis
        self._breakers = breakers
        self.key = f"{key_prefix}circuits"
        self.channel = self.key
        self._interval = refresh_interval
        self._timeout = timeout
        self.instance = instance or instance_id()
        self._script = redis.register_script(_SCRIPT)
        self._degradation = Degradation("redis", feature="circuit state")
        self._unpublished: dict[str, CircuitSnapshot] = {}
        self._publisher: asyncio.Task[None] | None = None
        self._tasks: list[asyncio.Task[None]] = []

    # -- publishing ----------------------------------------------------------------

    def publish(self, snapshot: CircuitSnapshot) -> None:
        """Publish a local transition (breakers announce opening and closing) in the background."""
        self._keep_unpublished(snapshot)
        # Not started, or stopped: a task now could outlive its loop. The first
        # refresh after start() publishes it.
        if self._tasks:
            self._start_publisher()

    def _start_publisher(self) -> None:
        if self._publisher is None or self._publisher.done():
            self._publisher = asyncio.get_running_loop().create_task(
                self._drain(), name="publish circuit transitions"
            )

    async def _drain(self) -> None:
        # One publisher, one connection at a time: a task per transition took a
        # pool connection each, and a hundred circuits opening together emptied
        # redis-py's pool for everything else sharing the client.
        while self._unpublished:
            name = next(iter(self._unpublished))
            if not await self._publish(self._unpublished.pop(name)):
                # Kept again; the next refresh that reaches Redis restarts the drain.
                return

    async def _publish(self, snapshot: CircuitSnapshot) -> bool:
        payload = orjson.dumps(
            {
                "c": snapshot.name,
                "s": snapshot.state.value,
                "t": snapshot.since,
                "u": snapshot.next_probe,
                "i": self.instance,
            }
        )
        try:
            async with asyncio.timeout(self._timeout):
                await self._script(
                    keys=[self.key],
                    args=[snapshot.name, payload, repr(snapshot.since), self.channel],
                )
        except Exception as exc:  # noqa: BLE001 -- any failure: keep it, publish when Redis is back
            _raise_if_cancelled()
            self._keep_unpublished(snapshot)
            self._degradation.failed(exc)
            await self._drop_idle_connections()
            return False
        _raise_if_cancelled()
        self._degradation.recovered()
        return True

    def _keep_unpublished(self, snapshot: CircuitSnapshot) -> None:
        kept = self._unpublished.get(snapshot.name)
        if kept is None or kept.since < snapshot.since:
            self._unpublished[snapshot.name] = snapshot

    # -- reading -------------------------------------------------------------------

    async def refresh(self) -> int:
        """Read the whole shared state once (one HGETALL) and apply what is newer.

        Returns:
            How many breakers changed; 0 also when Redis did not answer in time.
        """
        try:
            async with asyncio.timeout(self._timeout):
                entries = await self._redis.hgetall(self.key)
        except Exception as exc:  # noqa: BLE001 -- any failure: the breakers stay on local state
            _raise_if_cancelled()
            self._degradation.failed(exc)
            await self._drop_idle_connections()
            return 0
        _raise_if_cancelled()
        self._degradation.recovered()
        applied = sum(self._apply(raw) for raw in entries.values())
        if self._unpublished and self._tasks:
            self._start_publisher()
        return applied

    async def _drop_idle_connections(self) -> None:
        """Close the pool's idle connections after a failed call.

        They were opened before the failure and are most likely dead too (an
        outage resets them all); left in the pool, each failed once when next
        used after Redis came back, within ``state_timeout`` and so as an
        error, and one outage looked like several. Connections in use by other
        callers of a shared client are left alone.
        """
        pool = getattr(self._redis, "connection_pool", None)
        if pool is None:
            return
        with contextlib.suppress(Exception):
            await pool.disconnect(inuse_connections=False)
        _raise_if_cancelled()

    def _apply(self, raw: bytes | str) -> bool:
        try:
            record = orjson.loads(raw)
            name, instance = record["c"], record["i"]
            state = CircuitState(record["s"])
            since = float(record["t"])
            until = record["u"]
            open_until = float(until) if until is not None else None
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
            logger.debug("ignored a malformed shared circuit record", key=self.key)
            return False
        if instance == self.instance:
            return False
        breaker = self._breakers.get(name)
        if breaker is None:
            return False
        return breaker.apply_remote(state, since, open_until)

    # -- background tasks ----------------------------------------------------------

    async def start(self) -> None:
        """Start the subscriber and the refresh loop; read the shared state once before returning.

        Transitions made before (or since a :meth:`stop`) are published then.
        """
        if self._tasks:
            return
        loop = asyncio.get_running_loop()
        # One per start: an Event belongs to the loop that first waits on it, and
        # an app may be started again on another loop.
        wake = asyncio.Event()
        self._tasks = [
            loop.create_task(self._subscribe_loop(wake), name="bastion circuits subscriber"),
            loop.create_task(self._refresh_loop(wake), name="bastion circuits refresh"),
        ]
        # Before start() returns, so the first requests see circuits opened elsewhere.
        await self.refresh()

    async def stop(self) -> None:
        """Stop the background tasks and wait for them and for publications in flight."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Bounded by the Redis timeout per transition, and by the first failure; a
        # transition made just before shutdown still reaches Redis.
        if self._publisher is not None:
            await asyncio.gather(self._publisher, return_exceptions=True)
            self._publisher = None
        self._degradation.forget()

    async def _refresh_loop(self, wake: asyncio.Event) -> None:
        while True:
            try:
                async with asyncio.timeout(self._interval):
                    await wake.wait()
            except TimeoutError:
                pass
            wake.clear()
            await self.refresh()

    async def _subscribe_loop(self, wake: asyncio.Event) -> None:
        backoff = _BACKOFF_INITIAL
        failing = False
        while True:
            pubsub = self._redis.pubsub()
            try:
                async with asyncio.timeout(max(self._timeout, _SUBSCRIBE_TIMEOUT)):
                    await pubsub.subscribe(self.channel)
                _raise_if_cancelled()
                if failing:
                    logger.info("circuit subscription restored", channel=self.channel)
                    failing = False
                backoff = _BACKOFF_INITIAL
                # Transitions published while this instance was not subscribed.
                wake.set()
                while True:
                    message = await pubsub.get_message(
                        ignore_subscribe_messages=True, timeout=_LISTEN_TIMEOUT
                    )
                    _raise_if_cancelled()
                    if message is not None and message.get("type") == "message":
                        self._apply(message["data"])
            except Exception as exc:  # noqa: BLE001 -- any failure: resubscribe after a pause
                _raise_if_cancelled()
                if not failing:
                    logger.warning(
                        "circuit subscription lost; retrying with backoff",
                        channel=self.channel,
                        error=type(exc).__name__,
                    )
                    failing = True
            finally:
                # Closing drops the socket without waiting (nowait); it does not fail.
                await pubsub.aclose()
            # Full jitter, so instances cut off together do not reconnect together.
            await asyncio.sleep(random.uniform(0, backoff))  # noqa: S311 -- jitter, not security
            backoff = min(backoff * 2, _BACKOFF_MAX)
