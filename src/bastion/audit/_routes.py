"""The audit read routes under ``/admin/audit``: query, export, proofs and checkpoints.

* ``GET /admin/audit``: entries newest first, filtered (:func:`parse_query`),
  ``{"items": [...], "next_cursor": ...}``; ``format=csv`` or ``format=jsonl``
  streams every matching entry as a download instead, page by page, and records
  the export as ``audit.export``.
* ``GET /admin/audit/entries/{id}``: one entry.
* ``GET /admin/audit/entries/{id}/proof[?tree_size=N]``: the entry's proof
  bundle (``bastion-audit-proof/1``) against the latest checkpoint, or the one
  of size ``N``. For an operator, an entry no checkpoint covers yet gets one
  made on the spot. A tenant's admin gets 409 ``CONFLICT`` instead, with
  ``Retry-After`` the checkpoint interval: signing and storing a checkpoint on
  every tenant request would let a tenant grow the append-only checkpoint table
  and the signing work at will.
* ``GET /admin/audit/consistency?log_id=&first=&second=``: the RFC 9162 proof
  that the log of ``second`` entries extends that of ``first`` (``second``
  defaults to the latest checkpoint), with both checkpoints' notes when stored.
* ``GET /admin/audit/checkpoints?log_id=``: the log's latest signed checkpoint.
* ``POST /admin/audit/checkpoints[?log_id=]``: checkpoint one log now (or
  every log that grew), recorded as ``audit.checkpoint``. Operators only.

Who may call: a request that carries an identity principal is a tenant's
admin, never an operator: acting for a tenant and holding ``audit:read``, it
reads only that tenant's entries (every query is forced to its tenant, naming
another tenant is 403, and another tenant's entry is 404, as if absent); any
other principal is 403. A request without a principal is an operator if it
passes bastion's admin :class:`~bastion._access.AccessPolicy` (allowed networks
and ``http.admin_token``) and reads everything. So the network allow-list alone
never lifts a tenant's user to operator (a reverse proxy on the host makes every
peer 127.0.0.1), and the admin token still works: identity cannot authenticate
it, so it binds no principal.

With ``partition="tenant"`` a tenant's admin gets the proofs, consistency
proofs and checkpoints of its own log only. With ``partition="global"`` all
tenants share one log, and it gets proofs and checkpoints of that log: they
carry only hashes and the log's size, and an inclusion proof is the only way to
check its own entries.

Bad query parameters are 422 problems naming the parameter (``query.<name>``),
never a 500: out-of-range instants and numbers, and text that no database can
bind (NUL, lone surrogates), are refused before any query runs.
"""

from __future__ import annotations

import base64
import csv
import datetime as dt
import io
import math
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from bastion._access import AccessPolicy
from bastion.audit._bundle import proof_bundle
from bastion.audit._event import Actor, ActorType, AuditEvent
from bastion.audit._query import (
    MAX_QUERY_LIMIT,
    AuditQuery,
    fetch_page,
    next_query,
    parse_query,
)
from bastion.audit._tables import checkpoints, entries, logs
from bastion.audit._tree import TreeReader
from bastion.errors import (
    BastionError,
    Conflict,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
)
from bastion.identity._principal import Principal, current_principal
from bastion.identity._rbac import current_authorizer, grants

if TYPE_CHECKING:
    from bastion.audit._checkpoint import Checkpoint, Checkpointer
    from bastion.audit._subjects import SubjectKeys
    from bastion.audit._writer import AuditLog
    from bastion.data import Database
    from bastion.settings import AuditSettings

__all__ = [
    "AUDIT_PREFIX",
    "AUDIT_READ_PERMISSION",
    "EXPORT_COLUMNS",
    "FORMULA_STARTS",
    "AuditRoutes",
    "csv_cell",
    "entry_items",
]

logger = structlog.get_logger("bastion.audit")

AUDIT_PREFIX: Final = "/admin/audit"
AUDIT_READ_PERMISSION: Final = "audit:read"
"""What a tenant's principal needs to read its tenant's entries."""

PERSONAL_FIELDS: Final = ("email", "ip", "user_agent")
"""Columns encrypted under the entry's data subject's key."""

EXPORT_COLUMNS: Final = (
    "id",
    "occurred_at",
    "log_id",
    "seq",
    "action",
    "outcome",
    "actor_type",
    "actor_id",
    "tenant_id",
    "resource_type",
    "resource_id",
    "request_id",
    "trace_id",
    "subject",
    "email",
    "ip",
    "user_agent",
    "erased",
    "details",
    "leaf_hash",
)
"""The members of an item, in the order of the CSV export's columns."""

