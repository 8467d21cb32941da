"""Retention: expired entries archived as sealed segments, then pruned through the maintenance path.

One run of :func:`prune`, for each log with expired entries:

1. a checkpoint of the log's head is made now (:meth:`Checkpointer.checkpoint`);
   it covers every expired entry, since they are all below the head;
2. the expired entries (age past ``retention_days[class]``, the class being the
   action's first dotted segment, else ``default``) are read in batches, each
   one's leaf re-derived from its columns and its inclusion proof checked
   against that checkpoint (a tampered entry stops the run: pruning it would
   destroy the evidence), and written to ONE segment file, atomically (temporary
   file, fsync, rename);
3. in one transaction of the maintenance role: the segment's row (file name and
   SHA-256) into ``bastion_audit_segments``, each entry's ``(log_id, seq,
   leaf_hash, segment_id)`` into ``bastion_audit_pruned``, and the entries
   deleted, the guards letting them through (:func:`enter_prune_path`);
4. after every log: one ``audit.prune`` event (actor ``system``) per segment,
   whose details name it: ``log_id``, ``segment_id``, ``first_seq``,
   ``last_seq``, ``entry_count``, ``tree_size`` and ``archive_sha256`` (hex);
   then a new checkpoint of each pruned log, and of the log holding the events,
   and the consistency proof from the segment's checkpoint to it: the remaining
   log continues the archived one (both returned in the report).

The tree survives: proofs and ``bastion audit verify`` read a pruned position's
leaf from ``bastion_audit_pruned``; verify counts it only when a segment row
covers it and an ``audit.prune`` entry proven in a signed checkpoint names that
segment with the same range and SHA-256 (the database alone cannot forge a
deletion). ``audit.prune`` entries themselves never expire. A crash before step 3 commits leaves an
orphan segment file and deletes nothing; the next run archives the entries again.

A segment file is JSON lines (gzip-compressed when it ends in ``.gz``): a
header, then one line per entry in ``seq`` order::

    {"format": "bastion-audit-segment/1", "segment_id": "…", "log_id": "global",
     "created_at": "…+00:00", "tree_size": 5000, "entry_count": 1200,
     "first_seq": 0, "last_seq": 1199, "checkpoint": "<signed note>"}
    {"entry": {<entry_to_json>}, "leaf_index": 0, "inclusion_proof": ["<base64>", …]}

:func:`verify_segment` checks one offline with the verifier keys alone.
"""

from __future__ import annotations

import base64
import datetime as dt
import gzip
import hashlib
import json
import os
import tempfile
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Final

import structlog
from sqlalchemy import ColumnElement, and_, delete, false, func, insert, not_, or_, select
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from bastion.audit._bundle import entry_from_json, entry_to_json
from bastion.audit._checkpoint import Checkpoint, Checkpointer, CheckpointError, parse_checkpoint
from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._event import Actor, AuditEvent
from bastion.audit._guards import enter_prune_path, leave_prune_path
from bastion.audit._note import NoteVerifier
from bastion.audit._proof import ProofError, inclusion_proof_ranges, verify_inclusion
from bastion.audit._tables import entries, pruned, segments
from bastion.audit._tree import TreeReader
from bastion.audit._verify import PRUNE_ACTION
from bastion.audit._writer import AuditLog
from bastion.data import Database
from bastion.errors import Forbidden

__all__ = [
    "DEFAULT_PRUNE_BATCH",
    "SEGMENT_FORMAT",
    "PruneRefused",
    "PruneReport",
    "SegmentRecord",
    "SegmentReport",
    "prune",
    "verify_segment",
]

SEGMENT_FORMAT: Final = "bastion-audit-segment/1"
"""The ``format`` member of a segment's header; a new layout gets a new version."""
DEFAULT_PRUNE_BATCH: Final = 1000
"""Entries read, proven and deleted per statement."""

logger = structlog.get_logger("bastion.audit")

_COLUMNS: Final = [entries.c[name] for name in ENCODED_COLUMNS] + [entries.c.leaf_hash]


class PruneRefused(Forbidden):
    """The database refused to delete: the maintenance path is not set up, or an entry is tampered.

    Nothing was deleted from the log named in the message.
    """


