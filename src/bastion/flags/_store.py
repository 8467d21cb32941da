"""The flag store: flags and segments in the database, versioned, audited, one change per write.

Every write is one transaction that holds the row, a ``bastion_flag_changes`` row
(who, when, the definition before and after) and the audit event, so none of the
three exists without the others. Writes are optimistic: a writer names the version
it read (``expected_version``), and a flag that moved since is refused with
:class:`~bastion.flags._errors.FlagVersionMismatch` rather than overwritten.

The revision of the set is the id of its last change. On PostgreSQL ids are
handed out when a row is inserted, not when it commits, so two concurrent writers
could commit ids 6 then 5, and an instance that read ``max(id) = 6`` between the
two commits would never look again for 5. Writers therefore take a lock on the
change table first (``SHARE ROW EXCLUSIVE``: writers queue, readers do not wait),
which makes commit order id order. Flag changes are operator actions, a few per
minute at most: serialising them costs nothing anyone can see. SQLite has one
writer at a time already.

Every write of a flag (create, update, toggle, import) first folds the schedule
entries already due into ``enabled`` and drops them, then applies its own change:
a stored flag holds only future entries, and a toggle wins over an entry that fell
due before it.

Reads are lenient where one row must not stop the rest: loading the set skips a
stored definition that no longer validates (logged by key, counted in
``bastion_flags_invalid_rows``), and fields this release does not know (written
by a newer one during a rolling deploy) are ignored.

Who: the actor is who authenticated (a user, an API key, ``system:operator`` for
the admin token, ``system:cli``). An operator behind a shared credential may also
claim a name (``operator=``); it is not authenticated, so it never becomes the
actor: the audit event carries it as ``details.operator``, and the who of the
change row and of the flag reads ``system:operator (claimed: alice)`` (the tables
have no column of their own for it).

After a write commits, the store calls ``on_change(revision)`` (set by the
runtime), which refreshes this instance at once and tells the others.
"""

from __future__ import annotations

import builtins
import contextvars
import datetime as dt
import hashlib
import unicodedata
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar

import orjson
import structlog
from pydantic import ValidationError
from sqlalchemy import delete, func, insert, select, text, update
from sqlalchemy.ext.asyncio import AsyncSession

from bastion.audit import Actor, AuditEvent, Resource
from bastion.backends import BackendKind
from bastion.data import run_transaction, transaction
from bastion.data.types import utc_now
from bastion.errors import FieldError, InvalidInput
from bastion.flags._errors import (
    FlagExists,
    FlagNotFound,
    FlagVersionMismatch,
    InvalidFlag,
    SegmentInUse,
    SegmentNotFound,
    StoredFlagInvalid,
)
from bastion.flags._model import LENIENT_OPERANDS, Flag, Segment
from bastion.flags._tables import ACTOR_MAX, changes, flags, segments
from bastion.observability.metrics import FLAGS_INVALID_ROWS

if TYPE_CHECKING:
    from bastion.audit import AuditLog
    from bastion.data import Database

__all__ = [
    "OPERATOR_MAX",
    "SCHEDULE_ACTOR",
    "ChangeKind",
    "FlagChange",
    "FlagStore",
    "ImportReport",
    "StoredFlag",
    "StoredSegment",
    "check_operator",
]

logger = structlog.get_logger("bastion.flags")

ChangeKind = Literal["flag", "segment"]

SCHEDULE_ACTOR: Final = Actor.system("flags.schedule")
"""Who persists a flag's due scheduled changes (:meth:`FlagStore.apply_due`)."""

OnChange = Callable[[int], Awaitable[None]]
T = TypeVar("T")
M = TypeVar("M", Flag, Segment)

_REVISION: Final = select(func.coalesce(func.max(changes.c.id), 0))
"""The set's revision: one read of the change table's primary key index."""

OPERATOR_MAX: Final = 128
"""Longest operator name claimed (``X-Operator``, ``--operator``)."""
_UNPRINTABLE: Final = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})
_VIA_IMPORT: Final = {"via": "import"}
_IMPORT_EVENTS: contextvars.ContextVar[list[AuditEvent] | None] = contextvars.ContextVar(
    "bastion_flags_import_events", default=None
)
"""While an import runs: where the events of the flags and segments it writes gather."""
"""What marks the audit events of the flags and segments an import writes."""


def _etag(key: str, moment: dt.datetime, version: int) -> str:
    # A time is folded in: a flag deleted and created again starts over at version
    # 1, and an If-Match read before the delete must not match it.
    stamp = moment.astimezone(dt.UTC).isoformat()
    digest = hashlib.blake2b(f"{key}\0{stamp}".encode(), digest_size=6).hexdigest()
    return f'"{version}.{digest}"'


@dataclass(frozen=True, slots=True)
class StoredFlag:
    """A flag as stored: its definition and version, and who changed it last, when.

    Attributes:
        flag: the definition.
        version: 1 when created, plus one per change.
        created_at: when the key was created (a re-created key starts anew).
        updated_at: when the last change committed.
        updated_by: ``<actor type>:<actor id>`` of the last change, with
            `` (claimed: <name>)`` when an operator claimed a name.
    """

    flag: Flag
    version: int
    created_at: dt.datetime
    updated_at: dt.datetime
    updated_by: str | None

    @property
    def etag(self) -> str:
        """A strong ETag of this version (``If-Match`` of the admin routes)."""
        return _etag(self.flag.key, self.created_at, self.version)


@dataclass(frozen=True, slots=True)
class StoredSegment:
    """A segment as stored, with its version.

    Attributes:
        segment: the definition.
        version: 1 when created, plus one per change.
        updated_at: when the last change committed.
        updated_by: ``<actor type>:<actor id>`` of the last change, with
            `` (claimed: <name>)`` when an operator claimed a name.
    """

    segment: Segment
    version: int
    updated_at: dt.datetime
    updated_by: str | None

    @property
    def etag(self) -> str:
        """A strong ETag of this version."""
        # Segments keep no creation time; the time of this version tells a segment
        # deleted and made again apart just as well.
        return _etag(self.segment.name, self.updated_at, self.version)