OPERATOR: Final = Actor(ActorType.SYSTEM, "operator")
"""Who the audit trail says acted when an operator (admin token or network) called."""

_REALM: Final = "bastion-admin"
_DIGITS_MAX: Final = 20  # 2**63 - 1 has 19 digits; zero padding allowed
_FORMATS: Final = {
    "csv": ("text/csv; charset=utf-8", "csv"),
    "jsonl": ("application/x-ndjson", "jsonl"),
}
FORMULA_STARTS: Final = (
    *("=", "+", "-", "@", "\t", "\r", "\n"),
    # Full-width equals, plus, hyphen-minus and at sign, which some locales evaluate.
    *("\uff1d", "\uff0b", "\uff0d", "\uff20"),
)
"""First characters that make a spreadsheet run a cell as a formula (CSV injection):
OWASP's list, line feed, and their full-width forms (U+FF1D, U+FF0B, U+FF0D, U+FF20)."""

Endpoint = Callable[[Request], Awaitable[Response]]


@dataclass(frozen=True, slots=True)
class _Caller:
    """Who is reading: an operator (``tenant_id`` ``None``: every tenant) or a tenant's admin."""

    actor: Actor
    tenant_id: uuid.UUID | None = None


class AuditRoutes:
    """The ``/admin/audit`` endpoints of one app.

    Args:
        settings: the ``audit`` section (partition and origin).
        access: the admin access policy operators pass.
        database: where the audit tables are.
        subject_keys: decrypts the personal fields.
        checkpointer: reads and makes signed checkpoints.
        log: records exports and on-demand checkpoints; ``None`` records nothing.
        export_page: entries an export reads per query (and holds in memory).

    Example:
        >>> app.router.routes.extend(
        ...     AuditRoutes(
        ...         settings=settings.audit,
        ...         access=access,
        ...         database=database,
        ...         subject_keys=keys,
        ...         checkpointer=checkpointer,
        ...         log=audit_log,
        ...     ).routes()
        ... )
    """

    def __init__(
        self,
        *,
        settings: AuditSettings,
        access: AccessPolicy,
        database: Database,
        subject_keys: SubjectKeys,
        checkpointer: Checkpointer,
        log: AuditLog | None = None,
        export_page: int = MAX_QUERY_LIMIT,
    ) -> None:
        self._settings = settings
        self._access = access
        self._database = database
        self._keys = subject_keys
        self._checkpointer = checkpointer
        self._log = log
        self._export_page = export_page

    def routes(self) -> list[BaseRoute]:
        """Return the routes to append to the app's router (kept out of the OpenAPI schema)."""
        return [
            _route(AUDIT_PREFIX, self.query),
            _route(f"{AUDIT_PREFIX}/entries/{{entry_id}}", self.entry),
            _route(f"{AUDIT_PREFIX}/entries/{{entry_id}}/proof", self.proof),
            _route(f"{AUDIT_PREFIX}/consistency", self.consistency),
            _route(f"{AUDIT_PREFIX}/checkpoints", self.latest_checkpoint),
            _route(f"{AUDIT_PREFIX}/checkpoints", self.make_checkpoint, method="POST"),
        ]

    async def query(self, request: Request) -> Response:
        """``GET /admin/audit``: a page of entries; ``format=csv|jsonl`` exports them all."""
        caller = await self._caller(request)
        params = request.query_params
        export = params.get("format", "json")
        errors = []
        if export not in ("json", *_FORMATS):
            errors.append(
                FieldError("query.format", "invalid", "format must be json, csv or jsonl.")
            )
        try:
            query = parse_query(params)
        except InvalidInput as exc:
            raise InvalidInput(errors=[*exc.errors, *errors]) from None
        if errors:
            raise InvalidInput(errors=errors)
        if caller.tenant_id is not None:
            if query.tenant_id not in (None, caller.tenant_id):
                raise Forbidden("A tenant's audit trail is readable only by its own admins.")
            query = replace(query, tenant_id=caller.tenant_id)
        if export != "json":
            return await self._export(caller, query, export)
        async with self._database.session() as session:
            page = await fetch_page(session, query)
        return _json({"items": await self._items(page.rows), "next_cursor": page.next_cursor})

    async def entry(self, request: Request) -> Response:
        """``GET /admin/audit/entries/{id}``: one entry, 404 when absent or another tenant's."""
        caller = await self._caller(request)
        async with self._database.session() as session:
            row = await _entry_row(session, request.path_params["entry_id"], caller)
        (item,) = await self._items([row])
        return _json(item)

    async def proof(self, request: Request) -> Response:
        """``GET /admin/audit/entries/{id}/proof``: the entry's offline-verifiable proof bundle."""
        caller = await self._caller(request)
        async with self._database.session() as session:
            row = await _entry_row(session, request.path_params["entry_id"], caller)
        raw_size = request.query_params.get("tree_size")
        if raw_size is not None:
            size = _whole("tree_size", raw_size, row.seq + 1, 2**63 - 1)
            checkpoint = await self._checkpointer.at_least(row.log_id, size)
            if checkpoint is None or checkpoint.size != size:
                raise NotFound(f"The log has no checkpoint of size {size}.")
        else:
            checkpoint = await self._checkpointer.latest(row.log_id)
            if checkpoint is None or checkpoint.size <= row.seq:
                if caller.tenant_id is not None:
                    raise self._not_checkpointed()
                checkpoint = await self._checkpointer.checkpoint(row.log_id)
            # The entry is committed, so the head covers it: only a head someone
            # rolled back (tampering) can leave it uncovered.
            if checkpoint is None or checkpoint.size <= row.seq:
                raise BastionError("The log's head does not cover a stored entry.")
        async with self._database.session() as session:
            bundle = await proof_bundle(session, entry_id=row.id, checkpoint=checkpoint)
        return _json(bundle)

    async def consistency(self, request: Request) -> Response:
        """``GET /admin/audit/consistency``: proof that a later log size extends an earlier one."""
        caller = await self._caller(request)
        params = request.query_params
        log_id = self._readable_log(caller, params.get("log_id"))
        raw_first, raw_second = params.get("first"), params.get("second")
        if raw_first is None:
            raise InvalidInput(errors=[FieldError("query.first", "missing", "first is required.")])
        if raw_second is None:
            latest = await self._checkpointer.latest(log_id)
            if latest is None:
                raise NotFound("The log has no checkpoint yet.")
            raw_second = str(latest.size)
        async with self._database.session() as session:
            size = await session.scalar(select(logs.c.size).where(logs.c.log_id == log_id))
            if not size:
                raise NotFound("No such log, or it is empty.")
            second = _whole("second", raw_second, 1, size)
            first = _whole("first", raw_first, 1, second)
            proof = await TreeReader(session, log_id).consistency_proof(first, second)
            notes = {
                row.tree_size: row.note
                for row in await session.execute(
                    select(checkpoints.c.tree_size, checkpoints.c.note)
                    .where(
                        checkpoints.c.log_id == log_id,
                        checkpoints.c.tree_size.in_((first, second)),
                    )
                    .order_by(checkpoints.c.created_at)
                )
            }
        return _json(
            {
                "log_id": log_id,
                "first": first,
                "second": second,
                "proof": [_b64(node) for node in proof],
                "first_checkpoint": notes.get(first),
                "second_checkpoint": notes.get(second),
            }
        )

    async def latest_checkpoint(self, request: Request) -> Response:
        """``GET /admin/audit/checkpoints``: the log's latest signed checkpoint."""
        caller = await self._caller(request)
        log_id = self._readable_log(caller, request.query_params.get("log_id"))
        checkpoint = await self._checkpointer.latest(log_id)
        if checkpoint is None:
            raise NotFound("The log has no checkpoint yet.")
        return _json(_checkpoint_json(log_id, checkpoint))

    async def make_checkpoint(self, request: Request) -> Response:
        """``POST /admin/audit/checkpoints``: checkpoint ``log_id``, or every log that grew."""
        caller = await self._caller(request)
        if caller.tenant_id is not None:
            raise Forbidden("Checkpoints are made on demand by operators only.")
        raw = request.query_params.get("log_id")
        if raw is None:
            made = [
                (checkpoint.log_id, checkpoint)
                for checkpoint in await self._checkpointer.checkpoint_all()
            ]
        else:
            log_id = _log_id(raw)
            checkpoint = await self._checkpointer.checkpoint(log_id)
            if checkpoint is None:
                raise NotFound("No such log, or it is empty.")
            made = [(log_id, checkpoint)]
        for made_log, checkpoint in made:
            await self._record(
                AuditEvent(
                    action="audit.checkpoint",
                    actor=caller.actor,
                    details={"log_id": made_log, "tree_size": checkpoint.size},
                )
            )
        return _json({"checkpoints": [_checkpoint_json(*pair) for pair in made]})

    def _not_checkpointed(self) -> Conflict:
        """The refusal of a tenant's proof of an entry no checkpoint covers yet."""
        interval = self._settings.checkpoint_interval
        if interval <= 0:
            return Conflict(
                "No signed checkpoint covers this entry yet, and none is scheduled: "
                "an operator makes one with POST /admin/audit/checkpoints."
            )
        return Conflict(
            "No signed checkpoint covers this entry yet; the next scheduled one will.",
            headers={"Retry-After": str(math.ceil(interval))},
        )

    async def _caller(self, request: Request) -> _Caller:
        """Who calls: a principal is a tenant's admin or refused; else an operator or refused."""
        principal = current_principal()
        if principal is None:
            # The operators' refusal, as on every /admin route.
            self._access.require(request, subject="/admin", realm=_REALM)
            return _Caller(OPERATOR)
        # Whatever the network: from 127.0.0.1 behind a proxy on the host, the
        # allow-list admits everyone, so it must not make a tenant's user an operator.
        if principal.tenant_id is None:
            raise Forbidden(
                "The audit trail is read by operators with the admin token, "
                "or by a tenant's admins for their tenant."
            )
        if not grants(await current_authorizer().permissions(principal), AUDIT_READ_PERMISSION):
            raise Forbidden
        try:
            tenant_id = uuid.UUID(principal.tenant_id)
        except ValueError:
            raise Forbidden from None
        return _Caller(_actor_of(principal), tenant_id)

    def _readable_log(self, caller: _Caller, raw: str | None) -> str:
        """The log ``raw`` names (by default the caller's own), if the caller may read it."""
        partition = self._settings.partition
        own: str | None = "global"
        if partition == "tenant":
            own = None if caller.tenant_id is None else f"tenant/{caller.tenant_id}"
        if raw is None:
            if own is None:
                raise InvalidInput(
                    errors=[FieldError("query.log_id", "missing", "log_id is required.")]
                )
            return own
        log_id = _log_id(raw)
        if caller.tenant_id is not None and log_id != own:
            raise Forbidden("A tenant's admin reads only its own tenant's log.")
        return log_id

    async def _items(self, rows: Sequence[Any]) -> list[dict[str, Any]]:
        return await entry_items(self._keys, rows)

    async def _export(self, caller: _Caller, query: AuditQuery, export: str) -> Response:
        """Stream every entry ``query`` matches (from its cursor on) as CSV or JSON lines."""
        # Recorded before the first byte: an export the trail cannot record is refused.
        await self._record(
            AuditEvent(
                action="audit.export",
                actor=caller.actor,
                tenant_id=caller.tenant_id,
                details={"format": export, "filters": query.filters()},
            )
        )
        media_type, extension = _FORMATS[export]
        stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
        lines = _csv_lines if export == "csv" else _jsonl_lines
        return StreamingResponse(
            self._pages(replace(query, limit=self._export_page), lines),
            media_type=media_type,
            headers={
                "content-disposition": f'attachment; filename="audit-{stamp}.{extension}"',
                "cache-control": "no-store",
            },
        )

    async def _pages(
        self,
        query: AuditQuery | None,
        lines: Callable[[list[dict[str, Any]], bool], bytes],
    ) -> AsyncIterator[bytes]:
        # One short transaction per page: an export of millions of entries holds
        # no connection between pages and never has more than a page in memory.
        first = True
        while query is not None:
            async with self._database.session() as session:
                page = await fetch_page(session, query)
            yield lines(await self._items(page.rows), first)
            first = False
            query = next_query(query, page)

    async def _record(self, event: AuditEvent) -> None:
        if self._log is not None:
            await self._log.record(event)


