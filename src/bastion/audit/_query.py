"""The audit query: filters over ``bastion_audit_entries``, newest first, with an opaque cursor.

Every filter an operator passes to ``GET /admin/audit`` maps to one indexed
predicate: ``tenant``, ``actor``, ``action`` and the resource pair each have an
index that ends in ``id``, so a filtered page is one index range scan read
backwards, and the cursor (the last id of a page) keeps the next page on the
same index. Ids are UUIDv7, so ``id`` order is the order events were made in.

Pagination is stable under concurrent appends: a new entry has a larger id than
every entry of a page already served, so it never shifts the next page. An
entry committed late (an async writer's batch) with an id below the cursor is
not seen by that walk; a new walk sees it.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import hashlib
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final

from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bastion.audit._event import ACTION_PATTERN, ActorType, Outcome
from bastion.audit._tables import (
    ACTOR_ID_MAX,
    RESOURCE_ID_MAX,
    RESOURCE_TYPE_MAX,
    entries,
)
from bastion.errors import FieldError, InvalidInput

__all__ = [
    "DEFAULT_QUERY_LIMIT",
    "MAX_QUERY_LIMIT",
    "AuditPage",
    "AuditQuery",
    "decode_cursor",
    "encode_cursor",
    "fetch_page",
    "next_query",
    "parse_query",
    "select_entries",
]

DEFAULT_QUERY_LIMIT: Final = 100
MAX_QUERY_LIMIT: Final = 1000

_UUID_BYTES: Final = 16
_CHECK_BYTES: Final = 4
_CURSOR_LENGTH: Final = 27  # base64url of 20 bytes, unpadded
_UUID_VERSION: Final = 7  # entries' ids are UUIDv7
_PREFIX_WILDCARD: Final = ".*"
_LIMIT_DIGITS: Final = 20  # zero padding allowed; int() refuses over 4300 digits


@dataclass(frozen=True, slots=True, kw_only=True)
class AuditQuery:
    """One page's worth of filters; ``None`` leaves a filter out.

    Attributes:
        actor_id: entries whose actor has this id.
        actor_type: entries whose actor is of this type.
        action: entries of this exact action.
        action_prefix: entries whose action starts with this dotted prefix (``auth.``).
        outcome: entries with this outcome.
        resource_type: entries about resources of this type.
        resource_id: entries about the resource with this id.
        tenant_id: entries of this tenant.
        since: entries that occurred at or after this instant (aware).
        until: entries that occurred before this instant (aware).
        limit: most entries in the page (1-1000).
        after: the last id of the previous page; the page holds older entries only.
    """

    actor_id: str | None = None
    actor_type: str | None = None
    action: str | None = None
    action_prefix: str | None = None
    outcome: str | None = None
    resource_type: str | None = None
    resource_id: str | None = None
    tenant_id: uuid.UUID | None = None
    since: dt.datetime | None = None
    until: dt.datetime | None = None
    limit: int = DEFAULT_QUERY_LIMIT
    after: uuid.UUID | None = None

    def filters(self) -> dict[str, str]:
        """Return the filters as query parameters (the export's record, a next link)."""
        values: dict[str, Any] = {
            "actor": self.actor_id,
            "actor_type": self.actor_type,
            "action": self.action if self.action_prefix is None else self.action_prefix + "*",
            "outcome": self.outcome,
            "resource_type": self.resource_type,
            "resource_id": self.resource_id,
            "tenant": self.tenant_id,
            "since": self.since.isoformat() if self.since else None,
            "until": self.until.isoformat() if self.until else None,
        }
        return {name: str(value) for name, value in values.items() if value is not None}


@dataclass(frozen=True, slots=True)
class AuditPage:
    """A page of entries, newest first, and the cursor of the next one (``None``: the last)."""

    rows: Sequence[Any]
    next_cursor: str | None


def encode_cursor(entry_id: uuid.UUID) -> str:
    """Return the opaque cursor that continues a walk after ``entry_id``.

    The id's 16 bytes and a 4-byte check, base64url: the check makes an edited
    cursor a 422 rather than a silently different page. It is no secret and
    needs none: a forged cursor only picks where a walk starts, and the filters
    (a tenant's forced scope included) apply to every page regardless.
    """
    raw = entry_id.bytes
    return base64.urlsafe_b64encode(raw + _check(raw)).rstrip(b"=").decode()


def decode_cursor(cursor: str) -> uuid.UUID:
    """Return the id a cursor made by :func:`encode_cursor` names.

    Raises:
        InvalidInput: the cursor was not made by :func:`encode_cursor` (``query.cursor``).
    """
    raw = b""
    if len(cursor) == _CURSOR_LENGTH and cursor.isascii():
        try:
            raw = base64.urlsafe_b64decode(cursor + "=")
        except (binascii.Error, ValueError):
            raw = b""
    # Re-encoding compares the check and catches non-canonical spellings of the
    # same bytes; the version catches a cursor composed from some other UUID.
    if len(raw) == _UUID_BYTES + _CHECK_BYTES:
        entry_id = uuid.UUID(bytes=raw[:_UUID_BYTES])
        if encode_cursor(entry_id) == cursor and entry_id.version == _UUID_VERSION:
            return entry_id
    raise InvalidInput(
        errors=[FieldError("query.cursor", "invalid", "cursor is not one this API returned.")]
    )


def _check(raw: bytes) -> bytes:
    return hashlib.sha256(b"bastion-audit-cursor\x00" + raw).digest()[:_CHECK_BYTES]


def parse_query(params: Mapping[str, str]) -> AuditQuery:
    """Return the query that the request parameters ask for.

    Args:
        params: the query string's parameters: ``actor``, ``actor_type``, ``action``
            (exact, or a prefix ending in ``.*``: ``auth.*``), ``outcome``,
            ``resource_type``, ``resource_id``, ``tenant`` (a UUID), ``since`` and
            ``until`` (ISO 8601 with an offset), ``limit`` (1-1000, default 100)
            and ``cursor``. Other parameters are ignored.

    Returns:
        The query; every problem found is reported at once.

    Raises:
        InvalidInput: one :class:`~bastion.errors.FieldError` per bad parameter
            (field ``query.<name>``).
    """
    parser = _Parser(params)
    values: dict[str, Any] = {
        "actor_id": parser.text("actor", ACTOR_ID_MAX),
        "actor_type": parser.choice("actor_type", ActorType),
        "outcome": parser.choice("outcome", Outcome),
        "resource_type": parser.text("resource_type", RESOURCE_TYPE_MAX),
        "resource_id": parser.text("resource_id", RESOURCE_ID_MAX),
        "tenant_id": parser.tenant(),
        "since": parser.instant("since"),
        "until": parser.instant("until"),
        "limit": parser.limit(),
        "after": parser.cursor(),
    }
    action, prefix = parser.action()
    values["action_prefix" if prefix else "action"] = action
    if parser.errors:
        raise InvalidInput(errors=parser.errors)
    return AuditQuery(**{name: value for name, value in values.items() if value is not None})


class _Parser:
    """Reads one parameter per method, collecting a FieldError per bad one."""

    def __init__(self, params: Mapping[str, str]) -> None:
        self.params = params
        self.errors: list[FieldError] = []

    def bad(self, name: str, code: str, message: str) -> None:
        self.errors.append(FieldError(f"query.{name}", code, message))

    def text(self, name: str, maximum: int) -> str | None:
        raw = self.params.get(name)
        if raw is None:
            return None
        if not 0 < len(raw) <= maximum:
            self.bad(name, "out_of_range", f"{name} must be 1 to {maximum} characters.")
            return None
        if not _storable(raw):
            # PostgreSQL refuses NUL in text and the driver cannot encode a lone
            # surrogate: either would fail the query itself, so no entry can match.
            self.bad(name, "invalid", f"{name} must not contain NUL or unpaired surrogates.")
            return None
        return raw

    def choice(self, name: str, kind: type[Outcome] | type[ActorType]) -> str | None:
        raw = self.params.get(name)
        choices = [member.value for member in kind]
        if raw is not None and raw not in choices:
            self.bad(name, "invalid", f"{name} must be one of {', '.join(choices)}.")
            return None
        return raw

    def action(self) -> tuple[str | None, bool]:
        raw = self.params.get("action")
        if raw is None:
            return None, False
        if raw.endswith(_PREFIX_WILDCARD):
            # A prefix is one or more whole dotted segments ("auth.*"), never part of a word.
            name = raw[: -len(_PREFIX_WILDCARD)]
            if ACTION_PATTERN.fullmatch(name + ".x"):
                return name + ".", True
        elif ACTION_PATTERN.fullmatch(raw):
            return raw, False
        self.bad("action", "invalid", "action must be a dotted action name or a prefix like auth.*")
        return None, False

    def tenant(self) -> uuid.UUID | None:
        raw = self.params.get("tenant")
        if raw is None:
            return None
        try:
            return uuid.UUID(raw)
        except ValueError:
            self.bad("tenant", "invalid", "tenant must be a UUID.")
            return None

    def instant(self, name: str) -> dt.datetime | None:
        raw = self.params.get(name)
        if raw is None:
            return None
        try:
            value = dt.datetime.fromisoformat(raw)
        except ValueError:
            self.bad(name, "invalid", f"{name} must be an ISO 8601 date and time.")
            return None
        if value.tzinfo is None:
            self.bad(name, "naive", f"{name} must carry a UTC offset (Z or +hh:mm).")
            return None
        try:
            return value.astimezone(dt.UTC)
        except OverflowError:
            # 0001-01-01T00:00+01:00 or 9999-12-31T23:59-01:00: no such UTC instant.
            self.bad(name, "out_of_range", f"{name} must fall between the years 1 and 9999 in UTC.")
            return None

    def limit(self) -> int | None:
        raw = self.params.get("limit")
        if raw is None or (
            len(raw) <= _LIMIT_DIGITS
            and raw.isascii()
            and raw.isdigit()
            and 1 <= int(raw) <= MAX_QUERY_LIMIT
        ):
            return None if raw is None else int(raw)
        self.bad(
            "limit", "out_of_range", f"limit must be a whole number from 1 to {MAX_QUERY_LIMIT}."
        )
        return None

    def cursor(self) -> uuid.UUID | None:
        raw = self.params.get("cursor")
        if raw is None:
            return None
        try:
            return decode_cursor(raw)
        except InvalidInput as exc:
            self.errors.extend(exc.errors)
            return None


def _storable(text: str) -> bool:
    """Whether ``text`` can be a bound parameter on every database: UTF-8, no NUL."""
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return "\x00" not in text


def select_entries(query: AuditQuery) -> Select[Any]:
    """Return the statement of one page: the filtered entries, newest first, one extra row.

    The extra row says whether a next page exists without a count.
    """
    c = entries.c
    statement = select(entries).order_by(c.id.desc()).limit(query.limit + 1)
    equal = {
        c.actor_id: query.actor_id,
        c.actor_type: query.actor_type,
        c.action: query.action,
        c.outcome: query.outcome,
        c.resource_type: query.resource_type,
        c.resource_id: query.resource_id,
        c.tenant_id: query.tenant_id,
    }
    for column, value in equal.items():
        if value is not None:
            statement = statement.where(column == value)
    if query.action_prefix is not None:
        # LIKE, not a range: linguistic collations (en_US) ignore "." when
        # comparing, so "auth." <= action < "auth/" would miss "auth.login".
        statement = statement.where(c.action.startswith(query.action_prefix, autoescape=True))
    if query.since is not None:
        statement = statement.where(c.occurred_at >= query.since)
    if query.until is not None:
        statement = statement.where(c.occurred_at < query.until)
    if query.after is not None:
        statement = statement.where(c.id < query.after)
    return statement


async def fetch_page(executor: AsyncSession | AsyncConnection, query: AuditQuery) -> AuditPage:
    """Return the page of entries ``query`` asks for, with the next page's cursor.

    Args:
        executor: a session or connection to read with.
        query: the filters, the limit and the cursor.
    """
    rows = (await executor.execute(select_entries(query))).all()
    if len(rows) <= query.limit:
        return AuditPage(rows, None)
    page = rows[: query.limit]
    return AuditPage(page, encode_cursor(page[-1].id))


def next_query(query: AuditQuery, page: AuditPage) -> AuditQuery | None:
    """Return the query of the page after ``page``, or ``None`` when it was the last."""
    if page.next_cursor is None:
        return None
    return replace(query, after=page.rows[-1].id)
