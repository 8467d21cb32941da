"""Migrations: bastion's own Alembic tree and the host application's, run in order.

The pieces::

    MigrationTree         where a tree's scripts live and which version table it records into
    Migrator              runs the trees against the shared Database; async over Alembic
    ├── status()          TreeStatus per tree: current revision(s), head(s), pending revisions
    ├── pending()         pending revision ids per tree, the start-up ``check`` mode's question
    ├── upgrade()         AppliedRevision per revision applied, bastion's tree first
    ├── downgrade()       AppliedRevision per revision reverted, one tree
    ├── verify()          VerificationReport: applied revision files compared with their checksums
    ├── accept()          HistoryRecord per edited revision whose new checksum is accepted
    ├── applied_history() HistoryRecord per row of bastion_migration_history, newest first
    ├── history()         RevisionInfo per revision of one tree, read from disk
    └── sql()             the SQL an upgrade or downgrade would run (offline mode)
    MigrationError        a ConfigurationError naming the tree and revision that failed

Each tree records into its own version table (bastion's is
``bastion_alembic_version``), so a host app's ``alembic_version`` is never
touched by bastion's revisions; every tree also writes one row per revision
into the shared ``bastion_migration_history``. Changes (upgrade, downgrade,
accept) hold the database's migration lock (:mod:`bastion.data._lock`) for
the whole run, so instances starting at once apply each revision once. Each
``bastion migrate`` verb is one of the methods above.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Final, Literal

import structlog
from alembic.util import CommandError
from sqlalchemy.exc import StatementError

from bastion.data._alembic_runtime import StepTracker, current_heads, render_sql, run_online
from bastion.data._alembic_script import (
    RevisionInfo,
    alembic_config,
    applied_revisions,
    checksum,
    downgrade_plan,
    resolve_location,
    revisions,
    script_directory,
    upgrade_plan,
)
from bastion.data._destructive import DestructiveGuard
from bastion.data._errors import MigrationError
from bastion.data._history import (
    HistoryRecord,
    HistoryRecorder,
    applied_by,
    ensure_history_table,
    latest_checksums,
    read_history,
    record_accepted,
)
from bastion.data._lock import migration_lock
from bastion.errors import ConfigurationError
from bastion.observability.metrics import MIGRATIONS_APPLIED

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep
    from alembic.script import Script, ScriptDirectory
    from sqlalchemy.ext.asyncio import AsyncConnection

    from bastion.data._engine import Database

__all__ = [
    "BASTION_TREE",
    "BASTION_VERSION_TABLE",
    "DEFAULT_LOCK_TIMEOUT",
    "DEFAULT_TOOL",
    "AppliedRevision",
    "MigrationError",
    "MigrationTree",
    "Migrator",
    "RevisionCheck",
    "RevisionInfo",
    "RevisionState",
    "TreeStatus",
    "VerificationReport",
]


logger = structlog.get_logger("bastion.migrations")

BASTION_TREE: Final = "bastion"
BASTION_VERSION_TABLE: Final = "bastion_alembic_version"
BASTION_SCRIPT_LOCATION: Final = "bastion.data:migrations"
_HEAD_TARGETS: Final = frozenset({"head", "heads"})
DEFAULT_LOCK_TIMEOUT: Final = 300.0
DEFAULT_TOOL: Final = "bastion.data.Migrator"

Direction = Literal["upgrade", "downgrade"]
RevisionState = Literal["ok", "modified", "unrecorded"]
"""How an applied revision's file compares with its history: the same, edited
since, or applied with no history row (before checksums existed, or by a tool
that bypassed ``env.py``)."""


@dataclass(frozen=True, slots=True)
class MigrationTree:
    """An Alembic script directory and the version table it records into.

    Attributes:
        name: how commands and messages refer to the tree (``bastion``, ``app``).
        script_location: ``package:directory`` or a filesystem path.
        version_table: the table holding the tree's current revision(s).
    """

    name: str
    script_location: str
    version_table: str

    @classmethod
    def bastion(cls) -> MigrationTree:
        """Return bastion's own tree, recorded in ``bastion_alembic_version``."""
        return cls(BASTION_TREE, BASTION_SCRIPT_LOCATION, BASTION_VERSION_TABLE)

    @classmethod
    def from_location(cls, name: str, location: str, version_table: str) -> MigrationTree:
        """Return a tree given as ``package:directory`` or a filesystem path.

        Example:
            >>> MigrationTree.from_location("app", "myapp:migrations", "alembic_version")

        Raises:
            ConfigurationError: the location is not an Alembic script directory.
        """
        tree = cls(name, location, version_table)
        tree.directory()
        return tree

    def directory(self) -> Path:
        """Return the tree's directory on disk.

        Raises:
            ConfigurationError: the location is not an Alembic script directory.
        """
        return resolve_location(self.name, self.script_location)


