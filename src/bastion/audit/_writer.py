"""The audit writer: records events, appends them to their log's Merkle tree, group-commits.

Every entry goes through :meth:`AuditLog.append`, in one transaction per batch:
it locks the head row of each log the batch touches (in sorted order, so two
appenders never deadlock on heads), gives the entries the next sequence numbers,
hashes them, folds the leaf hashes into the log's compact range, and writes the
entries (one ``COPY`` on PostgreSQL, one ``executemany`` on SQLite), the completed
tiles and the new heads. The head
lock is what makes each log's appender single across processes: a second
appender waits for the first to commit and then continues from its head.

``audit.mode`` decides the durability of :meth:`AuditLog.record`:

- ``sync``: the entry is appended in the caller's session, so it commits (or
  rolls back) with the caller's change; without a session, in the unit of work
  the task is in (:func:`bastion.data.transaction`), else in its own transaction.
- ``async``: the entry joins a bounded buffer and :meth:`record` returns; one
  task per instance commits the buffer in batches (group commit), on a
  connection it holds for its life. With a session, the entry takes its place in
  the buffer at once but joins the queue only when that session commits, and
  gives the place back when it rolls back. The buffer
  counts events accepted but not committed, so a crash loses at most
  ``buffer_size`` events. A full buffer makes :meth:`record` wait (back-pressure,
  never a silent drop), and after ``enqueue_timeout`` raise
  :class:`AuditUnavailable`: the caller learns the event was not accepted. While
  the database is down the writer keeps its batch and retries with jittered
  backoff, logging once per outage. A batch the database refuses for what it
  holds (a value a column rejects) is split: each event is committed alone, and
  the one refused alone is dropped, counted and logged by its error type.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime as dt
import os
import random
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import Table, bindparam, event, insert, select, update
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.exc import DataError, DBAPIError, IntegrityError, StatementError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlalchemy.orm import Session, SessionTransaction

from bastion.audit._catalogue import ActionCatalogue
from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._event import AuditEvent
from bastion.audit._merkle import EMPTY_ROOT, TILE_LEVELS, CompactRange
from bastion.audit._prepare import EntryPreparer, PreparedEntry, log_id_for
from bastion.audit._subjects import NONCE_SIZE, SubjectKeys, seal_with
from bastion.audit._tables import entries, logs, nodes
from bastion.backends import BackendKind
from bastion.data import Database, run_transaction
from bastion.data._transaction import current_session
from bastion.errors import ServiceUnavailable
from bastion.observability.metrics import (
    AUDIT_BATCH_SIZE,
    AUDIT_BUFFERED,
    AUDIT_DROPPED,
    AUDIT_EVENTS,
    AUDIT_FLUSH_DURATION,
    AUDIT_FLUSH_FAILURES,
    AUDIT_RECORD_WAITS,
)
from bastion.settings import AuditSettings

__all__ = ["AuditLog", "AuditUnavailable"]

_ENTRY_COLUMNS: Final = (*ENCODED_COLUMNS, "leaf_hash")
_NODE_COLUMNS: Final = ("log_id", "level", "index", "hash")
_SEALED_FIELDS: Final = 3
"""email, ip and user_agent: the fields sealed with the subject's key, a nonce each."""
_RETRY_INITIAL: Final = 0.05
_RETRY_MAX: Final = 5.0
_COPY_MIN_ROWS: Final = 64
"""Below this many rows one multi-row INSERT is cheaper than COPY and its introspection query."""
_HEADS_KEPT: Final = 10_000
"""Logs whose expected head the writer keeps (one per tenant with ``partition = "tenant"``)."""
_STAGED: Final = "bastion_audit_staged"
_COMMITTED: Final = "bastion_audit_committed"
_DATA_SQLSTATES: Final = ("22", "23")
"""SQLSTATE classes of a statement refused for the values it holds: data and integrity errors."""

logger = structlog.get_logger("bastion.audit")


class AuditUnavailable(ServiceUnavailable):
    """The audit trail cannot accept the event now; it was **not** recorded (503).

    Raised by :meth:`AuditLog.record` in ``async`` mode when the buffer stayed full
    for ``audit.enqueue_timeout`` (the database is down or too slow), or after
    :meth:`AuditLog.stop`.
    """


