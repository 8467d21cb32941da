"""Policies: named sets of limits, what they are counted per, and the key a request falls under.

A policy counts requests per distinct combination of its ``by`` parts:

========== ===================================================================
part       the value in the key
========== ===================================================================
client     the principal when known (the user, else the API key), else the IP
ip         the client IP (an IPv6 client is its /64: one client owns a /64)
principal  the principal (the user, else the API key)
api_key    the id of the API key the request presented
tenant     the tenant
route      the matched route, ``METHOD template`` (``_unmatched`` for a 404)
========== ===================================================================

An identity part the request does not have (an anonymous caller of a policy
``by: [tenant]``) falls back to the client IP, so anonymous callers never share
one bucket. Keys read ``<policy>|<part>|<part>``: ``default|ip:192.0.2.7``,
``uploads|t:acme|r:POST /v1/documents``.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from bastion.context import RequestContext
from bastion.errors import ConfigurationError
from bastion.observability.metrics import RATELIMIT_DECISIONS
from bastion.ratelimit._expression import Limit, parse_limits
from bastion.ratelimit._headers import HeaderRenderer
from bastion.ratelimit._rules import build_rules, check_cost
from bastion.ratelimit._store import Rule

if TYPE_CHECKING:
    from bastion.settings import RateLimitPolicy

__all__ = [
    "DEFAULT_POLICY",
    "EXEMPT",
    "KEY_PARTS",
    "Policy",
    "RoutePlan",
    "build_policy",
    "check_policy_name",
    "client_bucket",
]

DEFAULT_POLICY: Final = "default"
"""The name of ``ratelimit.default``'s policy."""
EXEMPT: Final = "exempt"
"""The policy name that means "not limited" in ``ratelimit.routes``."""
KEY_PARTS: Final = ("client", "ip", "principal", "api_key", "tenant", "route")
UNMATCHED_ROUTE: Final = "_unmatched"

_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}")

# (context, client bucket, route) -> the key of a request
KeyFunction = Callable[[RequestContext | None, str, str], str]

_BUCKETS_MAX: Final = 65_536
_buckets: dict[str, str] = {}


def check_policy_name(name: str, *, default: bool = False) -> str:
    """Return ``name`` if it can name a policy (in a Redis key and a header), else raise.

    Args:
        name: the name.
        default: whether this is the default policy, the one allowed to be ``default``.

    Raises:
        ConfigurationError: not 1-64 letters, digits and ``_.:-``, or a reserved name.
    """
    if not _NAME.fullmatch(name):
        raise ConfigurationError(
            f"rate-limit policy name {name!r}: use 1 to 64 letters, digits, '_', '.', ':' "
            "or '-', starting with a letter or digit"
        )
    if name == EXEMPT or (name == DEFAULT_POLICY and not default):
        raise ConfigurationError(
            f"rate-limit policy name {name!r} is reserved: {DEFAULT_POLICY!r} is "
            f"ratelimit.default's and {EXEMPT!r} means 'not limited'"
        )
    return name


def client_bucket(address: str) -> str:
    """Return what a client address is counted as: itself for IPv4, its /64 for IPv6.

    One IPv6 client owns a /64 (RFC 6177's smallest end-site assignment) and can
    pick any address in it, so counting single IPv6 addresses would let it escape
    any limit. Anything that is not an address is returned as it is.
    """
    if ":" not in address:
        return address
    bucket = _buckets.get(address)
    if bucket is None:
        try:
            ip = ipaddress.ip_address(address.partition("%")[0])
        except ValueError:
            bucket = address
        else:
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                bucket = str(ip.ipv4_mapped)
            else:
                bucket = str(ipaddress.ip_network((ip, 64), strict=False))
        if len(_buckets) >= _BUCKETS_MAX:
            _buckets.clear()
        _buckets[address] = bucket
    return bucket


class Policy:
    """One policy as the limiter runs it: its rules, key, headers and counters.

    Attributes:
        name: the policy's name (metric label, key namespace, header name).
        limits: the parsed limits.
        rules: the limits with their algorithm, as a store takes them.
        by: the key parts.
        fail_open: whether requests are admitted while the store is unreachable.
        cost: the units one request consumes.
        headers: renders the response headers, or ``None`` when they are off.
        allowed: counts an admitted decision (``rejected``, ``failed_open`` and
            ``failed_closed`` likewise), in ``bastion_ratelimit_decisions_total``.
        key: makes a request's key from its context, client bucket and route.
        uses_route: whether the key depends on the route.
    """

    __slots__ = (
        "allowed",
        "by",
        "cost",
        "fail_open",
        "failed_closed",
        "failed_open",
        "headers",
        "key",
        "limits",
        "name",
        "rejected",
        "rules",
        "uses_route",
    )

    def __init__(
        self,
        name: str,
        rules: Sequence[Rule],
        *,
        by: Sequence[str] = ("client",),
        fail_open: bool = True,
        cost: int = 1,
        headers: bool = True,
    ) -> None:
        self.name = name
        self.rules = tuple(rules)
        self.limits: tuple[Limit, ...] = tuple(rule.limit for rule in self.rules)
        unknown = [part for part in by if part not in KEY_PARTS]
        if unknown or not by:
            raise ConfigurationError(
                f"rate-limit policy {name!r}: 'by' takes one or more of {', '.join(KEY_PARTS)}"
                + (f", not {', '.join(map(repr, unknown))}" if unknown else "")
            )
        self.by = tuple(by)
        self.fail_open = fail_open
        self.cost = cost
        check_cost(self.rules, cost)
        self.headers = HeaderRenderer(name, self.limits) if headers else None
        self.key = _key_function(name, self.by)
        self.uses_route = "route" in self.by
        # Bound once: .labels() builds a tuple and takes a lock on every call.
        self.allowed = _counter(name, "allowed")
        self.rejected = _counter(name, "rejected")
        self.failed_open = _counter(name, "failed_open")
        self.failed_closed = _counter(name, "failed_closed")

    def __repr__(self) -> str:
        limits = ";".join(limit.text for limit in self.limits)
        return f"Policy({self.name!r}, {limits!r}, by={list(self.by)})"