@dataclass(frozen=True, slots=True)
class FlagChange:
    """One row of a flag's (or segment's) history.

    Attributes:
        id: the change's id: the set's revision once it committed.
        kind: ``flag`` or ``segment``.
        key: the flag key or segment name.
        action: ``create``, ``update``, ``toggle``, ``delete``, ``import`` or ``schedule``.
        version: the version the change made (for a delete, the version deleted).
        actor: ``<actor type>:<actor id>``, with `` (claimed: <name>)`` when the
            operator claimed a name (``X-Operator``, ``--operator``): not authenticated.
        at: when.
        before: the definition before (``None`` for a create).
        after: the definition after (``None`` for a delete).
    """

    id: int
    kind: ChangeKind
    key: str
    action: str
    version: int
    actor: str | None
    at: dt.datetime
    before: dict[str, Any] | None
    after: dict[str, Any] | None


@dataclass(slots=True)
class ImportReport:
    """What :meth:`FlagStore.import_flags` did, by flag key and segment name.

    Attributes:
        created: flags that did not exist.
        updated: flags whose definition changed.
        unchanged: flags imported exactly as stored (left alone, no new version).
        deleted: flags removed because the import replaced the set.
        segments_created: segments that did not exist.
        segments_updated: segments whose definition changed.
        segments_deleted: segments removed because the import replaced the set.
        revision: the set's revision after the import.
    """

    created: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    deleted: list[str] = field(default_factory=list)
    segments_created: list[str] = field(default_factory=list)
    segments_updated: list[str] = field(default_factory=list)
    segments_deleted: list[str] = field(default_factory=list)
    revision: int = 0

    @property
    def changed(self) -> bool:
        """Whether the import wrote anything."""
        return any(
            (
                self.created,
                self.updated,
                self.deleted,
                self.segments_created,
                self.segments_updated,
                self.segments_deleted,
            )
        )

    def counts(self) -> dict[str, int]:
        """The number of each, as the ``flag.import`` audit event records them."""
        return {
            "created": len(self.created),
            "updated": len(self.updated),
            "unchanged": len(self.unchanged),
            "deleted": len(self.deleted),
            "segments_created": len(self.segments_created),
            "segments_updated": len(self.segments_updated),
            "segments_deleted": len(self.segments_deleted),
        }


def _dump(model: Flag | Segment) -> dict[str, Any]:
    return model.model_dump(mode="json")


def _text(definition: dict[str, Any] | None) -> str | None:
    if definition is None:
        return None
    # Sorted keys: equal definitions store as equal text, and diffs read well.
    return orjson.dumps(definition, option=orjson.OPT_SORT_KEYS).decode()


def _actor_text(actor: Actor) -> str:
    name = f"{actor.type}:{actor.id}" if actor.id is not None else str(actor.type)
    return name[:ACTOR_MAX]


def check_operator(name: str | None, *, field: str = "operator") -> str | None:
    """Return the operator name claimed, trimmed; ``None`` when none is claimed.

    A name is 1 to :data:`OPERATOR_MAX` characters on one line, with no control or
    invisible formatting characters: it is printed in histories and logs, where a
    newline or a right-to-left override could forge another entry.

    Raises:
        InvalidInput: anything else (``field`` names where it came from).
    """
    if name is None:
        return None
    trimmed = name.strip()
    if (
        not trimmed
        or len(trimmed) > OPERATOR_MAX
        or any(unicodedata.category(char) in _UNPRINTABLE for char in trimmed)
    ):
        raise InvalidInput(
            errors=[
                FieldError(
                    field,
                    "invalid",
                    f"the operator's name is 1 to {OPERATOR_MAX} printable characters on one line.",
                )
            ]
        )
    return trimmed


@dataclass(frozen=True, slots=True)
class _Who:
    """Who writes: the actor, and the operator's name it claimed, if any (not authenticated)."""

    actor: Actor
    operator: str | None = None

    @property
    def text(self) -> str:
        """The change row's and the flag's who: ``system:operator (claimed: alice)``."""
        # The tables hold no column of their own for the claim (no migration for a
        # label): the who field carries it, marked as claimed.
        base = _actor_text(self.actor)
        if self.operator is None:
            return base
        return f"{base} (claimed: {self.operator})"[:ACTOR_MAX]

    def details(self) -> dict[str, str]:
        """What the audit event's details add: ``{"operator": name}`` when one was claimed."""
        return {} if self.operator is None else {"operator": self.operator}