@dataclass(frozen=True, slots=True)
class SegmentRecord:
    """One log's archive of one prune run.

    Attributes:
        log_id: the log.
        segment_id: the row of ``bastion_audit_segments``.
        path: the sealed file.
        sha256: the file's SHA-256, as recorded.
        entry_count: entries archived and pruned.
        first_seq: the lowest position archived.
        last_seq: the highest position archived.
        checkpoint: the signed checkpoint every entry of the file is proven against.
        continuation: the checkpoint made after pruning.
        consistency_proof: RFC 9162 proof that ``continuation``'s tree extends
            ``checkpoint``'s (empty when the size did not change).
    """

    log_id: str
    segment_id: uuid.UUID
    path: Path
    sha256: bytes
    entry_count: int
    first_seq: int
    last_seq: int
    checkpoint: Checkpoint
    continuation: Checkpoint
    consistency_proof: list[bytes]


@dataclass(slots=True)
class PruneReport:
    """What a prune run did.

    Attributes:
        segments: one per log that had expired entries.
        event_ids: the ``audit.prune`` entries recorded, one per segment.
    """

    segments: list[SegmentRecord] = field(default_factory=list)
    event_ids: list[uuid.UUID] = field(default_factory=list)

    @property
    def entries(self) -> int:
        """Entries pruned, over every log."""
        return sum(segment.entry_count for segment in self.segments)


