"""The root Settings tree, composed of one section per component.

Sources, in rising precedence: defaults, an optional ``bastion.toml`` (or the
file named by ``BASTION_CONFIG_FILE``), ``BASTION_<SECTION>__<KEY>`` environment
variables, the secret sources of ``bastion._secrets`` (a ``secrets.directory`` of
files, ``BASTION_<VARIABLE>_FILE``, OpenBao), and keyword arguments. Precedence is
decided in one place, :meth:`Settings.settings_customise_sources`.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import tomllib
import typing
from datetime import datetime, timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
    TomlConfigSettingsSource,
)

from bastion._secrets import secret_sources
from bastion.backends import BackendKind, backend_kind, redact_url
from bastion.errors import ConfigurationError

__all__ = [
    "AuthorizationSettings",
    "DatabaseSettings",
    "DependencyKind",
    "DependencyPolicy",
    "HealthSettings",
    "HttpSettings",
    "IdentitySettings",
    "IsolationLevel",
    "LimitExpression",
    "LoggingSettings",
    "LoginThrottleSettings",
    "MetricsSettings",
    "MigrationsSettings",
    "PasswordSettings",
    "RateLimitAlgorithm",
    "RateLimitKey",
    "RateLimitPolicy",
    "RateLimitSettings",
    "RedisSettings",
    "ResilienceSettings",
    "RoleSettings",
    "SecretsSettings",
    "SectionSettings",
    "ServerSettings",
    "Settings",
    "Strategy",
    "TokenSettings",
    "TracingSettings",
    "load_settings",
]

ENV_PREFIX = "BASTION_"
DEFAULT_DATABASE_URL = "sqlite+aiosqlite:///./var/bastion.db"
DEFAULT_APP = "bastion_docs.app:create_app"


def _to_seconds(value: Any) -> Any:
    if isinstance(value, timedelta):
        return value.total_seconds()
    return value


Seconds = Annotated[float, BeforeValidator(_to_seconds), Field(ge=0)]
"""A duration in seconds; a ``timedelta`` is accepted too."""


def _known_url_scheme(value: str | None) -> str | None:
    if value is not None and "://" not in value:
        raise ValueError("must be a URL such as memory:// or redis://host:6379/0")
    return value


# Not in repr: a store URL may carry a password (redis://:pw@host); redacted() shows it
# with the password masked.
StoreUrl = Annotated[str | None, AfterValidator(_known_url_scheme), Field(repr=False)]


def _networks(value: list[str]) -> list[str]:
    for network in value:
        try:
            ipaddress.ip_network(network, strict=False)
        except ValueError:
            raise ValueError(f"{network!r} is not an IP network such as 10.0.0.0/8") from None
    return value


def _sql_url(value: SecretStr) -> SecretStr:
    # The message never quotes the URL: it may carry a password.
    try:
        kind = backend_kind(value.get_secret_value())
    except ConfigurationError:
        kind = None
    if kind not in (BackendKind.SQLITE, BackendKind.POSTGRES):
        raise ValueError(
            "must be a SQLite or PostgreSQL URL, such as sqlite+aiosqlite:///./var/bastion.db "
            "or postgresql+asyncpg://user@host:5432/db"
        )
    return value


IsolationLevel = Literal["READ COMMITTED", "REPEATABLE READ", "SERIALIZABLE", "READ UNCOMMITTED"]
"""A transaction isolation level, as SQLAlchemy names them."""


def _upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


def _distinct(value: list[str] | None) -> list[str] | None:
    if value is not None and len(set(value)) != len(value):
        raise ValueError("names a strategy twice")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)


class SectionSettings(_Section):
    """Base of every component's section: it can be switched off."""

    enabled: bool = True
    """Whether the component is active. A switched-off component costs nothing per request."""


class SharedStateSection(SectionSettings):
    """A section whose state must be global across instances (limits, locks, flags...)."""

    store_url: StoreUrl = None
    """Where the state lives; ``None`` means ``redis.url`` when set, else ``memory://``."""


def _no_credentialed_wildcard(settings: CorsSettings) -> CorsSettings:
    if settings.allow_credentials and "*" in settings.allow_origins:
        raise ValueError(
            "allow_origins '*' with allow_credentials would let every site act as the "
            "user: list the origins"
        )
    return settings


