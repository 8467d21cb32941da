"""The flags runtime: store, compiled set, propagation and seed file, assembled from settings."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog
from starlette.requests import HTTPConnection

from bastion.audit import Actor
from bastion.errors import BastionError, ConfigurationError
from bastion.flags._document import load_text, parse_document
from bastion.flags._engine import FlagSet
from bastion.flags._flags import Flags
from bastion.flags._store import FlagStore
from bastion.flags._sync import CHANNEL, Compiler, FlagNotifier, FlagSync, Trigger

if TYPE_CHECKING:
    from bastion.audit import AuditLog
    from bastion.data import Database
    from bastion.flags._model import Flag, Segment
    from bastion.settings import Settings

__all__ = [
    "SEED_ACTOR",
    "FlagsRuntime",
    "build_flags",
    "flags_runtime",
    "load_seed",
    "start_flags",
    "stop_flags",
]

logger = structlog.get_logger("bastion.flags")

SEED_ACTOR = Actor.system("flags.seed")
"""Who the audit trail says imported ``flags.seed_file`` at start-up."""


@dataclass(slots=True)
class FlagsRuntime:
    """The feature flags of an installed app (``app.state.bastion.flags``).

    Attributes:
        settings: the effective settings.
        flags: what the app evaluates with (``runtime.flags.is_enabled(key, context)``);
            one object for the app's life, whose compiled set is swapped on change.
        store: the flags in the database, or ``None`` without the database (the
            seed file is then the whole set, and read-only).
        sync: keeps ``flags`` current (notifications, polling, schedule).
        seed: the flags and segments of ``flags.seed_file``, when set.
    """

    settings: Settings
    flags: Flags
    store: FlagStore | None
    sync: FlagSync
    seed: tuple[list[Flag], list[Segment]] | None = None

    @property
    def revision(self) -> int:
        """The revision of the set being evaluated (0 without the database)."""
        return self.flags.revision

    async def refresh(self, *, trigger: Trigger = "admin", force: bool = False) -> bool:
        """Reload now if the stored set moved (always with ``force``); whether it reloaded.

        Never raises for a database failure: the last set keeps serving.
        """
        return await self.sync.refresh(trigger=trigger, force=force)

    def compile(
        self,
        flags: list[Flag],
        segments: list[Segment] = [],  # noqa: B006 -- read only
        revision: int = 0,
        now: dt.datetime | None = None,
    ) -> FlagSet:
        """Compile a set with this app's settings (environment, app name, regex bound)."""
        return _compiler(self.settings)(flags, segments, revision, now or dt.datetime.now(dt.UTC))

    async def health_check(self) -> None:
        """Readiness (critical): the set was loaded at least once.

        Raises:
            FlagsStale: not loaded yet (the database did not answer, or the flag
                tables are missing).
        """
        await self.sync.loaded_check()

    async def freshness_check(self) -> None:
        """Readiness (not critical): the set was confirmed current within a few polls.

        Raises:
            FlagsStale: the database has not answered for several poll intervals.
        """
        await self.sync.fresh_check()


def flags_environment(settings: Settings) -> str:
    """The environment flags evaluate in, and whose part of an Unleash export is read."""
    return settings.flags.environment or settings.environment


def _compiler(settings: Settings) -> Compiler:
    section = settings.flags
    environment = flags_environment(settings)

    def compile_set(
        flags: list[Flag], segments: list[Segment], revision: int, now: dt.datetime
    ) -> FlagSet:
        return FlagSet.from_flags(
            flags,
            segments,
            revision=revision,
            now=now,
            environment=environment,
            app_name=section.app_name,
            regex_timeout=section.regex_timeout,
        )

    return compile_set


def load_seed(path: Path, environment: str | None = None) -> tuple[list[Flag], list[Segment]]:
    """Read a seed file: YAML or JSON, an Unleash state or export, or bastion's document.

    ``environment`` picks an Unleash export's environment (an export of one is read
    whatever it is called).

    Raises:
        ConfigurationError: the file cannot be read or parsed, or holds invalid flags
            (each problem located, as the import route reports them).
    """
    try:
        document = load_text(path.read_text("utf-8"), str(path))
    except OSError as exc:
        raise ConfigurationError(f"flags.seed_file {path} cannot be read: {exc}") from exc
    except ValueError as exc:
        raise ConfigurationError(f"flags.seed_file {exc}") from exc
    try:
        return parse_document(document, field="seed_file", environment=environment)
    except BastionError as exc:
        problems = "; ".join(
            f"{error.field}: {error.message}" for error in getattr(exc, "errors", ())[:10]
        )
        raise ConfigurationError(
            f"flags.seed_file {path}: {exc.detail}" + (f" {problems}" if problems else "")
        ) from exc


