"""Assembles bastion's middleware, routes, handlers and lifespan onto an app."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from fastapi import APIRouter
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from bastion._access import AccessPolicy
from bastion._admin import ADMIN_PREFIX, AdminRoutes
from bastion._forwarded import ClientAddress
from bastion._secrets import enforce_secrets
from bastion.audit._build import (
    AuditRuntime,
    build_audit,
    record_migrations,
    record_unlock,
    start_audit,
    stop_audit,
)
from bastion.audit._routes import AUDIT_PREFIX, AuditRoutes
from bastion.backends import BackendKind, backend_kind, import_optional, redact_url
from bastion.data import AppliedRevision, Database, MigrationTree, Migrator
from bastion.data._transaction import default_database, use_database
from bastion.errors import (
    PROBLEM_SCHEMA,
    ConfigurationError,
    ErrorCode,
    problem_responses,
    set_problem_type_base,
)
from bastion.flags._build import FlagsRuntime, build_flags, start_flags, stop_flags
from bastion.flags._routes import admin_flag_routes, client_flag_routes
from bastion.guard._middleware import GuardMiddleware, GuardRoutes
from bastion.guard._screen import Guard, build_guard
from bastion.http._conditional import document_preconditions
from bastion.http._deprecation_usage import DeprecationUsage
from bastion.http._idempotency import (
    IdempotencyMiddleware,
    IdempotentRoute,
    document_idempotency,
    idempotent_operations,
    start_idempotency,
    stop_idempotency,
)
from bastion.http._idempotency_store import IdempotencyStore, build_idempotency_store
from bastion.http._security import SecurityMiddleware
from bastion.http._versioning import (
    VersioningMiddleware,
    deprecation_routes,
    document_deprecations,
)
from bastion.identity import jwks_route, protected_operations
from bastion.identity._build import (
    build_identity,
    identity_checks,
    start_identity,
    stop_identity,
)
from bastion.identity._events import emit_lockout
from bastion.identity._middleware import IdentityMiddleware
from bastion.identity._rbac import authenticated_operations
from bastion.identity._runtime import Identity
from bastion.lifecycle import Lifecycle
from bastion.observability import (
    HealthRegistry,
    MetricsEndpoint,
    RequestMiddleware,
    configure_logging,
    install_exception_handlers,
    instrument_redis,
)
from bastion.observability._health import _forbidden, operational_route
from bastion.observability._http_metrics import HttpMetrics
from bastion.observability._tracing import Tracing, build_tracing
from bastion.ratelimit import (
    LoginThrottle,
    MemoryStore,
    Quotas,
    RateLimiter,
    RateLimitMiddleware,
    RedisStore,
    StoreUnavailable,
)
from bastion.ratelimit._limiter import _IDENTIFIER_MAX as IDENTIFIER_MAX
from bastion.resilience import Resilience, current_resilience, use_resilience
from bastion.resilience._deadline import RequestDeadlines
from bastion.resilience._http import forget_client_tracing, use_client_tracing
from bastion.settings import Settings, load_settings
from bastion.tenancy._admin import tenant_admin_routes
from bastion.tenancy._scope import current_tenant_id

__all__ = ["Bastion", "create_app", "install"]

logger = structlog.get_logger("bastion")

# Start-up runs low priorities first, shutdown high first: the pool opens before
# migrations run and closes after everything that might still use it.
PRIORITY_POOLS = 10
# Circuits follow the shared state once Redis is there, and are current before
# migrations open the first database connection through the database pipeline.
PRIORITY_RESILIENCE = 15
# After the pools open (the limiter's Redis client is one of them), closed before them.
PRIORITY_RATELIMIT = 16
# After the pools and the limiter (its login throttle and quotas are identity's), closed before.
PRIORITY_IDENTITY = 17
PRIORITY_MIGRATIONS = 20
# After migrations (its tables must exist, and it records the run), stopped before the
# pools close: the drain's last group commit still has its connection.
PRIORITY_AUDIT = 25
# After audit (flag writes are recorded in it, the seed import included), stopped before it.
PRIORITY_FLAGS = 26
# After migrations (the SQL store's table must exist), stopped before the pools close; the
# deprecation counts' last batch is flushed on a live Redis client.
PRIORITY_HTTP = 27


@dataclass(slots=True)
class Bastion:
    """What :func:`install` put on an app; also stored as ``app.state.bastion``.

    Attributes:
        settings: the effective settings.
        lifecycle: hooks, phase and in-flight count.
        health: the readiness registry; add checks with ``health.register``.
        database: the shared database, or ``None`` when ``database.enabled`` is off.
        redis: the shared ``redis.asyncio.Redis`` client, or ``None`` when not configured.
        migrator: runs bastion's and the app's migration trees.
        tracing: the app's tracer provider and tracer, or ``None`` when tracing is off.
        resilience: the registry of the app's dependency pipelines and circuits,
            or ``None`` when ``resilience.enabled`` is off.
        ratelimit: the rate limiter (policies, ``hit``, ``quotas``, ``login``), or
            ``None`` when ``ratelimit.enabled`` is off.
        identity: accounts, tokens, API keys and roles, or ``None`` when
            ``identity.enabled`` or the database is off.
        audit: the audit trail (``audit.log.record(event)``), or ``None`` when
            ``audit.enabled`` or the database is off.
        flags: the feature flags (``flags.flags.is_enabled(key, context)``), or
            ``None`` when ``flags.enabled`` is off; without the database, the seed
            file's flags, read-only.
        idempotency: where ``Idempotency-Key`` records live, or ``None`` when
            ``http.enabled`` or ``http.idempotency.enabled`` is off.
        deprecations: who still calls deprecated routes (``await
            deprecations.report(days=7)``), or ``None`` when versioning is off.
        guard: prompt-injection screening (``await guard.screen(text, field=...)``);
            it screens nothing when ``guard.enabled`` or
            ``guard.prompt_injection.enabled`` is off.
    """

    settings: Settings
    lifecycle: Lifecycle
    health: HealthRegistry
    database: Database | None
    redis: Any
    migrator: Migrator | None
    tracing: Tracing | None = None
    resilience: Resilience | None = None
    ratelimit: RateLimiter | None = None
    identity: Identity | None = None
    audit: AuditRuntime | None = None
    flags: FlagsRuntime | None = None
    idempotency: IdempotencyStore | None = None
    deprecations: DeprecationUsage | None = None
    guard: Guard | None = None


def install(app: Starlette, *, settings: Settings | None = None, **overrides: Any) -> Bastion:
    """Make a Starlette or FastAPI app production-ready.

    Adds the request context and ``X-Request-Id``, RFC 9457 errors for every
    failure, JSON logs with an access line per request, ``/health/live``,
    ``/health/ready`` and ``/health/circuits``, request deadlines, resilience
    pipelines for the database and Redis, the shared database, start-up
    migrations and graceful shutdown; with the database, identity too: its
    secrets checked first, the principal of every request bound from its access
    token, API key or trusted header, and the ``/v1/auth``, ``/v1/tenants``,
    ``/v1/api-keys`` and JWKS routes; and the audit trail: every security event,
    migration and lockout unlock recorded, and ``/admin/audit`` to read it; and
    feature flags: stored in the database, evaluated in process, kept current on
    every instance, with ``/admin/features`` and ``GET /api/features``. Every
    request also passes the API conventions (security headers, CORS, CSRF on
    cookie-authenticated writes, deprecation headers and 410 after sunset) and the
    request guards (body size, media type, JSON shape, encoding, header and query
    size); routes marked ``@idempotent`` honour ``Idempotency-Key``; and
    ``runtime.guard`` screens text bound for an LLM for prompt injection.

    Example:
        >>> app = FastAPI()
        >>> bastion.install(app, logging={"level": "DEBUG"})

    Args:
        app: the application; must not have started serving yet.
        settings: a settings tree; built from the environment when omitted.
        overrides: settings by section, over the environment and ``bastion.toml``.

    Returns:
        The installed runtime, also at ``app.state.bastion``.

    Raises:
        ConfigurationError: a setting is invalid, a secret is unfit in production (one
            line per problem), or bastion is already installed.
    """
    if getattr(app.state, "bastion", None) is not None:
        raise ConfigurationError("bastion.install() was already called on this app")
    if settings is None:
        settings = load_settings(**overrides)
    elif overrides:
        raise ConfigurationError("pass either settings= or keyword overrides, not both")

    set_problem_type_base(settings.http.problem_type_base)
    access_log = configure_logging(settings.logging) if settings.logging.enabled else None
    if _identity_wanted(settings) or _audit_wanted(settings):
        # Before anything is built from them: production refuses unfit secrets here, one
        # line per problem; development fills in a generated pepper, API-key secret and
        # audit encryption key.
        settings = enforce_secrets(settings)
    lifecycle = Lifecycle()
    health = HealthRegistry(
        lifecycle,
        default_timeout=settings.health.check_timeout,
        allowed_networks=settings.health.allowed_networks,
        token=settings.health.token.get_secret_value() if settings.health.token else None,
    )

    # Built first: the database and Redis clients make their spans with the app's
    # own provider, so they reach its exporter whichever provider is global.
    tracing = build_tracing(settings.tracing) if settings.tracing.enabled else None
    redis = _install_redis(settings, lifecycle, health, tracing)
    resilience, deadlines = _install_resilience(
        app, settings, lifecycle=lifecycle, health=health, redis=redis, tracing=tracing
    )
    database = _install_database(settings, lifecycle, health, tracing, resilience)
    # What start-up migrations applied, for the audit trail to record once it runs.
    migrated: list[AppliedRevision] = []
    migrator = _install_migrations(settings, lifecycle, database, migrated)
    operational = (settings.health.path_prefix.rstrip("/") + "/", settings.metrics.path)
    limiter = _install_ratelimit(app, settings, lifecycle, redis, operational)
    identity = _install_identity(
        settings,
        lifecycle=lifecycle,
        health=health,
        database=database,
        redis=redis,
        limiter=limiter,
        resilience=resilience,
    )
    audit = _install_audit(
        settings,
        lifecycle=lifecycle,
        health=health,
        database=database,
        migrator=migrator,
        migrated=migrated,
    )
    flags = _install_flags(
        app,
        settings,
        lifecycle=lifecycle,
        health=health,
        database=database,
        redis=redis,
        audit=audit,
    )

    idempotency = _install_idempotency(
        app, settings, lifecycle=lifecycle, health=health, redis=redis, database=database
    )
    deprecations = _install_deprecation_usage(settings, lifecycle, redis)
    guard_routes, guard = _install_guard(app, settings, lifecycle, audit)

    if tracing is not None:
        # Last at shutdown (lowest priority): spans of the pools' closing are exported too.
        lifecycle.on_shutdown("flush traces", tracing.shutdown, priority=0)
        # FastAPI >= 0.16x traces natively once a global provider is set: a second
        # SERVER span around bastion's, and three INTERNAL spans per operation. The
        # ``telemetry=`` constructor argument is its public switch; install() gets a
        # built app, so it turns off the same config dict the app reads per request.
        native: Any = getattr(app, "_telemetry", None)
        if isinstance(native, dict):
            native["tracing"] = False
    runtime = Bastion(
        settings,
        lifecycle,
        health,
        database,
        redis,
        migrator,
        tracing,
        resilience,
        limiter,
        identity,
        audit,
        flags,
        idempotency,
        deprecations,
        guard,
    )
    app.state.bastion = runtime

    probes: list[Route] = []
    if settings.health.enabled:
        probes = health.routes(settings.health.path_prefix)
        if resilience is not None:
            probes.append(_circuits_route(settings, health, resilience))
    # The middleware answers GET and HEAD on the probes; at the router's end the same
    # routes give other methods a 405 with Allow, and cost app requests nothing.
    app.router.routes.extend(probes)
    admin = _admin_routes(
        settings, migrator, limiter, identity, audit, flags=flags, deprecations=deprecations
    )
    app.router.routes.extend(admin)
    app.router.routes.extend(_install_metrics(settings))
    if identity is not None and settings.identity.routes:
        _mount_identity_routes(app, settings, identity)
    install_exception_handlers(app)
    _add_request_layers(
        app,
        settings,
        idempotency=idempotency,
        guard_routes=guard_routes,
        limiter=limiter,
        identity=identity,
        operational=operational,
        identity_skip=(*operational, *_identity_free_admin(admin, audit)),
        deprecations=deprecations,
    )
    app.add_middleware(
        RequestMiddleware,
        lifecycle=lifecycle,
        access_log=access_log if settings.logging.access_log else None,
        operational_prefixes=operational,
        probes={route.path: route for route in probes},
        tracing=tracing,
        metrics=HttpMetrics(settings.metrics) if settings.metrics.enabled else None,
        deadlines=deadlines,
        client_address=_client_address(settings),
    )
    app.router.lifespan_context = _wrap_lifespan(app.router.lifespan_context, lifecycle)
    _document_errors(
        app,
        timeouts=deadlines is not None and deadlines.default > 0,
        limiter=limiter,
        identity=identity,
        settings=settings,
    )
    return runtime


def _add_request_layers(
    app: Starlette,
    settings: Settings,
    *,
    idempotency: IdempotencyStore | None,
    guard_routes: GuardRoutes | None,
    limiter: RateLimiter | None,
    identity: Identity | None,
    operational: tuple[str, ...],
    identity_skip: tuple[str, ...],
    deprecations: DeprecationUsage | None,
) -> None:
    """Add the layers between the request middleware and the router, innermost first.

    Each ``add_middleware`` call wraps the ones before it, so the order below is the
    reverse of the request's path: security headers, versioning, identity, rate
    limits, request guards, idempotency, then the app.
    """
    if idempotency is not None:
        # Innermost: the principal, tenant and client are known, and a request the guards
        # refuse never takes a key.
        app.add_middleware(
            IdempotencyMiddleware, settings=settings.http.idempotency, store=idempotency
        )
    if guard_routes is not None:
        # Inside the limiter: an oversized or malformed request still counts against its
        # client's limit, so probing the guards costs as much as any other request.
        app.add_middleware(
            GuardMiddleware,
            settings=settings.guard,
            operational_prefixes=operational,
            routes=guard_routes,
        )
    if limiter is not None:
        # Added first, so it runs inside the request middleware: the context, with
        # the client address and identity, exists; the router comes after it.
        app.add_middleware(RateLimitMiddleware, limiter=limiter)
    if identity is not None:
        # Between the two: the client address is resolved, and limits key on the principal.
        app.add_middleware(
            IdentityMiddleware,
            identity=identity,
            skip_prefixes=identity_skip,
        )
    if deprecations is not None:
        # Outside identity: a sunset route answers 410 before credentials are checked.
        app.add_middleware(
            VersioningMiddleware, settings=settings.http.versioning, usage=deprecations
        )
    if settings.http.enabled:
        # Outside everything that answers: refusals get the security and CORS headers too.
        app.add_middleware(
            SecurityMiddleware,
            settings=settings.http,
            protected_cookies=[settings.identity.refresh_cookie] if identity is not None else [],
            credential_headers=("Authorization", settings.identity.api_keys.header),
        )


def create_app(*, settings: Settings | None = None, **overrides: Any) -> Starlette:
    """Return a new FastAPI app with bastion installed.

    Example:
        >>> app = bastion.create_app(database={"url": "postgresql+asyncpg://db/app"})

    Args:
        settings: a settings tree; built from the environment when omitted.
        overrides: settings by section, over the environment and ``bastion.toml``.
    """
    from fastapi import FastAPI  # noqa: PLC0415 -- only this entry point needs FastAPI

    app = FastAPI()
    install(app, settings=settings, **overrides)
    return app


def _client_address(settings: Settings) -> ClientAddress | None:
    """The trusted-proxy resolution of the client address; ``None`` (free) without proxies."""
    proxies = settings.http.trusted_proxies
    if not proxies:
        return None
    return ClientAddress(proxies, settings.http.client_ip_header)


def _install_ratelimit(
    app: Starlette,
    settings: Settings,
    lifecycle: Lifecycle,
    redis: Any,
    operational: tuple[str, ...],
) -> RateLimiter | None:
    section = settings.ratelimit
    if not section.enabled:
        return None
    client, own_client = _state_client(settings, "ratelimit", redis)
    store: MemoryStore | RedisStore
    runner: Any = None
    if client is None:
        store = MemoryStore()
    else:
        store = RedisStore(client, key_prefix=settings.redis.key_prefix, timeout=section.timeout)
        # One runner for limits, quotas and login: their calls share pipelined round trips.
        runner = store.runner
    prefix, timeout, fail_open = settings.redis.key_prefix, section.timeout, section.fail_open
    quotas = Quotas.for_store(runner, key_prefix=prefix, timeout=timeout, fail_open=fail_open)
    login = LoginThrottle.for_store(
        runner,
        section.login,
        key_prefix=prefix,
        timeout=timeout,
        fail_open=fail_open,
        max_log_limit=section.max_log_limit,
    )
    # Lockouts are security events: logged now, persisted once the audit trail exists.
    login.on_lockout(emit_lockout)
    limiter = RateLimiter(
        section, store=store, operational_prefixes=operational, quotas=quotas, login=login
    )

    async def start() -> None:
        limiter.read_routes(app.router.routes)
        if isinstance(store, RedisStore):
            # Connected now, so the first request does not pay the handshake inside
            # its decision timeout; a Redis that is down is the failure policy's.
            with suppress(StoreUnavailable):
                await store.start()
        logger.info(
            "rate limits configured",
            store="redis" if client is not None else "memory",
            default=section.default,
            policies=sorted(limiter.policies),
            active=limiter.active,
        )

    async def stop() -> None:
        await quotas.close()
        await login.close()
        await limiter.close()
        if own_client is not None:
            await own_client.aclose()

    lifecycle.on_startup("rate limits", start, priority=PRIORITY_RATELIMIT)
    lifecycle.on_shutdown("close rate limits", stop, priority=PRIORITY_RATELIMIT)
    return limiter


def _identity_wanted(settings: Settings) -> bool:
    return settings.identity.enabled and settings.database.enabled


def _install_identity(
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    health: HealthRegistry,
    database: Database | None,
    redis: Any,
    limiter: RateLimiter | None,
    resilience: Resilience | None,
) -> Identity | None:
    if not settings.identity.enabled:
        return None
    if database is None:
        # Not an error: an app without a database still serves, without accounts. Said
        # only to an app that configured identity; the others never asked for it.
        if "identity" in settings.model_fields_set:
            logger.info("identity off: it needs the database (database.enabled is off)")
        return None
    client, own_client = _state_client(settings, "identity", redis)
    identity = build_identity(
        settings, database=database, redis=client, limiter=limiter, resilience=resilience
    )
    for check in identity_checks(identity, shared=client is not None):
        health.register(check.name, check.check, critical=check.critical)

    async def start() -> None:
        await start_identity(identity)

    async def stop() -> None:
        await stop_identity(identity)
        if own_client is not None:
            await own_client.aclose()

    lifecycle.on_startup("identity", start, priority=PRIORITY_IDENTITY)
    lifecycle.on_shutdown("close identity", stop, priority=PRIORITY_IDENTITY)
    return identity


def _audit_wanted(settings: Settings) -> bool:
    return settings.audit.enabled and settings.database.enabled


def _install_audit(
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    health: HealthRegistry,
    database: Database | None,
    migrator: Migrator | None,
    migrated: list[AppliedRevision],
) -> AuditRuntime | None:
    if not settings.audit.enabled:
        return None
    if database is None:
        # As for identity: said only to an app that configured the audit trail.
        if "audit" in settings.model_fields_set:
            logger.info("audit trail off: it needs the database (database.enabled is off)")
        return None
    audit = build_audit(settings, database=database)
    health.register("audit", audit.health_check)
    # Not critical: the entries are recorded and the tree still detects tampering;
    # what is missing is the database refusing the accident. Looked at every few
    # minutes (AuditSchema), not per probe.
    health.register("audit_guards", audit.schema.guards_check, critical=False)
    if settings.audit.checkpoint_interval > 0:
        # Not critical: entries are still recorded; only their signing waits.
        health.register("audit_checkpoints", audit.schedule_check, critical=False)

    async def start() -> None:
        await start_audit(audit)
        if migrator is not None and migrated:
            await record_migrations(audit.log, migrated, tool=migrator.tool)
            # Committed before the process is ready: the record of a schema change
            # must not wait on traffic, nor race the first requests' writes (SQLite).
            await audit.log.flush()
        migrated.clear()

    async def stop() -> None:
        await stop_audit(audit)

    lifecycle.on_startup("audit trail", start, priority=PRIORITY_AUDIT)
    lifecycle.on_shutdown("stop audit trail", stop, priority=PRIORITY_AUDIT)
    return audit


def _install_flags(
    app: Starlette,
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    health: HealthRegistry,
    database: Database | None,
    redis: Any,
    audit: AuditRuntime | None,
) -> FlagsRuntime | None:
    if not settings.flags.enabled:
        return None
    # Notifications travel over flags.store_url, else the shared Redis; memory://
    # (or no Redis) leaves the polling.
    client, own_client = _state_client(settings, "flags", redis)
    flags = build_flags(
        settings,
        database=database,
        redis=client,
        audit=audit.log if audit is not None else None,
    )
    # Beside the app's routes, not the admin ones: identity binds the caller there.
    app.router.routes.extend(client_flag_routes(flags, settings))
    if flags.store is not None:
        # Without the database the seed file's set is compiled at start-up and cannot
        # fail to load: nothing to check. With it, an instance that never loaded the
        # set (tables missing, database down since start) would serve every default.
        health.register("flags", flags.health_check)
        # Not critical: a stale set still serves (the last one loaded); the alert and
        # this check say the database has not answered the polls for a while.
        health.register("flags_freshness", flags.freshness_check, critical=False)

    async def start() -> None:
        await start_flags(flags)

    async def stop() -> None:
        await stop_flags(flags)
        if own_client is not None:
            await own_client.aclose()

    lifecycle.on_startup("feature flags", start, priority=PRIORITY_FLAGS)
    lifecycle.on_shutdown("stop feature flags", stop, priority=PRIORITY_FLAGS)
    return flags


def _install_idempotency(
    app: Starlette,
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    health: HealthRegistry,
    redis: Any,
    database: Database | None,
) -> IdempotencyStore | None:
    if not (settings.http.enabled and settings.http.idempotency.enabled):
        return None
    store = build_idempotency_store(settings, redis=redis, database=database)
    if store.kind != "memory":
        # Not critical for readiness: only keyed requests to idempotent routes need it,
        # and they get a 503 of their own while it is down.
        health.register("idempotency", store.ping, critical=False)

    async def start() -> None:
        await start_idempotency(store, settings, app.router.routes)

    async def stop() -> None:
        await stop_idempotency(store)

    lifecycle.on_startup("idempotency keys", start, priority=PRIORITY_HTTP)
    lifecycle.on_shutdown("stop idempotency keys", stop, priority=PRIORITY_HTTP)
    return store


def _install_deprecation_usage(
    settings: Settings, lifecycle: Lifecycle, redis: Any
) -> DeprecationUsage | None:
    if not (settings.http.enabled and settings.http.versioning.enabled):
        return None
    client, own_client = _state_client(settings, "http", redis)
    usage = DeprecationUsage(redis=client, key_prefix=settings.redis.key_prefix)

    async def start() -> None:
        await usage.start()
        logger.info("deprecation usage configured", store="redis" if usage.shared else "memory")

    async def stop() -> None:
        # Flushes what is left, on a client still open.
        await usage.stop()
        if own_client is not None:
            await own_client.aclose()

    lifecycle.on_startup("deprecation usage", start, priority=PRIORITY_HTTP)
    lifecycle.on_shutdown("flush deprecation usage", stop, priority=PRIORITY_HTTP)
    return usage


def _install_guard(
    app: Starlette, settings: Settings, lifecycle: Lifecycle, audit: AuditRuntime | None
) -> tuple[GuardRoutes | None, Guard]:
    """The request guards' route table (``None`` when off) and the screening runtime.

    The runtime exists even with ``guard.enabled`` off, screening nothing then, so a
    route that screens its input keeps working when an operator switches the guard off.
    """
    if not settings.guard.enabled:
        section = settings.guard.prompt_injection.model_copy(update={"enabled": False})
        guard = settings.guard.model_copy(update={"prompt_injection": section})
        return None, build_guard(settings.model_copy(update={"guard": guard}), audit=audit)
    # A guard.route_classes entry naming no class raises here, before start-up.
    routes = GuardRoutes(settings.guard)

    async def read_routes() -> None:
        # A @limits(body=...) naming no class stops start-up.
        routes.read(app.router.routes)

    lifecycle.on_startup("request guards", read_routes, priority=PRIORITY_RATELIMIT)
    # The weights load here, once, not on the first screened request.
    return routes, build_guard(settings, audit=audit)


def _identity_free_admin(admin: list[BaseRoute], audit: AuditRuntime | None) -> tuple[str, ...]:
    """The admin paths the identity middleware leaves alone: all but the audit routes.

    The audit routes also admit a tenant admin by their access token (``audit:read``),
    so identity binds the principal there; the others take the operators' token only.
    """
    if audit is None:
        return (f"{ADMIN_PREFIX}/",)
    # A template's static head ("/admin/tenants/" of "/admin/tenants/{id}/settings").
    heads = {route.path.split("{", 1)[0] for route in admin if isinstance(route, Route)}
    return tuple(sorted(head for head in heads if not head.startswith(AUDIT_PREFIX)))


def _mount_identity_routes(app: Starlette, settings: Settings, identity: Identity) -> None:
    """Mount the JWKS and the identity routers under ``identity.route_prefix``."""
    # Imported here: the routes load the accounts, tenants and quotas modules, which an
    # app without identity routes never needs.
    from bastion.identity._api_key_routes import api_keys_router  # noqa: PLC0415 -- lazy, see above
    from bastion.identity._auth_routes import auth_router  # noqa: PLC0415 -- lazy, see above
    from bastion.identity._tenant_routes import tenants_router  # noqa: PLC0415 -- lazy, see above

    app.router.routes.append(jwks_route(identity.keys))
    prefix = settings.identity.route_prefix.rstrip("/")
    router = APIRouter(prefix=prefix)
    for child in (auth_router(), tenants_router(), api_keys_router()):
        router.include_router(child)
    include: Any = getattr(app, "include_router", None)
    if include is not None:
        include(router)
    else:
        # A plain Starlette app: FastAPI's routes run in its router all the same.
        app.router.routes.extend(router.routes)


def _install_database(
    settings: Settings,
    lifecycle: Lifecycle,
    health: HealthRegistry,
    tracing: Tracing | None,
    resilience: Resilience | None,
) -> Database | None:
    if not settings.database.enabled:
        return None
    database = Database(
        settings.database,
        trace=tracing is not None and settings.tracing.trace_database,
        tracer_provider=tracing.provider if tracing is not None else None,
        pipeline=resilience.register("database", "database") if resilience is not None else None,
    )
    health.register("database", database.ping)

    async def start_database() -> None:
        use_database(database)
        logger.info("database configured", url=database.display_url, kind=database.kind.value)

    async def close_database() -> None:
        # Another app in the process may have become the default since.
        if default_database() is database:
            use_database(None)
        await database.aclose()

    lifecycle.on_startup("database", start_database, priority=PRIORITY_POOLS)
    lifecycle.on_shutdown("close database pool", close_database, priority=PRIORITY_POOLS)
    return database


def _install_redis(
    settings: Settings, lifecycle: Lifecycle, health: HealthRegistry, tracing: Tracing | None
) -> Any:
    if not settings.redis.enabled or settings.redis.url is None:
        return None
    redis_asyncio: Any = import_optional("redis.asyncio")
    url = settings.redis.url.get_secret_value()
    client = redis_asyncio.from_url(
        url,
        socket_timeout=settings.redis.socket_timeout,
        socket_connect_timeout=settings.redis.socket_timeout,
    )
    if tracing is not None and settings.tracing.trace_redis:
        instrument_redis(client, tracer_provider=tracing.provider)

    async def ping() -> None:
        await client.ping()

    async def log_redis() -> None:
        logger.info("redis configured", url=redact_url(url))

    async def close() -> None:
        await client.aclose()

    health.register("redis", ping)
    lifecycle.on_startup("redis", log_redis, priority=PRIORITY_POOLS)
    lifecycle.on_shutdown("close redis pool", close, priority=PRIORITY_POOLS)
    return client


def _install_resilience(
    app: Starlette,
    settings: Settings,
    *,
    lifecycle: Lifecycle,
    health: HealthRegistry,
    redis: Any,
    tracing: Tracing | None,
) -> tuple[Resilience | None, RequestDeadlines | None]:
    section = settings.resilience
    if not section.enabled:
        return None, None
    store, own_client = _state_client(settings, "resilience", redis)
    resilience = Resilience(section, redis=store, key_prefix=settings.redis.key_prefix)
    if redis is not None:
        resilience.register("redis", "redis")
        resilience.register("redis_request", "redis_request")
    deadlines = RequestDeadlines(section.request_deadline, section.route_deadlines)
    if any(dependency.critical for dependency in section.dependencies.values()):
        health.register("circuits", resilience.readiness_check)
    trace_clients = tracing is not None and settings.tracing.trace_http_client

    async def start() -> None:
        use_resilience(resilience)
        use_client_tracing(
            resilience,
            enabled=trace_clients,
            tracer_provider=tracing.provider if tracing is not None else None,
        )
        await resilience.start()
        await deadlines.start(app.router.routes)
        logger.info(
            "resilience configured",
            circuit_state="redis" if resilience.shared else "memory",
            request_deadline=deadlines.default,
        )

    async def stop() -> None:
        await deadlines.stop()
        await resilience.stop()
        forget_client_tracing(resilience)
        # Another app in the process may have become the current one since.
        try:
            current = current_resilience()
        except RuntimeError:
            current = None
        if current is resilience:
            use_resilience(None)
        if own_client is not None:
            await own_client.aclose()

    lifecycle.on_startup("resilience", start, priority=PRIORITY_RESILIENCE)
    lifecycle.on_shutdown("stop resilience", stop, priority=PRIORITY_RESILIENCE)
    return resilience, deadlines


def _state_client(settings: Settings, section: str, shared: Any) -> tuple[Any, Any]:
    """Return the Redis client a section's shared state lives in, and the one to close.

    The first is ``None`` for memory; the second is set only when the section has
    a client of its own (an explicit ``<section>.store_url``); otherwise the shared
    ``redis.url`` client, or memory without one.
    """
    url = getattr(settings, section).store_url
    if url is None:
        return shared, None
    kind = backend_kind(url)
    if kind is BackendKind.MEMORY:
        return None, None
    if kind is not BackendKind.REDIS:
        raise ConfigurationError(
            f"{section}.store_url must be memory:// or a Redis URL, not {kind.value}"
        )
    redis_asyncio: Any = import_optional("redis.asyncio")
    client = redis_asyncio.from_url(
        url,
        socket_timeout=settings.redis.socket_timeout,
        socket_connect_timeout=settings.redis.socket_timeout,
    )
    return client, client


def _circuits_route(settings: Settings, health: HealthRegistry, resilience: Resilience) -> Route:
    async def circuits(request: Request) -> Response:
        if not health.allowed(request):
            return _forbidden()
        return await resilience.circuits_endpoint(request)

    return operational_route(f"{settings.health.path_prefix.rstrip('/')}/circuits", circuits)


def _install_migrations(
    settings: Settings,
    lifecycle: Lifecycle,
    database: Database | None,
    migrated: list[AppliedRevision],
) -> Migrator | None:
    if database is None or not settings.migrations.enabled:
        return None
    trees = [MigrationTree.bastion()]
    if settings.migrations.app_tree:
        trees.append(
            MigrationTree.from_location(
                "app", settings.migrations.app_tree, settings.migrations.app_version_table
            )
        )
    mode = settings.migration_mode
    migrator = Migrator(
        database,
        trees,
        allow_destructive=settings.migrations.allow_destructive,
        lock_timeout=settings.migrations.lock_timeout,
    )
    if mode == "off":
        return migrator
    if mode == "auto":
        # What the migration history says applied the revisions; `bastion migrate`
        # sets its own name on the same migrator.
        migrator.tool = "start-up (auto)"

    async def migrate() -> None:
        if mode == "auto":
            # Verifies the applied revisions first, under the migration lock, and
            # refuses, naming them, when one was modified.
            migrated.extend(await migrator.upgrade())
            return
        problems: list[str] = []
        modified = (await migrator.verify()).modified
        if modified:
            problems.append(
                "applied migration revision(s) modified since they were applied: "
                + ", ".join(check.name for check in modified)
                + "; see `bastion migrate verify`"
            )
        pending = await migrator.pending()
        named = [f"{tree}:{rev}" for tree, revisions in pending.items() for rev in revisions]
        if named:
            problems.append(
                "pending migrations (migrations.mode=check): "
                + ", ".join(named)
                + "; run `bastion migrate upgrade`"
            )
        if problems:
            raise ConfigurationError("; ".join(problems))

    lifecycle.on_startup(f"migrations ({mode})", migrate, priority=PRIORITY_MIGRATIONS)
    return migrator


def _install_metrics(settings: Settings) -> list[BaseRoute]:
    if not settings.metrics.enabled:
        return []
    return list(MetricsEndpoint(settings.metrics).routes())


def _admin_routes(
    settings: Settings,
    migrator: Migrator | None,
    limiter: RateLimiter | None,
    identity: Identity | None,
    audit: AuditRuntime | None,
    *,
    flags: FlagsRuntime | None = None,
    deprecations: DeprecationUsage | None = None,
) -> list[BaseRoute]:
    access = _admin_access(settings)
    routes: list[BaseRoute] = list(AdminRoutes(access=access, migrator=migrator).routes())
    if limiter is not None and limiter.login is not None:
        routes.append(_unlock_route(access, limiter, audit))
    if identity is not None:
        routes.extend(tenant_admin_routes(access))
    if audit is not None:
        routes.extend(_audit_routes(settings, access, audit))
    if flags is not None:
        routes.extend(admin_flag_routes(flags, settings, access))
    if deprecations is not None:
        routes.extend(deprecation_routes(access, deprecations))
    return routes


def _admin_access(settings: Settings) -> AccessPolicy:
    token = settings.http.admin_token
    # The operators' networks and token, with or without identity: an operator is
    # not a tenant's member, and the admin console of a later issue brings its role.
    return AccessPolicy(
        settings.http.admin_allowed_networks, token.get_secret_value() if token else None
    )


def _audit_routes(settings: Settings, access: AccessPolicy, audit: AuditRuntime) -> list[BaseRoute]:
    return AuditRoutes(
        settings=settings.audit,
        access=access,
        database=audit.database,
        subject_keys=audit.subject_keys,
        checkpointer=audit.checkpointer,
        log=audit.log,
    ).routes()


def _unlock_route(access: AccessPolicy, limiter: RateLimiter, audit: AuditRuntime | None) -> Route:
    """``POST /admin/ratelimit/unlock``: an admin lifts an account lockout."""
    route: Route

    async def unlock(request: Request) -> Response:
        # The router records scope["route"] (the access log's and metrics' template)
        # only for FastAPI's own routes.
        request.scope.setdefault("route", route)
        access.require(request, subject="/admin", realm="bastion-admin")
        identifier = _unlock_identifier(await request.body()) if audit is not None else None
        if audit is None or identifier is None:
            # Nothing to record, or a body the endpoint refuses (422) without unlocking.
            return await limiter.unlock_endpoint(request)
        # Recorded first: an unlock the trail cannot take (503) does not happen.
        await record_unlock(audit, identifier)
        try:
            return await limiter.unlock_endpoint(request)
        except Exception as exc:
            await _record_unlock_failure(audit, identifier, exc)
            raise

    route = Route(
        f"{ADMIN_PREFIX}/ratelimit/unlock", unlock, methods=["POST"], include_in_schema=False
    )
    return route


def _unlock_identifier(body: bytes) -> str | None:
    """The body's identifier when the unlock endpoint would accept it, else ``None``."""
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        return None
    identifier = parsed.get("identifier") if isinstance(parsed, dict) else None
    if not isinstance(identifier, str) or not 0 < len(identifier.strip()) <= IDENTIFIER_MAX:
        return None
    return identifier


