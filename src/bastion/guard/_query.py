"""Sorting, filtering and offset pagination for list endpoints, safe by construction.

Every name a client may send (a sort field, a filter field, an operator) is a key
of a mapping the application wrote; the SQL comes from the mapping's values, never
from the request. Values are parsed by the declared type and reach the database as
bound parameters only.
"""

from __future__ import annotations

import datetime as dt
import inspect
import math
import re
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Annotated, Any, Final, Generic, Literal, TypeVar, cast, overload
from urllib.parse import quote, quote_from_bytes, urlencode

from fastapi import Query, Request
from pydantic import BaseModel, Field
from sqlalchemy import (
    BigInteger,
    ColumnElement,
    Integer,
    Select,
    SmallInteger,
    String,
    func,
    literal,
    select,
)
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import QueryableAttribute
from sqlalchemy.sql.elements import UnaryExpression
from starlette.requests import HTTPConnection

from bastion.errors import ErrorCode, FieldError, InvalidInput

__all__ = [
    "DEFAULT_PAGE_SIZE",
    "DEFAULT_PAGE_SIZE_MAX",
    "FILTER_IN_MAX",
    "PAGE_MAX",
    "QUERY_ERROR_CODES",
    "SORT_FIELDS_MAX",
    "Filter",
    "FilterParameters",
    "FilterSet",
    "Page",
    "PageLinks",
    "PageSizeQuery",
    "Pagination",
    "SortKey",
    "SortParameter",
    "SortSpec",
    "column_of",
    "filters",
    "link_header",
    "page_bounds",
    "page_links",
    "page_size_error",
    "paginate",
    "pagination",
    "query_link",
    "sorting",
]

T = TypeVar("T")

SortColumn = ColumnElement[Any] | QueryableAttribute[Any]
"""A column the application allows: ``Document.title`` or ``table.c.title``."""

QUERY_ERROR_CODES: Final = (ErrorCode.INVALID_INPUT, ErrorCode.INPUT_TOO_LONG)
"""Codes a list endpoint using these helpers can answer with (422); pass them to
:func:`bastion.errors.problem_responses` so the OpenAPI document lists them."""

SORT_FIELDS_MAX: Final = 5
"""Most fields one ``sort`` parameter may name (the tiebreak is not counted)."""
# Longer than five maximal items could ever be: a cheap refusal before any parsing.
_SORT_MAX_CHARS: Final = 512
_NAME: Final = r"[a-z][a-z0-9_]*"
_NAME_RE: Final = re.compile(_NAME)
_SORT_ITEM_RE: Final = re.compile(rf"([+-]?)({_NAME})")

DEFAULT_PAGE_SIZE: Final = 50
"""Items per page when neither the request nor ``guard.page_size_default`` says."""
DEFAULT_PAGE_SIZE_MAX: Final = 1000
"""Largest page size when ``guard.page_size_max`` is not available."""
PAGE_MAX: Final = 100_000
"""Highest page number: deeper offsets make the database skip that many rows on every
request (and SQLite's OFFSET is a signed 64-bit integer); use cursor pagination instead."""

FILTER_IN_MAX: Final = 100
"""Most values one ``in`` filter may list."""
_FILTER_KEY_RE: Final = re.compile(rf"filter\[({_NAME})\](?:\[([a-z]+)\])?")
_INT_RE: Final = re.compile(r"[+-]?[0-9]{1,19}")
_TRUE: Final = frozenset({"true", "1"})
_FALSE: Final = frozenset({"false", "0"})


def column_of(column: SortColumn) -> ColumnElement[Any]:
    """Return the SQL expression of an ORM attribute, or the expression itself."""
    clause = getattr(column, "__clause_element__", None)
    if clause is not None:
        return cast("ColumnElement[Any]", clause())
    return column  # type: ignore[return-value]  # not an attribute: already an expression


def _is_nullable(column: ColumnElement[Any]) -> bool:
    # Table columns (and the annotated copies ORM attributes hand out) know whether
    # they are nullable; labels, functions and literals do not, and pass.
    return bool(getattr(column, "nullable", False))