def _report_crash(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        # A bug, not an outage (those are retried inside): say so loudly, since the
        # buffer now fills until record() raises AuditUnavailable.
        logger.error("audit writer task crashed", exc_info=task.exception())


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


class AuditLog:
    """The audit trail's recorder: validates events and appends them to their log.

    Args:
        settings: the ``audit`` section.
        database: the database of the audit tables.
        subject_keys: the keys personal fields are sealed with.
        catalogue: the actions that may be recorded; bastion's own when omitted.
        mask_keys: key fragments masked in ``details`` beyond ``audit.mask_keys``
            and the logs' own (pass ``logging.mask_keys``).
        clock: the current time, aware; ``occurred_at`` of events that give none.
        drain_timeout: seconds :meth:`stop` waits for the buffer to be committed.
        sleep: awaited between retries of a failed group commit.

    Example:
        >>> audit = AuditLog(settings.audit, database=db, subject_keys=keys)
        >>> await audit.start()
        >>> await audit.record(AuditEvent(action="tenant.update", tenant_id=tenant_id))
    """

    def __init__(
        self,
        settings: AuditSettings,
        *,
        database: Database,
        subject_keys: SubjectKeys,
        catalogue: ActionCatalogue | None = None,
        mask_keys: Sequence[str] = (),
        clock: Callable[[], dt.datetime] = _utcnow,
        drain_timeout: float = 10.0,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.settings = settings
        self.catalogue = catalogue if catalogue is not None else ActionCatalogue()
        self._database = database
        self._subject_keys = subject_keys
        self._clock = clock
        self._sleep = sleep
        self._drain_timeout = drain_timeout
        self._preparer = EntryPreparer(
            catalogue=self.catalogue,
            partition=settings.partition,
            details_max_bytes=settings.details_max_bytes,
            mask_keys=(*settings.mask_keys, *mask_keys),
            clock=clock,
        )
        self._postgres = database.kind is BackendKind.POSTGRES
        self._upsert: Any = postgresql_insert if self._postgres else sqlite_insert
        self._recorded = AUDIT_EVENTS.labels(settings.mode)
        # The async buffer. ``_held`` counts events accepted and not yet settled
        # (committed, or dropped as duplicates): the bound a crash can lose.
        self._pending: deque[PreparedEntry] = deque()
        self._held = 0
        self._staged = 0
        self._accepted = 0
        self._settled = 0
        self._flush_target = 0
        self._oldest = 0.0
        self._wake = asyncio.Event()
        self._full = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # The writer task's own connection, held between batches (no checkout, no
        # pre-ping, no reset per batch); dropped after a failure and opened again.
        self._connection: AsyncConnection | None = None
        # The heads the last built batch leaves, per log: where the next one starts.
        self._heads: dict[str, CompactRange] = {}
        self._heads_known = asyncio.Event()
        self._stopped = False
        self._failing: str | None = None

    def register_actions(self, actions: Mapping[str, str]) -> None:
        """Add an app's ``{action: description}`` to the catalogue (:class:`ActionCatalogue`)."""
        self.catalogue.register(actions)

    def log_id_for(self, tenant_id: uuid.UUID | None) -> str:
        """Return the log of a tenant's entries: ``global``, ``tenant/<id>`` or ``system``."""
        return log_id_for(self.settings.partition, tenant_id)

    async def record(self, event: AuditEvent, *, session: AsyncSession | None = None) -> uuid.UUID:
        """Record ``event``; fields it leaves ``None`` come from the current request.

        Pass the session of the change the event describes whenever there is one:
        in ``sync`` mode the entry is appended in it and commits or rolls back with
        the change; in ``async`` mode the entry takes a place in the buffer now and
        is queued for the group commit when the session commits (a rolled-back
        savepoint or transaction takes its entries with it). Without a session,
        ``sync`` mode appends in the unit of work this task is in, if any
        (:func:`bastion.data.transaction`), else in a transaction of its own;
        ``async`` mode queues the entry at once.

        Args:
            event: what happened.
            session: the caller's transaction, if any, on the audit tables' database.

        Returns:
            The entry's id.

        Raises:
            ValueError: the event is invalid (unknown action, bad outcome, naive
                time, details too big or not JSON); nothing was stored.
            AuditUnavailable: ``async`` mode, the buffer stayed full for
                ``audit.enqueue_timeout``, or the recorder is stopped; ``sync`` mode,
                the subject's stored key does not unwrap.
        """
        entry = self._preparer.prepare(event)
        if self.settings.mode == "sync":
            try:
                await self._append_now(entry, session)
            except InvalidTag:
                # The subject's stored key does not unwrap: audit.encryption_key was
                # changed, or the key row altered. Sealing under another key would make
                # the field unreadable for good; refusing keeps the change from
                # committing unrecorded, and says why (503, not a bare 500).
                logger.exception("audit subject key does not unwrap: recording refused")
                raise AuditUnavailable(
                    "The audit trail cannot record this event: a data subject's key does "
                    "not unwrap (was audit.encryption_key changed?)."
                ) from None
            self._recorded.inc()
            return entry.id
        await self._reserve()
        if session is None:
            self._queue([entry])
        else:
            await self._stage(session, entry)
        return entry.id

    def _ambient_session(self) -> AsyncSession | None:
        ambient = current_session()
        if ambient is None or ambient.bind is not self._database.engine:
            return None
        return ambient

    async def _stage(self, session: AsyncSession, entry: PreparedEntry) -> None:
        # The entry waits on the session's innermost transaction; its place in the
        # buffer is already taken, so the commit hook never waits nor refuses.
        try:
            if not session.in_transaction():
                _ = await session.connection()
        except BaseException:
            self._release(1)
            raise
        sync_session = session.sync_session
        info = sync_session.info
        staged: dict[SessionTransaction, list[tuple[AuditLog, PreparedEntry]]] | None
        staged = info.get(_STAGED)
        if staged is None:
            _listen_to_sessions()
            staged = info[_STAGED] = {}
            info[_COMMITTED] = set()
        transaction = sync_session.get_nested_transaction() or sync_session.get_transaction()
        assert transaction is not None  # noqa: S101 -- begun just above
        staged.setdefault(transaction, []).append((self, entry))
        self._staged += 1

    def _settle(self, rows: list[PreparedEntry], *, committed: bool) -> None:
        self._staged -= len(rows)
        if committed:
            self._queue(rows)
        else:
            self._release(len(rows))

    async def flush(self) -> None:
        """Return once every event accepted before the call is committed.

        Raises:
            AuditUnavailable: the writer was stopped with those events uncommitted.
        """
        target = self._accepted
        if self._settled >= target:
            return
        if self._task is None:
            raise AuditUnavailable(
                f"the audit writer is stopped; {target - self._settled} events were not committed"
            )
        self._flush_target = max(self._flush_target, target)
        self._wake.set()
        self._full.set()
        while self._settled < target:
            await self._progress.wait()

    async def start(self) -> None:
        """Start the group-commit task (``async`` mode; :meth:`record` starts it too)."""
        self._stopped = False
        if self.settings.mode == "async" and self._task is None:
            # An empty context: the task outlives the request that may start it.
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="bastion-audit-writer", context=contextvars.Context()
            )
            self._task.add_done_callback(_report_crash)

    async def stop(self) -> None:
        """Commit what is buffered (for at most ``drain_timeout``) and stop the task.

        Events still buffered when the drain times out are lost: their number is
        logged and counted in ``bastion_audit_dropped_events_total{reason="shutdown"}``.
        """
        self._stopped = True
        task = self._task
        if task is None:
            return
        try:
            async with asyncio.timeout(self._drain_timeout):
                await self.flush()
        except TimeoutError:
            # Entries still waiting on their sessions are counted when those settle.
            lost = self._held - self._staged
            AUDIT_DROPPED.labels("shutdown").inc(lost)
            logger.error(  # noqa: TRY400 -- the timeout's traceback says nothing useful
                "audit events lost at shutdown: the buffer did not drain", events=lost
            )
        finally:
            self._task = None
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            await self._drop_connection()

    async def health_check(self) -> None:
        """Raise :class:`AuditUnavailable` while group commits fail or the buffer is full.

        Register it with ``health.register("audit", audit.health_check)``.
        """
        if self._failing is not None:
            raise AuditUnavailable(f"audit writer cannot commit ({self._failing})")
        if self._held >= self.settings.buffer_size:
            raise AuditUnavailable("audit buffer is full")

    @property
    def buffered(self) -> int:
        """Events accepted and not yet committed (``async`` mode)."""
        return self._held

    async def _append_now(self, entry: PreparedEntry, session: AsyncSession | None) -> None:
        """``sync`` mode: append in ``session``, the ambient unit of work, or a transaction."""
        if session is None:
            session = self._ambient_session()
        if session is not None:
            await self.append(session, [entry])
        elif current_session() is not None:
            # In a unit of work on another database: units do not nest within a
            # task, so the entry's own transaction runs in one of its own.
            await asyncio.get_running_loop().create_task(
                run_transaction(self.append, [entry], database=self._database)
            )
        else:
            await run_transaction(self.append, [entry], database=self._database)

    async def append(
        self, session: AsyncSession, rows: Sequence[PreparedEntry]
    ) -> list[tuple[str, int]]:
        """Append prepared entries to their logs in ``session``'s transaction.

        Locks each log's head (sorted by log id; created when missing), assigns
        the next sequence numbers, seals personal fields with their subjects'
        keys, computes the leaf hashes, and writes entries, tiles and heads.
        ``rows`` are not changed, so a failed transaction can append them again.

        Args:
            session: the transaction; the caller commits it.
            rows: the entries, in the order they take within each log.

        Returns:
            ``(log_id, seq)`` of each row, in order.
        """
        if not rows:
            return []
        connection = await session.connection()
        subjects = {row.subject for row in rows if row.personal}
        ciphers = await self._subject_keys.ciphers_for(session, subjects) if subjects else {}
        now = self._clock()
        starts = {
            log_id: await self._lock_head(connection, log_id, now)
            for log_id in sorted({row.log_id for row in rows})
        }
        built = self._build(rows, starts, ciphers, now)
        await self._write(connection, built)
        return built.positions

    def _build(
        self,
        rows: Sequence[PreparedEntry],
        starts: Mapping[str, CompactRange],
        ciphers: Mapping[str, AESGCM],
        now: dt.datetime,
    ) -> _Built:
        # Everything but the I/O: seals, seqs, leaf hashes, tiles and new heads, from
        # each log's head at ``starts`` (left unchanged).
        by_log: dict[str, list[int]] = {}
        for position, row in enumerate(rows):
            by_log.setdefault(row.log_id, []).append(position)
        built = _Built(
            starts={log_id: (start.size, start.to_bytes()) for log_id, start in starts.items()},
            positions=[("", 0)] * len(rows),
        )
        random_bytes = os.urandom(NONCE_SIZE * _SEALED_FIELDS * len(rows))
        nonce = iter(
            [random_bytes[at : at + NONCE_SIZE] for at in range(0, len(random_bytes), NONCE_SIZE)]
        ).__next__
        records = built.records
        tiles = built.tiles
        positions = built.positions
        for log_id in sorted(by_log):
            compact = starts[log_id].copy()
            for position in by_log[log_id]:
                row = rows[position]
                seq = compact.size
                subject = row.subject
                cipher = ciphers.get(subject)
                if cipher is None:
                    email = ip = user_agent = None
                else:
                    email = seal_with(cipher, nonce(), subject, "email", row.email)
                    ip = seal_with(cipher, nonce(), subject, "ip", row.ip)
                    user_agent = seal_with(cipher, nonce(), subject, "user_agent", row.user_agent)
                record = (
                    log_id,
                    seq,
                    row.id,
                    row.occurred_at,
                    row.action,
                    row.outcome,
                    row.actor_type,
                    row.actor_id,
                    row.tenant_id,
                    row.resource_type,
                    row.resource_id,
                    row.request_id,
                    row.trace_id,
                    subject,
                    email,
                    ip,
                    user_agent,
                    row.details,
                )
                leaf = entry_leaf_hash(record)
                for node in compact.append(leaf):
                    if node.level % TILE_LEVELS == 0:
                        tiles.append((log_id, node.level, node.index, node.hash))
                records.append((*record, leaf))
                positions[position] = (log_id, seq)
            built.ends[log_id] = compact
            built.heads.append(
                {
                    "head": log_id,
                    "new_size": compact.size,
                    "new_root_hash": compact.root(),
                    "new_frontier": compact.to_bytes(),
                    "new_updated_at": now,
                }
            )
        return built

    async def _write(self, connection: AsyncConnection, built: _Built) -> None:
        await self._insert(connection, entries, _ENTRY_COLUMNS, built.records)
        if built.tiles:
            await self._insert(connection, nodes, _NODE_COLUMNS, built.tiles)
        await connection.execute(_UPDATE_HEAD, built.heads)

    async def _insert(
        self,
        connection: AsyncConnection,
        table: Table,
        columns: tuple[str, ...],
        records: Sequence[tuple[Any, ...]],
    ) -> None:
        if self._postgres and len(records) >= _COPY_MIN_ROWS:
            # COPY: about half the time of an executemany of INSERTs, measured with
            # 1000-row batches (SQLAlchemy's per-row parameter processing goes too).
            raw = await connection.get_raw_connection()
            driver: Any = raw.driver_connection
            try:
                await driver.copy_records_to_table(table.name, records=records, columns=columns)
            except Exception as exc:
                sqlstate = getattr(exc, "sqlstate", None)
                if not isinstance(sqlstate, str):
                    raise
                # Wrapped as SQLAlchemy wraps a statement's errors, so callers and
                # run_transaction (deadlocks by SQLSTATE) see what an INSERT would raise.
                error = IntegrityError if sqlstate.startswith("23") else DBAPIError
                raise error(f"COPY {table.name}", None, exc) from exc
        else:
            # OR FAIL: the guards' BEFORE INSERT triggers raise with FAIL, and a statement
            # that may only fail needs no statement journal (a third of SQLite's append time).
            statement = insert(table).prefix_with("OR FAIL", dialect="sqlite")
            await connection.execute(
                statement, [dict(zip(columns, record, strict=True)) for record in records]
            )

    async def _lock_head(
        self, connection: AsyncConnection, log_id: str, now: dt.datetime
    ) -> CompactRange:
        locked = select(logs.c.size, logs.c.frontier).where(logs.c.log_id == log_id)
        if self._postgres:
            # The head usually exists: one round trip. FOR UPDATE holds it to commit.
            locked = locked.with_for_update()
            head = (await connection.execute(locked)).first()
            if head is not None:
                return CompactRange.from_bytes(head.size, head.frontier)
        # SQLite: this write comes first to take the database's write lock before the
        # head is read (a read first could see a head another writer is replacing).
        await connection.execute(
            self._upsert(logs)
            .values(log_id=log_id, size=0, root_hash=EMPTY_ROOT, frontier=b"", updated_at=now)
            .on_conflict_do_nothing()
        )
        head = (await connection.execute(locked)).one()
        return CompactRange.from_bytes(head.size, head.frontier)

    async def _reserve(self) -> None:
        if self._stopped:
            raise AuditUnavailable("the audit trail is shutting down")
        if self._task is None:
            await self.start()
        if self._held >= self.settings.buffer_size:
            await self._wait_for_room()
        self._held += 1

    def _queue(self, rows: Sequence[PreparedEntry]) -> None:
        # The rows' places were reserved; synchronous, so a commit hook can call it.
        if self._task is None:
            # Committed by their session after stop(): nothing will write them now.
            self._lose("shutdown", len(rows))
            return
        self._accepted += len(rows)
        pending = self._pending
        if not pending:
            self._oldest = asyncio.get_running_loop().time()
        pending.extend(rows)
        if not self._wake.is_set():
            self._wake.set()
        if len(pending) >= self.settings.batch_size:
            self._full.set()

    def _release(self, count: int) -> None:
        self._held -= count
        AUDIT_BUFFERED.set(self._held)
        progress, self._progress = self._progress, asyncio.Event()
        progress.set()

    def _lose(self, reason: str, count: int) -> None:
        AUDIT_DROPPED.labels(reason).inc(count)
        logger.error("audit events lost", reason=reason, events=count)
        self._release(count)

    async def _wait_for_room(self) -> None:
        try:
            async with asyncio.timeout(self.settings.enqueue_timeout):
                while self._held >= self.settings.buffer_size:
                    await self._progress.wait()
        except TimeoutError:
            AUDIT_RECORD_WAITS.labels("rejected").inc()
            raise AuditUnavailable(
                "the audit trail cannot accept events now; the action was not recorded"
            ) from None
        AUDIT_RECORD_WAITS.labels("accepted").inc()

    async def _run(self) -> None:
        # A pipeline of two: while batch k's rows travel and commit, batch k+1 is
        # sealed and hashed from the heads k leaves (checked under the head locks,
        # rebuilt if another appender moved them), so the database's time and the
        # writer's CPU overlap instead of adding up.
        pending = self._pending
        batch_size = self.settings.batch_size
        loop = asyncio.get_running_loop()
        in_flight: asyncio.Task[None] | None = None
        in_flight_size = 0
        try:
            while True:
                if not pending:
                    if in_flight is not None:
                        await in_flight
                        in_flight = None
                        self._settle_batch(in_flight_size)
                        continue
                    self._wake.clear()
                    await self._wake.wait()
                # Group commit: a partial batch waits for company until its oldest event
                # is flush_interval old. Under load the previous commit took that long
                # already, so the next batch goes at once (waiting again halved throughput).
                remaining = self._oldest + self.settings.flush_interval - loop.time()
                if (
                    remaining > 0
                    and len(pending) < batch_size
                    and self._flush_target <= self._settled
                ):
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(remaining):
                            await self._full.wait()
                batch = [pending.popleft() for _ in range(min(batch_size, len(pending)))]
                if not batch:
                    continue
                if pending:
                    self._oldest = loop.time()
                built = self._speculate(batch)
                if in_flight is not None:
                    await in_flight
                    self._settle_batch(in_flight_size)
                self._heads_known.clear()
                in_flight = loop.create_task(self._commit(batch, built))
                in_flight_size = len(batch)
                # The next batch is built from the heads this one leaves.
                await self._heads_known.wait()
        finally:
            if in_flight is not None and not in_flight.done():
                in_flight.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await in_flight

    def _settle_batch(self, size: int) -> None:
        self._settled += size
        self._release(size)

    def _speculate(self, batch: list[PreparedEntry]) -> _Built | None:
        starts: dict[str, CompactRange] = {}
        for row in batch:
            if row.log_id not in starts:
                head = self._heads.get(row.log_id)
                if head is None:
                    return None
                starts[row.log_id] = head
        subjects = {row.subject for row in batch if row.personal}
        ciphers = self._subject_keys.cached_ciphers(subjects) if subjects else {}
        if ciphers is None:
            return None
        return self._build(batch, starts, ciphers, self._clock())

    async def _commit(self, batch: list[PreparedEntry], built: _Built | None) -> None:
        started = time.perf_counter()
        try:
            committed = await self._commit_or_split(batch, built)
        finally:
            self._heads_known.set()
        AUDIT_FLUSH_DURATION.observe(time.perf_counter() - started)
        AUDIT_BATCH_SIZE.observe(len(batch))
        self._recorded.inc(committed)

    async def _commit_or_split(self, batch: list[PreparedEntry], built: _Built | None) -> int:
        # Returns how many of the batch were committed; every other one was dropped,
        # counted and logged. Outages are waited out with the batch whole.
        failures = 0
        while batch:
            try:
                await self._append_batch(batch, built)
            except Exception as exc:  # noqa: BLE001 -- any failure keeps the batch for a retry
                if not _refused(exc):
                    failures += 1
                    await self._failed("unavailable", failures, len(batch), exc)
                    continue
                if isinstance(exc, IntegrityError):
                    kept = await self._without_duplicates(batch)
                    if len(kept) < len(batch):
                        batch = kept
                        built = None
                        continue
                self._recovered(failures)
                if len(batch) == 1:
                    self._reject(batch[0], exc)
                    return 0
                # Halves, in order: the refused event is found in about 2 log2(n)
                # transactions and the others commit in the order they came.
                middle = len(batch) // 2
                first = await self._commit_or_split(batch[:middle], None)
                return first + await self._commit_or_split(batch[middle:], None)
            else:
                self._recovered(failures)
                return len(batch)
        return 0

    async def _append_batch(self, batch: list[PreparedEntry], built: _Built | None) -> None:
        connection = self._connection
        if connection is None:
            connection = self._connection = await self._database.engine.connect()
        try:
            async with AsyncSession(bind=connection) as session, session.begin():
                # Through the session: its transaction is the one committed.
                in_transaction = await session.connection()
                now = self._clock()
                starts = {
                    log_id: await self._lock_head(in_transaction, log_id, now)
                    for log_id in sorted({row.log_id for row in batch})
                }
                if built is None or any(
                    built.starts.get(log_id) != (start.size, start.to_bytes())
                    for log_id, start in starts.items()
                ):
                    subjects = {row.subject for row in batch if row.personal}
                    ciphers = (
                        await self._subject_keys.ciphers_for(session, subjects) if subjects else {}
                    )
                    built = self._build(batch, starts, ciphers, now)
                if len(self._heads) >= _HEADS_KEPT:
                    self._heads.clear()
                self._heads.update(built.ends)
                self._heads_known.set()
                await self._write(in_transaction, built)
        except BaseException as exc:
            if not isinstance(exc, Exception) or not _refused(exc):
                # An outage or a cancellation mid-statement: a fresh connection is the safe retry.
                await self._drop_connection()
            raise

    async def _drop_connection(self) -> None:
        connection, self._connection = self._connection, None
        if connection is not None:
            with contextlib.suppress(Exception):
                await connection.invalidate()
                await connection.close()

    def _recovered(self, failures: int) -> None:
        if failures:
            self._failing = None
            logger.info("audit writer recovered", failed_attempts=failures)

    def _reject(self, entry: PreparedEntry, exc: BaseException) -> None:
        AUDIT_FLUSH_FAILURES.labels("rejected").inc()
        AUDIT_DROPPED.labels("rejected").inc()
        # The entry's id and action and the error's type and SQLSTATE: nothing it holds,
        # a driver message may quote the values.
        logger.error(
            "audit event refused by the database; dropped",
            entry_id=str(entry.id),
            action=entry.action,
            error=type(exc).__name__,
            sqlstate=_sqlstate(exc),
        )

    async def _failed(self, reason: str, failures: int, events: int, exc: BaseException) -> None:
        AUDIT_FLUSH_FAILURES.labels(reason).inc()
        error = type(exc).__name__
        if failures == 1:
            # Once per outage; the type only, a driver message may quote values.
            logger.error("audit writer cannot commit; retrying", error=error, events=events)
        self._failing = error
        backoff = min(_RETRY_MAX, _RETRY_INITIAL * 2 ** min(failures, 16))
        await self._sleep(random.uniform(0, backoff))  # noqa: S311 -- jitter, not secrecy

    async def _without_duplicates(self, batch: list[PreparedEntry]) -> list[PreparedEntry]:
        # An id already stored: an app reused an event id, or the previous attempt
        # committed and only its acknowledgement was lost. Either way the stored one
        # stands and the other is dropped; ids repeated within the batch likewise.
        ids = [entry.id for entry in batch]
        try:
            async with self._database.session() as session:
                found = await session.execute(select(entries.c.id).where(entries.c.id.in_(ids)))
                stored = set(found.scalars())
        except Exception:  # noqa: BLE001 -- unknown: the batch stays whole and is retried
            return batch
        kept: list[PreparedEntry] = []
        seen: set[uuid.UUID] = set()
        for entry in batch:
            if entry.id in stored or entry.id in seen:
                continue
            seen.add(entry.id)
            kept.append(entry)
        duplicates = len(batch) - len(kept)
        if duplicates:
            AUDIT_DROPPED.labels("duplicate").inc(duplicates)
            logger.warning(
                "audit events with an id already recorded were dropped", events=duplicates
            )
        return kept


@dataclass(slots=True)
class _Built:
    """A batch ready to write: its rows, tiles and heads, from the heads it started at."""

    starts: dict[str, tuple[int, bytes]]
    positions: list[tuple[str, int]]
    records: list[tuple[Any, ...]] = field(default_factory=list)
    tiles: list[tuple[str, int, int, bytes]] = field(default_factory=list)
    heads: list[dict[str, Any]] = field(default_factory=list)
    ends: dict[str, CompactRange] = field(default_factory=dict)


_UPDATE_HEAD: Final = (
    update(logs)
    .where(logs.c.log_id == bindparam("head"))
    .values(
        size=bindparam("new_size"),
        root_hash=bindparam("new_root_hash"),
        frontier=bindparam("new_frontier"),
        updated_at=bindparam("new_updated_at"),
    )
)


_listening = False


def _listen_to_sessions() -> None:
    """Watch every session's commits, once per process, from the first staged entry on.

    On the ``Session`` class rather than on each session: listening on an instance
    copies its event dispatch, about 30 µs a request (measured); the hooks cost a
    session that staged nothing one dictionary lookup.
    """
    global _listening  # noqa: PLW0603 -- one registration per process
    if not _listening:
        event.listen(Session, "after_commit", _mark_committed)
        event.listen(Session, "after_transaction_end", _settle_staged)
        _listening = True


def _mark_committed(session: Session) -> None:
    committed: set[SessionTransaction] | None = session.info.get(_COMMITTED)
    if committed is None:
        return
    # after_commit names no transaction: the one committing is still the innermost.
    transaction = session.get_nested_transaction() or session.get_transaction()
    if transaction is not None:
        committed.add(transaction)


def _settle_staged(session: Session, transaction: SessionTransaction) -> None:
    staged: dict[SessionTransaction, list[tuple[AuditLog, PreparedEntry]]] | None
    staged = session.info.get(_STAGED)
    if staged is None:
        return
    committed: set[SessionTransaction] = session.info[_COMMITTED]
    was_committed = transaction in committed
    committed.discard(transaction)
    rows = staged.pop(transaction, [])
    parent = transaction.parent
    if was_committed and parent is not None:
        # A released savepoint: its entries now live or die with the enclosing transaction.
        staged.setdefault(parent, []).extend(rows)
        return
    if parent is None:
        # The outermost transaction is over: nothing still staged can commit any more.
        for left in staged.values():
            _settle_rows(left, committed=False)
        staged.clear()
        committed.clear()
    _settle_rows(rows, committed=was_committed)


def _settle_rows(rows: list[tuple[AuditLog, PreparedEntry]], *, committed: bool) -> None:
    by_log: dict[AuditLog, list[PreparedEntry]] = {}
    for log, row in rows:
        by_log.setdefault(log, []).append(row)
    for log, entries_of_log in by_log.items():
        log._settle(entries_of_log, committed=committed)


def _sqlstate(exc: BaseException) -> str | None:
    # SQLAlchemy's asyncpg adapter copies the SQLSTATE to .sqlstate; COPY's errors carry it too.
    for candidate in (getattr(exc, "orig", None), exc.__cause__, exc):
        sqlstate = getattr(candidate, "sqlstate", None)
        if isinstance(sqlstate, str):
            return sqlstate
    return None


def _refused(exc: Exception) -> bool:
    """Whether the database refused the batch for the values it holds, not for an outage."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return False
    if isinstance(exc, IntegrityError | DataError):
        return True
    sqlstate = _sqlstate(exc)
    if sqlstate is not None:
        return sqlstate[:2] in _DATA_SQLSTATES
    # A value no driver or encoding takes (asyncpg's DataError is a ValueError; a
    # StatementError carries the bind processor's TypeError).
    original = getattr(exc, "orig", None) if isinstance(exc, StatementError) else exc
    return isinstance(original, ValueError | TypeError)
