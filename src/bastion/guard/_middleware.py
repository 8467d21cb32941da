"""The request guard: refuses what a route must never see before the router runs.

Per request, in this order, each a problem answered here (outside the app's
exception handlers) and counted in ``bastion_guard_rejections_total{reason}``:

1. headers: more than ``guard.max_header_count``, or names and values together
   over ``guard.max_header_bytes`` (431 ``HEADERS_TOO_LARGE``);
2. the request line: a query string over ``guard.max_query_bytes`` (414
   ``URI_TOO_LONG``); a path or query string that is not UTF-8 once
   percent-decoded, or holds a NUL (422 ``INVALID_INPUT``);
3. the body's size: a ``Content-Length`` over the route's limit is refused
   before a byte is read; a body without one is counted as it arrives (413
   ``PAYLOAD_TOO_LARGE``);
4. the body's media type against the route's list (415 ``UNSUPPORTED_MEDIA_TYPE``):
   its ``@limits(content_types=...)``, else the types of ``guard.content_types``
   its declared body can be read from (JSON ones for a FastAPI model body, forms
   for ``Form``/``File`` parameters, all of them for a route without one);
5. the body's content, for the media types that need it: JSON is buffered
   (bounded by the limit) and checked for encoding, NUL characters, syntax,
   depth and value count (:mod:`bastion.guard._json_shape`); a form is checked
   for encoding and NUL characters; anything else (uploads) streams through,
   counted, never buffered.

Only requests a route will take are guarded: operational paths and requests no
route matches pass untouched, and the router answers them.

A body refused while the app is reading it (a chunked upload passing the limit)
makes the app's ``receive`` raise an error that is both a
:class:`~bastion.errors.PayloadTooLarge` and a Starlette ``HTTPException``:
FastAPI re-raises ``HTTPException`` from body parsing (anything else becomes a
400), the app's bastion handler renders it, and if the app has none this
middleware answers, unless the response had already started. The app never
sees a truncated body as if it were whole.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import structlog
from fastapi import params
from starlette.exceptions import HTTPException
from starlette.routing import BaseRoute
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion._routes import ANY_METHOD, PathSet, RouteEntry, RouteTable, name_route, route_entries
from bastion.errors import (
    BastionError,
    ConfigurationError,
    ErrorCode,
    FieldError,
    InvalidInput,
    PayloadTooLarge,
    UnsupportedMediaType,
)
from bastion.guard._json_shape import inspect_json
from bastion.guard._marks import MARK, ORJSON_MAX_DEPTH, RouteLimits, media_type
from bastion.guard._request import EncodingFault, check_percent_encoded
from bastion.observability import send_problem
from bastion.observability.metrics import GUARD_REJECTIONS
from bastion.settings import GuardSettings

__all__ = ["GUARD_REJECTIONS", "REASONS", "GuardMiddleware", "GuardPlan", "GuardRoutes"]

logger = structlog.get_logger("bastion.guard")

REASONS: Final = (
    "body_too_large",
    "media_type",
    "header_size",
    "header_count",
    "query_size",
    "invalid_utf8",
    "nul_character",
    "json_invalid",
    "json_depth",
    "json_elements",
)
"""Every value of the ``reason`` label: a fixed set, so the metric stays bounded."""

for _reason in REASONS:
    # Every series exists from the start, so a rate() over it is never absent.
    GUARD_REJECTIONS.labels(_reason)

_FORM: Final = "application/x-www-form-urlencoded"
_PLAIN_HTTP: Final = frozenset({"1.0", "1.1"})
_ACCEPT_HEADER: Final = {"POST": "Accept-Post", "PATCH": "Accept-Patch"}


@dataclass(frozen=True, slots=True)
class GuardPlan:
    """What the guard checks for one route and method.

    Attributes:
        template: the route's template, naming refusals in metrics and logs.
        body_limit: the largest body, bytes.
        content_types: the media types the body may have.
        accepted: the same, in declaration order, for the 415's ``accepted``.
        json_max_depth: deepest nesting of a JSON body.
        json_max_elements: most values in a JSON body.
    """

    template: str | None
    body_limit: int
    content_types: frozenset[str]
    accepted: tuple[str, ...]
    json_max_depth: int
    json_max_elements: int


def _is_json(media: str) -> bool:
    return media == "application/json" or media.endswith("+json")


_FORM_TYPES: Final = frozenset({"application/x-www-form-urlencoded", "multipart/form-data"})


def _body_media(route: object, listed: tuple[str, ...]) -> tuple[str, ...]:
    """The media types of ``listed`` that a FastAPI route's declared body is read from.

    FastAPI reads a model body only from JSON (anything else reaches validation as
    bytes: a 422 that names no field the client sent) and ``Form``/``File``
    parameters only from forms; the route's 415 says so instead. A route without a
    declared body (it may read ``request.body()`` itself), and any other kind of
    route, keeps the whole list.
    """
    body_field = getattr(route, "body_field", None)
    if body_field is None:
        return listed
    form = isinstance(body_field.field_info, params.Form)
    fitting = tuple(
        media for media in listed if (media in _FORM_TYPES if form else _is_json(media))
    )
    return fitting or listed


class GuardRoutes:
    """The guard plan of every route of an app, read from its routes.

    Read once at start-up (:meth:`read`, which also checks that marks name
    route classes that exist), and again by the middleware when the app's
    routes change.

    Args:
        settings: the ``guard`` section.

    Raises:
        ConfigurationError: ``guard.route_classes`` names a class that
            ``guard.body_limits`` does not define.
    """

    def __init__(self, settings: GuardSettings) -> None:
        self.settings = settings
        self.body_limits = {name: int(size) for name, size in settings.body_limits.items()}
        accepted = tuple(dict.fromkeys(media_type(value) for value in settings.content_types))
        self.accepted = accepted
        self.route_classes: dict[tuple[str, str], str] = {}
        for key, name in settings.route_classes.items():
            if name not in self.body_limits:
                raise ConfigurationError(
                    f"guard.route_classes[{key!r}] names the route class {name!r}, which"
                    f" guard.body_limits does not define ({', '.join(sorted(self.body_limits))})"
                )
            method, _, template = key.strip().rpartition(" ")
            self.route_classes[(method.strip().upper() or ANY_METHOD, template)] = name
        self.table: RouteTable[GuardPlan | None] | None = None
        self.routes: Sequence[BaseRoute] | None = None
        self.route_count = -1

    def read(self, routes: Sequence[BaseRoute]) -> None:
        """Build the plan of every route of ``routes``.

        Raises:
            ConfigurationError: a ``@limits`` mark names a route class that
                ``guard.body_limits`` does not define.
        """
        used: set[tuple[str, str]] = set()
        plans: dict[GuardPlan, GuardPlan] = {}

        def plan(entry: RouteEntry, method: str) -> GuardPlan | None:
            made = self._plan(entry, method, used)
            # Identical plans shared: a large app has a handful of distinct ones.
            return plans.setdefault(made, made)

        table: RouteTable[GuardPlan | None] = RouteTable(
            list(route_entries(routes)),
            plan,
            None,
            methods=[method for method, _ in self.route_classes if method != ANY_METHOD],
        )
        unused = sorted(
            f"{method} {template}" if method != ANY_METHOD else template
            for method, template in set(self.route_classes) - used
        )
        if unused:
            logger.warning("guard.route_classes name no route of the app", routes=unused)
        self.table = table
        self.routes = routes
        self.route_count = len(routes)

    def _plan(self, entry: RouteEntry, method: str, used: set[tuple[str, str]]) -> GuardPlan:
        template = entry.template
        mark = getattr(entry.endpoint, MARK, None)
        if not isinstance(mark, RouteLimits):
            mark = RouteLimits()
        where = f"{method} {template}"
        body: str | int = "default"
        for key in (
            (method, template or ""),
            (method, entry.declared or ""),
            (ANY_METHOD, template or ""),
            (ANY_METHOD, entry.declared or ""),
        ):
            name = self.route_classes.get(key)
            if name is not None:
                used.add(key)
                body = name
                break
        if mark.body is not None:
            body = mark.body
        if isinstance(body, str):
            limit = self.body_limits.get(body)
            if limit is None:
                raise ConfigurationError(
                    f"@limits on {where} names the route class {body!r}, which"
                    f" guard.body_limits does not define ({', '.join(sorted(self.body_limits))})"
                )
        else:
            limit = body
        if mark.content_types is not None:
            accepted = mark.content_types
        else:
            accepted = _body_media(entry.route, self.accepted)
        settings = self.settings
        return GuardPlan(
            template,
            limit,
            frozenset(accepted),
            accepted,
            min(mark.json_max_depth or settings.json_max_depth, ORJSON_MAX_DEPTH),
            mark.json_max_elements or settings.json_max_elements,
        )

    def resolve(self, method: str, path: str) -> GuardPlan | None:
        """Return the plan of the route ``method`` and ``path`` reach, ``None`` for none."""
        table = self.table
        return table.resolve(method, path) if table is not None else None


class _StreamRefused(BastionError, HTTPException):  # type: ignore[misc]  # headers: a dict is a Mapping
    """Raised by the app's ``receive`` when the streaming body breaks a limit.

    A :class:`BastionError` first (the app's bastion handler renders it with its
    extension members) and an ``HTTPException`` too: FastAPI re-raises those
    from body parsing where any other error would become a 400.
    """

    def __init__(self, error: BastionError) -> None:
        # Not BastionError.__init__: its super() call would reach HTTPException's
        # __init__ with the detail as the status code.
        HTTPException.__init__(self, error.status, error.detail, dict(error.headers))
        Exception.__init__(self, error.detail)
        self.code = error.code
        self.status = error.status
        self.headers = dict(error.headers)
        self.extra = dict(error.extra)


class GuardMiddleware:
    """Refuses requests whose headers, request line or body break their route's limits.

    Example:
        >>> app.add_middleware(GuardMiddleware, settings=settings.guard)

    Args:
        app: the wrapped ASGI app.
        settings: the ``guard`` section.
        operational_prefixes: paths never guarded (``/health/``, ``/metrics``).
        routes: the plans, when start-up builds them (:meth:`GuardRoutes.read`);
            else read from the app's routes on the first request.

    Raises:
        ConfigurationError: ``guard.route_classes`` names an undefined class.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: GuardSettings,
        operational_prefixes: Sequence[str] = (),
        routes: GuardRoutes | None = None,
    ) -> None:
        self.app = app
        self.enabled = settings.enabled
        self.routes = routes if routes is not None else GuardRoutes(settings)
        self.operational_prefixes = PathSet(operational_prefixes)
        self.max_header_bytes = settings.max_header_bytes
        self.max_header_count = settings.max_header_count
        self.max_query_bytes = settings.max_query_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0911, PLR0912, PLR0915 -- one frame on every request; helpers cost a call each
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        if self.operational_prefixes and self.operational_prefixes.matches(path):
            await self.app(scope, receive, send)
            return
        routes = self.routes
        known = routes.routes
        if known is None or len(known) != routes.route_count:
            # Not read at start-up, or routes were added since: read them now.
            if known is None:
                known = getattr(getattr(scope.get("app"), "router", None), "routes", [])
            routes.read(known)
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path) and path != root_path:
            # The router matches the path below the root path (Starlette's get_route_path).
            path = path[len(root_path) :]
        plan = routes.resolve(scope["method"], path)
        if plan is None:
            await self.app(scope, receive, send)
            return

        headers = scope["headers"]
        if len(headers) > self.max_header_count:
            limit = self.max_header_count
            error = BastionError(
                f"The request has more than {limit} headers.",
                code=ErrorCode.HEADERS_TOO_LARGE,
                extra={"limit": limit},
            )
            await self._refuse("header_count", error, plan, scope, receive, send)
            return
        size = 0
        content_type: bytes | None = None
        length: bytes | None = None
        chunked = False
        content_types = 0
        for name, value in headers:
            size += len(name) + len(value)
            if name == b"content-type":
                content_type = value
                content_types += 1
            elif name == b"content-length":
                length = value
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value.lower()
        if size > self.max_header_bytes:
            limit = self.max_header_bytes
            error = BastionError(
                f"The request headers are larger than {limit} bytes.",
                code=ErrorCode.HEADERS_TOO_LARGE,
                extra={"limit": limit},
            )
            await self._refuse("header_size", error, plan, scope, receive, send)
            return
        if content_types > 1:
            # A singleton field (RFC 9110): the guard and the app could each believe a
            # different one, and a body checked as an upload be parsed as JSON.
            error = UnsupportedMediaType(
                "Send exactly one Content-Type header.",
                extra={"accepted": list(plan.content_types)},
            )
            await self._refuse("media_type", error, plan, scope, receive, send)
            return
        query: bytes = scope.get("query_string", b"")
        if query:
            if len(query) > self.max_query_bytes:
                limit = self.max_query_bytes
                error = BastionError(
                    f"The query string is longer than {limit} bytes.",
                    code=ErrorCode.URI_TOO_LONG,
                    extra={"limit": limit},
                )
                await self._refuse("query_size", error, plan, scope, receive, send)
                return
            query_fault = check_percent_encoded(query)
            if query_fault is not None:
                await self._refuse_encoding(query_fault, "query", plan, scope, receive, send)
                return
        raw_path = scope.get("raw_path")
        fault: EncodingFault | None
        if raw_path is not None:
            fault = check_percent_encoded(raw_path)
        else:
            fault = _check_decoded_path(scope["path"])
        if fault is not None:
            await self._refuse_encoding(fault, "path", plan, scope, receive, send)
            return

        declared: int | None = None
        if length is not None:
            declared = int(length) if length.isdigit() else None
            if declared == 0 and not chunked:
                await self.app(scope, receive, send)
                return
        elif not chunked and scope.get("http_version", "1.1") in _PLAIN_HTTP:
            # HTTP/1.x: a request with neither header has no body (RFC 9112, 6.3).
            await self.app(scope, receive, send)
            return
        # A body, or (HTTP/2 and 3, where the length is optional) perhaps one.
        known_body = chunked or declared is not None
        limit = plan.body_limit
        if declared is not None and declared > limit:
            await self._refuse("body_too_large", _too_large(limit), plan, scope, receive, send)
            return
        media = media_type(content_type.decode("latin-1")) if content_type is not None else None
        unsupported: BastionError | None = None
        if media is None or media not in plan.content_types:
            unsupported = _unsupported(plan, media, scope["method"])
            if known_body:
                await self._refuse("media_type", unsupported, plan, scope, receive, send)
                return
        elif _is_json(media) or media == _FORM:
            await self._inspected(media, plan, scope, receive, send)
            return
        await self._streamed(unsupported, plan, scope, receive, send)

    async def _inspected(
        self, media: str, plan: GuardPlan, scope: Scope, receive: Receive, send: Send
    ) -> None:
        """Buffer a body that must be read whole to be checked, check it, then replay it."""
        limit = plan.body_limit
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                # The client left mid-body: nobody to answer, and the app never started.
                return
            chunk: bytes = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > limit:
                    await self._refuse(
                        "body_too_large", _too_large(limit), plan, scope, receive, send
                    )
                    return
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if media == _FORM:
            fault = check_percent_encoded(body)
            if fault is not None:
                await self._refuse_encoding(fault, "body", plan, scope, receive, send)
                return
        else:
            violation = inspect_json(
                body, max_depth=plan.json_max_depth, max_elements=plan.json_max_elements
            )
            if violation is not None:
                error = InvalidInput(
                    violation.message,
                    errors=[FieldError("body", violation.code, violation.message, violation.limit)],
                )
                await self._refuse(violation.reason, error, plan, scope, receive, send)
                return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                # Later calls wait for the disconnect, as they would unguarded.
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _streamed(
        self,
        unsupported: BastionError | None,
        plan: GuardPlan,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        """Pass a body through as it arrives, counting it; refuse it once it passes the limit.

        ``unsupported`` is set when a body of unknown length (HTTP/2) has a media
        type the route does not take: refused at its first byte, if any comes.
        """
        limit = plan.body_limit
        received = 0
        refused: _StreamRefused | None = None
        started = False

        async def counted() -> Message:
            nonlocal received, refused
            if refused is not None:
                raise refused
            message = await receive()
            if message["type"] == "http.request":
                chunk = message.get("body", b"")
                if chunk:
                    received += len(chunk)
                    if unsupported is not None:
                        refused = _StreamRefused(unsupported)
                        self._record("media_type", plan, scope, unsupported.status)
                        raise refused
                    if received > limit:
                        refused = _StreamRefused(_too_large(limit))
                        self._record("body_too_large", plan, scope, refused.status)
                        raise refused
            return message

        def watched(message: Message) -> Awaitable[None]:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            return send(message)

        try:
            await self.app(scope, counted, watched)
        except Exception as error:
            if refused is None or not _only_refusals(error):
                raise
        if refused is not None and not started:
            # The app let the refusal through, or swallowed it without answering.
            await send_problem(refused, scope, receive, send)
        # Refused after the app started answering: half a response is out and the
        # server closes the connection when the app returns without finishing it.

    @staticmethod
    def _record(reason: str, plan: GuardPlan, scope: Scope, status: int) -> None:
        _COUNT[reason]()
        logger.info(
            "request refused by the guard",
            reason=reason,
            status=status,
            method=scope["method"],
            route=plan.template,
        )

    async def _refuse(  # noqa: PLR0917 -- private, called positionally like an ASGI app
        self,
        reason: str,
        error: BastionError,
        plan: GuardPlan,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        self._record(reason, plan, scope, error.status)
        name_route(scope, plan.template)
        await send_problem(error, scope, receive, send)

    async def _refuse_encoding(  # noqa: PLR0917 -- private, called positionally like an ASGI app
        self,
        fault: str,
        field: str,
        plan: GuardPlan,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        where = {"query": "The query string", "path": "The path", "body": "The body"}[field]
        message = (
            f"{where} contains a NUL character."
            if fault == "nul_character"
            else f"{where} is not valid UTF-8 once percent-decoded."
        )
        error = InvalidInput("The request was refused.", errors=[FieldError(field, fault, message)])
        await self._refuse(fault, error, plan, scope, receive, send)


def _only_refusals(error: Exception) -> bool:
    """Whether ``error`` is the guard's refusal, alone or in a group.

    A streaming response reads ``receive`` from two tasks, and both see the refusal.
    """
    if isinstance(error, _StreamRefused):
        return True
    if isinstance(error, ExceptionGroup):
        _, rest = error.split(_StreamRefused)
        return rest is None
    return False


def _check_decoded_path(path: str) -> EncodingFault | None:
    """Check a path when the server gave no ``raw_path``: only what survives decoding shows."""
    if "\x00" in path:
        return "nul_character"
    if not path.isascii():
        try:
            path.encode()
        except UnicodeEncodeError:
            return "invalid_utf8"
    return None


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(
        f"The request body is larger than this route accepts ({limit} bytes).",
        extra={"limit": limit},
    )


def _unsupported(plan: GuardPlan, media: str | None, method: str) -> UnsupportedMediaType:
    accepted = list(plan.accepted)
    listed = ", ".join(accepted) if accepted else "none: this route takes no body"
    if media is None:
        detail = f"The request has a body but no Content-Type; accepted: {listed}."
    else:
        # The client's value is not quoted back: it is free text of any length.
        detail = f"This route does not take bodies of that media type; accepted: {listed}."
    header = _ACCEPT_HEADER.get(method)
    return UnsupportedMediaType(
        detail,
        headers={header: ", ".join(accepted)} if header is not None and accepted else None,
        extra={"accepted": accepted},
    )


def _counter(reason: str) -> Callable[[], None]:
    child: Any = GUARD_REJECTIONS.labels(reason)
    return child.inc  # type: ignore[no-any-return]  # prometheus_client is untyped here


_COUNT: Final = {reason: _counter(reason) for reason in REASONS}
