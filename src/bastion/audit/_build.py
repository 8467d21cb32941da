"""The audit runtime: the recorder, subject keys and checkpoints assembled from settings."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Final

import structlog
from fastapi import Depends
from sqlalchemy import inspect
from starlette.requests import HTTPConnection

from bastion.audit._checkpoint import (
    Checkpointer,
    CheckpointSink,
    DirectorySink,
    signing_keys,
)
from bastion.audit._event import Actor, AuditEvent, Outcome, Resource
from bastion.audit._guards import check_guards
from bastion.audit._listeners import SecurityEventRecorder
from bastion.audit._pseudonym import LoginPseudonyms
from bastion.audit._subjects import SubjectKeys, subject_for_login
from bastion.audit._tables import audit_metadata
from bastion.audit._writer import AuditLog, AuditUnavailable
from bastion.errors import ConfigurationError
from bastion.identity import on_security_event, remove_security_listener

if TYPE_CHECKING:
    import uuid

    from sqlalchemy.ext.asyncio import AsyncSession

    from bastion.audit._note import NoteSigner, NoteVerifier
    from bastion.data import AppliedRevision, Database
    from bastion.settings import Settings

__all__ = [
    "SCHEMA_RECHECK_INTERVAL",
    "AuditRuntime",
    "AuditSchema",
    "CurrentAuditLog",
    "audit_log",
    "audit_read",
    "audit_runtime",
    "build_audit",
    "record_migration_run",
    "record_migrations",
    "record_unlock",
    "start_audit",
    "stop_audit",
]

logger = structlog.get_logger("bastion.audit")


SCHEMA_RECHECK_INTERVAL: Final = 300.0
"""Seconds readiness trusts its last look at the audit tables and their append-only guards."""
# While the tables are missing (or the look failed), look again sooner: someone may be
# running the migration, and the service should turn ready soon after.
_MISSING_RECHECK_INTERVAL: Final = 5.0


class AuditSchema:
    """What the process knows of the audit tables and their guards, looked at rarely.

    One look (:meth:`probe`) lists the database's tables and, when the audit
    tables are all there, runs :func:`~bastion.audit._guards.check_guards`.
    Readiness reads the result and looks again only once it is older than
    ``interval`` seconds (5 s while the tables are missing), so a probe of
    ``/health/ready`` is not a query.

    Args:
        database: where the audit tables should be.
        interval: seconds a look stays current.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        database: Database,
        *,
        interval: float = SCHEMA_RECHECK_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._database = database
        self._interval = interval
        self._clock = clock
        self._lock = asyncio.Lock()
        self._checked_at: float | None = None
        self.missing: list[str] = []
        """Audit tables the database lacks (after a look)."""
        self.guard_problems: list[str] = []
        """What :func:`~bastion.audit._guards.check_guards` found missing or disabled."""
        self.error: str | None = None
        """The class of the exception the last look failed with, if it failed."""

    @property
    def usable(self) -> bool:
        """Whether the last look found every audit table (``False`` before any look)."""
        return self._checked_at is not None and self.error is None and not self.missing

    async def probe(self) -> None:
        """Look at the tables and the guards now; a failed look is kept in :attr:`error`."""
        self._checked_at = self._clock()
        try:
            async with self._database.engine.connect() as connection:
                names = await connection.run_sync(_table_names)
                missing = sorted(set(audit_metadata.tables) - names)
                problems = [] if missing else await check_guards(connection)
        except Exception as exc:  # noqa: BLE001 -- the database is down: readiness says so
            self.error = type(exc).__name__
            return
        self.error = None
        self.missing = missing
        self.guard_problems = problems

    async def refresh(self) -> None:
        """:meth:`probe` when the last look is out of date."""
        if self._current():
            return
        async with self._lock:
            # Another caller may have looked while this one waited.
            if not self._current():
                await self.probe()

    def _current(self) -> bool:
        if self._checked_at is None:
            return False
        interval = self._interval if self.usable else _MISSING_RECHECK_INTERVAL
        return self._clock() - self._checked_at < interval

    async def tables_check(self) -> None:
        """Readiness: raise while the audit tables are missing or cannot be looked at.

        Raises:
            AuditUnavailable: the tables are missing (the migration did not run) or
                the look failed.
        """
        await self.refresh()
        if self.error is not None:
            raise AuditUnavailable(f"cannot look at the audit tables ({self.error})")
        if self.missing:
            # The fix first: readiness shortens long messages.
            raise AuditUnavailable(
                f"audit tables missing, run `bastion migrate upgrade`: {', '.join(self.missing)}"
            )

    async def guards_check(self) -> None:
        """Readiness (not critical): raise while an append-only guard is missing or disabled.

        Raises:
            RuntimeError: what :func:`~bastion.audit._guards.check_guards` found.
        """
        await self.refresh()
        if self.guard_problems:
            raise RuntimeError("audit append-only guards: " + "; ".join(self.guard_problems))


