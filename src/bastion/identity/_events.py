"""Security events: one API for what the audit trail records about authentication and access.

Every login success and failure, logout, lockout, token-family revocation,
password change and reset, API-key creation and revocation, and role or
permission change is emitted once, as a :class:`SecurityEvent`, through
:func:`emit_security_event`. Listeners registered with :func:`on_security_event`
receive it: the audit component persists it, a notifier may mail the account's
owner. Until then the default listener, :func:`log_security_event`, writes each
event as one ``security_event`` log line.

An event never carries a password, a token, a secret or an e-mail address: its
details are checked when it is built, and a detail that looks like one is a
programming error (:class:`ValueError`), caught by the tests of whoever emits it.
Who failed to log in is named by :func:`bastion.ratelimit.identifier_hash` of the
submitted identifier, as the login throttle does.
"""

from __future__ import annotations

import datetime as dt
import enum
import inspect
import os
import re
import time
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final

import structlog

from bastion.context import current_context
from bastion.observability.metrics import IDENTITY_SECURITY_EVENTS
from bastion.ratelimit import LockoutEvent

__all__ = [
    "SecurityEvent",
    "SecurityEventKind",
    "SecurityEventListener",
    "SecurityOutcome",
    "emit_lockout",
    "emit_security_event",
    "log_security_event",
    "on_security_event",
    "remove_security_listener",
]

logger = structlog.get_logger("bastion.security")


class SecurityEventKind(enum.StrEnum):
    """What happened. Add kinds, never rename them: the audit trail stores the value."""

    LOGIN_SUCCEEDED = "login_succeeded"
    LOGIN_FAILED = "login_failed"
    LOGOUT = "logout"
    LOGOUT_ALL = "logout_all"
    LOCKOUT = "lockout"
    TOKEN_REFRESHED = "token_refreshed"  # noqa: S105 -- an event name, not a password
    TOKEN_FAMILY_REVOKED = "token_family_revoked"  # noqa: S105 -- an event name, not a password
    REFRESH_REUSE_DETECTED = "refresh_reuse_detected"
    SIGNUP = "signup"
    EMAIL_VERIFIED = "email_verified"
    PASSWORD_CHANGED = "password_changed"  # noqa: S105 -- an event name, not a password
    PASSWORD_RESET_REQUESTED = "password_reset_requested"  # noqa: S105 -- an event name, not a password
    PASSWORD_RESET = "password_reset"  # noqa: S105 -- an event name, not a password
    PASSWORD_REHASHED = "password_rehashed"  # noqa: S105 -- an event name, not a password
    API_KEY_CREATED = "api_key_created"
    API_KEY_REVOKED = "api_key_revoked"
    API_KEY_REJECTED = "api_key_rejected"
    ROLE_CHANGED = "role_changed"
    PERMISSION_CHANGED = "permission_changed"
    MEMBER_INVITED = "member_invited"
    MEMBER_JOINED = "member_joined"
    MEMBER_REMOVED = "member_removed"
    TENANT_CREATED = "tenant_created"
    TENANT_UPDATED = "tenant_updated"
    TENANT_SETTINGS_CHANGED = "tenant_settings_changed"
    INVITATION_REVOKED = "invitation_revoked"
    ACCESS_DENIED = "access_denied"


class SecurityOutcome(enum.StrEnum):
    """How it ended: the action took place, or it was attempted and refused."""

    SUCCESS = "success"
    FAILURE = "failure"


# The outcome a kind has unless the caller says otherwise.
_FAILURES: Final = frozenset(
    {
        SecurityEventKind.LOGIN_FAILED,
        SecurityEventKind.LOCKOUT,
        SecurityEventKind.REFRESH_REUSE_DETECTED,
        SecurityEventKind.API_KEY_REJECTED,
        SecurityEventKind.ACCESS_DENIED,
    }
)

DetailValue = str | int | float | bool | None

# Detail keys that name a secret or personal data. Ids, hashes and prefixes of
# those things (``token_family_id``, ``identifier_hash``, ``key_prefix``) are fine.
_FORBIDDEN_KEY: Final = re.compile(
    r"password|passwd|secret|pepper|e-?mail|cookie|authorization|private"
    r"|^(?:access_|refresh_|id_|reset_|verification_|invite_)?token$|^api_key$|^key$",
    re.IGNORECASE,
)
_EMAIL_VALUE: Final = re.compile(r"[^@\s]+@[^@\s]+\.[^@\s]+")
_JWT_VALUE: Final = re.compile(r"eyJ[\w-]+\.[\w-]+\.")
MAX_DETAIL_LENGTH: Final = 512


