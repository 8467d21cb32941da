"""CSRF: an unsafe request authenticated by a cookie must prove it comes from the API's own pages.

A browser attaches cookies to requests that any site starts, so a request whose
only credential is a cookie (identity's refresh cookie in ``cookie`` delivery)
could be forged by another site. Such a request (``POST``, ``PUT``, ``PATCH``,
``DELETE`` carrying a protected cookie and no credential header) must pass two
independent checks:

1. **Origin.** Its ``Origin`` (or, when a browser sent none, its ``Referer``) is
   the request's own origin (scheme and ``Host``) or one of
   ``http.cors.allow_origins``, never the wildcard and never ``null``. A request
   carrying neither is refused: every current browser sends ``Origin`` on
   unsafe requests, and a non-browser client has no business authenticating
   with a browser's cookie.
2. **Double submit.** The header ``csrf.header`` equals the cookie
   ``csrf.cookie`` (constant-time comparison). The token cookie is readable by
   the page's script (not ``HttpOnly``) and another site can neither read it nor
   write it (``Secure``, ``SameSite=Strict``, host-only), so only a page of
   this origin can copy it into the header.

The token cookie is issued by the middleware, not by the routes: whenever a
response sets a protected cookie, a fresh token (or the request's already
proven one, so pages in flight keep working) is set beside it with the same
lifetime; when a response deletes a protected cookie, the token is deleted too.
The token is also sent in the ``csrf.header`` response header of that
response, so a page on another listed origin (which cannot read this origin's
cookies) can learn it through CORS.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Sequence
from typing import Final

from starlette.types import Scope

from bastion.http._cors import normalize_origin, origin_of_url
from bastion.settings import CsrfSettings

__all__ = ["CsrfGuard", "parse_cookies"]

_NULL: Final = "null"
_TOKEN_BYTES: Final = 32
_ATTRIBUTES: Final = "; Path=/; SameSite=Strict; Secure"
_EXPIRED: Final = "Expires=Thu, 01 Jan 1970 00:00:00 GMT; Max-Age=0"


def parse_cookies(header: bytes) -> dict[str, str]:
    """The cookies of a ``Cookie`` header, the first of each name winning (RFC 6265 5.4).

    The first of two same-named cookies is the one with the longest path, the
    one the browser meant for this URL.
    """
    cookies: dict[str, str] = {}
    for part in header.decode("latin-1").split(";"):
        name, sep, value = part.partition("=")
        if not sep:
            continue
        name = name.strip()
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':  # noqa: PLR2004 -- the two quotes
            value = value[1:-1]
        if name and name not in cookies:
            cookies[name] = value
    return cookies


class CsrfGuard:
    """Checks cookie-authenticated unsafe requests and issues the token cookie.

    Args:
        settings: ``http.csrf``.
        protected_cookies: the cookies that authenticate a request.
        trusted_origins: normalised origins besides the request's own whose pages may
            send such requests (``http.cors.allow_origins`` without the wildcard).
    """

    __slots__ = ("_trusted", "cookie", "header", "markers", "protected")

    def __init__(
        self,
        settings: CsrfSettings,
        protected_cookies: Sequence[str],
        trusted_origins: frozenset[str],
    ) -> None:
        self.protected = frozenset(protected_cookies)
        self.cookie = settings.cookie
        self.header = settings.header.lower().encode("latin-1")
        # A substring test first: a request whose Cookie header cannot hold a protected
        # cookie is not parsed at all.
        self.markers = tuple(f"{name}=".encode("latin-1") for name in self.protected)
        self._trusted = frozenset(origin for origin in trusted_origins if origin != _NULL)

    def check(
        self,
        scope: Scope,
        cookies: dict[str, str],
        *,
        origin: bytes | None,
        referer: bytes | None,
        host: bytes | None,
        token: bytes | None,
    ) -> str | None:
        """Return why the request fails the check (the metric's reason), or ``None``.

        Reasons: ``origin_missing``, ``origin_mismatch``, ``token_missing``,
        ``token_mismatch``.
        """
        if origin is not None:
            source = normalize_origin(origin.decode("latin-1").strip())
        elif referer is not None:
            source = origin_of_url(referer.decode("latin-1").strip())
        else:
            return "origin_missing"
        if source is None or source == _NULL:
            return "origin_mismatch"
        if source not in self._trusted and not _same_origin(scope, host, source):
            return "origin_mismatch"
        expected = cookies.get(self.cookie)
        if not expected or not token or not token.strip():
            return "token_missing"
        if not hmac.compare_digest(expected.encode("latin-1"), token.strip()):
            return "token_mismatch"
        return None

    def cookie_headers(
        self, set_cookies: Sequence[bytes], proven: str | None
    ) -> list[tuple[bytes, bytes]]:
        """Headers to add to a response that sets these cookies: the token cookie's.

        Args:
            set_cookies: the response's ``Set-Cookie`` values.
            proven: the token the request proved it holds, kept rather than rotated.
        """
        lifetime: str | None = None
        issue = cleared = False
        for raw in set_cookies:
            text = raw.decode("latin-1")
            first, _, attributes = text.partition(";")
            name, _, value = first.partition("=")
            name = name.strip()
            if name == self.cookie:
                # The app manages the token itself.
                return []
            if name not in self.protected:
                continue
            max_age = _attribute(attributes, "max-age")
            if value.strip() in {"", '""'} or (max_age is not None and max_age.strip() == "0"):
                cleared = True
                continue
            issue = True
            if max_age is not None:
                lifetime = f"; Max-Age={max_age.strip()}"
            else:
                expires = _attribute(attributes, "expires")
                if expires is not None:
                    lifetime = f"; Expires={expires.strip()}"
        if issue:
            token = proven or secrets.token_urlsafe(_TOKEN_BYTES)
            cookie = f"{self.cookie}={token}{lifetime or ''}{_ATTRIBUTES}"
            return [
                (b"set-cookie", cookie.encode("latin-1")),
                (self.header, token.encode("latin-1")),
            ]
        if cleared:
            cookie = f'{self.cookie}=""; {_EXPIRED}{_ATTRIBUTES}'
            return [(b"set-cookie", cookie.encode("latin-1"))]
        return []


def _attribute(attributes: str, wanted: str) -> str | None:
    for part in attributes.split(";"):
        name, _, value = part.partition("=")
        if name.strip().lower() == wanted:
            return value
    return None


def _same_origin(scope: Scope, host: bytes | None, source: str) -> bool:
    """Whether ``source`` is the origin the request was sent to.

    A TLS-terminating proxy without forwarded-scheme handling makes the request
    look like ``http`` while the page's origin is ``https``: an ``https`` page for
    the same host and port counts as the same origin (the reverse does not).
    """
    if host is not None:
        authority = host.decode("latin-1").strip()
    else:
        server = scope.get("server")
        if not server:
            return False
        address, port = server
        authority = f"{address}:{port}" if port is not None else address
    scheme = scope.get("scheme", "http")
    if normalize_origin(f"{scheme}://{authority}") == source:
        return True
    return scheme == "http" and normalize_origin(f"https://{authority}") == source
