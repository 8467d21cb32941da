"""Backend URLs: which engine a URL names, and how to show one without its secret.

Every component chooses its backend by URL (``memory://``, ``redis://``, SQL
URLs, ``nats://``, ``amqp://``). Implementations are named here as lazy
``"module:Class"`` strings so a missing optional dependency fails only when it
is used, with the extra to install in the message.
"""

from __future__ import annotations

import enum
import importlib
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final
from urllib.parse import urlsplit, urlunsplit

from bastion.errors import ConfigurationError

if TYPE_CHECKING:
    from bastion.settings import Settings

__all__ = [
    "BackendKind",
    "MissingDependency",
    "SharedStateBackend",
    "backend_kind",
    "import_optional",
    "redact_url",
    "shared_state_backends",
]


class BackendKind(enum.StrEnum):
    """The families of backend a URL can name."""

    MEMORY = "memory"
    REDIS = "redis"
    SQLITE = "sqlite"
    POSTGRES = "postgres"
    NATS = "nats"
    AMQP = "amqp"


_KIND_BY_SCHEME: Final[Mapping[str, BackendKind]] = {
    "memory": BackendKind.MEMORY,
    "redis": BackendKind.REDIS,
    "rediss": BackendKind.REDIS,
    "unix": BackendKind.REDIS,
    "sqlite": BackendKind.SQLITE,
    "sqlite+aiosqlite": BackendKind.SQLITE,
    "postgresql": BackendKind.POSTGRES,
    "postgresql+asyncpg": BackendKind.POSTGRES,
    "postgres": BackendKind.POSTGRES,
    "nats": BackendKind.NATS,
    "tls": BackendKind.NATS,
    "amqp": BackendKind.AMQP,
    "amqps": BackendKind.AMQP,
}

# The extra that provides each kind's client library.
_EXTRA: Final[Mapping[str, str]] = {
    "asyncpg": "postgres",
    "redis": "redis",
    "nats": "nats",
    "aio_pika": "rabbitmq",
}


class MissingDependency(ConfigurationError):
    """A backend was configured whose client library is not installed."""


def backend_kind(url: str) -> BackendKind:
    """Return the family of backend ``url`` names.

    Raises:
        ConfigurationError: when the scheme is not one bastion knows.
    """
    scheme = url.split("://", 1)[0].lower()
    try:
        return _KIND_BY_SCHEME[scheme]
    except KeyError:
        known = ", ".join(sorted(_KIND_BY_SCHEME))
        raise ConfigurationError(f"unknown backend scheme {scheme!r} (known: {known})") from None


def redact_url(url: str) -> str:
    """Return ``url`` with its password replaced, safe for logs and ``config show``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    netloc = f"{parts.username}:***@{host}" if parts.username else f"***@{host}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def import_optional(module: str) -> object:
    """Import an optional client library, naming the extra to install when it is missing.

    Raises:
        MissingDependency: with the ``pip install "bastion[extra]"`` line to run.
    """
    try:
        return importlib.import_module(module)
    except ImportError:
        root = module.split(".", 1)[0]
        extra = _EXTRA.get(root, "all")
        raise MissingDependency(
            f'{root} is not installed; install it with: pip install "bastion[{extra}]"'
        ) from None


@dataclass(frozen=True, slots=True)
class SharedStateBackend:
    """Where one component keeps state that must be global across instances."""

    section: str
    url: str

    @property
    def kind(self) -> BackendKind:
        """The family of backend."""
        return backend_kind(self.url)


def shared_state_backends(settings: Settings) -> list[SharedStateBackend]:
    """Return the effective store of every enabled component with shared state.

    A component's own ``store_url`` wins; else the shared ``redis.url``; else
    ``memory://``, which holds only within one process.
    """
    shared_redis = settings.redis.url.get_secret_value() if settings.redis.url else None
    backends = []
    for name in type(settings).model_fields:
        section = getattr(settings, name)
        if not getattr(section, "enabled", False) or not hasattr(section, "store_url"):
            continue
        url = section.store_url or shared_redis or "memory://"
        backends.append(SharedStateBackend(section=name, url=url))
    return backends