def _new_event_id() -> str:
    """A UUIDv7: 48 bits of milliseconds then 74 random bits, so ids sort by time."""
    millis = time.time_ns() // 1_000_000
    value = (millis & (2**48 - 1)) << 80 | int.from_bytes(os.urandom(10)) & (2**80 - 1)
    value = (value & ~(0xF << 76)) | (0x7 << 76)  # version 7
    value = (value & ~(0x3 << 62)) | (0x2 << 62)  # RFC 9562 variant
    return str(uuid.UUID(int=value))


def _utcnow() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True, slots=True)
class SecurityEvent:
    """One security-relevant thing that happened, as the audit trail records it.

    Attributes:
        kind: what happened.
        outcome: ``success``, or ``failure`` for a refused attempt.
        actor: the user (id) who did it; ``None`` when nobody authenticated.
        subject: what it was done to: a user id, an API key id, a token family id,
            or for an unknown login the identifier's SHA-256.
        tenant: the tenant (id) it happened in, when there is one.
        ip: the client address.
        request_id: the request that did it.
        details: short extra facts (a role name, a reason); never a secret or an
            e-mail address.
        id: a UUIDv7, unique and time-ordered.
        occurred_at: when (aware, UTC).

    Raises:
        ValueError: a detail's name or value looks like a secret or an e-mail
            address, or a value is not a short scalar.
    """

    kind: SecurityEventKind
    outcome: SecurityOutcome
    actor: str | None = None
    subject: str | None = None
    tenant: str | None = None
    ip: str | None = None
    request_id: str | None = None
    details: Mapping[str, DetailValue] = field(default_factory=dict)
    id: str = field(default_factory=_new_event_id)
    occurred_at: dt.datetime = field(default_factory=_utcnow)

    def __post_init__(self) -> None:
        for key, value in self.details.items():
            _check_detail(key, value)
        for name in ("actor", "subject"):
            value = getattr(self, name)
            if isinstance(value, str) and _EMAIL_VALUE.search(value):
                raise ValueError(
                    f"security event {name} looks like an e-mail address: use the user's id"
                    " or identifier_hash()"
                )
        # Frozen: a listener must not change what the next one sees.
        object.__setattr__(self, "details", MappingProxyType(dict(self.details)))

    def as_dict(self) -> dict[str, DetailValue | dict[str, DetailValue]]:
        """The event as JSON-ready values (the log line's fields, the audit row)."""
        return {
            "id": self.id,
            "kind": self.kind.value,
            "outcome": self.outcome.value,
            "occurred_at": self.occurred_at.isoformat(),
            "actor": self.actor,
            "subject": self.subject,
            "tenant": self.tenant,
            "ip": self.ip,
            "request_id": self.request_id,
            "details": dict(self.details),
        }


def _check_detail(key: str, value: object) -> None:
    if _FORBIDDEN_KEY.search(key):
        raise ValueError(f"security event detail {key!r} may hold a secret or personal data")
    if value is not None and not isinstance(value, str | int | float | bool):
        raise ValueError(f"security event detail {key!r} must be a str, number, bool or None")
    if isinstance(value, str):
        if len(value) > MAX_DETAIL_LENGTH:
            raise ValueError(f"security event detail {key!r} is over {MAX_DETAIL_LENGTH} chars")
        if _EMAIL_VALUE.search(value) or _JWT_VALUE.search(value):
            raise ValueError(f"security event detail {key!r} looks like an e-mail or a token")


SecurityEventListener = Callable[[SecurityEvent], Awaitable[None] | None]
"""A function (or coroutine function) called with each :class:`SecurityEvent`."""


def log_security_event(event: SecurityEvent) -> None:
    """The default listener: one ``security_event`` log line per event, at info level."""
    logger.info(
        "security_event",
        security_event_id=event.id,
        kind=event.kind.value,
        outcome=event.outcome.value,
        actor=event.actor,
        subject=event.subject,
        tenant_id=event.tenant,
        client_ip=event.ip,
        request_id=event.request_id,
        details=dict(event.details),
    )


