"""Diagnostics: whether every configured backend answers, and which settings are risky.

``bastion doctor`` is :func:`diagnose`; each check is also a plain function
returning :class:`Finding` values, so a deployment script or a test can run one
on its own. Reachability is checked with real connections and a short timeout;
nothing is written to any backend. Risky combinations are read from the
settings alone.

Statuses, from good to bad: ``ok``, ``note`` (worth knowing), ``warning``
(risky: ``bastion doctor --strict`` fails on it) and ``failure`` (the service
would not work: ``bastion doctor`` fails on it).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import re
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final
from urllib.parse import urlsplit

from sqlalchemy.engine import make_url

from bastion._loading import load_app
from bastion.backends import (
    BackendKind,
    backend_kind,
    import_optional,
    redact_url,
    shared_state_backends,
)
from bastion.errors import ConfigurationError
from bastion.http._idempotency_store import idempotency_store_kind
from bastion.settings import Settings, load_settings

if TYPE_CHECKING:
    from bastion._stack import Bastion
    from bastion.audit._build import AuditSchema

__all__ = [
    "DEFAULT_TIMEOUT",
    "Finding",
    "Report",
    "Status",
    "check_audit_guards",
    "check_combinations",
    "check_database",
    "check_migrations",
    "check_redis",
    "check_tcp",
    "check_workers",
    "diagnose",
]

DEFAULT_TIMEOUT: Final = 2.0
"""Seconds each reachability check may take before the backend counts as unreachable."""

# Default ports of the broker schemes, for a URL that names none.
_DEFAULT_PORTS: Final = {"nats": 4222, "tls": 4222, "amqp": 5672, "amqps": 5671}
_PASSWORD_IN_TEXT: Final = re.compile(r"(://[^/\s:@]*:)[^@\s/]+@")


class Status(enum.StrEnum):
    """How bad a finding is, from good to bad."""

    OK = "ok"
    NOTE = "note"
    WARNING = "warning"
    FAILURE = "failure"


@dataclass(frozen=True, slots=True)
class Finding:
    """The outcome of one check.

    Attributes:
        check: what was checked, e.g. ``database`` or ``workers: ratelimit``.
        status: how bad it is.
        detail: what was found, in one sentence; never a secret.
        fix: what to change, when something should change.
    """

    check: str
    status: Status
    detail: str
    fix: str | None = None


@dataclass(frozen=True, slots=True)
class Report:
    """Every finding of one :func:`diagnose` run, in a stable order."""

    findings: tuple[Finding, ...]

    @property
    def failures(self) -> tuple[Finding, ...]:
        """The findings that mean the service would not work."""
        return tuple(f for f in self.findings if f.status is Status.FAILURE)

    @property
    def warnings(self) -> tuple[Finding, ...]:
        """The risky findings."""
        return tuple(f for f in self.findings if f.status is Status.WARNING)

    def exit_code(self, *, strict: bool = False) -> int:
        """1 on any failure (or, when ``strict``, any warning), else 0."""
        if self.failures or (strict and self.warnings):
            return 1
        return 0

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready form, as ``bastion doctor --json`` prints it."""
        return {
            "ok": not self.failures,
            "failures": len(self.failures),
            "warnings": len(self.warnings),
            "findings": [asdict(f) for f in self.findings],
        }