async def _record_unlock_failure(audit: AuditRuntime, identifier: str, error: Exception) -> None:
    try:
        await record_unlock(audit, identifier, failure=error)
    except Exception as exc:  # noqa: BLE001 -- the unlock's own error is the answer
        logger.error("unlock failure not recorded", error=type(exc).__name__)  # noqa: TRY400 -- class only


LifespanFactory = Callable[[Any], AbstractAsyncContextManager[Any]]


def _wrap_lifespan(inner: LifespanFactory, lifecycle: Lifecycle) -> LifespanFactory:
    @asynccontextmanager
    async def lifespan(app: Any) -> AsyncIterator[Any]:
        # Start-up inside the try: when a hook fails (a pending migration, say), the
        # pools that earlier hooks opened are still closed before the error surfaces.
        try:
            await lifecycle.startup()
            async with inner(app) as state:
                _freeze_startup_objects()
                yield state
        finally:
            await lifecycle.shutdown()

    return lifespan


def _freeze_startup_objects() -> None:
    """Move everything start-up made out of the garbage collector's sight.

    The app, its routes, models and pools live as long as the process; left in
    the collected generations, every full collection walks them (~114k objects
    for the reference service, 60-90 ms each) and under load the collector's
    share was 15-22 µs per request on FastAPI. Frozen, 5-6 µs
    (bench/README.md). What start-up made and later drops is simply never
    collected: a one-off cost, not a leak that grows.
    """
    gc.collect()
    gc.freeze()