_listeners: list[SecurityEventListener] = [log_security_event]


def on_security_event(listener: SecurityEventListener) -> SecurityEventListener:
    """Call ``listener`` with every security event from now on; usable as a decorator.

    Listeners run in the order registered, awaited before :func:`emit_security_event`
    returns, so keep them short (enqueue, do not send). One that raises is logged
    with its class name only and the others still run.

    Example:
        >>> @on_security_event
        ... async def record(event: SecurityEvent) -> None:
        ...     await audit.append(event)
    """
    if listener not in _listeners:
        _listeners.append(listener)
    return listener


def remove_security_listener(listener: SecurityEventListener) -> None:
    """Stop calling ``listener``; removing one not registered does nothing.

    ``remove_security_listener(log_security_event)`` turns the log lines off, for
    a deployment whose audit trail already keeps every event.
    """
    if listener in _listeners:
        _listeners.remove(listener)


async def emit_security_event(
    kind: SecurityEventKind | str,
    *,
    outcome: SecurityOutcome | str | None = None,
    actor: str | None = None,
    subject: str | None = None,
    tenant: str | None = None,
    ip: str | None = None,
    request_id: str | None = None,
    details: Mapping[str, DetailValue] | None = None,
) -> SecurityEvent:
    """Build a security event and deliver it to every listener.

    ``actor``, ``tenant``, ``ip`` and ``request_id`` default to the current
    :class:`~bastion.context.RequestContext`'s user, tenant, client address and
    request id.

    Example:
        >>> await emit_security_event(
        ...     SecurityEventKind.LOGIN_FAILED,
        ...     subject=identifier_hash(body.email),
        ...     details={"reason": "bad_password"},
        ... )

    Args:
        kind: what happened.
        outcome: defaults to ``failure`` for refusals (``login_failed``,
            ``lockout``, ``refresh_reuse_detected``, ``api_key_rejected``,
            ``access_denied``), else ``success``.
        actor: the user id who acted.
        subject: the id of what was acted on.
        tenant: the tenant id.
        ip: the client address.
        request_id: the request id.
        details: short scalar facts, never secrets or e-mail addresses.

    Returns:
        The event as delivered.

    Raises:
        ValueError: ``kind`` or ``outcome`` is unknown, or a detail looks like a
            secret or an e-mail address.
    """
    kind = SecurityEventKind(kind)
    if outcome is None:
        outcome = SecurityOutcome.FAILURE if kind in _FAILURES else SecurityOutcome.SUCCESS
    context = current_context()
    if context is not None:
        actor = actor if actor is not None else context.user_id
        tenant = tenant if tenant is not None else context.tenant_id
        ip = ip if ip is not None else context.client_ip
        request_id = request_id if request_id is not None else context.request_id
    event = SecurityEvent(
        kind=kind,
        outcome=SecurityOutcome(outcome),
        actor=actor,
        subject=subject,
        tenant=tenant,
        ip=ip,
        request_id=request_id,
        details=details or {},
    )
    await deliver_security_event(event)
    return event


async def deliver_security_event(event: SecurityEvent) -> None:
    """Deliver an already built event to every listener (isolating failures)."""
    IDENTITY_SECURITY_EVENTS.labels(event.kind.value, event.outcome.value).inc()
    for listener in tuple(_listeners):
        try:
            result = listener(event)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:  # noqa: BLE001 -- a listener must never break a login
            # The class only: an exception's text may carry what the event leaves out.
            logger.error(  # noqa: TRY400 -- the traceback's text is what must not be logged
                "security event listener failed",
                listener=getattr(listener, "__qualname__", type(listener).__name__),
                kind=event.kind.value,
                error=type(exc).__name__,
            )


async def emit_lockout(lockout: LockoutEvent) -> None:
    """Forward the login throttle's :class:`LockoutEvent` as a ``lockout`` security event.

    Wire it once: ``throttle.on_lockout(emit_lockout)``.
    """
    await emit_security_event(
        SecurityEventKind.LOCKOUT,
        subject=lockout.identifier_hash,
        ip=lockout.ip,
        details={
            "until": lockout.until.isoformat(),
            "duration": lockout.duration,
            "repetition": lockout.repetition,
        },
    )
