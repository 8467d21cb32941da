"""Verifying the audit trail: every entry re-hashed, every tree rebuilt, every checkpoint checked.

:func:`verify` trusts nothing the database says about itself. It streams each
log's entries in ``seq`` order, re-derives each leaf hash from the columns
(:func:`~bastion.audit._encoding.encode_entry`), rebuilds the tree with a
:class:`~bastion.audit._merkle.CompactRange` and, at every size a signed
checkpoint names, compares the roots. The stored ``leaf_hash`` and head row are
only compared against, never used. Checkpoints are trusted only when a trusted
key signed them for this deployment's origin; those exported to a directory
outside the database's control are checked too, and must agree with the
database's. A pruned position counts only when a segment row covers it and an
``audit.prune`` entry, proven included in a signed checkpoint, names that
segment, its log, range and archive SHA-256.

On PostgreSQL every statement runs with ``search_path = pg_catalog, pg_temp``
and calls only ``pg_catalog`` functions, no operator: the role that owns the
tables cannot plant a function or operator that would re-forge a leaf.

What it can tell, as :class:`Problem` kinds (positions are leaf indices, and a
range is ``[position, end)``):

- ``modified``: an entry's columns no longer hash to its stored leaf hash.
- ``reordered``: two entries' contents were swapped (each hashes to the other's
  stored leaf at the other's position).
- ``malformed``: a row that cannot be encoded (a value of the wrong type, a NULL
  where the encoding needs a value); its position counts as missing.
- ``missing``: positions with no entry (and not provably pruned) below the head
  or a checkpoint's size.
- ``unexpected``: entries or pruned rows beyond the log's head and checkpoints.
- ``root_mismatch``: a trusted checkpoint of size ``S`` does not match the tree
  rebuilt from the entries: something in ``[last matching checkpoint, S)`` changed
  even if its stored leaf hash was recomputed to match.
- ``head_mismatch``: the head row's root or frontier differs from the rebuilt tree.
- ``checkpoint_forged``: a checkpoint whose signature does not verify with a
  trusted key, or whose body (origin included) disagrees with its row or its log.
- ``checkpoint_missing`` / ``checkpoint_mismatch``: a checkpoint in the export
  directory is absent from the database, or differs from the one stored there.
- ``checkpoint_time``: a trusted checkpoint signed more than five minutes before a
  smaller tree's, or more than five minutes in the future: the key signed out of order.
- ``archive_missing`` / ``archive_mismatch``: with an archive directory, a
  pruned segment's file is absent, or its SHA-256 is not the recorded one.
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import contextlib
import datetime as dt
import functools
import hashlib
import hmac
import itertools
import json
import struct
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    LargeBinary,
    Numeric,
    cast,
    func,
    literal,
    or_,
    select,
    text,
    type_coerce,
    union,
)
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.types import NullType

from bastion.audit._checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from bastion.audit._encoding import ENCODED_COLUMNS, ENCODING_VERSION, entry_leaf_hash
from bastion.audit._merkle import HASH_SIZE, CompactRange, hash_children, hash_leaf
from bastion.audit._note import NoteVerifier
from bastion.audit._proof import ProofError, verify_inclusion
from bastion.audit._tables import checkpoints, entries, logs, pruned, segments
from bastion.audit._tree import TreeIncompleteError, TreeReader
from bastion.backends import BackendKind
from bastion.data import Database

__all__ = ["PRUNE_ACTION", "Problem", "VerifyReport", "verify"]

STREAM_BATCH: Final = 10_000
"""Entries fetched per round trip while streaming a log."""
PRUNE_ACTION: Final = "audit.prune"
"""The action of the entry that records one pruned segment (see ``_retention``)."""
_PLACEHOLDERS: Final = list(
    itertools.accumulate(
        range(64), lambda node, _: hash_children(node, node), initial=bytes(HASH_SIZE)
    )
)
"""The hash of a perfect subtree of ``2**level`` missing leaves, by level."""
_SEQ: Final = ENCODED_COLUMNS.index("seq")
_LEAF: Final = len(ENCODED_COLUMNS)
_MALFORMED: Final = (TypeError, ValueError, AttributeError, OverflowError, struct.error)
"""What encoding (or converting) a row of the wrong shape raises."""
_PIN_SEARCH_PATH: Final = text(
    "SELECT pg_catalog.set_config('search_path', pg_catalog.concat_ws(', ', 'pg_catalog', "
    "pg_catalog.quote_ident(pg_catalog.current_schema()), 'pg_temp'), true)"
)
"""The tables' schema stays reachable, after ``pg_catalog``: an object of the same name and
argument types there is shadowed by the catalog's."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One thing verification found wrong.

    Attributes:
        log_id: the log it is in.
        kind: what is wrong (see the module docstring for the kinds).
        position: the first leaf index concerned, ``None`` for the log as a whole.
        message: a sentence for people.
        end: for a range of positions, the index after the last; ``None`` for one.
    """

    log_id: str
    kind: str
    position: int | None
    message: str
    end: int | None = None

    def positions(self) -> range:
        """The leaf indices this problem covers (empty when it names none)."""
        if self.position is None:
            return range(0)
        return range(self.position, self.end if self.end is not None else self.position + 1)


@dataclass(slots=True)
class VerifyReport:
    """What :func:`verify` checked and what it found.

    Attributes:
        logs: logs verified.
        entries: entries re-hashed.
        checkpoints: checkpoints checked (database and directory).
        problems: everything found wrong, by log then position.
    """

    logs: int = 0
    entries: int = 0
    checkpoints: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether nothing was found wrong."""
        return not self.problems