def _route(path: str, endpoint: Endpoint, *, method: str = "GET") -> Route:
    route: Route

    async def serve(request: Request) -> Response:
        # FastAPI's router records scope["route"] (the access log's and metrics'
        # template) only for its own APIRoutes.
        request.scope.setdefault("route", route)
        return await endpoint(request)

    route = Route(path, serve, methods=[method], include_in_schema=False)
    return route


async def _entry_row(session: AsyncSession, raw_id: str, caller: _Caller) -> Any:
    """The entry ``raw_id`` names, or 404 (also for another tenant's: its existence is not told)."""
    try:
        entry_id = uuid.UUID(raw_id)
    except ValueError:
        raise NotFound("No such audit entry.") from None
    statement = select(entries).where(entries.c.id == entry_id)
    if caller.tenant_id is not None:
        statement = statement.where(entries.c.tenant_id == caller.tenant_id)
    row = (await session.execute(statement)).first()
    if row is None:
        raise NotFound("No such audit entry.")
    return row


def _actor_of(principal: Principal) -> Actor:
    kinds = {"user": ActorType.USER, "api_key": ActorType.API_KEY, "service": ActorType.SERVICE}
    return Actor(kinds[principal.kind], principal.subject)


def _log_id(raw: str) -> str:
    """``raw`` if it is a log id (``global``, ``system``, ``tenant/<uuid>``), else 422."""
    kind, _, tenant = raw.partition("/")
    if raw in ("global", "system"):
        return raw
    if kind == "tenant":
        try:
            return f"tenant/{uuid.UUID(tenant)}"
        except ValueError:
            pass
    raise InvalidInput(
        errors=[
            FieldError("query.log_id", "invalid", "log_id must be global, system or tenant/<id>.")
        ]
    )


