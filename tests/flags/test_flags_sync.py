"""Propagation between instances: notification, polling fallback, outages, the schedule.

Two runtimes stand for two instances: each has its own ``Database`` (pool) and
Redis client on the same PostgreSQL database and Redis. Waits are in real time
on purpose (what is measured is how soon another instance sees a change), each
bounded by the promise under test: a second by notification, the poll interval
without it.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import socket
import time
from collections.abc import AsyncIterator, Callable

import orjson
import pytest
import redis.asyncio as redis_asyncio
from flags_store_support import boolean_flag, change_rows, eventually, fresh_tables
from prometheus_client import REGISTRY
from structlog.testing import capture_logs

from bastion.audit import Actor
from bastion.data import Database
from bastion.flags._build import FlagsRuntime, build_flags, start_flags, stop_flags
from bastion.flags._engine import FlagSet
from bastion.flags._flags import Flags
from bastion.flags._model import Constraint, Operator, Rule, ScheduledChange
from bastion.flags._store import FlagStore
from bastion.flags._sync import FlagNotifier, FlagsStale, FlagSync
from bastion.settings import DatabaseSettings, load_settings
from bastion.testing import FaultProxy

pytestmark = [pytest.mark.postgres, pytest.mark.redis]

OPERATOR = Actor.system("test")


def _dead_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


@pytest.fixture
async def pg_url(postgres_url, _module_postgres) -> str:
    """A PostgreSQL database of this module's own, its flag tables emptied for each test."""
    database = await fresh_tables(_module_postgres)
    await database.aclose()
    return _module_postgres


@pytest.fixture
async def instances(
    pg_url, redis_url, redis_prefix
) -> AsyncIterator[Callable[..., asyncio.Future[FlagsRuntime]]]:
    """Start runtimes ("instances") on the shared database; stop them all at the end."""
    started: list[tuple[FlagsRuntime, Database, object]] = []

    async def start(
        *,
        poll_interval: float = 60.0,
        database_url: str | None = None,
        redis: str | None = redis_url,
    ) -> FlagsRuntime:
        settings = load_settings(
            database={"url": pg_url},
            redis={"url": redis_url, "key_prefix": redis_prefix},
            flags={"poll_interval": poll_interval},
        )
        database = Database(DatabaseSettings(url=database_url or pg_url))
        client = None
        if redis is not None:
            client = redis_asyncio.from_url(redis, socket_timeout=0.5, socket_connect_timeout=0.5)
        runtime = build_flags(settings, database=database, redis=client)
        await start_flags(runtime)
        started.append((runtime, database, client))
        return runtime

    yield start
    for runtime, database, client in started:
        await stop_flags(runtime)
        await database.aclose()
        if client is not None:
            await client.aclose()


class TestNotification:
    async def test_writer_serves_its_change_at_once(self, instances):
        """The instance that wrote a change serves it when the write returns."""
        one = await instances()

        await one.store.create(boolean_flag(enabled=True), actor=OPERATOR)

        assert one.flags.is_enabled("new-editor")
        assert await one.store.revision() == one.revision

    async def test_change_reaches_another_instance_within_a_second(self, instances):
        """With Redis up, a toggle on one instance is served by another in under a second."""
        one, two = await instances(), await instances()
        await one.store.create(boolean_flag(), actor=OPERATOR)
        assert await eventually(lambda: "new-editor" in two.flags.flag_set, within=1.0)
        observed = _sample("bastion_flags_propagation_seconds_count")

        started = time.monotonic()
        await one.store.toggle("new-editor", True, expected_version=1, actor=OPERATOR)

        assert await eventually(lambda: two.flags.is_enabled("new-editor"), within=1.0)
        assert time.monotonic() - started < 1.0
        # Polling is a minute away: the notification did it, and was measured.
        assert _sample("bastion_flags_propagation_seconds_count") > observed
        assert two.sync.notifier is not None
        assert two.sync.notifier.up

    async def test_message_carries_the_revision(self, instances, redis_url, redis_prefix):
        """The notification is ``{"revision", "at"}`` on ``{key_prefix}flags``."""
        one = await instances()
        client = redis_asyncio.from_url(redis_url)
        pubsub = client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(f"{redis_prefix}flags")
            before = time.time()
            await one.store.create(boolean_flag(), actor=OPERATOR)
            message = None
            async with asyncio.timeout(2.0):
                while message is None:
                    message = await pubsub.get_message(timeout=0.5)
        finally:
            await pubsub.aclose()
            await client.aclose()

        body = orjson.loads(message["data"])
        assert await one.store.revision() == body["revision"]
        assert before <= body["at"] <= time.time()


