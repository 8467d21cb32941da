"""CORS: which browser origins may call the API, decided once per origin and remembered.

The Fetch standard's protocol, server side. An actual request from a listed
origin gets ``Access-Control-Allow-Origin`` with that origin (``*`` when the list
is the wildcard, which settings refuse together with credentials), plus
``Access-Control-Allow-Credentials`` and ``Access-Control-Expose-Headers`` as
configured. A preflight (``OPTIONS`` with ``Access-Control-Request-Method``) is
answered here, never by the app: 204 with the allowed methods, headers and
max-age when the origin, the method and every requested header are allowed.
A refused preflight is a 403 problem without any CORS header: the browser
then blocks the real request, and a developer reading the network panel sees
why. An unlisted origin is never reflected, and ``null`` (sandboxed frames,
``file:`` pages, redirects) matches only when listed literally.

Origins compare after normalising the case of scheme and host and dropping the
scheme's default port, so ``HTTPS://App.Example.com:443`` is
``https://app.example.com``. Every origin a browser sends is one string, so the
verdict per distinct ``Origin`` value is cached (bounded).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Final
from urllib.parse import urlsplit

from bastion.errors import ConfigurationError
from bastion.settings import CorsSettings

__all__ = ["CorsPolicy", "Preflight", "normalize_origin", "origin_of_url"]

_DEFAULT_PORTS: Final = {"http": "80", "https": "443", "ws": "80", "wss": "443"}
# scheme "://" host [":" port], nothing else: a path, a query, userinfo or
# whitespace make it something other than an origin (and never reflected).
_ORIGIN: Final = re.compile(
    r"([A-Za-z][A-Za-z0-9+.-]*)://(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._~!$&'()*+,;=%-]+)(?::([0-9]{1,5}))?"
)
_CACHE_MAX: Final = 1024
# Sent by browsers without a preflight's permission, so always allowed (Fetch
# "CORS-safelisted request-header"; Content-Type is safelisted only for three form
# types, so it stays a configured header).
_SAFELISTED_HEADERS: Final = frozenset({"accept", "accept-language", "content-language"})
_NULL: Final = "null"


def normalize_origin(text: str) -> str | None:
    """Return ``text`` as a canonical origin (``scheme://host[:port]``), or ``None``.

    ``null`` stays ``null``; anything with a path, query, fragment or userinfo is
    not an origin.

    Example:
        >>> normalize_origin("HTTPS://App.Example.COM:443")
        'https://app.example.com'
    """
    if text == _NULL:
        return _NULL
    match = _ORIGIN.fullmatch(text)
    if match is None:
        return None
    scheme, host, port = match.groups()
    scheme = scheme.lower()
    if port is not None:
        if int(port) > 65535:  # noqa: PLR2004 -- the largest TCP port
            return None
        port = str(int(port))
        if _DEFAULT_PORTS.get(scheme) == port:
            port = None
    host = host.lower()
    return f"{scheme}://{host}" if port is None else f"{scheme}://{host}:{port}"


def origin_of_url(url: str) -> str | None:
    """Return the canonical origin of an absolute URL (a ``Referer``), or ``None``."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    if not parts.scheme or not parts.hostname:
        return None
    host = parts.hostname
    if ":" in host:
        host = f"[{host}]"
    return normalize_origin(f"{parts.scheme}://{host}" + ("" if port is None else f":{port}"))


class Preflight:
    """The verdict on a preflight: ``outcome`` (the metric label) and the answer's headers."""

    __slots__ = ("headers", "outcome")

    def __init__(self, outcome: str, headers: list[tuple[bytes, bytes]]) -> None:
        self.outcome = outcome
        self.headers = headers

    @property
    def allowed(self) -> bool:
        """Whether the preflight is answered 204 with the CORS headers."""
        return self.outcome == "allowed"


class CorsPolicy:
    """The CORS answer for an ``Origin``, precomputed from :class:`CorsSettings`.

    Args:
        settings: ``http.cors``; ``allow_origins`` must not be empty.
        expose: response headers exposed besides ``expose_headers`` (the CSRF
            token header, when credentials are allowed).

    Raises:
        ConfigurationError: an entry of ``allow_origins`` is not an origin.
    """

    __slots__ = (
        "_actual",
        "_allow_any_header",
        "_allow_any_method",
        "_cache",
        "_headers",
        "_methods",
        "_origins",
        "_preflight",
        "credentials",
        "refused_headers",
        "vary",
        "wildcard",
    )

    def __init__(self, settings: CorsSettings, *, expose: Iterable[str] = ()) -> None:
        origins: set[str] = set()
        for entry in settings.allow_origins:
            if entry == "*":
                continue
            normalized = normalize_origin(entry.strip())
            if normalized is None:
                raise ConfigurationError(
                    f"http.cors.allow_origins: {entry!r} is not an origin such as "
                    "https://app.example.com (scheme, host and optional port, no path)"
                )
            origins.add(normalized)
        self._origins = frozenset(origins)
        self.wildcard = "*" in settings.allow_origins
        self.credentials = settings.allow_credentials and not self.wildcard
        # A response to a listed origin differs from the one to another origin: caches
        # must key on Origin. With only the wildcard every origin gets the same answer.
        self.vary = bool(self._origins) and not self.wildcard
        self._methods = frozenset(settings.allow_methods)
        self._allow_any_method = "*" in self._methods
        self._headers = frozenset(h.lower() for h in settings.allow_headers) | _SAFELISTED_HEADERS
        self._allow_any_header = "*" in self._headers
        actual: list[tuple[bytes, bytes]] = []
        if self.credentials:
            actual.append((b"access-control-allow-credentials", b"true"))
        exposed = list(settings.expose_headers)
        if self.credentials:
            exposed.extend(name for name in expose if name not in exposed)
        if exposed:
            actual.append((b"access-control-expose-headers", ", ".join(exposed).encode()))
        if self.vary:
            actual.append((b"vary", b"Origin"))
        self._actual = tuple(actual)
        self.refused_headers: tuple[tuple[bytes, bytes], ...] = (
            ((b"vary", b"Origin"),) if self.vary else ()
        )
        preflight: list[tuple[bytes, bytes]] = []
        if self.credentials:
            preflight.append((b"access-control-allow-credentials", b"true"))
        if not self._allow_any_method:
            preflight.append(
                (b"access-control-allow-methods", ", ".join(settings.allow_methods).encode())
            )
        if not self._allow_any_header:
            preflight.append(
                (b"access-control-allow-headers", ", ".join(settings.allow_headers).encode())
            )
        preflight.append((b"access-control-max-age", str(int(settings.max_age)).encode()))
        preflight.append(
            (
                b"vary",
                b"Origin, Access-Control-Request-Method, Access-Control-Request-Headers",
            )
        )
        self._preflight = tuple(preflight)
        self._cache: dict[bytes, bytes | None] = {}

    @property
    def origins(self) -> frozenset[str]:
        """The listed origins, normalised (without the wildcard)."""
        return self._origins

    def allow_origin(self, origin: bytes) -> bytes | None:
        """Return the ``Access-Control-Allow-Origin`` value for this ``Origin``, or ``None``.

        The value is the request's own origin (or ``*`` for the wildcard): an
        origin that is not listed gets ``None``, never a reflection.
        """
        cache = self._cache
        try:
            return cache[origin]
        except KeyError:
            pass
        answer: bytes | None
        try:
            text = origin.decode("ascii")
        except UnicodeDecodeError:
            answer = None
        else:
            normalized = normalize_origin(text)
            if normalized is not None and normalized in self._origins:
                answer = origin
            elif self.wildcard and normalized is not None and normalized != _NULL:
                answer = b"*"
            else:
                answer = None
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[origin] = answer
        return answer

    def actual_headers(self, allow_origin: bytes) -> list[tuple[bytes, bytes]]:
        """The CORS headers of an actual (non-preflight) response to an allowed origin."""
        return [(b"access-control-allow-origin", allow_origin), *self._actual]

    def preflight(self, origin: bytes, method: bytes, request_headers: bytes | None) -> Preflight:
        """Decide a preflight for ``origin`` asking for ``method`` and ``request_headers``.

        Args:
            origin: the ``Origin`` header.
            method: the ``Access-Control-Request-Method`` header.
            request_headers: the ``Access-Control-Request-Headers`` header, if sent.
        """
        vary = [(b"vary", b"Origin")] if self.vary else []
        allow_origin = self.allow_origin(origin)
        if allow_origin is None:
            return Preflight("origin_refused", vary)
        try:
            method_name = method.decode("ascii").strip()
        except UnicodeDecodeError:
            return Preflight("method_refused", vary)
        if not self._allow_any_method and method_name not in self._methods:
            return Preflight("method_refused", vary)
        requested = _names(request_headers)
        if not self._allow_any_header and not requested <= self._headers:
            return Preflight("headers_refused", vary)
        headers = [(b"access-control-allow-origin", allow_origin), *self._preflight]
        if self._allow_any_method:
            # "*" is literal to browsers when credentials are allowed: echo the method.
            headers.append((b"access-control-allow-methods", method_name.encode()))
        if self._allow_any_header and requested:
            headers.append((b"access-control-allow-headers", ", ".join(sorted(requested)).encode()))
        return Preflight("allowed", headers)


def _names(header: bytes | None) -> frozenset[str]:
    if not header:
        return frozenset()
    try:
        text = header.decode("ascii")
    except UnicodeDecodeError:
        # Undecodable names are allowed by no list.
        return frozenset({"\x00"})
    return frozenset(name for name in (part.strip().lower() for part in text.split(",")) if name)
