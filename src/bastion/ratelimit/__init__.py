"""Rate limiting: limits across instances in one round trip, quotas, login throttling.

``bastion.install`` puts a :class:`RateLimiter` at ``app.state.bastion.ratelimit``
and its :class:`RateLimitMiddleware` in the stack; routes get their own limits
with :data:`rate_limit`. The errors render as RFC 9457 problems::

    BastionError
    ├── RateLimited           RATE_LIMITED (429), Retry-After and the rate-limit headers
    ├── AccountLocked         ACCOUNT_LOCKED (429), Retry-After
    ├── QuotaExceeded         QUOTA_EXCEEDED (429), Retry-After until the period ends
    └── ServiceUnavailable
        └── LimitsUnavailable SERVICE_UNAVAILABLE (503): the store is down, the policy fails closed

The names are loaded on first use (PEP 562): ``bastion.settings`` validates its
default limit expressions with this package's parser while it is itself being
imported, and an eager import of the limiter from here would need the settings
module whole.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

if TYPE_CHECKING:
    from bastion.ratelimit._decorator import rate_limit
    from bastion.ratelimit._errors import (
        AccountLocked,
        LimitsUnavailable,
        QuotaExceeded,
        RateLimited,
    )
    from bastion.ratelimit._expression import Limit, parse_limits
    from bastion.ratelimit._limiter import RateLimiter
    from bastion.ratelimit._login import LockoutEvent, LoginThrottle
    from bastion.ratelimit._memory import MemoryStore
    from bastion.ratelimit._middleware import RateLimitMiddleware
    from bastion.ratelimit._policy import Policy
    from bastion.ratelimit._quota import QuotaCounter, Quotas, QuotaVerdict
    from bastion.ratelimit._redis import RedisStore
    from bastion.ratelimit._store import LimitStore, Rule, StoreUnavailable, Verdict

__all__ = [
    "AccountLocked",
    "Limit",
    "LimitStore",
    "LimitsUnavailable",
    "LockoutEvent",
    "LoginThrottle",
    "MemoryStore",
    "Policy",
    "QuotaCounter",
    "QuotaExceeded",
    "QuotaVerdict",
    "Quotas",
    "RateLimitMiddleware",
    "RateLimited",
    "RateLimiter",
    "RedisStore",
    "Rule",
    "StoreUnavailable",
    "Verdict",
    "parse_limits",
    "rate_limit",
]

_MODULES: Final = {
    "AccountLocked": "_errors",
    "Limit": "_expression",
    "LimitStore": "_store",
    "LimitsUnavailable": "_errors",
    "LockoutEvent": "_login",
    "LoginThrottle": "_login",
    "MemoryStore": "_memory",
    "Policy": "_policy",
    "QuotaCounter": "_quota",
    "QuotaExceeded": "_errors",
    "QuotaVerdict": "_quota",
    "Quotas": "_quota",
    "RateLimitMiddleware": "_middleware",
    "RateLimited": "_errors",
    "RateLimiter": "_limiter",
    "RedisStore": "_redis",
    "Rule": "_store",
    "StoreUnavailable": "_store",
    "Verdict": "_store",
    "parse_limits": "_expression",
    "rate_limit": "_decorator",
}


def __getattr__(name: str) -> Any:
    module = _MODULES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
