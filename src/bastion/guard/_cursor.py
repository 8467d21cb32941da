"""Cursor (keyset) pagination: opaque, tamper-evident cursors and the keyset ``WHERE``.

A cursor holds the sort-key values of the last row a client saw. The next page
is the rows after those values in the sort order, which the database finds
through an index however deep the client has gone, and which neither repeats
nor skips a row when rows are inserted or deleted between requests (unlike
``OFFSET``).

The token is ``base64url(payload) "." base64url(mac)``: the payload is compact
JSON ``{"v": version, "o": order fingerprint, "k": [values]}``, and the mac is
HMAC-SHA256 over it (truncated to 128 bits) with the application's key. A cursor
that was altered, truncated, made for another ordering (or another table), or
signed with another key is refused with 422 ``INVALID_INPUT`` (field
``query.cursor``, code ``invalid_cursor``). The values are readable by anyone
who decodes the token; they are the sort keys of a row the client was shown.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import hashlib
import hmac
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Generic, TypeVar, overload

import orjson
from fastapi import Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import ColumnElement, Select, and_, literal, or_, tuple_
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import HTTPConnection

from bastion.errors import FieldError, InvalidInput
from bastion.guard._query import (
    PageSizeQuery,
    SortColumn,
    SortSpec,
    column_of,
    page_bounds,
    page_size_error,
    query_link,
)

__all__ = [
    "CURSOR_MAX_CHARS",
    "CURSOR_VERSION",
    "CursorLinks",
    "CursorPage",
    "CursorQuery",
    "cursor_paginate",
    "cursor_query",
    "decode_cursor",
    "encode_cursor",
    "keyset_condition",
    "order_fingerprint",
]

T = TypeVar("T")

CURSOR_VERSION: Final = 1
"""Format version written into every cursor; others are refused."""
CURSOR_MAX_CHARS: Final = 2048
"""Longest cursor accepted; a longer one is refused before it is decoded."""
KEY_MIN_BYTES: Final = 16
_MAC_BYTES: Final = 16
_DOMAIN: Final = b"bastion.guard.cursor\x00"

OrderKeys = Sequence[tuple[SortColumn, bool]]
"""An ordering as ``(column, descending)`` pairs, the last one unique."""


def _invalid(
    message: str = "This cursor is not valid for this list; start from the first page.",
) -> InvalidInput:
    return InvalidInput(
        "The cursor is not valid.",
        errors=[FieldError("query.cursor", "invalid_cursor", message)],
    )


def _keys(order: SortSpec | OrderKeys) -> list[tuple[ColumnElement[Any], bool]]:
    if isinstance(order, SortSpec):
        return [(key.column, key.descending) for key in order.keys]
    keys = [(column_of(column), bool(descending)) for column, descending in order]
    if not keys:
        raise ValueError("a keyset ordering needs at least one column")
    for column, _ in keys:
        if getattr(column, "nullable", False):
            raise ValueError(f"sort column {column} is nullable; keyset columns must be NOT NULL")
    return keys


def order_fingerprint(order: SortSpec | OrderKeys) -> str:
    """Return a short hash of an ordering (columns, directions), stored in its cursors."""
    text = "\n".join(f"{column}:{'d' if desc else 'a'}" for column, desc in _keys(order))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _key_bytes(key: bytes | str) -> bytes:
    raw = key.encode() if isinstance(key, str) else bytes(key)
    if len(raw) < KEY_MIN_BYTES:
        raise ValueError(f"the cursor key must be at least {KEY_MIN_BYTES} bytes of secret")
    return raw


def _mac(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, _DOMAIN + payload, hashlib.sha256).digest()[:_MAC_BYTES]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    # Strict alphabet: b64decode would otherwise drop stray characters silently.
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)


def _pack(value: Any) -> Any:
    # Tagged so that a value comes back as the type it left as: a string that
    # looks like a date stays a string.
    if value is None:
        raise ValueError("a sort column held NULL; keyset columns must be NOT NULL")
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, dt.datetime):
        return ["t", value.isoformat()]
    if isinstance(value, dt.date):
        return ["d", value.isoformat()]
    if isinstance(value, uuid.UUID):
        return ["u", value.hex]
    if isinstance(value, decimal.Decimal):
        return ["n", str(value)]
    if isinstance(value, float):
        return ["f", value.hex()]
    raise TypeError(f"cannot put a {type(value).__name__} into a cursor")


_UNPACK: Final[dict[str, Callable[[str], Any]]] = {
    "t": dt.datetime.fromisoformat,
    "d": dt.date.fromisoformat,
    "u": uuid.UUID,
    "n": decimal.Decimal,
    "f": float.fromhex,
}


def _unpack(value: Any) -> Any:
    if isinstance(value, bool | int | str):
        return value
    if isinstance(value, list) and len(value) == 2:  # noqa: PLR2004 -- a [tag, text] pair
        tag, text = value
        reader = _UNPACK.get(tag) if isinstance(tag, str) else None
        if reader is not None and isinstance(text, str):
            return reader(text)
    raise ValueError("not a cursor value")


def encode_cursor(values: Sequence[Any], *, key: bytes | str, order: SortSpec | OrderKeys) -> str:
    """Return the cursor for the row whose sort-key values are ``values``.

    Raises:
        ValueError: a value is ``NULL`` or the key is shorter than 16 bytes.
        TypeError: a value's type cannot be carried.
    """
    payload = orjson.dumps(
        {"v": CURSOR_VERSION, "o": order_fingerprint(order), "k": [_pack(v) for v in values]}
    )
    return f"{_b64(payload)}.{_b64(_mac(_key_bytes(key), payload))}"


def decode_cursor(cursor: str, *, key: bytes | str, order: SortSpec | OrderKeys) -> list[Any]:
    """Return the sort-key values a cursor carries, after checking its mac and ordering.

    Raises:
        InvalidInput: the cursor was altered, garbled, signed with another key, or
            made for another ordering (field ``query.cursor``, code ``invalid_cursor``).
    """
    secret = _key_bytes(key)
    if len(cursor) > CURSOR_MAX_CHARS or cursor.count(".") != 1:
        raise _invalid()
    encoded, _, signature = cursor.partition(".")
    try:
        payload, mac = _unb64(encoded), _unb64(signature)
    except (binascii.Error, ValueError):
        raise _invalid() from None
    if not hmac.compare_digest(mac, _mac(secret, payload)):
        raise _invalid()
    # Past the mac the payload is one this application wrote; the checks below
    # guard against its own older formats and other orderings.
    try:
        document = orjson.loads(payload)
    except orjson.JSONDecodeError:
        raise _invalid() from None
    keys = _keys(order)
    if (
        not isinstance(document, dict)
        or document.get("v") != CURSOR_VERSION
        or document.get("o") != order_fingerprint(keys)
        or not isinstance(document.get("k"), list)
        or len(document["k"]) != len(keys)
    ):
        raise _invalid(
            "This cursor belongs to another ordering or version of this list; "
            "start from the first page."
        )
    try:
        return [_unpack(value) for value in document["k"]]
    except (ValueError, TypeError, decimal.InvalidOperation):
        raise _invalid() from None


def keyset_condition(order: SortSpec | OrderKeys, values: Sequence[Any]) -> ColumnElement[bool]:
    """Return the ``WHERE`` that selects the rows after ``values`` in ``order``.

    One row-value comparison ``(a, b) > (:x, :y)`` when every key goes the same
    way (an index on the sort columns serves it as one range scan); otherwise
    the expanded ``a > :x OR (a = :x AND b < :y) OR ...``.
    """
    keys = _keys(order)
    if len(values) != len(keys):
        raise ValueError("one value per sort column is needed")
    directions = {descending for _, descending in keys}
    if len(directions) == 1:
        columns = tuple_(*(column for column, _ in keys))
        bound = tuple_(*(literal(v, type_=c.type) for (c, _), v in zip(keys, values, strict=True)))
        return columns < bound if directions.pop() else columns > bound
    alternatives = []
    for index, (column, descending) in enumerate(keys):
        equal = [keys[i][0] == values[i] for i in range(index)]
        beyond = column < values[index] if descending else column > values[index]
        alternatives.append(and_(*equal, beyond))
    return or_(*alternatives)


class CursorLinks(BaseModel):
    """Links of a cursor page, as paths relative to the API's origin."""

    self: str
    next: str | None = Field(description="``null`` on the last page.")