class TestPollingFallback:
    async def test_dead_redis_leaves_the_poll(self, instances):
        """With the notifier's Redis unreachable, a change arrives within the poll interval."""
        dead = f"redis://127.0.0.1:{_dead_port()}/0"
        one = await instances(poll_interval=0.3, redis=dead)
        two = await instances(poll_interval=0.3, redis=dead)

        started = time.monotonic()
        await one.store.create(boolean_flag(enabled=True), actor=OPERATOR)

        assert await eventually(lambda: two.flags.is_enabled("new-editor"), within=0.3 + 0.2)
        assert time.monotonic() - started < 0.5
        assert two.sync.notifier is not None
        assert not two.sync.notifier.up

    async def test_no_redis_at_all_polls(self, instances):
        """Without any Redis, the poll alone carries changes."""
        one = await instances(poll_interval=0.2, redis=None)
        two = await instances(poll_interval=0.2, redis=None)

        await one.store.create(boolean_flag(enabled=True), actor=OPERATOR)

        assert await eventually(lambda: two.flags.is_enabled("new-editor"), within=0.5)
        assert two.sync.notifier is None

    async def test_redis_outage_then_recovery(self, instances, redis_url):
        """During a Redis outage changes arrive by polling; once back, by notification again."""
        with FaultProxy(redis_url, name="flags-redis") as proxy:
            url = proxy.url_for(redis_url)
            one = await instances(poll_interval=0.4, redis=url)
            two = await instances(poll_interval=0.4, redis=url)
            await one.store.create(boolean_flag(), actor=OPERATOR)
            assert await eventually(lambda: "new-editor" in two.flags.flag_set, within=1.0)

            proxy.outage()
            assert await eventually(lambda: not two.sync.notifier.up, within=2.0)
            await one.store.toggle("new-editor", True, expected_version=None, actor=OPERATOR)
            assert await eventually(lambda: two.flags.is_enabled("new-editor"), within=0.4 + 0.3)

            proxy.restore()
            assert await eventually(lambda: two.sync.notifier.up, within=6.0)
            # From here only the notification is fast enough: the poll is a minute away
            # once the sleep in progress ends.
            two.sync.poll_interval = 60.0
            await asyncio.sleep(0.5)
            await one.store.toggle("new-editor", False, expected_version=None, actor=OPERATOR)
            assert await eventually(lambda: not two.flags.is_enabled("new-editor"), within=1.0)


class TestDatabaseDown:
    async def test_last_set_keeps_serving_and_readiness_says_stale(self, instances, pg_url):
        """A refresh against a dead database keeps the set, counts the error, and recovers."""
        one = await instances()
        await one.store.create(boolean_flag(enabled=True), actor=OPERATOR)
        with FaultProxy(pg_url, name="flags-postgres") as proxy:
            two = await instances(database_url=proxy.url_for(pg_url), redis=None)
            assert two.flags.is_enabled("new-editor")
            errors = _sample("bastion_flags_refresh_total", trigger="poll", outcome="error")

            proxy.outage()
            await one.store.toggle("new-editor", False, expected_version=None, actor=OPERATOR)
            reloaded = await two.refresh(trigger="poll")

            assert not reloaded
            assert two.flags.is_enabled("new-editor")
            assert errors + 1 == _sample(
                "bastion_flags_refresh_total", trigger="poll", outcome="error"
            )
            await two.health_check()  # loaded once: still ready
            two.sync.last_ok = time.monotonic() - 4 * two.sync.poll_interval
            with pytest.raises(FlagsStale):
                await two.freshness_check()

            proxy.restore()
            assert await two.refresh(trigger="poll")
            assert not two.flags.is_enabled("new-editor")
            await two.freshness_check()

    async def test_never_loaded_is_not_ready(self, instances, pg_url):
        """An instance whose database never answered serves defaults and is not ready."""
        with FaultProxy(pg_url, name="flags-postgres-down") as proxy:
            proxy.outage()
            lonely = await instances(database_url=proxy.url_for(pg_url), redis=None)

            assert not lonely.flags.is_enabled("new-editor")
            with pytest.raises(FlagsStale):
                await lonely.health_check()


class TestSchedule:
    async def test_every_instance_switches_on_time_and_it_is_stored_once(self, instances, pg_url):
        """A scheduled switch flips on each instance by its own timer; the store records it once."""
        one, two = await instances(), await instances()
        at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.6)
        await one.store.create(
            boolean_flag(schedule=(ScheduledChange(at=at, enabled=True),)), actor=OPERATOR
        )
        assert await eventually(lambda: "new-editor" in two.flags.flag_set, within=1.0)
        assert not two.flags.is_enabled("new-editor")

        assert await eventually(lambda: two.flags.is_enabled("new-editor"), within=2.0)
        assert dt.datetime.now(dt.UTC) >= at
        assert await eventually(lambda: _persisted(one), within=2.0), (
            "the due change was not persisted"
        )
        database = Database(DatabaseSettings(url=pg_url))
        try:
            schedules = [row for row in await change_rows(database) if row.action == "schedule"]
        finally:
            await database.aclose()
        assert 1 == len(schedules)


async def _persisted(runtime: FlagsRuntime) -> bool:
    stored = await runtime.store.get("new-editor")
    return stored.version == 2 and stored.flag.enabled and not stored.flag.schedule


def _compile(flags, segments, revision, now) -> FlagSet:
    return FlagSet.from_flags(flags, segments, revision=revision, now=now, regex_timeout=0.005)


