"""The client's address: the socket peer, or what a trusted proxy says it forwarded.

A client can send ``X-Forwarded-For``, ``Forwarded`` or ``X-Real-IP`` itself, so
those headers are believed only when the socket peer is one of the configured
proxies (``http.trusted_proxies``), and only the one header those proxies set
(``http.client_ip_header``). Through a chain of proxies, the header is read from
the right (the hop the nearest proxy appended) leftwards, skipping trusted
addresses: the first untrusted one is the client. Everything left of it was
written by the client and is ignored. A header that is absent or that cannot be
read falls back to the peer: never to a guess.

Addresses are normalised (``::ffff:192.0.2.1`` is ``192.0.2.1``, IPv6 in its
compressed lower-case form), so one client is one string in logs and limit keys.

The observability middleware calls :class:`ClientAddress` once per request when
trusted proxies are configured; without them it is never built and the peer is
taken as it is, at no cost.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Final

__all__ = ["ClientAddress", "NetworkSet", "normalize_address"]

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Bounded: an attacker sending a new address per request must not grow it for ever.
_CACHE_MAX: Final = 4096
_HEADERS: Final = {
    "x-forwarded-for": b"x-forwarded-for",
    "forwarded": b"forwarded",
    "x-real-ip": b"x-real-ip",
}


def normalize_address(text: str) -> str | None:
    """Return ``text`` as a canonical IP address, or ``None`` when it is not one.

    IPv4-mapped IPv6 addresses become IPv4; a zone index (``fe80::1%eth0``) is kept.
    """
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return None
    return str(_unmapped(address))


def _unmapped(address: IPAddress) -> IPAddress:
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


class ClientAddress:
    """Finds the client's address from the peer and the trusted proxies' header.

    Args:
        trusted_proxies: CIDRs of the proxies in front of the service; must not be empty.
        header: the header those proxies set: ``x-forwarded-for``, ``forwarded``
            (RFC 7239) or ``x-real-ip``.

    Example:
        >>> resolve = ClientAddress(["10.0.0.0/8"], "x-forwarded-for")
        >>> resolve("10.0.0.5", [(b"x-forwarded-for", b"198.51.100.7, 10.0.0.9")])
        '198.51.100.7'

    Raises:
        ValueError: no proxy, a proxy that is not a network, or an unknown header.
    """

    __slots__ = ("_header", "_networks", "_parse", "_trusted")

    def __init__(self, trusted_proxies: Sequence[str], header: str) -> None:
        if not trusted_proxies:
            raise ValueError("ClientAddress needs at least one trusted proxy network")
        name = _HEADERS.get(header.lower())
        if name is None:
            raise ValueError(f"unknown client address header {header!r}; use one of {_HEADERS}")
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(network, strict=False) for network in trusted_proxies
        )
        self._header = name
        self._parse = {
            b"x-forwarded-for": _x_forwarded_for,
            b"forwarded": _forwarded,
            b"x-real-ip": _x_real_ip,
        }[name]
        # Address text as received -> (normalised, trusted); None when not an address.
        self._trusted: dict[str, tuple[str, bool] | None] = {}

    def __call__(self, peer: str | None, headers: Iterable[tuple[bytes, bytes]]) -> str | None:
        """Return the client's address for a request from ``peer`` with these headers.

        Args:
            peer: the socket peer's address, as the server gives it (``None`` on a
                Unix socket).
            headers: the request's raw ASGI headers (lower-case names).
        """
        if peer is None:
            return None
        known = self._lookup(peer)
        if known is None:
            return peer
        normalized, trusted = known
        if not trusted:
            return normalized
        name = self._header
        values = [value for key, value in headers if key == name]
        if not values:
            return normalized
        try:
            hops = self._parse(b",".join(values).decode("latin-1"))
        except ValueError:
            return normalized
        return self._client(hops) or normalized

    def is_trusted(self, address: str) -> bool:
        """Return whether ``address`` is in one of the trusted proxy networks."""
        known = self._lookup(address)
        return known is not None and known[1]

    def _client(self, hops: list[str]) -> str | None:
        """Walk the hops from the right; return the first untrusted one (or the leftmost)."""
        client = None
        for hop in reversed(hops):
            known = self._lookup(hop)
            if known is None:
                # Not an address (garbage, "unknown", an obfuscated node): the hops
                # left of it cannot be attributed, so nothing is believed.
                return None
            client, trusted = known
            if not trusted:
                return client
        # Every hop is one of ours (an internal caller): the leftmost is the origin.
        return client

    def _lookup(self, text: str) -> tuple[str, bool] | None:
        cache = self._trusted
        try:
            return cache[text]
        except KeyError:
            pass
        try:
            address = _unmapped(ipaddress.ip_address(text))
        except ValueError:
            result = None
        else:
            result = (str(address), any(address in network for network in self._networks))
        if len(cache) >= _CACHE_MAX:
            cache.clear()
        cache[text] = result
        return result


class NetworkSet:
    """CIDRs and whether an address is in one of them, each answer remembered.

    The membership test is on every request of a listed feature (exempt
    networks, trusted callers); after an address's first request it is one dict
    lookup. IPv4-mapped IPv6 addresses count as their IPv4 address.

    Args:
        cidrs: networks such as ``10.0.0.0/8``; host bits are ignored.
        cache_max: answers kept before the cache starts over.
    """

    __slots__ = ("_cache", "_cache_max", "networks")

    def __init__(self, cidrs: Iterable[str], *, cache_max: int = _CACHE_MAX) -> None:
        self.networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(cidr, strict=False) for cidr in cidrs
        )
        self._cache: dict[str, bool] = {}
        self._cache_max = cache_max

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __contains__(self, address: object) -> bool:
        if not isinstance(address, str) or not self.networks:
            return False
        cache = self._cache
        found = cache.get(address)
        if found is None:
            try:
                ip = _unmapped(ipaddress.ip_address(address))
            except ValueError:
                found = False
            else:
                found = any(ip in network for network in self.networks)
            if len(cache) >= self._cache_max:
                cache.clear()
            cache[address] = found
        return found


def _host(text: str) -> str:
    """Strip a port and IPv6 brackets: ``[2001:db8::1]:443`` and ``192.0.2.1:80`` are hosts too."""
    text = text.strip()
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise ValueError("unbalanced bracket")
        rest = text[end + 1 :]
        if rest and not (rest.startswith(":") and rest[1:].isdigit()):
            raise ValueError("junk after a bracketed address")
        return text[1:end]
    if text.count(":") == 1:
        # IPv4 with a port; bare IPv6 has two colons or more.
        host, _, port = text.partition(":")
        if not port.isdigit():
            raise ValueError("bad port")
        return host
    return text


def _x_forwarded_for(value: str) -> list[str]:
    hops = [_host(part) for part in value.split(",")]
    if not all(hops):
        raise ValueError("empty hop")
    return hops


def _x_real_ip(value: str) -> list[str]:
    if "," in value:
        # Two X-Real-IP lines (or one with a list): someone besides our proxy wrote one.
        raise ValueError("X-Real-IP holds one address")
    return [_host(value)]


# One forwarded-pair (RFC 7239 §4): token "=" (token / quoted-string), then the
# separator that ends it: ";" (next pair), "," (next element) or the end. A regex
# walk: splitting character by character around quotes cost ~10 µs a header.
_PAIR: Final = re.compile(
    r"""[ \t]* ([!#$%&'*+.^_`|~0-9A-Za-z-]+) [ \t]*=[ \t]*
        ("(?:[^"\\]|\\.)*" | [^;,"\s]*) [ \t]* ([;,]|$)""",
    re.VERBOSE,
)
_EMPTY_ELEMENT: Final = re.compile(r"[ \t]*,")


def _forwarded(value: str) -> list[str]:
    """The ``for=`` node of each element of an RFC 7239 ``Forwarded`` value.

    An element without ``for=`` says nothing about who sent it, so it is an
    error like any other malformed element. Empty elements (``a, , b``) are
    skipped, as HTTP list syntax requires.
    """
    hops: list[str] = []
    node: str | None = None
    position, end, element_start = 0, len(value), True
    while position < end:
        if element_start:
            empty = _EMPTY_ELEMENT.match(value, position)
            if empty is not None:
                position = empty.end()
                continue
            if not value[position:].strip():
                break
        pair = _PAIR.match(value, position)
        if pair is None:
            raise ValueError("not a forwarded-pair")
        key, raw, separator = pair.groups()
        if key.lower() == "for":
            if node is not None:
                raise ValueError("for= twice in one element")
            node = _unquote(raw)
        position = pair.end()
        element_start = separator != ";"
        if element_start:
            if node is None:
                raise ValueError("an element without for=")
            # RFC 7239 §6: IPv6 is always bracketed (and so quoted); a port may follow.
            hops.append(_host(node))
            node = None
    if node is not None:
        hops.append(_host(node))
    if not hops:
        raise ValueError("empty Forwarded header")
    return hops


def _unquote(text: str) -> str:
    if len(text) >= 2 and text[0] == text[-1] == '"':  # noqa: PLR2004 -- the two quotes
        inner = text[1:-1]
        if "\\" not in inner:
            return inner
        out = []
        escaped = False
        for char in inner:
            if escaped:
                out.append(char)
                escaped = False
            elif char == "\\":
                escaped = True
            else:
                out.append(char)
        return "".join(out)
    if '"' in text:
        raise ValueError("stray quote")
    return text
