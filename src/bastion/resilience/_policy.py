"""A named dependency's effective policy: its class's defaults under the operator's overrides."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Final, Literal

from bastion.settings import DependencyKind, DependencyPolicy, Strategy

__all__ = ["DEFAULT_ORDER", "Policy", "default_policy", "resolve_policy"]

DEFAULT_ORDER: Final[tuple[Strategy, ...]] = (
    "fallback",
    "total_timeout",
    "retry",
    "circuit_breaker",
    "bulkhead",
    "timeout",
)
"""Outermost first, as Polly and Resilience4j compose them: a fallback sees the
final outcome; the total timeout bounds every attempt and wait; each retry passes
the breaker again (an open circuit stops retrying); the bulkhead slot is held
only while an attempt runs; the attempt timeout bounds one attempt."""


@dataclass(frozen=True, slots=True)
class Policy:
    """Every setting of one dependency's pipeline, resolved (see :class:`DependencyPolicy`).

    Durations are seconds; 0 switches a timeout, a rule or the bulkhead off.
    """

    kind: DependencyKind
    timeout: float
    total_timeout: float
    retries: int
    backoff_initial: float
    backoff_max: float
    retry_unsafe: bool
    retry_budget_ratio: float
    retry_budget_min_per_second: float
    circuit: str
    failure_rate_threshold: float
    window: Literal["count", "time"]
    window_size: int
    minimum_calls: int
    consecutive_failures: int
    open_duration: float
    half_open_probes: int
    slow_call_threshold: float
    max_concurrent: int
    max_queue: int
    queue_timeout: float
    order: tuple[Strategy, ...]
    critical: bool


_BASE: Final[dict[str, object]] = {
    "backoff_initial": 0.1,
    "backoff_max": 2.0,
    "retry_unsafe": False,
    "retry_budget_ratio": 0.2,
    "retry_budget_min_per_second": 5.0,
    "failure_rate_threshold": 0.5,
    "window": "count",
    "window_size": 20,
    "minimum_calls": 10,
    "consecutive_failures": 5,
    "open_duration": 30.0,
    "half_open_probes": 1,
    "slow_call_threshold": 0.0,
    "max_concurrent": 0,
    "max_queue": 0,
    "queue_timeout": 0.0,
    "order": DEFAULT_ORDER,
    "critical": False,
}

# The defaults by class. The database pipeline guards acquiring a
# connection only: re-running a transaction is the transaction helper's job.
# Redis on the request path (limits, circuit state, flags) gets one short try
# and falls back at once, so a hung Redis adds at most its timeout to a request.
_BY_KIND: Final[dict[DependencyKind, dict[str, object]]] = {
    "database": {"timeout": 10.0, "total_timeout": 30.0, "retries": 3},
    "redis": {"timeout": 3.0, "total_timeout": 10.0, "retries": 3},
    "redis_request": {"timeout": 0.1, "total_timeout": 0.1, "retries": 0, "circuit": "redis"},
    "broker": {"timeout": 30.0, "total_timeout": 60.0, "retries": 3},
    "http": {
        "timeout": 10.0,
        "total_timeout": 30.0,
        "retries": 3,
        "max_concurrent": 100,
        "max_queue": 100,
        "queue_timeout": 1.0,
    },
    "storage": {"timeout": 10.0, "total_timeout": 30.0, "retries": 3},
    "custom": {"timeout": 10.0, "total_timeout": 30.0, "retries": 3},
}


def default_policy(name: str, kind: DependencyKind) -> Policy:
    """Return the defaults of ``kind`` for a dependency called ``name``."""
    values: dict[str, object] = {**_BASE, "circuit": name, **_BY_KIND[kind]}
    return Policy(kind=kind, **values)  # type: ignore[arg-type]  # the tables above are typed by hand


def resolve_policy(
    name: str, kind: DependencyKind | None, override: DependencyPolicy | None
) -> Policy:
    """Return ``name``'s policy: the defaults of its kind under the fields ``override`` sets.

    The kind is the override's, else ``kind`` (what the registering code says), else ``custom``.
    """
    chosen = (override.kind if override else None) or kind or "custom"
    policy = default_policy(name, chosen)
    if override is None:
        return policy
    changes = {
        field: value
        for field, value in override.model_dump(exclude={"kind"}).items()
        if value is not None
    }
    if "order" in changes:
        changes["order"] = tuple(changes["order"])
    return dataclasses.replace(policy, **changes)
