"""Transactions: a unit of work that commits or rolls back, and re-runs on conflicts.

Two forms share one unit of work: :func:`transaction` (an ``async with`` block,
never re-run) and :func:`run_transaction` (a function, re-run whole on
serialization failures, deadlocks and SQLite busy errors). Retrying statements
inside a transaction happens here and nowhere else; the resilience pipeline
retries calls to dependencies, never a unit of work.
"""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, Concatenate, Final, Literal, TypeVar

import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from bastion.backends import BackendKind
from bastion.data._engine import Database
from bastion.errors import ConfigurationError, Conflict
from bastion.observability.metrics import DB_TRANSACTION_FAILURES, DB_TRANSACTION_RETRIES
from bastion.settings import DatabaseSettings, IsolationLevel

__all__ = [
    "ConflictReason",
    "RetryPolicy",
    "TransactionConflict",
    "run_transaction",
    "transaction",
    "use_database",
]

T = TypeVar("T")

ConflictReason = Literal["serialization", "deadlock", "busy"]
"""Why a unit conflicted: a PostgreSQL serialization failure (SQLSTATE 40001), a
PostgreSQL deadlock (40P01), or SQLite's busy/locked family."""

logger = structlog.get_logger("bastion.data")

_PG_REASONS: Final[dict[str, ConflictReason]] = {"40001": "serialization", "40P01": "deadlock"}
# Extended result codes (SQLITE_BUSY_SNAPSHOT = 517, SQLITE_BUSY_RECOVERY,
# SQLITE_LOCKED_SHAREDCACHE...) keep their primary code in the low byte.
_SQLITE_BUSY_CODES: Final = frozenset({sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED})

# The task that owns the unit in progress. A task, not a flag: tasks started
# inside a unit inherit the context, and they are not nested in it.
_owner: ContextVar[asyncio.Task[Any] | None] = ContextVar("bastion_transaction_owner", default=None)
_session: ContextVar[AsyncSession | None] = ContextVar("bastion_transaction_session", default=None)

# Set by bastion.install at start-up. A module global rather than a contextvar:
# the lifespan task that sets it is not the parent of the request tasks.
_default_database: Database | None = None

# Cleanups that outlived a second cancellation of their unit; held here so the
# event loop's weak reference is not the only one until they finish.
_orphaned_cleanups: set[asyncio.Task[None]] = set()


class TransactionConflict(Conflict):
    """A unit of work conflicted with concurrent changes and was rolled back.

    Raised by :func:`transaction` on the first conflict and by
    :func:`run_transaction` once its attempts are spent. The HTTP layer answers
    it with ``409 CONFLICT``; the client may send the request again. The driver
    error is chained as ``__cause__``; neither the detail nor the attributes
    carry SQL or parameters.

    Raise it yourself inside :func:`run_transaction` to have the unit re-run,
    for example when an optimistic version check fails.

    Args:
        reason: ``serialization``, ``deadlock`` or ``busy``.
        detail: the message sent to the client.

    Attributes:
        reason: why the unit conflicted.
    """

    def __init__(self, reason: ConflictReason, detail: str | None = None) -> None:
        super().__init__(detail or "The request conflicted with concurrent changes; retry it.")
        self.reason: ConflictReason = reason


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """How :func:`run_transaction` re-runs a conflicting unit.

    The wait before re-run ``n`` (1-based) is drawn uniformly from
    ``[0, min(max_backoff, initial_backoff * 2 ** (n - 1))]`` ("full jitter"), so
    units that conflicted together do not collide again in step.

    Args:
        attempts: runs in all, the first included; at least 1.
        initial_backoff: upper bound of the first wait, in seconds.
        max_backoff: upper bound of any wait, in seconds.
        sleep: awaited with the chosen wait; tests pass one that does not sleep.

    Raises:
        ValueError: ``attempts`` is below 1 or the backoffs are out of order.
    """

    attempts: int = 3
    initial_backoff: float = 0.05
    max_backoff: float = 1.0
    sleep: Callable[[float], Awaitable[None]] = field(default=asyncio.sleep, repr=False)

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError("attempts must be at least 1 (the first run counts)")
        if not 0 <= self.initial_backoff <= self.max_backoff:
            raise ValueError("backoffs must satisfy 0 <= initial_backoff <= max_backoff")

    @classmethod
    def from_settings(cls, settings: DatabaseSettings) -> RetryPolicy:
        """Return the policy the ``database`` section describes.

        Args:
            settings: the ``database`` section.

        Returns:
            ``transaction_attempts``, ``retry_initial_backoff`` and ``retry_max_backoff``.
        """
        return cls(
            attempts=settings.transaction_attempts,
            initial_backoff=settings.retry_initial_backoff,
            max_backoff=settings.retry_max_backoff,
        )