async def diagnose(
    settings: Settings | None = None,
    *,
    app: str | None = None,
    load: bool = True,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 -- each check's bound; a timeout is a finding
) -> Report:
    """Check every configured backend and every risky combination; ``bastion doctor``.

    Args:
        settings: the settings to check; loaded from the environment when omitted.
            When the app loads and has bastion installed, its own settings are
            checked instead, since those are what it runs with.
        app: ``module:attribute`` of the app; ``settings.server.app`` when omitted.
        load: import the app, to check it loads and to ask its migrator what is
            pending. Importing runs the app module's top-level code.
        timeout: seconds each reachability check may take.

    Returns:
        The findings: the app, the database, Redis, the broker, distinct stores,
        migrations, the audit trail's guards, then the risky combinations.

    Raises:
        ConfigurationError: a setting is invalid (one line naming the variable).

    Example:
        >>> report = asyncio.run(diagnose(app="myservice:app"))
        >>> [f.check for f in report.failures]
        []
    """
    if settings is None:
        settings = load_settings()
    findings: list[Finding] = []
    runtime: Bastion | None = None
    if load:
        spec = app or settings.server.app
        runtime, finding = _load_runtime(spec)
        findings.append(finding)
        if runtime is not None:
            settings = runtime.settings
    try:
        checks: list[Awaitable[Finding]] = []
        if settings.database.enabled:
            checks.append(check_database(settings, timeout=timeout))
        if settings.redis.enabled and settings.redis.url is not None:
            checks.append(check_redis(settings.redis.url.get_secret_value(), timeout=timeout))
        if settings.events.enabled and settings.events.broker_url is not None:
            broker = settings.events.broker_url.get_secret_value()
            checks.append(check_tcp("broker", broker, timeout=timeout))
        checks.extend(_store_checks(settings, timeout))
        reachability = await asyncio.gather(*checks)
        findings.extend(reachability)
        if runtime is not None:
            database = next((f for f in reachability if f.check == "database"), None)
            findings.append(await check_migrations(runtime, database))
            audit = await check_audit_guards(runtime, database, timeout=timeout)
            if audit is not None:
                findings.append(audit)
    finally:
        if runtime is not None:
            await _close(runtime)
    findings.extend(check_combinations(settings))
    return Report(tuple(findings))


def _load_runtime(spec: str) -> tuple[Bastion | None, Finding]:
    try:
        app = load_app(spec)
    except ConfigurationError as exc:
        return None, Finding(
            "app",
            Status.FAILURE,
            f"{spec} does not load: {_mask(str(exc))}",
            "pass --app MODULE:APP or set BASTION_SERVER__APP",
        )
    except Exception as exc:  # noqa: BLE001 -- any import-time error is the finding
        return None, Finding(
            "app", Status.FAILURE, f"{spec} fails while loading: {_describe(exc)}", None
        )
    runtime = getattr(getattr(app, "state", None), "bastion", None)
    from bastion._stack import Bastion  # noqa: PLC0415 -- _stack imports the data layer

    if not isinstance(runtime, Bastion):
        return None, Finding(
            "app",
            Status.NOTE,
            f"{spec} loads but has no bastion installed: migrations not checked",
            "call bastion.install(app)",
        )
    return runtime, Finding("app", Status.OK, f"{spec} loads with bastion installed")


async def _close(runtime: Bastion) -> None:
    if runtime.database is not None:
        await runtime.database.aclose()
    if runtime.redis is not None:
        await runtime.redis.aclose()


async def check_database(
    settings: Settings,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 -- a timeout is a finding, not an exception
) -> Finding:
    """Connect to ``database.url`` and run ``SELECT 1``, within ``timeout`` seconds.

    A SQLite file that does not exist yet is not created: it is a note (start-up
    creates it) when its directory is writable, a failure when it is not.
    """
    from bastion.data import Database  # noqa: PLC0415 -- SQLAlchemy's import is not free

    url = settings.database.url.get_secret_value()
    try:
        kind = backend_kind(url)
    except ConfigurationError as exc:
        return Finding("database", Status.FAILURE, str(exc), "set BASTION_DATABASE__URL")
    shown = _show(url)
    if kind is BackendKind.SQLITE:
        missing = _missing_sqlite_file(url)
        if missing is not None:
            return _sqlite_not_created(shown, missing)
    database_settings = settings.database.model_copy(update={"connect_timeout": timeout})

    async def ping() -> None:
        database = Database(database_settings)
        try:
            await database.ping()
        finally:
            await database.aclose()

    return await _reach(
        "database",
        f"{kind.value} at {shown}",
        ping,
        timeout,
        fix="check BASTION_DATABASE__URL and that the database server is up",
    )


def _missing_sqlite_file(url: str) -> Path | None:
    database = make_url(url).database
    if not database or database == ":memory:":
        return None
    path = Path(database).expanduser()
    return None if path.exists() else path


def _sqlite_not_created(shown: str, path: Path) -> Finding:
    ancestor = path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if os.access(ancestor, os.W_OK):
        return Finding(
            "database",
            Status.NOTE,
            f"sqlite at {shown}: the file does not exist yet; start-up creates it",
        )
    return Finding(
        "database",
        Status.FAILURE,
        f"sqlite at {shown}: the file does not exist and {ancestor} is not writable",
        "make the directory writable or point BASTION_DATABASE__URL elsewhere",
    )


