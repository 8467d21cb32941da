"""Migrations: bastion's own Alembic tree and the host application's, run in order.

The pieces::

    MigrationTree       where a tree's scripts live and which version table it records into
    Migrator            runs the trees against the shared Database; async over Alembic
    ├── status()        TreeStatus per tree: current revision(s), head(s), pending revisions
    ├── pending()       pending revision ids per tree, the start-up ``check`` mode's question
    ├── upgrade()       AppliedRevision per revision applied, bastion's tree first
    ├── downgrade()     AppliedRevision per revision reverted, one tree
    ├── history()       RevisionInfo per revision of one tree, read from disk
    └── sql()           the SQL an upgrade or downgrade would run (offline mode)
    MigrationError      a ConfigurationError naming the tree and revision that failed

Each tree records into its own version table (bastion's is
``bastion_alembic_version``), so a host app's ``alembic_version`` is never
touched by bastion's revisions. Each ``bastion migrate`` verb is one of the
methods above.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
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
    downgrade_plan,
    resolve_location,
    revisions,
    script_directory,
    upgrade_plan,
)
from bastion.data._destructive import DestructiveGuard
from bastion.data._errors import MigrationError
from bastion.errors import ConfigurationError

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep
    from alembic.script import ScriptDirectory
    from sqlalchemy.ext.asyncio import AsyncConnection

    from bastion.data._engine import Database

__all__ = [
    "BASTION_TREE",
    "BASTION_VERSION_TABLE",
    "AppliedRevision",
    "MigrationError",
    "MigrationTree",
    "Migrator",
    "RevisionInfo",
    "TreeStatus",
]


logger = structlog.get_logger("bastion.migrations")

BASTION_TREE: Final = "bastion"
BASTION_VERSION_TABLE: Final = "bastion_alembic_version"
BASTION_SCRIPT_LOCATION: Final = "bastion.data:migrations"
_HEAD_TARGETS: Final = frozenset({"head", "heads"})

Direction = Literal["upgrade", "downgrade"]


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
    serialised within the process, so two concurrent ``upgrade()`` calls apply
    each revision once.

    Example:
        >>> migrator = Migrator(database, [MigrationTree.bastion()])
        >>> await migrator.upgrade()
        >>> await migrator.pending()
        {}

    Args:
        database: the shared database.
        trees: the trees in the order they are upgraded; bastion's own comes first.

    Raises:
        ConfigurationError: two trees share a name or a version table.
    """

    def __init__(
        self,
        database: Database,
        trees: Sequence[MigrationTree],
        *,
        allow_destructive: bool = False,
    ) -> None:
        _check_distinct("name", [tree.name for tree in trees])
        _check_distinct("version table", [tree.version_table for tree in trees])
        self.database = database
        self.trees: tuple[MigrationTree, ...] = tuple(trees)
        self.allow_destructive = allow_destructive

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

    async def status(self) -> list[TreeStatus]:
        """Return where every tree stands, in upgrade order.

        Raises:
            MigrationError: the database cannot be read, or records a revision
                that is not on disk.
        """
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
            MigrationError: naming the tree and revision that failed. Revisions
                committed before the failure stay applied.
        """
        targets = self._upgrade_targets(revision, tree)
        allow = self.allow_destructive if allow_destructive is None else allow_destructive
        applied: list[AppliedRevision] = []
        async with self._migrating_connection() as connection:
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
            MigrationError: naming the tree and revision that failed.
        """
        selected = self.tree(tree)
        allow = self.allow_destructive if allow_destructive is None else allow_destructive
        async with self._migrating_connection() as connection:
            return await self._run(connection, selected, "downgrade", revision, allow=allow)

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
        async with _environment_lock(), self.database.engine.connect() as connection:
            for selected, destination in targets:
                with _wrapped(selected.name, destination, "read the current revision of"):
                    current = await connection.run_sync(current_heads, selected.version_table)
                parts.append(self._render(selected, current, destination, downgrade=downgrade))
        return "".join(parts)

    @asynccontextmanager
    async def _migrating_connection(self) -> AsyncIterator[AsyncConnection]:
        """The one way into a schema change: exclusive within the process, one connection.

        Exclusion across processes (several instances starting at once) is not
        provided yet: the migration-safety issue takes a database lock here, on
        this connection, for the whole run.
        """
        async with _environment_lock(), self.database.engine.connect() as connection:
            yield connection

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
            logger.info(
                "migration applied",
                tree=tree.name,
                revision=record.revision,
                direction=direction,
                duration_ms=duration_ms,
            )

        tracker = StepTracker(done)
        guard = DestructiveGuard(tree=tree.name, direction=direction, allow=allow)
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
        owners = [index for index, selected in enumerate(self.trees) if _holds(selected, revision)]
        if len(owners) != 1:
            where = "no tree" if not owners else "more than one tree"
            raise MigrationError(
                f"revision {revision!r} is in {where}; name the tree (--tree)", revision=revision
            )
        owner = owners[0]
        before = [(selected, "head") for selected in self.trees[:owner]]
        return [*before, (self.trees[owner], revision)]


def _scripts(tree: MigrationTree) -> ScriptDirectory:
    return script_directory(alembic_config(tree.directory(), tree.version_table))


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
def _wrapped(tree: str, revision: str | None, action: str) -> Iterator[None]:
    """Turn a native error raised in the block into a :class:`MigrationError`."""
    try:
        yield
    except ConfigurationError:
        raise
    except Exception as exc:
        raise MigrationError(
            f"cannot {action} tree {tree!r}: {_describe(exc)}", tree=tree, revision=revision
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