@dataclass(slots=True)
class SegmentReport:
    """What :func:`verify_segment` found.

    Attributes:
        log_id: the log the header names (empty when it is unreadable).
        entries: entry lines checked.
        checkpoint: the header's checkpoint, when it verified.
        problems: one sentence per fault, with its line number (1 is the header).
    """

    log_id: str = ""
    entries: int = 0
    checkpoint: Checkpoint | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when the segment verified and nothing was found wrong."""
        return self.checkpoint is not None and not self.problems


async def prune(
    *,
    database: Database,
    maintenance_database: Database,
    audit: AuditLog,
    checkpointer: Checkpointer,
    retention_days: Mapping[str, int],
    archive_directory: str | os.PathLike[str],
    now: dt.datetime,
    log_id: str | None = None,
    compress: bool = True,
    batch_size: int = DEFAULT_PRUNE_BATCH,
    progress: Callable[[int, int], None] | None = None,
) -> PruneReport:
    """Archive every entry past its retention as a sealed segment, then prune it.

    Args:
        database: the audit tables, as the application role (reads, checkpoints).
        maintenance_database: the same database as a direct member of
            ``bastion_audit_maintenance`` (``audit.maintenance_url``); on SQLite
            the application's own database will do.
        audit: the recorder of the ``audit.prune`` event.
        checkpointer: signs the checkpoints the segments are proven against.
        retention_days: days by action class (``audit.retention_days``);
            ``default`` covers the classes it does not name.
        archive_directory: where segments are written (``audit.archive_directory``),
            one folder per log.
        now: the current time, aware; entries older than ``now - days`` expire.
        log_id: prune this log only.
        compress: gzip the segment files (``.jsonl.gz``).
        batch_size: entries per read and per delete statement.
        progress: called with ``(entries done, entries in total)``.

    Returns:
        The segments written and the ``audit.prune`` event's id.

    Raises:
        PruneRefused: the database refused the deletion (no maintenance role,
            missing grant) or an expired entry does not match the checkpoint;
            that log's transaction is rolled back, earlier logs stay pruned.
        ValueError: ``now`` is naive or ``batch_size`` is not positive.

    Example:
        >>> report = await prune(  # doctest: +SKIP
        ...     database=db, maintenance_database=maintenance, audit=audit,
        ...     checkpointer=checkpointer, retention_days=settings.audit.retention_days,
        ...     archive_directory="/var/lib/bastion/audit-archive", now=datetime.now(UTC))
    """
    if now.tzinfo is None:
        raise ValueError("now must be an aware datetime")
    if batch_size < 1:
        raise ValueError("batch_size must be positive")
    expired = _expired(retention_days, now)
    plans = await _plans(database, expired, log_id)
    total = sum(count for _, count in plans)
    report = PruneReport()
    done = 0
    archived: list[_Archived] = []
    try:
        for current, _ in plans:
            segment = await _prune_log(
                database,
                maintenance_database,
                checkpointer,
                current,
                expired=expired,
                root=Path(archive_directory),
                now=now,
                compress=compress,
                batch_size=batch_size,
            )
            if segment is None:
                continue
            done += len(segment.seqs)
            if progress is not None:
                progress(done, total)
            archived.append(segment)
    finally:
        # Logs pruned before a failure are recorded too (outcome "failure": the run
        # stopped); until its event is in a signed checkpoint, verify reports a
        # segment's positions as missing.
        for segment in archived:
            report.event_ids.append(
                await audit.record(
                    AuditEvent(
                        action=PRUNE_ACTION,
                        outcome="success" if len(archived) == len(plans) else "failure",
                        actor=Actor.system("retention"),
                        details=_prune_details(segment),
                    )
                )
            )
    if not archived:
        return report
    await audit.flush()
    events_log = audit.log_id_for(None)
    if events_log not in {segment.log_id for segment in archived}:
        await checkpointer.checkpoint(events_log)
    for segment in archived:
        continuation = await checkpointer.checkpoint(segment.log_id) or segment.checkpoint
        proof = await _consistency(database, segment.log_id, segment.checkpoint, continuation)
        report.segments.append(
            SegmentRecord(
                log_id=segment.log_id,
                segment_id=segment.segment_id,
                path=segment.path,
                sha256=segment.sha256,
                entry_count=len(segment.seqs),
                first_seq=segment.seqs[0][0],
                last_seq=segment.seqs[-1][0],
                checkpoint=segment.checkpoint,
                continuation=continuation,
                consistency_proof=proof,
            )
        )
    return report


async def _prune_log(
    database: Database,
    maintenance_database: Database,
    checkpointer: Checkpointer,
    log_id: str,
    *,
    expired: ColumnElement[bool],
    root: Path,
    now: dt.datetime,
    compress: bool,
    batch_size: int,
) -> _Archived | None:
    """Checkpoint, archive and prune one log; ``None`` when it has nothing to prune."""
    checkpoint = await checkpointer.checkpoint(log_id)
    if checkpoint is None:
        return None
    segment = await _archive(
        database,
        log_id,
        expired,
        checkpoint,
        root,
        now=now,
        compress=compress,
        batch_size=batch_size,
    )
    if segment is None:
        return None
    await _delete(maintenance_database, segment, root=root, now=now, batch_size=batch_size)
    logger.info(
        "audit_pruned", log_id=log_id, entries=len(segment.seqs), segment_id=str(segment.segment_id)
    )
    return segment


@dataclass(frozen=True, slots=True)
class _Archived:
    """A segment file written, its entries not yet deleted."""

    log_id: str
    segment_id: uuid.UUID
    path: Path
    sha256: bytes
    checkpoint: Checkpoint
    seqs: list[tuple[int, bytes]]
    """Each entry's position and stored leaf hash, in order."""


def _prune_details(segment: _Archived) -> dict[str, Any]:
    """What the ``audit.prune`` entry of a segment records: all verify needs to trust it."""
    return {
        "log_id": segment.log_id,
        "segment_id": str(segment.segment_id),
        "first_seq": segment.seqs[0][0],
        "last_seq": segment.seqs[-1][0],
        "entry_count": len(segment.seqs),
        "tree_size": segment.checkpoint.size,
        "archive_sha256": segment.sha256.hex(),
    }