# Any operation can answer 500, and 503 (shutting down, or the database pool exhausted),
# and 504 when requests have a deadline.
_ALWAYS = problem_responses(
    ErrorCode.INTERNAL, ErrorCode.SERVICE_UNAVAILABLE, ErrorCode.REQUEST_TIMEOUT
)
_VALIDATION = problem_responses(ErrorCode.INVALID_INPUT, ErrorCode.INPUT_TOO_LONG)
_LIMITED = problem_responses(ErrorCode.RATE_LIMITED)
_GUARDED = problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN)
_UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_REQUEST_GUARDS = problem_responses(
    ErrorCode.URI_TOO_LONG,
    ErrorCode.HEADERS_TOO_LARGE,
    ErrorCode.PAYLOAD_TOO_LARGE,
    ErrorCode.UNSUPPORTED_MEDIA_TYPE,
)


def _document_errors(
    app: Starlette,
    *,
    timeouts: bool,
    limiter: RateLimiter | None = None,
    identity: Identity | None = None,
    settings: Settings | None = None,
) -> None:
    """Make FastAPI's OpenAPI document describe errors (and credentials) as bastion does.

    With ``timeouts`` (a default request deadline), every operation also lists
    504 ``REQUEST_TIMEOUT``; with a ``limiter``, every operation a policy limits
    lists 429 ``RATE_LIMITED``; an operation guarded by a permission check
    (``bastion.identity.require``/``requires``) lists 401 ``UNAUTHENTICATED`` and
    403 ``FORBIDDEN``, one that only needs a caller (``Authenticated``,
    ``TenantId``) lists 401. With ``identity``, the document declares the two
    security schemes (a bearer JWT, the API-key header) and every operation that
    needs a caller names them in ``security``. ``502 DEPENDENCY_FAILURE`` is
    left to the endpoints that call a dependency through a pipeline: they
    declare it with ``problem_responses``.
    """
    # Typed as Any: ``openapi`` and ``openapi_schema`` exist on FastAPI apps only,
    # which the check below establishes at run time.
    fastapi_app: Any = app
    original = getattr(fastapi_app, "openapi", None)
    if original is None or not hasattr(fastapi_app, "openapi_schema"):
        return

    def openapi() -> dict[str, Any]:
        cached: dict[str, Any] | None = fastapi_app.openapi_schema
        if cached:
            return cached
        schema: dict[str, Any] = original()
        components = schema.setdefault("components", {}).setdefault("schemas", {})
        components["Problem"] = PROBLEM_SCHEMA
        components.pop("HTTPValidationError", None)
        components.pop("ValidationError", None)
        # Read now, not at install: the app's routes are complete by the first request.
        limited = limiter.operations(app.router.routes) if limiter is not None else {}
        default = limiter.default if limiter is not None else None
        guarded = protected_operations(app.router.routes)
        keyed = (
            idempotent_operations(app.router.routes)
            if settings is not None and settings.http.enabled and settings.http.idempotency.enabled
            else {}
        )
        callers = authenticated_operations(app.router.routes, dependencies=[current_tenant_id])
        security: list[dict[str, list[str]]] = []
        if identity is not None:
            schemes = schema["components"].setdefault("securitySchemes", {})
            for name, scheme in _security_schemes(identity).items():
                # An app's own scheme of the same name is the app's to describe.
                schemes.setdefault(name, scheme)
                security.append({name: []})
        facts = _OperationFacts(
            limited=limited,
            default_limit=default,
            guarded=guarded,
            callers=callers,
            keyed=keyed,
            security=security,
            timeouts=timeouts,
            guards=settings is not None and settings.guard.enabled,
            csrf=settings is not None and settings.http.enabled and settings.http.csrf.enabled,
        )
        for template, path in schema.get("paths", {}).items():
            for method, operation in path.items():
                _document_operation(operation, (method.upper(), template), facts)
        if settings is not None and settings.http.enabled and settings.http.versioning.enabled:
            document_deprecations(schema, app.router.routes, settings.http.versioning)
        document_preconditions(schema, app.router.routes)
        fastapi_app.openapi_schema = schema
        return schema

    fastapi_app.openapi = openapi  # FastAPI's documented way to customise the document