def use_database(database: Database | None) -> None:
    """Set the database that transactions use when they are given none.

    ``bastion.install`` calls it at start-up with the shared database and with
    ``None`` at shutdown; call it yourself only outside an installed app.

    Args:
        database: the process default, or ``None`` to clear it.
    """
    global _default_database  # noqa: PLW0603 -- one process-wide default, set at start-up
    _default_database = database


def default_database() -> Database | None:
    """Return the database :func:`use_database` set, if any."""
    return _default_database


def _resolve(database: Database | None) -> Database:
    if database is not None:
        return database
    if _default_database is None:
        raise ConfigurationError(
            "no database for the transaction: pass database=..., or install bastion with "
            "the database enabled (bastion.install sets it at start-up), or call "
            "bastion.data.use_database(...)"
        )
    return _default_database


def conflict_reason(exc: BaseException) -> ConflictReason | None:
    """Return why the driver error ``exc`` is a conflict worth re-running for, else ``None``."""
    if not isinstance(exc, DBAPIError):
        return None
    original = exc.orig
    if isinstance(original, sqlite3.Error):
        code = getattr(original, "sqlite_errorcode", None)
        return "busy" if code is not None and code & 0xFF in _SQLITE_BUSY_CODES else None
    # SQLAlchemy's asyncpg adapter copies the SQLSTATE to .sqlstate (and .pgcode).
    sqlstate = getattr(original, "sqlstate", None)
    return _PG_REASONS.get(sqlstate) if isinstance(sqlstate, str) else None


@asynccontextmanager
async def transaction(
    isolation: IsolationLevel | None = None, *, database: Database | None = None
) -> AsyncIterator[AsyncSession]:
    """Run a block as one transaction: committed on success, rolled back on any exception.

    The session has its own connection from the pool, returned in every case,
    including when the task is cancelled (mid-statement too: the connection is
    then discarded and the server stops the statement). This form **does not
    retry**: an ``async with`` block cannot be re-run by its context manager, so a
    serialization failure, deadlock or SQLite busy error is raised as
    :class:`TransactionConflict`. Use :func:`run_transaction` to have the unit
    re-run.

    Units do not nest: opening one while the same task is inside another raises
    ``RuntimeError``. Pass the session down instead.

    On SQLite every unit is ``SERIALIZABLE`` (SQLite has no other level) and
    starts with ``BEGIN``, so its reads and writes see one snapshot.

    Args:
        isolation: the isolation level; ``None`` means ``database.isolation_level``
            from the settings, else the database's default.
        database: the database; ``None`` means the one ``bastion.install`` set up.

    Yields:
        An ``AsyncSession`` in the transaction. Do not commit it yourself.

    Raises:
        TransactionConflict: the unit conflicted with concurrent changes.
        ConfigurationError: no database was given or set up.
        RuntimeError: the task is already inside a unit.

    Example:
        >>> async with bastion.data.transaction("SERIALIZABLE") as session:
        ...     session.add(Document(title="Q3 report"))
    """
    db = _resolve(database)
    async with _unit(db, isolation) as session:
        yield session


async def run_transaction(
    fn: Callable[Concatenate[AsyncSession, ...], Awaitable[T]],
    /,
    *args: Any,
    isolation: IsolationLevel | None = None,
    attempts: int | None = None,
    database: Database | None = None,
    retry: RetryPolicy | None = None,
    **kwargs: Any,
) -> T:
    """Run ``await fn(session, *args, **kwargs)`` in a unit, re-running it whole on conflicts.

    Each attempt gets a fresh :func:`transaction`. A serialization failure
    (SQLSTATE 40001), a deadlock (40P01) or an SQLite busy error rolls the
    attempt back, waits (exponential backoff with full jitter) and runs ``fn``
    again, at most ``attempts`` times in all; each re-run is counted in
    ``bastion_db_transaction_retries_total`` and logged. Any other exception is
    raised unchanged after the rollback, never retried. ``fn`` may run more than
    once, so it must not have effects outside the database (send the e-mail
    after this returns, or through the outbox).

    Args:
        fn: the unit of work; it gets the session first.
        *args: passed to ``fn`` after the session.
        isolation: as for :func:`transaction`.
        attempts: runs in all, the first included; ``None`` means
            ``database.transaction_attempts`` (default 3), or the policy's.
        database: as for :func:`transaction`.
        retry: the backoff and attempts; ``None`` means the ``database`` settings.
        **kwargs: passed to ``fn``; these four names are taken (use ``functools.partial``).

    Returns:
        What ``fn`` returned on the attempt that committed.

    Raises:
        TransactionConflict: every attempt conflicted
            (counted in ``bastion_db_transaction_failures_total``).
        ConfigurationError: no database was given or set up.
        RuntimeError: the task is already inside a unit.
        ValueError: ``attempts`` is below 1.

    Example:
        >>> async def transfer(session: AsyncSession, source: int, target: int) -> None:
        ...     ...
        >>> await bastion.data.run_transaction(transfer, 1, 2, isolation="SERIALIZABLE")
    """
    db = _resolve(database)
    policy = retry or RetryPolicy.from_settings(db.settings)
    if attempts is not None:
        policy = replace(policy, attempts=attempts)
    name = getattr(fn, "__qualname__", type(fn).__name__)

    async def attempt() -> T:
        async with _unit(db, isolation, count_failure=False) as session:
            return await fn(session, *args, **kwargs)

    def before_sleep(state: RetryCallState) -> None:
        reason = _outcome_reason(state)
        DB_TRANSACTION_RETRIES.labels(reason).inc()
        logger.warning(
            "transaction retry",
            function=name,
            attempt=state.attempt_number,
            reason=reason,
            wait=round(state.upcoming_sleep, 4),
        )

    def give_up(state: RetryCallState) -> T:
        reason = _outcome_reason(state)
        DB_TRANSACTION_FAILURES.labels(reason).inc()
        logger.warning(
            "transaction conflict", function=name, attempts=state.attempt_number, reason=reason
        )
        assert state.outcome is not None  # noqa: S101 -- tenacity sets it before giving up
        return state.outcome.result()  # type: ignore[no-any-return]  # re-raises the conflict

    retrying = AsyncRetrying(
        stop=stop_after_attempt(policy.attempts),
        wait=wait_random_exponential(multiplier=policy.initial_backoff, max=policy.max_backoff),
        retry=retry_if_exception_type(TransactionConflict),
        before_sleep=before_sleep,
        retry_error_callback=give_up,
        sleep=policy.sleep,
    )
    return await retrying(attempt)