def _expired(retention_days: Mapping[str, int], now: dt.datetime) -> ColumnElement[bool]:
    """The condition of an entry past its class's retention."""
    named = {name: days for name, days in retention_days.items() if name != "default"}

    def in_class(name: str) -> ColumnElement[bool]:
        # A range on the action, not LIKE: no escaping, and it uses the action index.
        return or_(
            entries.c.action == name,
            and_(entries.c.action >= f"{name}.", entries.c.action < f"{name}/"),
        )

    clauses = [
        and_(in_class(name), entries.c.occurred_at < now - dt.timedelta(days=days))
        for name, days in named.items()
    ]
    if "default" in retention_days:
        cutoff = now - dt.timedelta(days=retention_days["default"])
        others = not_(or_(*(in_class(name) for name in named))) if named else None
        clauses.append(and_(entries.c.occurred_at < cutoff, *(() if others is None else (others,))))
    # The record of each prune must outlive it: verify trusts pruned positions through it.
    return and_(entries.c.action != PRUNE_ACTION, or_(*clauses)) if clauses else false()


async def _plans(
    database: Database, expired: ColumnElement[bool], log_id: str | None
) -> list[tuple[str, int]]:
    """Each log with expired entries and how many, in log order."""
    query = (
        select(entries.c.log_id, func.count())
        .where(expired)
        .group_by(entries.c.log_id)
        .order_by(entries.c.log_id)
    )
    if log_id is not None:
        query = query.where(entries.c.log_id == log_id)
    async with database.engine.connect() as connection:
        return [(row[0], row[1]) for row in await connection.execute(query)]


async def _archive(
    database: Database,
    log_id: str,
    expired: ColumnElement[bool],
    checkpoint: Checkpoint,
    root: Path,
    *,
    now: dt.datetime,
    compress: bool,
    batch_size: int,
) -> _Archived | None:
    """Write the log's expired entries below the checkpoint's size to a sealed segment file.

    ``None`` when no expired entry is below the checkpoint.
    """
    condition = and_(entries.c.log_id == log_id, entries.c.seq < checkpoint.size, expired)
    async with database.engine.connect() as connection:
        count, first, last = (
            await connection.execute(
                select(func.count(), func.min(entries.c.seq), func.max(entries.c.seq)).where(
                    condition
                )
            )
        ).one()
        if not count:
            return None
        segment_id = uuid.uuid4()
        header = {
            "format": SEGMENT_FORMAT,
            "segment_id": str(segment_id),
            "log_id": log_id,
            "created_at": now.astimezone(dt.UTC).isoformat(timespec="microseconds"),
            "tree_size": checkpoint.size,
            "entry_count": count,
            "first_seq": first,
            "last_seq": last,
            "checkpoint": checkpoint.note,
        }
        suffix = ".jsonl.gz" if compress else ".jsonl"
        path = root / log_id.replace("/", "_") / f"{first:020d}-{segment_id}{suffix}"
        seqs: list[tuple[int, bytes]] = []
        with _SealedFile(path, compress=compress) as sink:
            sink.write_line(header)
            async for line, seq, leaf in _entry_lines(
                connection, log_id, condition, checkpoint, batch_size
            ):
                sink.write_line(line)
                seqs.append((seq, leaf))
        # Entries below a checkpoint never change; a concurrent prune run deletes them.
        if len(seqs) != count:
            path.unlink(missing_ok=True)
            raise PruneRefused(f"log {log_id!r} changed while it was archived; nothing was pruned")
    return _Archived(log_id, segment_id, path, sink.sha256, checkpoint, seqs)


async def _entry_lines(
    connection: AsyncConnection,
    log_id: str,
    condition: ColumnElement[bool],
    checkpoint: Checkpoint,
    batch_size: int,
) -> AsyncIterator[tuple[dict[str, Any], int, bytes]]:
    """Each expired entry's line, proven against ``checkpoint``, with its seq and stored leaf."""
    reader = TreeReader(connection, log_id)
    after = -1
    while True:
        rows = (
            await connection.execute(
                select(*_COLUMNS)
                .where(condition, entries.c.seq > after)
                .order_by(entries.c.seq)
                .limit(batch_size)
            )
        ).all()
        if not rows:
            return
        spans = [inclusion_proof_ranges(row.seq, checkpoint.size) for row in rows]
        # Neighbouring entries share most of their proofs: each range is read once.
        wanted = sorted({span for ranges in spans for span in ranges})
        hashes = dict(zip(wanted, await reader.range_hashes(wanted), strict=True))
        for row, ranges in zip(rows, spans, strict=True):
            leaf = entry_leaf_hash(row[: len(ENCODED_COLUMNS)])
            proof = [hashes[span] for span in ranges]
            _check_entry(log_id, row, leaf, proof, checkpoint)
            line = {
                "entry": entry_to_json(row),
                "leaf_index": row.seq,
                "inclusion_proof": [base64.b64encode(node).decode() for node in proof],
            }
            yield line, row.seq, row.leaf_hash
        after = rows[-1].seq


