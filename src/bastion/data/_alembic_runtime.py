"""What runs against a connection: reading a tree's version, applying steps, rendering SQL.

Everything here is synchronous, as Alembic is; :class:`bastion.data.Migrator`
calls it through ``AsyncConnection.run_sync``. The history row of each
revision and the detection of destructive changes hook in here, because both
act on the migrating connection inside each revision's transaction.
"""

from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING

from alembic.runtime.environment import EnvironmentContext
from alembic.runtime.migration import MigrationContext
from sqlalchemy import event

if TYPE_CHECKING:
    from alembic.config import Config
    from alembic.runtime.migration import RevisionStep
    from alembic.script import ScriptDirectory
    from sqlalchemy.engine import URL, Connection

    from bastion.data._destructive import DestructiveGuard
    from bastion.data._history import HistoryRecorder

__all__ = [
    "Plan",
    "StepTracker",
    "current_heads",
    "render_sql",
    "run_online",
    "transactional_ddl",
]

Plan = Callable[[Sequence[str]], list["RevisionStep"]]
"""Given the heads the database is at, the steps to run, in order."""


def current_heads(connection: Connection, version_table: str) -> tuple[str, ...]:
    """Return the revisions the database records for a tree; empty before its first upgrade."""
    context = MigrationContext.configure(connection, opts={"version_table": version_table})
    return context.get_current_heads()


class StepTracker:
    """Follows Alembic through a plan: which step is running, and which have committed.

    Args:
        on_done: called with each step and its duration in milliseconds once the
            step's transaction has committed.
    """

    def __init__(self, on_done: Callable[[RevisionStep, float], None]) -> None:
        self._on_done = on_done
        self.running: RevisionStep | None = None

    def follow(self, steps: Iterable[RevisionStep]) -> Iterator[RevisionStep]:
        """Yield ``steps`` to Alembic, recording each as it starts and finishes."""
        for step in steps:
            self.running = step
            started = time.perf_counter()
            yield step
            # Alembic asks for the next step only after leaving the previous step's
            # transaction block, so reaching this line means the step committed.
            self.running = None
            self._on_done(step, round((time.perf_counter() - started) * 1000, 2))


@contextmanager
def transactional_ddl(connection: Connection) -> Iterator[bool | None]:
    """Make DDL on ``connection`` transactional where the database allows it.

    PostgreSQL needs nothing. SQLite supports transactional DDL, but Python's
    sqlite3 driver (under aiosqlite too) only opens a transaction before
    INSERT/UPDATE/DELETE, so a CREATE TABLE runs outside one and survives a
    failed migration. Per SQLAlchemy's documented recipe for pysqlite, the
    driver's own transaction handling is switched off and an explicit BEGIN is
    emitted whenever SQLAlchemy begins. The isolation level is restored when
    the connection returns to the pool.

    Yields:
        ``True`` when DDL was made transactional here, ``None`` when the dialect's
        own answer stands (PostgreSQL's is yes).
    """
    if connection.dialect.name != "sqlite":
        yield None
        return

    def begin(conn: Connection) -> None:
        conn.exec_driver_sql("BEGIN")

    connection.execution_options(isolation_level="AUTOCOMMIT")
    event.listen(connection, "begin", begin)
    try:
        yield True
    finally:
        event.remove(connection, "begin", begin)


def run_online(
    connection: Connection,
    config: Config,
    script: ScriptDirectory,
    plan: Plan,
    *,
    tracker: StepTracker,
    guard: DestructiveGuard,
    history: HistoryRecorder,
    destination: str,
) -> None:
    """Run a tree's ``env.py`` on ``connection``, applying the steps ``plan`` yields.

    Each step runs in its own transaction (``transaction_per_migration``) that
    also records the new version and the step's history row (``history``, which
    :func:`bastion.data.run_alembic_env` hands to Alembic), so a step that fails
    leaves neither its changes nor its version row nor a history row. ``guard``
    sees every operation and refuses undeclared destruction before it runs.
    """

    def steps(heads: Sequence[str], _context: MigrationContext) -> Iterator[RevisionStep]:
        for step in tracker.follow(plan(heads)):
            guard.begin_step(step)
            history.begin_step()
            yield step

    with transactional_ddl(connection) as transactional, guard.watching(connection):
        config.attributes["connection"] = connection
        config.attributes["transactional_ddl"] = transactional
        config.attributes["history"] = history
        with EnvironmentContext(config, script, fn=steps, destination_rev=destination):
            script.run_env()
        # Reading the version table opened a transaction; with nothing to apply it
        # may hold the version table's creation, which must be kept.
        if connection.in_transaction():
            connection.commit()


def render_sql(
    config: Config,
    script: ScriptDirectory,
    plan: Plan,
    *,
    url: URL,
    starting_rev: str | None,
    destination: str,
) -> str:
    """Run a tree's ``env.py`` in offline mode and return the SQL it would execute."""
    buffer = io.StringIO()
    config.output_buffer = buffer
    config.attributes["url"] = url

    def steps(heads: Sequence[str], _context: MigrationContext) -> list[RevisionStep]:
        return plan(heads)

    with EnvironmentContext(
        config,
        script,
        fn=steps,
        as_sql=True,
        starting_rev=starting_rev,
        destination_rev=destination,
    ):
        script.run_env()
    return buffer.getvalue()
