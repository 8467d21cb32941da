"""What an audit event says: action, outcome, actor, tenant, resource, where from, details."""

from __future__ import annotations

import datetime as dt
import enum
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from bastion._ids import uuid7

__all__ = ["ACTION_PATTERN", "Actor", "ActorType", "AuditEvent", "Outcome", "Resource"]

ACTION_PATTERN: Final = re.compile(r"[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+")
"""A dotted action name: ``document.update``, ``auth.login.failure``."""


class Outcome(enum.StrEnum):
    """How the action ended."""

    SUCCESS = "success"
    FAILURE = "failure"
    """Attempted and failed (a wrong password, a dependency error)."""
    DENIED = "denied"
    """Refused by authorization (403) or a policy."""


class ActorType(enum.StrEnum):
    """Who acted."""

    USER = "user"
    API_KEY = "api_key"
    SERVICE = "service"
    """A workload identity (an external OIDC client, a trusted internal caller)."""
    SYSTEM = "system"
    """The service itself: a scheduled job, a start-up migration, an operator's CLI."""
    ANONYMOUS = "anonymous"
    """Nobody authenticated (a failed login, a signup)."""


@dataclass(frozen=True, slots=True)
class Actor:
    """Who did it.

    Attributes:
        type: user, API key, service, system job or anonymous.
        id: the user id, API key id, client id or job name; ``None`` when anonymous.
        email: the actor's e-mail address when the event must name it; stored
            encrypted under the data subject's key, never in clear.
    """

    type: ActorType
    id: str | None = None
    email: str | None = None

    @classmethod
    def user(cls, user_id: str, *, email: str | None = None) -> Actor:
        """A user, by id."""
        return cls(ActorType.USER, user_id, email)

    @classmethod
    def system(cls, job: str) -> Actor:
        """The service itself, running ``job`` (``migrations``, ``retention``...)."""
        return cls(ActorType.SYSTEM, job)


ANONYMOUS: Final = Actor(ActorType.ANONYMOUS)


@dataclass(frozen=True, slots=True)
class Resource:
    """What it was done to: a type (``document``) and an id."""

    type: str
    id: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditEvent:
    """One thing to record. Fields left ``None`` are filled from the current request.

    Attributes:
        action: a dotted name from the catalogue (``document.update``).
        outcome: success, failure or denied.
        actor: who; ``None``: the request's principal, else anonymous.
        tenant_id: the tenant; ``None``: the request's tenant.
        resource: what it was done to.
        ip: the client address; ``None``: the request's. Stored encrypted.
        user_agent: the client's ``User-Agent``; ``None``: the request's. Stored encrypted.
        request_id: ``None``: the request's.
        trace_id: ``None``: the request's.
        occurred_at: when (aware); ``None``: now.
        details: a small JSON object of facts; masked like logs, bounded by
            ``audit.details_max_bytes``.
        subject: the data subject whose key encrypts ``ip``, ``user_agent`` and
            the actor's e-mail (``user:<id>``...); ``None``: the acting user, else
            a per-month key for anonymous events.
        id: a UUIDv7; ``None``: a new one.
    """

    action: str
    outcome: Outcome | str = Outcome.SUCCESS
    actor: Actor | None = None
    tenant_id: uuid.UUID | str | None = None
    resource: Resource | None = None
    ip: str | None = None
    user_agent: str | None = None
    request_id: str | None = None
    trace_id: str | None = None
    occurred_at: dt.datetime | None = None
    details: Mapping[str, Any] = field(default_factory=dict)
    subject: str | None = None
    id: uuid.UUID = field(default_factory=uuid7)
