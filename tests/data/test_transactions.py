"""Transactions: commit and rollback, isolation, re-runs on real conflicts, cancellation."""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Awaitable, Callable, Iterator

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, IntegrityError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession
from structlog.testing import capture_logs

from bastion.data import (
    Database,
    RetryPolicy,
    TransactionConflict,
    run_transaction,
    transaction,
    use_database,
)
from bastion.data._transaction import conflict_reason
from bastion.errors import ConfigurationError, Conflict
from bastion.settings import DatabaseSettings

postgres_only = pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
sqlite_only = pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)

START = 100
ACCOUNTS = (1, 2, 3, 4)


@pytest.fixture
async def accounts(database: Database) -> Database:
    """The test database with an ``accounts`` table of four rows at 100 each."""
    async with database.engine.begin() as connection:
        await connection.execute(
            text("CREATE TABLE accounts (id INTEGER PRIMARY KEY, balance INTEGER NOT NULL)")
        )
        await connection.execute(
            text("INSERT INTO accounts (id, balance) VALUES (:id, :balance)"),
            [{"id": account, "balance": START} for account in ACCOUNTS],
        )
    return database


@pytest.fixture(autouse=True)
def _no_default_database() -> Iterator[None]:
    """Each test starts and ends without a process-default database."""
    use_database(None)
    yield
    use_database(None)


