"""Propagation: every instance keeps its compiled flag set current, without a thread.

A change made on one instance reaches the others in three ways, each covering
what the one before may miss:

1. **At once, here.** The store calls :meth:`FlagSync.changed` after the write
   commits: this instance reloads, and publishes ``{"revision", "at"}`` on the
   Redis channel ``{redis.key_prefix}flags``.
2. **Notification.** Every instance holds a subscriber (one pooled Redis
   connection, read on the event loop). A message whose revision is above the
   local one triggers a reload. When Redis drops, the subscriber reconnects
   with backoff (``bastion_flags_notifier_up`` 0 meanwhile) and reloads once
   back, for what was published while it was away. A connection silent for
   :data:`HEALTH_CHECK_INTERVAL` is PINGed, and dropped when no PONG comes: a
   half-open connection never fails a read on its own.
3. **Polling, always on.** Every ``flags.poll_interval`` each instance reads the
   revision (one indexed ``max(id)``) and reloads when it moved: the bound on
   staleness when Redis is absent, down or loses a message.

A reload is :meth:`FlagStore.snapshot` (one consistent read), a compile
(:meth:`FlagSet.from_flags`), and :meth:`Flags.replace`, which swaps one
reference: evaluations never wait on any of it. When the database fails, the
last set keeps serving, the failure is counted, and the next poll retries;
readiness reports the set stale after :data:`STALE_INTERVALS` intervals.

Scheduled changes: a timer sleeps until the set's ``next_change_at``, then the
set is recompiled for the new time (every instance does, so each switches on
time on its own) and the due entries are persisted (:meth:`FlagStore.apply_due`;
concurrent instances write them once). When the reload fails (the database is down), the
timer retries with backoff (from :data:`SCHEDULE_RETRY_MIN` up to the poll
interval), not in a loop.

Everything runs as tasks started in the app's lifespan, so each worker process
of a pre-forking server starts its own after the fork: nothing made before the
fork (a thread, a connection) is relied on after it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import random
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Final, Literal

import orjson
import structlog

from bastion.data.types import utc_now
from bastion.observability.metrics import (
    FLAGS_EVALUATIONS,
    FLAGS_LAST_REFRESH,
    FLAGS_LOADED,
    FLAGS_NOTIFIER_UP,
    FLAGS_PROPAGATION,
    FLAGS_REFRESH,
    FLAGS_REGEX_TIMEOUTS,
    FLAGS_REVISION,
)
from bastion.resilience import Degradation

if TYPE_CHECKING:
    from bastion.flags._engine import FlagSet
    from bastion.flags._flags import Flags
    from bastion.flags._model import Flag, Segment
    from bastion.flags._store import FlagStore

__all__ = [
    "CHANNEL",
    "STALE_INTERVALS",
    "Compiler",
    "FlagNotifier",
    "FlagSync",
    "FlagsStale",
    "Trigger",
]

logger = structlog.get_logger("bastion.flags")

CHANNEL: Final = "flags"
"""The pub/sub channel, after ``redis.key_prefix``."""
STALE_INTERVALS: Final = 3
"""Poll intervals without a successful check after which readiness calls the set stale."""
RECONNECT_MIN: Final = 0.1
RECONNECT_MAX: Final = 5.0
"""Backoff bounds (seconds) of the subscriber's reconnects while Redis is down."""
SCHEDULE_STEP_MAX: Final = 60.0
"""Longest the schedule timer sleeps at once: a wall-clock jump is noticed within it."""
SCHEDULE_RETRY_MIN: Final = 0.1
"""First wait (seconds) of the schedule timer after a failed reload; it doubles up to
``flags.poll_interval`` while the database stays down."""
HEALTH_CHECK_INTERVAL: Final = 30.0
"""Seconds the subscriber's connection may be silent before it PINGs through it; no PONG
within the publish timeout (plus a second) and it reconnects. A half-open connection (a
peer or a NAT gone without a FIN) is otherwise silent forever: no read ever fails on it."""

Trigger = Literal["start", "change", "notify", "poll", "schedule", "admin"]
"""Why a refresh ran (the ``trigger`` label of ``bastion_flags_refresh_total``)."""

Compiler = Callable[["list[Flag]", "list[Segment]", int, dt.datetime], "FlagSet"]
"""``(flags, segments, revision, now) -> FlagSet``: the settings' compile."""

try:  # pragma: no branch -- redis is installed wherever Redis is configured
    from redis.exceptions import RedisError

    _REDIS_DOWN: tuple[type[BaseException], ...] = (TimeoutError, OSError, RedisError)
except ImportError:  # pragma: no cover -- memory-only installs
    _REDIS_DOWN = (TimeoutError, OSError)