def _table_names(connection: Any) -> set[str]:
    return set(inspect(connection).get_table_names())


@dataclass(slots=True)
class AuditRuntime:
    """The audit trail of an installed app (``app.state.bastion.audit``).

    Attributes:
        settings: the effective settings.
        database: where the audit tables live.
        log: the recorder; ``await runtime.log.record(event)``.
        subject_keys: the per-data-subject keys personal fields are encrypted under.
        checkpointer: signs the logs' heads (on a schedule and on demand).
        signer: the key that signs new checkpoints.
        verifiers: every key whose checkpoints are trusted (the signer's included).
        sinks: where checkpoints are also written besides the database.
        pseudonyms: what names a login identifier in entries (failed logins,
            lockouts, unlocks) instead of its unsalted hash.
        schema: what is known of the audit tables and their guards (readiness).
    """

    settings: Settings
    database: Database
    log: AuditLog
    subject_keys: SubjectKeys
    checkpointer: Checkpointer
    signer: NoteSigner
    verifiers: list[NoteVerifier]
    sinks: list[CheckpointSink]
    pseudonyms: LoginPseudonyms
    schema: AuditSchema
    _recorder: SecurityEventRecorder | None = field(default=None, repr=False)
    _schedule: asyncio.Task[None] | None = field(default=None, repr=False)

    async def schedule_check(self) -> None:
        """Readiness check: raise when the checkpoint schedule should run and does not.

        Raises:
            RuntimeError: the schedule task ended (it only ends by failing or on stop), or
                the latest checkpoint of a log was refused as not extending the signed one.
        """
        if self._schedule is not None and self._schedule.done():
            raise RuntimeError("the audit checkpoint schedule stopped; see the logs")
        refused = self.checkpointer.refused
        if refused:
            # A head that does not extend what was signed: stored entries were rewritten.
            reasons = ", ".join(f"{log_id}: {reason}" for log_id, reason in sorted(refused.items()))
            raise RuntimeError(f"audit checkpoints refused ({reasons}); run bastion audit verify")

    async def health_check(self) -> None:
        """Readiness (critical): the audit tables exist and the writer can take events.

        Raises:
            AuditUnavailable: the tables are missing, group commits fail, or the
                buffer is full.
        """
        await self.schema.tables_check()
        await self.log.health_check()


def _master_key(settings: Settings) -> bytes:
    secret = settings.audit.encryption_key
    if secret is None:
        # enforce_secrets() generates one in development: this is production without it.
        raise ConfigurationError("BASTION_AUDIT__ENCRYPTION_KEY is required for the audit trail")
    return secret.get_secret_value().encode("utf-8")


def build_audit(settings: Settings, *, database: Database) -> AuditRuntime:
    """Assemble the audit trail from ``settings`` on ``database`` (nothing starts yet).

    Args:
        settings: the effective settings, secrets already enforced.
        database: where the audit tables live.

    Returns:
        The runtime; :func:`start_audit` starts its writer and schedule.

    Raises:
        ConfigurationError: a key is missing or unfit (production).
    """
    section = settings.audit
    signer, verifiers = signing_keys(settings)
    try:
        master_key = _master_key(settings)
        subject_keys = SubjectKeys(
            database=database, master_key=master_key, cache_ttl=section.subject_key_cache_ttl
        )
        pseudonyms = LoginPseudonyms(master_key)
    except ValueError as exc:
        raise ConfigurationError(f"BASTION_AUDIT__ENCRYPTION_KEY is unfit: {exc}") from exc
    log = AuditLog(
        section,
        database=database,
        subject_keys=subject_keys,
        mask_keys=[*settings.logging.mask_keys, *section.mask_keys],
    )
    sinks: list[CheckpointSink] = []
    if section.checkpoint_directory is not None:
        sinks.append(DirectorySink(section.checkpoint_directory))
    elif settings.environment == "production":
        # Checkpoints kept only in the database the attacker writes to prove little.
        logger.warning(
            "audit_checkpoints_not_exported",
            hint="set BASTION_AUDIT__CHECKPOINT_DIRECTORY to storage the database operator "
            "does not control, or add a sink",
        )
    checkpointer = Checkpointer(
        database=database,
        signer=signer,
        verifiers=verifiers,
        origin_prefix=section.origin,
        sinks=sinks,
    )
    return AuditRuntime(
        settings=settings,
        database=database,
        log=log,
        subject_keys=subject_keys,
        checkpointer=checkpointer,
        signer=signer,
        verifiers=verifiers,
        sinks=sinks,
        pseudonyms=pseudonyms,
        schema=AuditSchema(database),
    )