@dataclass(slots=True)
class _Progress:
    callback: Callable[[int, int], None] | None
    total: int
    done: int = 0

    def advance(self, count: int) -> None:
        self.done += count
        if self.callback is not None:
            self.callback(self.done, self.total)


@dataclass(frozen=True, slots=True)
class _Context:
    """What every log's verification shares."""

    database: Database
    verifiers: Sequence[NoteVerifier]
    origin_prefix: str | None
    archives: Path | None
    evidence: dict[uuid.UUID, _Segment]


@dataclass(frozen=True, slots=True)
class _Segment:
    """A pruned segment as the ``audit.prune`` entry (or its row) describes it."""

    log_id: str
    first_seq: int
    last_seq: int
    entry_count: int
    tree_size: int
    sha256: bytes


async def verify(
    database: Database,
    *,
    verifiers: Sequence[NoteVerifier],
    origin_prefix: str | None = None,
    log_id: str | None = None,
    checkpoint_directory: str | Path | None = None,
    archive_directory: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> VerifyReport:
    """Verify every log (or one) from its entries up, against its signed checkpoints.

    Args:
        database: the database holding the audit tables.
        verifiers: the keys whose checkpoint signatures are trusted.
        origin_prefix: the deployment's ``audit.origin``: a checkpoint counts
            only when its origin is ``f"{origin_prefix}/{log_id}"``. ``None``
            accepts any origin ending with ``/<log_id>`` (a key signing for one
            deployment only).
        log_id: verify only this log.
        checkpoint_directory: where checkpoints were exported
            (``audit.checkpoint_directory``); each one found there is checked
            and must also be in the database.
        archive_directory: where pruned segments were archived
            (``audit.archive_directory``); each pruned segment's file must be
            there with its recorded SHA-256.
        progress: called with ``(entries done, entries in total)`` as it goes.

    Returns:
        The report; ``report.ok`` is true when nothing was found wrong.

    Example:
        >>> report = await verify(  # doctest: +SKIP
        ...     database, verifiers=verifiers, origin_prefix="bastion")
        >>> report.ok
        True
    """
    report = VerifyReport()
    directory = Path(checkpoint_directory) if checkpoint_directory is not None else None
    exported = (
        _read_directory(directory, verifiers, origin_prefix, report)
        if directory is not None
        else {}
    )
    async with _connect(database) as connection:
        log_ids = await _log_ids(connection, log_id, exported)
        total_query = select(func.count()).select_from(entries)
        if log_id is not None:
            total_query = total_query.where(entries.c.log_id == log_id)
        total = (await connection.execute(total_query)).scalar_one()
        tracker = _Progress(progress, total)
        context = _Context(
            database,
            verifiers,
            origin_prefix,
            Path(archive_directory) if archive_directory is not None else None,
            await _prune_evidence(connection, verifiers, origin_prefix, exported),
        )
        for current in log_ids:
            await _verify_log(
                context,
                connection,
                current,
                exported=exported.get(current, []),
                report=report,
                progress=tracker,
            )
            report.logs += 1
    if directory is not None and report.checkpoints and not directory.is_dir():
        # Nothing exported yet is normal; signed checkpoints and no directory are not.
        report.problems.append(
            Problem("", "checkpoint_missing", None, f"no checkpoint directory at {directory}")
        )
    report.problems.sort(key=_problem_order)
    return report


@contextlib.asynccontextmanager
async def _connect(database: Database) -> AsyncIterator[AsyncConnection]:
    """A connection whose transaction resolves names in ``pg_catalog`` only (PostgreSQL)."""
    async with database.engine.connect() as connection:
        await _pin(connection)
        yield connection


async def _pin(connection: AsyncConnection) -> None:
    """Pin the search path for the connection's current transaction (again after a rollback).

    ``pg_catalog`` first, then the schema of the tables, then ``pg_temp`` (whose
    functions and operators are never looked up): what the role may have set
    with ``ALTER ROLE ... SET search_path`` no longer applies.
    """
    if connection.dialect.name == "postgresql":
        await connection.execute(_PIN_SEARCH_PATH)


def _problem_order(problem: Problem) -> tuple[str, int, str]:
    return problem.log_id, -1 if problem.position is None else problem.position, problem.kind


async def _log_ids(
    connection: AsyncConnection, only: str | None, exported: dict[str, list[Checkpoint]]
) -> list[str]:
    if only is not None:
        return [only]
    statement = union(
        select(logs.c.log_id),
        select(entries.c.log_id).distinct(),
        select(checkpoints.c.log_id).distinct(),
        select(pruned.c.log_id).distinct(),
    )
    found = {value for value in (await connection.execute(statement)).scalars() if value}
    return sorted(str(value) for value in found | set(exported))


def _read_directory(
    directory: Path,
    verifiers: Sequence[NoteVerifier],
    origin_prefix: str | None,
    report: VerifyReport,
) -> dict[str, list[Checkpoint]]:
    """The exported checkpoints that verify, by log; forged ones are reported."""
    found: dict[str, list[Checkpoint]] = {}
    if not directory.is_dir():
        return found
    for folder in sorted(path for path in directory.iterdir() if path.is_dir()):
        for path in sorted(folder.glob("*.checkpoint")):
            report.checkpoints += 1
            stated = path.stem.lstrip("0") or "0"
            try:
                checkpoint = parse_checkpoint(path.read_text("utf-8"), verifiers)
            except (CheckpointError, OSError, UnicodeDecodeError) as exc:
                report.problems.append(
                    Problem(
                        folder.name.replace("_", "/"),
                        "checkpoint_forged",
                        int(stated) if stated.isdigit() else None,
                        f"exported checkpoint {folder.name}/{path.name}: {exc}",
                    )
                )
                continue
            # The folder is the log id with "/" made "_"; the signed origin ends
            # with the log id itself, which is how the folder is mapped back.
            if origin_prefix is not None and checkpoint.origin.startswith(origin_prefix + "/"):
                tail = checkpoint.origin[len(origin_prefix) + 1 :]
            else:
                tail = checkpoint.origin[-len(folder.name) :]
            log_id = tail if tail.replace("/", "_") == folder.name else folder.name
            found.setdefault(log_id, []).append(checkpoint)
    return found


def _belongs(checkpoint: Checkpoint, log_id: str, origin_prefix: str | None) -> bool:
    if origin_prefix is None:
        return checkpoint.origin.endswith("/" + log_id)
    return checkpoint.origin == f"{origin_prefix}/{log_id}"


def _signed(
    row: Sequence[Any],
    log_id: str,
    verifiers: Sequence[NoteVerifier],
    origin_prefix: str | None,
) -> Checkpoint | str:
    """The checkpoint of a ``(tree_size, root_hash, note)`` row, or why it is not trusted."""
    size, root, note = row
    try:
        checkpoint = parse_checkpoint(note, verifiers)
    except (CheckpointError, *_MALFORMED) as exc:
        return f"checkpoint at size {size}: {exc}"
    if (
        checkpoint.size != size
        or checkpoint.root_hash != root
        or not _belongs(checkpoint, log_id, origin_prefix)
    ):
        return (
            f"checkpoint at size {size}: its signed body ({checkpoint.origin}, "
            f"size {checkpoint.size}) disagrees with its row or this deployment's origin"
        )
    return checkpoint


def _checkpoint_rows(log_id: str) -> Any:
    return (
        select(checkpoints.c.tree_size, checkpoints.c.root_hash, checkpoints.c.note)
        .where(checkpoints.c.log_id == log_id)
        .order_by(checkpoints.c.tree_size)
    )


async def _trusted_checkpoints(
    context: _Context,
    connection: AsyncConnection,
    log_id: str,
    exported: list[Checkpoint],
    report: VerifyReport,
) -> list[Checkpoint]:
    """The log's checkpoints whose signatures verify; the others are reported."""
    trusted: list[Checkpoint] = []
    stored: dict[int, list[bytes]] = {}
    for row in await connection.execute(_checkpoint_rows(log_id)):
        report.checkpoints += 1
        checkpoint = _signed(row, log_id, context.verifiers, context.origin_prefix)
        if isinstance(checkpoint, str):
            size = row[0] if isinstance(row[0], int) else None
            report.problems.append(Problem(log_id, "checkpoint_forged", size, checkpoint))
            continue
        stored.setdefault(checkpoint.size, []).append(checkpoint.root_hash)
        trusted.append(checkpoint)
    for checkpoint in exported:
        roots = stored.get(checkpoint.size)
        if not _belongs(checkpoint, log_id, context.origin_prefix):
            report.problems.append(
                Problem(
                    log_id,
                    "checkpoint_forged",
                    checkpoint.size,
                    f"exported checkpoint at size {checkpoint.size} is of {checkpoint.origin}",
                )
            )
            continue
        if roots is None:
            report.problems.append(
                Problem(
                    log_id,
                    "checkpoint_missing",
                    checkpoint.size,
                    f"exported checkpoint at size {checkpoint.size} is not in the database",
                )
            )
        elif checkpoint.root_hash not in roots:
            report.problems.append(
                Problem(
                    log_id,
                    "checkpoint_mismatch",
                    checkpoint.size,
                    f"exported checkpoint at size {checkpoint.size} differs from the database's",
                )
            )
        trusted.append(checkpoint)
    _check_times(log_id, trusted, report)
    return trusted


CLOCK_TOLERANCE: Final = dt.timedelta(minutes=5)
"""How far a signer's clock may step back, or run ahead of the verifier's, unreported."""


def _check_times(log_id: str, trusted: list[Checkpoint], report: VerifyReport) -> None:
    """Report signed times that run backwards as the tree grows, or lie in the future.

    Only the signing key makes a checkpoint, so a time out of order means that key
    signed out of order: a compromised key back-dating a rewritten log, or a signer
    whose clock is wrong, either of which the operator must hear about.
    """
    horizon = dt.datetime.now(dt.UTC) + CLOCK_TOLERANCE
    latest_smaller: dt.datetime | None = None
    for size, group in itertools.groupby(sorted(trusted, key=lambda c: c.size), lambda c: c.size):
        signed = [checkpoint.timestamp for checkpoint in group]
        for timestamp in signed:
            if timestamp > horizon:
                report.problems.append(
                    Problem(
                        log_id,
                        "checkpoint_time",
                        size,
                        f"checkpoint at size {size} is signed in the future "
                        f"({timestamp.isoformat()})",
                    )
                )
            elif latest_smaller is not None and timestamp + CLOCK_TOLERANCE < latest_smaller:
                report.problems.append(
                    Problem(
                        log_id,
                        "checkpoint_time",
                        size,
                        f"checkpoint at size {size} is signed at {timestamp.isoformat()}, "
                        f"before a smaller tree's checkpoint ({latest_smaller.isoformat()})",
                    )
                )
        latest_smaller = max(signed) if latest_smaller is None else max(latest_smaller, *signed)


async def _prune_evidence(
    connection: AsyncConnection,
    verifiers: Sequence[NoteVerifier],
    origin_prefix: str | None,
    exported: dict[str, list[Checkpoint]],
) -> dict[uuid.UUID, _Segment]:
    """The segments that ``audit.prune`` entries proven in a signed checkpoint record, by id.

    An entry counts when its leaf, re-derived from its columns, has an inclusion
    proof (read from the untrusted tree, checked here) in a trusted checkpoint of
    its log: the database cannot make one up.
    """
    rows = (
        await connection.execute(select(*_entry_columns()).where(entries.c.action == PRUNE_ACTION))
    ).all()
    found: dict[uuid.UUID, _Segment] = {}
    signed: dict[str, list[Checkpoint]] = {}
    for row in rows:
        log_id, seq = row[0], row[_SEQ]
        try:
            leaf = entry_leaf_hash(row[:_LEAF])
            segment_id, segment = _segment_of(row[ENCODED_COLUMNS.index("details")])
        except (*_MALFORMED, KeyError):
            continue
        if log_id not in signed:
            signed[log_id] = [
                checkpoint
                for checkpoint in (
                    *(
                        _signed(stored, log_id, verifiers, origin_prefix)
                        for stored in await connection.execute(_checkpoint_rows(log_id))
                    ),
                    *exported.get(log_id, []),
                )
                if isinstance(checkpoint, Checkpoint)
                and _belongs(checkpoint, log_id, origin_prefix)
            ]
        covering = [checkpoint for checkpoint in signed[log_id] if checkpoint.size > seq]
        if not covering:
            continue
        checkpoint = min(covering, key=lambda candidate: candidate.size)
        try:
            proof = await TreeReader(connection, log_id).inclusion_proof(seq, checkpoint.size)
            verify_inclusion(leaf, seq, checkpoint.size, proof, checkpoint.root_hash)
        except (ProofError, TreeIncompleteError, ValueError):
            continue
        found[segment_id] = segment
    return found


def _segment_of(details: Any) -> tuple[uuid.UUID, _Segment]:
    """The segment an ``audit.prune`` entry's details name; ``ValueError`` when they name none."""
    value = json.loads(details)
    segment = _Segment(
        str(value["log_id"]),
        _integer(value["first_seq"]),
        _integer(value["last_seq"]),
        _integer(value["entry_count"]),
        _integer(value["tree_size"]),
        bytes.fromhex(value["archive_sha256"]),
    )
    return uuid.UUID(value["segment_id"]), segment


def _integer(value: Any) -> int:
    if type(value) is not int:
        raise TypeError("not an integer")
    return value


class _Rebuild:
    """The tree rebuilt leaf by leaf, compared with each trusted root as its size is reached."""

    def __init__(self, log_id: str, checks: dict[int, list[bytes]], report: VerifyReport) -> None:
        self.log_id = log_id
        self.compact = CompactRange()
        self.report = report
        self._checks = checks
        self._sizes = sorted(checks, reverse=True)
        self._next = self._sizes.pop() if self._sizes else -1
        self.last_good = 0

    def append(self, leaf: bytes) -> None:
        self.compact.append(leaf)
        if self.compact.size == self._next:
            self._compare()

    def skip(self, count: int) -> None:
        """Append ``count`` placeholder leaves, whole perfect subtrees at a time (O(log count))."""
        end = self.compact.size + count
        while self.compact.size < end:
            size = self.compact.size
            stop = self._next if size < self._next < end else end
            level = (stop - size).bit_length() - 1
            if size:
                level = min(level, (size & -size).bit_length() - 1)
            self._push(level, _PLACEHOLDERS[level])
            if self.compact.size == self._next:
                self._compare()

    def _push(self, level: int, node: bytes) -> None:
        """Add a perfect subtree of ``2**level`` leaves at the (aligned) right edge."""
        compact = self.compact
        hashes = compact.hashes
        index = compact.size >> level
        while index & 1:
            node = hash_children(hashes.pop(), node)
            index >>= 1
        hashes.append(node)
        compact.size += 1 << level

    def _compare(self) -> None:
        size = self.compact.size
        root = self.compact.root()
        if all(hmac.compare_digest(root, expected) for expected in self._checks[size]):
            self.last_good = size
        else:
            self.report.problems.append(
                Problem(
                    self.log_id,
                    "root_mismatch",
                    self.last_good,
                    f"the signed checkpoint at size {size} does not match the entries: "
                    f"something in positions {self.last_good} to {size - 1} changed",
                    size,
                )
            )
        self._next = self._sizes.pop() if self._sizes else -1

    def unreached(self) -> list[int]:
        """Checkpoint sizes beyond the rebuilt tree."""
        if self._next < 0:
            return []
        return [self._next, *reversed(self._sizes)]


async def _verify_log(
    context: _Context,
    connection: AsyncConnection,
    log_id: str,
    *,
    exported: list[Checkpoint],
    report: VerifyReport,
    progress: _Progress,
) -> None:
    trusted = await _trusted_checkpoints(context, connection, log_id, exported, report)
    checks: dict[int, list[bytes]] = {}
    for checkpoint in trusted:
        checks.setdefault(checkpoint.size, []).append(checkpoint.root_hash)
    head = await _head(connection, log_id, report)
    # Nothing is looked at past the largest size the log claims: a row planted at
    # a far position is reported, never walked to. Entries appended while this
    # runs lie beyond the head read here and are looked at last.
    claimed = head[0] if head is not None else await _rows(connection, log_id)
    bound = max(claimed, max(checks, default=0))
    kept = await _kept(context, connection, log_id, bound, report)
    rebuild = _Rebuild(log_id, checks, report)
    problems = report.problems
    modified: dict[int, Sequence[Any]] = {}
    append = rebuild.append
    position = 0
    async for batch in _leaves(context.database, connection, log_id, bound):
        for seq, leaf, stored, row in batch:
            if type(seq) is not int:
                problems.append(
                    Problem(
                        log_id,
                        "malformed",
                        None,
                        f"an entry's seq is a {type(seq).__name__}, not a position",
                    )
                )
                continue
            if seq < position:
                problems.append(
                    Problem(log_id, "unexpected", seq, f"position {seq} is not in any tree")
                )
                continue
            if seq != position:
                position = _fill_gap(rebuild, kept, position, seq)
            if leaf is None:
                problems.append(
                    Problem(
                        log_id,
                        "malformed",
                        seq,
                        f"position {seq}: the entry cannot be encoded (a value of the wrong "
                        "type, or NULL where one is needed)",
                    )
                )
                rebuild.skip(1)
            else:
                if leaf != stored:
                    modified[seq] = row
                append(leaf)
            position += 1
        report.entries += len(batch)
        progress.advance(len(batch))
    if kept and kept[-1][0] >= position:
        position = _fill_gap(rebuild, kept, position, kept[-1][0] + 1)
    problems.extend(_modifications(log_id, modified))
    _check_head(log_id, head, rebuild, position, report)
    await _beyond(connection, log_id, max(bound, position), report)


async def _rows(connection: AsyncConnection, log_id: str) -> int:
    """Entries and pruned rows of a log with no head: the size an intact log would have."""
    counts = [
        (
            await connection.execute(select(func.count()).where(table.c.log_id == log_id))
        ).scalar_one()
        for table in (entries, pruned)
    ]
    return sum(counts)


def _check_head(
    log_id: str,
    head: tuple[int, bytes, bytes] | None,
    rebuild: _Rebuild,
    position: int,
    report: VerifyReport,
) -> None:
    """Report what the head or the checkpoints count but the log lacks, and a head that lies."""
    problems = report.problems
    wanted = max([*rebuild.unreached(), head[0] if head is not None else 0])
    if wanted > position:
        problems.append(
            Problem(
                log_id,
                "missing",
                position,
                f"positions {position} to {wanted - 1} have no entry "
                "(the head or a signed checkpoint counts them)",
                wanted,
            )
        )
    if head is None:
        if position:
            problems.append(
                Problem(log_id, "head_mismatch", None, "the log has entries but no usable head row")
            )
        return
    if head[0] == position and (
        head[1] != rebuild.compact.root() or head[2] != rebuild.compact.to_bytes()
    ):
        problems.append(
            Problem(
                log_id,
                "head_mismatch",
                rebuild.last_good,
                "the head's root does not match the entries",
                head[0],
            )
        )


async def _head(
    connection: AsyncConnection, log_id: str, report: VerifyReport | None = None
) -> tuple[int, bytes, bytes] | None:
    """The head row's size, root and frontier; ``None`` (reported) when it is unusable."""
    statement = select(logs.c.size, logs.c.root_hash, logs.c.frontier).where(
        logs.c.log_id == log_id
    )
    row = (await connection.execute(statement)).first()
    if row is None:
        return None
    size, root, frontier = row
    if type(size) is not int or size < 0:
        if report is not None:
            report.problems.append(
                Problem(log_id, "malformed", None, f"the head row's size is not a size: {size!r}")
            )
        return None
    return size, root, frontier


async def _kept(
    context: _Context, connection: AsyncConnection, log_id: str, bound: int, report: VerifyReport
) -> list[tuple[int, bytes]]:
    """The log's pruned positions below ``bound`` that a proven prune accounts for, in order.

    Pruned rows out of range are reported as ``unexpected``; the others count
    only when their segment row covers them and matches the ``audit.prune``
    entry that names it (the rest are left to be reported ``missing``).
    """
    outside = or_(pruned.c.seq < 0, pruned.c.seq >= bound)
    low, high = (
        await connection.execute(
            select(func.min(pruned.c.seq), func.max(pruned.c.seq)).where(
                pruned.c.log_id == log_id, outside
            )
        )
    ).one()
    if low is not None:
        report.problems.append(
            _outside(log_id, low, high, "pruned rows at positions {} to {} lie outside the tree")
        )
    covering: dict[uuid.UUID, _Segment] = {}
    for row in await connection.execute(
        select(
            segments.c.id,
            segments.c.log_id,
            segments.c.first_seq,
            segments.c.last_seq,
            segments.c.entry_count,
            segments.c.tree_size,
            segments.c.archive_sha256,
            segments.c.archive_name,
        ).where(segments.c.log_id == log_id)
    ):
        recorded = context.evidence.get(row[0])
        if recorded is not None and recorded == _Segment(*row[1:7]):
            covering[row[0]] = recorded
            if context.archives is not None:
                problem = await asyncio.to_thread(
                    _check_archive, context.archives, log_id, row[7], recorded
                )
                if problem is not None:
                    report.problems.append(problem)
    rows = (
        await connection.execute(
            select(pruned.c.seq, pruned.c.leaf_hash, pruned.c.segment_id)
            .where(pruned.c.log_id == log_id, pruned.c.seq >= 0, pruned.c.seq < bound)
            .order_by(pruned.c.seq)
        )
    ).all()
    # A segment's range may skip entries that were kept; one more pruned row than
    # it recorded is an entry deleted under its name, so none of its rows count.
    claimed = collections.Counter(segment_id for _, _, segment_id in rows)
    kept: list[tuple[int, bytes]] = []
    for seq, leaf, segment_id in rows:
        segment = covering.get(segment_id)
        if (
            segment is not None
            and claimed[segment_id] == segment.entry_count
            and segment.first_seq <= seq <= segment.last_seq
            and seq < segment.tree_size
            and isinstance(leaf, bytes)
        ):
            kept.append((seq, leaf))
    return kept


def _check_archive(root: Path, log_id: str, name: Any, segment: _Segment) -> Problem | None:
    """Whether the segment's archive file is in ``root`` with its recorded SHA-256."""
    where = range(segment.first_seq, segment.last_seq + 1)
    path = (root / str(name)).resolve()
    if not path.is_relative_to(root.resolve()) or not path.is_file():
        return Problem(
            log_id,
            "archive_missing",
            where.start,
            f"the archive of positions {where.start} to {where.stop - 1} is not in {root}",
            where.stop,
        )
    if not hmac.compare_digest(_file_sha256(path), segment.sha256):
        return Problem(
            log_id,
            "archive_mismatch",
            where.start,
            f"the archive {name} is not the file that was recorded when it was pruned",
            where.stop,
        )
    return None


def _file_sha256(path: Path) -> bytes:
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").digest()


async def _beyond(
    connection: AsyncConnection, log_id: str, bound: int, report: VerifyReport
) -> None:
    """Report entries past ``bound`` that the head (read again now) does not count."""
    await connection.rollback()  # a fresh snapshot: the head and appends made meanwhile
    await _pin(connection)
    head = await _head(connection, log_id)
    limit = max(bound, head[0] if head is not None else 0)
    extra = (
        await connection.execute(
            select(func.min(entries.c.seq), func.max(entries.c.seq)).where(
                entries.c.log_id == log_id, entries.c.seq >= limit
            )
        )
    ).one()
    if extra[0] is not None:
        report.problems.append(
            _outside(log_id, extra[0], extra[1], "positions {} to {} are beyond the log's head")
        )


def _outside(log_id: str, low: Any, high: Any, message: str) -> Problem:
    """``unexpected`` rows from ``low`` to ``high``; ``malformed`` when those are not positions."""
    if type(low) is not int or type(high) is not int:
        # SQLite stores any type: text sorts after every number.
        return Problem(log_id, "malformed", None, message.format("?", "?") + " (not positions)")
    return Problem(log_id, "unexpected", low, message.format(low, high), high + 1)


_Leaf = tuple[Any, bytes | None, Any, Sequence[Any]]
"""One entry as verification sees it: position, recomputed leaf (``None`` when the row
cannot be encoded), stored leaf, columns."""


def _entry_columns() -> list[Any]:
    return [*(entries.c[name] for name in ENCODED_COLUMNS), entries.c.leaf_hash]


def _leaf_or_none(row: Sequence[Any]) -> bytes | None:
    try:
        return entry_leaf_hash(row[:_LEAF])
    except _MALFORMED:
        return None


async def _leaves(
    database: Database, connection: AsyncConnection, log_id: str, bound: int
) -> AsyncIterator[list[_Leaf]]:
    """The log's entries in ``seq`` order, below ``bound``, each with its leaf recomputed."""
    if database.kind is BackendKind.POSTGRES:
        async for chunk in _postgres_leaves(database, log_id, bound):
            yield chunk
        return
    # Raw values, converted row by row here: a value SQLite holds in the wrong
    # shape makes that row malformed instead of failing the whole batch.
    columns = _entry_columns()
    dialect = connection.dialect
    converters = [
        (index, processor)
        for index, column in enumerate(columns)
        if (processor := column.type.dialect_impl(dialect).result_processor(dialect, None))
        is not None
    ]
    statement = select(*(type_coerce(column, NullType()) for column in columns)).where(
        entries.c.log_id == log_id, entries.c.seq < bound
    )
    result = await connection.stream(
        statement.order_by(entries.c.seq).execution_options(yield_per=STREAM_BATCH)
    )
    async for partition in result.partitions():
        batch: list[_Leaf] = []
        for raw in partition:
            row = list(raw)
            try:
                for index, processor in converters:
                    row[index] = processor(row[index])
            except _MALFORMED:
                batch.append((row[_SEQ], None, row[_LEAF], row))
                continue
            batch.append((row[_SEQ], _leaf_or_none(row), row[_LEAF], row))
        yield batch


async def _postgres_leaves(
    database: Database, log_id: str, bound: int
) -> AsyncIterator[list[_Leaf]]:
    """PostgreSQL: encodings made by the server, chunks fetched ahead on other connections.

    Decoding eighteen columns per row costs asyncpg more than the whole rest of
    verification; the server's encoding of them is one ``bytea`` (measured: 2x
    the rows per second). The encoding calls ``pg_catalog`` functions only, with
    the search path pinned (no operator, nothing the table owner can define), so
    the bytes are the columns' own. A leaf that does not match its stored hash is
    re-derived from the columns by :func:`encode_entry`, which has the last word.
    """
    async with _connect(database) as connection:
        low, high = (
            await connection.execute(
                select(func.min(entries.c.seq), func.max(entries.c.seq)).where(
                    entries.c.log_id == log_id, entries.c.seq < bound
                )
            )
        ).one()
    if low is None:
        return
    statement = select(entries.c.seq, _POSTGRES_ENCODING, entries.c.leaf_hash).where(
        entries.c.log_id == log_id, entries.c.seq <= high
    )

    async def chunk(start: int) -> list[Any]:
        async with _connect(database) as reader:
            rows = await reader.execute(
                statement.where(entries.c.seq >= start, entries.c.seq < start + _CHUNK).order_by(
                    entries.c.seq
                )
            )
            return list(rows)

    start = low
    pending: deque[tuple[int, asyncio.Future[list[Any]]]] = deque()
    while True:
        # Chunks are fetched _AHEAD at a time, each on its own connection: the
        # server encodes the next ones (on other cores) while this one is hashed.
        while len(pending) < _AHEAD and start <= high:
            pending.append((start, asyncio.ensure_future(chunk(start))))
            start += _CHUNK
        if not pending:
            return
        first, future = pending.popleft()
        rows = await future
        if not rows:
            # A whole chunk with no entry (a tampered seq far away): jump to the next one.
            async with _connect(database) as reader:
                following = (
                    await reader.execute(
                        select(func.min(entries.c.seq)).where(
                            entries.c.log_id == log_id, entries.c.seq >= first + _CHUNK
                        )
                    )
                ).scalar_one()
            if following is None or following > high:
                start = high + 1
            elif following > start:
                start = following
            continue
        leaves: list[_Leaf] = []
        wrong: list[int] = []
        leaf_of = hash_leaf
        for seq, encoding, stored in rows:
            # NULL when a column the encoding needs is NULL: left to encode_entry.
            leaf = leaf_of(encoding) if encoding is not None else None
            if leaf is None or leaf != stored:
                wrong.append(seq)
            leaves.append((seq, leaf, stored, ()))
        if wrong:
            leaves = await _rederive(database, log_id, leaves, wrong)
        yield leaves


async def _rederive(
    database: Database, log_id: str, batch: list[_Leaf], wrong: list[int]
) -> list[_Leaf]:
    """Recompute the leaves that did not match from the columns, in Python."""
    async with _connect(database) as reader:
        rows = {
            row[_SEQ]: row
            for row in await reader.execute(
                select(*_entry_columns()).where(
                    entries.c.log_id == log_id, entries.c.seq.in_(wrong)
                )
            )
        }
    fixed: list[_Leaf] = []
    for seq, leaf, stored, columns in batch:
        row = rows.get(seq)
        if row is None:
            fixed.append((seq, leaf, stored, columns))
        else:
            fixed.append((seq, _leaf_or_none(row), stored, row))
    return fixed


def _sent(value: bytes) -> Any:
    return literal(value, LargeBinary())


def _concat(*parts: Any) -> Any:
    # byteacat, not ||: an operator is looked up by name and argument types, so
    # one the table owner defines could take its place; a qualified function cannot.
    return functools.reduce(
        lambda left, right: func.pg_catalog.byteacat(left, right, type_=LargeBinary()), parts
    )


def _postgres_field(name: str) -> Any:
    """The server-side twin of one field of :func:`encode_entry` (see ``_encoding``)."""
    column = entries.c[name]
    pg = func.pg_catalog  # qualified: a function planted earlier on the search path is ignored
    null = _sent(b"\xff\xff\xff\xff")
    if name == "seq":
        return _concat(_sent(b"\x00\x00\x00\x08"), pg.int8send(column))
    if name in {"id", "tenant_id"}:
        return func.coalesce(_concat(_sent(b"\x00\x00\x00\x10"), pg.uuid_send(column)), null)
    if name == "occurred_at":
        # EXTRACT is pg_catalog.extract by the grammar; numeric_mul instead of "*".
        epoch = cast(func.extract("epoch", column), Numeric())
        micros = cast(pg.numeric_mul(epoch, literal(1_000_000, Numeric())), BigInteger)
        return _concat(_sent(b"\x00\x00\x00\x08"), pg.int8send(micros))
    if name in {"email", "ip", "user_agent"}:
        return func.coalesce(_concat(pg.int4send(pg.octet_length(column)), column), null)
    return func.coalesce(
        _concat(pg.int4send(pg.octet_length(column)), pg.textsend(column)),
        null,
    )


_CHUNK: Final = 20_000
_AHEAD: Final = 2


def _fill_gap(rebuild: _Rebuild, kept: list[tuple[int, bytes]], position: int, seq: int) -> int:
    """Append pruned leaves (placeholders for missing runs) from ``position`` up to ``seq``.

    Each missing run is reported once and hashed in O(log n), whatever its length.
    """
    at = bisect.bisect_left(kept, position, key=lambda item: item[0])
    while position < seq:
        if at < len(kept) and kept[at][0] < seq:
            found, leaf = kept[at]
            at += 1
        else:
            found, leaf = seq, b""
        if found > position:
            rebuild.report.problems.append(_missing(rebuild.log_id, position, found))
            rebuild.skip(found - position)
            position = found
        if leaf:
            rebuild.append(leaf)
            position += 1
    return position


def _missing(log_id: str, start: int, end: int) -> Problem:
    span = f"position {start}" if end == start + 1 else f"positions {start} to {end - 1}"
    return Problem(
        log_id, "missing", start, f"{span}: no entry, and no recorded prune accounts for it", end
    )


def _modifications(log_id: str, modified: dict[int, Sequence[Any]]) -> list[Problem]:
    """``modified`` problems, with pairs whose contents were swapped told as ``reordered``."""
    found: list[Problem] = []
    swapped: set[int] = set()
    order = sorted(modified)
    for first, second in itertools.pairwise(order):
        if first in swapped or not modified[first] or not modified[second]:
            continue
        if (
            _hashes_at(modified[first], second) == modified[second][_LEAF]
            and _hashes_at(modified[second], first) == modified[first][_LEAF]
        ):
            swapped.update((first, second))
            message = f"positions {first} and {second} hold each other's entries"
            found.append(Problem(log_id, "reordered", first, message))
            found.append(Problem(log_id, "reordered", second, message))
    found.extend(
        Problem(
            log_id,
            "modified",
            seq,
            f"position {seq}: the entry's fields do not hash to its recorded leaf",
        )
        for seq in order
        if seq not in swapped
    )
    return found


def _hashes_at(row: Sequence[Any], seq: int) -> bytes | None:
    values = list(row[:_LEAF])
    values[_SEQ] = seq
    return _leaf_or_none(values)


_POSTGRES_ENCODING: Final = _concat(
    _sent(bytes([ENCODING_VERSION])), *(_postgres_field(name) for name in ENCODED_COLUMNS)
)
