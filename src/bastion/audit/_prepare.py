"""Event preparation: an AuditEvent checked, completed from the request, and ready to append.

Everything that can refuse an event happens here, before anything is stored or
buffered, so a bad event raises ``ValueError`` in the caller and never poisons a
batch: the action must be in the catalogue, the outcome known, ``occurred_at``
timezone-aware, the tenant a UUID, every text within its column, and
``details`` a JSON object whose canonical form fits ``audit.details_max_bytes``.

``details`` values that JSON has no type for are written as text: datetimes
and dates in ISO 8601, UUIDs in their canonical form, enums as their value,
decimals exactly as ``str()`` prints them. Anything else is refused, so what is
hashed never depends on a ``repr()``. Values are masked as logs mask them (keys
such as ``password``, ``token``; tokens embedded in text), then written as
canonical JSON: sorted keys, no spaces, UTF-8 as is, no NaN.
"""

from __future__ import annotations

import datetime as dt
import decimal
import enum
import json
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final

from bastion.audit._catalogue import ActionCatalogue
from bastion.audit._event import Actor, ActorType, AuditEvent, Outcome
from bastion.audit._subjects import anonymous_subject
from bastion.audit._tables import (
    ACTOR_ID_MAX,
    REQUEST_ID_MAX,
    RESOURCE_ID_MAX,
    RESOURCE_TYPE_MAX,
    SUBJECT_MAX,
    TRACE_ID_MAX,
)
from bastion.context import current_context
from bastion.observability._logging import MASK, LogMasker
from bastion.settings import AuditPartition

__all__ = ["EntryPreparer", "PreparedEntry", "log_id_for"]

GLOBAL_LOG: Final = "global"
SYSTEM_LOG: Final = "system"

_ANONYMOUS: Final = Actor(ActorType.ANONYMOUS)
_OUTCOMES: Final = {outcome.value: outcome.value for outcome in Outcome}
_EMPTY_DETAILS: Final = "{}"
_SECRET_KEY_CACHE: Final = 4096
_CANONICAL_JSON: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
).encode
_LIMITS: Final = (
    ("actor.id", ACTOR_ID_MAX),
    ("resource.type", RESOURCE_TYPE_MAX),
    ("resource.id", RESOURCE_ID_MAX),
    ("request_id", REQUEST_ID_MAX),
    ("trace_id", TRACE_ID_MAX),
    ("subject", SUBJECT_MAX),
)


def log_id_for(partition: AuditPartition, tenant_id: uuid.UUID | None) -> str:
    """Return the log an entry goes to: ``global``, or ``tenant/<id>`` / ``system`` by tenant."""
    if partition == "global":
        return GLOBAL_LOG
    return SYSTEM_LOG if tenant_id is None else f"tenant/{tenant_id}"


@dataclass(slots=True)
class PreparedEntry:
    """An event ready to append: every column but ``seq``, personal fields still in clear.

    The append seals ``email``, ``ip`` and ``user_agent`` with the subject's key and
    assigns ``seq``; the object itself is never changed, so a batch whose
    transaction failed is appended again as it was.
    """

    log_id: str
    id: uuid.UUID
    occurred_at: dt.datetime
    action: str
    outcome: str
    actor_type: str
    actor_id: str | None
    tenant_id: uuid.UUID | None
    resource_type: str | None
    resource_id: str | None
    request_id: str | None
    trace_id: str | None
    subject: str
    email: str | None
    ip: str | None
    user_agent: str | None
    details: str

    @property
    def personal(self) -> bool:
        """Whether the entry carries a personal field to seal."""
        return self.email is not None or self.ip is not None or self.user_agent is not None


