"""The rate-limit middleware: one store decision per request, 429 with the headers, or pass.

Pure ASGI, inside the request middleware (the request context, with the client
address and the identity, exists already) and in front of the router. Per
request: the operational paths and exempt networks pass untouched; the route's
plan comes from the limiter's table (:mod:`bastion.ratelimit._routes`); one
decision checks all of the policy's limits (one Redis round trip, or a
synchronous call into the memory store); an admitted response gets the
rate-limit headers added to its start, a rejected one is answered here as the
shared ``application/problem+json`` 429 (this layer is outside the app's
exception handlers, so it renders the error itself, as they would).
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Final

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from bastion.context import current_context
from bastion.errors import BastionError
from bastion.observability import problem_response
from bastion.ratelimit._errors import LimitsUnavailable, RateLimited
from bastion.ratelimit._limiter import RateLimiter
from bastion.ratelimit._policy import client_bucket
from bastion.ratelimit._store import StoreUnavailable

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
        if scope["type"] != "http" or not limiter.active:
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        if limiter.operational_prefixes and path.startswith(limiter.operational_prefixes):
            await self.app(scope, receive, send)
            return
        routes = limiter.routes
        if routes is None or len(routes) != limiter.route_count:
            # Not started through the lifespan, or routes were added since: read them now.
            if routes is None:
                routes = getattr(getattr(scope.get("app"), "router", None), "routes", [])
            if not limiter.read_routes(routes):
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
        if policy is None:
            await self.app(scope, receive, send)
            return
        # IPv4 is its own bucket; only IPv6 needs the /64 (cached) lookup.
        bucket = address if ":" not in address else client_bucket(address)
        key = policy.key(context, bucket, plan.route)
        decide_now = limiter.decide_now
        try:
            if decide_now is not None:
                verdict = decide_now(key, policy.rules, policy.cost)
            else:
                verdict = await limiter.store.decide(key, policy.rules, policy.cost)
        except StoreUnavailable as exc:
            try:
                limiter.unavailable(policy, exc)
            except LimitsUnavailable as error:
                _name_route(scope, limiter.template(method, path))
                await _answer(error, scope, receive, send)
                return
            await self.app(scope, receive, send)
            return
        limiter.degradation.recovered()
        headers = policy.headers
        if not verdict.allowed:
            policy.rejected()
            _name_route(scope, limiter.template(method, path))
            await _answer(
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


class _Named:
    """Stands in for the route in ``scope["route"]`` of an answer made before routing."""

    __slots__ = ("path",)

    def __init__(self, path: str) -> None:
        self.path = path


def _name_route(scope: Scope, template: str | None) -> None:
    # The request middleware labels metrics, the access line and the span by
    # scope["route"].path; the router, which sets it, never ran for this request.
    if template is not None and "route" not in scope:
        scope["route"] = _Named(template)


async def _answer(error: BastionError, scope: Scope, receive: Receive, send: Send) -> None:
    context = current_context()
    response = problem_response(
        error.problem(context.request_id if context is not None else None),
        error.status,
        error.headers,
    )
    await response(scope, receive, send)