class FlagsStale(RuntimeError):
    """Readiness: the flag set was never loaded, or not confirmed current for too long."""


class FlagNotifier:
    """Change notifications over Redis pub/sub: the revision, and when it was published.

    Args:
        redis: a ``redis.asyncio`` client (its pool gives the subscriber its connection).
        channel: the full channel name (``{redis.key_prefix}flags``).
        timeout: longest a publish may take; a slower Redis is skipped (the poll covers it).
            Also how long the subscriber waits for the answer to its PING.
        sleep: the backoff's sleep (tests pass a short one).
        health_check_interval: seconds of silence after which the subscriber PINGs
            (:data:`HEALTH_CHECK_INTERVAL`).
    """

    def __init__(
        self,
        redis: Any,
        channel: str,
        *,
        timeout: float = 0.5,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
        health_check_interval: float = HEALTH_CHECK_INTERVAL,
    ) -> None:
        self.redis = redis
        self.channel = channel
        self.timeout = timeout
        self.health_check_interval = health_check_interval
        self._sleep = sleep
        self.up = False
        """Whether the subscriber is subscribed now."""
        self._degradation = Degradation("redis", feature="flag change notifications")
        self._up_gauge = FLAGS_NOTIFIER_UP.labels("redis")

    async def publish(self, revision: int) -> bool:
        """Tell every instance the set is at ``revision``; ``False`` when Redis did not take it."""
        message = orjson.dumps({"revision": revision, "at": time.time()})
        try:
            async with asyncio.timeout(self.timeout):
                await self.redis.publish(self.channel, message)
        except _REDIS_DOWN as exc:
            self._degradation.failed(exc)
            return False
        return True

    async def listen(
        self,
        on_revision: Callable[[int, float | None], Awaitable[None]],
        on_subscribed: Callable[[], Awaitable[None]],
    ) -> None:
        """Call ``on_revision(revision, published_at)`` per message, forever; reconnect on failure.

        ``on_subscribed`` runs after each (re)subscription: messages published while
        unsubscribed are lost, so the caller checks the revision then.
        """
        backoff = RECONNECT_MIN
        while True:
            pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._set_up(True)
                backoff = RECONNECT_MIN
                self._degradation.recovered()
                await on_subscribed()
                await self._receive(pubsub, on_revision)
            except _REDIS_DOWN as exc:
                self._set_up(False)
                self._degradation.failed(exc)
                await self._sleep(backoff * random.uniform(0.5, 1.0))  # noqa: S311 -- jitter
                backoff = min(backoff * 2, RECONNECT_MAX)
            finally:
                self._set_up(False)
                with contextlib.suppress(*_REDIS_DOWN, RuntimeError):
                    await pubsub.aclose()

    async def _receive(
        self, pubsub: Any, on_revision: Callable[[int, float | None], Awaitable[None]]
    ) -> None:
        """Read messages until the connection fails or stops answering (then raise)."""
        loop = asyncio.get_running_loop()
        wait = min(1.0, self.health_check_interval)
        heard = loop.time()
        pinged: float | None = None
        while True:
            # Bounded waits, so the silence below is measured even when nothing comes.
            message = await pubsub.get_message(timeout=wait)
            now = loop.time()
            if message is not None:
                heard, pinged = now, None
                if message.get("type") == "message":
                    parsed = _parse(message.get("data"))
                    if parsed is not None:
                        await on_revision(*parsed)
                continue
            if pinged is not None:
                if now - pinged > self.timeout + wait:
                    raise TimeoutError("no PONG from Redis: the subscriber's connection is dead")
            elif now - heard >= self.health_check_interval:
                async with asyncio.timeout(self.timeout):
                    await pubsub.ping()
                pinged = now

    def forget(self) -> None:
        """Leave the outage bookkeeping (on stop)."""
        self._set_up(False)
        self._degradation.forget()

    def _set_up(self, up: bool) -> None:
        self.up = up
        self._up_gauge.set(1 if up else 0)


def _parse(data: Any) -> tuple[int, float | None] | None:
    try:
        body = orjson.loads(data)
        revision = int(body["revision"])
        at = body.get("at")
        return revision, float(at) if isinstance(at, (int, float)) else None
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
        return None


