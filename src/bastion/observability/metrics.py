"""Metrics: every Prometheus metric bastion exports, for components to record into.

Each name is fixed here once, so dashboards and alert rules (``deploy/``) refer to
names that components then use. A component imports the object and records::

    from bastion.observability.metrics import CACHE_REQUESTS

    CACHE_REQUESTS.labels(cache="sessions", result="hit").inc()

Label values must stay bounded: a fixed vocabulary (``hit``/``miss``), a
configured name (a cache, a circuit, a pool), never a user, a key, an id or a
raw path. The objects are prometheus_client metrics in its default registry; in
multiprocess mode they write to the worker's files, which ``/metrics`` merges.
"""

from bastion.observability._metrics import (
    AUTH_ATTEMPTS,
    AUTH_LOCKOUTS,
    CACHE_REQUESTS,
    CIRCUIT_STATE,
    CIRCUIT_TRANSITIONS,
    DB_CONNECTION_COUNT,
    DB_CONNECTION_MAX,
    DB_CONNECTION_OVERFLOW,
    DB_CONNECTION_PENDING_REQUESTS,
    DB_CONNECTION_TIMEOUTS,
    DB_CONNECTION_WAIT_TIME,
    DB_OPERATION_DURATION,
    DB_SLOW_QUERIES,
    DB_TRANSACTION_FAILURES,
    DB_TRANSACTION_RETRIES,
    DEPENDENCY_DEGRADED,
    DEPENDENCY_OUTAGES,
    HEALTH_CHECK_UP,
    HTTP_ACTIVE_REQUESTS,
    HTTP_DEADLINE_EXCEEDED,
    HTTP_REQUEST_BODY_SIZE,
    HTTP_REQUEST_DURATION,
    HTTP_RESPONSE_BODY_SIZE,
    HTTP_TENANT_REQUEST_DURATION,
    MIGRATIONS_APPLIED,
    OUTBOX_LAG,
    OUTBOX_PENDING,
    RATELIMIT_DECISIONS,
    RATELIMIT_STORE_ERRORS,
    READY,
    RESILIENCE_CALLS,
    RESILIENCE_FALLBACKS,
    RETRIES,
    RETRY_BUDGET_EXHAUSTED,
)

__all__ = [
    "AUTH_ATTEMPTS",
    "AUTH_LOCKOUTS",
    "CACHE_REQUESTS",
    "CIRCUIT_STATE",
    "CIRCUIT_TRANSITIONS",
    "DB_CONNECTION_COUNT",
    "DB_CONNECTION_MAX",
    "DB_CONNECTION_OVERFLOW",
    "DB_CONNECTION_PENDING_REQUESTS",
    "DB_CONNECTION_TIMEOUTS",
    "DB_CONNECTION_WAIT_TIME",
    "DB_OPERATION_DURATION",
    "DB_SLOW_QUERIES",
    "DB_TRANSACTION_FAILURES",
    "DB_TRANSACTION_RETRIES",
    "DEPENDENCY_DEGRADED",
    "DEPENDENCY_OUTAGES",
    "HEALTH_CHECK_UP",
    "HTTP_ACTIVE_REQUESTS",
    "HTTP_DEADLINE_EXCEEDED",
    "HTTP_REQUEST_BODY_SIZE",
    "HTTP_REQUEST_DURATION",
    "HTTP_RESPONSE_BODY_SIZE",
    "HTTP_TENANT_REQUEST_DURATION",
    "MIGRATIONS_APPLIED",
    "OUTBOX_LAG",
    "OUTBOX_PENDING",
    "RATELIMIT_DECISIONS",
    "RATELIMIT_STORE_ERRORS",
    "READY",
    "RESILIENCE_CALLS",
    "RESILIENCE_FALLBACKS",
    "RETRIES",
    "RETRY_BUDGET_EXHAUSTED",
]
