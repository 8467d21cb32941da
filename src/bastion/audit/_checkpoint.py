r"""Checkpoints: signed notes that commit to a log's size and root hash (C2SP tlog-checkpoint).

A checkpoint's body is the C2SP ``tlog-checkpoint`` form with one extension
line, the signing time::

    <origin>\n              bastion/global
    <tree size>\n           1200
    <base64 root hash>\n    1LH6ZQ3u8Bq0yXo0G6V0wW0T6Wb0q3d0v2Jm7xQ0fC0=
    time <unix seconds>\n   time 1765100000

signed as a note (``_note``). :class:`Checkpointer` signs each log's head
under the head row's lock, stores the note in ``bastion_audit_checkpoints``
and hands it to every :class:`CheckpointSink`: storage that whoever controls
the database does not, so rewriting history means forging a signature or
being caught by an older checkpoint kept elsewhere.

Nothing the database holds is trusted for what it says alone: a stored
checkpoint counts only when its note verifies with a trusted key, and a head
is signed only when the stored tree proves it extends the latest such
checkpoint (RFC 9162 consistency proof), so write access to the database
cannot get a rewritten history signed.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import os
import random
import re
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Final, Protocol

import structlog
from sqlalchemy import ColumnElement, Select, and_, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from bastion.audit._merkle import EMPTY_ROOT, HASH_SIZE
from bastion.audit._note import NoteError, NoteSigner, NoteVerifier, open_note
from bastion.audit._proof import ProofError, verify_consistency
from bastion.audit._tables import checkpoints, entries, logs
from bastion.audit._tree import TreeIncompleteError, TreeReader
from bastion.backends import BackendKind
from bastion.data import Database, run_transaction, transaction
from bastion.errors import ConfigurationError, ServiceUnavailable
from bastion.observability.metrics import (
    AUDIT_CHECKPOINT_INVALID,
    AUDIT_CHECKPOINT_LAG,
    AUDIT_CHECKPOINT_REFUSALS,
    AUDIT_CHECKPOINT_SINK_FAILURES,
    AUDIT_CHECKPOINTS,
)

if TYPE_CHECKING:
    from bastion.settings import Settings

__all__ = [
    "Checkpoint",
    "CheckpointError",
    "CheckpointRefused",
    "CheckpointSink",
    "Checkpointer",
    "DirectorySink",
    "checkpoint_body",
    "parse_checkpoint",
    "signing_keys",
]

logger = structlog.get_logger("bastion.audit")

DEVELOPMENT_KEY_FILE: Final = "audit_signing_key"
_TIME_PREFIX: Final = "time "
# Origin, size, root hash and the time extension line.
_BODY_LINES: Final = 4
_SIZE = re.compile(r"0|[1-9][0-9]*")
_TIME = re.compile(r"-?(0|[1-9][0-9]*)")
# The log ids bastion makes: "global", "system", "tenant/<uuid>" (see AuditLog.log_id_for).
_LOG_ID = re.compile(r"/(global|system|tenant/[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12})\Z")
# Each scheduled run waits interval * U(1 - JITTER, 1 + JITTER), so instances that
# started together drift apart rather than all signing at the same instant.
_JITTER: Final = 0.1
# Stored checkpoints are read this many at a time while looking for one that verifies.
_BATCH: Final = 32


class CheckpointError(NoteError):
    """A checkpoint note is malformed, not signed by a trusted key, or its body is no checkpoint."""


class CheckpointRefused(ServiceUnavailable):
    """The log's head is not consistent with a checkpoint signed before; nothing was signed (503).

    The head, the entries or the tiles were changed behind the writer's back
    (history rewritten or rolled back), or leaves the proof needs are missing.
    ``reason`` is one of ``inconsistent``, ``rollback``, ``incomplete``. Run
    ``bastion audit verify`` to find what changed.
    """

    def __init__(self, log_id: str, reason: str, detail: str) -> None:
        super().__init__(f"audit log {log_id!r}: {detail}; refusing to sign its head")
        self.log_id = log_id
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """A signed statement of a log's size and root hash at a time.

    Attributes:
        origin: the body's first line, ``<audit.origin>/<log id>``.
        size: leaves in the tree.
        root_hash: the tree's root hash (32 bytes).
        timestamp: when it was signed (UTC, whole seconds).
        note: the whole signed note, as stored and as sinks write it.
        key_name: the name of the key that signed it.
    """

    origin: str
    size: int
    root_hash: bytes
    timestamp: datetime
    note: str
    key_name: str

    @property
    def log_id(self) -> str:
        """The log id that ends the origin (``global``, ``system``, ``tenant/<uuid>``).

        Raises:
            ValueError: the origin does not end in one of bastion's log ids.
        """
        match = _LOG_ID.search(self.origin)
        if match is None:
            raise ValueError(f"the origin {self.origin!r} does not end in a bastion log id")
        return match.group(1)


def checkpoint_body(origin: str, size: int, root_hash: bytes, timestamp: datetime) -> str:
    """Return the checkpoint text that gets signed.

    Args:
        origin: the log's origin line (no newline).
        size: the tree size.
        root_hash: the 32-byte root hash.
        timestamp: the signing time; its whole seconds are written.

    Returns:
        The four-line body, ending in a newline.

    Raises:
        ValueError: an argument cannot be written in the format.
    """
    if not origin or "\n" in origin or size < 0 or len(root_hash) != HASH_SIZE:
        raise ValueError("a checkpoint has a one-line origin, a size >= 0 and a 32-byte root")
    seconds = int(timestamp.timestamp())
    root = base64.b64encode(root_hash).decode()
    return f"{origin}\n{size}\n{root}\n{_TIME_PREFIX}{seconds}\n"


def _parse_body(text: str) -> tuple[str, int, bytes, datetime]:
    lines = text.split("\n")
    # text ends in a newline, so the split ends with an empty string.
    if len(lines) < _BODY_LINES + 1 or lines[-1]:
        raise CheckpointError("a checkpoint body has an origin, a size and a root hash")
    origin, size_text, root_text, *extensions = lines[:-1]
    if not origin:
        raise CheckpointError("a checkpoint's origin line is empty")
    if not _SIZE.fullmatch(size_text):
        raise CheckpointError("a checkpoint's size is not a decimal number")
    try:
        root_hash = base64.b64decode(root_text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise CheckpointError("a checkpoint's root hash is not base64") from exc
    if len(root_hash) != HASH_SIZE:
        raise CheckpointError(f"a checkpoint's root hash is not {HASH_SIZE} bytes")
    times = [
        line.removeprefix(_TIME_PREFIX) for line in extensions if line.startswith(_TIME_PREFIX)
    ]
    if any(not line for line in extensions):
        raise CheckpointError("a checkpoint extension line is empty")
    if len(times) != 1 or not _TIME.fullmatch(times[0]):
        raise CheckpointError("a bastion checkpoint has one 'time <unix seconds>' line")
    try:
        timestamp = datetime.fromtimestamp(int(times[0]), UTC)
    except (OverflowError, OSError, ValueError) as exc:
        raise CheckpointError("a checkpoint's time is out of range") from exc
    return origin, int(size_text), root_hash, timestamp


def parse_checkpoint(note: str, verifiers: Sequence[NoteVerifier]) -> Checkpoint:
    """Verify a signed checkpoint and return what it states.

    Args:
        note: the signed note text.
        verifiers: the trusted keys; one of them must have signed it.

    Returns:
        The checkpoint; ``key_name`` is the first trusted key that signed it.

    Raises:
        CheckpointError: the note is malformed, carries no valid signature by a
            trusted key, or its body is not a checkpoint with a time line.
    """
    try:
        text, signed_by = open_note(note, verifiers)
    except CheckpointError:
        raise
    except NoteError as exc:
        raise CheckpointError(str(exc)) from exc
    origin, size, root_hash, timestamp = _parse_body(text)
    return Checkpoint(origin, size, root_hash, timestamp, note, signed_by[0].name)


class CheckpointSink(Protocol):
    """Somewhere else every new checkpoint is written (a directory, a bucket, a witness)."""

    async def write(self, checkpoint: Checkpoint, log_id: str) -> None:
        """Store ``checkpoint`` of ``log_id``; raise on failure (it is counted, never fatal)."""
        ...


class DirectorySink:
    """Writes each checkpoint to ``<path>/<log id, '/' as '_'>/<size, 20 digits>.checkpoint``.

    Each file is written aside and renamed into place, so a reader never sees a
    partial note; sizes are zero-padded so names sort in log order. Point it at
    storage the database's operator cannot rewrite (another volume, a bucket
    mount, a host that syncs it away).

    Args:
        path: the directory; created when missing.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)

    def file_for(self, log_id: str, size: int) -> Path:
        """Return where the checkpoint of ``log_id`` at ``size`` is written."""
        return self.path / log_id.replace("/", "_") / f"{size:020d}.checkpoint"

    async def write(self, checkpoint: Checkpoint, log_id: str) -> None:
        """Write the note atomically (temporary file, fsync, rename; mode 0644)."""
        await asyncio.to_thread(self._write, self.file_for(log_id, checkpoint.size), checkpoint)

    @staticmethod
    def _write(target: Path, checkpoint: Checkpoint) -> None:
        target.parent.mkdir(parents=True, exist_ok=True)
        descriptor, temporary = tempfile.mkstemp(dir=target.parent, suffix=".tmp")
        try:
            with os.fdopen(descriptor, "w", encoding="utf-8", newline="") as file:
                file.write(checkpoint.note)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o644)  # checkpoints are public by design
            os.replace(temporary, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temporary)
            raise


