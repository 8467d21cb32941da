"""Per-tenant quotas and overrides: what each tenant's requests consume, and its own limits.

Three quotas, from ``tenancy.quotas`` unless the tenant overrides them:

* ``requests_per_day``: every request of a principal acting for the tenant (a
  user's token, an API key, a trusted service), per UTC day;
* ``api_calls_per_month``: requests made with one of the tenant's API keys, per
  UTC month (counted in the same call as the day quota);
* ``members``: members of the tenant, counted in the database when an
  invitation is made or accepted (pending invitations count at invitation).

A tenant's overrides live in ``bastion_tenants.settings``::

    {"quotas": {"requests_per_day": 50000, "members": null},
     "ratelimit": {"default": "50/second;10000/hour"}}

A quota named there replaces the setting (``null``: unlimited); one not named
keeps it. ``ratelimit.default`` replaces the limits of the default policy for
the tenant's callers (routes with a policy of their own keep it; with no
``ratelimit.default`` configured there is no default policy to replace).

On the request path (:class:`TenantQuotas`, hooked into the rate limiter) the
overrides are read once per ``tenancy.overrides_ttl`` per tenant and instance
and kept in memory; both request quotas are consumed in one
:meth:`~bastion.ratelimit.Quotas.consume` call, run concurrently with the
rate-limit decision. An unlimited quota is still counted (with a limit no one
reaches) so that usage is known for every tenant at no extra round trip.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

import structlog
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from sqlalchemy import select

from bastion.observability.metrics import TENANT_QUOTA_REJECTIONS
from bastion.ratelimit._expression import parse_limits
from bastion.ratelimit._policy import DEFAULT_POLICY, Policy
from bastion.ratelimit._quota import QuotaCounter, Quotas
from bastion.ratelimit._rules import build_rules
from bastion.ratelimit._tenants import TenantPlan

if TYPE_CHECKING:
    from bastion.data import Database
    from bastion.identity._directory import TenantRecord
    from bastion.identity._runtime import Identity
    from bastion.ratelimit._limiter import RateLimiter
    from bastion.settings import RateLimitSettings, Settings, TenantQuotaSettings

__all__ = [
    "API_CALLS_PER_MONTH",
    "MEMBERS",
    "REQUESTS_PER_DAY",
    "TenantOverrides",
    "TenantQuotas",
    "members_limit",
    "quota_limit",
    "tenant_usage",
    "validate_overrides",
]

logger = structlog.get_logger("bastion.tenancy")

REQUESTS_PER_DAY: Final = "requests_per_day"
API_CALLS_PER_MONTH: Final = "api_calls_per_month"
MEMBERS: Final = "members"

# The limit an unlimited quota is counted under: unreachable, and exact in the
# double-precision numbers of Redis's Lua.
_UNMETERED: Final = 2**50
_CACHE_MAX: Final = 10_000
# A tenant whose overrides could not be read gets the settings' values for this long.
_FALLBACK_TTL: Final = 5.0


class TenantQuotaOverrides(BaseModel):
    """A tenant's own quotas; a quota given as ``null`` is unlimited, one left out is inherited."""

    model_config = ConfigDict(extra="forbid")

    requests_per_day: int | None = Field(default=None, ge=0)
    api_calls_per_month: int | None = Field(default=None, ge=0)
    members: int | None = Field(default=None, ge=1)


class TenantRateLimitOverrides(BaseModel):
    """A tenant's own rate limits."""

    model_config = ConfigDict(extra="forbid")

    default: str | None = None
    """Limits replacing ``ratelimit.default`` for the tenant's callers (``20/second;1000/hour``)."""

    @field_validator("default")
    @classmethod
    def _parses(cls, value: str | None) -> str | None:
        if value is not None:
            parse_limits(value)
        return value


class TenantOverrides(BaseModel):
    """The document kept in ``bastion_tenants.settings``."""

    model_config = ConfigDict(extra="forbid")

    quotas: TenantQuotaOverrides | None = None
    ratelimit: TenantRateLimitOverrides | None = None


def validate_overrides(raw: Any) -> dict[str, Any]:
    """Return the overrides ``raw`` as stored: checked, with what was left out left out.

    Raises:
        ValueError: an unknown key, a negative quota, or a limit expression that
            does not parse (the message says which).
    """
    try:
        model = TenantOverrides.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in exc.errors()
        )
        raise ValueError(problems) from None
    return model.model_dump(exclude_unset=True)