class Sleeps:
    """A sleep for RetryPolicy that records the waits and does not wait."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
        await asyncio.sleep(0)


def policy(attempts: int = 3, sleeps: Sleeps | None = None) -> RetryPolicy:
    return RetryPolicy(
        attempts=attempts, initial_backoff=0.05, max_backoff=0.08, sleep=sleeps or Sleeps()
    )


def metric(name: str, reason: str) -> float:
    return REGISTRY.get_sample_value(name, {"reason": reason}) or 0.0


def retries(reason: str) -> float:
    return metric("bastion_db_transaction_retries_total", reason)


def failures(reason: str) -> float:
    return metric("bastion_db_transaction_failures_total", reason)


def conflict_of(database: Database) -> str:
    return "busy" if database.kind.value == "sqlite" else "serialization"


async def balances(database: Database) -> dict[int, int]:
    async with database.engine.connect() as connection:
        rows = await connection.execute(text("SELECT id, balance FROM accounts ORDER BY id"))
        return {row.id: row.balance for row in rows}


async def balance(session: AsyncSession, account: int) -> int:
    result = await session.execute(
        text("SELECT balance FROM accounts WHERE id = :id"), {"id": account}
    )
    return int(result.scalar_one())


async def set_balance(session: AsyncSession, account: int, value: int) -> None:
    await session.execute(
        text("UPDATE accounts SET balance = :value WHERE id = :id"), {"id": account, "value": value}
    )


async def commit_elsewhere(database: Database, account: int, delta: int) -> None:
    """Commit a change to ``account`` on another connection, outside any unit."""
    async with database.engine.begin() as connection:
        await connection.execute(
            text("UPDATE accounts SET balance = balance + :delta WHERE id = :id"),
            {"id": account, "delta": delta},
        )


async def add_after_a_concurrent_commit(
    session: AsyncSession, database: Database, runs: list[int], conflicts: int
) -> int:
    """Read account 1, let another connection commit to it, then write what was read plus 1.

    The first ``conflicts`` runs lose that race for real: PostgreSQL answers the
    write with 40001, SQLite with SQLITE_BUSY_SNAPSHOT.
    """
    runs.append(len(runs) + 1)
    seen = await balance(session, 1)
    if len(runs) <= conflicts:
        await commit_elsewhere(database, 1, 1000)
    await set_balance(session, 1, seen + 1)
    return len(runs)


async def eventually(check: Callable[[], Awaitable[bool]]) -> None:
    # The server acts on a cancelled statement on its own schedule (a cancel
    # request, a closed socket): poll it, within 3 s, rather than sleep a fixed time.
    async with asyncio.timeout(3):
        while not await check():  # noqa: ASYNC110 -- a server's state, no event to wait on
            await asyncio.sleep(0.01)


async def backend_state(database: Database, pid: int) -> str | None:
    """The server's view of backend ``pid``, asked on a connection outside the pool.

    Outside, because the pool may hand the asking query that very backend back.
    """
    url = database.settings.url.get_secret_value().replace("+asyncpg", "", 1)
    connection = await asyncpg.connect(url, timeout=3)
    try:
        return await connection.fetchval("SELECT state FROM pg_stat_activity WHERE pid = $1", pid)
    finally:
        await connection.close()


class TestTransaction:
    async def test_commits_on_success(self, accounts):
        """A block that ends normally commits what it wrote."""
        async with transaction(database=accounts) as session:
            await set_balance(session, 1, 42)

        assert 42 == (await balances(accounts))[1]

    async def test_rolls_back_on_exception(self, accounts):
        """A block that raises rolls back and the exception propagates unchanged."""

        async def write_then_fail():
            async with transaction(database=accounts) as session:
                await set_balance(session, 1, 42)
                raise ValueError("boom")

        with pytest.raises(ValueError, match="boom"):
            await write_then_fail()

        assert START == (await balances(accounts))[1]

    async def test_returns_its_connection(self, accounts):
        """The connection goes back to the pool after a commit and after a rollback."""

        async def read_then_fail():
            async with transaction(database=accounts) as session:
                await balance(session, 1)
                raise ValueError("boom")

        async with transaction(database=accounts) as session:
            await balance(session, 1)
        with pytest.raises(ValueError, match="boom"):
            await read_then_fail()

        assert 0 == accounts.engine.pool.checkedout()

    async def test_conflict_raises_transaction_conflict(self, accounts):
        """A real conflict in the block form is a 409 TransactionConflict chained to the driver."""
        before = failures(conflict_of(accounts))

        with pytest.raises(TransactionConflict) as caught:
            async with transaction("SERIALIZABLE", database=accounts) as session:
                await add_after_a_concurrent_commit(session, accounts, [], conflicts=1)

        assert conflict_of(accounts) == caught.value.reason
        assert isinstance(caught.value.__cause__, DBAPIError)
        assert isinstance(caught.value, Conflict)
        assert 409 == caught.value.problem("req-1")["status"]
        assert "CONFLICT" == caught.value.problem("req-1")["code"]
        assert "UPDATE" not in str(caught.value)
        assert before + 1 == failures(conflict_of(accounts))
        assert START + 1000 == (await balances(accounts))[1]

    async def test_default_database(self, accounts):
        """Without database= the unit runs on the database set by use_database."""
        use_database(accounts)

        async with transaction() as session:
            await set_balance(session, 2, 7)

        assert 7 == (await balances(accounts))[2]

    async def test_no_database_is_a_configuration_error(self):
        """Without database= and without a default, the unit refuses with a clear message."""
        with pytest.raises(ConfigurationError, match="use_database"):
            async with transaction():
                pass


class TestNesting:
    async def test_nested_block_is_refused(self, accounts):
        """A unit opened inside another in the same task raises and the outer rolls back."""

        async def nest():
            async with transaction(database=accounts) as session:
                await set_balance(session, 1, 1)
                async with transaction(database=accounts):
                    pass

        with pytest.raises(RuntimeError, match="units do not nest"):
            await nest()

        assert START == (await balances(accounts))[1]

    async def test_run_transaction_inside_a_unit_is_refused(self, accounts):
        """run_transaction inside a unit raises instead of re-running only the inner part."""

        async def inner(session):
            return await balance(session, 1)

        async def outer(session):
            return await run_transaction(inner, database=accounts)

        with pytest.raises(RuntimeError, match="units do not nest"):
            await run_transaction(outer, database=accounts, retry=policy())

    async def test_task_started_inside_a_unit_may_open_its_own(self, accounts):
        """A task started inside a unit is not nested in it: its own unit runs."""

        async def read_own():
            async with transaction(database=accounts) as session:
                return await balance(session, 2)

        async with transaction(database=accounts) as session:
            await balance(session, 1)
            seen = await asyncio.create_task(read_own())

        assert START == seen


@postgres_only
class TestIsolation:
    @pytest.mark.parametrize(
        ("isolation", "expected"),
        [
            (None, "read committed"),
            ("REPEATABLE READ", "repeatable read"),
            ("SERIALIZABLE", "serializable"),
        ],
    )
    async def test_level_is_applied(self, database, isolation, expected):
        """The unit runs at the level it names, else the database's default."""
        async with transaction(isolation, database=database) as session:
            actual = (await session.execute(text("SHOW transaction_isolation"))).scalar_one()

        assert expected == actual

    async def test_level_from_settings(self, db_url):
        """A unit that names no level uses database.isolation_level."""
        database = Database(DatabaseSettings(url=db_url, isolation_level="repeatable read"))
        try:
            async with transaction(database=database) as session:
                actual = (await session.execute(text("SHOW transaction_isolation"))).scalar_one()
        finally:
            await database.aclose()

        assert "repeatable read" == actual

    async def test_level_does_not_outlive_the_unit(self, database):
        """The pooled connection is back at the default level for the next user."""
        async with transaction("SERIALIZABLE", database=database) as session:
            await session.execute(text("SELECT 1"))
        async with database.engine.connect() as connection:
            actual = (await connection.execute(text("SHOW transaction_isolation"))).scalar_one()

        assert 1 == database.engine.pool.checkedin()
        assert "read committed" == actual


