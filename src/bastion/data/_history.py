"""Migration history: ``bastion_migration_history``, a row per revision applied, reverted, accepted.

The table is shared by every tree of a database and told apart by the tree's
version table (the one name the plain ``alembic`` command knows too). It is
created by the runtime when missing, as Alembic creates its version table: it
must exist before bastion's own first revision runs, so it cannot be one.

A row is written by :class:`HistoryRecorder` from Alembic's
``on_version_apply`` callback, which runs after a revision's operations and
before its transaction ends: the row commits with the revision, and a revision
that fails leaves none.
"""

from __future__ import annotations

import getpass
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

from alembic.script import Script
from sqlalchemy import (
    Column,
    DateTime,
    Float,
    Integer,
    MetaData,
    String,
    Table,
    inspect,
    select,
)

from bastion.data._alembic_script import checksum

if TYPE_CHECKING:
    from alembic.runtime.migration import MigrationContext, MigrationInfo
    from sqlalchemy.engine import Connection, RowMapping

__all__ = [
    "HISTORY_TABLE",
    "HistoryDirection",
    "HistoryRecord",
    "HistoryRecorder",
    "applied_by",
    "ensure_history_table",
    "latest_checksums",
    "read_history",
    "record_accepted",
]

HISTORY_TABLE: Final = "bastion_migration_history"

HistoryDirection = Literal["upgrade", "downgrade", "accept"]
"""What a history row records: a revision applied, reverted, or its checksum accepted."""

_metadata = MetaData()
_history = Table(
    HISTORY_TABLE,
    _metadata,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("tree", String(64), nullable=False),
    Column("version_table", String(128), nullable=False),
    # Alembic's own version_num is VARCHAR(32); the extra room costs nothing.
    Column("revision", String(64), nullable=False),
    Column("direction", String(16), nullable=False),
    Column("checksum", String(64), nullable=False),
    Column("applied_at", DateTime(timezone=True), nullable=False),
    Column("duration_ms", Float, nullable=False),
    Column("applied_by", String(255), nullable=False),
    Column("tool", String(64), nullable=False),
    # No index: a row per revision run stays small enough to scan, and an index
    # would show up in hosts' schema comparisons that do not filter bastion_*.
)

# Directions whose checksum is the one `verify` compares with: what was run, or
# what somebody reviewed and accepted since.
_CHECKSUM_DIRECTIONS: Final = ("upgrade", "accept")


@dataclass(frozen=True, slots=True)
class HistoryRecord:
    """One row of the migration history.

    Attributes:
        id: the row's id; larger is newer.
        tree: the tree's name (``bastion``, ``app``).
        revision: the revision id.
        direction: ``upgrade``, ``downgrade`` or ``accept`` (a checksum accepted
            after review, see :meth:`bastion.data.Migrator.accept`).
        checksum: SHA-256 (hex) of the revision file at that moment, CRLF read as LF.
        applied_at: when, in UTC.
        duration_ms: how long the revision ran; 0 for ``accept``.
        applied_by: ``user@host pid N`` of the process.
        tool: what ran it: ``bastion migrate upgrade``, ``start-up (auto)``, ``alembic``...
    """

    id: int
    tree: str
    revision: str
    direction: HistoryDirection
    checksum: str
    applied_at: datetime
    duration_ms: float
    applied_by: str
    tool: str


