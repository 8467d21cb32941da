"""Resilience: a pipeline per named dependency: timeouts, retries, breaker, bulkhead, fallback.

Every dependency a service calls (the database, Redis, the broker, an HTTP API)
is a named pipeline whose strategies come from its class's defaults under the
``resilience.dependencies`` settings. Circuit state is shared across instances
through Redis when it is configured. Requests carry a deadline; outbound calls
get what remains of it as their budget.

Example:
    >>> from bastion.resilience import http_client, resilient
    >>> llm = http_client("llm", base_url="http://127.0.0.1:11434")
    >>> @resilient("payments", fallback=cached_quote)
    ... async def quote(order_id: str) -> Quote: ...
"""

from bastion.resilience._breaker import CircuitBreaker, CircuitSnapshot, CircuitState
from bastion.resilience._bulkhead import Bulkhead
from bastion.resilience._classify import is_transient
from bastion.resilience._deadline import remaining_time, request_deadline
from bastion.resilience._degraded import Degradation
from bastion.resilience._errors import (
    BulkheadFullError,
    CircuitOpenError,
    DependencyError,
    DependencyTimeoutError,
    RequestTimeout,
)
from bastion.resilience._http import http_client
from bastion.resilience._pipeline import Pipeline, PipelineCall
from bastion.resilience._policy import DEFAULT_ORDER, Policy, default_policy, resolve_policy
from bastion.resilience._registry import (
    Resilience,
    current_resilience,
    pipeline,
    resilient,
    use_resilience,
)
from bastion.resilience._retry import RetryBudget

__all__ = [
    "DEFAULT_ORDER",
    "Bulkhead",
    "BulkheadFullError",
    "CircuitBreaker",
    "CircuitOpenError",
    "CircuitSnapshot",
    "CircuitState",
    "Degradation",
    "DependencyError",
    "DependencyTimeoutError",
    "Pipeline",
    "PipelineCall",
    "Policy",
    "RequestTimeout",
    "Resilience",
    "RetryBudget",
    "current_resilience",
    "default_policy",
    "http_client",
    "is_transient",
    "pipeline",
    "remaining_time",
    "request_deadline",
    "resilient",
    "resolve_policy",
    "use_resilience",
]
