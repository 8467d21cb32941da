"""The rate limiter of one app: its policies, its store, and the route table the middleware reads.

``bastion.install`` builds one and keeps it at ``app.state.bastion.ratelimit``.
Requests are limited by :class:`~bastion.ratelimit.RateLimitMiddleware`; code
that limits something other than a request calls :meth:`RateLimiter.hit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Final

import orjson
import structlog
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from bastion._forwarded import NetworkSet
from bastion._routes import ANY_METHOD, PathSet, RouteEntry, RouteTable, route_entries
from bastion.errors import ConfigurationError, FieldError, InvalidInput
from bastion.ratelimit._decorator import MARK, RouteLimit
from bastion.ratelimit._errors import LimitsUnavailable, RateLimited
from bastion.ratelimit._policy import (
    DEFAULT_POLICY,
    EXEMPT,
    UNMATCHED_ROUTE,
    Policy,
    RoutePlan,
    build_policy,
    check_policy_name,
)
from bastion.ratelimit._rules import build_rules
from bastion.ratelimit._store import LimitStore, StoreUnavailable, Verdict
from bastion.resilience import Degradation

if TYPE_CHECKING:
    from bastion.ratelimit._tenants import TenantHook
    from bastion.settings import RateLimitSettings

__all__ = ["RateLimiter"]

logger = structlog.get_logger("bastion.ratelimit")

_EXEMPT_CACHE_MAX: Final = 65_536
_IDENTIFIER_MAX: Final = 320  # the longest e-mail address RFC 5321 allows
FAILED_OPEN: Final = Verdict(allowed=True, retry_after=0.0, remaining=(), reset_after=())
"""The verdict of a decision admitted while the store was unreachable: nothing is known."""


class RateLimiter:
    """Policies, the store they are decided in, and which route gets which policy.

    Args:
        settings: the ``ratelimit`` section.
        store: where decisions are made (memory or Redis).
        operational_prefixes: paths never limited (the health prefix and the
            metrics path).
        quotas: the quota counters on the same store (``bastion.ratelimit.Quotas``).
        login: login throttling and lockout on the same store
            (``bastion.ratelimit.LoginThrottle``).

    Attributes:
        settings: as given.
        store: as given.
        policies: the named policies of ``ratelimit.policies``.
        default: the policy of ``ratelimit.default``, or ``None``.
        exempt_networks: the networks of ``ratelimit.exempt_networks``.
        quotas: as given.
        login: as given.
        active: whether any request can be limited (known once the routes are
            read); the middleware passes every request straight on while it is
            ``False`` and there is no ``tenants`` hook.
        tenants: per-tenant limits and quotas (``bastion.tenancy.TenantQuotas``
            attaches itself), or ``None``.

    Raises:
        ConfigurationError: a policy is refused (see :func:`build_policy`).
    """

    def __init__(
        self,
        settings: RateLimitSettings,
        *,
        store: LimitStore,
        operational_prefixes: tuple[str, ...] = (),
        quotas: Any = None,
        login: Any = None,
    ) -> None:
        self.settings = settings
        self.store = store
        self.quotas = quotas
        self.login = login
        # The memory store decides synchronously: no coroutine, no await per request.
        self.decide_now: Any = getattr(store, "decide_now", None)
        self.operational_prefixes = PathSet(operational_prefixes)
        headers = settings.headers
        self.policies: dict[str, Policy] = {
            name: build_policy(
                name,
                spec,
                algorithm=settings.algorithm,
                fail_open=settings.fail_open,
                max_log_limit=settings.max_log_limit,
                headers=headers,
            )
            for name, spec in settings.policies.items()
        }
        self.default: Policy | None = None
        if settings.default is not None:
            self.default = Policy(
                DEFAULT_POLICY,
                build_rules(
                    settings.default, settings.algorithm, max_log_limit=settings.max_log_limit
                ),
                fail_open=settings.fail_open,
                headers=headers,
            )
        self.default_plan = RoutePlan(self.default, UNMATCHED_ROUTE)
        self._route_settings: dict[tuple[str, str], str] = {}
        for key, name in settings.routes.items():
            method, _, template = key.strip().rpartition(" ")
            self._route_settings[(method.strip().upper() or ANY_METHOD, template)] = name
        self._exempt = NetworkSet(settings.exempt_networks, cache_max=_EXEMPT_CACHE_MAX)
        self.exempt_networks = self._exempt.networks
        self.degradation = Degradation("redis", feature="rate limits")
        self.table: RouteTable[RoutePlan] | None = None
        self.templates: RouteTable[RoutePlan] | None = None
        self.routes: Sequence[BaseRoute] | None = None
        self.route_count = -1
        self._inline: dict[RouteLimit, Policy] = {}
        # Unknown until the routes are read (at start-up): decorators may limit a route.
        self.active = True
        # Per-tenant overrides and quotas (bastion.tenancy.TenantQuotas), when installed.
        self.tenants: TenantHook | None = None

    # -- routes ---------------------------------------------------------------------------

    def read_routes(self, routes: Sequence[BaseRoute]) -> bool:
        """Build the route table from the app's routes (at start-up, and when they change).

        Skipped entirely, and requests never resolved, when no route has a plan of
        its own: every request then gets the default policy.

        Returns:
            Whether any request can be limited (:attr:`active`).

        Raises:
            ConfigurationError: a route names a policy that does not exist, or two
                endpoints' inline limits share a name.
        """
        entries = list(route_entries(routes))
        used: set[tuple[str, str]] = set()
        own = False

        def plan(entry: RouteEntry, method: str) -> RoutePlan:
            nonlocal own
            found = self._plan(entry, method, used)
            if found.policy is not self.default or (
                found.policy is not None and found.policy.uses_route
            ):
                own = True
            return found

        table = RouteTable(
            entries,
            plan,
            self.default_plan,
            methods=[method for method, _ in self._route_settings if method != ANY_METHOD],
        )
        unused = sorted(
            f"{method} {template}" if method != ANY_METHOD else template
            for method, template in set(self._route_settings) - used
        )
        if unused:
            logger.warning("ratelimit.routes name no route of the app", routes=unused)
        self.table = table if own else None
        # Kept whether or not requests need it: a rejected request never reaches the
        # router, and its metrics and access line still name the route it was for.
        self.templates = table
        self.routes = routes
        self.route_count = len(routes)
        self.active = self.default is not None or own
        return self.active

    def _plan(self, entry: RouteEntry, method: str, used: set[tuple[str, str]]) -> RoutePlan:
        template = entry.template or UNMATCHED_ROUTE
        route = f"{method} {template}"
        for key in (
            (method, template),
            (method, entry.declared or template),
            (ANY_METHOD, template),
            (ANY_METHOD, entry.declared or template),
        ):
            name = self._route_settings.get(key)
            if name is not None:
                used.add(key)
                policy = self._named(name, f"ratelimit.routes[{key[1]!r}]")
                return RoutePlan(policy, route, entry.template)
        mark = getattr(entry.endpoint, MARK, None)
        if isinstance(mark, RouteLimit):
            return RoutePlan(self._marked(mark, template), route, entry.template)
        return RoutePlan(self.default, route, entry.template)

    def _named(self, name: str, where: str) -> Policy | None:
        if name == EXEMPT:
            return None
        if name == DEFAULT_POLICY:
            if self.default is None:
                raise ConfigurationError(
                    f"{where} names the default policy, but ratelimit.default is not set"
                )
            return self.default
        policy = self.policies.get(name)
        if policy is None:
            known = ", ".join(sorted([*self.policies, DEFAULT_POLICY, EXEMPT]))
            raise ConfigurationError(f"{where} names no policy {name!r}; known: {known}")
        return policy

    def _marked(self, mark: RouteLimit, template: str) -> Policy | None:
        if mark.exempt:
            return None
        cached = self._inline.get(mark)
        if cached is not None:
            return cached
        assert mark.policy is not None  # noqa: S101 -- not exempt, so it names a policy
        if mark.limits is None:
            base = self._named(mark.policy, f"@rate_limit(policy=...) on {template}")
            if base is None or mark.cost is None or mark.cost == base.cost:
                return base
            # Its own cost, counted in the named policy's buckets.
            policy = Policy(
                base.name,
                base.rules,
                by=base.by,
                fail_open=base.fail_open,
                cost=mark.cost,
                headers=base.headers is not None,
            )
        else:
            name = mark.policy
            clash = (
                name in self.policies
                or name == DEFAULT_POLICY
                or any(other.policy == name for other in self._inline)
            )
            if clash:
                raise ConfigurationError(
                    f"@rate_limit on {template}: the name {name!r} is taken by another policy "
                    "or endpoint; give this one its own with name=..."
                )
            check_policy_name(name)
            policy = Policy(
                name,
                build_rules(
                    mark.limits,
                    mark.algorithm or self.settings.algorithm,
                    max_log_limit=self.settings.max_log_limit,
                ),
                by=mark.by,
                fail_open=self.settings.fail_open if mark.fail_open is None else mark.fail_open,
                cost=mark.cost or 1,
                headers=self.settings.headers,
            )
        self._inline[mark] = policy
        return policy

    def resolve(self, method: str, path: str) -> RoutePlan:
        """Return the plan of the route ``method`` and ``path`` reach (below the root path)."""
        table = self.table
        if table is None:
            return self.default_plan
        return table.resolve(method, path)

    def template(self, method: str, path: str) -> str | None:
        """Return the template of the route ``method`` and ``path`` reach, if any.

        For answers made here rather than by the app (429, 503): the request
        middleware reads the template from ``scope["route"]``.
        """
        table = self.templates
        return table.resolve(method, path).template if table is not None else None

    def operations(self, routes: Sequence[BaseRoute]) -> dict[tuple[str, str], Policy | None]:
        """Return the policy of each ``(METHOD, template)`` of ``routes``, for the OpenAPI document.

        ``None`` for an operation that is not limited.
        """
        result: dict[tuple[str, str], Policy | None] = {}
        used: set[tuple[str, str]] = set()
        for entry in route_entries(routes):
            if entry.template is None:
                continue
            for method in entry.methods or ():
                result[(method, entry.template)] = self._plan(entry, method, used).policy
        return result

    # -- clients ------------------------------------------------------------------------

    def exempt(self, address: str) -> bool:
        """Return whether ``address`` is in ``ratelimit.exempt_networks``."""
        return address in self._exempt

    # -- decisions --------------------------------------------------------------------

    def policy(self, name: str) -> Policy:
        """Return the policy called ``name`` (``default`` included).

        Raises:
            KeyError: no such policy.
        """
        if name == DEFAULT_POLICY and self.default is not None:
            return self.default
        try:
            return self.policies[name]
        except KeyError:
            raise KeyError(f"no rate-limit policy {name!r}") from None

    async def hit(self, policy: str, key: str, *, cost: int | None = None) -> Verdict:
        """Count one use of ``key`` against a policy; raise when the policy rejects it.

        For what is not a request (a job, a message, an e-mail sent): the request
        path is limited by the middleware.

        Example:
            >>> await app.state.bastion.ratelimit.hit("exports", f"tenant:{tenant_id}")

        Args:
            policy: a name from ``ratelimit.policies``, or ``default``.
            key: what the use is counted per; counted in the policy's own
                namespace (``<policy>|<key>``).
            cost: units consumed; the policy's cost when omitted.

        Returns:
            The verdict when admitted. While the store is unreachable and the
            policy fails open, an admitted verdict with no per-limit state.

        Raises:
            KeyError: no such policy.
            RateLimited: the policy rejects it now (``retry_after`` says until when).
            LimitsUnavailable: the store is unreachable and the policy fails closed.
        """
        chosen = self.policy(policy)
        units = chosen.cost if cost is None else cost
        full_key = chosen.name + "|" + key
        try:
            verdict = await self.store.decide(full_key, chosen.rules, units)
        except StoreUnavailable as exc:
            return self.unavailable(chosen, exc)
        self.degradation.recovered()
        if verdict.allowed:
            chosen.allowed()
            return verdict
        chosen.rejected()
        headers = chosen.headers
        raise RateLimited(
            verdict.retry_after, headers=headers.mapping(verdict) if headers is not None else None
        )

    def unavailable(self, policy: Policy, exc: BaseException) -> Verdict:
        """Apply ``policy``'s failure rule to a decision the store could not make.

        Returns:
            :data:`FAILED_OPEN` when the policy fails open.

        Raises:
            LimitsUnavailable: the policy fails closed.
        """
        self.degradation.failed(exc)
        if policy.fail_open:
            policy.failed_open()
            return FAILED_OPEN
        policy.failed_closed()
        raise LimitsUnavailable from exc

    async def close(self) -> None:
        """Close the store; the limiter is not used afterwards."""
        self.degradation.forget()
        await self.store.close()

    # -- admin ----------------------------------------------------------------------------

    async def unlock_endpoint(self, request: Request) -> Response:
        """``POST /admin/ratelimit/unlock`` with ``{"identifier": "..."}``: lift a lockout.

        Answers ``{"unlocked": true}`` when the identifier was locked. The
        identifier is personal data: it is neither logged nor echoed.
        """
        try:
            body = orjson.loads(await request.body())
        except orjson.JSONDecodeError:
            body = None
        identifier = body.get("identifier") if isinstance(body, dict) else None
        if not isinstance(identifier, str) or not 0 < len(identifier.strip()) <= _IDENTIFIER_MAX:
            raise InvalidInput(
                errors=[
                    FieldError(
                        "body.identifier",
                        "invalid",
                        f"identifier must be a non-empty string of at most {_IDENTIFIER_MAX} "
                        "characters.",
                    )
                ]
            )
        if self.login is None:
            raise ConfigurationError("login throttling is not configured")
        unlocked = bool(await self.login.unlock(identifier))
        logger.info("account lockout lifted by an admin", unlocked=unlocked)
        return Response(
            orjson.dumps({"unlocked": unlocked}),
            media_type="application/json",
            headers={"cache-control": "no-store"},
        )
