"""What the rate-limit middleware asks about a tenant: its limits and its quota counters.

The middleware knows no tenants; a :class:`TenantHook` (``bastion.tenancy``'s
``TenantQuotas``) answers, per tenant, a :class:`TenantPlan`: the policy that
replaces the default one for the tenant's callers (its override) and the quota
counters each of its requests consumes. The middleware then runs the limit
decision and the quota consumption concurrently, so on Redis they share the
round trip (the script runner writes both at once).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from bastion.ratelimit._policy import Policy
    from bastion.ratelimit._quota import QuotaCounter, Quotas

__all__ = ["TenantHook", "TenantPlan"]


@dataclass(frozen=True, slots=True)
class TenantPlan:
    """How one tenant's requests are limited and metered.

    Attributes:
        policy: replaces the default policy for the tenant's callers (the
            tenant's ``ratelimit.default`` override), or ``None`` to keep it.
        user_counters: consumed by each request of a user (or service) of the tenant.
        key_counters: consumed by each request made with one of the tenant's API keys.
    """

    policy: Policy | None
    user_counters: tuple[QuotaCounter, ...]
    key_counters: tuple[QuotaCounter, ...]


class TenantHook(Protocol):
    """Answers a tenant's plan; a hit must not await (it runs on every request)."""

    @property
    def quotas(self) -> Quotas:
        """The quota counters' store (the limiter's, so calls share round trips)."""
        ...

    def cached(self, tenant_id: str) -> TenantPlan | None:
        """Return the tenant's plan if known and fresh, without awaiting."""
        ...

    async def plan(self, tenant_id: str) -> TenantPlan:
        """Load the tenant's plan (its overrides); never raises for a store outage."""
        ...

    def rejected(self, quota: str) -> None:
        """Count a request refused by ``quota``."""
        ...