class TestRunTransaction:
    async def test_returns_what_the_unit_returns(self, accounts):
        """The result of fn is returned and its writes are committed."""

        async def withdraw(session, account, *, amount):
            await set_balance(session, account, await balance(session, account) - amount)
            return "done"

        result = await run_transaction(withdraw, 3, amount=30, database=accounts)

        assert "done" == result
        assert START - 30 == (await balances(accounts))[3]

    async def test_conflict_is_retried_and_commits(self, accounts):
        """A real conflict (40001 or SQLITE_BUSY_SNAPSHOT) re-runs the unit, which then commits."""
        reason = conflict_of(accounts)
        before = retries(reason)
        runs: list[int] = []

        attempts = await run_transaction(
            add_after_a_concurrent_commit,
            accounts,
            runs,
            1,
            isolation="SERIALIZABLE",
            database=accounts,
            retry=policy(),
        )

        assert 2 == attempts
        assert before + 1 == retries(reason)
        assert START + 1000 + 1 == (await balances(accounts))[1]

    async def test_attempts_exhausted(self, accounts):
        """When every attempt conflicts: TransactionConflict, one failure, attempts - 1 retries."""
        reason = conflict_of(accounts)
        before_retries, before_failures = retries(reason), failures(reason)
        sleeps = Sleeps()
        runs: list[int] = []

        with pytest.raises(TransactionConflict) as caught:
            await run_transaction(
                add_after_a_concurrent_commit,
                accounts,
                runs,
                99,
                isolation="SERIALIZABLE",
                database=accounts,
                retry=policy(attempts=3, sleeps=sleeps),
            )

        assert reason == caught.value.reason
        assert isinstance(caught.value.__cause__, DBAPIError)
        assert [1, 2, 3] == runs
        assert before_retries + 2 == retries(reason)
        assert before_failures + 1 == failures(reason)
        assert START + 3000 == (await balances(accounts))[1]

    async def test_attempts_argument_overrides_the_policy(self, accounts):
        """attempts= bounds the runs whatever the policy says."""
        runs: list[int] = []

        with pytest.raises(TransactionConflict):
            await run_transaction(
                add_after_a_concurrent_commit,
                accounts,
                runs,
                99,
                isolation="SERIALIZABLE",
                attempts=1,
                database=accounts,
                retry=policy(attempts=5),
            )

        assert [1] == runs

    async def test_backoff_is_jittered_and_bounded(self, accounts):
        """Each wait is drawn from [0, initial * 2**(n-1)] capped at max_backoff."""
        sleeps = Sleeps()

        with pytest.raises(TransactionConflict):
            await run_transaction(
                add_after_a_concurrent_commit,
                accounts,
                [],
                99,
                isolation="SERIALIZABLE",
                database=accounts,
                retry=policy(attempts=4, sleeps=sleeps),
            )

        assert 3 == len(sleeps.waits)
        assert [True, True, True] == [
            0 <= wait <= bound for wait, bound in zip(sleeps.waits, [0.05, 0.08, 0.08], strict=True)
        ]

    async def test_each_retry_is_logged(self, accounts):
        """One warning per re-run with attempt, reason, wait and function; no SQL, no values."""
        secret = "s3cr3t-987654321"

        async def unit(session, runs):
            runs.append(1)
            await session.execute(text("SELECT :secret"), {"secret": secret})
            await add_after_a_concurrent_commit(session, accounts, [], conflicts=1)

        with capture_logs() as logs, pytest.raises(TransactionConflict):
            await run_transaction(
                unit,
                [],
                isolation="SERIALIZABLE",
                database=accounts,
                retry=policy(attempts=3),
            )

        retried = [entry for entry in logs if entry["event"] == "transaction retry"]
        assert [1, 2] == [entry["attempt"] for entry in retried]
        assert {"warning"} == {entry["log_level"] for entry in retried}
        assert {conflict_of(accounts)} == {entry["reason"] for entry in retried}
        assert {"TestRunTransaction.test_each_retry_is_logged.<locals>.unit"} == {
            entry["function"] for entry in retried
        }
        assert all(isinstance(entry["wait"], float) for entry in retried)
        ours = [entry for entry in logs if entry["event"].startswith("transaction")]
        assert ["transaction retry", "transaction retry", "transaction conflict"] == [
            entry["event"] for entry in ours
        ]
        assert str(secret) not in repr(ours)
        assert "SELECT" not in repr(ours)

    async def test_raising_transaction_conflict_requests_a_rerun(self, accounts):
        """fn may raise TransactionConflict itself (a stale version) to have the unit re-run."""
        runs: list[int] = []

        async def unit(session):
            runs.append(1)
            await set_balance(session, 1, len(runs))
            if len(runs) == 1:
                raise TransactionConflict("serialization")

        await run_transaction(unit, database=accounts, retry=policy())

        assert [1, 1] == runs
        assert 2 == (await balances(accounts))[1]

    async def test_other_errors_are_not_retried(self, accounts):
        """An exception that is not a conflict propagates unchanged after one run and a rollback."""
        runs: list[int] = []
        before = retries(conflict_of(accounts))

        async def unit(session):
            runs.append(1)
            await set_balance(session, 1, 0)
            raise LookupError("no such document")

        with pytest.raises(LookupError, match="no such document"):
            await run_transaction(unit, database=accounts, retry=policy())

        assert [1] == runs
        assert before == retries(conflict_of(accounts))
        assert START == (await balances(accounts))[1]

    async def test_integrity_errors_are_not_retried(self, accounts):
        """A database error that is not a conflict (a duplicate key) is raised as is, once."""
        runs: list[int] = []

        async def unit(session):
            runs.append(1)
            await session.execute(text("INSERT INTO accounts (id, balance) VALUES (1, 0)"))

        with pytest.raises(IntegrityError):
            await run_transaction(unit, database=accounts, retry=policy())

        assert [1] == runs

    @pytest.mark.parametrize(
        "options",
        [{"attempts": 0}, {"initial_backoff": -1.0}, {"initial_backoff": 2.0, "max_backoff": 1.0}],
    )
    def test_policy_rejects_nonsense(self, options):
        """A policy with no attempt or with backoffs out of order is refused when built."""
        with pytest.raises(ValueError, match=r"attempts|backoff"):
            RetryPolicy(**options)

    async def test_zero_attempts_is_refused(self, accounts):
        """attempts=0 is an error, not a unit that never runs."""
        runs: list[int] = []

        async def unit(session):
            runs.append(1)

        with pytest.raises(ValueError, match="attempts"):
            await run_transaction(unit, attempts=0, database=accounts)

        assert [] == runs

    async def test_settings_give_the_default_policy(self):
        """Without retry=, attempts and backoff come from the database section."""
        settings_ = DatabaseSettings(
            transaction_attempts=5, retry_initial_backoff=0.2, retry_max_backoff=3
        )

        actual = RetryPolicy.from_settings(settings_)

        assert (5, 0.2, 3.0) == (actual.attempts, actual.initial_backoff, actual.max_backoff)