async def _extension_problem(
    tree: TreeReader, base: tuple[int, bytes], head: tuple[int, bytes]
) -> str | None:
    """Why the stored ``tree`` does not prove ``head`` extends ``base``, or ``None`` if it does."""
    (first, first_root), (second, second_root) = base, head
    if first == second:
        return None if first_root == second_root else "the roots differ"
    if first == 0:
        if await tree.range_hash(0, second) == second_root:
            return None
        return "the head's root is not the root of the stored leaves"
    proof = await tree.consistency_proof(first, second)
    try:
        verify_consistency(first, second, first_root, second_root, proof)
    except ProofError as exc:
        return str(exc)
    return None


def _utc_now() -> datetime:
    return datetime.now(UTC)


class Checkpointer:
    """Signs the heads of the audit logs and keeps the signed checkpoints.

    The database is not trusted for what it says alone. A stored checkpoint
    counts only when its note verifies with ``verifiers``, names this log's
    origin, matches its row and is no larger than the head; any other row is
    skipped, logged (``audit_checkpoint_invalid``) and counted
    (``bastion_audit_checkpoint_invalid_total``). A head is signed only when
    the stored tree proves it extends the latest such checkpoint (RFC 9162
    consistency proof against the signed root) and the last checkpoint this
    instance made of the log, which it keeps in memory so that deleting
    checkpoint rows does not reset the check. Otherwise :class:`CheckpointRefused`
    is raised, logged (``audit_checkpoint_refused``) and counted
    (``bastion_audit_checkpoint_refusals_total``).

    Args:
        database: the database of the audit tables.
        signer: the key that signs (``signing_keys(settings)[0]``).
        origin_prefix: ``audit.origin``; a log's origin is ``<prefix>/<log id>``.
        verifiers: the keys stored checkpoints must verify with
            (``signing_keys(settings)[1]``); the signer's own key is always
            among them. ``None``: the signer's key only, so checkpoints signed
            by a retired key are skipped.
        sinks: where each new checkpoint is also written.
        clock: the signing time; tests pass a fixed one.
        sleep: awaited between scheduled runs; tests pass one that does not sleep.

    Example:
        >>> checkpointer = Checkpointer(
        ...     database=db, signer=signer, verifiers=verifiers, origin_prefix="bastion"
        ... )
        >>> checkpoint = await checkpointer.checkpoint("global")
    """

    def __init__(
        self,
        *,
        database: Database,
        signer: NoteSigner,
        origin_prefix: str,
        verifiers: Sequence[NoteVerifier] | None = None,
        sinks: Sequence[CheckpointSink] = (),
        clock: Callable[[], datetime] = _utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.database = database
        self.signer = signer
        self.origin_prefix = origin_prefix
        trusted = list(verifiers or ())
        if signer.verifier() not in trusted:
            trusted.append(signer.verifier())
        self.verifiers = tuple(trusted)
        self.sinks = tuple(sinks)
        self._clock = clock
        self._sleep = sleep
        # (size, root) of the largest checkpoint of each log this instance signed or verified.
        self._signed: dict[str, tuple[int, bytes]] = {}
        self._refused: dict[str, str] = {}

    def origin(self, log_id: str) -> str:
        """Return the origin line of ``log_id``'s checkpoints."""
        return f"{self.origin_prefix}/{log_id}"

    @property
    def refused(self) -> Mapping[str, str]:
        """The logs whose latest signing was refused, with the reason (for readiness checks)."""
        return dict(self._refused)

    async def checkpoint(self, log_id: str) -> Checkpoint | None:
        """Sign the log's current head, store it and write it to every sink.

        The head row is locked (``FOR UPDATE``; on SQLite the transaction's
        write lock, taken first) while it is read, checked and the checkpoint
        stored, so no append slips between and two instances do not both sign
        one size. A failing sink is logged and counted; the checkpoint stands.

        Args:
            log_id: the log.

        Returns:
            The new checkpoint; the latest stored one when the size has not
            changed since (sinks are then not written again); ``None`` when the
            log has no head (nothing was ever appended).

        Raises:
            CheckpointRefused: the head does not extend a checkpoint signed
                before (history rewritten or rolled back, or leaves missing).
            TransactionConflict: the database stayed busy through every retry.
        """
        try:
            created, checkpoint = await run_transaction(
                self._checkpoint, log_id, database=self.database
            )
        except CheckpointRefused as exc:
            self._refuse(exc)
            raise
        self._refused.pop(log_id, None)
        if checkpoint is None:
            return None
        self._remember(log_id, checkpoint)
        if created:
            AUDIT_CHECKPOINTS.inc()
            logger.info("audit_checkpoint", log_id=log_id, size=checkpoint.size)
            await self._write_sinks(checkpoint, log_id)
        return checkpoint

    def _refuse(self, refusal: CheckpointRefused) -> None:
        self._refused[refusal.log_id] = refusal.reason
        AUDIT_CHECKPOINT_REFUSALS.labels(refusal.reason).inc()
        # Sizes and hashes only: the detail names no entry content.
        logger.error(
            "audit_checkpoint_refused",
            log_id=refusal.log_id,
            reason=refusal.reason,
            detail=refusal.detail,
        )

    def _remember(self, log_id: str, checkpoint: Checkpoint) -> None:
        known = self._signed.get(log_id)
        if known is None or known[0] <= checkpoint.size:
            self._signed[log_id] = (checkpoint.size, checkpoint.root_hash)

    async def _checkpoint(
        self, session: AsyncSession, log_id: str
    ) -> tuple[bool, Checkpoint | None]:
        head = await self._lock_head(session, log_id)
        if head is None:
            return False, None
        size, root_hash = head
        await self._refuse_rollback(session, log_id, size)
        latest = await self._first_valid(
            session, log_id, checkpoints.c.tree_size <= size, descending=True
        )
        bases = set()
        if latest is not None:
            bases.add((latest.size, latest.root_hash))
        if log_id in self._signed:
            bases.add(self._signed[log_id])
        # Nothing signed yet: the head must at least be the root of the stored leaves.
        for base in sorted(bases or {(0, EMPTY_ROOT)}):
            await self._check_extends(session, log_id, base, (size, root_hash))
        if latest is not None and latest.size == size:
            return False, latest
        timestamp = self._clock().astimezone(UTC).replace(microsecond=0)
        note = self.signer.sign(checkpoint_body(self.origin(log_id), size, root_hash, timestamp))
        await session.execute(
            checkpoints.insert().values(
                id=uuid.uuid4(),
                log_id=log_id,
                tree_size=size,
                root_hash=root_hash,
                created_at=timestamp,
                key_name=self.signer.name,
                note=note,
            )
        )
        return True, Checkpoint(
            self.origin(log_id), size, root_hash, timestamp, note, self.signer.name
        )

    async def _refuse_rollback(self, session: AsyncSession, log_id: str, size: int) -> None:
        """Refuse a head smaller than a checkpoint signed before: signed leaves went missing."""
        larger = await self._first_valid(
            session, log_id, checkpoints.c.tree_size > size, descending=True
        )
        signed = max(self._signed.get(log_id, (0, b""))[0], 0 if larger is None else larger.size)
        if signed > size:
            raise CheckpointRefused(
                log_id, "rollback", f"the head has {size} leaves but {signed} were signed"
            )

    async def _check_extends(
        self,
        session: AsyncSession,
        log_id: str,
        base: tuple[int, bytes],
        head: tuple[int, bytes],
    ) -> None:
        """Refuse unless the stored tree proves ``head`` extends the signed ``base``.

        ``base`` (size, root) is trusted: it was signed, so the proof, though
        read from the database, cannot make a rewritten tree pass. The empty
        base checks the head's root against the stored leaves.
        """
        try:
            problem = await _extension_problem(TreeReader(session, log_id), base, head)
        except TreeIncompleteError as exc:
            raise CheckpointRefused(log_id, "incomplete", str(exc)) from exc
        if problem is not None:
            raise CheckpointRefused(
                log_id,
                "inconsistent",
                f"the head ({head[0]} leaves) does not extend the checkpoint of {base[0]}: "
                + problem,
            )

    async def _lock_head(self, session: AsyncSession, log_id: str) -> tuple[int, bytes] | None:
        if self.database.kind is BackendKind.SQLITE:
            # SQLite has no row locks: a no-op write first takes the database's write
            # lock, which appenders need too, before the head is read.
            await session.execute(
                update(logs).where(logs.c.log_id == log_id).values(size=logs.c.size)
            )
            statement = select(logs.c.size, logs.c.root_hash).where(logs.c.log_id == log_id)
        else:
            statement = (
                select(logs.c.size, logs.c.root_hash)
                .where(logs.c.log_id == log_id)
                .with_for_update()
            )
        row = (await session.execute(statement)).one_or_none()
        return None if row is None else (row.size, bytes(row.root_hash))

    async def _write_sinks(self, checkpoint: Checkpoint, log_id: str) -> None:
        for sink in self.sinks:
            try:
                await sink.write(checkpoint, log_id)
            except Exception as exc:  # noqa: BLE001 -- a sink never fails the checkpoint
                name = type(sink).__name__
                AUDIT_CHECKPOINT_SINK_FAILURES.labels(name).inc()
                # The type only: a message may carry a path or a URL with credentials.
                logger.warning(
                    "audit_checkpoint_sink_failed",
                    sink=name,
                    log_id=log_id,
                    size=checkpoint.size,
                    error=type(exc).__name__,
                )

    async def checkpoint_all(self) -> list[Checkpoint]:
        """Sign every log that grew since its latest checkpoint.

        A log has grown when its head is larger than every stored checkpoint
        no larger than the head (a forged row of a huge size cannot hide it);
        :meth:`checkpoint` then checks signatures and consistency. A log that
        fails (refused, or the database busy past its retries) is logged and
        skipped; the others are still signed. Afterwards
        ``bastion_audit_checkpoint_lag_seconds`` holds how long the log left
        unsigned longest has waited since its latest verified checkpoint
        (0 when none is).

        Returns:
            The new checkpoints.
        """
        signed_size = (
            select(func.max(checkpoints.c.tree_size))
            .where(checkpoints.c.log_id == logs.c.log_id, checkpoints.c.tree_size <= logs.c.size)
            .scalar_subquery()
        )
        async with transaction(database=self.database) as session:
            grown = (
                await session.scalars(
                    select(logs.c.log_id)
                    .where(logs.c.size > func.coalesce(signed_size, 0))
                    .order_by(logs.c.log_id)
                )
            ).all()
        made: list[Checkpoint] = []
        lag = 0.0
        for log_id in grown:
            try:
                checkpoint = await self.checkpoint(log_id)
            except Exception as exc:  # noqa: BLE001 -- one log's failure must not stop the others
                if not isinstance(exc, CheckpointRefused):  # already logged as an error
                    logger.warning(
                        "audit_checkpoint_failed", log_id=log_id, error=type(exc).__name__
                    )
                lag = max(lag, await self._waiting(log_id))
                continue
            if checkpoint is not None:
                made.append(checkpoint)
        AUDIT_CHECKPOINT_LAG.set(lag)
        return made

    async def _waiting(self, log_id: str) -> float:
        """Seconds since the log's latest verified checkpoint, or since its first entry if none."""
        latest = await self.latest(log_id)
        since = None if latest is None else latest.timestamp
        if since is None:
            async with transaction(database=self.database) as session:
                since = await session.scalar(
                    select(entries.c.occurred_at)
                    .where(entries.c.log_id == log_id)
                    .order_by(entries.c.seq)
                    .limit(1)
                )
        if since is None:
            return 0.0
        return max(0.0, (self._clock() - since).total_seconds())

    async def latest(
        self, log_id: str, *, session: AsyncSession | None = None
    ) -> Checkpoint | None:
        """Return the log's largest verified checkpoint no larger than its head.

        Stored rows that do not verify with the trusted keys, name another
        origin or differ from their note are skipped (logged and counted).

        Args:
            log_id: the log.
            session: a session to read in (its transaction); ``None``: a short one of its own.

        Returns:
            The checkpoint, or ``None`` when the log has no head or no valid checkpoint.
        """
        head = select(logs.c.size).where(logs.c.log_id == log_id).scalar_subquery()
        return await self._read(
            log_id, checkpoints.c.tree_size <= head, descending=True, session=session
        )

    async def at_least(
        self, log_id: str, size: int, *, session: AsyncSession | None = None
    ) -> Checkpoint | None:
        """Return the log's smallest verified checkpoint of ``size`` leaves or more.

        A proof against it is the shortest-lived that covers the leaves below
        ``size``, and it is exactly ``size`` when a checkpoint of that size
        exists. Rows are checked as for :meth:`latest`, and none larger than
        the head is used.

        Args:
            log_id: the log.
            size: the least tree size wanted.
            session: as for :meth:`latest`.

        Returns:
            The checkpoint, or ``None`` when none is that large yet.
        """
        head = select(logs.c.size).where(logs.c.log_id == log_id).scalar_subquery()
        condition = and_(checkpoints.c.tree_size >= size, checkpoints.c.tree_size <= head)
        return await self._read(log_id, condition, descending=False, session=session)

    async def _read(
        self,
        log_id: str,
        condition: ColumnElement[bool],
        *,
        descending: bool,
        session: AsyncSession | None,
    ) -> Checkpoint | None:
        if session is not None:
            return await self._first_valid(session, log_id, condition, descending=descending)
        async with transaction(database=self.database) as own:
            return await self._first_valid(own, log_id, condition, descending=descending)

    async def _first_valid(
        self,
        session: AsyncSession,
        log_id: str,
        condition: ColumnElement[bool],
        *,
        descending: bool,
    ) -> Checkpoint | None:
        """The first stored checkpoint meeting ``condition``, by size, that is valid."""
        size = checkpoints.c.tree_size.desc() if descending else checkpoints.c.tree_size.asc()
        statement: Select[tuple[str, int, bytes]] = (
            select(checkpoints.c.note, checkpoints.c.tree_size, checkpoints.c.root_hash)
            .where(checkpoints.c.log_id == log_id, condition)
            .order_by(size, checkpoints.c.created_at.desc(), checkpoints.c.id)
            .limit(_BATCH)
        )
        offset = 0
        while True:
            rows = (await session.execute(statement.offset(offset))).all()
            for row in rows:
                checkpoint = self._valid(log_id, row.note, row.tree_size, bytes(row.root_hash))
                if checkpoint is not None:
                    return checkpoint
            if len(rows) < _BATCH:
                return None
            offset += _BATCH

    def _valid(self, log_id: str, note: str, size: int, root_hash: bytes) -> Checkpoint | None:
        """The checkpoint a stored row holds; ``None`` (logged, counted) when it is not valid."""
        try:
            checkpoint = parse_checkpoint(note, self.verifiers)
        except CheckpointError as exc:
            reason = str(exc)
        else:
            if checkpoint.origin != self.origin(log_id):
                reason = "the note is for another origin"
            elif (checkpoint.size, checkpoint.root_hash) != (size, root_hash):
                reason = "the row's size or root differs from its note"
            else:
                return checkpoint
        AUDIT_CHECKPOINT_INVALID.inc()
        logger.warning("audit_checkpoint_invalid", log_id=log_id, tree_size=size, reason=reason)
        return None

    async def run(self, interval: float) -> None:
        """Sign every grown log each ``interval`` seconds (jittered by 10%), until cancelled.

        A failed run is logged and the schedule goes on.

        Args:
            interval: seconds between runs; above 0.
        """
        if interval <= 0:
            raise ValueError("the checkpoint interval is above 0 seconds")
        while True:
            await self._sleep(interval * random.uniform(1 - _JITTER, 1 + _JITTER))  # noqa: S311 -- jitter, not a secret
            try:
                await self.checkpoint_all()
            except Exception as exc:  # noqa: BLE001 -- the schedule outlives one bad run
                logger.warning("audit_checkpoint_run_failed", error=type(exc).__name__)


def signing_keys(settings: Settings) -> tuple[NoteSigner, list[NoteVerifier]]:
    """Return the checkpoint signer and every trusted verifier the settings name.

    The signer is the first of ``audit.signing_keys``; the verifiers are the
    public halves of all of them, then ``audit.trusted_keys`` (retired keys).
    With no signing key, development generates one (named ``audit.origin``),
    keeps it in ``<secrets.development_directory>/audit_signing_key`` (mode
    0600, shared by every worker and restart) and warns; production refuses.

    Args:
        settings: the effective settings.

    Returns:
        ``(signer, verifiers)``.

    Raises:
        ConfigurationError: no signing key in production, or a key is malformed
            (the message names the setting, never the key).
    """
    audit = settings.audit
    texts = [key.get_secret_value() for key in audit.signing_keys]
    if not texts:
        if settings.environment == "production":
            raise ConfigurationError(
                "audit checkpoints need a signing key: set BASTION_AUDIT__SIGNING_KEYS "
                "(make one with `bastion audit keygen`)"
            )
        directory = Path(settings.secrets.development_directory)
        texts = [_development_key(directory, audit.origin)]
        logger.warning(
            "secret_generated_for_development",
            variable="BASTION_AUDIT__SIGNING_KEYS",
            directory=str(directory),
            hint="set BASTION_AUDIT__SIGNING_KEYS (bastion audit keygen) before production",
        )
    signers: list[NoteSigner] = []
    for position, text in enumerate(texts):
        try:
            signers.append(NoteSigner.from_private(text))
        except NoteError as exc:
            raise ConfigurationError(
                f"BASTION_AUDIT__SIGNING_KEYS[{position}] is not a signed-note private key: {exc}"
            ) from exc
    verifiers = [signer.verifier() for signer in signers]
    for position, text in enumerate(audit.trusted_keys):
        try:
            verifiers.append(NoteVerifier.from_text(text))
        except NoteError as exc:
            raise ConfigurationError(
                f"BASTION_AUDIT__TRUSTED_KEYS[{position}] is not a signed-note verifier key: {exc}"
            ) from exc
    return signers[0], verifiers


def _development_key(directory: Path, origin: str) -> str:
    """The development signing key kept in ``directory``; made once, whoever races to it first."""
    path = directory / DEVELOPMENT_KEY_FILE
    with contextlib.suppress(FileNotFoundError):
        return path.read_text(encoding="utf-8").strip()
    directory.mkdir(parents=True, exist_ok=True)
    # The key's name must be a valid note name; an origin with a space or '+' is not.
    name = re.sub(r"[\s+]", "_", origin)
    value = NoteSigner.generate(name).private_text()
    # Write aside then link: of workers racing at first start, one wins and all read it.
    with tempfile.NamedTemporaryFile("w", dir=directory, delete=False, encoding="utf-8") as file:
        file.write(value + "\n")
    try:
        os.chmod(file.name, 0o600)
        os.link(file.name, path)
    except FileExistsError:
        value = path.read_text(encoding="utf-8").strip()
    finally:
        os.unlink(file.name)
    return value