class CursorPage(BaseModel, Generic[T]):
    """One page of a list walked by cursor."""

    items: list[T]
    next_cursor: str | None = Field(
        description="Pass as ``cursor`` for the next page; ``null`` on the last page."
    )
    links: CursorLinks | None = None


@dataclass(frozen=True, slots=True)
class CursorQuery:
    """A validated cursor-page request: the cursor (``None``: first page) and page size."""

    cursor: str | None = None
    limit: int = 50


async def cursor_query(
    request: Request,
    cursor: Annotated[
        str | None,
        Query(
            description="Opaque cursor from the previous page's ``next_cursor``; "
            "omit for the first page.",
            json_schema_extra={"maxLength": CURSOR_MAX_CHARS},
        ),
    ] = None,
    limit: PageSizeQuery = None,
) -> CursorQuery:
    """Read ``cursor`` and ``limit`` (FastAPI dependency).

    Raises:
        InvalidInput: ``limit`` outside 1..``guard.page_size_max`` (with ``limit``
            in the error), or a cursor longer than :data:`CURSOR_MAX_CHARS`.
    """
    default_size, max_size = page_bounds(request)
    size = default_size if limit is None else limit
    size_error = page_size_error("query.limit", size, max_size, "At least 1 item.")
    if size_error is not None:
        raise InvalidInput(errors=[size_error])
    if cursor is not None and len(cursor) > CURSOR_MAX_CHARS:
        raise _invalid()
    return CursorQuery(cursor, size)