@dataclass(frozen=True, slots=True)
class _OperationFacts:
    """What the stack knows about the app's operations, for their OpenAPI responses."""

    limited: dict[tuple[str, str], Any]
    default_limit: Any
    guarded: set[tuple[str, str]] | frozenset[tuple[str, str]]
    callers: set[tuple[str, str]] | frozenset[tuple[str, str]]
    keyed: dict[tuple[str, str], IdempotentRoute]
    security: list[dict[str, list[str]]]
    timeouts: bool
    guards: bool
    csrf: bool


def _document_operation(
    operation: dict[str, Any], operation_id: tuple[str, str], facts: _OperationFacts
) -> None:
    """Add the responses the stack's layers can answer an operation with.

    Merged into what the route declared for the same status, never in place of it: a
    route listing 429 ``QUOTA_EXCEEDED`` still lists the limiter's ``RATE_LIMITED``.
    """
    responses = operation.setdefault("responses", {})

    def add(status: int, described: dict[int | str, dict[str, Any]]) -> None:
        responses[str(status)] = _merge(responses.get(str(status), {}), described[status])

    if facts.limited.get(operation_id, facts.default_limit) is not None:
        add(429, _LIMITED)
    if operation_id in facts.guarded:
        add(403, _GUARDED)
    mark = facts.keyed.get(operation_id)
    if mark is not None:
        document_idempotency(operation, mark)
    if operation_id in facts.callers:
        add(401, _GUARDED)
        if facts.security:
            operation.setdefault("security", facts.security)
    if facts.csrf and operation_id[0] in _UNSAFE_METHODS:
        # A request carrying an authenticating cookie must prove its origin, on any path:
        # a client may send the cookie anywhere, and the check answers 403 before routing.
        add(403, _GUARDED)
    if facts.guards:
        # The request guards answer before the app: a request line or headers over their
        # bounds, and a body too large or of another type, on any operation (a body sent
        # to a route that declares none is checked too: it may read the raw request).
        for status in (413, 414, 415, 431):
            add(status, _REQUEST_GUARDS)
        add(422, _VALIDATION)
    elif "422" in responses:
        add(422, _VALIDATION)
    add(500, _ALWAYS)
    add(503, _ALWAYS)
    if facts.timeouts:
        add(504, _ALWAYS)