async def check_redis(
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 -- a timeout is a finding, not an exception
    check: str = "redis",
) -> Finding:
    """Send ``PING`` to the Redis at ``url``, within ``timeout`` seconds."""
    try:
        redis_asyncio: Any = import_optional("redis.asyncio")
    except ConfigurationError as exc:
        return Finding(check, Status.FAILURE, str(exc))

    async def ping() -> None:
        client = redis_asyncio.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
        try:
            await client.ping()
        finally:
            await client.aclose()

    return await _reach(
        check,
        f"redis at {_show(url)}",
        ping,
        timeout,
        fix="check BASTION_REDIS__URL and that Redis is up",
    )


async def check_tcp(
    check: str,
    url: str,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 -- a timeout is a finding, not an exception
) -> Finding:
    """Open a TCP connection to the host and port ``url`` names, within ``timeout`` seconds.

    A comma-separated server list (``nats://a:4222,nats://b:4222``) is reachable
    when any of its servers is.
    """
    scheme = url.split("://", 1)[0]
    targets = []
    for raw in url.split(","):
        part = raw.strip()
        parts = urlsplit(part if "://" in part else f"{scheme}://{part}")
        try:
            port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
        except ValueError:
            port = None
        if parts.hostname is None or port is None:
            return Finding(check, Status.FAILURE, f"cannot tell host and port from {_show(url)}")
        targets.append((parts.hostname, port))

    async def connect() -> None:
        errors: list[BaseException] = []
        for host, port in targets:
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError as exc:
                errors.append(exc)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise errors[-1]

    return await _reach(
        check,
        f"{_show(url)} (TCP only)",
        connect,
        timeout,
        fix=f"check the {check} URL and that the server is up",
    )


async def _reach(
    check: str,
    what: str,
    probe: Callable[[], Awaitable[None]],
    timeout: float,  # noqa: ASYNC109 -- a timeout is a finding, not an exception
    *,
    fix: str,
) -> Finding:
    started = time.perf_counter()
    try:
        async with asyncio.timeout(timeout):
            await probe()
    except TimeoutError:
        return Finding(check, Status.FAILURE, f"{what}: no answer within {timeout:g} s", fix)
    except Exception as exc:  # noqa: BLE001 -- whatever the driver raises is the finding
        return Finding(check, Status.FAILURE, f"{what}: unreachable ({_describe(exc)})", fix)
    elapsed = (time.perf_counter() - started) * 1000
    return Finding(check, Status.OK, f"{what}: reachable in {elapsed:.1f} ms")


def _store_checks(settings: Settings, timeout: float) -> list[Awaitable[Finding]]:
    # Components with their own store URL pointing somewhere other than the shared
    # Redis: each distinct one is checked once.
    shared = settings.redis.url.get_secret_value() if settings.redis.url else None
    seen: dict[str, list[str]] = {}
    for backend in shared_state_backends(settings):
        if backend.url == shared or backend.url.startswith("memory:"):
            continue
        seen.setdefault(backend.url, []).append(backend.section)
    checks: list[Awaitable[Finding]] = []
    for url, sections in seen.items():
        name = "store: " + ", ".join(sections)
        if _kind_or_none(url) is BackendKind.REDIS:
            checks.append(check_redis(url, timeout=timeout, check=name))
        else:
            checks.append(check_tcp(name, url, timeout=timeout))
    return checks