@overload
async def cursor_paginate(
    session: AsyncSession,
    statement: Select[Any],
    *,
    order: SortSpec | OrderKeys,
    limit: int,
    cursor: str | None,
    key: bytes | str,
    request: HTTPConnection | None = None,
    item: None = None,
) -> CursorPage[Any]: ...


@overload
async def cursor_paginate(
    session: AsyncSession,
    statement: Select[Any],
    *,
    order: SortSpec | OrderKeys,
    limit: int,
    cursor: str | None,
    key: bytes | str,
    request: HTTPConnection | None = None,
    item: Callable[[Any], T],
) -> CursorPage[T]: ...


async def cursor_paginate(
    session: AsyncSession,
    statement: Select[Any],
    *,
    order: SortSpec | OrderKeys,
    limit: int,
    cursor: str | None,
    key: bytes | str,
    request: HTTPConnection | None = None,
    item: Callable[[Any], Any] | None = None,
) -> CursorPage[Any]:
    """Return the page of ``statement`` after ``cursor`` in ``order`` (keyset pagination).

    One query, no ``COUNT`` and no ``OFFSET``: the cost of a page does not grow
    with its depth. Rows inserted while a client walks the list are seen when
    they sort after its position; rows that existed throughout are each seen
    exactly once.

    Example:
        >>> page = await cursor_paginate(
        ...     session, select(Event).where(Event.tenant_id == tenant),
        ...     order=sort, limit=query.limit, cursor=query.cursor,
        ...     key=cursor_key, request=request, item=EventOut.model_validate)

    Args:
        session: the session to query in.
        statement: the filtered ``SELECT`` without ordering (it is replaced); one
            entity or column gives items of that, several give tuples.
        order: a :class:`SortSpec`, or ``(column, descending)`` pairs whose last
            column is unique; every column must be NOT NULL.
        limit: the most items on the page.
        cursor: the client's cursor, or ``None`` for the first page.
        key: the secret the cursors are signed with (at least 16 bytes); pass a
            value derived from the application's secrets, the same on every
            instance, so cursors stay valid across instances and restarts.
        request: when given, ``links`` are built from its path and parameters.
        item: turns each row into the item returned (``Model.model_validate``).

    Raises:
        InvalidInput: the cursor is invalid (``query.cursor``, ``invalid_cursor``).
        ValueError: ``limit`` is below 1, or a sort column is nullable or held NULL.
    """
    if limit < 1:
        raise ValueError("limit must be at least 1")
    keys = _keys(order)
    query = statement.order_by(None).order_by(
        *(column.desc() if descending else column.asc() for column, descending in keys)
    )
    if cursor is not None:
        query = query.where(keyset_condition(keys, decode_cursor(cursor, key=key, order=keys)))
    width = len(statement.column_descriptions)
    query = query.add_columns(
        *(column.label(f"bastion_cursor_{index}") for index, (column, _) in enumerate(keys))
    ).limit(limit + 1)
    rows = (await session.execute(query)).all()
    next_cursor = None
    if len(rows) > limit:
        rows = rows[:limit]
        next_cursor = encode_cursor(rows[-1][width:], key=key, order=keys)
    chosen = [row[0] if width == 1 else tuple(row[:width]) for row in rows]
    items = [item(row) for row in chosen] if item is not None else chosen
    links = None
    if request is not None:
        links = CursorLinks(
            self=query_link(request, {}),
            next=query_link(request, {"cursor": next_cursor}) if next_cursor else None,
        )
    return CursorPage[Any](items=items, next_cursor=next_cursor, links=links)