def quota_limit(
    defaults: TenantQuotaSettings, overrides: Mapping[str, Any], name: str
) -> int | None:
    """Return the tenant's limit of quota ``name`` (``None``: unlimited)."""
    own = overrides.get("quotas")
    if isinstance(own, Mapping) and name in own:
        value = own[name]
        return None if value is None else int(value)
    limit: int | None = getattr(defaults, name)
    return limit


def members_limit(settings: Settings, overrides: Mapping[str, Any]) -> int | None:
    """Return how many members the tenant may have (``None``: unlimited)."""
    return quota_limit(settings.tenancy.quotas, overrides, MEMBERS)


class TenantQuotas:
    """Per-tenant quota counters and rate-limit overrides on the request path.

    Attached to the app's :class:`~bastion.ratelimit.RateLimiter` (:meth:`attach`),
    its middleware asks :meth:`cached` (or :meth:`plan` on a miss) for each request
    of a principal with a tenant.

    Example:
        >>> tenant_quotas = TenantQuotas.from_settings(
        ...     settings, quotas=limiter.quotas, database=database, limiter=limiter
        ... )
        >>> tenant_quotas.forget(tenant_id)  # after its overrides changed

    Args:
        quotas: the quota store (the limiter's, so quota calls and limit decisions
            share round trips).
        database: where the tenants' overrides are read; ``None`` reads none.
        defaults: ``tenancy.quotas``.
        ratelimit: the ``ratelimit`` section (algorithm, failure rule, headers of
            an override policy).
        ttl: seconds a tenant's overrides are kept (``tenancy.overrides_ttl``).
        clock: monotonic seconds (tests inject one).
    """

    def __init__(
        self,
        quotas: Quotas,
        database: Database | None,
        *,
        defaults: TenantQuotaSettings,
        ratelimit: RateLimitSettings,
        ttl: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._quotas = quotas
        self._database = database
        self._defaults = defaults
        self._ratelimit = ratelimit
        self._ttl = ttl
        self._clock = clock
        self._plans: OrderedDict[str, tuple[float, TenantPlan]] = OrderedDict()
        self._loading: dict[str, asyncio.Future[TenantPlan]] = {}
        self._rejections = {
            name: TENANT_QUOTA_REJECTIONS.labels(quota=name)
            for name in (REQUESTS_PER_DAY, API_CALLS_PER_MONTH, MEMBERS)
        }

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        quotas: Quotas,
        database: Database | None,
        limiter: RateLimiter | None = None,
    ) -> TenantQuotas:
        """Build from the settings tree; with ``limiter``, attach to it as well.

        Args:
            settings: the whole tree (``tenancy`` and ``ratelimit``).
            quotas: the limiter's quota store (``limiter.quotas``).
            database: the app's database.
            limiter: the app's rate limiter, to hook the tenant quotas into.
        """
        made = cls(
            quotas,
            database,
            defaults=settings.tenancy.quotas,
            ratelimit=settings.ratelimit,
            ttl=settings.tenancy.overrides_ttl,
        )
        if limiter is not None:
            made.attach(limiter)
        return made

    def attach(self, limiter: RateLimiter) -> None:
        """Make ``limiter``'s middleware meter and limit tenants through this object."""
        limiter.tenants = self

    @property
    def quotas(self) -> Quotas:
        """The quota store."""
        return self._quotas

    # -- the request path ---------------------------------------------------------------

    def cached(self, tenant_id: str) -> TenantPlan | None:
        """Return the tenant's plan while fresh, else ``None``; never awaits."""
        entry = self._plans.get(tenant_id)
        if entry is None or entry[0] <= self._clock():
            return None
        return entry[1]

    async def plan(self, tenant_id: str) -> TenantPlan:
        """Return the tenant's plan, reading its overrides when not cached.

        A database that cannot answer leaves the tenant on the settings' values
        for a few seconds (logged); it never fails the request.
        """
        found = self.cached(tenant_id)
        if found is not None:
            return found
        pending = self._loading.get(tenant_id)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[TenantPlan] = asyncio.get_running_loop().create_future()
        self._loading[tenant_id] = future
        try:
            ttl = self._ttl
            try:
                overrides = await self._overrides(tenant_id)
            except Exception as exc:  # noqa: BLE001 -- the request goes on under the settings' quotas
                logger.warning("tenant overrides not read", error=type(exc).__name__)
                overrides, ttl = {}, min(self._ttl, _FALLBACK_TTL)
            made = self.build_plan(tenant_id, overrides)
            self._remember(tenant_id, made, ttl)
            future.set_result(made)
            return made
        finally:
            self._loading.pop(tenant_id, None)
            if not future.done():
                future.cancel()

    def rejected(self, quota: str) -> None:
        """Count a request refused by ``quota``."""
        counter = self._rejections.get(quota)
        if counter is None:
            counter = TENANT_QUOTA_REJECTIONS.labels(quota=quota)
        counter.inc()

    def forget(self, tenant_id: str | uuid.UUID) -> None:
        """Drop the tenant's cached overrides (after a change); other instances wait out the TTL."""
        self._plans.pop(str(tenant_id), None)

    # -- plans ----------------------------------------------------------------------------

    def build_plan(self, tenant_id: str, overrides: Mapping[str, Any]) -> TenantPlan:
        """Return the plan of ``tenant_id`` under ``overrides`` (its ``settings`` document).

        An override that no longer validates (edited in the database by hand) is
        logged and ignored rather than failing every request of the tenant.
        """
        try:
            overrides = validate_overrides(dict(overrides))
        except ValueError:
            logger.warning("tenant overrides invalid; settings apply", tenant_id=tenant_id)
            overrides = {}
        day, month = self.counters(tenant_id, overrides)
        return TenantPlan(
            policy=self._policy(overrides),
            user_counters=(day,),
            key_counters=(day, month),
        )

    def counters(
        self, tenant_id: str, overrides: Mapping[str, Any]
    ) -> tuple[QuotaCounter, QuotaCounter]:
        """Return the tenant's ``requests_per_day`` and ``api_calls_per_month`` counters."""
        day = quota_limit(self._defaults, overrides, REQUESTS_PER_DAY)
        month = quota_limit(self._defaults, overrides, API_CALLS_PER_MONTH)
        return (
            QuotaCounter(REQUESTS_PER_DAY, tenant_id, _UNMETERED if day is None else day, "day"),
            QuotaCounter(
                API_CALLS_PER_MONTH, tenant_id, _UNMETERED if month is None else month, "month"
            ),
        )

    def _policy(self, overrides: Mapping[str, Any]) -> Policy | None:
        own = overrides.get("ratelimit")
        expression = own.get("default") if isinstance(own, Mapping) else None
        if not expression:
            return None
        settings = self._ratelimit
        return Policy(
            DEFAULT_POLICY,
            build_rules(expression, settings.algorithm, max_log_limit=settings.max_log_limit),
            fail_open=settings.fail_open,
            headers=settings.headers,
        )

    async def _overrides(self, tenant_id: str) -> Mapping[str, Any]:
        if self._database is None:
            return {}
        try:
            key = uuid.UUID(tenant_id)
        except ValueError:
            # An external issuer's tenant that is not one of ours has no overrides.
            return {}
        from bastion.identity._tables import tenants  # noqa: PLC0415 -- identity imports tenancy

        async with self._database.sessions() as session:
            value = await session.scalar(select(tenants.c.settings).where(tenants.c.id == key))
        return value if isinstance(value, Mapping) else {}

    def _remember(self, tenant_id: str, made: TenantPlan, ttl: float) -> None:
        plans = self._plans
        plans[tenant_id] = (self._clock() + ttl, made)
        plans.move_to_end(tenant_id)
        while len(plans) > _CACHE_MAX:
            plans.popitem(last=False)

    # -- usage ----------------------------------------------------------------------------

    async def usage(
        self, tenant_id: str, overrides: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """Return each request quota's limit, use, remaining units and period end.

        Raises:
            LimitsUnavailable: the quota store cannot be read.
        """
        counters = self.counters(tenant_id, overrides)
        found: dict[str, dict[str, Any]] = {}
        for usage in await self._quotas.usage(counters):
            limit = None if usage.counter.limit == _UNMETERED else usage.counter.limit
            found[usage.counter.name] = {
                "limit": limit,
                "used": usage.used,
                "remaining": None if limit is None else usage.remaining,
                "resets_at": usage.resets,
            }
        return found


async def tenant_usage(
    identity: Identity, tenant: TenantRecord, members: int
) -> dict[str, dict[str, Any]]:
    """Return a tenant's quotas with their current use, the ``members`` quota included.

    Without tenant quotas (no rate limiting), only ``members`` is reported.

    Raises:
        LimitsUnavailable: the quota store cannot be read.
    """
    found: dict[str, dict[str, Any]] = {}
    tenant_quotas = identity.tenant_quotas
    if tenant_quotas is not None:
        found.update(await tenant_quotas.usage(str(tenant.id), tenant.settings))
    limit = members_limit(identity.settings, tenant.settings)
    found[MEMBERS] = {
        "limit": limit,
        "used": members,
        "remaining": None if limit is None else max(0, limit - members),
        "resets_at": None,
    }
    return found