async def check_migrations(runtime: Bastion, database: Finding | None = None) -> Finding:
    """Ask the app's migrator whether applied revisions were edited and which are pending.

    Args:
        runtime: what ``bastion.install`` put on the app.
        database: the database finding; no question is asked of a database that
            is unreachable or not created yet.
    """
    migrator = runtime.migrator
    if migrator is None:
        return Finding("migrations", Status.NOTE, "migrations are switched off for this app")
    if database is not None and database.status is not Status.OK:
        return Finding("migrations", Status.NOTE, "not checked: the database is not reachable yet")
    try:
        verification = await migrator.verify()
        pending = await migrator.pending()
    except Exception as exc:  # noqa: BLE001 -- a migrator that cannot tell is a warning
        return Finding(
            "migrations", Status.WARNING, f"cannot tell what is pending: {_describe(exc)}"
        )
    mode = runtime.settings.migration_mode
    if verification.modified:
        edited = ", ".join(check.name for check in verification.modified)
        refuses = "start-up refuses to serve" if mode != "off" else "upgrades refuse to run"
        return Finding(
            "migrations",
            Status.FAILURE,
            f"applied revision(s) edited since they ran: {edited}; {refuses}",
            "restore the file(s) and write a new revision, or review the edit and run "
            "`bastion migrate verify --accept REVISION`",
        )
    named = [f"{tree}:{revision}" for tree, revisions in pending.items() for revision in revisions]
    if not named:
        return Finding("migrations", Status.OK, "every migration tree is at its head")
    listed = f"{len(named)} pending ({', '.join(named)})"
    status, consequence = _PENDING[mode]
    fix = None if mode == "auto" else "run `bastion migrate upgrade`"
    return Finding("migrations", status, f"{listed}; {consequence} (mode={mode})", fix)


async def check_audit_guards(
    runtime: Bastion,
    database: Finding | None = None,
    *,
    timeout: float = DEFAULT_TIMEOUT,  # noqa: ASYNC109 -- a timeout is a finding, not an exception
) -> Finding | None:
    """Whether the audit tables' append-only guards (grants, triggers) are in place.

    A missing or disabled guard is a warning: entries are still recorded and
    the Merkle tree still detects a changed one, but the database no longer
    refuses the change.

    Args:
        runtime: what ``bastion.install`` put on the app.
        database: the database finding; an unreachable database is not asked.
        timeout: seconds the look may take.

    Returns:
        The finding, or ``None`` when the app has no audit trail.
    """
    if runtime.audit is None:
        return None
    if database is not None and database.status is not Status.OK:
        return Finding(
            "audit guards", Status.NOTE, "not checked: the database is not reachable yet"
        )
    schema = runtime.audit.schema
    try:
        async with asyncio.timeout(timeout):
            await schema.probe()
    except TimeoutError:
        return Finding("audit guards", Status.WARNING, f"not checked: no answer in {timeout:g}s")
    return _audit_guards_finding(schema)


def _audit_guards_finding(schema: AuditSchema) -> Finding:
    if schema.error is not None:
        return Finding("audit guards", Status.WARNING, f"cannot tell: {schema.error}")
    if schema.missing:
        return Finding(
            "audit guards",
            Status.NOTE,
            f"not checked: the audit tables are missing ({', '.join(schema.missing)})",
            "run `bastion migrate upgrade`",
        )
    if schema.guard_problems:
        return Finding(
            "audit guards",
            Status.WARNING,
            "append-only guards missing or disabled: " + "; ".join(schema.guard_problems),
            "re-enable the triggers or revoke the grants (docs/audit.md); "
            "tables made by create_all: bastion.audit._guards.install_guards",
        )
    return Finding("audit guards", Status.OK, "the audit tables refuse UPDATE and DELETE")


# What pending migrations mean under each start-up migration mode.
_PENDING: Final = {
    "auto": (Status.NOTE, "start-up applies them"),
    "check": (Status.FAILURE, "start-up refuses to serve with pending migrations"),
    "off": (Status.WARNING, "nothing applies them"),
}