class SecurityHeaderSettings(_Section):
    """Security headers added to every response that does not set its own."""

    enabled: bool = True
    """Whether the headers below are added."""
    hsts_max_age: Seconds = 31_536_000
    """``Strict-Transport-Security: max-age``, sent only on requests that arrived over
    TLS (directly or through a trusted proxy); 0 sends none."""
    hsts_include_subdomains: bool = True
    """Add ``includeSubDomains`` to HSTS."""
    hsts_preload: bool = False
    """Add ``preload`` to HSTS (only once the domain is on the preload list)."""
    content_type_options: bool = True
    """``X-Content-Type-Options: nosniff``."""
    frame_options: Literal["DENY", "SAMEORIGIN"] | None = "DENY"
    """``X-Frame-Options``; ``None`` sends none."""
    referrer_policy: str | None = "no-referrer"
    """``Referrer-Policy``; ``None`` sends none."""
    content_security_policy: str | None = (
        "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
    )
    """``Content-Security-Policy`` of HTML responses; ``None`` sends none."""
    docs_content_security_policy: str | None = (
        "default-src 'none'; script-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
        "style-src 'self' 'unsafe-inline' https://cdn.jsdelivr.net; "
        "img-src 'self' data: https://fastapi.tiangolo.com; connect-src 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )
    """The policy of the interactive API documentation (``/api/docs``), whose page
    loads Swagger UI's script and styles from a CDN."""
    docs_paths: list[str] = Field(default_factory=lambda: ["/api/docs", "/docs", "/redoc"])
    """Paths of HTML documentation pages, which get ``docs_content_security_policy``."""


class CorsSettings(_Section):
    """Cross-origin requests from browsers; no origin is allowed unless listed."""

    allow_origins: list[str] = Field(default_factory=list)
    """Origins (``https://app.example.com``) whose pages may call the API; empty: none.
    ``*`` allows any origin, and is refused together with ``allow_credentials``."""
    allow_credentials: bool = False
    """Whether browsers may send cookies and ``Authorization`` cross-origin."""
    allow_methods: list[str] = Field(
        default_factory=lambda: ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"]
    )
    """Methods a preflight allows."""
    allow_headers: list[str] = Field(
        default_factory=lambda: [
            "Authorization",
            "Content-Type",
            "Idempotency-Key",
            "If-Match",
            "If-None-Match",
            "X-API-Key",
            "X-CSRF-Token",
            "X-Request-Id",
            "traceparent",
            "tracestate",
        ]
    )
    """Request headers a preflight allows."""
    expose_headers: list[str] = Field(
        default_factory=lambda: [
            "Deprecation",
            "ETag",
            "Idempotency-Key",
            "Link",
            "Location",
            "Retry-After",
            "Sunset",
            "X-Request-Id",
            "RateLimit",
            "RateLimit-Policy",
        ]
    )
    """Response headers scripts may read."""
    max_age: Seconds = 600
    """Seconds a browser may cache a preflight answer."""


class CsrfSettings(_Section):
    """CSRF protection of unsafe requests authenticated by a cookie (double submit)."""

    enabled: bool = True
    """Whether unsafe requests carrying an authenticating cookie must prove their origin."""
    cookie: str = "bastion_csrf"
    """Name of the readable cookie holding the token, set beside the authenticating cookie."""
    header: str = "X-CSRF-Token"
    """Header in which the page sends the cookie's token back."""
    protected_cookies: list[str] | None = None
    """Cookies that authenticate a request; ``None``: the identity refresh cookie."""


class DeprecationSettings(_Section):
    """A deprecated API version, path prefix or route, from configuration."""

    deprecated_at: datetime
    """When it was (or will be) deprecated: the ``Deprecation`` header's date (RFC 9745)."""
    sunset_at: datetime | None = None
    """When it stops answering: the ``Sunset`` header (RFC 8594); from then on, 410
    ``VERSION_SUNSET``."""
    link: str | None = None
    """The migration guide, sent as ``Link: <...>; rel="deprecation"``."""


class VersioningSettings(_Section):
    """API versions in the path (``/v1/``) and their deprecation."""

    enabled: bool = True
    """Whether deprecation headers and sunset answers are applied."""
    deprecations: dict[str, DeprecationSettings] = Field(default_factory=dict)
    """What is deprecated, keyed by path prefix (``/v1/``) or by ``METHOD /template``
    (``GET /v1/documents/{document_id}``); a route's own ``@deprecated`` mark wins."""


class IdempotencySettings(_Section):
    """``Idempotency-Key`` on the POST and PATCH routes that opt in."""

    enabled: bool = True
    """Whether opted-in routes honour the header."""
    store_url: StoreUrl = None
    """Where records live: ``redis://``, a SQL URL, or ``memory://``; ``None`` means
    ``redis.url`` when set, else ``database.url`` when the database is on, else memory."""
    ttl: Seconds = 86_400
    """How long a response is kept for replay, seconds."""
    lock_timeout: Seconds = 60
    """How long a request in progress holds its key; past this, a crashed holder's key
    may be taken again. Keep it above the longest request deadline."""
    max_key_length: int = Field(default=255, ge=16, le=1024)
    """Longest accepted key, in characters."""
    max_response_size: int = Field(default=1_048_576, ge=1024)
    """Largest response body stored for replay, bytes; a larger one is not replayed
    (the key is released and a retry executes again)."""


class HttpSettings(SharedStateSection):
    """The error envelope and the API conventions.

    Security headers, CORS, CSRF, versioning and idempotency keys; ``enabled``
    gates the conventions; the error envelope is always on.
    """

    problem_type_base: str = "urn:bastion:problem:"
    """Prefix of every problem ``type`` URI; the code's slug is appended."""
    admin_allowed_networks: Annotated[list[str], AfterValidator(_networks)] = Field(
        default_factory=lambda: ["127.0.0.1/32", "::1/128"]
    )
    """CIDRs allowed to call ``/admin/*``; empty allows every caller (then set a token)."""
    admin_token: SecretStr | None = None
    """When set, ``/admin/*`` needs ``Authorization: Bearer <token>`` (until the
    identity component's admin role takes over)."""
    trusted_proxies: Annotated[list[str], AfterValidator(_networks)] = Field(default_factory=list)
    """CIDRs of the proxies in front of the service. Only a peer in them is believed
    about the client address; empty: the socket peer is always the client."""
    client_ip_header: Literal["x-forwarded-for", "forwarded", "x-real-ip"] = "x-forwarded-for"
    """The one header the trusted proxies set; others are ignored, since a client can
    send any of them."""
    security_headers: SecurityHeaderSettings = SecurityHeaderSettings()
    cors: Annotated[CorsSettings, AfterValidator(_no_credentialed_wildcard)] = CorsSettings()
    csrf: CsrfSettings = CsrfSettings()
    versioning: VersioningSettings = VersioningSettings()
    idempotency: IdempotencySettings = IdempotencySettings()


class ServerSettings(_Section):
    """How ``bastion serve`` runs the app and shuts it down."""

    app: str = DEFAULT_APP
    """``module:attribute`` of the ASGI app or of a factory returning it."""
    host: str = "127.0.0.1"
    """Interface to bind."""
    port: int = Field(default=8000, ge=0, le=65535)
    """TCP port to bind."""
    workers: int = Field(default=1, ge=1, le=512)
    """Worker processes. More than one with a memory backend is a start-up warning."""
    drain_delay: Seconds = 0.0
    """Seconds between readiness turning 503 and the listener closing, so load
    balancers stop sending new requests first."""
    shutdown_timeout: Seconds = 30.0
    """Seconds in-flight requests get to finish after the listener closes."""
    proxy_headers: bool = False
    """Trust ``X-Forwarded-For``/``-Proto`` from ``forwarded_allow_ips``."""
    forwarded_allow_ips: str = "127.0.0.1"
    """Comma-separated peers whose forwarding headers are trusted."""


class LoggingSettings(SectionSettings):
    """Structured logs and the access log."""

    level: Annotated[
        Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"], BeforeValidator(_upper)
    ] = "INFO"
    """Lowest level written (any case: ``debug`` is ``DEBUG``)."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto`` is console on a TTY and one JSON object per line otherwise."""
    access_log: bool = True
    """One line per request; operational endpoints only at debug level."""
    mask_keys: list[str] = Field(default_factory=list)
    """Extra field names whose values are always masked, on top of the built-in list."""


class MetricsSettings(SectionSettings):
    """Prometheus metrics and the ``/metrics`` endpoint."""

    path: str = "/metrics"
    """Where the scrape endpoint is served."""
    allowed_networks: Annotated[list[str], AfterValidator(_networks)] = Field(default_factory=list)
    """CIDRs allowed to scrape; empty allows every caller."""
    token: SecretStr | None = None
    """When set, scrapes need ``Authorization: Bearer <token>``."""
    multiprocess_dir: str | None = None
    """Directory where worker processes write their metrics so one scrape sees the
    whole instance; ``None``: ``PROMETHEUS_MULTIPROC_DIR`` when set, else a fresh
    directory that ``bastion serve`` creates when ``server.workers`` > 1."""
    tenant_label: bool = False
    """Also record request durations by tenant, in their own family
    (``bastion_http_tenant_request_duration_seconds``, no route label), bounded by
    ``tenant_label_limit``."""
    tenant_label_limit: int = Field(default=20, ge=1, le=1000)
    """Distinct tenants labelled per process; later ones are counted as ``other``."""


class TracingSettings(SectionSettings):
    """OpenTelemetry traces: a span per request and per outbound call, W3C Trace Context."""

    service_name: str = "bastion"
    """``service.name`` of the spans' resource."""
    sample_ratio: float = Field(default=1.0, ge=0.0, le=1.0)
    """Share of new traces recorded (parent-based: an inbound sampled flag wins)."""
    exporter: Literal["none", "otlp-http", "otlp-grpc"] = "none"
    """Where spans go. ``none`` still makes spans, so their ids reach the logs."""
    endpoint: str | None = None
    """OTLP endpoint, e.g. ``http://collector:4318`` (HTTP) or ``http://collector:4317``
    (gRPC); ``None`` uses the exporter's default."""
    headers: SecretStr | None = None
    """OTLP headers as ``key=value,key2=value2`` (often an API key)."""
    trace_operational: bool = False
    """Trace ``/health/*`` and ``/metrics`` too (off: probes would drown real traffic)."""
    trace_database: bool = True
    """A child span per database statement."""
    trace_redis: bool = True
    """A child span per Redis command."""
    trace_http_client: bool = True
    """A client span per outbound httpx request, with ``traceparent`` injected."""
    conformance_endpoint: bool = False
    """Serve ``POST /_conformance/tracecontext`` for the W3C test harness. It makes
    outbound calls to URLs the caller chooses: never on in production."""


class HealthSettings(SectionSettings):
    """Liveness and readiness probes."""

    path_prefix: str = "/health"
    """Where ``live`` and ``ready`` are mounted."""
    check_timeout: Seconds = 1.0
    """Upper bound on each readiness check, in seconds."""
    allowed_networks: Annotated[list[str], AfterValidator(_networks)] = Field(default_factory=list)
    """CIDRs allowed to read the probes; empty allows every caller."""
    token: SecretStr | None = None
    """When set, probes need ``Authorization: Bearer <token>``."""


DependencyKind = Literal[
    "database", "redis", "redis_request", "broker", "http", "storage", "custom"
]
"""The class of a named dependency; it decides the defaults of its pipeline (docs/resilience.md)."""

Strategy = Literal["fallback", "total_timeout", "retry", "circuit_breaker", "bulkhead", "timeout"]
"""One strategy of a resilience pipeline, as named in ``order``."""


class DependencyPolicy(_Section):
    """Overrides for one named dependency's pipeline; what is unset comes from its ``kind``."""

    kind: DependencyKind | None = None
    """The dependency's class; ``custom`` when neither this nor the code that registers it says."""
    timeout: Seconds | None = None
    """Time allowed for one attempt; 0 for none."""
    total_timeout: Seconds | None = None
    """Time allowed for the call with all its retries and waits; 0 for none."""
    retries: int | None = Field(default=None, ge=0, le=10)
    """Attempts after the first, for failures classified transient and operations safe to repeat."""
    backoff_initial: Seconds | None = None
    """Upper bound of the first wait (exponential backoff with full jitter)."""
    backoff_max: Seconds | None = None
    """Upper bound of any wait, a ``Retry-After`` included: a longer one is not waited for."""
    retry_unsafe: bool | None = None
    """Retry operations that are not idempotent (a ``POST`` without an idempotency key) too."""
    retry_budget_ratio: float | None = Field(default=None, ge=0.0, le=1.0)
    """Retries allowed as a share of the last 10 seconds' calls, so retries cannot multiply load."""
    retry_budget_min_per_second: float | None = Field(default=None, ge=0.0)
    """Retries allowed per second whatever the ratio, so a quiet dependency can still retry."""
    circuit: str | None = None
    """The circuit breaker this pipeline reports to (several pipelines may share one);
    ``""`` for none; the dependency's own name when unset."""
    failure_rate_threshold: float | None = Field(default=None, gt=0.0, le=1.0)
    """Failure rate over the window at which the circuit opens."""
    window: Literal["count", "time"] | None = None
    """Sliding window of the failure rate: the last ``window_size`` calls, or seconds."""
    window_size: int | None = Field(default=None, ge=1, le=10_000)
    """Calls (count window) or seconds (time window) the failure rate is computed over."""
    minimum_calls: int | None = Field(default=None, ge=1)
    """Calls the window must hold before its failure rate can open the circuit."""
    consecutive_failures: int | None = Field(default=None, ge=0)
    """Failures in a row that open the circuit whatever the rate; 0 for no such rule."""
    open_duration: Seconds | None = None
    """How long an open circuit rejects calls before it admits probes (half-open)."""
    half_open_probes: int | None = Field(default=None, ge=1, le=100)
    """Calls admitted while half-open; all must succeed for the circuit to close."""
    slow_call_threshold: Seconds | None = None
    """A successful call slower than this counts as a failure; 0 for no such rule."""
    max_concurrent: int | None = Field(default=None, ge=0)
    """Bulkhead: calls in progress at once; 0 for no bulkhead."""
    max_queue: int | None = Field(default=None, ge=0)
    """Bulkhead: calls waiting for a slot; past it a call is rejected at once."""
    queue_timeout: Seconds | None = None
    """Bulkhead: longest wait for a slot before the call is rejected."""
    order: Annotated[list[Strategy] | None, AfterValidator(_distinct)] = None
    """Strategies outermost first; leaving one out switches it off."""
    critical: bool | None = None
    """Whether this dependency's open circuit makes readiness fail."""


class ResilienceSettings(SharedStateSection):
    """Resilience pipelines per dependency, request deadlines, circuit state shared by instances.

    Circuit state lives in ``store_url`` (``redis.url`` when set): transitions are
    published and each instance re-reads the shared state every
    ``state_refresh_interval``; without Redis, circuits are per process.
    """

    request_deadline: Seconds = 30.0
    """Time a request may take before it is answered ``504 REQUEST_TIMEOUT``; 0 for none."""
    route_deadlines: dict[str, Seconds] = Field(default_factory=dict)
    """Deadlines of particular routes by template (``/v1/assistant/ask``) or ``METHOD template``."""
    state_refresh_interval: Seconds = 1.0
    """How often each instance re-reads the shared circuit state, besides published transitions."""
    state_timeout: Seconds = 0.1
    """Timeout of a Redis call made for circuit state; past it the local state is used."""
    dependencies: dict[str, DependencyPolicy] = Field(default_factory=dict)
    """Per named dependency (``database``, ``llm``...): overrides of its class's defaults."""


def _limit_expression(value: str | None) -> str | None:
    if value is None:
        return value
    # Imported here: settings is below every component, and the parser is the rate
    # limiter's own. It runs while this module is still being imported (the defaults
    # below are validated), which works because bastion.ratelimit's __init__ loads
    # its names lazily and the parser imports nothing from bastion.
    from bastion.ratelimit._expression import parse_limits  # noqa: PLC0415

    parse_limits(value)
    return value


def _no_limit(value: Any) -> Any:
    # An empty variable (BASTION_RATELIMIT__DEFAULT=) or "none" switches the default off.
    if isinstance(value, str) and value.strip().lower() in {"", "none", "off"}:
        return None
    return value


LimitExpression = Annotated[str, AfterValidator(_limit_expression)]
"""Limits such as ``20/second;1000/hour`` or ``5 per 15 minutes burst 10``."""

RateLimitKey = Literal["client", "ip", "principal", "api_key", "tenant", "route"]
"""What a limit is counted per; ``client`` is the principal when known, else the IP."""

RateLimitAlgorithm = Literal["token_bucket", "sliding_window", "sliding_log"]
"""``token_bucket`` (GCRA), ``sliding_window`` (two-window counter) or the exact ``sliding_log``."""


_POLICY_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")


def _by_client() -> list[RateLimitKey]:
    return ["client"]


class RateLimitPolicy(_Section):
    """One named set of limits and what they are counted per."""

    limits: LimitExpression
    """The limits, all checked (and consumed together) in one round trip."""
    by: list[RateLimitKey] = Field(default_factory=_by_client, min_length=1)
    """Key parts; a request is counted per distinct combination of them."""
    algorithm: RateLimitAlgorithm | None = None
    """``None`` uses ``ratelimit.algorithm``."""
    fail_open: bool | None = None
    """Admit requests while the store is unreachable; ``None`` uses ``ratelimit.fail_open``."""
    cost: int = Field(default=1, ge=1)
    """Units a request consumes."""


class LoginThrottleSettings(_Section):
    """Failed-login throttling per IP and lockout per submitted account identifier."""

    ip_limit: LimitExpression = "5 per 15 minutes"
    """Failed attempts an IP may make; past it, authentication answers 429 ``RATE_LIMITED``."""
    lockout_threshold: int = Field(default=5, ge=1)
    """Consecutive failures for one identifier that lock it."""
    lockout_duration: Seconds = 900.0
    """First lockout's length; each repeated lockout multiplies it by ``lockout_growth``."""
    lockout_growth: float = Field(default=2.0, ge=1.0)
    """Factor a repeated lockout's length grows by."""
    lockout_max: Seconds = 86_400.0
    """Longest lockout, however often it repeats."""
    lockout_memory: Seconds = 86_400.0
    """How long repetitions are remembered: a lockout this long after the last one starts
    again at ``lockout_duration``."""


class RateLimitSettings(SharedStateSection):
    """Rate limits, quota counters, login throttling and lockout.

    Decisions live in ``store_url`` (``redis.url`` when set, else memory): one
    Redis round trip per decision, whatever the number of limits in a policy.
    """

    default: Annotated[LimitExpression | None, BeforeValidator(_no_limit)] = None
    """Limits applied per client (principal, else IP) to every route not configured
    otherwise, e.g. ``20/second;1000/hour``; ``None`` (or an empty value) for none."""
    algorithm: RateLimitAlgorithm = "token_bucket"
    """Algorithm of limits that do not name one."""
    policies: dict[str, RateLimitPolicy] = Field(default_factory=dict)
    """Named policies, used by ``routes`` and by the ``rate_limit`` decorator."""
    routes: dict[str, str] = Field(default_factory=dict)
    """Policy (a name from ``policies``, ``default`` or ``exempt``) by route template
    (``/v1/documents``) or ``METHOD template`` (``POST /v1/documents``); these win
    over the ``rate_limit`` decorator."""
    exempt_networks: Annotated[list[str], AfterValidator(_networks)] = Field(default_factory=list)
    """CIDRs never limited (internal callers); the operational endpoints are always exempt."""
    fail_open: bool = True
    """Admit requests while the store is unreachable (counted, logged once per outage);
    ``False`` answers 503 instead."""
    timeout: Seconds = 0.05
    """Timeout of one decision's Redis round trip; past it the failure policy applies."""
    max_log_limit: int = Field(default=1000, ge=1)
    """Largest limit a ``sliding_log`` accepts: its cost grows with the limit."""
    headers: bool = True
    """Send ``X-RateLimit-*``, ``RateLimit`` and ``RateLimit-Policy`` on limited routes."""
    login: LoginThrottleSettings = LoginThrottleSettings()
    """Failed-login throttling and lockout (``ratelimit.login.*``)."""

    @model_validator(mode="after")
    def _known_policies(self) -> RateLimitSettings:
        # Checked here so a typo fails at load, naming the variable, not at start-up.
        for name in self.policies:
            if not _POLICY_NAME.fullmatch(name) or name in {"default", "exempt"}:
                raise ValueError(
                    f"policy name {name!r}: use 1 to 64 letters, digits, '_', '.', ':' or '-'; "
                    "'default' and 'exempt' are reserved"
                )
        for route, policy in self.routes.items():
            method, _, template = route.strip().rpartition(" ")
            if not template.startswith("/") or (method and not method.isalpha()):
                raise ValueError(
                    f"routes: {route!r} is not a route template ('/v1/items/{{id}}') "
                    "or 'METHOD template' ('POST /v1/items')"
                )
            if policy not in self.policies and policy not in {"default", "exempt"}:
                known = ", ".join(sorted([*self.policies, "default", "exempt"]))
                raise ValueError(f"routes: {route!r} names no policy {policy!r}; known: {known}")
        return self


class PasswordSettings(_Section):
    """Password hashing (Argon2id with a server-side pepper) and policy."""

    pepper: SecretStr | None = None
    """Server-side secret mixed into every password hash (at least 256 bits); a
    generated one with a warning in development, a start-up failure in production."""
    time_cost: int = Field(default=2, ge=1)
    """Argon2id iterations (OWASP: 2 with 19 MiB)."""
    memory_cost: int = Field(default=19_456, ge=8)
    """Argon2id memory in KiB (19 MiB)."""
    parallelism: int = Field(default=1, ge=1)
    """Argon2id lanes."""
    min_length: int = Field(default=12, ge=8)
    """Shortest password accepted."""
    max_length: int = Field(default=256, ge=64)
    """Longest password accepted (never below 64)."""
    check_common: bool = True
    """Refuse passwords from the bundled list of common and breached passwords."""
    hash_concurrency: int | None = Field(default=None, ge=1)
    """Hashes computed at once (in worker threads); more wait, so a login burst
    cannot starve other requests. ``None``: the CPUs this process may use; with
    several worker processes on one host, divide it by their number. More threads
    than cores only share them: on 2 cores, 4 threads put 10 concurrent logins at
    320 ms p99 against 127 ms with 2 (bench/passwords.py)."""
    hash_queue: int = Field(default=64, ge=0)
    """Callers that may wait for a hashing thread; one more is answered 503
    ``SERVICE_UNAVAILABLE`` with ``Retry-After`` at once."""
    hash_wait: Seconds = 1.0
    """How long a caller may wait for a hashing thread before it is answered 503."""


class TokenSettings(_Section):
    """Access tokens (JWT) and their signing keys."""

    issuer: str = "bastion"
    """``iss`` of issued tokens, and the one accepted."""
    audience: str = "bastion"
    """``aud`` of issued tokens, and the one accepted."""
    algorithm: Literal["EdDSA", "ES256", "RS256", "HS256"] = "EdDSA"
    """Algorithm of a generated development key."""
    signing_keys: SecretStr | None = None
    """The signing keys as a JWKS (private JSON Web Keys with ``kid`` and ``alg``),
    newest first: the first signs, the others still verify until they are removed
    (the rotation overlap). ``None``: a development key under ``./var/`` with a
    warning; a start-up failure in production."""
    key_directory: str = "./var/keys"
    """Where the development key is generated and kept."""
    access_ttl: Seconds = 900.0
    """Life of an access token."""
    refresh_ttl: Seconds = 2_592_000.0
    """Life of a refresh token family without use."""
    leeway: Seconds = 30.0
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``."""


class AuthorizationSettings(_Section):
    """Roles, permissions and the permission cache."""

    permission_ttl: Seconds = 300.0
    """How long effective permissions per (user, tenant) stay cached."""
    role_ttl: Seconds = 600.0
    """How long role definitions stay cached."""
    hit_rate_warning: float = Field(default=0.7, ge=0.0, le=1.0)
    """Hit rate under which a warning is logged (once per ``hit_rate_window``)."""
    hit_rate_window: Seconds = 300.0
    """Seconds over which the hit rate is measured; windows of under 100 lookups
    never warn."""
    timeout: Seconds = 0.05
    """Seconds one Redis round trip of a permission check may take; past it, or on
    any Redis error, the loader (database) answers and Redis is left alone for a second."""
    verify_every_request: bool = True
    """Check the invalidation versions in Redis on every lookup (one round trip, a
    change is seen by the next request on every instance). ``False``: a local hit
    makes no round trip; changes arrive by pub/sub, and ``local_ttl`` bounds how
    long a lost message can leave a value stale."""
    local_ttl: Seconds = 1.0
    """With ``verify_every_request`` off, seconds a local value is trusted unchecked."""


_PROVIDER_NAME = re.compile(r"[a-z][a-z0-9_-]{0,31}")


class ApiKeySettings(_Section):
    """API keys: their server secret, form and caching."""

    secret: SecretStr | None = None
    """Server secret keying the stored hash of every key (at least 256 bits); a
    generated one with a warning in development, a start-up failure in production."""
    previous_secrets: list[SecretStr] = Field(default_factory=list)
    """Older secrets whose key hashes still verify, while keys are re-issued."""
    prefix: str = "bk_live"
    """Prefix of new keys (lowercase letters and digits, parts joined by ``_``)."""
    header: str = "X-API-Key"
    """Header that carries a key; ``Authorization: Bearer <key>`` works too."""
    cache_ttl: Seconds = 30.0
    """Seconds a verified key's record is reused without reading the database; a
    revocation reaches every instance at once through the deny list when Redis is
    configured, else within this time."""
    touch_interval: Seconds = 60.0
    """Least seconds between two writes of a key's ``last_used_at``."""
    max_per_tenant: int = Field(default=100, ge=1)
    """Live keys a tenant may hold."""


class OneTimeTokenSettings(_Section):
    """Lives of the single-use tokens sent by e-mail."""

    verify_email_ttl: Seconds = 86_400.0
    """Life of an e-mail verification link."""
    password_reset_ttl: Seconds = 1_800.0
    """Life of a password reset link."""
    invitation_ttl: Seconds = 604_800.0
    """Life of an invitation to a tenant."""


class MailSettings(_Section):
    """Where the e-mails of identity (verification, reset, invitation) go."""

    sender: Literal["logging", "smtp"] = "logging"
    """``logging`` writes each message's purpose and recipient domain to the log and
    keeps the last ones in memory (development, tests); ``smtp`` delivers them."""
    from_address: str = "no-reply@localhost"
    """The ``From`` and envelope sender address."""
    from_name: str | None = None
    """Display name of the sender."""
    link_base: str = "http://127.0.0.1:8000"
    """Base URL of the links in the messages (the front end that handles them)."""
    smtp_host: str = "127.0.0.1"
    """SMTP server."""
    smtp_port: int | None = Field(default=None, ge=1, le=65535)
    """SMTP port; ``None``: 587 for ``starttls``, 465 for ``tls``, 25 for ``none``."""
    smtp_security: Literal["starttls", "tls", "none"] = "starttls"
    """Transport security; ``none`` is refused with a login unless the host is the loopback."""
    smtp_username: str | None = None
    """Login user, if the server needs one."""
    smtp_password: SecretStr | None = None
    """Login password."""
    smtp_timeout: Seconds = 10.0
    """Seconds for the connect and for each SMTP command."""


class DenyListSettings(_Section):
    """Revocation of access tokens before they expire (Redis only)."""

    enabled: bool = True
    """Check revoked token ids and "log out everywhere" marks on every authenticated
    request when the identity store is Redis (one round trip, shared with nothing
    else). Without Redis, a revoked access token lives until it expires
    (``tokens.access_ttl``)."""
    timeout: Seconds = 0.05
    """Seconds the check may take; past it the failure policy applies."""
    fail_open: bool = True
    """Accept tokens while Redis is unreachable (the token's short life bounds the
    risk); ``False`` answers 503."""


class OidcProviderSettings(_Section):
    """An external OpenID Connect issuer whose access tokens are accepted."""

    issuer: str
    """The issuer URL (``https``, or ``http`` on the loopback)."""
    audience: str
    """The ``aud`` its tokens must carry."""
    jwks_uri: str | None = None
    """Fetch keys from here and skip discovery."""
    algorithms: list[str] = Field(default_factory=lambda: ["RS256", "ES256", "EdDSA"])
    """Accepted signature algorithms."""
    subject_claim: str = "sub"
    """Claim naming the principal."""
    tenant_claim: str | None = None
    """Claim naming the tenant (a tenant id of this service; a slug is not resolved);
    ``None``: ``default_tenant``."""
    default_tenant: str | None = None
    """Tenant of tokens without a tenant claim."""
    roles_claim: str | None = "roles"
    """Claim listing role names (dotted for nested claims, such as ``realm_access.roles``)."""
    role_map: dict[str, str] = Field(default_factory=dict)
    """Issuer role name to this service's role name; unmapped roles are dropped
    when the map is not empty."""


class RoleSettings(_Section):
    """One role: its own permissions and the roles it inherits from."""

    permissions: list[str] = Field(default_factory=list)
    """Permissions such as ``documents:read``; ``documents:*`` grants every
    ``documents:`` permission."""
    inherits: list[str] = Field(default_factory=list)
    """Roles whose permissions this one has too."""


IDENTITY_PERMISSIONS: dict[str, RoleSettings] = {
    "viewer": RoleSettings(permissions=["tenant:read", "members:read"]),
    "member": RoleSettings(inherits=["viewer"]),
    "admin": RoleSettings(
        permissions=[
            "tenant:update",
            "members:invite",
            "members:manage",
            "api_keys:manage",
            "usage:read",
            "audit:read",
        ],
        inherits=["member"],
    ),
    "owner": RoleSettings(permissions=["members:owners", "tenant:delete"], inherits=["admin"]),
}
"""Default roles and the permissions bastion's own routes check."""


class IdentitySettings(SharedStateSection):
    """Accounts, passwords, tokens, API keys, roles and the permission cache.

    Shared state (the permission cache and its invalidations, token revocations)
    lives in ``store_url`` (``redis.url`` when set, else memory).
    """

    routes: bool = True
    """Mount ``/v1/auth/*``, ``/v1/api-keys``, ``/v1/tenants`` and the JWKS."""
    route_prefix: str = "/v1"
    """Prefix of the identity routes."""
    signup: Literal["open", "invite_only", "closed"] = "open"
    """``open``: anyone may sign up; ``invite_only``: only with an invitation token;
    ``closed``: accounts come from ``bastion users create`` only."""
    roles: dict[str, RoleSettings] = Field(default_factory=lambda: dict(IDENTITY_PERMISSIONS))
    """Roles of a tenant membership, by name. Applications add their own
    permissions; bastion's routes check the ``tenant:``, ``members:``,
    ``api_keys:`` and ``usage:`` ones."""
    owner_role: str = "owner"
    """Role of a tenant's creator; a tenant always keeps one member with it."""
    invite_role: str = "member"
    """Role of an invitation that names none."""
    passwords: PasswordSettings = PasswordSettings()
    tokens: TokenSettings = TokenSettings()
    authorization: AuthorizationSettings = AuthorizationSettings()
    api_keys: ApiKeySettings = ApiKeySettings()
    one_time: OneTimeTokenSettings = OneTimeTokenSettings()
    mail: MailSettings = MailSettings()
    deny_list: DenyListSettings = DenyListSettings()
    oidc: dict[str, OidcProviderSettings] = Field(default_factory=dict)
    """External issuers whose access tokens are accepted, by name."""
    refresh_cookie: str = "bastion_refresh"
    """Name of the refresh-token cookie of clients that ask for cookie delivery."""
    purge_interval: Seconds = 3_600.0
    """Seconds between purges of spent single-use and refresh tokens (each instance,
    with jitter); ``0`` disables the periodic purge (``bastion identity purge`` still works)."""
    purge_after: Seconds = 604_800.0
    """Seconds a used or expired single-use token, or a revoked or expired refresh
    family, is kept before a purge deletes it."""

    @model_validator(mode="after")
    def _roles_known(self) -> IdentitySettings:
        for name, role in self.roles.items():
            for parent in role.inherits:
                if parent not in self.roles:
                    raise ValueError(f"roles: {name!r} inherits {parent!r}, which is not defined")
        for field_name in ("owner_role", "invite_role"):
            if getattr(self, field_name) not in self.roles:
                raise ValueError(f"{field_name}: {getattr(self, field_name)!r} is not in roles")
        for name in self.oidc:
            # The name prefixes the issuer's subjects ("okta:<sub>"); "uuid:" and "urn:"
            # are prefixes uuid.UUID() strips, which would let a subject read as a user id.
            if not _PROVIDER_NAME.fullmatch(name) or name in {"uuid", "urn"}:
                raise ValueError(
                    f"oidc: provider name {name!r}: use 1 to 32 lowercase letters, digits, "
                    "'_' or '-', starting with a letter; 'uuid' and 'urn' are reserved"
                )
        return self


class SecretsSettings(_Section):
    """Where secrets come from besides the environment, and how they are checked."""

    directory: str | None = None
    """A directory of secret files (``/run/secrets``); a file named like a variable
    (``BASTION_IDENTITY__PASSWORDS__PEPPER``) holds its value."""
    openbao_url: str | None = None
    """OpenBao or Vault address (``http://127.0.0.1:8200``); ``None``: not used."""
    openbao_token: SecretStr | None = None
    """Token for ``openbao_url``."""
    openbao_path: str = "bastion"
    """KV v2 path whose keys are variable names (``BASTION_IDENTITY__PASSWORDS__PEPPER``)."""
    openbao_mount: str = "secret"
    """KV v2 mount point."""
    openbao_timeout: Seconds = Field(default=5.0, gt=0)
    """Seconds the one read at start-up may take; past it, start-up fails naming the URL."""
    development_directory: str = "./var/secrets"
    """Where development keeps the secrets it generates (a missing pepper), so every
    worker and restart use the same value. Never used in production."""


class TenantQuotaSettings(_Section):
    """Default allowances of every tenant; a tenant's own overrides win."""

    requests_per_day: int | None = Field(default=None, ge=0)
    """Requests a tenant's callers may make per UTC day; ``None``: unlimited."""
    api_calls_per_month: int | None = Field(default=None, ge=0)
    """Requests made with the tenant's API keys per UTC month; ``None``: unlimited."""
    members: int | None = Field(default=None, ge=1)
    """Members (and pending invitations) a tenant may have; ``None``: unlimited."""


class TenancySettings(SectionSettings):
    """How a request's tenant is resolved, and each tenant's quotas and overrides."""

    trusted_header: str | None = None
    """Header naming the tenant (its id) for trusted internal callers, such as
    ``X-Tenant-Id``; honoured only from ``trusted_networks``. ``None``: off."""
    trusted_networks: Annotated[list[str], AfterValidator(_networks)] = Field(default_factory=list)
    """CIDRs whose requests may name their tenant with ``trusted_header``."""
    trusted_roles: list[str] = Field(default_factory=lambda: ["member"])
    """Roles a trusted internal caller holds in the tenant it names."""
    quotas: TenantQuotaSettings = TenantQuotaSettings()
    """Default quotas; a tenant's overrides (``PATCH /admin/tenants/{id}/settings``,
    kept in its ``settings`` column) replace them per tenant."""
    overrides_ttl: Seconds = 30.0
    """Seconds a tenant's overrides are reused before being read again; a change made
    through the API is seen at once by the instance that made it."""


AuditMode = Literal["async", "sync"]
"""How :meth:`bastion.audit.AuditLog.record` makes an entry durable."""

AuditPartition = Literal["global", "tenant"]
"""One Merkle log for the whole service, or one per tenant (plus one for events without)."""

DEFAULT_AUDIT_RETENTION_DAYS: dict[str, int] = {"default": 400, "auth": 400, "admin": 2557}
"""Days an entry is kept before it is archived and pruned, by action class (the first
dotted segment of the action): 400 days cover SOC 2's year under review with a margin;
administrative changes are kept seven years (HIPAA's six, with a margin)."""


class AuditSettings(SectionSettings):
    """Audit trail: an append-only, tamper-evident log of who did what, when, from where.

    Entries are rows of ``bastion_audit_entries`` (one column per field) that form
    an RFC 6962 Merkle tree per log; signed checkpoints commit to its size and root.
    """

    mode: AuditMode = "async"
    """``async``: ``record()`` returns once the event is in a bounded buffer that a
    background task commits in batches (group commit); a crash loses at most
    ``buffer_size`` events. ``sync``: ``record()`` writes the entry in the caller's
    transaction (or its own), so the event and the change commit together."""
    partition: AuditPartition = "global"
    """``global``: one log. ``tenant``: one log per tenant (appends of different
    tenants never wait for each other) and one, ``system``, for events without a tenant."""
    buffer_size: int = Field(default=10_000, ge=1)
    """Events accepted but not yet committed (``async``); a full buffer makes
    ``record()`` wait: it never drops. The most a crash can lose."""
    batch_size: int = Field(default=1000, ge=1)
    """Most events one group commit writes."""
    flush_interval: Seconds = 0.05
    """Seconds the writer waits for more events before committing a partial batch. Nobody
    waits on it (``record()`` returns at once, the crash bound is ``buffer_size``), and at
    a service's write rate it sets the batch size: 5 ms made batches of one or two events,
    each a whole transaction (bench/audit.py)."""
    enqueue_timeout: Seconds = 5.0
    """Seconds ``record()`` waits for room in a full buffer before it raises
    ``AuditUnavailable`` (503): the caller learns the event was not accepted."""
    checkpoint_interval: Seconds = 60.0
    """Seconds between signed checkpoints of each log that grew; 0 turns the schedule off
    (``bastion audit checkpoint`` still makes one)."""
    origin: str = Field(default="bastion", min_length=1, max_length=200)
    """First line of every checkpoint (the log's name, C2SP tlog-checkpoint); the log
    id is appended: ``bastion/global``, ``bastion/tenant/<id>``."""
    signing_keys: list[SecretStr] = Field(default_factory=list)
    """Ed25519 checkpoint signing keys as signed-note private keys
    (``PRIVATE+KEY+<name>+<hash>+<key>``, made by ``bastion audit keygen``); the first
    signs, the others only verify. Missing in development: one is generated and kept
    under ``secrets.development_directory``; in production start-up fails."""
    trusted_keys: list[str] = Field(default_factory=list)
    """Verifier keys (``<name>+<hash>+<key>``) of retired signers whose checkpoints
    still verify; the public halves of ``signing_keys`` are trusted too."""
    checkpoint_directory: str | None = None
    """Directory every checkpoint is also written to (storage the database operator
    does not control: another volume, a bucket mount); ``None``: none."""
    encryption_key: SecretStr | None = None
    """Key (at least 256 bits) that wraps each data subject's key; personal fields
    (e-mail, IP address, user agent) are encrypted under the subject's key.
    Generated in development, required in production."""
    subject_key_cache_ttl: Seconds = 60.0
    """Seconds an instance keeps a subject's key in memory; after an erasure another
    instance may use the destroyed key for at most this long."""
    details_max_bytes: int = Field(default=4096, ge=512)
    """Largest ``details`` object, as canonical JSON; larger is refused. At least 512:
    bastion's own ``audit.prune`` entries (about 300 bytes) must always fit."""
    mask_keys: list[str] = Field(default_factory=list)
    """More key fragments whose values are masked in ``details`` (beyond the logs' own)."""
    retention_days: dict[str, int] = Field(
        default_factory=lambda: dict(DEFAULT_AUDIT_RETENTION_DAYS)
    )
    """Days before an entry is archived and pruned, by action class (``auth``,
    ``document``...); ``default`` covers the others. Pruning runs only through
    ``bastion audit prune`` with the maintenance role."""
    archive_directory: str | None = None
    """Where ``bastion audit prune`` writes sealed segments before deleting; required to prune."""
    maintenance_url: SecretStr | None = None
    """Database URL of the maintenance role (member of ``bastion_audit_maintenance``),
    the only one the append-only guards let delete (pruning); ``None``: ``database.url``."""
    sensitive_reads: bool = True
    """Record reads of resources an app marks sensitive (``audit_read`` dependency)."""


class FlagsSettings(SharedStateSection):
    """Feature flags: stored in the database, evaluated in process, changes pushed over Redis.

    ``store_url`` is where change notifications travel (Redis pub/sub); ``None``
    means ``redis.url`` when set; ``memory://`` (or Redis down) leaves the polling.
    """

    poll_interval: Seconds = Field(default=5.0, gt=0)
    """Seconds between checks of the flags' revision in the database: how fast a change
    reaches an instance that missed its notification (Redis absent, down or partitioned)."""
    seed_file: Path | None = None
    """A YAML or JSON file (Unleash export or bastion's format) imported at start-up
    when the database holds no flag yet; later starts leave the stored flags alone."""
    environment: str | None = None
    """The ``environment`` of every evaluation context that names none; ``None``: the
    top-level ``environment`` setting."""
    app_name: str | None = None
    """The ``appName`` of every evaluation context that names none."""
    regex_timeout: Seconds = Field(default=0.005, gt=0)
    """Longest a ``REGEX`` constraint may run on one value. A search that runs longer ends
    that flag's evaluation with reason ``ERROR`` (the default is served) and counts in
    ``bastion_flags_regex_timeouts_total``: a pathological pattern cannot stall the loop."""
    admin_routes: bool = True
    """Mount ``/admin/features`` (list, create, update, delete, toggle, evaluate)."""
    client_route: str | None = "/api/features"
    """Path of the front ends' route (the calling user's client-visible flags); ``None``: none."""


class PromptInjectionSettings(_Section):
    """Screening of text bound for an LLM."""

    enabled: bool = True
    """Whether :meth:`bastion.guard.Guard.screen` screens; off, it lets everything through."""
    threshold: float = Field(default=0.5, gt=0, le=1)
    """Score from which a text is refused (422 ``PROMPT_INJECTION_DETECTED``); a
    route may pass its own."""
    model_path: Path | None = None
    """Weights of the statistical layer; ``None``: the model shipped with bastion."""
    max_scan_chars: int = Field(default=32_768, ge=256)
    """Characters of a text that are screened; a longer text is screened in full
    windows of this size, and its score is the highest window's."""
    audit: bool = True
    """Record each refusal in the audit trail (``guard.prompt_injection``)."""


class GuardSettings(SectionSettings):
    """Request guards (size, content type, JSON shape, encoding, headers) and input screening."""

    body_limits: dict[str, ByteSize] = Field(
        default_factory=lambda: {
            "default": ByteSize(1_048_576),
            "small": ByteSize(65_536),
            "upload": ByteSize(104_857_600),
        }
    )
    """Largest request body per route class (``1MiB``, ``64KiB``...); routes are
    ``default`` unless marked (``@bastion.guard.limits(body="upload")``) or listed in
    ``route_classes``. Must name ``default``."""
    route_classes: dict[str, str] = Field(default_factory=dict)
    """Route class by ``METHOD /template`` (``POST /v1/imports``), for routes that
    cannot be marked in code."""
    content_types: list[str] = Field(
        default_factory=lambda: [
            "application/json",
            "application/merge-patch+json",
            "application/x-www-form-urlencoded",
            "multipart/form-data",
        ]
    )
    """Media types a request body may have (parameters such as ``charset`` ignored;
    ``+json`` suffixes of listed types are not implied); a route may list its own."""
    json_max_depth: int = Field(default=32, ge=1, le=512)
    """Deepest nesting of arrays and objects in a JSON body."""
    json_max_elements: int = Field(default=10_000, ge=1)
    """Most values (members, items and scalars together) in a JSON body."""
    max_header_bytes: int = Field(default=16_384, ge=1024)
    """Largest total size of the request headers (names and values), bytes: 431 above."""
    max_header_count: int = Field(default=100, ge=8)
    """Most request headers: 431 above."""
    max_query_bytes: int = Field(default=8_192, ge=256)
    """Longest query string, bytes: 414 above."""
    page_size_default: int = Field(default=50, ge=1)
    """Items per page when a list request names none."""
    page_size_max: int = Field(default=1_000, ge=1)
    """Most items per page a list request may ask for."""
    fetch_allow_private: bool = False
    """Let URL fields the server fetches point at private, loopback or link-local
    addresses (off: SSRF protection)."""
    fetch_allowed_hosts: list[str] = Field(default_factory=list)
    """Hosts a fetched URL may name even when they resolve to a private address
    (an internal service the operator trusts)."""
    prompt_injection: PromptInjectionSettings = PromptInjectionSettings()

    @field_validator("body_limits")
    @classmethod
    def _names_default(cls, value: dict[str, ByteSize]) -> dict[str, ByteSize]:
        if "default" not in value:
            raise ValueError("must name the 'default' route class")
        return value


class DatabaseSettings(SectionSettings):
    """The shared SQL database every component uses unless told otherwise."""

    url: Annotated[SecretStr, AfterValidator(_sql_url)] = SecretStr(DEFAULT_DATABASE_URL)
    """SQLAlchemy async URL: ``sqlite+aiosqlite:///path`` or ``postgresql+asyncpg://...``."""
    pool_size: int = Field(default=5, ge=1)
    """Connections kept open (PostgreSQL)."""
    max_overflow: int = Field(default=10, ge=0)
    """Connections opened beyond ``pool_size`` under load (PostgreSQL)."""
    pool_timeout: Seconds = 30.0
    """Seconds to wait for a free connection before failing."""
    pool_recycle: Seconds = 1800.0
    """Seconds after which a connection is replaced, ahead of server-side idle limits."""
    pool_pre_ping: bool = True
    """Test a connection before handing it out, so a database restart heals by itself."""
    connect_timeout: Seconds = 5.0
    """Seconds to wait for a new connection to be established."""
    echo: bool = False
    """Log every SQL statement (development only: statements can carry personal data)."""
    isolation_level: Annotated[IsolationLevel | None, BeforeValidator(_upper)] = None
    """Isolation of :func:`bastion.data.transaction` units that name none; ``None``
    keeps the database's own default (PostgreSQL: READ COMMITTED)."""
    transaction_attempts: int = Field(default=3, ge=1, le=20)
    """Attempts :func:`bastion.data.run_transaction` makes on serialization failures,
    deadlocks and SQLite busy errors, the first included."""
    retry_initial_backoff: Seconds = 0.05
    """Seconds before the first re-run; doubled each attempt, with full jitter."""
    retry_max_backoff: Seconds = 1.0
    """Upper bound on the wait between two attempts, in seconds."""
    slow_query_threshold: Seconds = 0.1
    """Statements slower than this many seconds are logged (template only) and counted."""
    pool_wait_warning: Seconds = 0.1
    """Waiting longer than this many seconds for a pooled connection logs a warning
    (at most one every 10 seconds)."""


class RedisSettings(SectionSettings):
    """The shared Redis, when one is configured."""

    url: SecretStr | None = None
    """``redis://host:port/db``; ``None`` means no Redis."""
    socket_timeout: Seconds = 1.0
    """Seconds a command may take before it fails."""
    key_prefix: str = Field(default="bastion:", max_length=64)
    """Prefix of every key and channel bastion's components use, so services can share a Redis."""


class MigrationsSettings(SectionSettings):
    """Schema migrations for bastion's tables and the host application's."""

    mode: Literal["auto", "check", "off"] | None = None
    """``auto`` upgrades at start-up, ``check`` refuses to start with pending
    revisions, ``off`` does nothing. ``None``: ``auto`` on SQLite, else ``check``."""
    app_tree: str | None = None
    """The host app's Alembic scripts as ``package:directory`` or a filesystem path."""
    app_version_table: str = "alembic_version"
    """Version table of the host app's tree (bastion's own is ``bastion_alembic_version``)."""
    lock_timeout: Seconds = 300.0
    """Seconds a migration run waits for another instance's run to finish before failing."""
    allow_destructive: bool = False
    """Apply revisions that drop or rename tables or columns or narrow a type without
    the revision declaring it (``destroys = [...]``). Prefer the declaration."""


class EventsSettings(SectionSettings):
    """Outbox and broker (a later issue fills this section in)."""

    broker_url: SecretStr | None = None
    """``nats://...`` or ``amqp://...``; ``None`` means no broker."""


class RealtimeSettings(SharedStateSection):
    """Realtime hub (a later issue fills this section in)."""


class JobsSettings(SharedStateSection):
    """Scheduler and locks (a later issue fills this section in)."""


class DocumentsSettings(SectionSettings):
    """Document intake (a later issue fills this section in)."""


class BackupSettings(SectionSettings):
    """Backups (a later issue fills this section in)."""


def _config_file() -> Path:
    return Path(os.environ.get("BASTION_CONFIG_FILE", "bastion.toml"))


class Settings(BaseSettings):
    """Every setting of a bastion service.

    Example:
        >>> Settings(database={"url": "postgresql+asyncpg://db/app"}).database.pool_size
        5
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="__",
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
    )

    environment: Literal["development", "production"] = "development"
    """``production`` turns weak or missing secrets into start-up failures."""
    http: HttpSettings = HttpSettings()
    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    metrics: MetricsSettings = MetricsSettings()
    tracing: TracingSettings = TracingSettings()
    health: HealthSettings = HealthSettings()
    resilience: ResilienceSettings = ResilienceSettings()
    ratelimit: RateLimitSettings = RateLimitSettings()
    identity: IdentitySettings = IdentitySettings()
    secrets: SecretsSettings = SecretsSettings()
    tenancy: TenancySettings = TenancySettings()
    audit: AuditSettings = AuditSettings()
    flags: FlagsSettings = FlagsSettings()
    guard: GuardSettings = GuardSettings()
    database: DatabaseSettings = DatabaseSettings()
    redis: RedisSettings = RedisSettings()
    migrations: MigrationsSettings = MigrationsSettings()
    events: EventsSettings = EventsSettings()
    realtime: RealtimeSettings = RealtimeSettings()
    jobs: JobsSettings = JobsSettings()
    documents: DocumentsSettings = DocumentsSettings()
    backup: BackupSettings = BackupSettings()

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments over secret sources over environment over ``bastion.toml``.

        The secret sources (``bastion._secrets``): OpenBao over ``*_FILE`` variables
        over the ``secrets.directory`` files.
        """
        toml = TomlConfigSettingsSource(settings_cls, toml_file=_config_file())
        return secret_sources(settings_cls, init_settings, env_settings, toml)

    @property
    def migration_mode(self) -> Literal["auto", "check", "off"]:
        """The effective start-up migration policy."""
        if self.migrations.mode is not None:
            return self.migrations.mode
        return "auto" if self.database_is_sqlite else "check"

    @property
    def database_is_sqlite(self) -> bool:
        """Whether the shared database is the embedded SQLite default or another file."""
        return self.database.url.get_secret_value().startswith("sqlite")

    def redacted(self) -> dict[str, Any]:
        """Return the effective tree as JSON-ready data with every secret masked.

        ``SecretStr`` values are masked whole, except URLs (``database.url``,
        ``redis.url``, ``events.broker_url``): an operator needs their host and
        database to debug, so only the password (and any secret query parameter)
        is masked. A password inside any other URL (a section's ``store_url``) is
        masked in place too.
        """
        tree: dict[str, Any] = self.model_dump(mode="json")
        for name, section in tree.items():
            if isinstance(section, dict):
                model = getattr(self, name)
                for key, value in section.items():
                    secret = getattr(model, key, None)
                    if isinstance(secret, SecretStr):
                        section[key] = _redact_secret(secret)
                    elif isinstance(value, str) and "://" in value:
                        section[key] = redact_url(value)
        return tree


_SECRET_MASK = "**********"  # noqa: S105 -- the mask pydantic shows for a SecretStr
# Drivers also take credentials as query parameters (asyncpg's ?password=, ?sslpassword=).
_SECRET_QUERY_PARAMETER = re.compile(
    r"(?P<key>[?&][^=&#]*(?:pass|secret|token|key)[^=&#]*=)[^&#]*", re.IGNORECASE
)


def _redact_secret(secret: SecretStr) -> str:
    value = secret.get_secret_value()
    if "://" not in value:
        return _SECRET_MASK
    try:
        shown = redact_url(value)
    except ValueError:
        # Unparsable (a non-numeric port, say): show nothing rather than risk it.
        return _SECRET_MASK
    return _SECRET_QUERY_PARAMETER.sub(r"\g<key>***", shown)


def load_settings(**overrides: Any) -> Settings:
    """Build the settings tree, turning validation failures into one line each.

    Args:
        overrides: keyword arguments, by section: ``database={"url": ...}``.

    Returns:
        The validated settings.

    Raises:
        ConfigurationError: naming each offending variable and its problem.
    """
    try:
        return Settings(**overrides)
    except PydanticValidationError as exc:
        raise ConfigurationError(_describe(exc)) from None
    except SettingsError as exc:
        raise ConfigurationError(_describe_source_error(exc)) from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigurationError(f"invalid configuration file {_config_file()}: {exc}") from None
    except OSError as exc:  # pragma: no cover -- an unreadable file needs a non-root user
        raise ConfigurationError(
            f"cannot read configuration file {_config_file()}: {exc}"
        ) from None


def _describe(exc: PydanticValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        location = [str(part) for part in error["loc"] if not isinstance(part, int)]
        variable = ENV_PREFIX + "__".join(location).upper()
        lines.append(f"invalid setting {variable}: {error['msg']}")
    return "; ".join(lines)


_SOURCE_FIELD = re.compile(r'field "(?P<field>[^"]+)"')


def _describe_source_error(exc: SettingsError) -> str:
    # pydantic-settings names only the section ("health") when an environment value
    # for a list, dict or section is not JSON; find the variable that holds it.
    match = _SOURCE_FIELD.search(str(exc))
    field = match["field"] if match else ""
    prefix = ENV_PREFIX + field.upper()
    culprits = [
        name
        for name, value in os.environ.items()
        if name.upper() == prefix
        or (name.upper().startswith(prefix + "__") and _is_complex_variable(field, name, value))
    ]
    variable = ", ".join(sorted(culprits)) or prefix
    return (
        f"invalid setting {variable}: cannot parse the value; lists and dicts take JSON, "
        """such as '["10.0.0.0/8"]'"""
    )


def _is_complex_variable(section: str, name: str, value: str) -> bool:
    model = Settings.model_fields.get(section)
    if model is None or not isinstance(model.annotation, type):
        return False
    key = name[len(ENV_PREFIX) + len(section) + 2 :].lower()
    field = (
        model.annotation.model_fields.get(key) if issubclass(model.annotation, BaseModel) else None
    )
    if field is None:
        return False
    annotation = field.annotation
    while typing.get_origin(annotation) is Annotated:
        annotation = typing.get_args(annotation)[0]
    if (typing.get_origin(annotation) or annotation) not in (list, dict, set, tuple):
        return False
    try:
        json.loads(value)
    except ValueError:
        return True
    return False
