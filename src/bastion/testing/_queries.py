"""Query counting for tests: how many statements a block of code sends to the database."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from bastion.data import Database

__all__ = ["QueryCounter", "count_queries"]

# Transaction control depends on the driver (asyncpg's BEGIN is no statement at
# all, SQLite's may be one), so counting it would make a count differ by database.
_TRANSACTION_CONTROL: Final = ("BEGIN", "COMMIT", "ROLLBACK", "SAVEPOINT", "RELEASE", "END")


@dataclass(slots=True)
class QueryCounter:
    """The statements seen while :func:`count_queries` was active.

    Attributes:
        statements: each statement's template (placeholders, never values), in order.
    """

    statements: list[str] = field(default_factory=list)

    @property
    def count(self) -> int:
        """How many statements were sent."""
        return len(self.statements)


@contextmanager
def count_queries(target: Database | AsyncEngine) -> Iterator[QueryCounter]:
    """Count the SQL statements sent through a database's engine inside the block.

    It counts each cursor execution the engine makes, from any task or thread
    (so run nothing else on the engine meanwhile): every ``SELECT``, ``INSERT``,
    ``UPDATE``, ``DELETE``, DDL and so on, one per ``executemany`` batch.
    Transaction control (``BEGIN``, ``COMMIT``, ``ROLLBACK``, ``SAVEPOINT``,
    ``RELEASE``) is left out because drivers differ in whether it is a
    statement, and neither are the pool's pre-ping nor connection set-up, which
    are not sent through the engine.

    Usable in sync and async tests alike.

    Example:
        >>> with count_queries(app.state.bastion.database) as queries:
        ...     response = await client.get("/v1/documents")
        >>> assert 3 == queries.count, queries.statements

    Args:
        target: a :class:`bastion.data.Database` or an ``AsyncEngine``.

    Yields:
        The counter, filled in as statements are sent; read it after the block.
    """
    engine = target if isinstance(target, AsyncEngine) else target.engine
    counter = QueryCounter()

    def record(_conn: Connection, _cursor: Any, statement: str, *_: Any) -> None:
        if not statement.lstrip().upper().startswith(_TRANSACTION_CONTROL):
            counter.statements.append(statement)

    sync_engine = engine.sync_engine
    event.listen(sync_engine, "before_cursor_execute", record)
    try:
        yield counter
    finally:
        event.remove(sync_engine, "before_cursor_execute", record)
