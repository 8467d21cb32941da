"""The root Settings tree, composed of one section per component.

Sources, in rising precedence: defaults, an optional ``bastion.toml`` (or the
file named by ``BASTION_CONFIG_FILE``), ``BASTION_<SECTION>__<KEY>`` environment
variables, and keyword arguments. Precedence is decided in one place,
:meth:`Settings.settings_customise_sources`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, SecretStr
from pydantic import ValidationError as PydanticValidationError
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from bastion.errors import ConfigurationError

__all__ = [
    "DatabaseSettings",
    "HealthSettings",
    "HttpSettings",
    "LoggingSettings",
    "MigrationsSettings",
    "RedisSettings",
    "SectionSettings",
    "ServerSettings",
    "Settings",
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


StoreUrl = Annotated[str | None, AfterValidator(_known_url_scheme)]


class SectionSettings(BaseModel):
    """Base of every section: it can be switched off."""

    model_config = ConfigDict(extra="forbid", validate_default=True, use_attribute_docstrings=True)

    enabled: bool = True
    """Whether the component is active. A switched-off component costs nothing per request."""


class SharedStateSection(SectionSettings):
    """A section whose state must be global across instances (limits, locks, flags...)."""

    store_url: StoreUrl = None
    """Where the state lives; ``None`` means ``redis.url`` when set, else ``memory://``."""


class HttpSettings(SharedStateSection):
    """API conventions and the error envelope."""

    problem_type_base: str = "urn:bastion:problem:"
    """Prefix of every problem ``type`` URI; the code's slug is appended."""
    max_request_id_length: int = Field(default=128, ge=1, le=128)
    """Longest inbound ``X-Request-Id`` that is kept (ARCHITECTURE.md fixes 128)."""


class ServerSettings(SectionSettings):
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

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    """Lowest level written."""
    format: Literal["auto", "json", "console"] = "auto"
    """``auto`` is console on a TTY and one JSON object per line otherwise."""
    access_log: bool = True
    """One line per request; operational endpoints only at debug level."""
    mask_keys: list[str] = Field(default_factory=list)
    """Extra field names whose values are always masked, on top of the built-in list."""


class MetricsSettings(SectionSettings):
    """Prometheus metrics (the observability issue fills this section in)."""


class TracingSettings(SectionSettings):
    """OpenTelemetry tracing (the observability issue fills this section in)."""


class HealthSettings(SectionSettings):
    """Liveness and readiness probes."""

    path_prefix: str = "/health"
    """Where ``live`` and ``ready`` are mounted."""
    check_timeout: Seconds = 1.0
    """Upper bound on each readiness check, in seconds."""
    allowed_networks: list[str] = Field(default_factory=list)
    """CIDRs allowed to read the probes; empty allows every caller."""
    token: SecretStr | None = None
    """When set, probes need ``Authorization: Bearer <token>``."""


class ResilienceSettings(SharedStateSection):
    """Circuit breakers, retries, timeouts (a later issue fills this section in)."""


class RateLimitSettings(SharedStateSection):
    """Rate limits (a later issue fills this section in)."""


class IdentitySettings(SectionSettings):
    """Accounts, tokens and API keys (a later issue fills this section in)."""


class TenancySettings(SectionSettings):
    """Tenant resolution and quotas (a later issue fills this section in)."""


class AuditSettings(SectionSettings):
    """Audit trail (a later issue fills this section in)."""


class FlagsSettings(SharedStateSection):
    """Feature flags (a later issue fills this section in)."""


class GuardSettings(SectionSettings):
    """Input guards (a later issue fills this section in)."""


class DatabaseSettings(SectionSettings):
    """The shared SQL database every component uses unless told otherwise."""

    url: SecretStr = SecretStr(DEFAULT_DATABASE_URL)
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


class RedisSettings(SectionSettings):
    """The shared Redis, when one is configured."""

    url: SecretStr | None = None
    """``redis://host:port/db``; ``None`` means no Redis."""
    socket_timeout: Seconds = 1.0
    """Seconds a command may take before it fails."""


class MigrationsSettings(SectionSettings):
    """Schema migrations for bastion's tables and the host application's."""

    mode: Literal["auto", "check", "off"] | None = None
    """``auto`` upgrades at start-up, ``check`` refuses to start with pending
    revisions, ``off`` does nothing. ``None``: ``auto`` on SQLite, else ``check``."""
    app_tree: str | None = None
    """The host app's Alembic scripts as ``package:directory`` or a filesystem path."""
    app_version_table: str = "alembic_version"
    """Version table of the host app's tree (bastion's own is ``bastion_alembic_version``)."""


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
        """Keyword arguments over environment over ``bastion.toml`` over defaults."""
        return (
            init_settings,
            env_settings,
            TomlConfigSettingsSource(settings_cls, toml_file=_config_file()),
        )

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
        """Return the effective tree as JSON-ready data with every secret masked."""
        return self.model_dump(mode="json")


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


def _describe(exc: PydanticValidationError) -> str:
    lines = []
    for error in exc.errors(include_url=False, include_input=False):
        location = [str(part) for part in error["loc"] if not isinstance(part, int)]
        variable = ENV_PREFIX + "__".join(location).upper()
        lines.append(f"invalid setting {variable}: {error['msg']}")
    return "; ".join(lines)