def current_session() -> AsyncSession | None:
    """Return the session of the unit of work this task is in, or ``None`` outside one.

    For code that must write in the caller's transaction without being handed its
    session (the audit trail in ``sync`` mode). Tasks started inside a unit inherit
    its context but are not part of it, so they get ``None``.
    """
    task = asyncio.current_task()
    if task is None or _owner.get() is not task:
        return None
    return _session.get()


def _outcome_reason(state: RetryCallState) -> ConflictReason:
    assert state.outcome is not None  # noqa: S101 -- tenacity calls back after an attempt
    exc = state.outcome.exception()
    assert isinstance(exc, TransactionConflict)  # noqa: S101 -- the retry predicate's type
    return exc.reason


@asynccontextmanager
async def _unit(
    db: Database, isolation: IsolationLevel | None, *, count_failure: bool = True
) -> AsyncIterator[AsyncSession]:
    task = asyncio.current_task()
    if task is not None and _owner.get() is task:
        raise RuntimeError(
            "a transaction is already active in this task: units do not nest (a re-run of "
            "the inner one alone would be wrong); pass its session down instead"
        )
    token = _owner.set(task)
    session = db.sessions()
    session_token = _session.set(session)
    try:
        await _begin(session, db, isolation or db.settings.isolation_level)
        yield session
        await session.commit()
    except BaseException as exc:
        await _release(session)
        reason = conflict_reason(exc)
        if reason is None:
            raise
        if count_failure:
            DB_TRANSACTION_FAILURES.labels(reason).inc()
        raise TransactionConflict(reason) from exc
    else:
        await _release(session)
    finally:
        _session.reset(session_token)
        _owner.reset(token)


async def _begin(session: AsyncSession, db: Database, isolation: IsolationLevel | None) -> None:
    if db.kind is BackendKind.SQLITE:
        connection = await session.connection()
        raw = await connection.get_raw_connection()
        # Python's sqlite3 (before 3.12's autocommit) defers BEGIN to the first
        # write, so reads would run outside the unit; BEGIN makes them part of it
        # and turns a lost race into SQLITE_BUSY_SNAPSHOT at once, not a stale write.
        if not raw.driver_connection.in_transaction:  # type: ignore[union-attr]  # aiosqlite
            await connection.exec_driver_sql("BEGIN")
    elif isolation is not None:
        # Set on the connection before its first statement; the pool resets it on return.
        _ = await session.connection(execution_options={"isolation_level": isolation})


async def _release(session: AsyncSession) -> None:
    # close() rolls back what is uncommitted and returns the connection. Shielded:
    # a second cancellation arriving during the rollback must not leave the
    # connection checked out; the cleanup then finishes on its own.
    cleanup = asyncio.ensure_future(_close_quietly(session))
    try:
        await asyncio.shield(cleanup)
    except asyncio.CancelledError:
        if not cleanup.done():
            _orphaned_cleanups.add(cleanup)
            cleanup.add_done_callback(_orphaned_cleanups.discard)
        raise


async def _close_quietly(session: AsyncSession) -> None:
    try:
        await session.close()
    except Exception as exc:  # noqa: BLE001 -- the unit's own outcome is what the caller needs
        # SQLAlchemy invalidates a connection whose rollback failed; report only the type,
        # the message may quote SQL.
        logger.warning("transaction rollback failed", error=type(exc).__name__)
