"""The rate-limit middleware: one store decision per request, 429 with the headers, or pass.

Pure ASGI, inside the request middleware (the request context, with the client
address and the identity, exists already) and in front of the router. Per
request: the operational paths and exempt networks pass untouched; the route's
plan comes from the limiter's table (:mod:`bastion._routes`); one
decision checks all of the policy's limits (one Redis round trip, or a
synchronous call into the memory store); an admitted response gets the
rate-limit headers added to its start, a rejected one is answered here as the
shared ``application/problem+json`` 429 (this layer is outside the app's
exception handlers, so it renders the error itself, as they would).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Coroutine
from typing import Any, Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion._routes import name_route
from bastion.context import current_context
from bastion.errors import BastionError
from bastion.observability import send_problem
from bastion.ratelimit._errors import LimitsUnavailable, QuotaExceeded, RateLimited
from bastion.ratelimit._limiter import RateLimiter
from bastion.ratelimit._policy import client_bucket
from bastion.ratelimit._quota import QuotaCounter, QuotaVerdict
from bastion.ratelimit._store import StoreUnavailable, Verdict

__all__ = ["RateLimitMiddleware"]

_NO_ADDRESS: Final = "-"


class RateLimitMiddleware:
    """Limits each HTTP request by the policy of the route it is for.

    Args:
        app: the wrapped ASGI app.
        limiter: the app's :class:`~bastion.ratelimit.RateLimiter`.
    """

    def __init__(self, app: ASGIApp, *, limiter: RateLimiter) -> None:
        self.app = app
        self.limiter = limiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: PLR0911, PLR0912, PLR0915 -- one frame on every request; helpers cost a call each
        limiter = self.limiter
        tenants = limiter.tenants
        if scope["type"] != "http" or not (limiter.active or tenants is not None):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if limiter.operational_prefixes and limiter.operational_prefixes.matches(path):
            await self.app(scope, receive, send)
            return
        routes = limiter.routes
        if routes is None or len(routes) != limiter.route_count:
            # Not started through the lifespan, or routes were added since: read them now.
            if routes is None:
                routes = getattr(getattr(scope.get("app"), "router", None), "routes", [])
            if not limiter.read_routes(routes) and tenants is None:
                await self.app(scope, receive, send)
                return
        context = current_context()
        if context is not None:
            address = context.client_ip
        else:
            client = scope.get("client")
            address = client[0] if client else None
        if address is None:
            address = _NO_ADDRESS
        elif limiter.exempt_networks and limiter.exempt(address):
            await self.app(scope, receive, send)
            return
        root_path = scope.get("root_path")
        if root_path and path.startswith(root_path) and path != root_path:
            # The router matches the path below the root path (Starlette's get_route_path).
            path = path[len(root_path) :]
        method = scope["method"]
        plan = limiter.resolve(method, path)
        policy = plan.policy
        counters: tuple[QuotaCounter, ...] = ()
        if tenants is not None and context is not None and context.tenant_id:
            tenant_plan = tenants.cached(context.tenant_id)
            if tenant_plan is None:
                tenant_plan = await tenants.plan(context.tenant_id)
            if tenant_plan.policy is not None and policy is not None and policy is limiter.default:
                policy = tenant_plan.policy
            counters = tenant_plan.key_counters if context.api_key_id else tenant_plan.user_counters
        if policy is None:
            if counters and not await _metered(
                counters,
                limiter,
                limiter.template(method, path),
                scope=scope,
                receive=receive,
                send=send,
            ):
                return
            await self.app(scope, receive, send)
            return
        # IPv4 is its own bucket; only IPv6 needs the /64 (cached) lookup.
        bucket = address if ":" not in address else client_bucket(address)
        key = policy.key(context, bucket, plan.route)
        decide_now = limiter.decide_now
        quota: QuotaVerdict | None = None
        try:
            if counters:
                # Concurrently: on Redis both calls go out at once and share the wait.
                decision = limiter.store.decide(key, policy.rules, policy.cost)
                verdict, quota = await _decide_and_meter(decision, counters, limiter)
            elif decide_now is not None:
                verdict = decide_now(key, policy.rules, policy.cost)
            else:
                verdict = await limiter.store.decide(key, policy.rules, policy.cost)
        except StoreUnavailable as exc:
            try:
                limiter.unavailable(policy, exc)
            except LimitsUnavailable as error:
                name_route(scope, limiter.template(method, path))
                await send_problem(error, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        except _Refused as refused:
            name_route(scope, limiter.template(method, path))
            await send_problem(refused.error, scope, receive, send)
            return
        limiter.degradation.recovered()
        headers = policy.headers
        if not verdict.allowed:
            if quota is not None and tenants is not None:
                # The limit refused what the quota admitted: the request is not made.
                with contextlib.suppress(BastionError):
                    await tenants.quotas.refund(quota)
            policy.rejected()
            name_route(scope, limiter.template(method, path))
            await send_problem(
                RateLimited(
                    verdict.retry_after,
                    headers=headers.mapping(verdict) if headers is not None else None,
                ),
                scope,
                receive,
                send,
            )
            return
        policy.allowed()
        if headers is None:
            await self.app(scope, receive, send)
            return
        extra = headers.raw(verdict)

        # A function returning send's awaitable, not a coroutine: no coroutine object
        # per message (the request middleware does the same, ~0.3 µs a response).
        def send_with_limits(message: Message) -> Awaitable[None]:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            return send(message)

        await self.app(scope, receive, send_with_limits)


class _Refused(Exception):
    """A tenant quota refused the request (or its store failed closed): answer ``error``."""

    def __init__(self, error: BastionError) -> None:
        super().__init__(error.detail)
        self.error = error


async def _consume(counters: tuple[QuotaCounter, ...], limiter: RateLimiter) -> QuotaVerdict:
    tenants = limiter.tenants
    assert tenants is not None  # noqa: S101 -- only called when the limiter has a tenant hook
    try:
        quota = await tenants.quotas.consume(counters)
    except LimitsUnavailable as error:
        raise _Refused(error) from error
    if not quota.allowed:
        tenants.rejected(quota.exhausted or "quota")
        raise _Refused(QuotaExceeded(quota.retry_after, quota=quota.exhausted))
    return quota


async def _decide_and_meter(
    decision: Coroutine[Any, Any, Verdict],
    counters: tuple[QuotaCounter, ...],
    limiter: RateLimiter,
) -> tuple[Verdict, QuotaVerdict]:
    """Run the limit decision and the quota consumption at once; the quota's refusal wins.

    Raises:
        StoreUnavailable: the decision could not be made (and the quota admitted).
        _Refused: the quota is spent, or its store is down and it fails closed.
    """
    verdict, quota = await asyncio.gather(
        decision, _consume(counters, limiter), return_exceptions=True
    )
    if isinstance(quota, BaseException):
        raise quota
    if isinstance(verdict, BaseException):
        # The quota stays counted: when the limit fails open the request is made.
        raise verdict
    return verdict, quota


async def _metered(
    counters: tuple[QuotaCounter, ...],
    limiter: RateLimiter,
    template: str | None,
    *,
    scope: Scope,
    receive: Receive,
    send: Send,
) -> bool:
    """Consume the quota of a request no limit applies to; ``False`` once answered."""
    try:
        await _consume(counters, limiter)
    except _Refused as refused:
        name_route(scope, template)
        await send_problem(refused.error, scope, receive, send)
        return False
    return True
