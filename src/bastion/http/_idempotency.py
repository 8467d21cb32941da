"""``Idempotency-Key``: a retried POST or PATCH executes once; its retries get the same answer.

An endpoint opts in with :func:`idempotent`. A request to it carrying
``Idempotency-Key`` (draft-ietf-httpapi-idempotency-key-header) goes through::

    parse the key (sf-string "..." or a bare token)     bad: 422 INVALID_INPUT
    read the body; fingerprint = SHA-256(method, path and query, content type, body)
    record key = SHA-256(tenant, principal or client address, method, route, key)
    acquire ──▶ free: run the app, streaming its answer through while keeping a copy
           │        ├── stored (2xx-4xx but 408/409/425/429): complete, kept for ttl
           │        └── 5xx, 408/409/425/429, too large, exception, cancel: release
           ├──▶ complete, same fingerprint:  replay (Idempotent-Replayed: true)
           ├──▶ any state, other fingerprint: 422 IDEMPOTENCY_KEY_REUSED
           ├──▶ in progress, same fingerprint: 409 CONFLICT, Retry-After: 1
           └──▶ the store fails: 503 SERVICE_UNAVAILABLE, Retry-After: 1 (fail closed)

The record key is scoped to the caller, so one caller's key can never replay
another's response, whatever key they choose. Pure ASGI, inside identity, rate
limiting and the request guards, in front of the router: it answers its own
errors as ``application/problem+json``, like the rate-limit middleware.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar

import anyio
import structlog
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion._routes import RouteEntry, RouteTable, mark_endpoint, name_route, route_entries
from bastion.context import current_context
from bastion.errors import (
    BastionError,
    ConfigurationError,
    Conflict,
    ErrorCode,
    FieldError,
    InvalidInput,
    ServiceUnavailable,
    problem_responses,
)
from bastion.http._idempotency_store import (
    IdempotencyRecord,
    IdempotencyStore,
    IdempotencyStoreError,
    StoredResponse,
)
from bastion.identity import current_principal
from bastion.observability import send_problem
from bastion.observability.metrics import HTTP_IDEMPOTENCY_REQUESTS as IDEMPOTENCY_REQUESTS
from bastion.settings import IdempotencySettings, Settings

__all__ = [
    "HEADER",
    "IDEMPOTENCY_REQUESTS",
    "MARK",
    "REPLAYED_HEADER",
    "IdempotencyKeyReused",
    "IdempotencyMiddleware",
    "IdempotentRoute",
    "check_idempotent_routes",
    "document_idempotency",
    "fingerprint",
    "idempotent",
    "idempotent_operations",
    "parse_idempotency_key",
    "record_key",
    "start_idempotency",
    "stop_idempotency",
]

logger = structlog.get_logger("bastion.http.idempotency")

E = TypeVar("E")

MARK: Final = "__bastion_idempotent__"
"""The endpoint attribute :func:`idempotent` sets."""
HEADER: Final = "Idempotency-Key"
REPLAYED_HEADER: Final = "Idempotent-Replayed"
"""Set to ``true`` on a replayed response (Stripe's name; the draft names none)."""
FIELD: Final = f"header.{HEADER}"
METHODS: Final = frozenset({"POST", "PATCH"})
"""The methods a key applies to: the ones that are not idempotent by definition."""

_HEADER_NAME: Final = b"idempotency-key"
_QUOTE: Final = ord('"')
_BACKSLASH: Final = ord("\\")
# RFC 8941 sf-string characters that stand for themselves (quote and backslash are escaped).
_PLAIN: Final = frozenset(range(0x20, 0x7F)) - {_QUOTE, _BACKSLASH}
# A bare key: visible ASCII, no space, quote or backslash.
_BARE: Final = _PLAIN - {0x20}
_SERVER_ERROR: Final = 500
_CONTENT_TYPE: Final = b"content-type"
# Statuses that say "not done, try again": the key is released so the retry executes.
_RETRYABLE: Final = frozenset({408, 409, 425, 429, 503})
# Never replayed: cookies are the one caller's session, and the rest are the
# connection's or recomputed for the replay.
_NOT_STORED: Final = frozenset(
    {
        b"set-cookie",
        b"content-length",
        b"transfer-encoding",
        b"connection",
        b"keep-alive",
        b"date",
        b"server",
        REPLAYED_HEADER.lower().encode(),
    }
)
_RELEASE_TIMEOUT: Final = 5.0
"""Seconds a release after a cancellation may take; past them the lock expires by itself."""

Outcome = Literal["executed", "replayed", "reused", "in_progress", "released", "store_error"]

_COUNTERS: Final = {
    outcome: IDEMPOTENCY_REQUESTS.labels(outcome=outcome)
    for outcome in ("executed", "replayed", "reused", "in_progress", "released", "store_error")
}


class IdempotencyKeyReused(BastionError):
    """The key was used before with a different request (method, path, type or body)."""

    code = ErrorCode.IDEMPOTENCY_KEY_REUSED


# -- the mark -------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class IdempotentRoute:
    """What :func:`idempotent` asked for one endpoint.

    Attributes:
        required: a request without the header is refused (422).
        ttl: seconds a response is kept for replay; ``None`` for ``http.idempotency.ttl``.
    """

    required: bool = False
    ttl: float | None = None


def idempotent(*, required: bool = False, ttl: float | None = None) -> Callable[[E], E]:
    """Honour ``Idempotency-Key`` on a POST or PATCH endpoint.

    Only marks the endpoint and returns it unchanged, so it may sit above or
    below the route decorator. The route must accept POST or PATCH only; any
    other method is refused when the routes are read (start-up, or the first request).

    Example:
        >>> @app.post("/v1/payments")
        ... @idempotent(required=True)
        ... async def pay(payment: Payment) -> Receipt: ...

    Args:
        required: refuse a request without the header (422 ``INVALID_INPUT``).
        ttl: seconds a response is kept for replay; ``http.idempotency.ttl`` when omitted.

    Raises:
        ConfigurationError: ``ttl`` is not a positive number.
    """
    if ttl is not None and (isinstance(ttl, bool) or not ttl > 0):
        raise ConfigurationError(
            f"@idempotent: ttl must be a positive number of seconds, not {ttl!r}"
        )
    return mark_endpoint("idempotent", MARK, IdempotentRoute(required=required, ttl=ttl))


@dataclass(frozen=True, slots=True)
class _Plan:
    template: str
    required: bool
    ttl: float


def _plans(
    routes: Sequence[BaseRoute], default_ttl: float
) -> tuple[RouteTable[_Plan | None], bool] | None:
    """The table of marked routes, and whether one requires the key; ``None`` when none is marked.

    Raises:
        ConfigurationError: a marked route accepts a method other than POST or PATCH.
    """
    entries = list(route_entries(routes))
    marked = False
    required = False
    for entry in entries:
        route: IdempotentRoute | None = getattr(entry.endpoint, MARK, None)
        if route is None:
            continue
        if entry.methods is None or not entry.methods <= METHODS:
            methods = ", ".join(sorted(entry.methods or {"any"}))
            raise ConfigurationError(
                f"@idempotent on {entry.template}: only POST and PATCH routes take an "
                f"Idempotency-Key, this one accepts {methods}"
            )
        marked = True
        required = required or route.required
    if not marked:
        return None

    def plan(entry: RouteEntry, method: str) -> _Plan | None:
        route: IdempotentRoute | None = getattr(entry.endpoint, MARK, None)
        if route is None or entry.template is None or method not in METHODS:
            return None
        return _Plan(
            entry.template, route.required, route.ttl if route.ttl is not None else default_ttl
        )

    return RouteTable(entries, plan, None), required


def check_idempotent_routes(routes: Sequence[BaseRoute]) -> int:
    """Check the marks of an app's routes at start-up; return how many routes are marked.

    Raises:
        ConfigurationError: a marked route accepts a method other than POST or PATCH.
    """
    _plans(routes, 1.0)
    return sum(
        1 for entry in route_entries(routes) if getattr(entry.endpoint, MARK, None) is not None
    )


# -- keys and fingerprints ------------------------------------------------------------------


def _invalid(message: str, limit: int | None = None) -> InvalidInput:
    return InvalidInput(
        f"The {HEADER} header is invalid: {message}.",
        errors=[FieldError(FIELD, "invalid", message, limit)],
    )


def parse_idempotency_key(raw: bytes, max_length: int) -> str:
    """Return the key a header value carries.

    The draft makes the value a Structured Field String (``"8e03978e-..."``); the
    bare form (``8e03978e-...``) most clients send is accepted too, and both name
    the same key. The key is 1 to ``max_length`` printable ASCII characters.

    Raises:
        InvalidInput: empty, too long, not printable ASCII, or a malformed string.
    """
    if raw[:1] == b'"':
        key = _sf_string(raw)
    else:
        # Visible ASCII: a bare token has no spaces, quotes or backslashes.
        if not raw or not _BARE.issuperset(raw):
            raise _invalid("a bare key is printable ASCII without spaces, quotes or backslashes")
        key = raw.decode("ascii")
    if not key:
        raise _invalid("the key is empty")
    if len(key) > max_length:
        raise _invalid(f"the key is longer than {max_length} characters", max_length)
    return key


def _sf_string(raw: bytes) -> str:
    r"""Parse an RFC 8941 sf-string (escapes ``\\"`` and ``\\\\`` only)."""
    out = bytearray()
    index = 1
    end = len(raw)
    while index < end:
        byte = raw[index]
        if byte == _BACKSLASH:
            if index + 1 >= end or raw[index + 1] not in b'"\\':
                raise _invalid('a quoted key escapes only " and \\')
            out.append(raw[index + 1])
            index += 2
            continue
        if byte == _QUOTE:  # the closing one
            if index != end - 1:
                # Parameters (;a=1) or anything after the string: not a key we can name.
                raise _invalid("nothing may follow the quoted key")
            return out.decode("ascii")
        if byte not in _PLAIN:
            raise _invalid("a quoted key is printable ASCII")
        out.append(byte)
        index += 1
    raise _invalid("the quoted key has no closing quote")


def _framed(digest: Any, *parts: bytes) -> None:
    # Each part's length first: ("ab", "c") and ("a", "bc") never hash alike.
    for part in parts:
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)