def build_flags(
    settings: Settings,
    *,
    database: Database | None,
    redis: Any = None,
    audit: AuditLog | None = None,
) -> FlagsRuntime:
    """Assemble the flags runtime from ``settings`` (nothing starts yet).

    Args:
        settings: the effective settings.
        database: where the flags are stored; ``None``: the seed file only.
        redis: the ``redis.asyncio`` client change notifications travel over
            (``flags.store_url``, else ``redis.url``); ``None``: polling only.
        audit: the audit trail writes are recorded in; ``None`` when it is off.

    Returns:
        The runtime; :func:`start_flags` loads the set and starts propagation.

    Raises:
        ConfigurationError: the seed file cannot be read or is invalid.
    """
    section = settings.flags
    seed = (
        load_seed(section.seed_file, flags_environment(settings))
        if section.seed_file is not None
        else None
    )
    store = FlagStore(database, audit=audit) if database is not None else None
    notifier = None
    if redis is not None and store is not None:
        notifier = FlagNotifier(
            redis,
            settings.redis.key_prefix + CHANNEL,
            timeout=settings.redis.socket_timeout,
        )
    flags = Flags()
    sync = FlagSync(
        flags=flags,
        compile=_compiler(settings),
        store=store,
        seed=seed or ([], []),
        notifier=notifier,
        poll_interval=section.poll_interval,
    )
    if store is not None:
        store.on_change = sync.changed
    return FlagsRuntime(settings=settings, flags=flags, store=store, sync=sync, seed=seed)


async def start_flags(runtime: FlagsRuntime) -> None:
    """Import the seed file into an empty store, load the set, start propagation.

    A database that does not answer does not stop start-up: every flag serves
    its default, readiness says the set is not loaded, and the poll loads it
    once the database answers (and imports the seed file then, into a store
    still empty).
    """
    store, seed = runtime.store, runtime.seed
    if store is not None and seed is not None:
        seed_file = str(runtime.settings.flags.seed_file)

        async def import_seed_later() -> bool:
            try:
                return await _seed(store, seed, seed_file)
            except BastionError as exc:
                # Serving already: an invalid seed is logged, not raised into the poll.
                logger.error("flags seed file not imported", error=exc.detail)  # noqa: TRY400 -- no trace needed
                return True

        if not await _seed(store, seed, seed_file):
            runtime.sync.pending_seed = import_seed_later
    await runtime.sync.start()
    logger.info(
        "feature flags started",
        source="database" if runtime.store is not None else "seed file",
        flags=len(runtime.flags.flag_set.keys()),
        revision=runtime.flags.revision,
        notifications=runtime.sync.notifier is not None,
        poll_interval=runtime.sync.poll_interval,
    )


async def _seed(store: FlagStore, seed: tuple[list[Flag], list[Segment]], seed_file: str) -> bool:
    """Import the seed into an empty store; whether that question was settled.

    ``False``: the database did not answer; ask again once it does.
    """
    try:
        # Any row, valid or not: a set whose rows no longer validate is not empty,
        # and the seed must not be imported over it.
        if not await store.empty():
            return True
        flags, segments = seed
        # Several instances starting at once may all find the store empty: the import
        # is serialised and skips flags stored as imported, so the set is made once.
        report = await store.import_flags(flags, segments, actor=SEED_ACTOR)
    except BastionError:
        raise
    except Exception as exc:  # noqa: BLE001 -- the database is down: serve defaults, say so
        logger.error("flags seed file not imported yet", error=type(exc).__name__)  # noqa: TRY400 -- class only
        return False
    if report.changed:
        if store.audit is not None:
            # Committed before the process is ready, like the start-up migrations' record:
            # in async mode the import's entry would otherwise be written by the group
            # commit while the first requests (or a migration, on SQLite) want the lock.
            await store.audit.flush()
        logger.info(
            "flags seeded",
            file=seed_file,
            flags=len(report.created),
            segments=len(report.segments_created),
        )
    return True


async def stop_flags(runtime: FlagsRuntime) -> None:
    """Stop propagation; the last set keeps serving anything still running."""
    await runtime.sync.stop()


def flags_runtime(source: HTTPConnection | Any) -> FlagsRuntime:
    """The flags runtime of the app serving ``source`` (a request, or the app itself).

    Raises:
        ConfigurationError: bastion is not installed on the app, or ``flags.enabled``
            is off.
    """
    app = source.app if isinstance(source, HTTPConnection) else source
    installed = getattr(getattr(app, "state", None), "bastion", None)
    runtime: FlagsRuntime | None = getattr(installed, "flags", None)
    if runtime is None:
        raise ConfigurationError("feature flags are off: set flags.enabled (and install bastion)")
    return runtime