def check_workers(settings: Settings) -> list[Finding]:
    """What goes wrong with ``server.workers`` > 1: per-process state, and SQLite.

    Every component that keeps its state in ``memory://`` keeps one copy per
    worker, so rate limits and lockouts multiply or diverge. Flags are the
    exception: they live in the database, and without Redis a change reaches the
    other workers by polling, within ``flags.poll_interval``: a note, not a warning.
    SQLite takes one writer at a time, so workers queue on its lock.
    """
    workers = settings.server.workers
    if workers <= 1:
        return []
    findings = []
    memory = [
        backend.section
        for backend in shared_state_backends(settings)
        if _kind_or_none(backend.url) is BackendKind.MEMORY
    ]
    idempotency = settings.http.idempotency
    if settings.http.enabled and idempotency.enabled:
        with contextlib.suppress(ConfigurationError):  # a bad URL is check_stores' finding
            if idempotency_store_kind(settings) == "memory":
                # A retry reaching another worker would not find the key and run again.
                memory.append("http.idempotency")
    if "flags" in memory:
        memory.remove("flags")
        findings.append(
            Finding(
                "workers: flag changes",
                Status.NOTE,
                f"flag changes reach the other workers by polling the database, within "
                f"flags.poll_interval ({settings.flags.poll_interval:g} s), not at once",
                "set BASTION_REDIS__URL (or BASTION_FLAGS__STORE_URL) for changes in "
                "under a second",
            )
        )
    if memory:
        findings.append(
            Finding(
                "workers: shared state",
                Status.WARNING,
                f"{', '.join(memory)} keep their state in memory:// with {workers} workers: "
                f"each worker has its own copy, so rate limits and lockouts "
                f"multiply by {workers} or diverge",
                "set BASTION_REDIS__URL=redis://HOST:6379/0 (used by every component), "
                "or one component's BASTION_<SECTION>__STORE_URL",
            )
        )
    if settings.database.enabled and settings.database_is_sqlite:
        findings.append(
            Finding(
                "workers: database",
                Status.WARNING,
                f"SQLite with {workers} workers: one writer at a time, so workers queue on "
                "its lock and writes time out under load",
                "set BASTION_DATABASE__URL=postgresql+asyncpg://USER@HOST/DB, or serve "
                "with --workers 1",
            )
        )
    return findings


def check_combinations(settings: Settings) -> list[Finding]:
    """Every risky combination of settings that can be seen without a connection.

    Returns:
        One finding per risk, or one ``ok`` finding when there is none.
    """
    findings = check_workers(settings)
    production = settings.environment == "production"
    if production:
        findings.extend(_production_risks(settings))
    if not findings:
        findings.append(Finding("configuration", Status.OK, "no risky combination found"))
    return findings


def _production_risks(settings: Settings) -> Iterable[Finding]:
    if settings.database.enabled and settings.database_is_sqlite:
        yield Finding(
            "production: database",
            Status.WARNING,
            "production on SQLite: one machine, one writer, and no failover",
            "set BASTION_DATABASE__URL=postgresql+asyncpg://USER@HOST/DB",
        )
    if settings.database.enabled and settings.database.echo:
        yield Finding(
            "production: database.echo",
            Status.WARNING,
            "every SQL statement is logged, and statements can carry personal data",
            "unset BASTION_DATABASE__ECHO",
        )
    if settings.logging.level == "DEBUG":
        yield Finding(
            "production: logging",
            Status.WARNING,
            "debug-level logging in production: slow, noisy, and more likely to carry data",
            "set BASTION_LOGGING__LEVEL=INFO",
        )
    if not settings.migrations.enabled or settings.migration_mode == "off":
        yield Finding(
            "production: migrations",
            Status.WARNING,
            "migrations are off: a schema behind the code fails at the first query that "
            "needs the change, not at start-up",
            "set BASTION_MIGRATIONS__MODE=check (refuse to start) or auto",
        )
    if (
        settings.health.enabled
        and not settings.health.allowed_networks
        and not settings.health.token
    ):
        yield Finding(
            "production: health probes",
            Status.NOTE,
            "health probes answer anyone; readiness names the dependencies it checks",
            "set BASTION_HEALTH__ALLOWED_NETWORKS or BASTION_HEALTH__TOKEN",
        )
    memory = [
        b.section
        for b in shared_state_backends(settings)
        # Flags poll the database without Redis: replicas converge, only more slowly.
        if b.url.startswith("memory:") and b.section != "flags"
    ]
    if memory and settings.server.workers <= 1:
        yield Finding(
            "production: shared state",
            Status.NOTE,
            f"{', '.join(memory)} keep state in memory://: right for one instance, "
            "wrong as soon as there are replicas",
            "set BASTION_REDIS__URL before running more than one instance",
        )


def _kind_or_none(url: str) -> BackendKind | None:
    try:
        return backend_kind(url)
    except ConfigurationError:
        return None


def _show(url: str) -> str:
    try:
        return redact_url(url)
    except ValueError:
        # An unparsable port: show nothing rather than risk the password.
        return url.split("://", 1)[0] + "://…"


def _mask(text: str) -> str:
    return _PASSWORD_IN_TEXT.sub(r"\1***@", text)


def _describe(exc: BaseException) -> str:
    message = str(exc).strip() or "no message"
    return _mask(f"{type(exc).__name__}: {message}")
