"""API versions and their deprecation: ``Deprecation``, ``Sunset`` and ``Link`` headers, then 410.

Bastion's convention is the major version in the path (``/v1/documents``,
``/v2/documents``): visible in logs, metrics and caches, routable by any proxy,
and impossible to forget in a client. Minor changes are additive and need no
version; there is no header or media-type versioning.

A route is deprecated by its ``@deprecated`` mark, or by an entry of
``http.versioning.deprecations`` keyed by ``METHOD /template`` or by a path
prefix (``/v1/``). The mark wins over a template entry, which wins over the
longest matching prefix. Every response of a deprecated route carries
``Deprecation: @<unix seconds>`` (RFC 9745; a date in the future announces it),
``Sunset: <IMF-fixdate>`` (RFC 8594) when a sunset is set, and ``Link: <url>;
rel="deprecation"; type="text/html"`` (added to the app's own ``Link``) when a
link is set. From the sunset instant on, the route answers 410
``VERSION_SUNSET`` with the same headers, without calling the app. A prefix also
covers paths under it that no route matches, so a retired version's removed
routes answer 410 rather than 404.

Pure ASGI. The plan of each route is computed when the app's routes are first
read (:mod:`bastion._routes`); with nothing deprecated, a request costs one
length check. A deprecated call is counted in
``bastion_http_deprecated_requests_total`` and in :class:`DeprecationUsage`
(per client, batched in process).
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from email.utils import format_datetime
from typing import Any, Final, TypeVar

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion._access import AccessPolicy
from bastion._admin import query_count
from bastion._routes import RouteEntry, RouteTable, mark_endpoint, name_route, route_entries
from bastion.errors import (
    BastionError,
    ConfigurationError,
    ErrorCode,
    problem_responses,
)
from bastion.http._deprecation_usage import (
    ANONYMOUS,
    DEPRECATED_REQUESTS,
    SUNSET_REQUESTS,
    DeprecationUsage,
)
from bastion.identity import current_principal
from bastion.observability import send_problem
from bastion.settings import DeprecationSettings, VersioningSettings

__all__ = [
    "MARK",
    "Deprecation",
    "VersionSunset",
    "VersioningMiddleware",
    "deprecated",
    "deprecated_operations",
    "deprecation_routes",
    "document_deprecations",
]

E = TypeVar("E")

MARK: Final = "__bastion_deprecated__"
"""The endpoint attribute :func:`deprecated` sets."""

DEPRECATIONS_PATH: Final = "/admin/deprecations"
DEFAULT_REPORT_DAYS: Final = 7
_REALM: Final = "bastion-admin"
_LINK: Final = re.compile(r"[\x21-\x3b\x3d\x3f-\x7e]+")
_STANDARD_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)


def _utc(value: date | datetime) -> datetime:
    """An instant in UTC to the second; a date is its midnight UTC, a naive time is UTC."""
    if isinstance(value, datetime):
        moment = value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    else:
        moment = datetime(value.year, value.month, value.day, tzinfo=UTC)
    return moment.replace(microsecond=0)


def _check_link(link: str | None) -> str | None:
    if link is None:
        return None
    # It goes between < > in a header: visible ASCII only, no brackets (RFC 8288).
    if _LINK.fullmatch(link) is None:
        raise ConfigurationError(
            f"a deprecation link must be a URI of visible ASCII without < or >: {link!r}"
        )
    return link


@dataclass(frozen=True, slots=True)
class Deprecation:
    """When a route was (or will be) deprecated, when it stops answering, and where to read why.

    Attributes:
        deprecated_at: the ``Deprecation`` date (UTC, whole seconds).
        sunset_at: from this instant the route answers 410; ``None``: no date yet.
        link: the migration guide (``Link: <...>; rel="deprecation"``).
    """

    deprecated_at: datetime
    sunset_at: datetime | None = None
    link: str | None = None

    @classmethod
    def of(
        cls,
        on: date | datetime,
        sunset: date | datetime | None = None,
        link: str | None = None,
    ) -> Deprecation:
        """Build one from dates or datetimes (naive ones are UTC).

        Raises:
            ConfigurationError: the sunset comes before the deprecation, or the link
                cannot be sent in a header.
        """
        deprecated_at = _utc(on)
        sunset_at = _utc(sunset) if sunset is not None else None
        if sunset_at is not None and sunset_at < deprecated_at:
            raise ConfigurationError("a sunset cannot come before the deprecation (RFC 9745)")
        return cls(deprecated_at, sunset_at, _check_link(link))

    @classmethod
    def from_settings(cls, settings: DeprecationSettings) -> Deprecation:
        """Build one from an ``http.versioning.deprecations`` entry."""
        return cls.of(settings.deprecated_at, settings.sunset_at, settings.link)

    @property
    def deprecation_header(self) -> str:
        """``@<unix seconds>``: an RFC 9651 structured-field date."""
        return f"@{int(self.deprecated_at.timestamp())}"

    @property
    def sunset_header(self) -> str | None:
        """The sunset as an IMF-fixdate (``Sat, 01 Nov 2025 00:00:00 GMT``)."""
        if self.sunset_at is None:
            return None
        return format_datetime(self.sunset_at, usegmt=True)

    @property
    def link_header(self) -> str | None:
        """The ``Link`` value naming the migration guide."""
        if self.link is None:
            return None
        return f'<{self.link}>; rel="deprecation"; type="text/html"'


def deprecated(
    *, on: date | datetime, sunset: date | datetime | None = None, link: str | None = None
) -> Callable[[E], E]:
    """Mark an endpoint deprecated; it wins over ``http.versioning.deprecations``.

    The decorator returns the endpoint unchanged (FastAPI still reads its
    signature), so it may sit above or below the route decorator.

    Example:
        >>> @app.get("/v1/documents")
        ... @deprecated(on=date(2026, 1, 1), sunset=date(2026, 7, 1), link="https://docs/v2")
        ... async def list_documents() -> ...: ...

    Args:
        on: when it was (or will be) deprecated; a date is midnight UTC, a naive
            datetime is UTC.
        sunset: when it stops answering (410 ``VERSION_SUNSET`` from then on).
        link: the migration guide, sent as ``Link: <link>; rel="deprecation"``.

    Raises:
        ConfigurationError: the sunset is before ``on``, or the link is not a plain URI.
    """
    return mark_endpoint("deprecated", MARK, Deprecation.of(on, sunset, link))


class VersionSunset(BastionError):
    """The API version or route was retired at its sunset (410 ``VERSION_SUNSET``)."""

    code = ErrorCode.VERSION_SUNSET


@dataclass(frozen=True, slots=True)
class _Plan:
    """What to do for one deprecated route and method, computed once."""

    template: str
    method: str
    deprecation: Deprecation
    headers: tuple[tuple[bytes, bytes], ...]
    link: bytes | None
    sunset: float | None
    counted: Any  # the metric's child for this route and method
    refused: Any
    # Whether it is a route (counted per client) rather than a prefix's unmatched path.
    route: bool

    def error(self) -> VersionSunset:
        headers = {"deprecation": self.deprecation.deprecation_header}
        sunset = self.deprecation.sunset_header
        if sunset is not None:
            headers["sunset"] = sunset
        link = self.deprecation.link_header
        if link is not None:
            headers["link"] = link
        when = self.deprecation.sunset_at
        return VersionSunset(
            "This API version or route was retired"
            + (f" on {sunset}" if sunset else "")
            + (": the Link header names its successor." if link else "."),
            headers=headers,
            extra={"sunset": when.isoformat().replace("+00:00", "Z")} if when else None,
        )


def _plan(deprecation: Deprecation, template: str, method: str, *, route: bool) -> _Plan:
    headers = [(b"deprecation", deprecation.deprecation_header.encode("latin-1"))]
    sunset = deprecation.sunset_header
    if sunset is not None:
        headers.append((b"sunset", sunset.encode("latin-1")))
    link = deprecation.link_header
    label = method if method in _STANDARD_METHODS else "_OTHER"
    return _Plan(
        template=template,
        method=method,
        deprecation=deprecation,
        headers=tuple(headers),
        link=link.encode("latin-1") if link is not None else None,
        sunset=deprecation.sunset_at.timestamp() if deprecation.sunset_at else None,
        counted=DEPRECATED_REQUESTS.labels(template, label),
        refused=SUNSET_REQUESTS.labels(template, label),
        route=route,
    )


class _Deprecations:
    """The configured deprecations, resolved for routes: mark > template entry > prefix."""

    def __init__(self, settings: Mapping[str, DeprecationSettings]) -> None:
        self.templates: dict[tuple[str, str], Deprecation] = {}
        prefixes: list[tuple[str, Deprecation]] = []
        for key, entry in settings.items():
            deprecation = Deprecation.from_settings(entry)
            if key.startswith("/"):
                prefixes.append((key, deprecation))
                continue
            method, _, template = key.partition(" ")
            template = template.strip()
            if not method or not template.startswith("/") or " " in template:
                raise ConfigurationError(
                    "http.versioning.deprecations keys are a path prefix ('/v1/') or "
                    f"'METHOD /template' ('GET /v1/documents/{{id}}'), not {key!r}"
                )
            self.templates[(method.upper(), template)] = deprecation
        # Longest first: a route under /v1/admin/ takes that entry over /v1/'s.
        self.prefixes = sorted(prefixes, key=lambda item: len(item[0]), reverse=True)

    def __bool__(self) -> bool:
        return bool(self.templates or self.prefixes)

    def prefix_of(self, path: str) -> tuple[str, Deprecation] | None:
        for prefix, deprecation in self.prefixes:
            if _under(path, prefix):
                return prefix, deprecation
        return None

    def of(self, entry: RouteEntry, method: str) -> Deprecation | None:
        mark = getattr(entry.endpoint, MARK, None)
        if isinstance(mark, Deprecation):
            return mark
        # A HEAD is a GET without the body: a deprecated GET's HEAD is deprecated too.
        methods = (method, "GET") if method == "HEAD" else (method,)
        for name in methods:
            for template in (entry.template, entry.declared):
                found = self.templates.get((name, template or ""))
                if found is not None:
                    return found
        if entry.template is None:
            return None
        prefixed = self.prefix_of(entry.template)
        return prefixed[1] if prefixed is not None else None


def _under(path: str, prefix: str) -> bool:
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")


class _Unmatched:
    """The plan of a path no route matches (a prefix may still cover it)."""


_UNMATCHED: Final = _Unmatched()


class VersioningMiddleware:
    """Adds deprecation headers to deprecated routes' responses, and answers 410 after sunset.

    Args:
        app: the wrapped ASGI app.
        settings: ``http.versioning``.
        usage: where deprecated calls are counted per client; ``None`` counts only
            the metric.
        clock: the wall clock, seconds since the epoch (tests inject one).

    Raises:
        ConfigurationError: a deprecation entry is invalid.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: VersioningSettings,
        usage: DeprecationUsage | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.app = app
        self.enabled = settings.enabled
        self.usage = usage
        self._clock = clock
        self._deprecations = _Deprecations(settings.deprecations)
        self._table: RouteTable[_Plan | _Unmatched | None] | None = None
        self._routes: Sequence[BaseRoute] | None = None
        self._count = -1
        self._active = False
        self._prefix_plans: dict[tuple[str, str], _Plan] = {}

    def read_routes(self, routes: Sequence[BaseRoute]) -> bool:
        """Build the route table; return whether any route or prefix is deprecated."""
        deprecations = self._deprecations
        entries = list(route_entries(routes))
        marked = any(isinstance(getattr(e.endpoint, MARK, None), Deprecation) for e in entries)
        self._routes, self._count = routes, len(routes)
        self._active = marked or bool(deprecations)
        if not self._active:
            self._table = None
            return False

        def plan(entry: RouteEntry, method: str) -> _Plan | None:
            found = deprecations.of(entry, method)
            if found is None or entry.template is None:
                return None
            return _plan(found, entry.template, method, route=True)

        self._table = RouteTable(entries, plan, _UNMATCHED)
        return True

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.enabled:
            await self.app(scope, receive, send)
            return
        routes = self._routes
        if routes is None or len(routes) != self._count:
            # First request, or routes were added since: read them now.
            routes = getattr(getattr(scope.get("app"), "router", None), "routes", None)
            if routes is None:
                await self.app(scope, receive, send)
                return
            self.read_routes(routes)
        table = self._table
        if table is None:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path) and path != root_path:
            # The router matches the path below the root path (Starlette's get_route_path).
            path = path[len(root_path) :]
        method = scope["method"]
        found = table.resolve(method, path)
        if found is None:
            await self.app(scope, receive, send)
            return
        plan = self._unmatched(method, path) if isinstance(found, _Unmatched) else found
        if plan is None:
            await self.app(scope, receive, send)
            return
        if plan.sunset is not None and self._clock() >= plan.sunset:
            plan.refused.inc()
            if plan.route:
                name_route(scope, plan.template)
            await send_problem(plan.error(), scope, receive, send)
            return
        if plan.route:
            plan.counted.inc()
        await self.app(scope, receive, self._sender(plan, send))

    def _unmatched(self, method: str, path: str) -> _Plan | None:
        prefixed = self._deprecations.prefix_of(path)
        if prefixed is None:
            return None
        prefix, deprecation = prefixed
        label = method if method in _STANDARD_METHODS else "_OTHER"
        plan = self._prefix_plans.get((prefix, label))
        if plan is None:
            # Bounded: configured prefixes times the standard methods and "_OTHER".
            plan = _plan(deprecation, prefix, label, route=False)
            self._prefix_plans[(prefix, label)] = plan
        return plan

    def _sender(self, plan: _Plan, send: Send) -> Callable[[Message], Awaitable[None]]:
        usage = self.usage if plan.route else None

        def send_with_headers(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                message["headers"] = _with_headers(message.get("headers", ()), plan)
                if usage is not None:
                    # Here, not before the call: identity, inside this layer, has bound
                    # the caller by the time the app answers.
                    client, tenant = _caller()
                    usage.record(plan.method, plan.template, client=client, tenant=tenant)
            return send(message)

        return send_with_headers


def _with_headers(
    existing: Iterable[tuple[bytes, bytes]], plan: _Plan
) -> list[tuple[bytes, bytes]]:
    headers = list(existing)
    names = {name.lower() for name, _ in headers}
    # The app's own Deprecation or Sunset (a finer-grained date) is left as it is.
    headers.extend(header for header in plan.headers if header[0] not in names)
    link = plan.link
    if link is None:
        return headers
    for index, (name, value) in enumerate(headers):
        if name.lower() == b"link":
            # Link is a list: one field, the app's links first, keeps clients that
            # read a single header value seeing both.
            headers[index] = (name, value + b", " + link)
            return headers
    headers.append((b"link", link))
    return headers


def _caller() -> tuple[str, str | None]:
    """The caller as counted: ``kind:subject`` and tenant; never an address or an e-mail."""
    # The principal, not the request context: the context cannot tell a service
    # from a user, and its tenant may be one the caller only asked for.
    principal = current_principal()
    if principal is None:
        return ANONYMOUS, None
    if principal.issuer is not None:
        # An external issuer's subject may be an e-mail address: count a digest of it.
        digest = hashlib.sha256(f"{principal.issuer}\n{principal.subject}".encode()).hexdigest()
        return f"{principal.kind}:sha256:{digest[:24]}", principal.tenant_id
    return f"{principal.kind}:{principal.subject}", principal.tenant_id


def deprecated_operations(
    routes: Sequence[BaseRoute], settings: VersioningSettings
) -> dict[tuple[str, str], Deprecation]:
    """``(METHOD, template)`` of every deprecated operation, with its deprecation."""
    deprecations = _Deprecations(settings.deprecations)
    found: dict[tuple[str, str], Deprecation] = {}
    for entry in route_entries(routes):
        if entry.template is None:
            continue
        for method in entry.methods or ():
            deprecation = deprecations.of(entry, method)
            if deprecation is not None:
                found.setdefault((method, entry.template), deprecation)
    return found


_SUNSET_RESPONSE: Final = problem_responses(ErrorCode.VERSION_SUNSET)[410]


def document_deprecations(
    schema: dict[str, Any], routes: Sequence[BaseRoute], settings: VersioningSettings
) -> None:
    """Mark deprecated operations ``deprecated: true`` in an OpenAPI document.

    Those with a sunset also list 410 ``VERSION_SUNSET``, and the description
    names the dates and the guide.
    """
    operations = deprecated_operations(routes, settings)
    for template, path in schema.get("paths", {}).items():
        for method, operation in path.items():
            deprecation = operations.get((method.upper(), template))
            if deprecation is None or not isinstance(operation, dict):
                continue
            operation["deprecated"] = True
            note = f"Deprecated since {deprecation.deprecated_at.date().isoformat()}"
            if deprecation.sunset_at is not None:
                note += f"; answers 410 from {deprecation.sunset_at.isoformat()}"
                operation.setdefault("responses", {}).setdefault("410", _SUNSET_RESPONSE)
            if deprecation.link is not None:
                note += f"; see {deprecation.link}"
            description = operation.get("description")
            operation["description"] = f"{description}\n\n{note}." if description else f"{note}."


def deprecation_routes(access: AccessPolicy, usage: DeprecationUsage) -> list[BaseRoute]:
    """``GET /admin/deprecations?days=7``: who still calls deprecated routes.

    The body is ``{"days", "store", "deprecations": [{route, method, client,
    tenant, count, last_seen}]}``, largest count first; ``days`` is 1 to the
    usage's retention (422 otherwise). Behind the admin access policy.
    """
    route: Route

    async def deprecations(request: Request) -> Response:
        # FastAPI's router records scope["route"] (the access log's and metrics'
        # template) only for its own APIRoutes.
        request.scope.setdefault("route", route)
        access.require(request, subject="/admin", realm=_REALM)
        maximum = usage.retention_days
        days = query_count(
            request.query_params.get("days"),
            name="days",
            default=min(DEFAULT_REPORT_DAYS, maximum),
            maximum=maximum,
        )
        calls = await usage.report(days=days)
        body = {
            "days": days,
            "store": "redis" if usage.shared else "memory",
            "deprecations": [call.as_dict() for call in calls],
        }
        return Response(
            orjson.dumps(body), media_type="application/json", headers={"cache-control": "no-store"}
        )

    route = Route(DEPRECATIONS_PATH, deprecations, methods=["GET"], include_in_schema=False)
    return [route]
