"""The pool you can see: gauges, waiters, wait times, timeouts, slow queries, and the 503.

The QueuePool tests run on the session's PostgreSQL database; the gauges run on
SQLite files too, which use the same pool class. Each test gives its Database
its own pool name, so the process-wide metrics of one test never mix with
another's; counters labelled by SQL verb only are read as a difference.

A few tests wait on real time because the pool itself does: a caller gives up
after ``pool_timeout`` measured by asyncio, and ``pg_sleep`` sleeps in the
server. Those waits are 0.05 to 0.2 seconds and every poll is bounded.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import AsyncIterator, Callable

import pytest
from fastapi import FastAPI
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from structlog.testing import capture_logs

import bastion
from bastion.data import Database
from bastion.data._instrumentation import (
    STATEMENT_MAX,
    WARNING_INTERVAL,
    statement_template,
    statement_verb,
)
from bastion.settings import DatabaseSettings
from bastion.testing import count_queries, lifespan_client

POOL = "db_client_connection_pool_name"
# A short pool_timeout: the time the pool itself waits before giving up (real time).
SHORT_TIMEOUT = 0.05

MakeDatabase = Callable[..., Database]


def pool_sample(metric: str, name: str, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, {POOL: name, **labels})


def connections(name: str) -> dict[str, float | None]:
    """The pool gauges of one pool, by short name."""
    return {
        "used": pool_sample("db_client_connections_usage", name, db_client_connection_state="used"),
        "idle": pool_sample("db_client_connections_usage", name, db_client_connection_state="idle"),
        "overflow": pool_sample("bastion_db_connection_overflow", name),
        "max": pool_sample("db_client_connection_max", name),
        "pending": pool_sample("db_client_connection_pending_requests", name),
    }


def verb_sample(metric: str, system: str, verb: str) -> float:
    value = REGISTRY.get_sample_value(metric, {"db_system_name": system, "db_operation_name": verb})
    return value or 0.0


async def until(predicate: Callable[[], bool]) -> None:
    """Poll ``predicate`` until it holds; fail after 5 seconds."""
    async with asyncio.timeout(5):
        # A metric has no event to await: poll it.
        while not predicate():  # noqa: ASYNC110 -- see above
            await asyncio.sleep(0.002)


class FakeClock:
    """Monotonic seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def warnings_named(logs: list[dict], event: str) -> list[dict]:
    return [entry for entry in logs if entry["event"] == event]


@pytest.fixture
async def make_database() -> AsyncIterator[MakeDatabase]:
    """Build Databases with their own pool names; close them after the test."""
    made: list[Database] = []

    def make(url: str, **settings) -> Database:
        db = Database(DatabaseSettings(url=url, **settings), name=f"t-{secrets.token_hex(4)}")
        made.append(db)
        return db

    yield make
    for db in made:
        await db.aclose()


@pytest.fixture
def single_connection(postgres_url: str, make_database: MakeDatabase) -> Database:
    """PostgreSQL behind a pool of exactly one connection that gives up after 50 ms."""
    return make_database(
        postgres_url, pool_size=1, max_overflow=0, pool_timeout=SHORT_TIMEOUT, pool_wait_warning=0
    )


async def hold(db: Database, release: asyncio.Event, held: asyncio.Event) -> None:
    async with db.engine.connect() as connection:
        await connection.execute(text("SELECT 1"))
        held.set()
        await release.wait()


class Holder:
    """Keeps one connection of a pool checked out until released."""

    def __init__(self, db: Database) -> None:
        self.release = asyncio.Event()
        self.held = asyncio.Event()
        self.task = asyncio.create_task(hold(db, self.release, self.held))

    async def __aenter__(self) -> Holder:
        async with asyncio.timeout(5):
            await self.held.wait()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.release.set()
        async with asyncio.timeout(5):
            await self.task