def _check_name(name: str, what: str) -> None:
    if _NAME_RE.fullmatch(name) is None:
        raise ValueError(f"{what} {name!r} must match {_NAME}")


# ---------------------------------------------------------------------------------- sorting


@dataclass(frozen=True, slots=True)
class SortKey:
    """One column of an ordering: its public name, its expression and its direction."""

    name: str
    column: ColumnElement[Any]
    descending: bool = False

    @property
    def clause(self) -> UnaryExpression[Any]:
        """The ``ORDER BY`` item."""
        return self.column.desc() if self.descending else self.column.asc()


@dataclass(frozen=True, slots=True)
class SortSpec:
    """A validated ordering: the requested fields, then the tiebreak column.

    Attributes:
        keys: the columns in order, the tiebreak last, so the order is total.
        fields: the requested fields as given (``("title", "-created_at")``), without
            the tiebreak; a leading ``+`` is dropped.
    """

    keys: tuple[SortKey, ...]
    fields: tuple[str, ...] = field(default=())

    @property
    def order_by(self) -> tuple[UnaryExpression[Any], ...]:
        """The ``ORDER BY`` clauses: ``statement.order_by(*spec.order_by)``."""
        return tuple(key.clause for key in self.keys)

    @property
    def value(self) -> str:
        """The ``sort`` parameter that asks for this ordering."""
        return ",".join(self.fields)


def _sort_error(allowed: Iterable[str], reason: str) -> InvalidInput:
    names = ", ".join(sorted(allowed))
    message = (
        f"{reason} Sort by up to {SORT_FIELDS_MAX} of: {names}, separated by commas; "
        "prefix a field with '-' for descending order."
    )
    return InvalidInput(
        "The sort parameter is not valid.",
        errors=[FieldError("query.sort", "invalid_sort", message)],
    )


class SortParameter:
    """The ``sort`` query parameter of one list: a FastAPI dependency made by :func:`sorting`.

    Attributes:
        columns: the allowed field names and their columns.
        tiebreak: the column that ends every ordering.
        default: the ordering used when the request names none.
        pattern: the regular expression the OpenAPI document gives for the parameter.
    """

    def __init__(
        self, allowed: Mapping[str, SortColumn], default: str, tiebreak: SortColumn
    ) -> None:
        if not allowed:
            raise ValueError("sorting() needs at least one allowed field")
        columns: dict[str, ColumnElement[Any]] = {}
        for name, column in allowed.items():
            _check_name(name, "sort field")
            expression = column_of(column)
            if _is_nullable(expression):
                # NULLs sort first on SQLite and last on PostgreSQL, and a keyset
                # comparison with NULL is never true: such a column breaks both.
                raise ValueError(
                    f"sort field {name!r} is a nullable column; sort columns must be NOT NULL"
                )
            columns[name] = expression
        self.columns: Mapping[str, ColumnElement[Any]] = columns
        self.tiebreak = column_of(tiebreak)
        if _is_nullable(self.tiebreak):
            raise ValueError("the tiebreak column must be NOT NULL (and unique)")
        self.default = self.parse(default, fault=ValueError)
        alternatives = "|".join(sorted(columns))
        item = rf"[+-]?(?:{alternatives})"
        self.pattern = rf"^{item}(?:,{item}){{0,{SORT_FIELDS_MAX - 1}}}$"
        self.description = (
            f"Order of the results: up to {SORT_FIELDS_MAX} comma-separated fields among "
            f"{', '.join(sorted(columns))}; prefix a field with '-' for descending order "
            f"(a '+' must be sent as %2B). Default: {default}."
        )
        self.__signature__ = inspect.Signature(
            [
                inspect.Parameter(
                    "sort",
                    inspect.Parameter.KEYWORD_ONLY,
                    default=None,
                    # ``str`` with a None default: the schema is a plain optional string.
                    annotation=Annotated[
                        str,
                        Query(
                            description=self.description,
                            json_schema_extra={"pattern": self.pattern},
                            examples=[default],
                        ),
                    ],
                )
            ],
            return_annotation=SortSpec,
        )

    async def __call__(self, *, sort: str | None = None) -> SortSpec:
        if sort is None:
            return self.default
        return self.parse(sort)

    def parse(self, sort: str, *, fault: type[Exception] | None = None) -> SortSpec:
        """Parse a ``sort`` value; raise :class:`InvalidInput` (or ``fault``) when invalid."""
        try:
            return self._parse(sort)
        except InvalidInput:
            if fault is None:
                raise
            raise fault(f"invalid sort {sort!r}") from None

    def _parse(self, sort: str) -> SortSpec:
        if len(sort) > _SORT_MAX_CHARS:
            raise _sort_error(self.columns, "The sort parameter is too long.")
        items = sort.split(",")
        if len(items) > SORT_FIELDS_MAX:
            raise _sort_error(self.columns, f"At most {SORT_FIELDS_MAX} fields may be named.")
        keys: list[SortKey] = []
        fields: list[str] = []
        for position, item in enumerate(items, start=1):
            # fullmatch over ASCII classes: lookalike letters, spaces, quotes,
            # parentheses and semicolons all fail here, before any lookup.
            matched = _SORT_ITEM_RE.fullmatch(item)
            if matched is None:
                raise _sort_error(self.columns, f"Item {position} is not a field name.")
            sign, name = matched.groups()
            column = self.columns.get(name)
            if column is None:
                raise _sort_error(self.columns, f"Item {position} is not a sortable field.")
            if any(key.name == name for key in keys):
                raise _sort_error(self.columns, f"Item {position} repeats a field.")
            descending = sign == "-"
            keys.append(SortKey(name, column, descending))
            fields.append(f"-{name}" if descending else name)
        if not any(key.column.compare(self.tiebreak) for key in keys):
            # The tiebreak follows the last field's direction: a keyset comparison
            # over columns that all go one way is one row-value comparison.
            keys.append(SortKey("", self.tiebreak, keys[-1].descending))
        return SortSpec(tuple(keys), tuple(fields))


