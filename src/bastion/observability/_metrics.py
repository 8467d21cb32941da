"""Metric names: every Prometheus metric bastion exports is declared in this one module.

Names follow the OpenTelemetry semantic conventions where one exists
(``db_client_*``), else ``bastion_<component>_<thing>_<unit>``. Labels are
bounded by construction: a database's pool name, an SQL verb, a retry reason;
never a statement, a user, a tenant or a raw path.

The metrics live in prometheus_client's default registry, created once at
import, so every ``Database`` in the process reports into the same families
(told apart by ``db_client_connection_pool_name``). Gauges declare how they
combine across worker processes (``multiprocess_mode``) so that a scrape of a
multi-worker instance sums them.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram

__all__ = [
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
    "MIGRATIONS_APPLIED",
]

# Sub-millisecond buckets matter for SQLite and a local PostgreSQL; the top ones
# catch the statements the slow-query log is for.
_QUERY_BUCKETS: Final = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_WAIT_BUCKETS: Final = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 30.0)

_POOL: Final = "db_client_connection_pool_name"
_SYSTEM: Final = "db_system_name"
_OPERATION: Final = "db_operation_name"

DB_OPERATION_DURATION: Final = Histogram(
    "db_client_operation_duration_seconds",
    "Duration of database statements, by SQL verb.",
    [_SYSTEM, _OPERATION],
    buckets=_QUERY_BUCKETS,
)
DB_SLOW_QUERIES: Final = Counter(
    "bastion_db_slow_queries_total",
    "Statements slower than database.slow_query_threshold, by SQL verb.",
    [_SYSTEM, _OPERATION],
)
DB_CONNECTION_COUNT: Final = Gauge(
    "db_client_connection_count",
    "Pooled connections by state: used (checked out) or idle (in the pool).",
    [_POOL, "db_client_connection_state"],
    multiprocess_mode="livesum",
)
DB_CONNECTION_MAX: Final = Gauge(
    "db_client_connection_max",
    "Most connections the pool may open (pool_size + max_overflow).",
    [_POOL],
    multiprocess_mode="livesum",
)
DB_CONNECTION_OVERFLOW: Final = Gauge(
    "bastion_db_connection_overflow",
    "Connections open beyond pool_size (negative: pool_size not yet reached).",
    [_POOL],
    multiprocess_mode="livesum",
)
DB_CONNECTION_PENDING_REQUESTS: Final = Gauge(
    "db_client_connection_pending_requests",
    "Callers waiting for a pooled connection.",
    [_POOL],
    multiprocess_mode="livesum",
)
DB_CONNECTION_WAIT_TIME: Final = Histogram(
    "db_client_connection_wait_time_seconds",
    "Time to obtain a connection from the pool.",
    [_POOL],
    buckets=_WAIT_BUCKETS,
)
DB_CONNECTION_TIMEOUTS: Final = Counter(
    "db_client_connection_timeouts_total",
    "Connection requests that gave up after database.pool_timeout.",
    [_POOL],
)
DB_TRANSACTION_RETRIES: Final = Counter(
    "bastion_db_transaction_retries_total",
    "Transaction units re-run, by reason: serialization, deadlock or busy.",
    ["reason"],
)
DB_TRANSACTION_FAILURES: Final = Counter(
    "bastion_db_transaction_failures_total",
    "Transaction units that still conflicted after their last attempt, by reason.",
    ["reason"],
)
MIGRATIONS_APPLIED: Final = Counter(
    "bastion_migrations_applied_total",
    "Revisions applied or reverted by this process, by tree and direction.",
    ["tree", "direction"],
)