class TestPoolGauges:
    async def test_gauges_follow_checkout_and_checkin(self, database_url, make_database):
        """Used and idle follow a checkout and its checkin; max is pool_size + max_overflow."""
        db = make_database(database_url)
        name = db.name
        before = connections(name)
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            during = connections(name)
        after = connections(name)
        # SQLite files keep SQLAlchemy's pool sizes (5 + 10); PostgreSQL takes the settings'.
        assert (0, 0, 15, 0) == (before["used"], before["idle"], before["max"], before["pending"])
        assert (1, 0) == (during["used"], during["idle"])
        assert (0, 1) == (after["used"], after["idle"])

    async def test_overflow_gauge_counts_connections_beyond_pool_size(
        self, postgres_url, make_database
    ):
        """Overflow starts at minus pool_size, rises past zero under load and falls back."""
        db = make_database(postgres_url, pool_size=1, max_overflow=2)
        name = db.name
        assert (-1, 3) == (connections(name)["overflow"], connections(name)["max"])
        async with db.engine.connect() as first, db.engine.connect() as second:
            await first.execute(text("SELECT 1"))
            await second.execute(text("SELECT 1"))
            during = connections(name)
        after = connections(name)
        assert (2, 0, 1) == (during["used"], during["idle"], during["overflow"])
        # The overflow connection is closed on checkin; pool_size of them stay idle.
        assert (0, 1, 0) == (after["used"], after["idle"], after["overflow"])

    async def test_closing_the_database_empties_the_gauges(self, postgres_url, make_database):
        """After aclose() the pool reports no connections, used or idle."""
        db = make_database(postgres_url)
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        assert 1 == connections(db.name)["idle"]
        await db.aclose()
        after = connections(db.name)
        assert (0, 0) == (after["used"], after["idle"])

    async def test_connections_returned_after_dispose_leave_the_new_pool_alone(
        self, postgres_url, make_database
    ):
        """A connection checked out before dispose() does not count in the pool that replaced it."""
        db = make_database(postgres_url)
        old_pool = db.engine.sync_engine.pool
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            await db.engine.dispose(close=False)
        after = connections(db.name)
        # The returned connection idles in the old pool; close it where asyncpg can await.
        async with db.engine.connect() as connection:
            await connection.run_sync(lambda _: old_pool.dispose())
        assert (0, 0) == (after["used"], after["idle"])

    async def test_in_memory_sqlite_has_no_pool_to_report(self, make_database):
        """SQLite :memory: keeps NullPool, which has no gauges."""
        db = make_database("sqlite+aiosqlite:///:memory:")
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        assert {"used": None, "idle": None, "overflow": None, "max": None, "pending": None} == (
            connections(db.name)
        )

    async def test_pool_housekeeping_stays_under_sqlalchemy_loggers(
        self, sqlite_url, make_database, caplog
    ):
        """The pool's own info lines ("Pool recreating") are not logged as bastion's."""
        db = make_database(sqlite_url)
        async with db.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
        with caplog.at_level(logging.INFO, logger="bastion"):
            await db.engine.dispose()
        assert [] == [r.getMessage() for r in caplog.records if r.name.startswith("bastion.")]


class TestPoolWaits:
    async def test_waiter_is_counted_and_its_wait_observed(self, postgres_url, make_database):
        """A caller queued behind a held connection shows as pending, then as a wait observed."""
        db = make_database(
            postgres_url, pool_size=1, max_overflow=0, pool_timeout=5, pool_wait_warning=0
        )
        name = db.name
        with capture_logs() as logs:
            async with Holder(db):
                waiter = asyncio.create_task(db.ping())
                await until(lambda: connections(name)["pending"] == 1)
                in_queue = connections(name)
            await asyncio.wait_for(waiter, 5)
        waited = warnings_named(logs, "database pool wait")
        assert (1, 1) == (in_queue["pending"], in_queue["used"])
        assert 0 == connections(name)["pending"]
        # The holder's checkout and the waiter's both took a connection.
        assert 2 == pool_sample("db_client_connection_wait_time_seconds_count", name)
        assert 1 == len(waited)
        line = waited[0]
        assert (name, 1, 1, 0, 0, 0, "warning") == (
            line["pool"],
            line["size"],
            line["in_use"],
            line["overflow"],
            line["waiters"],
            line["suppressed"],
            line["log_level"],
        )
        assert line["waited_seconds"] > 0
        assert "127.0.0.1" not in repr(line)

    async def test_callers_that_do_not_queue_are_not_warned_about(
        self, postgres_url, make_database
    ):
        """Checkouts served at once never warn, even with a zero wait threshold."""
        db = make_database(postgres_url, pool_size=2, max_overflow=0, pool_wait_warning=0)
        with capture_logs() as logs:
            for _ in range(3):
                await db.ping()
        assert [] == [entry for entry in logs if entry["event"].startswith("database pool")]
        assert 0 == connections(db.name)["pending"]

    async def test_timeout_is_counted_and_warned_as_exhausted(self, single_connection):
        """A caller that gives up raises TimeoutError, counts a timeout and logs exhaustion."""
        name = single_connection.name
        with capture_logs() as logs:
            async with Holder(single_connection):
                with pytest.raises(PoolTimeout):
                    await single_connection.ping()
                gauges = connections(name)
        exhausted = warnings_named(logs, "database pool exhausted")
        assert 1 == pool_sample("db_client_connection_timeouts_total", name)
        assert (0, 1) == (gauges["pending"], gauges["used"])
        assert 1 == len(exhausted)
        line = exhausted[0]
        assert (name, 1, 1, 0, 0) == (
            line["pool"],
            line["size"],
            line["in_use"],
            line["overflow"],
            line["waiters"],
        )
        assert line["waited_seconds"] >= SHORT_TIMEOUT * 0.9
        # A caller that got nothing has no acquisition time: only the holder's is observed.
        assert 1 == pool_sample("db_client_connection_wait_time_seconds_count", name)

    async def test_warnings_are_rate_limited_and_report_what_they_suppressed(
        self, single_connection
    ):
        """One warning per interval per pool; the next line counts the ones left out."""
        clock = FakeClock()
        pool = single_connection.engine.sync_engine.pool
        pool.meter.clock = clock
        with capture_logs() as logs:
            async with Holder(single_connection):
                for advance in (0.0, 1.0, WARNING_INTERVAL - 1.5, 0.5):
                    clock.now += advance
                    with pytest.raises(PoolTimeout):
                        await single_connection.ping()
        exhausted = warnings_named(logs, "database pool exhausted")
        assert 4 == pool_sample("db_client_connection_timeouts_total", single_connection.name)
        assert [0, 2] == [line["suppressed"] for line in exhausted]