def sorting(
    allowed: Mapping[str, SortColumn], *, default: str, tiebreak: SortColumn
) -> SortParameter:
    """Make a FastAPI dependency that reads ``sort=field,-field`` into a :class:`SortSpec`.

    Only the mapping's keys are accepted; the ``ORDER BY`` uses the mapping's
    columns, so nothing of the request is ever written into SQL. The tiebreak
    (a unique, NOT NULL column such as the primary key) is appended unless the
    client already sorts by it, so equal values never make pages overlap.

    Example:
        >>> DocumentSort = Annotated[SortSpec, Depends(sorting(
        ...     {"title": Document.title, "created_at": Document.created_at},
        ...     default="-created_at", tiebreak=Document.id))]
        >>> @app.get("/v1/documents")
        ... async def list_documents(sort: DocumentSort) -> ...:
        ...     statement = select(Document).order_by(*sort.order_by)

    Args:
        allowed: public field name (``[a-z][a-z0-9_]*``) to column.
        default: the ordering when the request names none, in the same syntax.
        tiebreak: a unique NOT NULL column that makes the order total.

    Returns:
        The dependency; its OpenAPI parameter lists the allowed fields and a pattern.

    Raises:
        ValueError: a name is not ``[a-z][a-z0-9_]*``, a column is nullable, or
            ``default`` is not a valid ordering.
    """
    return SortParameter(allowed, default, tiebreak)


# ---------------------------------------------------------------------------------- filters

FilterOperator = Literal["eq", "in", "gte", "lte", "contains"]
FilterType = type[int] | type[str] | type[bool] | type[dt.datetime] | type[uuid.UUID]
_OPERATORS: Final = frozenset({"eq", "in", "gte", "lte", "contains"})
_TYPES: Final[tuple[type, ...]] = (bool, int, str, dt.datetime, uuid.UUID)


@dataclass(frozen=True, slots=True)
class Filter:
    """What a client may filter one field by.

    Attributes:
        column: the column compared (``Document.status``).
        type: how values are parsed: ``int``, ``str``, ``bool``, ``datetime`` or ``UUID``.
        operators: what the client may ask: ``eq`` (``filter[f]=v``), ``in``
            (``filter[f][in]=a,b``), ``gte``, ``lte`` and, for strings, ``contains``
            (case-insensitive substring).
        max_length: the longest string value, in characters.
        description: shown in the OpenAPI document.
    """

    column: SortColumn
    type: FilterType = str
    operators: frozenset[FilterOperator] | tuple[FilterOperator, ...] = ("eq",)
    max_length: int = 200
    description: str | None = None


