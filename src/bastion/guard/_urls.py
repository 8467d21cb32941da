"""URL fields and SSRF protection: ``Url``, ``FetchUrl``, ``resolve_public`` and ``SafeTransport``.

Two kinds of URL reach a service. A URL the client gives for others to follow
(a homepage on a profile) only has to be well formed: :func:`Url`. A URL the
*server* will fetch (a webhook target, an import source) can turn the server
into a proxy against its own network (SSRF): :func:`FetchUrl` refuses, when the
model is validated, every host that is plainly private: literal addresses in
private, loopback, link-local, shared, multicast, reserved or unspecified
ranges in any spelling (``127.1``, ``2130706433``, ``0x7f.1``, ``[::ffff:7f00:1]``,
6to4 and NAT64 forms), ``localhost`` and the private-use names.

Validation cannot see what a name resolves to, and the answer can change
between validation and fetch (DNS rebinding), so the fetch itself goes through
:class:`SafeTransport`: it resolves the host, refuses if any address is not
public, and connects to an address it checked, with Host and SNI unchanged.
Every redirect hop is a new request through the same transport, so a public
host cannot bounce the fetch to a private one.

The one documented exception in bastion itself is the W3C trace-context
conformance endpoint (``tracing.conformance_endpoint``, off by default), which
fetches whatever its harness tells it to.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Annotated, Any, Final
from urllib.parse import quote, urlsplit, urlunsplit

import httpcore
import httpx
import idna
import structlog
from pydantic_core import PydanticCustomError

from bastion.errors import FieldError, InvalidInput
from bastion.guard._fields import StringRule, too_long
from bastion.settings import GuardSettings

__all__ = [
    "DEFAULT_SCHEMES",
    "FetchPolicy",
    "FetchUrl",
    "FetchUrlRule",
    "SafeTransport",
    "UnsafeUrl",
    "Url",
    "UrlRule",
    "check_fetch_url",
    "fetch_url_type",
    "is_public_address",
    "resolve_public",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

logger = structlog.get_logger("bastion.guard")

DEFAULT_SCHEMES: Final = ("https", "http")
DEFAULT_MAX_LENGTH: Final = 2048

# Names that only ever mean this machine or a private network; a public URL never
# uses them. Resolution at fetch time catches every other name that points inward.
_LOCAL_NAMES: Final = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
_LOCAL_SUFFIXES: Final = (
    ".localhost",
    ".local",
    ".internal",
    ".localdomain",
    ".home.arpa",
)

# Whitespace, controls, bidi and zero-width characters, and the backslash (which
# browsers read as ``/`` and Python's parser does not: two parsers, two hosts).
_BAD_CHARACTERS: Final = re.compile(
    "[\\s\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2060\u2066-\u2069\ufeff\\\\]"
)
_ASCII_LABEL: Final = re.compile("[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?")
_NUMERIC_LABEL: Final = re.compile("(?:0[xX][0-9a-fA-F]*|[0-9]+)")
# What may stay unescaped in a stored URL's path, query and fragment (RFC 3986's
# reserved and unreserved characters plus ``%`` so existing escapes survive).
_URL_SAFE: Final = "/?#[]@!$&'()*+,;=:-._~%"
_IPV4_PARTS: Final = 4
_OCTET_MAX: Final = 255
_HOST_MAX: Final = 253


class UnsafeUrl(InvalidInput):
    """A URL the server was asked to fetch points at an address it may not reach.

    Answered as ``INVALID_INPUT`` (422) with one error of code ``url_not_allowed``.
    The URL itself is never part of the message: it may carry a token.

    Attributes:
        reason: why the URL was refused, in words safe to show the client.
    """

    def __init__(self, reason: str, *, field: str = "url") -> None:
        super().__init__(
            "The URL is not allowed.", errors=[FieldError(field, "url_not_allowed", reason)]
        )
        self.reason = reason


class _Problem(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class _Target:
    url: str
    host: str
    """ASCII host, lowercase, no brackets, no trailing dot."""
    port: int
    ip: IPAddress | None


def is_public_address(address: IPAddress) -> bool:
    """Say whether a server may connect to ``address`` without reaching a private network.

    IPv6 forms that carry an IPv4 address (mapped ``::ffff:a.b.c.d``, compatible
    ``::a.b.c.d``, 6to4 ``2002::/16``, NAT64 ``64:ff9b::/96``) are judged by that
    IPv4 address.

    Args:
        address: the address to judge.

    Returns:
        ``True`` only for globally routable unicast addresses.
    """
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return is_public_address(embedded)
        if address.is_site_local:
            return False
    return (
        address.is_global
        and not (
            address.is_multicast
            or address.is_private
            or address.is_loopback
            or address.is_link_local
            or address.is_reserved
            or address.is_unspecified
        )
        and not any(address in network for network in _SPECIAL_PURPOSE)
    )


# IANA special-purpose ranges some Python versions (3.11 among them) call global: the
# IETF protocol assignments block and the deprecated 6to4 relay anycast prefix.
_SPECIAL_PURPOSE: Final = (
    ipaddress.IPv4Network("192.0.0.0/24"),
    ipaddress.IPv4Network("192.88.99.0/24"),
)


_NAT64: Final = ipaddress.IPv6Network("64:ff9b::/96")
_COMPATIBLE: Final = ipaddress.IPv6Network("::/96")


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64 or address in _COMPATIBLE:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _whatwg_ipv4(labels: list[str]) -> ipaddress.IPv4Address:
    # The WHATWG URL standard, which browsers and curl follow: a host whose last
    # label is a number is an IPv4 address of one to four parts, each decimal,
    # 0x-hex or 0-octal. ``127.1``, ``2130706433`` and ``0x7f.1`` are 127.0.0.1.
    if len(labels) > _IPV4_PARTS:
        raise _Problem("url_invalid", "The URL's host is not a valid address.")
    numbers = []
    for label in labels:
        try:
            if label[:2].lower() == "0x":
                numbers.append(int(label[2:] or "0", 16))
            elif len(label) > 1 and label.startswith("0"):
                numbers.append(int(label, 8))
            else:
                numbers.append(int(label, 10))
        except ValueError:
            raise _Problem("url_invalid", "The URL's host is not a valid address.") from None
    *head, last = numbers
    if any(number > _OCTET_MAX for number in head) or last >= 256 ** (5 - len(numbers)):
        raise _Problem("url_invalid", "The URL's host is not a valid address.")
    value = last
    for index, number in enumerate(head):
        value += number << (8 * (3 - index))
    return ipaddress.IPv4Address(value)


def _parse_host(hostname: str, bracketed: bool) -> tuple[str, IPAddress | None]:
    """Return the canonical host text and its address when the host is an address."""
    if bracketed:
        if "%" in hostname:
            raise _Problem("url_invalid", "The URL's host must not carry an IPv6 zone.")
        try:
            v6 = ipaddress.IPv6Address(hostname)
        except ValueError:
            raise _Problem("url_invalid", "The URL's host is not a valid address.") from None
        return v6.compressed, v6
    host = hostname[:-1] if hostname.endswith(".") else hostname
    if not host or "%" in host:
        raise _Problem("url_invalid", "The URL's host is not valid.")
    if not host.isascii():
        # UTS 46 maps look-alikes too (fullwidth digits, ideographic full stops), so
        # the encoded form is checked again as if the client had sent it.
        try:
            host = idna.encode(host, uts46=True).decode("ascii")
        except idna.IDNAError:
            raise _Problem("url_invalid", "The URL's host is not a valid name.") from None
    host = host.lower()
    labels = host.split(".")
    if _NUMERIC_LABEL.fullmatch(labels[-1]):
        v4 = _whatwg_ipv4(labels)
        return str(v4), v4
    if len(host) > _HOST_MAX:
        raise _Problem("url_invalid", "The URL's host is not a valid name.")
    for label in labels:
        if _ASCII_LABEL.fullmatch(label) is None:
            raise _Problem("url_invalid", "The URL's host is not a valid name.")
        if label.startswith("xn--"):
            try:
                idna.decode(label)
            except idna.IDNAError:
                raise _Problem("url_invalid", "The URL's host is not a valid name.") from None
    return host, None


def _parse(value: str, schemes: tuple[str, ...]) -> _Target:
    if _BAD_CHARACTERS.search(value) is not None:
        raise _Problem("url_invalid", "The URL must not contain spaces or control characters.")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise _Problem("url_invalid", "Not a valid URL.") from None
    scheme = parts.scheme.lower()
    if scheme not in schemes:
        raise _Problem(
            "url_scheme_not_allowed", f"The URL's scheme must be one of: {', '.join(schemes)}."
        )
    if "@" in parts.netloc:
        raise _Problem("url_invalid", "The URL must not contain a user name or password.")
    hostname = parts.hostname
    if not hostname:
        raise _Problem("url_invalid", "The URL must name a host.")
    bracketed = parts.netloc.startswith("[")
    host, address = _parse_host(hostname, bracketed)
    netloc = f"[{host}]" if isinstance(address, ipaddress.IPv6Address) else host
    if port is not None:
        netloc = f"{netloc}:{port}"
    url = urlunsplit(
        (
            scheme,
            netloc,
            quote(parts.path, safe=_URL_SAFE) or ("/" if scheme in ("http", "https") else ""),
            quote(parts.query, safe=_URL_SAFE),
            quote(parts.fragment, safe=_URL_SAFE),
        )
    )
    default_port = {"http": 80, "https": 443}.get(scheme, 0)
    return _Target(url, host, port if port is not None else default_port, address)


@dataclass(frozen=True, slots=True)
class FetchPolicy:
    """Which private destinations a server-side fetch may reach.

    Attributes:
        allow_private: reach any address (``guard.fetch_allow_private``).
        allowed_hosts: hosts (names or addresses, lowercase ASCII) that may be
            private, such as an internal service the operator trusts
            (``guard.fetch_allowed_hosts``). Matched exactly; redirects and
            other hosts are still checked.
    """

    allow_private: bool = False
    allowed_hosts: frozenset[str] = field(default_factory=frozenset)

    @classmethod
    def build(
        cls,
        settings: GuardSettings | None = None,
        *,
        allow_private: bool = False,
        allowed_hosts: Iterable[str] = (),
    ) -> FetchPolicy:
        """Combine settings (when given) and keywords; either can only widen the policy.

        Args:
            settings: the ``guard`` settings section.
            allow_private: reach private addresses too.
            allowed_hosts: hosts that may be private.

        Returns:
            The policy.
        """
        hosts = list(allowed_hosts)
        if settings is not None:
            allow_private = allow_private or settings.fetch_allow_private
            hosts.extend(settings.fetch_allowed_hosts)
        return cls(allow_private, frozenset(_canonical_host(host) for host in hosts))

    def trusts(self, host: str) -> bool:
        """Whether ``host`` (canonical form) may resolve to a private address."""
        return self.allow_private or host in self.allowed_hosts


def _canonical_host(host: str) -> str:
    host = host.strip().lower().removeprefix("[").removesuffix("]").rstrip(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        pass
    try:
        return _parse_host(host, False)[0]
    except _Problem:
        return host


def _check_host(target: _Target, policy: FetchPolicy) -> None:
    if policy.trusts(target.host):
        return
    if target.ip is not None:
        if not is_public_address(target.ip):
            raise _Problem("url_not_allowed", "The URL points at a private or reserved address.")
        return
    host = target.host
    if host in _LOCAL_NAMES or host.endswith(_LOCAL_SUFFIXES):
        raise _Problem("url_not_allowed", "The URL points at a local or internal host name.")
    if "." not in host:
        # A single label resolves through the search domains, that is, inward.
        raise _Problem("url_not_allowed", "The URL's host must be a fully qualified name.")


def check_fetch_url(
    url: str | httpx.URL,
    policy: FetchPolicy | None = None,
    *,
    schemes: tuple[str, ...] = DEFAULT_SCHEMES,
    field: str = "url",
) -> str:
    """Check a URL the server is about to fetch, without resolving it.

    Args:
        url: the URL.
        policy: the private destinations allowed (none by default).
        schemes: allowed schemes.
        field: the field named in the error.

    Returns:
        The normalised URL (lowercase scheme and host, IDNA-encoded host,
        canonical IPv4, non-ASCII path characters percent-encoded).

    Raises:
        UnsafeUrl: the URL is malformed or plainly points inward.
    """
    try:
        target = _parse(str(url), schemes)
        _check_host(target, policy or FetchPolicy())
    except _Problem as problem:
        raise UnsafeUrl(problem.message, field=field) from None
    return target.url


async def _resolve(host: str, port: int) -> list[IPAddress]:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        text = str(sockaddr[0]).split("%", 1)[0]
        addresses[ipaddress.ip_address(text)] = None
    return list(addresses)


async def _checked_addresses(host: str, port: int, policy: FetchPolicy) -> list[IPAddress]:
    canonical = _canonical_host(host)
    try:
        literal: IPAddress | None = ipaddress.ip_address(canonical)
    except ValueError:
        literal = None
    addresses = [literal] if literal is not None else await _resolve(host, port)
    # Every answer must be public, not just the first: a resolver can hand the
    # connection code a different one than the one that was checked.
    if not policy.trusts(canonical) and not all(map(is_public_address, addresses)):
        # The host (never the URL, which may carry a token) tells operators what
        # was probed; a refusal after resolution is what a rebinding attempt looks like.
        logger.warning("outbound fetch refused", host=canonical, stage="resolve")
        raise UnsafeUrl("The URL's host resolves to a private or reserved address.")
    return addresses


async def resolve_public(
    url: str | httpx.URL,
    *,
    allow_private: bool = False,
    allowed_hosts: Iterable[str] = (),
    settings: GuardSettings | None = None,
    schemes: tuple[str, ...] = DEFAULT_SCHEMES,
) -> list[IPAddress]:
    """Resolve the host of a URL the server will fetch, refusing private destinations.

    Connect to one of the returned addresses (not to the name again: a second
    DNS answer may differ), or use :class:`SafeTransport`, which does so.

    Example:
        >>> addresses = await resolve_public("https://example.com/hook")

    Args:
        url: the URL.
        allow_private: allow private addresses (``guard.fetch_allow_private``).
        allowed_hosts: hosts allowed to be private (``guard.fetch_allowed_hosts``).
        settings: the ``guard`` settings, combined with the keywords.
        schemes: allowed schemes.

    Returns:
        The host's addresses, without duplicates, in resolver order.

    Raises:
        UnsafeUrl: the URL is malformed, or its host is or resolves to an address
            that is not public (any of its addresses).
        OSError: the name does not resolve (``socket.gaierror``).
    """
    policy = FetchPolicy.build(settings, allow_private=allow_private, allowed_hosts=allowed_hosts)
    try:
        target = _parse(str(url), schemes)
        _check_host(target, policy)
    except _Problem as problem:
        raise UnsafeUrl(problem.message) from None
    return await _checked_addresses(target.host, target.port, policy)


class _CheckedBackend(httpcore.AsyncNetworkBackend):
    """Resolves, checks every address, then connects to a checked address."""

    def __init__(self, policy: FetchPolicy) -> None:
        self._policy = policy
        self._inner = httpcore.AnyIOBackend()

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's backend interface
        local_address: str | None = None,
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        try:
            async with asyncio.timeout(timeout):
                addresses = await _checked_addresses(host, port, self._policy)
        except (OSError, TimeoutError) as exc:
            raise httpcore.ConnectError(f"cannot resolve the host: {exc}") from exc
        failure: Exception | None = None
        for address in addresses:
            try:
                return await self._inner.connect_tcp(
                    str(address), port, timeout, local_address, socket_options
                )
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
        assert failure is not None  # noqa: S101 -- getaddrinfo never answers an empty list
        raise failure

    async def connect_unix_socket(
        self,
        path: str,
        timeout: float | None = None,  # noqa: ASYNC109 -- httpcore's backend interface
        socket_options: Iterable[httpcore.SOCKET_OPTION] | None = None,
    ) -> httpcore.AsyncNetworkStream:
        raise UnsafeUrl("The server does not fetch through local sockets.")

    async def sleep(self, seconds: float) -> None:
        await self._inner.sleep(seconds)


class SafeTransport(httpx.AsyncHTTPTransport):
    """An httpx transport for URLs the server fetches on a client's behalf (SSRF-safe).

    Each request's URL is checked like :func:`FetchUrl` checks it; each new
    connection resolves the host, refuses if any address is not public (unless
    the policy trusts the host) and connects to a checked address, so DNS
    rebinding between the check and the connection cannot swap it. The Host
    header, SNI and certificate check keep the original name. Redirect hops
    are requests of their own and go through the same checks.

    Use it with ``trust_env=False``: a proxy taken from the environment is a
    separate transport that would bypass these checks.

    Example:
        >>> async with httpx.AsyncClient(
        ...     transport=SafeTransport(settings=settings.guard), trust_env=False
        ... ) as client:
        ...     response = await client.get(url, follow_redirects=True)

    Args:
        allow_private: allow private addresses.
        allowed_hosts: hosts allowed to be private.
        settings: the ``guard`` settings, combined with the keywords.
        schemes: allowed schemes.
        verify: TLS verification, as for ``httpx.AsyncHTTPTransport``.
        http2: enable HTTP/2 (needs ``h2``).
        limits: connection pool limits.
        retries: connection retries.

    Raises:
        UnsafeUrl: from ``handle_async_request``, for a refused URL or address.
    """

    def __init__(
        self,
        *,
        allow_private: bool = False,
        allowed_hosts: Iterable[str] = (),
        settings: GuardSettings | None = None,
        schemes: tuple[str, ...] = DEFAULT_SCHEMES,
        verify: ssl.SSLContext | str | bool = True,
        http2: bool = False,
        limits: httpx.Limits = httpx.Limits(max_connections=100, max_keepalive_connections=20),  # noqa: B008 -- immutable, httpx's own default
        retries: int = 0,
    ) -> None:
        ssl_context = httpx.create_ssl_context(verify=verify)
        super().__init__(verify=ssl_context, http2=http2, limits=limits, retries=retries)
        self.policy = FetchPolicy.build(
            settings, allow_private=allow_private, allowed_hosts=allowed_hosts
        )
        self._schemes = schemes
        # httpx builds its pool without a way to pass a network backend; this is
        # the same pool with the checking backend.
        self._pool = httpcore.AsyncConnectionPool(
            ssl_context=ssl_context,
            max_connections=limits.max_connections,
            max_keepalive_connections=limits.max_keepalive_connections,
            keepalive_expiry=limits.keepalive_expiry,
            http1=True,
            http2=http2,
            retries=retries,
            network_backend=_CheckedBackend(self.policy),
        )

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        """Check the URL, then send the request over a checked connection."""
        try:
            _check_host(_parse(str(request.url), self._schemes), self.policy)
        except _Problem as problem:
            logger.warning("outbound fetch refused", host=request.url.host, stage="url")
            raise UnsafeUrl(problem.message) from None
        return await super().handle_async_request(request)


@dataclass(frozen=True, slots=True)
class UrlRule(StringRule):
    """The validation :func:`Url` attaches to ``str``.

    Attributes:
        schemes: allowed schemes, lowercase.
        max_length: most characters of the normalised URL.
    """

    schemes: tuple[str, ...] = DEFAULT_SCHEMES
    max_length: int = DEFAULT_MAX_LENGTH

    def validate(self, value: str) -> str:
        """Return the normalised URL; raises pydantic errors."""
        try:
            target = self._target(value)
        except _Problem as problem:
            raise PydanticCustomError(problem.code, problem.message) from None
        if len(target.url) > self.max_length:
            raise too_long(self.max_length)
        return target.url

    def _target(self, value: str) -> _Target:
        return _parse(value, self.schemes)

    def json_schema_extra(self) -> dict[str, Any]:
        """Return the ``uri`` format, the bounds and a pattern for the allowed schemes."""
        alternatives = "|".join(re.escape(scheme) for scheme in self.schemes)
        return {
            "format": "uri",
            "minLength": 1,
            "maxLength": self.max_length,
            "pattern": f"^(?:{alternatives})://",
        }


@dataclass(frozen=True, slots=True)
class FetchUrlRule(UrlRule):
    """The validation :func:`FetchUrl` attaches to ``str``: :class:`UrlRule` plus SSRF checks.

    Attributes:
        policy: the private destinations allowed.
    """

    policy: FetchPolicy = field(default_factory=FetchPolicy)

    def _target(self, value: str) -> _Target:
        # Refuses plainly private hosts; :meth:`UrlRule.validate` reports the problem.
        target = _parse(value, self.schemes)
        _check_host(target, self.policy)
        return target


def Url(  # noqa: N802 -- a type factory, named like the type it makes
    schemes: tuple[str, ...] = DEFAULT_SCHEMES, max_length: int = DEFAULT_MAX_LENGTH
) -> Any:
    """Return a type for a URL the client gives to be stored or shown (not fetched).

    The scheme must be allowed, the host present and valid (IDN hosts are stored
    punycoded, numeric IPv4 spellings canonical), and the URL free of
    credentials, whitespace and control characters.

    Args:
        schemes: allowed schemes.
        max_length: most characters of the normalised URL.

    Returns:
        ``Annotated[str, UrlRule(...)]``.
    """
    return Annotated[str, UrlRule(tuple(scheme.lower() for scheme in schemes), max_length)]


def FetchUrl(  # noqa: N802 -- a type factory
    schemes: tuple[str, ...] = DEFAULT_SCHEMES,
    max_length: int = DEFAULT_MAX_LENGTH,
    *,
    allow_private: bool = False,
    allowed_hosts: Iterable[str] = (),
) -> Any:
    """Return a type for a URL the server will fetch: :func:`Url` plus SSRF checks.

    Validation refuses hosts that are plainly private; fetch with
    :class:`SafeTransport` too, since only the fetch sees what a name resolves to.
    Validators cannot read the app's settings: build the type from them with
    :func:`fetch_url_type` when ``guard.fetch_*`` settings must apply.

    Args:
        schemes: allowed schemes.
        max_length: most characters of the normalised URL.
        allow_private: allow private destinations.
        allowed_hosts: hosts allowed to be private.

    Returns:
        ``Annotated[str, FetchUrlRule(...)]``.
    """
    policy = FetchPolicy.build(allow_private=allow_private, allowed_hosts=allowed_hosts)
    return Annotated[
        str, FetchUrlRule(tuple(scheme.lower() for scheme in schemes), max_length, policy)
    ]


def fetch_url_type(
    settings: GuardSettings | None = None,
    *,
    schemes: tuple[str, ...] = DEFAULT_SCHEMES,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> Any:
    """Return a :func:`FetchUrl` type following ``guard.fetch_allow_private`` and ``..._hosts``.

    The policy is read once, when the type is built (``guard.fetch_allowed_hosts``
    and ``guard.fetch_allow_private``).

    Example:
        >>> WebhookUrl = fetch_url_type(Settings().guard)

    Args:
        settings: the ``guard`` settings section (defaults when ``None``).
        schemes: allowed schemes.
        max_length: most characters of the normalised URL.

    Returns:
        ``Annotated[str, FetchUrlRule(...)]``.
    """
    policy = FetchPolicy.build(settings)
    return Annotated[
        str, FetchUrlRule(tuple(scheme.lower() for scheme in schemes), max_length, policy)
    ]