def _changed(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    """Top-level fields whose values differ: what the audit event names (never the values)."""
    return sorted(
        name for name in before.keys() | after.keys() if before.get(name) != after.get(name)
    )


def _cited(flag: Flag) -> set[str | int]:
    return {segment for rule in flag.rules for segment in rule.segments}


def _resolves(reference: str | int, names: set[str], ids: set[int]) -> bool:
    if isinstance(reference, int):
        return reference in ids
    return reference in names or (reference.isdigit() and int(reference) in ids)


def _check_segments(flag_list: Iterable[Flag], known: Iterable[Segment]) -> None:
    """Raise :class:`InvalidFlag` naming the flags that cite a segment not in ``known``."""
    known = list(known)
    names = {segment.name for segment in known}
    ids = {segment.id for segment in known if segment.id is not None}
    problems = []
    for flag in flag_list:
        missing = sorted(str(ref) for ref in _cited(flag) if not _resolves(ref, names, ids))
        if missing:
            problems.append(f"{flag.key!r} cites unknown segment(s) {', '.join(missing)}")
    if problems:
        raise InvalidFlag(
            "Flag " + "; ".join(problems[:10]) + ".", field="body.rules", code="unknown_segment"
        )


def _users_of(segment: Segment, stored: Iterable[Flag]) -> list[str]:
    """The keys of the flags that cite ``segment`` (by name or by Unleash id)."""

    def cites(reference: str | int) -> bool:
        if isinstance(reference, int):
            return reference == segment.id
        return reference == segment.name or (
            segment.id is not None and reference == str(segment.id)
        )

    return [flag.key for flag in stored if any(cites(ref) for ref in _cited(flag))]


class FlagStore:
    """Flags and segments in bastion's tables.

    Args:
        database: where the tables are (``bastion migrate`` makes them).
        audit: the audit trail every write records into, in the write's
            transaction; ``None`` when the audit trail is off.
        clock: now, aware (tests pass a fixed one).

    Attributes:
        on_change: called with the new revision after each write commits; the
            runtime sets it (refresh this instance, notify the others). Its
            failure is logged, never raised: the write committed.

    Example:
        >>> store = FlagStore(database, audit=audit_log)
        >>> stored = await store.create(Flag(key="new-editor"), actor=Actor.user(user_id))
        >>> await store.toggle("new-editor", True, expected_version=stored.version, actor=actor)
    """

    def __init__(
        self,
        database: Database,
        *,
        audit: AuditLog | None = None,
        clock: Callable[[], dt.datetime] = utc_now,
    ) -> None:
        self.database = database
        self.audit = audit
        self.on_change: OnChange | None = None
        self._clock = clock
        self._postgres = database.kind is BackendKind.POSTGRES

    # -- reads ---------------------------------------------------------------------------

    async def revision(self) -> int:
        """The id of the last change; ``0`` when nothing was ever written.

        One read of the change table's primary key: what every poll costs.
        """
        async with self.database.engine.connect() as connection:
            found = await connection.scalar(_REVISION)
        return int(found or 0)

    async def snapshot(self) -> tuple[int, list[Flag], list[Segment]]:
        """The revision, every flag and every segment, read in one snapshot (to compile)."""
        # REPEATABLE READ: one snapshot for the three reads on PostgreSQL, so the
        # revision names exactly the flags read. SQLite's BEGIN gives the same.
        async with transaction("REPEATABLE READ", database=self.database) as session:
            revision = await session.scalar(_REVISION)
            flag_rows = await session.execute(
                select(flags.c.key, flags.c.definition).order_by(flags.c.key)
            )
            segment_rows = await session.execute(
                select(segments.c.name, segments.c.definition).order_by(segments.c.name)
            )
            flag_list = _valid(Flag, "flag", ((row.key, row.definition) for row in flag_rows))
            segment_list = _valid(
                Segment, "segment", ((row.name, row.definition) for row in segment_rows)
            )
        # What this load skipped; the warning per row names them.
        FLAGS_INVALID_ROWS.set(len(flag_list.skipped) + len(segment_list.skipped))
        return int(revision or 0), list(flag_list), list(segment_list)

    async def list(self) -> builtins.list[StoredFlag]:
        """Every flag, by key; a stored flag that no longer validates is skipped (logged)."""
        async with self.database.engine.connect() as connection:
            rows = await connection.execute(select(flags).order_by(flags.c.key))
            return _valid_rows(rows, _stored_flag)

    async def empty(self) -> bool:
        """Whether no flag is stored at all (valid or not): when the seed file is imported."""
        async with self.database.engine.connect() as connection:
            found = await connection.scalar(select(flags.c.key).limit(1))
        return found is None

    async def get(self, key: str) -> StoredFlag:
        """The flag ``key``.

        Raises:
            FlagNotFound: no flag has this key.
            StoredFlagInvalid: the stored row no longer validates (a 500: the
                server's data is at fault, not the request).
        """
        async with self.database.engine.connect() as connection:
            row = (await connection.execute(select(flags).where(flags.c.key == key))).first()
        if row is None:
            raise FlagNotFound(key)
        return _stored_flag(row)

    async def segments(self) -> builtins.list[StoredSegment]:
        """Every segment, by name."""
        async with self.database.engine.connect() as connection:
            rows = await connection.execute(select(segments).order_by(segments.c.name))
            return _valid_rows(rows, _stored_segment)

    async def get_segment(self, name: str) -> StoredSegment:
        """The segment ``name``.

        Raises:
            SegmentNotFound: no segment has this name.
        """
        async with self.database.engine.connect() as connection:
            row = (
                await connection.execute(select(segments).where(segments.c.name == name))
            ).first()
        if row is None:
            raise SegmentNotFound(name)
        return _stored_segment(row)

    async def history(
        self, key: str, *, limit: int = 50, kind: ChangeKind = "flag"
    ) -> builtins.list[FlagChange]:
        """The last ``limit`` changes of a flag (or segment), newest first.

        A deleted flag keeps its history; a key never written has none (no error).
        """
        query = (
            select(changes)
            .where(changes.c.kind == kind, changes.c.key == key)
            .order_by(changes.c.id.desc())
            .limit(max(1, limit))
        )
        async with self.database.engine.connect() as connection:
            rows = await connection.execute(query)
            return [
                FlagChange(
                    id=row.id,
                    kind=row.kind,
                    key=row.key,
                    action=row.action,
                    version=row.version,
                    actor=row.actor,
                    at=row.at,
                    before=orjson.loads(row.before) if row.before is not None else None,
                    after=orjson.loads(row.after) if row.after is not None else None,
                )
                for row in rows
            ]

    # -- flag writes ---------------------------------------------------------------------

    async def create(self, flag: Flag, *, actor: Actor, operator: str | None = None) -> StoredFlag:
        """Store a new flag at version 1.

        ``operator`` (here and on every write) is the name an operator claimed
        (``X-Operator``, ``bastion flags --operator``): kept in the audit event's
        details and in the change's who, never taken for the actor.

        Raises:
            FlagExists: the key is taken.
            InvalidFlag: the flag cites a segment that does not exist.
        """
        who = _Who(actor, check_operator(operator))

        async def unit(session: AsyncSession) -> tuple[StoredFlag, int]:
            await self._lock(session)
            if await self._row(session, flag.key) is not None:
                raise FlagExists(flag.key)
            _check_segments([flag], await self._all_segments(session))
            folded = _fold(flag, self._clock())
            stored, revision = await self._insert(session, folded, who, "create")
            await self._audit(session, "flag.create", who, flag.key, {"version": 1})
            return stored, revision

        return await self._write(unit)

    async def update(
        self,
        flag: Flag,
        *,
        expected_version: int | None,
        actor: Actor,
        expected_etag: str | None = None,
        operator: str | None = None,
    ) -> StoredFlag:
        """Replace a flag's definition (the key names it).

        Schedule entries already due are folded into ``enabled`` and dropped
        (as on every write), so the stored flag holds only future ones.

        Args:
            flag: the new definition.
            expected_version: the version the change was made against; ``None``:
                no precondition (an operator's ``--force``).
            actor: who.
            expected_etag: the ETag the change was made against (``If-Match``);
                unlike the version, it tells a flag deleted and created again apart.
            operator: the name the operator claimed (see :meth:`create`).

        Raises:
            FlagNotFound: no flag has this key.
            FlagVersionMismatch: the flag is at another version now.
            InvalidFlag: the flag cites a segment that does not exist.
        """
        who = _Who(actor, check_operator(operator))

        async def unit(session: AsyncSession) -> tuple[StoredFlag, int]:
            await self._lock(session)
            current = await self._current(session, flag.key, expected_version, expected_etag)
            _check_segments([flag], await self._all_segments(session))
            folded = _fold(flag, self._clock())
            return await self._replace(session, current, folded, who, "update")

        return await self._write(unit)

    async def toggle(
        self,
        key: str,
        enabled: bool,
        *,
        expected_version: int | None,
        actor: Actor,
        expected_etag: str | None = None,
        operator: str | None = None,
    ) -> StoredFlag:
        """Switch a flag on or off (its kill switch), keeping the rest of its definition.

        Schedule entries already due are folded in and dropped first, so the toggle
        wins over an entry that fell due before it (and nothing is left to undo it).

        Raises:
            FlagNotFound: no flag has this key.
            FlagVersionMismatch: the flag is at another version now.
        """
        who = _Who(actor, check_operator(operator))

        async def unit(session: AsyncSession) -> tuple[StoredFlag, int]:
            await self._lock(session)
            current = await self._current(session, key, expected_version, expected_etag)
            flag = _fold(current.flag, self._clock()).model_copy(update={"enabled": enabled})
            return await self._replace(
                session, current, flag, who, "toggle", extra={"enabled": enabled}
            )

        return await self._write(unit)

    async def delete(
        self,
        key: str,
        *,
        expected_version: int | None,
        actor: Actor,
        expected_etag: str | None = None,
        operator: str | None = None,
    ) -> None:
        """Delete a flag; its history stays.

        Raises:
            FlagNotFound: no flag has this key.
            FlagVersionMismatch: the flag is at another version now.
        """
        who = _Who(actor, check_operator(operator))

        async def unit(session: AsyncSession) -> tuple[None, int]:
            await self._lock(session)
            current = await self._current(session, key, expected_version, expected_etag)
            revision = await self._delete_flag(session, current, who, "delete")
            await self._audit(session, "flag.delete", who, key, {"version": current.version})
            return None, revision

        await self._write(unit)

    # -- segments ------------------------------------------------------------------------

    async def put_segment(
        self,
        segment: Segment,
        *,
        expected_version: int | None,
        actor: Actor,
        expected_etag: str | None = None,
        operator: str | None = None,
    ) -> StoredSegment:
        """Create or replace a segment.

        Args:
            segment: the definition (its name names it).
            expected_version: the version the change was made against; ``None``:
                no precondition; ``0``: the segment must not exist yet.
            actor: who.
            expected_etag: the ETag the change was made against (``If-Match``).
            operator: the name the operator claimed (see :meth:`create`).

        Raises:
            SegmentNotFound: ``expected_version`` (or ``expected_etag``) names a
                version of a segment that does not exist.
            FlagVersionMismatch: the segment exists at another version.
            InvalidFlag: the new definition drops an Unleash id that flags cite, or
                takes an Unleash id another segment has.
        """
        who = _Who(actor, check_operator(operator))

        async def unit(session: AsyncSession) -> tuple[StoredSegment, int]:
            await self._lock(session)
            current = await self._segment_row(session, segment.name)
            if current is None:
                if expected_version not in (None, 0) or expected_etag is not None:
                    raise SegmentNotFound(segment.name)
            else:
                _check_precondition(
                    segment.name, current.version, current.etag, expected_version, expected_etag
                )
            if segment.id is not None or (current is not None and current.segment.id is not None):
                others = [
                    stored.segment
                    for stored in await self._segment_rows(session)
                    if stored.segment.name != segment.name
                ]
                _check_segment_ids([*others, segment])
                if current is not None and current.segment.id != segment.id:
                    # A changed Unleash id would orphan the rules that cite the old one.
                    _check_segments(await self._all_flags(session), [*others, segment])
            stored, revision = await self._put_segment(session, segment, current, who)
            return stored, revision

        return await self._write(unit)

    async def delete_segment(
        self,
        name: str,
        *,
        expected_version: int | None,
        actor: Actor,
        expected_etag: str | None = None,
        operator: str | None = None,
    ) -> None:
        """Delete a segment no flag cites.

        Raises:
            SegmentNotFound: no segment has this name.
            FlagVersionMismatch: the segment is at another version now.
            SegmentInUse: flags cite it (they are named).
        """
        who = _Who(actor, check_operator(operator))

        async def unit(session: AsyncSession) -> tuple[None, int]:
            await self._lock(session)
            current = await self._segment_row(session, name)
            if current is None:
                raise SegmentNotFound(name)
            _check_precondition(
                name, current.version, current.etag, expected_version, expected_etag
            )
            users = _users_of(current.segment, await self._all_flags(session))
            if users:
                raise SegmentInUse(name, users)
            revision = await self._delete_segment_row(session, current, who)
            return None, revision

        await self._write(unit)

    # -- bulk ----------------------------------------------------------------------------

    async def import_flags(
        self,
        flag_list: Iterable[Flag],
        segment_list: Iterable[Segment] = (),
        *,
        actor: Actor,
        replace: bool = False,
        fields: frozenset[str] | None = None,
        expected_revision: int | None = None,
        operator: str | None = None,
    ) -> ImportReport:
        """Import a whole set in one transaction: each flag created or updated.

        Flags stored exactly as imported are left alone (no new version), so
        importing the same file twice changes nothing. Schedule entries already
        due are folded into ``enabled`` and dropped, as on every write. With ``replace``, the
        stored set becomes the import: flags and segments it does not hold are
        deleted. Each flag or segment written gets its change row and the audit
        event a single write of it records (``flag.create``, ``flag.update``,
        ``flag.delete``, ``flag.segment.update``, ``flag.segment.delete``, their
        details marked ``"via": "import"``), and the import one ``flag.import``
        event with the counts; all in the import's transaction.

        Args:
            flag_list: the flags.
            segment_list: the segments they cite (and any others).
            actor: who.
            replace: delete what the import does not hold.
            fields: the top-level :class:`Flag` fields the import sets on a flag
                that exists (the rest are kept from the stored flag); ``None``: all.
                An Unleash import passes the fields Unleash knows, so bastion's own
                (tenants, schedule, owner...) survive it.
            expected_revision: the set's revision the import was prepared against;
                ``None``: no precondition.
            operator: the name the operator claimed (see :meth:`create`).

        Raises:
            InvalidFlag: a key or an Unleash segment id appears twice, a flag cites a
                segment that is neither imported nor (without ``replace``) stored, or
                a flag merged with the stored one is not valid.
            FlagVersionMismatch: the set is at another revision than ``expected_revision``.
        """
        who = _Who(actor, check_operator(operator))
        incoming: dict[str, Flag] = _unique(list(flag_list), lambda flag: flag.key, "flag")
        incoming_segments: dict[str, Segment] = _unique(
            list(segment_list), lambda segment: segment.name, "segment"
        )

        after_commit: builtins.list[AuditEvent] = []

        async def changes_of_import(session: AsyncSession) -> tuple[ImportReport, int]:
            await self._lock(session)
            if expected_revision is not None:
                revision_now = int(await session.scalar(_REVISION) or 0)
                if revision_now != expected_revision:
                    raise FlagVersionMismatch(None, revision_now)
            report = ImportReport()
            stored_segments = {s.segment.name: s for s in await self._segment_rows(session)}
            stored_flags = {s.flag.key: s for s in await self._flag_rows(session)}
            now = self._clock()
            merged = {
                key: _fold(
                    _merge(stored_flags[key].flag, flag, fields)
                    if fields is not None and key in stored_flags
                    else flag,
                    now,
                )
                for key, flag in incoming.items()
            }
            # The set as it will be, checked whole before anything is written.
            final_segments = dict(incoming_segments)
            final_flags = dict(merged)
            if not replace:
                for name, stored_segment in stored_segments.items():
                    final_segments.setdefault(name, stored_segment.segment)
                for key, stored_flag in stored_flags.items():
                    final_flags.setdefault(key, stored_flag.flag)
            _check_segment_ids(final_segments.values())
            _check_segments(final_flags.values(), final_segments.values())
            revision = await self._import_segments(
                session, incoming_segments, stored_segments, who, report
            )
            revision = max(
                revision, await self._import_flags(session, merged, stored_flags, who, report)
            )
            if replace:
                for key, current in stored_flags.items():
                    if key not in incoming:
                        revision = await self._delete_flag(session, current, who, "import")
                        details = {"version": current.version, **_VIA_IMPORT}
                        await self._audit(session, "flag.delete", who, key, details)
                        report.deleted.append(key)
                for name, current_segment in stored_segments.items():
                    if name not in incoming_segments:
                        revision = await self._delete_segment_row(
                            session, current_segment, who, action="import", extra=_VIA_IMPORT
                        )
                        report.segments_deleted.append(name)
            if not report.changed:
                report.revision = await session.scalar(_REVISION) or 0
                return report, 0
            report.revision = revision
            return report, revision

        result: ImportReport = await self._write(
            lambda session: self._audited_import(
                session, changes_of_import, who, replace=replace, after_commit=after_commit
            )
        )
        for event in after_commit:
            # Committed: each waits for room in the buffer (back-pressure), not holding
            # the flags' lock; a crash before they are written loses them (the async
            # mode's bound), the flag.import summary and the change rows stay.
            await self._record(event, None)
        return result

    async def _audited_import(
        self,
        session: AsyncSession,
        apply: Callable[[AsyncSession], Awaitable[tuple[ImportReport, int]]],
        who: _Who,
        *,
        replace: bool,
        after_commit: builtins.list[AuditEvent],
    ) -> tuple[ImportReport, int]:
        """Run an import's writes, then its per-flag events and its ``flag.import`` summary."""
        after_commit.clear()  # a retried transaction starts over
        events: builtins.list[AuditEvent] = []
        gathering = _IMPORT_EVENTS.set(events)
        try:
            report, revision = await apply(session)
        finally:
            _IMPORT_EVENTS.reset(gathering)
        if not report.changed:
            return report, 0
        if self._stage_in_transaction(len(events)):
            for event in events:
                await self._record(event, session)
        else:
            after_commit.extend(events)
        details = {**report.counts(), "replace": replace}
        await self._audit(session, "flag.import", who, None, details)
        return report, revision

    def _stage_in_transaction(self, count: int) -> bool:
        """Whether an import's per-flag events go in its transaction, or right after it.

        In ``async`` mode each event staged on a transaction holds a place in the
        audit buffer until the commit: an import of thousands of flags would take
        the buffer from every other request (or never fit, and fail). Beyond a
        quarter of it, they are recorded once the import has committed.
        """
        audit = self.audit
        if audit is None or audit.settings.mode == "sync":
            return True
        return count <= audit.settings.buffer_size // 4

    async def apply_due(self, now: dt.datetime) -> builtins.list[str]:
        """Persist the scheduled changes due at ``now``: the keys of the flags changed.

        For each flag with schedule entries at or before ``now``, ``enabled``
        becomes the last due entry's value and the due entries are dropped, as a
        new version (change action ``schedule``, audit ``flag.schedule`` by
        :data:`SCHEDULE_ACTOR`). Every instance may run this at once: the writes
        are conditional on the version read, and the instance that loses finds
        nothing due, or another version, and does nothing.
        """
        due = [flag.key for flag in (await self.snapshot())[1] if _due(flag, now)]
        if not due:
            return []

        async def unit(session: AsyncSession) -> tuple[builtins.list[str], int]:
            await self._lock(session)
            applied: builtins.list[str] = []
            revision = 0
            for key in due:
                current = await self._row(session, key)
                if current is None or not _due(current.flag, now):
                    continue
                remaining = tuple(change for change in current.flag.schedule if change.at > now)
                enabled = current.flag.enabled_at(now)
                flag = current.flag.model_copy(update={"enabled": enabled, "schedule": remaining})
                try:
                    _, revision = await self._replace(
                        session,
                        current,
                        flag,
                        _Who(SCHEDULE_ACTOR),
                        "schedule",
                        extra={"enabled": enabled},
                        event="flag.schedule",
                    )
                except (FlagNotFound, FlagVersionMismatch):
                    continue  # another instance applied it first
                applied.append(key)
            return applied, revision

        return await self._write(unit)

    # -- internals -----------------------------------------------------------------------

    async def _import_segments(
        self,
        session: AsyncSession,
        incoming: dict[str, Segment],
        stored: dict[str, StoredSegment],
        who: _Who,
        report: ImportReport,
    ) -> int:
        revision = 0
        for name, segment in incoming.items():
            current = stored.get(name)
            if current is not None and _dump(current.segment) == _dump(segment):
                continue
            _, revision = await self._put_segment(
                session, segment, current, who, "import", extra=_VIA_IMPORT
            )
            (report.segments_created if current is None else report.segments_updated).append(name)
        return revision

    async def _import_flags(
        self,
        session: AsyncSession,
        incoming: dict[str, Flag],
        stored: dict[str, StoredFlag],
        who: _Who,
        report: ImportReport,
    ) -> int:
        revision = 0
        for key, flag in incoming.items():
            current = stored.get(key)
            if current is None:
                _, revision = await self._insert(session, flag, who, "import")
                await self._audit(session, "flag.create", who, key, {"version": 1, **_VIA_IMPORT})
                report.created.append(key)
            elif _dump(current.flag) == _dump(flag):
                report.unchanged.append(key)
            else:
                written = await self._replace(
                    session, current, flag, who, "import", extra=_VIA_IMPORT, event="flag.update"
                )
                revision = written[1]
                report.updated.append(key)
        return revision

    async def _write(self, unit: Callable[[AsyncSession], Awaitable[tuple[T, int]]]) -> T:
        result, revision = await run_transaction(unit, database=self.database)
        if revision and self.on_change is not None:
            try:
                await self.on_change(revision)
            except Exception as exc:  # noqa: BLE001 -- committed: the poll catches up
                logger.warning("flag change not propagated", error=type(exc).__name__)
        return result

    async def _lock(self, session: AsyncSession) -> None:
        if self._postgres:
            # See the module docstring: commit order must be id order.
            await session.execute(
                text("LOCK TABLE bastion_flag_changes IN SHARE ROW EXCLUSIVE MODE")
            )

    async def _row(self, session: AsyncSession, key: str) -> StoredFlag | None:
        row = (await session.execute(select(flags).where(flags.c.key == key))).first()
        return _stored_flag(row) if row is not None else None

    async def _current(
        self,
        session: AsyncSession,
        key: str,
        expected_version: int | None,
        expected_etag: str | None = None,
    ) -> StoredFlag:
        current = await self._row(session, key)
        if current is None:
            raise FlagNotFound(key)
        _check_precondition(key, current.version, current.etag, expected_version, expected_etag)
        return current

    async def _flag_rows(self, session: AsyncSession) -> builtins.list[StoredFlag]:
        # Rows that no longer validate are left out (logged): one must not block
        # every import and segment change.
        return _valid_rows(await session.execute(select(flags)), _stored_flag)

    async def _all_flags(self, session: AsyncSession) -> builtins.list[Flag]:
        return [stored.flag for stored in await self._flag_rows(session)]

    async def _segment_row(self, session: AsyncSession, name: str) -> StoredSegment | None:
        row = (await session.execute(select(segments).where(segments.c.name == name))).first()
        return _stored_segment(row) if row is not None else None

    async def _segment_rows(self, session: AsyncSession) -> builtins.list[StoredSegment]:
        return _valid_rows(await session.execute(select(segments)), _stored_segment)

    async def _all_segments(self, session: AsyncSession) -> builtins.list[Segment]:
        return [stored.segment for stored in await self._segment_rows(session)]

    async def _insert(
        self, session: AsyncSession, flag: Flag, who: _Who, action: str
    ) -> tuple[StoredFlag, int]:
        now = self._clock()
        after = _dump(flag)
        by = who.text
        await session.execute(
            insert(flags).values(
                key=flag.key,
                definition=_text(after),
                version=1,
                created_at=now,
                updated_at=now,
                updated_by=by,
            )
        )
        revision = await self._change(
            session,
            "flag",
            flag.key,
            action=action,
            version=1,
            who=who,
            before=None,
            after=after,
        )
        return StoredFlag(flag, 1, now, now, by), revision

    async def _replace(
        self,
        session: AsyncSession,
        current: StoredFlag,
        flag: Flag,
        who: _Who,
        action: str,
        *,
        extra: dict[str, Any] | None = None,
        event: str | None = None,
    ) -> tuple[StoredFlag, int]:
        """Write ``flag`` over ``current`` as the next version, its change row and its event.

        Returns ``(stored, revision)``.

        Raises:
            FlagNotFound, FlagVersionMismatch: the row moved since it was read.
        """
        if flag.key != current.flag.key:
            raise InvalidFlag("A flag's key cannot change.", field="body.key", code="key_changed")
        now = self._clock()
        before, after = _dump(current.flag), _dump(flag)
        version = current.version + 1
        result = await session.execute(
            update(flags)
            .where(flags.c.key == flag.key, flags.c.version == current.version)
            .values(
                definition=_text(after),
                version=version,
                updated_at=now,
                updated_by=who.text,
            )
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
            moved = await self._row(session, flag.key)
            if moved is None:
                raise FlagNotFound(flag.key)
            raise FlagVersionMismatch(flag.key, moved.version, current_etag=moved.etag)
        revision = await self._change(
            session,
            "flag",
            flag.key,
            action=action,
            version=version,
            who=who,
            before=before,
            after=after,
        )
        details: dict[str, Any] = {"version": version, "changed": _changed(before, after)}
        details.update(extra or {})
        await self._audit(session, event or f"flag.{action}", who, flag.key, details)
        stored = StoredFlag(flag, version, current.created_at, now, who.text)
        return stored, revision

    async def _delete_flag(
        self, session: AsyncSession, current: StoredFlag, who: _Who, action: str
    ) -> int:
        """Delete ``current`` (at its version) and write its change row; return the revision."""
        key = current.flag.key
        result = await session.execute(
            delete(flags).where(flags.c.key == current.flag.key, flags.c.version == current.version)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of a DELETE
            moved = await self._row(session, current.flag.key)
            if moved is None:
                raise FlagNotFound(current.flag.key)
            raise FlagVersionMismatch(current.flag.key, moved.version, current_etag=moved.etag)
        return await self._change(
            session,
            "flag",
            key,
            action=action,
            version=current.version,
            who=who,
            before=_dump(current.flag),
            after=None,
        )

    async def _put_segment(
        self,
        session: AsyncSession,
        segment: Segment,
        current: StoredSegment | None,
        who: _Who,
        action: str | None = None,
        *,
        extra: dict[str, Any] | None = None,
    ) -> tuple[StoredSegment, int]:
        now = self._clock()
        after = _dump(segment)
        by = who.text
        if current is None:
            version = 1
            await session.execute(
                insert(segments).values(
                    name=segment.name,
                    definition=_text(after),
                    version=1,
                    updated_at=now,
                    updated_by=by,
                )
            )
            before = None
        else:
            version = current.version + 1
            before = _dump(current.segment)
            result = await session.execute(
                update(segments)
                .where(segments.c.name == segment.name, segments.c.version == current.version)
                .values(definition=_text(after), version=version, updated_at=now, updated_by=by)
            )
            if result.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of an UPDATE
                raise FlagVersionMismatch(segment.name, current.version)
        revision = await self._change(
            session,
            "segment",
            segment.name,
            action=action or ("update" if current else "create"),
            version=version,
            who=who,
            before=before,
            after=after,
        )
        details: dict[str, Any] = {"version": version}
        if before is not None:
            details["changed"] = _changed(before, after)
        details.update(extra or {})
        await self._audit(
            session, "flag.segment.update", who, segment.name, details, resource="segment"
        )
        return StoredSegment(segment, version, now, by), revision

    async def _delete_segment_row(
        self,
        session: AsyncSession,
        current: StoredSegment,
        who: _Who,
        *,
        action: str = "delete",
        extra: dict[str, Any] | None = None,
    ) -> int:
        name = current.segment.name
        result = await session.execute(
            delete(segments).where(segments.c.name == name, segments.c.version == current.version)
        )
        if result.rowcount != 1:  # type: ignore[attr-defined]  # CursorResult of a DELETE
            raise FlagVersionMismatch(name, current.version)
        revision = await self._change(
            session,
            "segment",
            name,
            action=action,
            version=current.version,
            who=who,
            before=_dump(current.segment),
            after=None,
        )
        details = {"version": current.version, **(extra or {})}
        await self._audit(session, "flag.segment.delete", who, name, details, resource="segment")
        return revision

    async def _change(
        self,
        session: AsyncSession,
        kind: ChangeKind,
        key: str,
        *,
        action: str,
        version: int,
        who: _Who,
        before: dict[str, Any] | None,
        after: dict[str, Any] | None,
    ) -> int:
        result = await session.execute(
            insert(changes)
            .values(
                kind=kind,
                key=key,
                action=action,
                version=version,
                actor=who.text,
                at=self._clock(),
                before=_text(before),
                after=_text(after),
            )
            .returning(changes.c.id)
        )
        return int(result.scalar_one())

    async def _audit(
        self,
        session: AsyncSession,
        action: str,
        who: _Who,
        key: str | None,
        details: dict[str, Any],
        *,
        resource: str = "flag",
    ) -> None:
        if self.audit is None:
            return
        # The claimed operator rides in the details: it is not authenticated, so it
        # must not pass for the actor.
        event = AuditEvent(
            action=action,
            actor=who.actor,
            resource=Resource(resource, key) if key is not None else Resource(resource),
            details={**details, **who.details()},
        )
        gathering = _IMPORT_EVENTS.get()
        if gathering is not None:
            gathering.append(event)
            return
        await self._record(event, session)

    async def _record(self, event: AuditEvent, session: AsyncSession | None) -> None:
        if self.audit is not None:
            await self.audit.record(event, session=session)


def _due(flag: Flag, now: dt.datetime) -> bool:
    return bool(flag.schedule) and flag.schedule[0].at <= now


def _unique(items: list[Any], name_of: Callable[[Any], str], what: str) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for item in items:
        name = name_of(item)
        if name in seen:
            raise InvalidFlag(f"The import holds {what} {name!r} twice.", code="duplicate")
        seen[name] = item
    return seen


def _fold(flag: Flag, now: dt.datetime) -> Flag:
    """``flag`` with its schedule entries due at ``now`` folded into ``enabled`` and dropped."""
    if not _due(flag, now):
        return flag
    remaining = tuple(change for change in flag.schedule if change.at > now)
    return flag.model_copy(update={"enabled": flag.enabled_at(now), "schedule": remaining})


def _merge(stored: Flag, imported: Flag, fields: frozenset[str]) -> Flag:
    """``stored`` with the ``fields`` of ``imported``; validated again as a whole."""
    data = _dump(stored)
    incoming = _dump(imported)
    data.update({name: incoming[name] for name in fields if name in incoming})
    try:
        # Lenient like the stored flag it merges into (an Unleash import's operands too).
        return Flag.model_validate(data, context=LENIENT_OPERANDS)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "flag"
        raise InvalidFlag(
            f"Flag {stored.key!r} would not be valid with the imported fields kept over the"
            f" stored ones ({where}: {first['msg']}).",
            field=f"flags.{stored.key}",
            code="invalid_merge",
        ) from exc


def _check_precondition(
    key: str,
    version: int,
    etag: str,
    expected_version: int | None,
    expected_etag: str | None,
) -> None:
    if (expected_version is not None and expected_version != version) or (
        expected_etag is not None and expected_etag != etag
    ):
        raise FlagVersionMismatch(key, version, current_etag=etag)


def _check_segment_ids(segment_list: Iterable[Segment]) -> None:
    """Raise :class:`InvalidFlag` when two segments share an Unleash id (rules cite it)."""
    owners: dict[int, str] = {}
    for segment in segment_list:
        if segment.id is None:
            continue
        other = owners.setdefault(segment.id, segment.name)
        if other != segment.name:
            raise InvalidFlag(
                f"Segments {other!r} and {segment.name!r} have the same id {segment.id}:"
                " a rule citing it would be ambiguous.",
                field="body.id",
                code="duplicate_id",
            )


class _Loaded(builtins.list[M]):
    """The definitions that validated, and the keys of those skipped."""

    skipped: builtins.list[str]


def _parse(model: type[M], definition: str) -> M:
    data = orjson.loads(definition)
    if isinstance(data, dict):
        # Forward compatibility: during a rolling deploy a newer release may store
        # fields this one does not know; they are ignored here, not fatal.
        data = {name: value for name, value in data.items() if name in model.model_fields}
    # Rows written before operands were checked, or imported from an Unleash state, hold
    # operands that never match; they must still load (as they evaluate: never matching).
    return model.model_validate(data, context=LENIENT_OPERANDS)


_UNREADABLE: Final = (orjson.JSONDecodeError, ValidationError, TypeError, ValueError)


def _invalid(what: str, key: str, exc: Exception) -> None:
    # The key is an operator's name for a flag, not personal data; the error class
    # says which kind of fault, the values stay out of the log.
    logger.warning(
        "stored flag definition does not validate: skipped",
        kind=what,
        key=key,
        error=type(exc).__name__,
    )


def _valid(model: type[M], what: str, rows: Iterable[tuple[str, str]]) -> _Loaded[M]:
    """The definitions of ``rows`` (key, JSON) that validate; the others logged and skipped."""
    loaded: _Loaded[M] = _Loaded()
    loaded.skipped = []
    for key, definition in rows:
        try:
            loaded.append(_parse(model, definition))
        except _UNREADABLE as exc:
            _invalid(what, key, exc)
            loaded.skipped.append(key)
    return loaded


def _valid_rows(rows: Iterable[Any], read: Callable[[Any], T]) -> builtins.list[T]:
    found = []
    for row in rows:
        try:
            found.append(read(row))
        except StoredFlagInvalid:
            continue  # logged by the reader
    return found


def _stored_flag(row: Any) -> StoredFlag:
    try:
        flag = _parse(Flag, row.definition)
    except _UNREADABLE as exc:
        _invalid("flag", row.key, exc)
        raise StoredFlagInvalid("flag", row.key) from exc
    return StoredFlag(
        flag=flag,
        version=row.version,
        created_at=row.created_at,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )


def _stored_segment(row: Any) -> StoredSegment:
    try:
        segment = _parse(Segment, row.definition)
    except _UNREADABLE as exc:
        _invalid("segment", row.name, exc)
        raise StoredFlagInvalid("segment", row.name) from exc
    return StoredSegment(
        segment=segment,
        version=row.version,
        updated_at=row.updated_at,
        updated_by=row.updated_by,
    )