@dataclass(frozen=True, slots=True)
class FilterSet:
    """The filters a request asked for, as SQL conditions with bound parameters.

    Attributes:
        clauses: one condition per filter; all must hold.
        applied: ``(field, operator)`` pairs that were given, for logs and tests.
    """

    clauses: tuple[ColumnElement[bool], ...] = ()
    applied: tuple[tuple[str, str], ...] = ()

    def apply(self, statement: Select[Any]) -> Select[Any]:
        """Return ``statement`` with every condition added to its ``WHERE``."""
        return statement.where(*self.clauses) if self.clauses else statement


def _escape_like(value: str) -> str:
    # Backslash escapes itself and LIKE's wildcards; ESCAPE '\' is given explicitly
    # because SQLite has no default escape character.
    return value.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


class FilterParameters:
    """The ``filter[...]`` query parameters of one list: a dependency made by :func:`filters`.

    :meth:`parse` reads query pairs without a request.
    """

    def __init__(self, allowed: Mapping[str, Filter]) -> None:
        self.filters: dict[str, tuple[Filter, ColumnElement[Any], frozenset[str]]] = {}
        parameters = [
            inspect.Parameter("request", inspect.Parameter.KEYWORD_ONLY, annotation=Request)
        ]
        for name, spec in allowed.items():
            _check_name(name, "filter field")
            if spec.type not in _TYPES:
                raise ValueError(
                    f"filter {name!r}: type must be one of int, str, bool, datetime, UUID"
                )
            operators = frozenset(spec.operators)
            unknown = operators - _OPERATORS
            if unknown or not operators:
                raise ValueError(f"filter {name!r}: operators must be among {sorted(_OPERATORS)}")
            if "contains" in operators and spec.type is not str:
                raise ValueError(f"filter {name!r}: 'contains' needs a str filter")
            if operators & {"gte", "lte"} and spec.type in (bool, uuid.UUID):
                raise ValueError(f"filter {name!r}: 'gte'/'lte' need an ordered type")
            self.filters[name] = (spec, column_of(spec.column), operators)
            # Equality first, as readers look for it first.
            for operator in sorted(operators, key=lambda op: (op != "eq", op)):
                alias = f"filter[{name}]" if operator == "eq" else f"filter[{name}][{operator}]"
                parameters.append(
                    inspect.Parameter(
                        f"_{len(parameters)}",
                        inspect.Parameter.KEYWORD_ONLY,
                        default=None,
                        annotation=Annotated[
                            str,
                            Query(
                                alias=alias,
                                title=alias,
                                description=_describe(name, spec, operator),
                            ),
                        ],
                    )
                )
        self.__signature__ = inspect.Signature(parameters, return_annotation=FilterSet)

    async def __call__(self, request: HTTPConnection, **_: Any) -> FilterSet:
        # The declared parameters document the API; the values are read here from
        # the raw query so that repeats and unknown ``filter[...]`` names are seen.
        return self.parse(request.query_params.multi_items())

    def parse(self, items: Iterable[tuple[str, str]]) -> FilterSet:
        """Turn ``(key, value)`` query pairs into a :class:`FilterSet`; other keys are ignored.

        Raises:
            InvalidInput: an unknown field or operator, a repeated filter, or a value
                that does not parse; every problem is listed.
        """
        errors: list[FieldError] = []
        clauses: list[ColumnElement[bool]] = []
        applied: list[tuple[str, str]] = []
        for key, raw in items:
            # Only the filter syntax is this helper's: a route's own ``filter_mode`` or
            # ``filtered`` parameter is left to the route.
            if key != "filter" and not key.startswith("filter["):
                continue
            location = f"query.{key}"
            matched = _FILTER_KEY_RE.fullmatch(key)
            known = self.filters.get(matched.group(1)) if matched else None
            if matched is None or known is None:
                errors.append(FieldError(location, "unknown_filter", self._allowed_message()))
                continue
            name, operator = matched.group(1), matched.group(2) or "eq"
            operators = known[2]
            if operator not in operators:
                ops = ", ".join(sorted(operators))
                errors.append(
                    FieldError(location, "unknown_operator", f"Filter {name} accepts: {ops}.")
                )
                continue
            if (name, operator) in applied:
                errors.append(FieldError(location, "repeated_filter", "Give each filter once."))
                continue
            applied.append((name, operator))
            try:
                clauses.append(self._clause(known, operator, raw))
            except _ValueProblem as problem:
                errors.append(FieldError(location, problem.code, problem.message, problem.limit))
        if errors:
            too_long = all(error.limit is not None for error in errors)
            raise InvalidInput(
                "The filter parameters are not valid.",
                errors=errors,
                code=ErrorCode.INPUT_TOO_LONG if too_long else None,
            )
        return FilterSet(tuple(clauses), tuple(applied))

    def _allowed_message(self) -> str:
        names = ", ".join(sorted(self.filters)) or "none"
        return f"Not a filter of this list. Filters: {names}, as filter[field]=value."

    def _clause(
        self,
        known: tuple[Filter, ColumnElement[Any], frozenset[str]],
        operator: str,
        raw: str,
    ) -> ColumnElement[bool]:
        spec, column, _ = known
        if operator == "in":
            parts = raw.split(",")
            if len(parts) > FILTER_IN_MAX:
                message = f"List at most {FILTER_IN_MAX} values."
                raise _ValueProblem("too_many_values", message, FILTER_IN_MAX)
            return column.in_([_parse_value(spec, column, part) for part in parts])
        value = _parse_value(spec, column, raw)
        if operator == "contains":
            # Both sides lowered by the database, so they agree on what a case is
            # (SQLite's lower() folds ASCII only).
            pattern = literal("%" + _escape_like(str(value)) + "%", type_=String())
            return func.lower(column).like(func.lower(pattern), escape="\\")
        compare: Callable[[ColumnElement[Any], Any], ColumnElement[bool]] = _COMPARE[operator]
        return compare(column, value)