async def start_audit(runtime: AuditRuntime) -> None:
    """Start the writer, record security events from now on, and schedule checkpoints.

    Looks at the audit tables first: when they are missing (migrations off and
    not run) it says so once, readiness fails with the fix, and the checkpoint
    schedule waits until a later look finds them, instead of failing each tick.
    """
    await runtime.schema.probe()
    _report_schema(runtime.schema)
    await runtime.log.start()
    recorder = SecurityEventRecorder(runtime.log, runtime.pseudonyms)
    on_security_event(recorder)
    runtime._recorder = recorder
    interval = runtime.settings.audit.checkpoint_interval
    if interval > 0:
        runtime._schedule = asyncio.create_task(
            _checkpoint_schedule(runtime, interval), name="bastion audit checkpoints"
        )
    logger.info(
        "audit trail started",
        mode=runtime.settings.audit.mode,
        partition=runtime.settings.audit.partition,
        checkpoint_interval=interval,
        signer=runtime.signer.name,
    )


def _report_schema(schema: AuditSchema) -> None:
    if schema.error is not None:
        logger.error("cannot look at the audit tables", error=schema.error)
    elif schema.missing:
        logger.error(
            "audit tables missing: nothing is recorded until `bastion migrate upgrade` runs; "
            "readiness reports it",
            tables=schema.missing,
        )
    elif schema.guard_problems:
        logger.warning(
            "audit append-only guards missing or disabled", problems=schema.guard_problems
        )


async def _checkpoint_schedule(runtime: AuditRuntime, interval: float) -> None:
    # Waits for the tables, looking as often as readiness does, rather than failing
    # (and logging) every tick until someone migrates.
    while not runtime.schema.usable:
        await asyncio.sleep(max(interval, _MISSING_RECHECK_INTERVAL))
        await runtime.schema.refresh()
    await runtime.checkpointer.run(interval)


async def stop_audit(runtime: AuditRuntime) -> None:
    """Stop recording: detach the listener, stop the schedule, drain the writer, sign the tail.

    The final checkpoint covers what the drain committed, so the next start-up's
    first checkpoint proves consistency with everything this process wrote.
    A failing final checkpoint is logged: shutdown must go on.
    """
    if runtime._recorder is not None:
        remove_security_listener(runtime._recorder)
        runtime._recorder = None
    schedule = runtime._schedule
    runtime._schedule = None
    if schedule is not None:
        schedule.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await schedule
    await runtime.log.stop()
    if schedule is not None and runtime.schema.usable:
        try:
            await runtime.checkpointer.checkpoint_all()
        except Exception as exc:  # noqa: BLE001 -- shutdown goes on; the next run signs it
            logger.error("final audit checkpoint failed", error=type(exc).__name__)  # noqa: TRY400 -- class only


def audit_runtime(source: HTTPConnection | Any) -> AuditRuntime:
    """The audit runtime of the app serving ``source`` (a request, or the app itself).

    Raises:
        ConfigurationError: bastion is not installed on the app, or its audit trail
            is off (``audit.enabled`` or ``database.enabled``).
    """
    app = source.app if isinstance(source, HTTPConnection) else source
    installed = getattr(getattr(app, "state", None), "bastion", None)
    runtime: AuditRuntime | None = getattr(installed, "audit", None)
    if runtime is None:
        raise ConfigurationError(
            "the audit trail is off: it needs audit.enabled and database.enabled"
        )
    return runtime