def _security_schemes(identity: Identity) -> dict[str, dict[str, str]]:
    """OpenAPI security schemes of the credentials the identity middleware accepts."""
    auth = identity.settings.identity.route_prefix.rstrip("/") + "/auth"
    return {
        "accessToken": {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": f"An access token from POST {auth}/login or {auth}/refresh.",
        },
        "apiKey": {
            "type": "apiKey",
            "in": "header",
            "name": identity.settings.identity.api_keys.header,
            "description": "A tenant's API key (also accepted as a bearer token).",
        },
    }


def _merge(existing: dict[str, Any], added: dict[str, Any]) -> dict[str, Any]:
    """One response object listing the codes of both; the route's own words and media kept."""
    codes = sorted({*existing.get("x-error-codes", []), *added["x-error-codes"]})
    listed = "Error codes: " + ", ".join(codes)
    described = existing.get("description", "")
    if described and not described.startswith("Error codes:"):
        listed = f"{described} {listed}"
    return {
        **existing,
        "description": listed,
        # Every error body is a problem: FastAPI's application/json validation schema,
        # removed from the components, is not what a client gets.
        "content": {
            **{
                media: value
                for media, value in existing.get("content", {}).items()
                if media != "application/json"
            },
            **added["content"],
        },
        "x-error-codes": codes,
    }