@dataclass(frozen=True, slots=True)
class TreeStatus:
    """Where one tree stands in the database.

    Attributes:
        name: the tree.
        version_table: where its revisions are recorded.
        current: the revision(s) the database is at; empty before the first upgrade.
        heads: the newest revision(s) on disk.
        pending: revisions an upgrade to the heads would apply, in order.
    """

    name: str
    version_table: str
    current: tuple[str, ...]
    heads: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def up_to_date(self) -> bool:
        """Whether nothing is pending."""
        return not self.pending


@dataclass(frozen=True, slots=True)
class AppliedRevision:
    """One revision applied (or reverted) and committed.

    Attributes:
        tree: the tree it belongs to.
        revision: its identifier.
        direction: ``upgrade`` or ``downgrade``.
        duration_ms: time from its start to its commit.
    """

    tree: str
    revision: str
    direction: Direction
    duration_ms: float


@dataclass(frozen=True, slots=True)
class RevisionCheck:
    """One applied revision, its file compared with the checksum its history recorded.

    Attributes:
        tree: the tree it belongs to.
        revision: its identifier.
        state: ``ok``, ``modified`` or ``unrecorded``.
        checksum: SHA-256 (hex) of the file on disk now.
        record: the newest ``upgrade`` or ``accept`` history row, ``None`` when unrecorded.
    """

    tree: str
    revision: str
    state: RevisionState
    checksum: str
    record: HistoryRecord | None

    @property
    def name(self) -> str:
        """``tree:revision``, as messages name it."""
        return f"{self.tree}:{self.revision}"


@dataclass(frozen=True, slots=True)
class VerificationReport:
    """Every applied revision of the verified trees, oldest first within each tree.

    Attributes:
        checks: one per applied revision.
    """

    checks: tuple[RevisionCheck, ...]

    @property
    def modified(self) -> tuple[RevisionCheck, ...]:
        """The revisions whose file changed after it was applied."""
        return tuple(check for check in self.checks if check.state == "modified")

    @property
    def unrecorded(self) -> tuple[RevisionCheck, ...]:
        """The applied revisions that have no history row: reported, not a failure."""
        return tuple(check for check in self.checks if check.state == "unrecorded")

    @property
    def ok(self) -> bool:
        """Whether no applied revision was modified."""
        return not self.modified

    def raise_for_modified(self) -> None:
        """Raise when an applied revision was modified; do nothing otherwise.

        Raises:
            MigrationError: naming every modified revision as ``tree:revision``
                (``tree`` and ``revision`` are the first one's).
        """
        if self.ok:
            return
        first = self.modified[0]
        names = ", ".join(check.name for check in self.modified)
        raise MigrationError(
            f"applied migration revision(s) modified since they were applied: {names}; "
            "a released revision must not change: restore it and write a new revision, "
            "or review the edit and run `bastion migrate verify --accept REVISION`",
            tree=first.tree,
            revision=first.revision,
        )


# Alembic's `context` and `op` are module-level proxies, so two environments
# running at once in one process would send each other's operations to the
# wrong connection, even for different databases. One lock per event loop
# (an asyncio.Lock belongs to the loop it first waits on).
_ENVIRONMENT_LOCKS: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = (
    weakref.WeakKeyDictionary()
)


def _environment_lock() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lock = _ENVIRONMENT_LOCKS.get(loop)
    if lock is None:
        lock = _ENVIRONMENT_LOCKS[loop] = asyncio.Lock()
    return lock