class FlagSync:
    """Keeps one process's :class:`Flags` current: reloads, notifications, polling, schedule.

    Args:
        flags: the facade the app evaluates with; its set is replaced on reload.
        compile: builds a set from flags, segments, a revision and a time.
        store: the database store; ``None``: the set comes from ``seed`` only.
        seed: the flags and segments to serve without a store.
        notifier: Redis notifications; ``None``: polling only.
        poll_interval: seconds between revision checks.
        clock: now, aware (what scheduled changes are read at).
        monotonic: seconds, for staleness.
    """

    def __init__(
        self,
        *,
        flags: Flags,
        compile: Compiler,
        store: FlagStore | None,
        seed: tuple[list[Flag], list[Segment]] = ([], []),
        notifier: FlagNotifier | None = None,
        poll_interval: float = 5.0,
        clock: Callable[[], dt.datetime] = utc_now,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.flags = flags
        self.store = store
        self.notifier = notifier
        self.poll_interval = poll_interval
        self._compile = compile
        self._seed = seed
        self._clock = clock
        self._monotonic = monotonic
        self._lock = asyncio.Lock()
        self._rescheduled = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._degradation = Degradation("database", feature="flag refresh")
        self._schedule_degradation = Degradation("database", feature="scheduled flag changes")
        self._flushed: dict[tuple[str, str], int] = {}
        # The set whose regex timeouts were last counted, and how many were: the set
        # is replaced on reload, so its count restarts at 0 with each new one.
        self._regex_set: FlagSet | None = None
        self._regex_flushed = 0
        self.pending_seed: Callable[[], Awaitable[bool]] | None = None
        """Imports the seed file into an empty store; set while start-up could not
        (the database was down), run once after the first successful load. It
        returns whether it ran to the end (``False``: try again on the next load)."""
        self.loaded = False
        """Whether a set was loaded (from the store, or the seed without one)."""
        self.last_ok: float | None = None
        """Monotonic time of the last successful check or reload."""
        self.revision = 0
        """The revision of the loaded set."""
        self.last_error: str | None = None
        """The class of the last refresh's error, cleared by a success."""

    # -- reloading -----------------------------------------------------------------------

    async def refresh(self, *, trigger: Trigger, force: bool = False) -> bool:
        """Reload when the store's revision moved (always with ``force``); whether it reloaded.

        Never raises for a failing database: the last set keeps serving, the
        failure is counted (``outcome="error"``) and logged once per outage.
        """
        async with self._lock:
            try:
                reloaded = await self._refresh(force=force)
            except Exception as exc:  # noqa: BLE001 -- any failure: keep serving the last set
                FLAGS_REFRESH.labels(trigger, "error").inc()
                self.last_error = type(exc).__name__
                self._degradation.failed(exc)
                return False
        FLAGS_REFRESH.labels(trigger, "ok").inc()
        self.last_error = None
        self._degradation.recovered()
        self.last_ok = self._monotonic()
        FLAGS_LAST_REFRESH.set(time.time())
        if reloaded:
            logger.debug("flags reloaded", trigger=trigger, revision=self.revision)
        if self.pending_seed is not None:
            # Outside the lock: the import's on_change refreshes again.
            seed, self.pending_seed = self.pending_seed, None
            if not await seed():
                self.pending_seed = seed
        return reloaded

    async def _refresh(self, *, force: bool) -> bool:
        if self.store is None:
            if self.loaded and not force:
                return False
            flags, segments = self._seed
            self._install(self._compile(list(flags), list(segments), 0, self._clock()))
            return True
        if self.loaded and not force and await self.store.revision() == self.revision:
            return False
        revision, flags, segments = await self.store.snapshot()
        self._install(self._compile(flags, segments, revision, self._clock()))
        return True

    def _install(self, flag_set: FlagSet) -> None:
        self.flags.replace(flag_set)
        self.revision = flag_set.revision
        self.loaded = True
        FLAGS_REVISION.set(flag_set.revision)
        FLAGS_LOADED.set(len(flag_set.keys()))
        # The timer sleeps until the new set's next scheduled change.
        self._rescheduled.set()

    async def changed(self, revision: int) -> None:
        """The store's ``on_change``: tell the others, and reload here, at once."""
        tasks = [self.refresh(trigger="change")]
        if self.notifier is not None:
            tasks.append(self.notifier.publish(revision))
        await asyncio.gather(*tasks)

    async def _notified(self, revision: int, published_at: float | None) -> None:
        if revision <= self.revision and self.loaded:
            return
        if await self.refresh(trigger="notify") and published_at is not None:
            FLAGS_PROPAGATION.observe(max(0.0, time.time() - published_at))

    async def _subscribed(self) -> None:
        await self.refresh(trigger="notify")

    # -- tasks ---------------------------------------------------------------------------

    async def start(self) -> None:
        """Load the set, then start polling, listening and the schedule timer (as tasks)."""
        await self.refresh(trigger="start", force=True)
        if not self.loaded:
            logger.error(
                "flags not loaded: serving every flag's default until the database answers",
                error=self.last_error,
            )
        loop = asyncio.get_running_loop()
        # Without a store too: the poll also moves the evaluation counts into the
        # metrics, and keeps the last-refresh time (which the stale alert reads) current.
        self._tasks.append(loop.create_task(self._poll(), name="bastion flags poll"))
        if self.store is not None and self.notifier is not None:
            self._tasks.append(
                loop.create_task(
                    self.notifier.listen(self._notified, self._subscribed),
                    name="bastion flags notifications",
                )
            )
        self._tasks.append(loop.create_task(self._schedule(), name="bastion flags schedule"))

    async def stop(self) -> None:
        """Stop the tasks and count what was evaluated since the last poll."""
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.flush_counts()
        if self.notifier is not None:
            self.notifier.forget()
        self._degradation.forget()
        self._schedule_degradation.forget()

    def flush_counts(self) -> None:
        """Add the evaluations counted since the last flush to ``bastion_flags_evaluations_total``.

        Evaluations count into a plain dict (no metric call on the hot path); this
        moves the deltas into the counter, which multiprocess mode then merges
        across workers (a collector reading the dict at scrape time would not be).
        """
        counts = self.flags.evaluation_counts()
        flushed = self._flushed
        for labels, total in counts.items():
            delta = total - flushed.get(labels, 0)
            if delta > 0:
                FLAGS_EVALUATIONS.labels(*labels).inc(delta)
        self._flushed = counts
        self._flush_regex_timeouts()

    def _flush_regex_timeouts(self) -> None:
        current = self.flags.flag_set
        previous = self._regex_set
        delta = 0
        if previous is not None and previous is not current:
            # What the replaced set counted since the last flush (evaluations still
            # running on it after this are not counted: a few, at most).
            delta += previous.regex_timeouts - self._regex_flushed
            self._regex_flushed = 0
        delta += current.regex_timeouts - self._regex_flushed
        self._regex_set = current
        self._regex_flushed = current.regex_timeouts
        if delta > 0:
            FLAGS_REGEX_TIMEOUTS.inc(delta)

    async def _poll(self) -> None:
        while True:
            # Jitter below the interval only: the bound on staleness is kept, and
            # instances started together do not query in step.
            await asyncio.sleep(self.poll_interval * random.uniform(0.8, 1.0))  # noqa: S311
            await self.refresh(trigger="poll")
            self.flush_counts()

    async def _schedule(self) -> None:
        retry = SCHEDULE_RETRY_MIN
        while True:
            self._rescheduled.clear()
            due = self.flags.flag_set.next_change_at
            wait = SCHEDULE_STEP_MAX
            if due is not None:
                wait = min(wait, max(0.0, (due - self._clock()).total_seconds()))
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._rescheduled.wait()
                    continue  # a new set: look at its schedule
            if due is None or due > self._clock():
                continue
            if await self._apply_due():
                retry = SCHEDULE_RETRY_MIN
                continue
            # The set was not recompiled, so the change is still due: without a wait
            # the loop would query a database that is down as fast as it fails.
            await asyncio.sleep(retry)
            retry = min(retry * 2, max(self.poll_interval, SCHEDULE_RETRY_MIN))

    async def _apply_due(self) -> bool:
        """Switch on time here, then persist the due changes (once, across instances).

        Returns whether the set was reloaded; failures are logged once per outage.
        """
        if not await self.refresh(trigger="schedule", force=True):
            return False
        if self.store is None:
            return True
        try:
            await self.store.apply_due(self._clock())
        except Exception as exc:  # noqa: BLE001 -- the compiled set is already right; retried next time
            self._schedule_degradation.failed(exc)
        else:
            self._schedule_degradation.recovered()
        return True

    # -- readiness -----------------------------------------------------------------------

    async def loaded_check(self) -> None:
        """Readiness (critical): a set was loaded at least once.

        Raises:
            FlagsStale: never loaded (the database did not answer, or the tables are
                missing: run ``bastion migrate upgrade``).
        """
        if not self.loaded:
            reason = f" ({self.last_error})" if self.last_error else ""
            raise FlagsStale(f"feature flags not loaded yet{reason}; defaults are served")

    async def fresh_check(self) -> None:
        """Readiness (not critical): the set was confirmed current within a few poll intervals.

        Raises:
            FlagsStale: the last successful check is older than
                ``STALE_INTERVALS * poll_interval``.
        """
        if self.store is None or self.last_ok is None:
            return
        age = self._monotonic() - self.last_ok
        if age > STALE_INTERVALS * self.poll_interval:
            reason = f" ({self.last_error})" if self.last_error else ""
            raise FlagsStale(
                f"feature flags not confirmed current for {age:.0f}s{reason}; "
                f"serving revision {self.revision}"
            )