class EntryPreparer:
    """Turns :class:`AuditEvent` objects into :class:`PreparedEntry` objects, or refuses them.

    Args:
        catalogue: the actions that may be recorded.
        partition: ``audit.partition``, which names each entry's log.
        details_max_bytes: the largest canonical ``details``, in UTF-8 bytes.
        mask_keys: key fragments masked beyond the logs' own.
        clock: the current time, aware; ``occurred_at`` of events that give none.
    """

    __slots__ = ("_catalogue", "_clock", "_details_max", "_masker", "_partition", "_secret_keys")

    def __init__(
        self,
        *,
        catalogue: ActionCatalogue,
        partition: AuditPartition,
        details_max_bytes: int,
        mask_keys: tuple[str, ...] = (),
        clock: Callable[[], dt.datetime],
    ) -> None:
        self._catalogue = catalogue
        self._partition: AuditPartition = partition
        self._details_max = details_max_bytes
        self._masker = LogMasker(mask_keys)
        # The masker's verdict per key: details use a few keys over and over, and
        # matching every fragment against each was a fifth of preparing an event.
        self._secret_keys: dict[str, bool] = {}
        self._clock = clock

    def prepare(self, event: AuditEvent) -> PreparedEntry:
        """Check ``event`` and fill what it leaves out from the current request.

        Raises:
            ValueError: the event cannot be recorded; the message names the field.
        """
        self._catalogue.check(event.action)
        outcome = _OUTCOMES.get(str(event.outcome))
        if outcome is None:
            raise ValueError(
                f"audit outcome {event.outcome!r} is not one of {', '.join(_OUTCOMES)}"
            )
        context = current_context()
        actor = event.actor or _context_actor(context)
        tenant = event.tenant_id
        if tenant is None and context is not None:
            tenant = context.tenant_id
        tenant_id = _tenant(tenant)
        occurred_at = self._occurred_at(event.occurred_at)
        resource = event.resource
        entry = PreparedEntry(
            log_id=log_id_for(self._partition, tenant_id),
            id=event.id,
            occurred_at=occurred_at,
            action=event.action,
            outcome=outcome,
            actor_type=_actor_type(actor),
            actor_id=actor.id,
            tenant_id=tenant_id,
            resource_type=resource.type if resource is not None else None,
            resource_id=resource.id if resource is not None else None,
            request_id=_or_context(event.request_id, context, "request_id"),
            trace_id=_or_context(event.trace_id, context, "trace_id"),
            subject=event.subject or _subject(actor, occurred_at),
            email=actor.email,
            ip=_or_context(event.ip, context, "client_ip"),
            user_agent=_or_context(event.user_agent, context, "user_agent"),
            details=self._details(event.details),
        )
        _check_lengths(entry)
        return entry

    def _occurred_at(self, value: dt.datetime | None) -> dt.datetime:
        if value is None:
            value = self._clock()
        if value.tzinfo is dt.UTC:
            return value
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("audit occurred_at must be timezone-aware")
        return value.astimezone(dt.UTC)

    def _details(self, details: Mapping[str, Any]) -> str:
        if not isinstance(details, Mapping):
            raise ValueError(  # noqa: TRY004 -- one error type for every refused event
                "audit details must be a JSON object (a mapping of str keys)"
            )
        if not details:
            return _EMPTY_DETAILS
        try:
            plain = self._plain(details)
        except _Unjsonable as exc:
            where = "".join(exc.path)
            raise ValueError(f"audit details{where} {exc.problem}") from None
        try:
            text = _CANONICAL_JSON(plain)
        except ValueError as exc:
            raise ValueError(
                "audit details hold NaN or infinity, which JSON has no form for"
            ) from exc
        size = len(text.encode())
        if size > self._details_max:
            raise ValueError(
                f"audit details are {size} bytes as canonical JSON, above "
                f"audit.details_max_bytes ({self._details_max})"
            )
        return text

    def _plain(self, value: Any) -> Any:  # noqa: PLR0911 -- one return per kind of value
        # A fresh tree of JSON types, masked as logs are: the caller's objects stay untouched.
        # The path to a bad value is built only on the way out of an error: building it
        # for every value was a tenth of preparing an event.
        if isinstance(value, str):
            return self._masker.mask_value(value)
        if value is None or isinstance(value, bool | int | float):
            return value.value if isinstance(value, enum.Enum) else value
        if isinstance(value, Mapping):
            return self._plain_mapping(value)
        if isinstance(value, list | tuple):
            try:
                return [self._plain(item) for item in value]
            except _Unjsonable as exc:
                exc.path.insert(0, "[]")
                raise
        if isinstance(value, enum.Enum):
            return self._plain(value.value)
        if isinstance(value, dt.datetime | dt.date | dt.time):
            return value.isoformat()
        if isinstance(value, uuid.UUID | decimal.Decimal):
            return str(value)
        raise _Unjsonable(f"is a {type(value).__name__}, which JSON has no form for")

    def _plain_mapping(self, value: Mapping[Any, Any]) -> dict[str, Any]:
        plain: dict[str, Any] = {}
        secret_keys = self._secret_keys
        mask = self._masker.mask_value
        for key, item in value.items():
            if not isinstance(key, str):
                raise _Unjsonable(f"has a key that is not text: {type(key).__name__}")
            if item is None:
                plain[key] = None
                continue
            secret = secret_keys.get(key)
            if secret is None:
                secret = self._is_secret(key)
            if secret:
                plain[key] = MASK
                continue
            # Text and numbers, most values, without a call each (exact types only:
            # an enum of int or str takes the general path).
            kind = type(item)
            if kind is str:
                plain[key] = mask(item)
            elif kind is int or kind is float or kind is bool:
                plain[key] = item
            else:
                try:
                    plain[key] = self._plain(item)
                except _Unjsonable as exc:
                    exc.path.insert(0, f".{key}")
                    raise
        return plain

    def _is_secret(self, key: str) -> bool:
        secret = self._secret_keys.get(key)
        if secret is None:
            if len(self._secret_keys) >= _SECRET_KEY_CACHE:
                self._secret_keys.clear()
            secret = self._secret_keys[key] = self._masker.is_secret_key(key)
        return secret