class Migrator:
    """Runs migration trees against one database, bastion's own tree first.

    Alembic is synchronous; every database step runs through
    ``AsyncConnection.run_sync`` on the shared async engine. Changes are
    serialised within the process and, through the database's migration lock,
    across processes: two concurrent ``upgrade()`` calls apply each revision
    once, the later one waiting and then finding nothing to do.

    Example:
        >>> migrator = Migrator(database, [MigrationTree.bastion()], tool="deploy job")
        >>> await migrator.upgrade()
        >>> await migrator.pending()
        {}
        >>> (await migrator.verify()).ok
        True

    Args:
        database: the shared database.
        trees: the trees in the order they are upgraded; bastion's own comes first.
        allow_destructive: consent to destructive changes for every run.
        lock_timeout: seconds a change waits for another process's run to
            finish before failing (``migrations.lock_timeout``).
        tool: what history rows say applied the revisions; the attribute of the
            same name can be changed afterwards.

    Raises:
        ConfigurationError: two trees share a name or a version table.
    """

    def __init__(
        self,
        database: Database,
        trees: Sequence[MigrationTree],
        *,
        allow_destructive: bool = False,
        lock_timeout: float = DEFAULT_LOCK_TIMEOUT,
        tool: str = DEFAULT_TOOL,
    ) -> None:
        _check_distinct("name", [tree.name for tree in trees])
        _check_distinct("version table", [tree.version_table for tree in trees])
        self.database = database
        self.trees: tuple[MigrationTree, ...] = tuple(trees)
        self.allow_destructive = allow_destructive
        self.lock_timeout = lock_timeout
        self.tool = tool

    def tree(self, name: str) -> MigrationTree:
        """Return the tree called ``name``.

        Raises:
            MigrationError: no tree has that name.
        """
        for tree in self.trees:
            if tree.name == name:
                return tree
        known = ", ".join(tree.name for tree in self.trees) or "none"
        raise MigrationError(f"no migration tree named {name!r} (trees: {known})", tree=name)

    def tree_of(self, revision: str) -> MigrationTree:
        """Return the one tree that holds ``revision``.

        Raises:
            MigrationError: no tree, or more than one, holds it.
        """
        owners = [selected for selected in self.trees if _holds(selected, revision)]
        if len(owners) != 1:
            where = "no tree" if not owners else "more than one tree"
            raise MigrationError(
                f"revision {revision!r} is in {where}; name the tree (--tree)", revision=revision
            )
        return owners[0]

    async def status(self) -> list[TreeStatus]:
        """Return where every tree stands, in upgrade order.

        Raises:
            MigrationError: the database cannot be read, or records a revision
                that is not on disk.
        """
        with _wrapped(None, None, "read the migration state"):
            async with self.database.engine.connect() as connection:
                return [await self._status(connection, tree) for tree in self.trees]

    async def pending(self) -> dict[str, list[str]]:
        """Return the pending revisions of each tree that has any; ``{}`` when up to date.

        Raises:
            MigrationError: as :meth:`status`.
        """
        return {s.name: list(s.pending) for s in await self.status() if s.pending}

    def history(self, tree: str) -> list[RevisionInfo]:
        """Return a tree's revisions as its files declare them, oldest first.

        Reads only files: the database is not consulted.

        Raises:
            MigrationError: no such tree, or its scripts cannot be read.
        """
        selected = self.tree(tree)
        with _wrapped(selected.name, None, "read the revisions"):
            return revisions(_scripts(selected))

    async def upgrade(
        self,
        revision: str = "head",
        *,
        tree: str | None = None,
        allow_destructive: bool | None = None,
    ) -> list[AppliedRevision]:
        """Apply pending revisions, each in its own transaction.

        With ``head``, every tree goes to its head, bastion's first. With a
        specific revision, the tree holding it goes there, after the trees
        before it (bastion's at least) went to their heads, because an app's
        revisions may build on bastion's tables.

        Args:
            revision: ``head``, ``heads``, or a revision id (relative ones such
                as ``+1`` need ``tree``).
            tree: limit the upgrade to this tree.
            allow_destructive: consent to every destructive change of this run;
                ``None`` takes the migrator's ``allow_destructive``.

        Returns:
            The revisions applied, in order; empty when nothing was pending.

        Raises:
            MigrationError: naming the tree and revision that failed (revisions
                committed before the failure stay applied); naming the applied
                revisions whose files were modified (nothing is applied then);
                or naming the holder of the migration lock when it was not
                released within ``lock_timeout``.
        """
        targets = self._upgrade_targets(revision, tree)
        allow = self.allow_destructive if allow_destructive is None else allow_destructive
        applied: list[AppliedRevision] = []
        async with self._migrating_connection() as connection:
            # Under the lock: what another instance applied meanwhile is verified too.
            report = await self._verify(connection, [selected for selected, _ in targets])
            report.raise_for_modified()
            for selected, destination in targets:
                applied += await self._run(
                    connection, selected, "upgrade", destination, allow=allow
                )
        return applied

    async def downgrade(
        self, tree: str, revision: str, *, allow_destructive: bool | None = None
    ) -> list[AppliedRevision]:
        """Revert one tree to ``revision`` (``base`` reverts every revision).

        Args:
            tree: the tree to downgrade.
            revision: the revision to end at, ``base``, or relative such as ``-1``.
            allow_destructive: as for :meth:`upgrade`; a downgrade that drops what
                its upgrade created is destructive too.

        Returns:
            The revisions reverted, in order.

        Raises:
            MigrationError: naming the tree and revision that failed, or the
                holder of the migration lock.
        """
        selected = self.tree(tree)
        allow = self.allow_destructive if allow_destructive is None else allow_destructive
        async with self._migrating_connection() as connection:
            return await self._run(connection, selected, "downgrade", revision, allow=allow)

    async def verify(self, *, tree: str | None = None) -> VerificationReport:
        """Compare every applied revision's file with the checksum recorded when it ran.

        A revision is applied when it is a tree's current revision or an
        ancestor of one. Its recorded checksum is that of its newest
        ``upgrade`` or ``accept`` history row.

        Example:
            >>> report = await migrator.verify()
            >>> [check.name for check in report.modified]
            ['app:3f2a1c']

        Args:
            tree: verify only this tree.

        Returns:
            One check per applied revision; ``report.ok`` is false when any was modified.

        Raises:
            MigrationError: the database cannot be read, or records a revision
                that is not on disk.
        """
        selected = [self.tree(tree)] if tree is not None else list(self.trees)
        with _wrapped(None, None, "read the migration state"):
            async with self.database.engine.connect() as connection:
                return await self._verify(connection, selected)

    async def accept(self, tree: str, revisions: Sequence[str]) -> list[HistoryRecord]:
        """Record the current checksum of applied revisions whose edit was reviewed.

        As Flyway's ``repair``: after :meth:`verify` reports a revision
        modified and someone checked the edit is harmless (a comment, a
        formatting change), this makes the file on disk the reference. The
        revisions are not run.

        Example:
            >>> await migrator.accept("app", ["3f2a1c"])

        Args:
            tree: the tree holding the revisions.
            revisions: revision ids (unique prefixes work, as in Alembic).

        Returns:
            The ``accept`` rows written, in the order given.

        Raises:
            MigrationError: a revision is not on disk or not applied, or the
                migration lock was not released within ``lock_timeout``.
        """
        selected = self.tree(tree)
        async with self._migrating_connection() as connection:
            with _wrapped(selected.name, None, "read the state of"):
                current = await connection.run_sync(current_heads, selected.version_table)
                applied = {script.revision: script for script in _applied(selected, current)}
            chosen = [self._applied_script(selected, applied, revision) for revision in revisions]
            with _wrapped(selected.name, None, "record accepted checksums in"):
                written = await connection.run_sync(
                    partial(
                        record_accepted,
                        tree=selected.name,
                        version_table=selected.version_table,
                        revisions=chosen,
                        tool=self.tool,
                    )
                )
                await connection.commit()
        for record in written:
            logger.warning(
                "migration checksum accepted",
                tree=record.tree,
                revision=record.revision,
                checksum=record.checksum,
            )
        return written

    async def applied_history(
        self, *, tree: str | None = None, limit: int | None = 100
    ) -> list[HistoryRecord]:
        """Return rows of ``bastion_migration_history``, newest first.

        Args:
            tree: only this tree's rows.
            limit: at most this many rows; ``None`` for all.

        Returns:
            The rows; empty before the first migration run.

        Raises:
            MigrationError: no such tree, or the database cannot be read.
        """
        version_table = self.tree(tree).version_table if tree is not None else None
        with _wrapped(tree, None, "read the migration history"):
            async with self.database.engine.connect() as connection:
                return await connection.run_sync(
                    partial(read_history, version_table=version_table, limit=limit)
                )

    async def sql(
        self, revision: str = "head", *, tree: str | None = None, downgrade: bool = False
    ) -> str:
        """Return the SQL that :meth:`upgrade` (or :meth:`downgrade`) would run now.

        The database is read for each tree's current revision and nothing is
        written; the SQL starts from there. Arguments mean what they mean for
        :meth:`upgrade` and :meth:`downgrade`.

        Raises:
            MigrationError: a downgrade without ``tree``, a tree recorded at more
                than one revision, or anything :meth:`upgrade` would raise.
        """
        if downgrade:
            if tree is None:
                raise MigrationError("name the tree to downgrade", revision=revision)
            targets = [(self.tree(tree), revision)]
        else:
            targets = self._upgrade_targets(revision, tree)
        parts: list[str] = []
        with _wrapped(None, None, "read the migration state"):
            async with _environment_lock(), self.database.engine.connect() as connection:
                for selected, destination in targets:
                    with _wrapped(selected.name, destination, "read the current revision of"):
                        current = await connection.run_sync(current_heads, selected.version_table)
                    parts.append(self._render(selected, current, destination, downgrade=downgrade))
        return "".join(parts)

    @asynccontextmanager
    async def _migrating_connection(self) -> AsyncIterator[AsyncConnection]:
        """The one way into a schema change: exclusive within the process and across them.

        The database's migration lock is held on this connection for the whole
        run, every tree included, so whoever waited for it reads the heads
        afresh and finds nothing left to do. The history table is created here,
        under the lock, before any revision runs.
        """
        owner = f"{self.tool}: {applied_by()}"
        async with AsyncExitStack() as stack:
            await stack.enter_async_context(_environment_lock())
            with _wrapped(None, None, "connect and take the migration lock"):
                connection = await stack.enter_async_context(self.database.engine.connect())
                await stack.enter_async_context(
                    migration_lock(connection, owner=owner, lock_timeout=self.lock_timeout)
                )
            with _wrapped(None, None, "create the migration history table"):
                await connection.run_sync(ensure_history_table)
                await connection.commit()
            yield connection

    async def _verify(
        self, connection: AsyncConnection, trees: Sequence[MigrationTree]
    ) -> VerificationReport:
        checks: list[RevisionCheck] = []
        for tree in trees:
            with _wrapped(tree.name, None, "verify"):
                current = await connection.run_sync(current_heads, tree.version_table)
                recorded = await connection.run_sync(latest_checksums, tree.version_table)
                for script in _applied(tree, current):
                    checks.append(_check(tree, script, recorded.get(script.revision)))
        # Leave no read transaction open: each revision must begin its own.
        await connection.commit()
        return VerificationReport(tuple(checks))

    @staticmethod
    def _applied_script(tree: MigrationTree, applied: dict[str, Script], revision: str) -> Script:
        with _wrapped(tree.name, revision, f"find revision {revision!r} in"):
            found = _scripts(tree).get_revision(revision)
        if found is None or found.revision not in applied:
            raise MigrationError(
                f"revision {revision!r} of tree {tree.name!r} is not applied; "
                "only applied revisions have a checksum to accept",
                tree=tree.name,
                revision=revision,
            )
        return applied[found.revision]

    async def _status(self, connection: AsyncConnection, tree: MigrationTree) -> TreeStatus:
        with _wrapped(tree.name, None, "read the state of"):
            current = await connection.run_sync(current_heads, tree.version_table)
        with _wrapped(tree.name, None, "plan"):
            script = _scripts(tree)
            pending = upgrade_plan(script, "heads", current)
            return TreeStatus(
                name=tree.name,
                version_table=tree.version_table,
                current=current,
                heads=tuple(script.get_heads()),
                pending=tuple(step.revision.revision for step in pending),
            )

    async def _run(
        self,
        connection: AsyncConnection,
        tree: MigrationTree,
        direction: Direction,
        destination: str,
        *,
        allow: bool,
    ) -> list[AppliedRevision]:
        applied: list[AppliedRevision] = []

        def done(step: RevisionStep, duration_ms: float) -> None:
            record = AppliedRevision(tree.name, step.revision.revision, direction, duration_ms)
            applied.append(record)
            MIGRATIONS_APPLIED.labels(tree=tree.name, direction=direction).inc()
            logger.info(
                "migration applied",
                tree=tree.name,
                revision=record.revision,
                direction=direction,
                duration_ms=duration_ms,
            )

        tracker = StepTracker(done)
        guard = DestructiveGuard(tree=tree.name, direction=direction, allow=allow)
        history = HistoryRecorder(tree=tree.name, version_table=tree.version_table, tool=self.tool)
        with _wrapped(tree.name, destination, f"{direction} to {destination!r}"):
            script = _scripts(tree)
        planner = upgrade_plan if direction == "upgrade" else downgrade_plan
        plan = partial(planner, script, destination)
        config = alembic_config(tree.directory(), tree.version_table)
        try:
            await connection.run_sync(
                run_online,
                config,
                script,
                plan,
                tracker=tracker,
                guard=guard,
                history=history,
                destination=destination,
            )
        except Exception as exc:
            error = _failure(tree.name, direction, destination, tracker.running, exc)
            # The error is raised to the caller; this line is for log-based alerting,
            # without the traceback the caller will print anyway.
            logger.error(  # noqa: TRY400 -- the caller prints the traceback; see above
                "migration failed",
                tree=tree.name,
                revision=error.revision,
                direction=direction,
                error=str(error),
            )
            raise error from exc
        return applied

    def _render(
        self, tree: MigrationTree, current: tuple[str, ...], destination: str, *, downgrade: bool
    ) -> str:
        if len(current) > 1:
            raise MigrationError(
                f"tree {tree.name!r} is at several revisions ({', '.join(current)}); "
                "offline SQL needs a single starting revision",
                tree=tree.name,
            )
        start = current[0] if current else None
        header = f"-- tree {tree.name} ({tree.version_table}): {start or 'base'} -> {destination}\n"
        if downgrade and start is None:
            return header + "-- nothing to downgrade\n"
        direction: Direction = "downgrade" if downgrade else "upgrade"
        with _wrapped(tree.name, destination, f"render the {direction} to {destination!r} of"):
            script = _scripts(tree)
            plan = partial(downgrade_plan if downgrade else upgrade_plan, script, destination)
            config = alembic_config(tree.directory(), tree.version_table)
            return header + render_sql(
                config,
                script,
                plan,
                url=self.database.engine.url,
                starting_rev=start,
                destination=destination,
            )

    def _upgrade_targets(self, revision: str, tree: str | None) -> list[tuple[MigrationTree, str]]:
        if tree is not None:
            return [(self.tree(tree), revision)]
        if revision in _HEAD_TARGETS:
            return [(selected, revision) for selected in self.trees]
        owner = self.trees.index(self.tree_of(revision))
        before = [(selected, "head") for selected in self.trees[:owner]]
        return [*before, (self.trees[owner], revision)]