def _counter(policy: str, decision: str) -> Callable[[], None]:
    """Return a function that counts one decision of ``policy`` in the decisions metric.

    It adds to the labelled child's value directly: ``Counter.inc`` also checks
    the metric's state, the amount's sign and exemplars on every call, 0.8 µs a
    request against 0.3 µs this way (timeit, this machine). That value is
    prometheus_client's internal, so the public ``inc`` is used when a version
    lays it out differently.
    """
    child: Any = RATELIMIT_DECISIONS.labels(policy, decision)
    add = getattr(getattr(child, "_value", None), "inc", None)
    if not callable(add):
        return child.inc  # type: ignore[no-any-return]  # prometheus_client is untyped here
    return functools.partial(add, 1.0)


def build_policy(
    name: str,
    spec: RateLimitPolicy,
    *,
    algorithm: str,
    fail_open: bool,
    max_log_limit: int,
    headers: bool,
) -> Policy:
    """Build a runnable policy from its settings.

    Args:
        name: the policy's name.
        spec: its settings (limits, by, algorithm, fail_open, cost).
        algorithm: ``ratelimit.algorithm``, for a policy that names none.
        fail_open: ``ratelimit.fail_open``, for a policy that says nothing.
        max_log_limit: ``ratelimit.max_log_limit``.
        headers: whether responses carry the rate-limit headers.

    Raises:
        ConfigurationError: the name, a limit, the algorithm or the cost is refused.
    """
    check_policy_name(name, default=True)
    try:
        limits = parse_limits(spec.limits)
    except ValueError as exc:
        raise ConfigurationError(f"rate-limit policy {name!r}: {exc}") from None
    try:
        rules = build_rules(limits, spec.algorithm or algorithm, max_log_limit=max_log_limit)
    except ConfigurationError as exc:
        raise ConfigurationError(f"rate-limit policy {name!r}: {exc}") from None
    try:
        return Policy(
            name,
            rules,
            by=spec.by,
            fail_open=fail_open if spec.fail_open is None else spec.fail_open,
            cost=spec.cost,
            headers=headers,
        )
    except ConfigurationError as exc:
        if str(exc).startswith("rate-limit policy"):
            raise
        raise ConfigurationError(f"rate-limit policy {name!r}: {exc}") from None


def _key_function(name: str, by: tuple[str, ...]) -> KeyFunction:
    prefix = name + "|"
    if by == ("client",):
        # The default policy's shape, on every request: one branch, one concatenation.
        def client_key(context: RequestContext | None, bucket: str, route: str) -> str:
            if context is not None:
                user = context.user_id
                if user:
                    return prefix + "u:" + user
                api_key = context.api_key_id
                if api_key:
                    return prefix + "k:" + api_key
            return prefix + "ip:" + bucket

        return client_key
    if by == ("ip",):

        def ip_key(context: RequestContext | None, bucket: str, route: str) -> str:
            return prefix + "ip:" + bucket

        return ip_key
    parts = by

    def composite_key(context: RequestContext | None, bucket: str, route: str) -> str:
        values = []
        for part in parts:
            values.append(_part(part, context, bucket, route))
        return prefix + "|".join(values)

    return composite_key


def _part(part: str, context: RequestContext | None, bucket: str, route: str) -> str:
    if part == "route":
        return "r:" + route
    if part == "ip" or context is None:
        return "ip:" + bucket
    value: str | None
    if part == "client" or part == "principal":  # noqa: PLR1714 -- reads as the two names
        # The principal is the user, else the API key (a key has no user).
        if context.user_id:
            return "u:" + context.user_id
        value = context.api_key_id
        tag = "k:"
    elif part == "tenant":
        value = context.tenant_id
        tag = "t:"
    else:
        value = context.api_key_id
        tag = "k:"
    # A part the request lacks falls back to the IP: anonymous callers never share a bucket.
    return tag + value if value else "ip:" + bucket


@dataclass(frozen=True, slots=True)
class RoutePlan:
    """What the limiter does with requests to one route and method.

    Attributes:
        policy: the policy to apply, or ``None`` when the route is not limited.
        route: ``METHOD template``, for policies counted per route.
        template: the route's template, or ``None`` when no route matches.
    """

    policy: Policy | None
    route: str
    template: str | None = None
