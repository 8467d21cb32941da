"""The security layer: security headers, CORS and CSRF in one pure ASGI middleware.

One layer, one pass over the request headers, one wrapper of ``send``:

- **Security headers** on every response that does not set its own:
  ``X-Content-Type-Options``, ``X-Frame-Options``, ``Referrer-Policy``;
  ``Strict-Transport-Security`` only when the request arrived over TLS
  (``scope["scheme"]``, which the server sets from a trusted proxy's
  ``X-Forwarded-Proto`` when ``server.proxy_headers`` is on: HSTS over plain HTTP is
  ignored by browsers and would lie about the deployment);
  ``Content-Security-Policy`` on HTML responses only (the API documentation pages
  get their own policy, since Swagger UI runs inline script from a CDN); and
  ``Cache-Control: no-store`` on responses to requests that carried a credential
  (a credential header or a protected cookie), unless the app chose its own.
- **CORS** (:mod:`bastion.http._cors`): preflights answered here; actual
  responses to listed origins get the CORS headers.
- **CSRF** (:mod:`bastion.http._csrf`): unsafe requests authenticated by a
  cookie alone must prove their origin and echo the token cookie.

Everything is precomputed at construction (header byte tuples, origin sets). A
request without ``Origin``, credentials or cookies costs the header scan and
the additions to the response start, nothing else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion._routes import RouteTable, name_route, route_entries
from bastion.errors import BastionError, Forbidden
from bastion.http._cors import CorsPolicy
from bastion.http._csrf import CsrfGuard, parse_cookies
from bastion.observability import send_problem
from bastion.observability.metrics import HTTP_CORS_PREFLIGHTS, HTTP_CSRF_REJECTIONS
from bastion.settings import HttpSettings

__all__ = ["CsrfFailed", "SecurityMiddleware"]

Header = tuple[bytes, bytes]

_UNSAFE: Final = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_NO_STORE: Final = (b"cache-control", b"no-store")
_PREFLIGHT_DETAIL: Final = {
    "origin_refused": "CORS preflight refused: the origin is not allowed.",
    "method_refused": "CORS preflight refused: the method is not allowed.",
    "headers_refused": "CORS preflight refused: a requested header is not allowed.",
}
# Request headers the layer reads, each to its slot in one list: one dict lookup per
# header instead of a chain of comparisons.
_ORIGIN, _COOKIE, _ACRM, _ACRH, _REFERER, _HOST, _TOKEN, _CREDENTIAL = range(8)


class CsrfFailed(Forbidden):
    """A cookie-authenticated unsafe request failed the CSRF check (403 ``FORBIDDEN``)."""

    def __init__(self) -> None:
        super().__init__("CSRF check failed")


class SecurityMiddleware:
    """Security headers, CORS and CSRF protection for every HTTP response.

    Args:
        app: the wrapped ASGI app.
        settings: the ``http`` section; ``enabled`` off makes the layer a pass-through.
        protected_cookies: cookies that authenticate a request (identity's
            ``refresh_cookie``); ``http.csrf.protected_cookies`` overrides them.
        credential_headers: request headers that carry a credential a browser never
            attaches by itself (``Authorization``, identity's API key header): a
            request with one is not cookie-authenticated.

    Example:
        >>> app.add_middleware(
        ...     SecurityMiddleware,
        ...     settings=settings.http,
        ...     protected_cookies=[settings.identity.refresh_cookie],
        ... )
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        settings: HttpSettings,
        protected_cookies: Sequence[str] = (),
        credential_headers: Sequence[str] = ("Authorization", "X-API-Key"),
    ) -> None:
        self.app = app
        on = settings.enabled
        headers = settings.security_headers
        self._headers_on = on and headers.enabled
        always: list[Header] = []
        if headers.content_type_options:
            always.append((b"x-content-type-options", b"nosniff"))
        if headers.frame_options is not None:
            always.append((b"x-frame-options", headers.frame_options.encode("latin-1")))
        if headers.referrer_policy:
            always.append((b"referrer-policy", headers.referrer_policy.encode("latin-1")))
        self._always = tuple(always)
        hsts: Header | None = None
        if headers.hsts_max_age > 0:
            value = f"max-age={int(headers.hsts_max_age)}"
            if headers.hsts_include_subdomains:
                value += "; includeSubDomains"
            if headers.hsts_preload:
                value += "; preload"
            hsts = (b"strict-transport-security", value.encode("latin-1"))
        self._hsts = hsts
        self._csp = _encoded(headers.content_security_policy)
        self._docs_csp = _encoded(headers.docs_content_security_policy)
        self._docs_paths = frozenset(path.rstrip("/") or "/" for path in headers.docs_paths)
        self._docs_prefixes = tuple(path.rstrip("/") + "/" for path in headers.docs_paths)

        cookies = (
            settings.csrf.protected_cookies
            if settings.csrf.protected_cookies is not None
            else list(protected_cookies)
        )
        csrf_on = on and settings.csrf.enabled and bool(cookies)
        cors: CorsPolicy | None = None
        if on and settings.cors.allow_origins:
            cors = CorsPolicy(settings.cors, expose=(settings.csrf.header,) if csrf_on else ())
        self._cors = cors
        self._csrf = (
            CsrfGuard(
                settings.csrf,
                cookies,
                trusted_origins=cors.origins if cors is not None else frozenset(),
            )
            if csrf_on
            else None
        )
        # Credentialed requests are recognised (for no-store) even with CSRF off.
        self._markers = tuple(f"{name}=".encode("latin-1") for name in cookies)
        wanted = {
            b"origin": _ORIGIN,
            b"cookie": _COOKIE,
            b"access-control-request-method": _ACRM,
            b"access-control-request-headers": _ACRH,
            b"referer": _REFERER,
            b"host": _HOST,
        }
        if self._csrf is not None:
            wanted[self._csrf.header] = _TOKEN
        for name in credential_headers:
            wanted[name.lower().encode("latin-1")] = _CREDENTIAL
        self._wanted = wanted
        self._active = on and (self._headers_on or cors is not None or self._csrf is not None)
        self._routes: RouteTable[str | None] | None = None
        self._route_count = -1

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0912 -- one frame on every request; helpers cost a call each
        if scope["type"] != "http" or not self._active:
            await self.app(scope, receive, send)
            return
        found: list[bytes | None] = [None] * 8
        wanted = self._wanted
        for name, value in scope["headers"]:
            slot = wanted.get(name)
            if slot is not None:
                if slot == _COOKIE and found[_COOKIE] is not None:
                    # HTTP/2 may split cookies over several fields (RFC 9113 8.2.3).
                    found[_COOKIE] = found[_COOKIE] + b"; " + value  # type: ignore[operator]  # checked above
                else:
                    found[slot] = value
        origin = found[_ORIGIN]
        method: str = scope["method"]
        cors = self._cors
        cors_headers: Sequence[Header] = ()
        if cors is not None:
            if origin is not None:
                request_method = found[_ACRM]
                if method == "OPTIONS" and request_method is not None:
                    await self._preflight(
                        scope,
                        receive,
                        send,
                        origin=origin,
                        request_method=request_method,
                        request_headers=found[_ACRH],
                    )
                    return
                allow_origin = cors.allow_origin(origin)
                if allow_origin is not None:
                    cors_headers = cors.actual_headers(allow_origin)
                else:
                    cors_headers = cors.refused_headers
            else:
                cors_headers = cors.refused_headers
        cookie = found[_COOKIE]
        cookie_credential = cookie is not None and any(m in cookie for m in self._markers)
        credential_header = found[_CREDENTIAL] is not None
        proven: str | None = None
        csrf = self._csrf
        if csrf is not None and cookie is not None:
            cookies: dict[str, str] | None = None
            if cookie_credential and not credential_header and method in _UNSAFE:
                cookies = parse_cookies(cookie)
                if not csrf.protected.isdisjoint(cookies):
                    reason = csrf.check(
                        scope,
                        cookies,
                        origin=origin,
                        referer=found[_REFERER],
                        host=found[_HOST],
                        token=found[_TOKEN],
                    )
                    if reason is not None:
                        HTTP_CSRF_REJECTIONS.labels(reason).inc()
                        await self._answer(
                            CsrfFailed(),
                            scope,
                            receive,
                            self._wrap(send, scope, cors_headers, credentialed=True, proven=None),
                            method,
                        )
                        return
                    proven = cookies.get(csrf.cookie)
            if cors is not None and cors.credentials and cors_headers and origin is not None:
                # A page on another listed origin cannot read this origin's cookie:
                # tell it the token (CORS lets only listed origins read the answer).
                if cookies is None:
                    cookies = parse_cookies(cookie)
                token = cookies.get(csrf.cookie)
                if token and cors.allow_origin(origin) is not None:
                    cors_headers = [*cors_headers, (csrf.header, token.encode("latin-1"))]
        await self.app(
            scope,
            receive,
            self._wrap(
                send,
                scope,
                cors_headers,
                credentialed=cookie_credential or credential_header,
                proven=proven,
            ),
        )

    def _wrap(
        self,
        send: Send,
        scope: Scope,
        cors_headers: Sequence[Header],
        *,
        credentialed: bool,
        proven: str | None,
    ) -> Callable[[Message], Awaitable[None]]:
        headers_on = self._headers_on
        hsts = self._hsts if headers_on and scope.get("scheme") == "https" else None
        csrf = self._csrf
        always = self._always if headers_on else ()
        no_store = credentialed and headers_on

        # A function returning send's awaitable, not a coroutine: no coroutine object
        # per message (as the request middleware does).
        def send_secured(message: Message) -> Awaitable[None]:
            if message["type"] != "http.response.start":
                return send(message)
            headers = list(message.get("headers", ()))
            present: set[bytes] = set()
            content_type: bytes | None = None
            set_cookies: list[bytes] = []
            for name, value in headers:
                lowered = name.lower()
                present.add(lowered)
                if lowered == b"content-type":
                    content_type = value
                elif lowered == b"set-cookie":
                    set_cookies.append(value)
            for header in always:
                if header[0] not in present:
                    headers.append(header)
            if hsts is not None and hsts[0] not in present:
                headers.append(hsts)
            if (
                headers_on
                and content_type is not None
                and content_type[:9].lower() == b"text/html"
                and b"content-security-policy" not in present
            ):
                policy = self._policy(scope)
                if policy is not None:
                    headers.append((b"content-security-policy", policy))
            if no_store and b"cache-control" not in present:
                headers.append(_NO_STORE)
            if cors_headers and b"access-control-allow-origin" not in present:
                headers.extend(cors_headers)
            if csrf is not None and set_cookies:
                headers.extend(csrf.cookie_headers(set_cookies, proven))
            message["headers"] = headers
            return send(message)

        return send_secured

    def _policy(self, scope: Scope) -> bytes | None:
        path = _app_path(scope)
        if path in self._docs_paths or path.startswith(self._docs_prefixes):
            return self._docs_csp
        return self._csp

    async def _preflight(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        *,
        origin: bytes,
        request_method: bytes,
        request_headers: bytes | None,
    ) -> None:
        cors = self._cors
        assert cors is not None  # noqa: S101 -- only called with CORS on
        verdict = cors.preflight(origin, request_method, request_headers)
        HTTP_CORS_PREFLIGHTS.labels(verdict.outcome).inc()
        method = request_method.decode("latin-1", "replace").strip().upper()
        if not verdict.allowed:
            await self._answer(
                Forbidden(_PREFLIGHT_DETAIL[verdict.outcome]),
                scope,
                receive,
                self._wrap(send, scope, verdict.headers, credentialed=False, proven=None),
                method,
            )
            return
        name_route(scope, self._template(scope, method))
        wrapped = self._wrap(send, scope, (), credentialed=False, proven=None)
        await wrapped({"type": "http.response.start", "status": 204, "headers": verdict.headers})
        await wrapped({"type": "http.response.body", "body": b""})

    async def _answer(
        self, error: BastionError, scope: Scope, receive: Receive, send: Send, method: str
    ) -> None:
        name_route(scope, self._template(scope, method))
        await send_problem(error, scope, receive, send)

    def _template(self, scope: Scope, method: str) -> str | None:
        """The route template a refused request was for, to label its metrics and log line."""
        routes = getattr(getattr(scope.get("app"), "router", None), "routes", None)
        if routes is None:
            return None
        if self._routes is None or len(routes) != self._route_count:
            # Built on the first refusal only: refusals are rare, and most apps never
            # pay for the table.
            self._routes = RouteTable(
                list(route_entries(routes)), lambda entry, _: entry.template, None
            )
            self._route_count = len(routes)
        return self._routes.resolve(method, _app_path(scope))


def _encoded(value: str | None) -> bytes | None:
    return value.encode("latin-1") if value else None


def _app_path(scope: Scope) -> str:
    """The path below the root path, as the router and the settings' paths see it."""
    path: str = scope["path"]
    root_path = scope.get("root_path")
    if root_path and path.startswith(root_path) and path != root_path:
        return path[len(root_path) :]
    return path