def applied_by() -> str:
    """Return ``user@host pid N`` for this process, as history rows name it."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        # A container may run under a uid with no passwd entry.
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{socket.gethostname()} pid {os.getpid()}"


def ensure_history_table(connection: Connection) -> None:
    """Create the history table when it is missing."""
    _history.create(connection, checkfirst=True)


class HistoryRecorder:
    """Writes a history row for each revision Alembic applies, inside its transaction.

    Pass :meth:`on_version_apply` to ``context.configure``; call
    :meth:`begin_step` as each revision starts so its duration is exact (without
    it, a duration runs from the previous row, or from this object's creation).

    Args:
        tree: the tree's name, for people.
        version_table: the tree's version table, which identifies it.
        tool: what is running the revisions.
        create_table: create the history table first when missing (the plain
            ``alembic`` command; under the Migrator it exists already).
    """

    def __init__(
        self, *, tree: str, version_table: str, tool: str, create_table: bool = False
    ) -> None:
        self.tree = tree
        self.version_table = version_table
        self.tool = tool
        self.create_table = create_table
        self._applied_by = applied_by()
        self._started = time.perf_counter()

    def begin_step(self) -> None:
        """Note that a revision starts now."""
        self._started = time.perf_counter()

    def on_version_apply(
        self,
        *,
        ctx: MigrationContext,
        step: MigrationInfo,
        heads: set[str],
        run_args: dict[str, Any],
    ) -> None:
        """Alembic's callback: record ``step`` on the migration's own connection."""
        connection = ctx.connection
        # A stamp runs no revision code, and offline mode has no connection to write on.
        if step.is_stamp or ctx.as_sql or connection is None or step.up_revision_id is None:
            return
        duration_ms = round((time.perf_counter() - self._started) * 1000, 2)
        revision = step.revision_map.get_revision(step.up_revision_id)
        if not isinstance(revision, Script):  # pragma: no cover - a step is always a Script
            return
        if self.create_table:
            ensure_history_table(connection)
        connection.execute(
            _history.insert().values(
                tree=self.tree,
                version_table=self.version_table,
                revision=revision.revision,
                direction="upgrade" if step.is_upgrade else "downgrade",
                checksum=checksum(revision),
                applied_at=datetime.now(UTC),
                duration_ms=duration_ms,
                applied_by=self._applied_by,
                tool=self.tool[:64],
            )
        )
        self._started = time.perf_counter()


def record_accepted(
    connection: Connection,
    *,
    tree: str,
    version_table: str,
    revisions: list[Script],
    tool: str,
) -> list[HistoryRecord]:
    """Record the current checksum of ``revisions`` as reviewed; returns the rows written."""
    ensure_history_table(connection)
    now = datetime.now(UTC)
    by = applied_by()
    written: list[HistoryRecord] = []
    for revision in revisions:
        values = {
            "tree": tree,
            "version_table": version_table,
            "revision": revision.revision,
            "direction": "accept",
            "checksum": checksum(revision),
            "applied_at": now,
            "duration_ms": 0.0,
            "applied_by": by,
            "tool": tool[:64],
        }
        key = connection.execute(_history.insert().values(values)).inserted_primary_key
        written.append(_record({"id": key[0] if key else 0, **values}))
    return written


def read_history(
    connection: Connection, *, version_table: str | None = None, limit: int | None = 100
) -> list[HistoryRecord]:
    """Return history rows, newest first; empty when the table does not exist yet."""
    if not inspect(connection).has_table(HISTORY_TABLE):
        return []
    query = select(_history).order_by(_history.c.id.desc()).limit(limit)
    if version_table is not None:
        query = query.where(_history.c.version_table == version_table)
    return [_record(row) for row in connection.execute(query).mappings()]


def latest_checksums(connection: Connection, version_table: str) -> dict[str, HistoryRecord]:
    """Return, per revision of a tree, its newest ``upgrade`` or ``accept`` row."""
    if not inspect(connection).has_table(HISTORY_TABLE):
        return {}
    query = (
        select(_history)
        .where(
            _history.c.version_table == version_table,
            _history.c.direction.in_(_CHECKSUM_DIRECTIONS),
        )
        .order_by(_history.c.id)
    )
    # Oldest first, so each revision ends with its newest row.
    return {row["revision"]: _record(row) for row in connection.execute(query).mappings()}


def _record(row: RowMapping | dict[str, Any]) -> HistoryRecord:
    applied_at: datetime = row["applied_at"]
    if applied_at.tzinfo is None:
        # SQLite keeps no offset; every value written here was UTC.
        applied_at = applied_at.replace(tzinfo=UTC)
    return HistoryRecord(
        id=row["id"],
        tree=row["tree"],
        revision=row["revision"],
        direction=row["direction"],
        checksum=row["checksum"],
        applied_at=applied_at,
        duration_ms=row["duration_ms"],
        applied_by=row["applied_by"],
        tool=row["tool"],
    )
