"""Failure classification: which errors are the dependency's fault, which prove it was not reached.

A pipeline retries and counts against the circuit only *transient* failures:
the network, the server going away, timeouts. Everything else (a bad query, a
``KeyError`` in the caller's code, a 4xx the caller asked for) is not the
dependency's fault: it passes through the pipeline unchanged, is never retried
and never opens a circuit, so an application bug stays a 500 and does not turn
into a 502.

Client libraries are recognised only once they are imported (``sys.modules``):
an exception of a library that was never loaded cannot reach the pipeline, and
classifying must not import httpx, redis, asyncpg or SQLAlchemy.
"""

from __future__ import annotations

import socket
import ssl
import sys
from typing import Final

from bastion.resilience._errors import DependencyTimeoutError
from bastion.resilience._timeout import OutOfTime

__all__ = ["is_timeout", "is_transient", "never_reached"]

# OSErrors of the local machine, deterministic: retrying cannot help.
_LOCAL_OS_ERRORS: Final = (
    FileNotFoundError,
    FileExistsError,
    IsADirectoryError,
    NotADirectoryError,
    PermissionError,
    ssl.SSLCertVerificationError,
)

_ASYNCPG_TRANSIENT: Final = (
    "PostgresConnectionError",  # SQLSTATE class 08: the connection failed or was lost
    "CannotConnectNowError",  # 57P03: starting up or in recovery
    "AdminShutdownError",  # 57P01
    "CrashShutdownError",  # 57P02
    "TooManyConnectionsError",  # 53300
)
# Refused before a statement ran: the server never saw the caller's request.
_ASYNCPG_NOT_REACHED: Final = (
    "CannotConnectNowError",
    "TooManyConnectionsError",
    "ClientCannotConnectError",
    "ConnectionRejectionError",
)

# How far down __cause__ / .orig a wrapped driver error is looked for: SQLAlchemy's
# asyncpg adapter nests it two deep, asyncpg itself one more.
_CHAIN_DEPTH: Final = 4


def is_transient(exc: BaseException) -> bool:
    """Return whether ``exc`` is a failure of the dependency that a later attempt may not meet.

    Transient: ``OSError`` (``ConnectionError``, ``TimeoutError`` and
    ``asyncio.TimeoutError`` included; not the local file-system errors nor a
    certificate that fails verification), httpx transport errors (not
    ``UnsupportedProtocol`` nor ``LocalProtocolError``, which are the caller's),
    redis ``ConnectionError`` and ``TimeoutError`` (not authentication or
    authorization failures), asyncpg connection errors (SQLSTATE class 08,
    server shutdown or start-up, too many connections), SQLAlchemy's pool
    timeout and its ``DBAPIError`` when the connection was invalidated or the
    driver error inside is one of these, and :class:`DependencyTimeoutError`.

    Args:
        exc: what an attempt raised.

    Returns:
        ``True`` when the pipeline should count it against the circuit and may
        retry; ``False`` for everything else, which passes through unchanged.

    Example:
        >>> is_transient(ConnectionResetError())
        True
        >>> is_transient(KeyError("id"))
        False
    """
    if isinstance(exc, OSError):
        return not isinstance(exc, _LOCAL_OS_ERRORS)
    if isinstance(exc, DependencyTimeoutError):
        return True
    return _library_transient(exc)


def is_timeout(exc: BaseException) -> bool:
    """Return whether ``exc`` says the dependency did not answer in time.

    A transient failure that is a timeout ends a call as
    :class:`DependencyTimeoutError` (503) rather than ``DependencyError`` (502).
    """
    if isinstance(exc, (TimeoutError, DependencyTimeoutError)):
        return True
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TimeoutException):
        return True
    redis = sys.modules.get("redis.exceptions")
    if redis is not None and isinstance(exc, redis.TimeoutError):
        return True
    sqlalchemy = sys.modules.get("sqlalchemy.exc")
    return sqlalchemy is not None and isinstance(exc, sqlalchemy.TimeoutError)


def never_reached(exc: BaseException) -> bool:
    """Return whether ``exc`` proves the request never reached the dependency.

    Such a failure is safe to retry even for an operation that is not
    idempotent: a refused connection, a name that does not resolve, a connect
    or pool-checkout timeout, a server refusing new connections, a pipeline
    deadline that passed before the call was made.
    """
    if isinstance(exc, (ConnectionRefusedError, socket.gaierror)):
        return True
    if isinstance(exc, OutOfTime):
        return not exc.called
    redis = sys.modules.get("redis.exceptions")
    if redis is not None and isinstance(exc, redis.ConnectionError):
        # redis-py raises ConnectionError for a failed connect and for a connection
        # lost mid-command alike; only the OSError it was raised over tells them apart.
        inner = exc.__cause__ or exc.__context__
        return isinstance(inner, (ConnectionRefusedError, socket.gaierror))
    return isinstance(exc, _not_reached_types())


def _not_reached_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = []
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        types += [httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout]
    sqlalchemy = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy is not None:
        types.append(sqlalchemy.TimeoutError)
    asyncpg = sys.modules.get("asyncpg.exceptions")
    if asyncpg is not None:
        types += _types(asyncpg, _ASYNCPG_NOT_REACHED)
    return tuple(types)


def _library_transient(exc: BaseException) -> bool:
    httpx = sys.modules.get("httpx")
    if httpx is not None and isinstance(exc, httpx.TransportError):
        return not isinstance(exc, (httpx.UnsupportedProtocol, httpx.LocalProtocolError))
    redis = sys.modules.get("redis.exceptions")
    if redis is not None and isinstance(exc, (redis.ConnectionError, redis.TimeoutError)):
        return not isinstance(exc, (redis.AuthenticationError, redis.AuthorizationError))
    asyncpg = sys.modules.get("asyncpg.exceptions")
    if asyncpg is not None and isinstance(exc, _types(asyncpg, _ASYNCPG_TRANSIENT)):
        return True
    sqlalchemy = sys.modules.get("sqlalchemy.exc")
    if sqlalchemy is not None:
        if isinstance(exc, sqlalchemy.TimeoutError):
            return True
        if isinstance(exc, sqlalchemy.DBAPIError):
            return bool(exc.connection_invalidated) or _driver_transient(exc)
    return False


def _driver_transient(exc: BaseException) -> bool:
    """Whether the driver error a SQLAlchemy ``DBAPIError`` wraps is transient."""
    inner: BaseException | None = exc
    for _ in range(_CHAIN_DEPTH):
        orig = getattr(inner, "orig", None)
        inner = orig if isinstance(orig, BaseException) else inner.__cause__ if inner else None
        if inner is None:
            return False
        if is_transient(inner):
            return True
    return False


def _types(module: object, names: tuple[str, ...]) -> tuple[type[BaseException], ...]:
    return tuple(getattr(module, name) for name in names if hasattr(module, name))