class _ValueProblem(ValueError):
    """A filter value that does not parse; becomes one :class:`FieldError`."""

    def __init__(self, code: str, message: str, limit: int | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.limit = code, message, limit


_COMPARE: Final[dict[str, Callable[[ColumnElement[Any], Any], ColumnElement[bool]]]] = {
    "eq": lambda column, value: column == value,
    "gte": lambda column, value: column >= value,
    "lte": lambda column, value: column <= value,
}
# Longer than any ISO 8601 date-time: refused before parsing.
_DATETIME_MAX_CHARS: Final = 64


def _parse_str(spec: Filter, column: ColumnElement[Any], raw: str) -> str:
    if len(raw) > spec.max_length:
        message = f"At most {spec.max_length} characters."
        raise _ValueProblem("string_too_long", message, spec.max_length)
    return raw


def _parse_bool(spec: Filter, column: ColumnElement[Any], raw: str) -> bool:
    lowered = raw.lower()
    if lowered not in _TRUE and lowered not in _FALSE:
        raise _ValueProblem("bool_parsing", "Give true or false.")
    return lowered in _TRUE


def _int_bits(column: ColumnElement[Any]) -> int:
    # PostgreSQL (asyncpg) refuses a parameter outside the column's integer type,
    # which would surface as a 500: the value is bounded here by the same type.
    kind = column.type
    if isinstance(kind, SmallInteger):
        return 16
    if isinstance(kind, Integer) and not isinstance(kind, BigInteger):
        return 32
    return 64


def _parse_int(spec: Filter, column: ColumnElement[Any], raw: str) -> int:
    bits = _int_bits(column)
    bound = 2 ** (bits - 1)
    # ASCII digits only: int() also reads other scripts' digits and underscores.
    if _INT_RE.fullmatch(raw) is None or not -bound <= int(raw) < bound:
        raise _ValueProblem("int_parsing", f"Give an integer of at most {bits} bits.")
    return int(raw)


def _parse_uuid(spec: Filter, column: ColumnElement[Any], raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise _ValueProblem("uuid_parsing", "Give a UUID.") from None


def _parse_datetime(spec: Filter, column: ColumnElement[Any], raw: str) -> dt.datetime:
    message = "Give an ISO 8601 date and time, such as 2026-12-07T12:00:00Z."
    if len(raw) > _DATETIME_MAX_CHARS:
        raise _ValueProblem("datetime_parsing", message)
    try:
        moment = dt.datetime.fromisoformat(raw)
        # A time without an offset is UTC; the column decides whether it stores one.
        # Converting 0001-01-01T00:00+01:00 to UTC overflows: refused, not a 500.
        moment = (
            moment.replace(tzinfo=dt.UTC) if moment.tzinfo is None else moment.astimezone(dt.UTC)
        )
    except (ValueError, OverflowError):
        raise _ValueProblem("datetime_parsing", message) from None
    if not getattr(column.type, "timezone", False):
        moment = moment.replace(tzinfo=None)
    return moment


_PARSERS: Final[dict[type, Callable[[Filter, ColumnElement[Any], str], Any]]] = {
    str: _parse_str,
    bool: _parse_bool,
    int: _parse_int,
    uuid.UUID: _parse_uuid,
    dt.datetime: _parse_datetime,
}


def _parse_value(spec: Filter, column: ColumnElement[Any], raw: str) -> Any:
    if "\x00" in raw:
        # PostgreSQL refuses NUL in text; refused here for every type alike.
        raise _ValueProblem("invalid_value", "Values may not contain NUL.")
    return _PARSERS[spec.type](spec, column, raw)


def _describe(name: str, spec: Filter, operator: str) -> str:
    subject = spec.description or f"Only items whose {name}"
    kind = {
        bool: "true or false",
        int: "an integer",
        str: "text",
        dt.datetime: "an ISO 8601 date-time (UTC when it has no offset)",
        uuid.UUID: "a UUID",
    }[spec.type]
    wording = {
        "eq": f"equals this value ({kind}).",
        "in": f"is one of these comma-separated values ({kind}, at most {FILTER_IN_MAX}).",
        "gte": f"is at least this value ({kind}).",
        "lte": f"is at most this value ({kind}).",
        "contains": "contains this text, ignoring case.",
    }[operator]
    return f"{subject} {wording}"


def filters(allowed: Mapping[str, Filter]) -> FilterParameters:
    """Make a FastAPI dependency that reads ``filter[field]=value`` into a :class:`FilterSet`.

    ``filter[field]=v`` asks for equality; ``filter[field][in]=a,b``,
    ``filter[field][gte]=v``, ``filter[field][lte]=v`` and
    ``filter[field][contains]=text`` for what the field allows. Any other
    ``filter...`` parameter is refused, so a misspelt filter never silently
    returns everything.

    Example:
        >>> DocumentFilters = Annotated[FilterSet, Depends(filters({
        ...     "tag": Filter(Document.tag, str, ("eq", "in")),
        ...     "created_at": Filter(Document.created_at, datetime, ("gte", "lte")),
        ... }))]
        >>> @app.get("/v1/documents")
        ... async def list_documents(where: DocumentFilters) -> ...:
        ...     statement = where.apply(select(Document))

    Args:
        allowed: public field name (``[a-z][a-z0-9_]*``) to its :class:`Filter`.

    Returns:
        The dependency; each field and operator is a documented OpenAPI parameter.

    Raises:
        ValueError: a name is invalid, or an operator does not fit the type.
    """
    return FilterParameters(allowed)


# ------------------------------------------------------------------------------- pagination


@dataclass(frozen=True, slots=True)
class Pagination:
    """A validated page request.

    Attributes:
        page: the 1-based page number.
        page_size: items per page.
    """

    page: int = 1
    page_size: int = DEFAULT_PAGE_SIZE

    @property
    def offset(self) -> int:
        """Rows before this page."""
        return (self.page - 1) * self.page_size

    @property
    def limit(self) -> int:
        """Rows on this page at most."""
        return self.page_size


def page_bounds(connection: HTTPConnection | None) -> tuple[int, int]:
    """Return ``(page_size_default, page_size_max)`` from the app's ``guard`` settings.

    The defaults 50 and 1000 apply when the app has no bastion installed.
    """
    runtime = getattr(connection.app.state, "bastion", None) if connection else None
    guard = getattr(getattr(runtime, "settings", None), "guard", None)
    if guard is None:
        return DEFAULT_PAGE_SIZE, DEFAULT_PAGE_SIZE_MAX
    maximum = int(guard.page_size_max)
    return min(int(guard.page_size_default), maximum), maximum


PageSizeQuery = Annotated[
    int | None,
    Query(
        description="Items per page: 1 to guard.page_size_max (1000 by default); "
        "guard.page_size_default (50) when omitted.",
        json_schema_extra={"minimum": 1},
    ),
]
"""The page-size query parameter (``page_size`` here, ``limit`` for cursor pages)."""


def page_size_error(field: str, size: int, max_size: int, too_small: str) -> FieldError | None:
    """Return the error for a page size outside 1..``max_size``, or ``None``.

    Args:
        field: the parameter's location (``query.page_size``).
        size: the size asked for.
        max_size: ``guard.page_size_max``.
        too_small: the message for a size below 1.
    """
    if size < 1:
        return FieldError(field, "greater_than_equal", too_small, 1)
    if size > max_size:
        message = f"At most {max_size} items per page."
        return FieldError(field, "less_than_equal", message, max_size)
    return None


async def pagination(
    request: Request,
    page: Annotated[
        int,
        Query(
            description=f"1-based page number, at most {PAGE_MAX}.",
            json_schema_extra={"minimum": 1, "maximum": PAGE_MAX},
        ),
    ] = 1,
    page_size: PageSizeQuery = None,
) -> Pagination:
    """Read ``page`` and ``page_size`` (FastAPI dependency).

    Example:
        >>> @app.get("/v1/documents")
        ... async def list_documents(
        ...     request: Request, pages: Annotated[Pagination, Depends(pagination)]
        ... ) -> Page[DocumentSummary]:
        ...     return await paginate(session, statement, pages, request)

    Raises:
        InvalidInput: ``page`` outside 1..``PAGE_MAX`` or ``page_size`` outside
            1..``guard.page_size_max``; the error's ``limit`` is the broken bound.
    """
    default_size, max_size = page_bounds(request)
    errors = []
    if page < 1:
        errors.append(FieldError("query.page", "greater_than_equal", "Pages start at 1.", 1))
    elif page > PAGE_MAX:
        message = f"At most page {PAGE_MAX}; use cursor pagination to go deeper."
        errors.append(FieldError("query.page", "less_than_equal", message, PAGE_MAX))
    size = default_size if page_size is None else page_size
    size_error = page_size_error("query.page_size", size, max_size, "At least 1 item per page.")
    if size_error is not None:
        errors.append(size_error)
    if errors:
        raise InvalidInput("The pagination parameters are not valid.", errors=errors)
    return Pagination(page, size)


class PageLinks(BaseModel):
    """Links to pages of the same list, as paths relative to the API's origin."""

    self: str
    first: str
    prev: str | None = Field(description="``null`` on the first page.")
    next: str | None = Field(description="``null`` on the last page and beyond.")
    last: str


class Page(BaseModel, Generic[T]):
    """One page of a list, with the total count and links to the others."""

    items: list[T]
    page: int
    page_size: int
    total: int = Field(description="Items in the whole list, not on this page.")
    links: PageLinks


# RFC 3986 path characters; anything else (spaces, quotes, angle brackets) is
# percent-encoded, so a link is safe inside a ``Link`` header's ``<...>``.
_PATH_SAFE: Final = "/:@!$&'()*+,;=-._~"


def _quoted_path(connection: HTTPConnection) -> str:
    # The path as the client sent it (ASGI raw_path): decoding and re-encoding
    # ``scope["path"]`` would turn an encoded "/" or "?" into a different path.
    raw = connection.scope.get("raw_path")
    if isinstance(raw, bytes) and raw:
        return quote_from_bytes(raw.partition(b"?")[0], safe=_PATH_SAFE + "%")
    return quote(connection.url.path, safe=_PATH_SAFE)


def query_link(connection: HTTPConnection, replace: Mapping[str, str | int | None]) -> str:
    """Return the request's path and query with the ``replace`` keys set (``None``: removed).

    The request's other parameters (sort, filters) keep their order and values;
    the result is a relative URL (a path), since building an absolute one would
    mean trusting the ``Host`` header.
    """
    kept = [
        (key, value) for key, value in connection.query_params.multi_items() if key not in replace
    ]
    kept.extend((key, str(value)) for key, value in replace.items() if value is not None)
    path = _quoted_path(connection)
    return f"{path}?{urlencode(kept)}" if kept else path


def page_links(connection: HTTPConnection, pagination: Pagination, total: int) -> PageLinks:
    """Return the ``self, first, prev, next, last`` links of a page of ``total`` items."""
    size = pagination.page_size
    last = max(1, math.ceil(total / size))

    def link(number: int) -> str:
        return query_link(connection, {"page": number, "page_size": size})

    page = pagination.page
    return PageLinks(
        self=link(page),
        first=link(1),
        # From beyond the end, "previous" leads back to the last real page.
        prev=link(min(page - 1, last)) if page > 1 else None,
        next=link(page + 1) if page < last else None,
        last=link(last),
    )


def link_header(links: BaseModel) -> str:
    """Return an RFC 8288 ``Link`` header value from a page's links.

    Example:
        >>> response.headers["Link"] = link_header(page.links)
    """
    parts = []
    for rel, target in links.model_dump().items():
        if target is not None:
            parts.append(f'<{target}>; rel="{rel}"')
    return ", ".join(parts)


def _returns_one_column(statement: Select[Any]) -> bool:
    return len(statement.column_descriptions) == 1


@overload
async def paginate(
    session: AsyncSession,
    statement: Select[Any],
    pagination: Pagination,
    request: HTTPConnection,
    *,
    order: SortSpec | None = None,
    item: None = None,
) -> Page[Any]: ...


@overload
async def paginate(
    session: AsyncSession,
    statement: Select[Any],
    pagination: Pagination,
    request: HTTPConnection,
    *,
    order: SortSpec | None = None,
    item: Callable[[Any], T],
) -> Page[T]: ...


async def paginate(
    session: AsyncSession,
    statement: Select[Any],
    pagination: Pagination,
    request: HTTPConnection,
    *,
    order: SortSpec | None = None,
    item: Callable[[Any], Any] | None = None,
) -> Page[Any]:
    """Run one ``COUNT`` and one page query; return the :class:`Page`.

    The page query is skipped when the page starts past the end. The statement
    must be ordered totally (by ``order`` here, or its own ``ORDER BY`` ending in
    a unique column), or rows may repeat or vanish between pages.

    Example:
        >>> page = await paginate(session, filters.apply(select(Document)), pages,
        ...                       request, order=sort, item=DocumentSummary.model_validate)

    Args:
        session: the session to run both queries in (one snapshot where the
            isolation level gives one).
        statement: the filtered ``SELECT``; one entity or column gives items of
            that, several give rows.
        pagination: the page asked for.
        request: the request, whose path and other parameters the links keep.
        order: applied to the statement when given (replacing its ordering).
        item: turns each row into the item returned (``Model.model_validate``).

    Returns:
        The page, with ``total`` and ``links``.
    """
    if order is not None:
        statement = statement.order_by(None).order_by(*order.order_by)
    counted = select(func.count()).select_from(
        statement.order_by(None).limit(None).offset(None).subquery()
    )
    total = int(await session.scalar(counted) or 0)
    rows: Sequence[Any] = []
    if pagination.offset < total:
        page_query = statement.offset(pagination.offset).limit(pagination.limit)
        if _returns_one_column(statement):
            rows = (await session.scalars(page_query)).all()
        else:
            rows = (await session.execute(page_query)).all()
    items = [item(row) for row in rows] if item is not None else list(rows)
    return Page[Any](
        items=items,
        page=pagination.page,
        page_size=pagination.page_size,
        total=total,
        links=page_links(request, pagination, total),
    )