def _whole(name: str, raw: str, low: int, high: int) -> int:
    # The length first: int() refuses strings of more than 4300 digits (ValueError).
    if len(raw) <= _DIGITS_MAX and raw.isascii() and raw.isdigit() and low <= int(raw) <= high:
        return int(raw)
    raise InvalidInput(
        errors=[
            FieldError(
                f"query.{name}",
                "out_of_range",
                f"{name} must be a whole number from {low} to {high}.",
            )
        ]
    )


def _checkpoint_json(log_id: str, checkpoint: Checkpoint) -> dict[str, Any]:
    return {
        "log_id": log_id,
        "origin": checkpoint.origin,
        "tree_size": checkpoint.size,
        "root_hash": _b64(checkpoint.root_hash),
        "timestamp": checkpoint.timestamp,
        "key_name": checkpoint.key_name,
        "note": checkpoint.note,
    }


def _b64(value: bytes) -> str:
    return base64.b64encode(value).decode()


def _json(body: Any) -> Response:
    return Response(
        orjson.dumps(body), media_type="application/json", headers={"cache-control": "no-store"}
    )


def _jsonl_lines(items: list[dict[str, Any]], _first: bool) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in items)


def _csv_lines(items: list[dict[str, Any]], first: bool) -> bytes:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\r\n")
    if first:
        writer.writerow(EXPORT_COLUMNS)
    writer.writerows([csv_cell(item[column]) for column in EXPORT_COLUMNS] for item in items)
    return buffer.getvalue().encode()