async def _wait(barrier: asyncio.Barrier) -> None:
    async with asyncio.timeout(5):
        await barrier.wait()


@postgres_only
class TestPostgresConflicts:
    async def test_concurrent_serializable_units_both_commit(self, accounts):
        """Two SERIALIZABLE read-then-write units on one row: one fails 40001 and re-runs."""
        before = retries("serialization")
        barrier = asyncio.Barrier(2)

        async def increment(session, runs):
            runs.append(1)
            seen = await balance(session, 1)
            if len(runs) == 1:
                await _wait(barrier)  # both have read before either writes
            await set_balance(session, 1, seen + 1)
            return len(runs)

        runs = await asyncio.gather(
            *(
                run_transaction(
                    increment, [], isolation="SERIALIZABLE", database=accounts, retry=policy()
                )
                for _ in range(2)
            )
        )

        assert [1, 2] == sorted(runs)
        assert before + 1 == retries("serialization")
        assert START + 2 == (await balances(accounts))[1]

    async def test_deadlock_is_retried(self, accounts):
        """Two units locking two rows in opposite order: one fails 40P01, re-runs, both commit."""
        before = retries("deadlock")
        barrier = asyncio.Barrier(2)

        async def lock_both(session, first, second, runs):
            runs.append(1)
            # Superuser-only; the test server's role is one. Detection after 50 ms, not 1 s.
            await session.execute(text("SET LOCAL deadlock_timeout = '50ms'"))
            await bump(session, first)
            if len(runs) == 1:
                await _wait(barrier)  # each holds one row lock and wants the other's
            await bump(session, second)

        async def bump(session, account):
            await session.execute(
                text("UPDATE accounts SET balance = balance + 1 WHERE id = :id"), {"id": account}
            )

        await asyncio.gather(
            run_transaction(lock_both, 1, 2, [], database=accounts, retry=policy()),
            run_transaction(lock_both, 2, 1, [], database=accounts, retry=policy()),
        )

        assert before + 1 == retries("deadlock")
        assert {1: START + 2, 2: START + 2} == {
            k: v for k, v in (await balances(accounts)).items() if k in (1, 2)
        }

    @settings(
        max_examples=8,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        transfers=st.lists(
            st.tuples(
                st.sampled_from(ACCOUNTS), st.sampled_from(ACCOUNTS), st.integers(1, 50)
            ).filter(lambda t: t[0] != t[1]),
            min_size=3,
            max_size=12,
        )
    )
    async def test_concurrent_transfers_keep_the_books(self, accounts, transfers):
        """Concurrent SERIALIZABLE transfers all commit, keep the total, and lose no update."""
        await _reset(accounts)
        before = retries("serialization") + retries("deadlock")
        # Two transfers sharing an account wait for each other after reading on their
        # first run, so every example has at least one real conflict to re-run.
        pair = _first_pair_sharing_an_account(transfers)
        gate = asyncio.Barrier(2)

        async def transfer(session, index, move, runs):
            source, target, amount = move
            runs.append(1)
            gated = index in pair and len(runs) == 1
            try:
                seen = {account: await balance(session, account) for account in (source, target)}
                if gated:
                    with contextlib.suppress(asyncio.BrokenBarrierError):
                        await _wait(gate)
            except BaseException:
                if gated:
                    gate.abort()  # the partner must not wait for a run that already ended
                raise
            # Rows in id order: no deadlocks between transfers, only serialization failures.
            for account in sorted((source, target)):
                delta = -amount if account == source else amount
                await set_balance(session, account, seen[account] + delta)

        async def guarded(index, source, target, amount):
            await run_transaction(
                transfer,
                index,
                (source, target, amount),
                [],
                isolation="SERIALIZABLE",
                database=accounts,
                retry=policy(attempts=len(transfers) + 10),
            )

        await asyncio.gather(*(guarded(i, *transfer_) for i, transfer_ in enumerate(transfers)))

        expected = dict.fromkeys(ACCOUNTS, START)
        for source, target, amount in transfers:
            expected[source] -= amount
            expected[target] += amount
        actual = await balances(accounts)
        assert START * len(ACCOUNTS) == sum(actual.values())
        assert expected == actual
        assert before < retries("serialization") + retries("deadlock")


