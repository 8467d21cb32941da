"""``@rate_limit``: a route's own limits, a named policy, or an exemption, marked on the endpoint.

The decorator only marks the endpoint and returns it unchanged (FastAPI still
reads its signature); the limiter finds the mark when it reads the app's
routes at start-up, so the decorator may sit above or below the route
decorator. A ``ratelimit.routes`` entry in the settings for the same route wins,
so operators can change a limit without a release.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Final, TypeVar

from bastion.errors import ConfigurationError
from bastion.ratelimit._expression import parse_limits
from bastion.ratelimit._policy import KEY_PARTS, check_policy_name
from bastion.settings import RateLimitAlgorithm, RateLimitKey

__all__ = ["MARK", "RouteLimit", "rate_limit"]

E = TypeVar("E")

MARK: Final = "__bastion_rate_limit__"
"""The endpoint attribute the decorator sets."""


@dataclass(frozen=True, slots=True)
class RouteLimit:
    """What ``@rate_limit`` asked for one endpoint.

    Attributes:
        policy: a policy from ``ratelimit.policies`` (or ``default``), or the
            inline policy's name; ``None`` means exempt.
        limits: the inline policy's limits; ``None`` for a named policy.
        by: the inline policy's key parts.
        algorithm: the inline policy's algorithm; ``None`` for ``ratelimit.algorithm``.
        fail_open: the inline policy's failure rule; ``None`` for ``ratelimit.fail_open``.
        cost: units one request consumes; ``None`` for the named policy's own (or 1).
    """

    policy: str | None
    limits: str | None = None
    by: tuple[RateLimitKey, ...] = ("client",)
    algorithm: RateLimitAlgorithm | None = None
    fail_open: bool | None = None
    cost: int | None = None

    @property
    def exempt(self) -> bool:
        """Whether the endpoint is not limited at all."""
        return self.policy is None


_EXEMPT: Final = RouteLimit(None)


def _mark(endpoint: E, limit: RouteLimit) -> E:
    try:
        setattr(endpoint, MARK, limit)
    except (AttributeError, TypeError):
        raise TypeError(
            f"@rate_limit decorates endpoint functions or classes, not {endpoint!r}"
        ) from None
    return endpoint


class _RateLimitDecorator:
    """The ``rate_limit`` decorator; ``rate_limit.exempt`` marks an endpoint unlimited."""

    def __call__(
        self,
        limits: str | None = None,
        *,
        policy: str | None = None,
        by: Sequence[RateLimitKey] = ("client",),
        algorithm: RateLimitAlgorithm | None = None,
        fail_open: bool | None = None,
        cost: int | None = None,
        name: str | None = None,
    ) -> Callable[[E], E]:
        """Limit an endpoint with its own limits or a named policy, instead of the default.

        Example:
            >>> @app.post("/v1/documents")
            ... @rate_limit("10/minute;100/day", by=["principal"])
            ... async def upload(...): ...
            >>> @app.post("/v1/reports")
            ... @rate_limit(policy="reports")
            ... async def report(...): ...

        Args:
            limits: limits such as ``10/minute;100/day``, counted for this endpoint
                alone (its policy is named ``name``, or the endpoint's name).
            policy: instead of ``limits``, a policy of ``ratelimit.policies``
                (or ``default``), sharing its counts with every route that names it.
            by: key parts of the inline limits (client, ip, principal, api_key,
                tenant, route).
            algorithm: of the inline limits; ``ratelimit.algorithm`` when omitted.
            fail_open: of the inline limits; ``ratelimit.fail_open`` when omitted.
            cost: units one request consumes; with ``policy=``, the policy's own
                cost when omitted, and 1 for inline limits.
            name: the inline policy's name (metrics label, key and header name).

        Raises:
            ConfigurationError: neither or both of ``limits`` and ``policy``; an
                invalid limit, key part, name or cost.
        """
        if (limits is None) == (policy is None):
            raise ConfigurationError("@rate_limit takes limits ('10/minute') or policy=, not both")
        if cost is not None:
            _check_cost(cost)
        if policy is not None:
            if name is not None or algorithm is not None or fail_open is not None:
                raise ConfigurationError(
                    "@rate_limit(policy=...) takes its settings from the policy; "
                    "name=, algorithm= and fail_open= are for inline limits"
                )
            return lambda endpoint: _mark(endpoint, RouteLimit(policy, cost=cost))
        assert limits is not None  # noqa: S101 -- the check above rules None out
        try:
            parse_limits(limits)
        except ValueError as exc:
            raise ConfigurationError(f"@rate_limit: {exc}") from None
        unknown = [part for part in by if part not in KEY_PARTS]
        if unknown or not by:
            raise ConfigurationError(
                f"@rate_limit: by= takes one or more of {', '.join(KEY_PARTS)}, not {unknown}"
            )
        if name is not None:
            check_policy_name(name)

        def mark(endpoint: E) -> E:
            own = name or check_policy_name(
                str(getattr(endpoint, "__name__", "")).lstrip("_") or "route"
            )
            return _mark(
                endpoint,
                RouteLimit(own, limits, tuple(by), algorithm, fail_open, cost),
            )

        return mark

    def exempt(self, endpoint: E) -> E:
        """Mark an endpoint as never limited (the default policy does not apply to it).

        Example:
            >>> @app.get("/v1/status")
            ... @rate_limit.exempt
            ... async def status(): ...
        """
        return _mark(endpoint, _EXEMPT)


def _check_cost(cost: int) -> None:
    if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
        raise ConfigurationError(f"@rate_limit: cost must be a whole number >= 1, not {cost!r}")


rate_limit: Final = _RateLimitDecorator()
"""Give an endpoint its own limits or a named policy; ``@rate_limit.exempt`` exempts it."""