class _Unjsonable(Exception):
    """A details value JSON cannot hold; becomes the ValueError naming its path."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem
        self.path: list[str] = []


def _context_actor(context: Any) -> Actor:
    if context is None:
        return _ANONYMOUS
    if context.user_id is not None:
        return Actor(ActorType.USER, str(context.user_id))
    if context.api_key_id is not None:
        return Actor(ActorType.API_KEY, str(context.api_key_id))
    return _ANONYMOUS


def _actor_type(actor: Actor) -> str:
    if type(actor.type) is ActorType:
        return actor.type.value
    try:
        return ActorType(actor.type).value
    except ValueError:
        raise ValueError(f"audit actor.type {actor.type!r} is not an ActorType") from None


def _or_context(value: str | None, context: Any, name: str) -> str | None:
    if value is not None or context is None:
        return value
    # getattr: user_agent joins the request context with the audit trail's wiring.
    found = getattr(context, name, None)
    return None if found is None else str(found)


def _tenant(value: uuid.UUID | str | None) -> uuid.UUID | None:
    if value is None or isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(str(value))
    except ValueError:
        raise ValueError("audit tenant_id is not a UUID") from None


def _subject(actor: Actor, occurred_at: dt.datetime) -> str:
    if actor.type is ActorType.USER and actor.id:
        return f"user:{actor.id}"
    return anonymous_subject(occurred_at)


def _check_lengths(entry: PreparedEntry) -> None:
    values = (
        entry.actor_id,
        entry.resource_type,
        entry.resource_id,
        entry.request_id,
        entry.trace_id,
        entry.subject,
    )
    for (name, limit), value in zip(_LIMITS, values, strict=True):
        if value is None:
            continue
        if len(value) > limit:
            raise ValueError(f"audit {name} is longer than {limit} characters")
        if "\x00" in value:
            # PostgreSQL text cannot hold NUL: refused here, not by the batch's INSERT.
            raise ValueError(f"audit {name} contains a NUL character")