async def _reset(database: Database) -> None:
    async with database.engine.begin() as connection:
        await connection.execute(text("UPDATE accounts SET balance = :start"), {"start": START})


def _first_pair_sharing_an_account(transfers: list[tuple[int, int, int]]) -> tuple[int, int]:
    # With three transfers over four accounts, two of them share an account.
    for i, (a, b, _) in enumerate(transfers):
        for j in range(i + 1, len(transfers)):
            if {a, b} & set(transfers[j][:2]):
                return i, j
    raise AssertionError("the strategy draws at least three transfers")


class TestCancellation:
    async def test_cancelled_between_statements_rolls_back(self, accounts):
        """A task cancelled inside a unit rolls it back and returns the connection."""
        wrote = asyncio.Event()

        async def unit():
            async with transaction(database=accounts) as session:
                await set_balance(session, 1, 0)
                wrote.set()
                await asyncio.Event().wait()

        task = asyncio.create_task(unit())
        await asyncio.wait_for(wrote.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        assert 0 == accounts.engine.pool.checkedout()
        assert START == (await balances(accounts))[1]
        async with transaction(database=accounts) as session:
            assert START == await balance(session, 1)


@postgres_only
class TestPostgresCancellation:
    async def _start(self, accounts, statement):
        ready: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        async def unit():
            async with transaction(database=accounts) as session:
                await set_balance(session, 1, 0)
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                ready.set_result(pid)
                await statement(session)

        task = asyncio.create_task(unit())
        pid = await asyncio.wait_for(ready, 5)
        return task, pid

    async def _assert_released(self, accounts, pid):
        async def settled():
            return await backend_state(accounts, pid) in (None, "idle")

        await eventually(settled)
        assert 0 == accounts.engine.pool.checkedout()
        assert START == (await balances(accounts))[1]

    async def test_cancelled_mid_statement(self, accounts):
        """Cancelled during pg_sleep(10): the server stops it within 3 s, nothing committed."""

        async def sleep(session):
            await session.execute(text("SELECT pg_sleep(10)"))

        task, pid = await self._start(accounts, sleep)

        async def running():
            return "active" == await backend_state(accounts, pid)

        await eventually(running)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await self._assert_released(accounts, pid)
        assert START == await run_transaction(balance, 1, database=accounts)

    async def test_cancelled_idle_in_transaction(self, accounts):
        """Cancelled while the server waits idle in transaction: rolled back, not left open."""

        async def wait_forever(_session):
            await asyncio.Event().wait()

        task, pid = await self._start(accounts, wait_forever)

        async def idle_in_transaction():
            return "idle in transaction" == await backend_state(accounts, pid)

        await eventually(idle_in_transaction)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        await self._assert_released(accounts, pid)

    async def test_second_cancellation_during_cleanup(self, accounts):
        """A second cancel that lands during the rollback does not leak the connection."""

        async def wait_forever(_session):
            await asyncio.Event().wait()

        task, pid = await self._start(accounts, wait_forever)
        task.cancel()
        # One loop turn: the task takes the first cancel and starts its cleanup,
        # then the second cancel lands while that cleanup awaits the server.
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

        async def returned():
            return 0 == accounts.engine.pool.checkedout()

        await eventually(returned)
        await self._assert_released(accounts, pid)


@postgres_only
class TestLostConnection:
    async def test_failed_rollback_keeps_the_units_own_error(self, accounts):
        """When the rollback fails (server session killed), the unit's error is what is raised."""

        async def killed_then_fail():
            async with transaction(database=accounts) as session:
                await set_balance(session, 1, 0)
                pid = (await session.execute(text("SELECT pg_backend_pid()"))).scalar_one()
                await run_elsewhere(accounts, "SELECT pg_terminate_backend(:pid)", pid)
                raise ValueError("boom")

        with capture_logs() as logs, pytest.raises(ValueError, match="boom"):
            await killed_then_fail()

        assert ["transaction rollback failed"] == [
            entry["event"] for entry in logs if entry["event"].startswith("transaction")
        ]
        assert 0 == accounts.engine.pool.checkedout()
        assert START == await run_transaction(balance, 1, database=accounts)


async def run_elsewhere(database: Database, statement: str, pid: int) -> None:
    async with database.engine.begin() as connection:
        await connection.execute(text(statement), {"pid": pid})


class TestConflictReason:
    @pytest.mark.parametrize(
        ("code", "expected"),
        [
            (sqlite3.SQLITE_BUSY, "busy"),
            (517, "busy"),  # SQLITE_BUSY_SNAPSHOT
            (sqlite3.SQLITE_LOCKED, "busy"),
            (262, "busy"),  # SQLITE_LOCKED_SHAREDCACHE
            (sqlite3.SQLITE_CONSTRAINT, None),
            (sqlite3.SQLITE_ERROR, None),
        ],
    )
    def test_sqlite_codes(self, code, expected):
        """SQLite's busy and locked families, extended codes included, are conflicts; others not."""
        original = sqlite3.OperationalError("database is locked")
        original.sqlite_errorcode = code

        assert expected == conflict_reason(OperationalError("UPDATE t", {}, original))

    def test_other_exceptions_are_not_conflicts(self):
        """An exception that is not a driver error is not a conflict."""
        assert None is conflict_reason(ValueError("40001"))


@sqlite_only
class TestHttpAnswer:
    async def test_conflict_is_a_409_problem(self, accounts):
        """A request whose unit still conflicts gets a 409 CONFLICT problem without SQL."""
        from fastapi import FastAPI

        import bastion
        from bastion.testing import lifespan_client

        app = FastAPI()
        bastion.install(
            app,
            database={"url": accounts.settings.url.get_secret_value()},
            migrations={"mode": "off"},
        )

        @app.post("/bump")
        async def bump() -> None:
            await run_transaction(
                add_after_a_concurrent_commit,
                accounts,
                [],
                99,
                isolation="SERIALIZABLE",
                attempts=1,
                database=accounts,
            )

        async with lifespan_client(app) as client:
            response = await client.post("/bump")

        assert 409 == response.status_code
        assert "application/problem+json" == response.headers["content-type"]
        assert ("CONFLICT", "The request conflicted with concurrent changes; retry it.") == (
            response.json()["code"],
            response.json()["detail"],
        )
        assert "UPDATE" not in response.text