def _scripts(tree: MigrationTree) -> ScriptDirectory:
    return script_directory(alembic_config(tree.directory(), tree.version_table))


def _applied(tree: MigrationTree, current: Sequence[str]) -> list[Script]:
    return applied_revisions(_scripts(tree), current)


def _check(tree: MigrationTree, script: Script, record: HistoryRecord | None) -> RevisionCheck:
    actual = checksum(script)
    state: RevisionState
    if record is None:
        state = "unrecorded"
    elif record.checksum == actual:
        state = "ok"
    else:
        state = "modified"
    return RevisionCheck(tree.name, script.revision, state, actual, record)


def _holds(tree: MigrationTree, revision: str) -> bool:
    try:
        return _scripts(tree).get_revision(revision) is not None
    except CommandError:
        return False


def _check_distinct(what: str, values: list[str]) -> None:
    seen: set[str] = set()
    for value in values:
        if value in seen:
            raise ConfigurationError(f"two migration trees share the {what} {value!r}")
        seen.add(value)


@contextmanager
def _wrapped(tree: str | None, revision: str | None, action: str) -> Iterator[None]:
    """Turn a native error raised in the block into a :class:`MigrationError`."""
    try:
        yield
    except ConfigurationError:
        raise
    except Exception as exc:
        subject = f"{action} tree {tree!r}" if tree is not None else action
        raise MigrationError(
            f"cannot {subject}: {_describe(exc)}", tree=tree, revision=revision
        ) from exc


def _failure(
    tree: str,
    direction: Direction,
    destination: str,
    running: RevisionStep | None,
    exc: Exception,
) -> MigrationError:
    if isinstance(exc, MigrationError):
        return exc
    if running is None:
        return MigrationError(
            f"cannot {direction} tree {tree!r} to {destination!r}: {_describe(exc)}",
            tree=tree,
            revision=destination,
        )
    revision = running.revision.revision
    return MigrationError(
        f"{direction} of tree {tree!r} failed at revision {revision!r} (rolled back): "
        f"{_describe(exc)}",
        tree=tree,
        revision=revision,
    )


def _describe(exc: BaseException) -> str:
    # SQLAlchemy's message carries the statement and its parameters, which can
    # hold personal data; the driver's own message is the useful line.
    inner: BaseException = exc
    if isinstance(exc, StatementError) and isinstance(exc.orig, BaseException):
        inner = exc.orig
    lines = str(inner).strip().splitlines()
    name = type(inner).__name__
    return f"{name}: {lines[0]}" if lines else name