class TestStatements:
    async def test_slow_query_logged_with_template_never_values(self, postgres_url, make_database):
        """A slow statement logs its verb, duration and template, but no bound value."""
        db = make_database(postgres_url, slow_query_threshold=0.05)
        secret = "sk_live_" + secrets.token_hex(8)
        before = verb_sample("bastion_db_slow_queries_total", "postgresql", "SELECT")
        with capture_logs() as logs:
            async with db.engine.connect() as connection:
                await connection.execute(
                    text("SELECT pg_sleep(:s),\n       CAST(:secret AS text)"),
                    {"s": 0.1, "secret": secret},
                )
        slow = warnings_named(logs, "slow query")
        assert 1 == len(slow)
        line = slow[0]
        assert ("SELECT", "postgresql", False) == (
            line["operation"],
            line["db_system"],
            line["failed"],
        )
        assert line["duration_seconds"] >= 0.1
        assert line["statement"].startswith("SELECT pg_sleep(")
        assert "\n" not in line["statement"]
        assert secret not in repr(logs)
        assert 1 == verb_sample("bastion_db_slow_queries_total", "postgresql", "SELECT") - before

    async def test_fast_queries_are_neither_logged_nor_counted(self, database_url, make_database):
        """Statements under the threshold leave no log line and no slow count."""
        db = make_database(database_url, slow_query_threshold=5)
        system = "sqlite" if database_url.startswith("sqlite") else "postgresql"
        before = verb_sample("bastion_db_slow_queries_total", system, "SELECT")
        with capture_logs() as logs:
            for _ in range(3):
                await db.ping()
        assert [] == warnings_named(logs, "slow query")
        assert before == verb_sample("bastion_db_slow_queries_total", system, "SELECT")

    async def test_slow_statement_that_fails_is_logged_too(self, postgres_url, make_database):
        """A statement cancelled by statement_timeout is logged as slow and failed."""
        db = make_database(postgres_url, slow_query_threshold=0.05)
        with capture_logs() as logs:
            async with db.engine.connect() as connection:
                await connection.execute(text("SET statement_timeout = 100"))
                with pytest.raises(DBAPIError):
                    await connection.execute(text("SELECT pg_sleep(2)"))
        slow = warnings_named(logs, "slow query")
        assert [("SELECT", True)] == [(line["operation"], line["failed"]) for line in slow]

    async def test_duration_histogram_is_labelled_by_verb(self, database_url, make_database):
        """Each statement is observed once under its system and SQL verb."""
        db = make_database(database_url)
        system = "sqlite" if database_url.startswith("sqlite") else "postgresql"
        # PostgreSQL's DDL is transactional: a failure half-way leaves no table behind.
        statements = {
            "CREATE": "CREATE TABLE verb_probe (id INTEGER PRIMARY KEY, n INTEGER)",
            "INSERT": "INSERT INTO verb_probe (id, n) VALUES (1, 1)",
            "UPDATE": "UPDATE verb_probe SET n = 2",
            "SELECT": "SELECT n FROM verb_probe",
            "DELETE": "DELETE FROM verb_probe",
            "DROP": "DROP TABLE verb_probe",
        }
        metric = "db_client_operation_duration_seconds_count"
        before = {verb: verb_sample(metric, system, verb) for verb in statements}
        async with db.engine.begin() as connection:
            for statement in statements.values():
                await connection.execute(text(statement))
        after = {verb: verb_sample(metric, system, verb) for verb in statements}
        assert dict.fromkeys(statements, 1) == {
            verb: after[verb] - before[verb] for verb in statements
        }