def _check_entry(
    log_id: str, row: Any, leaf: bytes, proof: list[bytes], checkpoint: Checkpoint
) -> None:
    """Refuse to archive an entry its checkpoint does not include: it was tampered with."""
    try:
        if leaf != row.leaf_hash:
            raise ProofError("its columns do not hash to its stored leaf")  # noqa: TRY301 -- one message for both faults
        verify_inclusion(leaf, row.seq, checkpoint.size, proof, checkpoint.root_hash)
    except ProofError as exc:
        raise PruneRefused(
            f"entry {log_id}/{row.seq} does not match the log's checkpoint ({exc}); "
            "run bastion audit verify; nothing of this log was pruned"
        ) from exc


class _SealedFile:
    """A file written whole or not at all: a temporary beside it, fsynced, then renamed."""

    def __init__(self, path: Path, *, compress: bool) -> None:
        self.path = path
        self._compress = compress
        self.sha256 = b""

    def __enter__(self) -> _SealedFile:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.path.parent, prefix=".segment-", suffix=".tmp")
        self._temporary = Path(name)
        self._raw = os.fdopen(handle, "wb")
        # mtime=0: the same entries give the same bytes, hence the same SHA-256. Level 6:
        # level 9 took a quarter of a run for a few percent smaller files.
        self._out: gzip.GzipFile | IO[bytes] = (
            gzip.GzipFile(fileobj=self._raw, mode="wb", mtime=0, compresslevel=6)
            if self._compress
            else self._raw
        )
        return self

    def write_line(self, value: Mapping[str, Any]) -> None:
        self._out.write(json.dumps(value, separators=(",", ":"), sort_keys=True).encode() + b"\n")

    def __exit__(self, kind: object, error: object, traceback: object) -> None:
        try:
            if self._compress:
                self._out.close()
            self._raw.flush()
            if error is None:
                os.fsync(self._raw.fileno())
        finally:
            self._raw.close()
        if error is not None:
            self._temporary.unlink(missing_ok=True)
            return
        self.sha256 = hashlib.sha256(self._temporary.read_bytes()).digest()
        self._temporary.chmod(0o644)
        self._temporary.replace(self.path)
        directory = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)


async def _delete(
    database: Database, segment: _Archived, *, root: Path, now: dt.datetime, batch_size: int
) -> None:
    """Record the segment and the pruned leaves, and delete the entries, in one transaction."""
    log_id, segment_id, seqs = segment.log_id, segment.segment_id, segment.seqs
    try:
        async with database.engine.begin() as connection:
            await enter_prune_path(connection, log_id)
            await connection.execute(
                insert(segments).values(
                    id=segment_id,
                    log_id=log_id,
                    entry_count=len(seqs),
                    first_seq=seqs[0][0],
                    last_seq=seqs[-1][0],
                    tree_size=segment.checkpoint.size,
                    archive_name=str(segment.path.relative_to(root)),
                    archive_sha256=segment.sha256,
                    created_at=now,
                )
            )
            for batch in _batches(seqs, batch_size):
                await connection.execute(
                    insert(pruned),
                    [
                        {"log_id": log_id, "seq": seq, "leaf_hash": leaf, "segment_id": segment_id}
                        for seq, leaf in batch
                    ],
                )
                await connection.execute(
                    delete(entries).where(
                        entries.c.log_id == log_id, entries.c.seq.in_([seq for seq, _ in batch])
                    )
                )
            await leave_prune_path(connection, log_id)
    except DBAPIError as exc:
        # The code, not the message: a unique violation's message quotes the row.
        code = getattr(exc.orig, "sqlstate", None) or type(exc.orig).__name__
        raise PruneRefused(
            f"the database refused to prune log {log_id!r} ({code}): prune runs as a member "
            "of bastion_audit_maintenance (audit.maintenance_url), one run at a time; "
            "nothing of this log was pruned"
        ) from exc