def fingerprint(
    method: str, path: bytes, query: bytes, content_type: bytes, body: Iterable[bytes]
) -> str:
    """Return the hex SHA-256 naming a request: method, path and query, content type and body.

    Two requests with the same key but different fingerprints are a reused key (422).
    """
    digest = hashlib.sha256()
    _framed(digest, method.encode(), path, query, content_type)
    for chunk in body:
        digest.update(chunk)
    return digest.hexdigest()


def record_key(*, tenant: str | None, caller: str, method: str, template: str, key: str) -> str:
    """Return the hex SHA-256 a key is stored under: scoped to the caller and the route.

    Args:
        tenant: the tenant the request acts for, or ``None``.
        caller: ``<kind>:<subject>`` of the principal, or ``ip:<address>`` when anonymous.
        method: the request's method.
        template: the route template.
        key: the client's key.
    """
    digest = hashlib.sha256()
    _framed(
        digest,
        # "t:" marks a tenant, so no tenant and an empty tenant id stay apart.
        b"" if tenant is None else b"t:" + tenant.encode(),
        caller.encode(),
        method.encode(),
        template.encode(),
        key.encode(),
    )
    return digest.hexdigest()


def _caller(scope: Scope) -> tuple[str | None, str]:
    principal = current_principal()
    context = current_context()
    if principal is not None:
        # An external issuer's subjects are its own namespace: two issuers may reuse one.
        issuer = f"@{principal.issuer}" if principal.issuer else ""
        tenant = principal.tenant_id or (context.tenant_id if context is not None else None)
        return tenant, f"{principal.kind}:{principal.subject}{issuer}"
    address = context.client_ip if context is not None else None
    if address is None:
        client = scope.get("client")
        address = client[0] if client else "-"
    return (context.tenant_id if context is not None else None), f"ip:{address}"