class TestScheduleBackoff:
    async def test_a_due_change_with_the_database_down_backs_off(self):
        """With the database down, a due change is retried with backoff (not in a loop), the
        outage logged once."""
        url = f"postgresql+asyncpg://postgres@127.0.0.1:{_dead_port()}/flags"
        database = Database(DatabaseSettings(url=url))
        earlier = dt.datetime.now(dt.UTC)
        due = (ScheduledChange(at=earlier + dt.timedelta(milliseconds=1), enabled=True),)
        flags = Flags(FlagSet.from_flags([boolean_flag(schedule=due)], now=earlier))
        sync = FlagSync(flags=flags, compile=_compile, store=FlagStore(database), poll_interval=5)
        before = _sample("bastion_flags_refresh_total", trigger="schedule", outcome="error")
        try:
            with capture_logs() as logs:
                await sync.start()
                await asyncio.sleep(1.0)
                await sync.stop()
        finally:
            await database.aclose()

        tries = _sample("bastion_flags_refresh_total", trigger="schedule", outcome="error") - before
        # 0.1 + 0.2 + 0.4 s of waits fit in a second, the next (0.8 s) does not.
        assert 2 <= tries <= 5
        outages = [
            entry
            for entry in logs
            if entry.get("feature") == "flag refresh" and entry["log_level"] == "warning"
        ]
        assert 1 == len(outages)


class TestRegexTimeouts:
    async def test_timeouts_are_counted_across_reloads(self):
        """Regex timeouts move into bastion_flags_regex_timeouts_total at each flush, those of
        a replaced set too."""
        slow = Constraint(context="userId", operator=Operator.REGEX, value="(a|aa)+$")
        flag = boolean_flag("rx", enabled=True, rules=(Rule(constraints=(slow,)),))
        sync = FlagSync(flags=Flags(), compile=_compile, store=None, seed=([flag], []))
        evil = {"userId": "a" * 30 + "!"}
        before = _sample("bastion_flags_regex_timeouts_total")
        await sync.start()
        try:
            first = sync.flags.flag_set
            sync.flags.evaluate("rx", evil)
            sync.flags.evaluate("rx", evil)
            sync.flush_counts()
            counted = _sample("bastion_flags_regex_timeouts_total") - before

            await sync.refresh(trigger="admin", force=True)
            assert sync.flags.flag_set is not first
            first.evaluate("rx", evil)  # a request still holding the replaced set
            sync.flags.evaluate("rx", evil)
            sync.flush_counts()
            sync.flush_counts()  # nothing new: nothing added
        finally:
            await sync.stop()

        assert 2 == counted
        assert 4 == _sample("bastion_flags_regex_timeouts_total") - before


class TestSeedAfterOutage:
    async def test_seed_is_imported_once_the_database_answers(self, pg_url, tmp_path):
        """A seed not imported because the database was down at start is imported by the
        first load that finds the store empty."""
        seed = tmp_path / "flags.json"
        seed.write_text('{"flags": [{"key": "seeded", "enabled": true}]}')
        with FaultProxy(pg_url, name="flags-seed-postgres") as proxy:
            proxy.outage()
            settings = load_settings(
                database={"url": pg_url},
                flags={"poll_interval": 0.2, "seed_file": str(seed)},
            )
            database = Database(DatabaseSettings(url=proxy.url_for(pg_url)))
            runtime = build_flags(settings, database=database)
            try:
                await start_flags(runtime)
                assert not runtime.sync.loaded
                assert runtime.sync.pending_seed is not None

                proxy.restore()

                assert await eventually(lambda: runtime.flags.is_enabled("seeded"), within=3.0)
                assert runtime.sync.pending_seed is None
                history = await runtime.store.history("seeded")
            finally:
                await stop_flags(runtime)
                await database.aclose()
        assert [("import", "system:flags.seed")] == [(c.action, c.actor) for c in history]


class TestHalfOpenSubscriber:
    async def test_a_silent_dead_connection_is_dropped(self, redis_url, redis_prefix):
        """A subscriber whose connection stops answering (no FIN) notices by PING and drops it."""
        with FaultProxy(redis_url, name="flags-redis-half-open") as proxy:
            client = redis_asyncio.from_url(
                proxy.url_for(redis_url), socket_timeout=0.5, socket_connect_timeout=0.5
            )

            async def nothing(*_: object) -> None:
                return None

            async def pause(_: float) -> None:
                await asyncio.sleep(0.05)

            notifier = FlagNotifier(
                client,
                f"{redis_prefix}flags",
                timeout=0.3,
                sleep=pause,
                health_check_interval=0.3,
            )
            task = asyncio.create_task(notifier.listen(nothing, nothing))
            try:
                assert await eventually(lambda: notifier.up, within=2.0)
                await asyncio.sleep(0.8)  # idle but answering PINGs: stays up
                assert notifier.up

                proxy.hang()

                assert await eventually(lambda: not notifier.up, within=3.0)
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                notifier.forget()
                await client.aclose()