async def entry_items(subject_keys: SubjectKeys, rows: Sequence[Any]) -> list[dict[str, Any]]:
    """Return entry rows as the API and exports show them, personal fields decrypted at once.

    Args:
        subject_keys: opens the personal fields; an erased subject's read as ``None``
            with ``erased`` true.
        rows: rows of ``bastion_audit_entries``.

    Returns:
        One JSON-ready dict per row (``occurred_at`` stays a datetime).
    """
    wanted = [
        (row.subject, name, getattr(row, name))
        for row in rows
        for name in PERSONAL_FIELDS
        if getattr(row, name) is not None
    ]
    opened = iter(await subject_keys.open_many(wanted) if wanted else ())
    items = []
    for row in rows:
        item: dict[str, Any] = {
            # str(): asyncpg's UUID type is not one orjson knows.
            "id": str(row.id),
            "occurred_at": row.occurred_at,
            "log_id": row.log_id,
            "seq": row.seq,
            "action": row.action,
            "outcome": row.outcome,
            "actor_type": row.actor_type,
            "actor_id": row.actor_id,
            "tenant_id": None if row.tenant_id is None else str(row.tenant_id),
            "resource_type": row.resource_type,
            "resource_id": row.resource_id,
            "request_id": row.request_id,
            "trace_id": row.trace_id,
            "subject": row.subject,
            "erased": False,
            "details": orjson.loads(row.details),
            "leaf_hash": row.leaf_hash.hex(),
        }
        for name in PERSONAL_FIELDS:
            plain = None if getattr(row, name) is None else next(opened)
            # Ciphertext without its plaintext: the subject's key was destroyed.
            item["erased"] = item["erased"] or (plain is None and getattr(row, name) is not None)
            item[name] = plain
        items.append(item)
    return items


def csv_cell(value: Any) -> str:
    """Return ``value`` as an audit export's CSV cell, safe to open in a spreadsheet.

    ``None`` is empty, a dict compact JSON, a datetime ISO 8601, a bool ``true``
    or ``false``; text starting with one of :data:`FORMULA_STARTS` gets a leading
    ``'`` so a spreadsheet shows it rather than run it (OWASP CSV injection).

    Example:
        >>> csv_cell("=HYPERLINK(1)")
        "'=HYPERLINK(1)"
    """
    if value is None:
        return ""
    if isinstance(value, dict):
        return orjson.dumps(value).decode()
    if isinstance(value, dt.datetime):
        return value.isoformat()
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return "'" + text if text.startswith(FORMULA_STARTS) else text