# -- the middleware -------------------------------------------------------------------------


class IdempotencyMiddleware:
    """Executes a keyed POST or PATCH to an :func:`idempotent` route once; replays it after.

    Requests of other methods, without the header (to routes that do not require
    it) and to unmarked routes pass straight through: a method check, a scan of
    the headers, and one lookup in the route table, built on the first request
    and rebuilt when the app's routes change.

    Args:
        app: the wrapped ASGI app.
        settings: the ``http.idempotency`` section.
        store: where keys and responses live (:func:`build_idempotency_store`).
    """

    def __init__(
        self, app: ASGIApp, *, settings: IdempotencySettings, store: IdempotencyStore
    ) -> None:
        self.app = app
        self.settings = settings
        self.store = store
        self._table: RouteTable[_Plan | None] | None = None
        self._required = False
        self._route_count = -1

    def _resolve(self, scope: Scope, method: str) -> _Plan | None:
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", None) or []
        if len(routes) != self._route_count:
            built = _plans(routes, self.settings.ttl)
            self._route_count = len(routes)
            self._table, self._required = built if built is not None else (None, False)
        table = self._table
        if table is None:
            return None
        path = scope["path"]
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path) and path != root_path:
            path = path[len(root_path) :]
        return table.resolve(method, path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in METHODS or not self.settings.enabled:
            await self.app(scope, receive, send)
            return
        raw: bytes | None = None
        repeated = False
        for name, value in scope["headers"]:
            if name == _HEADER_NAME:
                repeated = raw is not None
                raw = value
        if raw is None and not (self._required or self._route_count < 0):
            await self.app(scope, receive, send)
            return
        method = scope["method"]
        plan = self._resolve(scope, method)
        if plan is None:
            await self.app(scope, receive, send)
            return
        if raw is None:
            if not plan.required:
                await self.app(scope, receive, send)
                return
            await _answer(
                InvalidInput(
                    f"This operation requires an {HEADER} header.",
                    errors=[FieldError(FIELD, "missing", f"the {HEADER} header is required")],
                ),
                scope,
                plan.template,
                receive,
                send,
            )
            return
        try:
            if repeated:
                raise _invalid("send one key, not several")
            key = parse_idempotency_key(raw.strip(), self.settings.max_key_length)
        except InvalidInput as error:
            await _answer(error, scope, plan.template, receive, send)
            return
        await self._keyed(scope, receive, send, plan, key)

    async def _keyed(
        self, scope: Scope, receive: Receive, send: Send, plan: _Plan, key: str
    ) -> None:
        method = scope["method"]
        body: list[bytes] = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left before its body arrived: nothing to execute or answer.
                return
            chunk = message.get("body", b"")
            if chunk:
                body.append(chunk)
            if not message.get("more_body", False):
                break
        content_type = next(
            (value for name, value in scope["headers"] if name == _CONTENT_TYPE), b""
        )
        path = scope.get("raw_path") or scope["path"].encode()
        signature = fingerprint(method, path, scope.get("query_string", b""), content_type, body)
        tenant, caller = _caller(scope)
        exchange = _Exchange(
            scope,
            receive,
            send,
            plan,
            record_key(
                tenant=tenant, caller=caller, method=method, template=plan.template, key=key
            ),
            signature,
            secrets.token_hex(16),
        )
        try:
            record = await self.store.acquire(
                exchange.key,
                signature,
                exchange.token,
                lock_timeout=self.settings.lock_timeout,
            )
        except IdempotencyStoreError as exc:
            _COUNTERS["store_error"].inc()
            logger.warning("idempotency store unavailable", error=str(exc))
            await exchange.answer(
                ServiceUnavailable(
                    "Idempotency keys cannot be checked now; retry later with the same key.",
                    headers={"Retry-After": "1"},
                )
            )
            return
        if record is not None:
            await self._answer_held(record, exchange)
            return
        await self._execute(exchange, body)

    @staticmethod
    async def _answer_held(record: IdempotencyRecord, exchange: _Exchange) -> None:
        if record.fingerprint != exchange.signature:
            _COUNTERS["reused"].inc()
            await exchange.answer(
                IdempotencyKeyReused(
                    f"This {HEADER} was used with a different request; use a new key."
                )
            )
            return
        response = record.response
        if response is None:
            _COUNTERS["in_progress"].inc()
            await exchange.answer(
                Conflict(
                    f"A request with this {HEADER} is still in progress; retry later.",
                    headers={"Retry-After": "1"},
                )
            )
            return
        _COUNTERS["replayed"].inc()
        name_route(exchange.scope, exchange.plan.template)
        headers = [
            *response.headers,
            (b"content-length", str(len(response.body)).encode()),
            (REPLAYED_HEADER.lower().encode(), b"true"),
        ]
        send = exchange.send
        await send({"type": "http.response.start", "status": response.status, "headers": headers})
        await send({"type": "http.response.body", "body": response.body})

    async def _execute(self, exchange: _Exchange, body: list[bytes]) -> None:
        scope, receive, send, plan = exchange.scope, exchange.receive, exchange.send, exchange.plan
        stored_key, signature, token = exchange.key, exchange.signature, exchange.token
        limit = self.settings.max_response_size
        pending = list(body)
        status = 0
        kept: list[tuple[bytes, bytes]] = []
        chunks: list[bytes] = []
        size = 0
        too_large = False
        finished = False

        async def replay_body() -> Message:
            # The body was read to fingerprint it; the app gets it back as it came.
            if pending:
                chunk = pending.pop(0)
                return {"type": "http.request", "body": chunk, "more_body": bool(pending)}
            if not body:
                body.append(b"")
                return {"type": "http.request", "body": b"", "more_body": False}
            return await receive()

        def capture(message: Message) -> Awaitable[None]:
            nonlocal status, size, too_large, finished
            kind = message["type"]
            if kind == "http.response.start":
                status = message["status"]
                kept.extend(
                    (bytes(name).lower(), bytes(value))
                    for name, value in message.get("headers", ())
                    if bytes(name).lower() not in _NOT_STORED
                )
            elif kind == "http.response.body" and not too_large:
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    too_large = True
                    chunks.clear()
                elif chunk:
                    chunks.append(chunk)
                if not message.get("more_body", False):
                    finished = True
            return send(message)

        try:
            await self.app(scope, replay_body, capture)
        except BaseException:
            await self._release(stored_key, signature, token, shielded=True)
            raise
        if not finished or too_large or status >= _SERVER_ERROR or status in _RETRYABLE:
            await self._release(stored_key, signature, token, shielded=False)
            return
        response = StoredResponse(status, tuple(kept), b"".join(chunks))
        try:
            stored = await self.store.complete(stored_key, signature, token, response, ttl=plan.ttl)
        except IdempotencyStoreError as exc:
            # The client has its answer; a retry finds the key held until the lock
            # expires (409), then executes again: the guarantee's one gap, logged.
            _COUNTERS["store_error"].inc()
            logger.error(  # noqa: TRY400 -- the store's error is in `error`, no traceback wanted
                "idempotent response not stored", error=str(exc), route=plan.template
            )
            return
        if not stored:
            logger.warning(
                "idempotent response not stored: the lock expired and the key was taken over",
                route=plan.template,
            )
        _COUNTERS["executed"].inc()

    async def _release(
        self, stored_key: str, signature: str, token: str, *, shielded: bool
    ) -> None:
        _COUNTERS["released"].inc()
        try:
            if shielded:
                # After a cancellation every await in the cancelled scope is cancelled
                # again: shield the release, bounded, or the key waits out its lock.
                with anyio.CancelScope(shield=True), anyio.move_on_after(_RELEASE_TIMEOUT):
                    await self.store.release(stored_key, signature, token)
            else:
                await self.store.release(stored_key, signature, token)
        except IdempotencyStoreError as exc:
            logger.warning(
                "idempotency key not released; it frees at its lock expiry", error=str(exc)
            )


@dataclass(frozen=True, slots=True)
class _Exchange:
    """One keyed request: how to answer it, and what names it in the store."""

    scope: Scope
    receive: Receive
    send: Send
    plan: _Plan
    key: str
    signature: str
    token: str

    async def answer(self, error: BastionError) -> None:
        await _answer(error, self.scope, self.plan.template, self.receive, self.send)


async def _answer(
    error: BastionError, scope: Scope, template: str, receive: Receive, send: Send
) -> None:
    name_route(scope, template)
    await send_problem(error, scope, receive, send)


# -- wiring ---------------------------------------------------------------------------------


def idempotent_operations(routes: Sequence[BaseRoute]) -> dict[tuple[str, str], IdempotentRoute]:
    """Return the marked operations, ``(METHOD, template)`` to their mark, for the OpenAPI."""
    found: dict[tuple[str, str], IdempotentRoute] = {}
    for entry in route_entries(routes):
        route: IdempotentRoute | None = getattr(entry.endpoint, MARK, None)
        if route is None or entry.template is None:
            continue
        for method in entry.methods or ():
            if method in METHODS:
                found[method, entry.template] = route
    return found


def document_idempotency(operation: dict[str, Any], route: IdempotentRoute) -> None:
    """Describe the key on one OpenAPI operation: the header parameter, 409, 422 and 503.

    Args:
        operation: the operation object (``schema["paths"][template][method]``), changed in place.
        route: its mark.
    """
    parameters = operation.setdefault("parameters", [])
    if not any(parameter.get("name") == HEADER for parameter in parameters):
        parameters.append(
            {
                "name": HEADER,
                "in": "header",
                "required": route.required,
                "description": (
                    "A unique key per operation (a UUID): a retry with the same key and "
                    "request gets the first response again, marked "
                    f"`{REPLAYED_HEADER}: true`, instead of executing twice."
                ),
                "schema": {"type": "string", "minLength": 1},
            }
        )
    responses = operation.setdefault("responses", {})
    documented = problem_responses(
        ErrorCode.CONFLICT,
        ErrorCode.IDEMPOTENCY_KEY_REUSED,
        ErrorCode.INVALID_INPUT,
        ErrorCode.SERVICE_UNAVAILABLE,
    )
    for status, response in documented.items():
        existing = responses.get(str(status))
        if existing is None:
            responses[str(status)] = response
            continue
        codes = sorted({*existing.get("x-error-codes", []), *response["x-error-codes"]})
        existing["x-error-codes"] = codes
        existing["description"] = "Error codes: " + ", ".join(codes)


async def start_idempotency(
    store: IdempotencyStore, settings: Settings, routes: Sequence[BaseRoute]
) -> None:
    """The start-up hook: check the marks, start the store, say where keys live.

    A memory store under more than one worker is a warning: each worker would
    hold its own keys, and a retry reaching another worker would execute again.

    Raises:
        ConfigurationError: a marked route accepts a method other than POST or PATCH.
    """
    marked = check_idempotent_routes(routes)
    await store.start()
    logger.info("idempotency keys configured", store=store.kind, routes=marked)
    if store.kind == "memory" and settings.server.workers > 1 and marked:
        logger.warning(
            "idempotency keys are kept in memory with several workers: a retry reaching "
            "another worker executes again; set BASTION_REDIS__URL or "
            "BASTION_HTTP__IDEMPOTENCY__STORE_URL",
            workers=settings.server.workers,
        )
    resilience = settings.resilience
    deadlines = [resilience.request_deadline, *resilience.route_deadlines.values()]
    longest = max(deadlines) if resilience.enabled and all(deadlines) else None
    lock = settings.http.idempotency.lock_timeout
    if marked and (longest is None or longest >= lock):
        # A request still running when its lock expires lets a retry take the key and run
        # the operation a second time: the lock must outlast every request.
        logger.warning(
            "http.idempotency.lock_timeout does not outlast every request deadline: a retry "
            "may run an operation still in progress; raise it above the longest deadline",
            lock_timeout=lock,
            longest_deadline=longest,
        )


async def stop_idempotency(store: IdempotencyStore) -> None:
    """The shutdown hook: stop the purge, close what the store owns."""
    await store.stop()