def _batches(
    items: Sequence[tuple[int, bytes]], size: int
) -> Iterator[Sequence[tuple[int, bytes]]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


async def _consistency(
    database: Database, log_id: str, first: Checkpoint, second: Checkpoint
) -> list[bytes]:
    if first.size == second.size:
        return []
    async with database.engine.connect() as connection:
        return await TreeReader(connection, log_id).consistency_proof(first.size, second.size)


def verify_segment(
    path: str | os.PathLike[str],
    verifiers: Sequence[NoteVerifier],
    *,
    sha256: bytes | None = None,
    origin_prefix: str | None = None,
) -> SegmentReport:
    """Check a segment file offline: its checkpoint's signature and every entry's inclusion.

    Args:
        path: the segment (``.jsonl`` or ``.jsonl.gz``).
        verifiers: the keys whose checkpoint signatures are trusted.
        sha256: the file's hash as ``bastion_audit_segments`` recorded it, to compare.
        origin_prefix: the deployment's ``audit.origin``: the checkpoint's origin
            must then be ``f"{origin_prefix}/{log_id}"`` (else any origin ending
            with ``/<log_id>``).

    Returns:
        The report; ``report.ok`` when the checkpoint verified and every entry is
        included in it at its position, with the header's count.
    """
    report = SegmentReport()
    data = Path(path).read_bytes()
    if sha256 is not None and hashlib.sha256(data).digest() != sha256:
        report.problems.append("the file's SHA-256 is not the one recorded")
    try:
        text = gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data
        lines = text.decode().splitlines()
        header = json.loads(lines[0]) if lines else None
    except (OSError, EOFError, UnicodeDecodeError, ValueError):
        report.problems.append("line 1: not a segment file (unreadable)")
        return report
    if not isinstance(header, dict) or header.get("format") != SEGMENT_FORMAT:
        report.problems.append(f"line 1: not a {SEGMENT_FORMAT} header")
        return report
    report.log_id = str(header.get("log_id", ""))
    try:
        checkpoint = parse_checkpoint(str(header.get("checkpoint", "")), verifiers)
    except CheckpointError as exc:
        report.problems.append(f"line 1: the checkpoint does not verify: {exc}")
        return report
    origin_ok = (
        checkpoint.origin.endswith(f"/{report.log_id}")
        if origin_prefix is None
        else checkpoint.origin == f"{origin_prefix}/{report.log_id}"
    )
    if checkpoint.size != header.get("tree_size") or not origin_ok:
        report.problems.append("line 1: the header disagrees with its checkpoint")
    report.checkpoint = checkpoint
    previous = -1
    for number, line in enumerate(lines[1:], start=2):
        report.entries += 1
        problem = _check_line(line, report.log_id, checkpoint, previous)
        if isinstance(problem, str):
            report.problems.append(f"line {number}: {problem}")
        else:
            previous = problem
    if report.entries != header.get("entry_count"):
        report.problems.append(
            f"{report.entries} entries, the header says {header.get('entry_count')}"
        )
    return report


def _check_line(line: str, log_id: str, checkpoint: Checkpoint, previous: int) -> str | int:
    """The entry's position when the line proves it, else what is wrong."""
    try:
        value = json.loads(line)
        row = entry_from_json(value["entry"])
        index = value["leaf_index"]
        proof = [base64.b64decode(node, validate=True) for node in value["inclusion_proof"]]
    except (ValueError, KeyError, TypeError):
        return "malformed entry line"
    if type(index) is not int or row[ENCODED_COLUMNS.index("seq")] != index:
        return "leaf_index is not the entry's seq"
    if row[0] != log_id:
        return f"entry of log {row[0]!r} in a segment of {log_id!r}"
    if index <= previous:
        return "entries out of order"
    try:
        verify_inclusion(entry_leaf_hash(row), index, checkpoint.size, proof, checkpoint.root_hash)
    except ProofError as exc:
        return f"entry {index} is not included in the checkpoint: {exc}"
    return index