class TestStatementText:
    @pytest.mark.parametrize(
        ("statement", "verb"),
        [
            ("SELECT 1", "SELECT"),
            ("  \n\tselect 1", "SELECT"),
            ("(SELECT 1) UNION (SELECT 2)", "SELECT"),
            ("WITH t AS (SELECT 1) SELECT * FROM t", "WITH"),
            ("insert into t values (1)", "INSERT"),
            ("SAVEPOINT sa_savepoint_1", "SAVEPOINT"),
            ("frobnicate the table", "OTHER"),
            ("-- a comment\nSELECT 1", "OTHER"),
            ("", "OTHER"),
        ],
    )
    def test_verb_is_the_leading_word_from_a_closed_set(self, statement, verb):
        """The operation label is the leading SQL verb, or OTHER outside the known set."""
        assert verb == statement_verb(statement)

    def test_template_is_collapsed_and_truncated(self):
        """Whitespace runs become one space and long statements are cut with an ellipsis."""
        columns = ",\n    ".join(f"column_{i}" for i in range(200))
        long = f"SELECT {columns} FROM t"  # noqa: S608 -- column names made here, not input
        template = statement_template(long)
        assert ("SELECT column_0, column_1,", STATEMENT_MAX) == (template[:26], len(template))
        assert template.endswith("…")
        assert "SELECT 1 FROM t" == statement_template("  SELECT 1\n\tFROM   t ")


def pool_app(url: str) -> FastAPI:
    """An app whose pool holds one connection and gives up after 50 ms, with two routes."""
    app = bastion.create_app(
        database={"url": url, "pool_size": 1, "max_overflow": 0, "pool_timeout": SHORT_TIMEOUT},
        migrations={"mode": "off"},
        logging={"level": "WARNING", "format": "json"},
    )
    held = asyncio.Event()
    release = asyncio.Event()
    app.state.held, app.state.release = held, release

    @app.get("/hold")
    async def hold_connection() -> dict[str, str]:
        async with app.state.bastion.database.engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
            held.set()
            await release.wait()
        return {"held": "yes"}

    @app.get("/query")
    async def query() -> dict[str, int]:
        async with app.state.bastion.database.engine.connect() as connection:
            return {"value": (await connection.execute(text("SELECT 1"))).scalar_one()}

    return app


class TestPoolExhaustionOverHttp:
    async def test_exhausted_pool_answers_503_problem_with_retry_after(self, postgres_url):
        """A request that cannot get a connection gets a retryable 503 problem, not a 500."""
        app = pool_app(postgres_url)
        async with lifespan_client(app) as client:
            holding = asyncio.create_task(client.get("/hold"))
            async with asyncio.timeout(5):
                await app.state.held.wait()
            response = await client.get("/query", headers={"X-Request-Id": "pool-test-1"})
            app.state.release.set()
            held = await asyncio.wait_for(holding, 5)
            after = await client.get("/query")
        body = response.json()
        assert (503, "application/problem+json", "5") == (
            response.status_code,
            response.headers["content-type"],
            response.headers["retry-after"],
        )
        assert ("SERVICE_UNAVAILABLE", 503, "pool-test-1") == (
            body["code"],
            body["status"],
            body["correlation_id"],
        )
        assert "QueuePool" not in response.text
        assert (200, 200) == (held.status_code, after.status_code)


class TestCountQueries:
    async def test_counts_statements_in_order_without_transaction_control(
        self, database_url, make_database
    ):
        """Statements are recorded in order as templates; savepoints and commits are not."""
        db = make_database(database_url)
        async with db.engine.connect() as connection:
            await connection.execute(text("CREATE TABLE counted (n INTEGER)"))
            await connection.commit()
            with count_queries(db) as queries:
                async with connection.begin_nested():
                    await connection.execute(text("INSERT INTO counted (n) VALUES (:n)"), {"n": 7})
                nested = await connection.begin_nested()
                await connection.execute(text("DELETE FROM counted"))
                await nested.rollback()
                await connection.execute(text("SELECT n FROM counted"))
                await connection.commit()
            await connection.execute(text("SELECT 1"))
        assert ["INSERT", "DELETE", "SELECT"] == [s.split()[0] for s in queries.statements]
        assert (3, False) == (queries.count, "7" in "".join(queries.statements))

    def test_usable_from_a_sync_test_on_an_engine(self, sqlite_url):
        """A sync test can count what an AsyncEngine runs inside the block."""
        db = Database(DatabaseSettings(url=sqlite_url), name=f"t-{secrets.token_hex(4)}")

        async def run() -> None:
            try:
                for _ in range(3):
                    await db.ping()
            finally:
                await db.aclose()

        with count_queries(db.engine) as queries:
            asyncio.run(run())
        assert ["SELECT 1"] * 3 == queries.statements