def audit_log(source: HTTPConnection | Any) -> AuditLog:
    """The audit recorder of the app serving ``source`` (a request, or the app itself).

    Example:
        >>> await audit_log(request).record(
        ...     AuditEvent(action="invoice.send", resource=Resource("invoice", str(invoice.id))),
        ...     session=session,
        ... )

    Raises:
        ConfigurationError: bastion is not installed on the app, or its audit trail
            is off (``audit.enabled`` or ``database.enabled``).
    """
    return audit_runtime(source).log


async def _current_audit_log(connection: HTTPConnection) -> AuditLog:
    # A coroutine: FastAPI runs plain dependencies in a worker thread.
    return audit_log(connection)


CurrentAuditLog = Annotated[AuditLog, Depends(_current_audit_log)]
"""Route parameter type: the app's :class:`AuditLog` (``log: CurrentAuditLog``)."""


async def audit_read(
    source: HTTPConnection | Any,
    resource: Resource,
    *,
    tenant_id: uuid.UUID | str | None = None,
    session: AsyncSession | None = None,
    details: dict[str, Any] | None = None,
) -> uuid.UUID | None:
    """Record that the current caller read a resource marked sensitive (``<type>.read``).

    Does nothing (returns ``None``) when ``audit.sensitive_reads`` is off, so a
    route calls it unconditionally. The app registers the ``<type>.read`` action.

    Args:
        source: the request (or the app).
        resource: what was read.
        tenant_id: its tenant; ``None``: the request's.
        session: the read's session; in ``sync`` mode the entry commits with it.
        details: small facts to keep with the entry.

    Returns:
        The entry's id, or ``None`` when reads are not recorded.
    """
    runtime = audit_runtime(source)
    if not runtime.settings.audit.sensitive_reads:
        return None
    event = AuditEvent(
        action=f"{resource.type}.read",
        resource=resource,
        tenant_id=tenant_id,
        details=details or {},
    )
    return await runtime.log.record(event, session=session)


async def record_migrations(
    log: AuditLog, applied: Sequence[AppliedRevision], *, tool: str
) -> uuid.UUID | None:
    """Record ``admin.migration.apply`` for a run that applied revisions (none: nothing).

    Args:
        log: the recorder.
        applied: the revisions the run applied, in order.
        tool: what applied them (``start-up (auto)``, ``bastion migrate upgrade``).
    """
    if not applied:
        return None
    event = AuditEvent(
        action="admin.migration.apply",
        actor=Actor.system("migrations"),
        resource=Resource("migration", f"{applied[-1].tree}:{applied[-1].revision}"),
        details={
            "tool": tool,
            "direction": applied[-1].direction,
            "revisions": [f"{revision.tree}:{revision.revision}" for revision in applied],
        },
    )
    return await log.record(event)


async def record_migration_run(
    runtime: AuditRuntime, applied: Sequence[AppliedRevision], *, tool: str
) -> None:
    """Record a migration run made outside a serving process (``bastion migrate``).

    The writer runs just for this: started, given the event, and stopped, which
    commits it in either mode before the command exits.
    """
    if not applied:
        return
    await runtime.log.start()
    try:
        await record_migrations(runtime.log, applied, tool=tool)
    finally:
        await runtime.log.stop()


async def record_unlock(
    runtime: AuditRuntime, identifier: str, *, failure: BaseException | None = None
) -> uuid.UUID:
    """Record ``admin.lockout.unlock`` for ``POST /admin/ratelimit/unlock``.

    Called *before* the lockout is lifted, so no unlock happens unrecorded: when
    this raises, the route answers the error and unlocks nothing. When the unlock
    then fails, a second entry with outcome ``failure`` says so.

    The identifier (an e-mail address, often) is named by its keyed pseudonym,
    like the lockout it lifts: as resource id and as data subject
    ``login:<pseudonym>``.

    Args:
        runtime: the audit trail.
        identifier: the identifier the admin unlocks.
        failure: the unlock's error, to record that it failed.
    """
    pseudonym = runtime.pseudonyms.of_identifier(identifier)
    event = AuditEvent(
        action="admin.lockout.unlock",
        outcome=Outcome.SUCCESS if failure is None else Outcome.FAILURE,
        resource=Resource("login", pseudonym),
        subject=subject_for_login(pseudonym),
        details={} if failure is None else {"error": type(failure).__name__},
    )
    return await runtime.log.record(event)
