"""Metric names: every Prometheus metric bastion exports is declared in this one module.

Names follow the OpenTelemetry semantic conventions where one exists
(``db_client_*``), else ``bastion_<component>_<thing>_<unit>``. Labels are
bounded by construction: a database's pool name, an SQL verb, a retry reason;
never a statement, a user or a raw path, and a tenant only in the one family an
operator turns on (``metrics.tenant_label``), bounded per process.

The public surface is :mod:`bastion.observability.metrics`, which re-exports
these objects; components import them from there.

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
    "AUDIT_BATCH_SIZE",
    "AUDIT_BUFFERED",
    "AUDIT_CHECKPOINTS",
    "AUDIT_CHECKPOINT_INVALID",
    "AUDIT_CHECKPOINT_LAG",
    "AUDIT_CHECKPOINT_REFUSALS",
    "AUDIT_CHECKPOINT_SINK_FAILURES",
    "AUDIT_DROPPED",
    "AUDIT_EVENTS",
    "AUDIT_FLUSH_DURATION",
    "AUDIT_FLUSH_FAILURES",
    "AUDIT_RECORD_WAITS",
    "AUDIT_SUBJECT_DECRYPT_FAILURES",
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
    "FLAGS_EVALUATIONS",
    "FLAGS_INVALID_ROWS",
    "FLAGS_LAST_REFRESH",
    "FLAGS_LOADED",
    "FLAGS_NOTIFIER_UP",
    "FLAGS_PROPAGATION",
    "FLAGS_REFRESH",
    "FLAGS_REGEX_TIMEOUTS",
    "FLAGS_REVISION",
    "GUARD_PROMPT_HOOK_FAILURES",
    "GUARD_PROMPT_SCREENINGS",
    "GUARD_PROMPT_SCREENING_DURATION",
    "GUARD_REJECTIONS",
    "HEALTH_CHECK_UP",
    "HTTP_ACTIVE_REQUESTS",
    "HTTP_CORS_PREFLIGHTS",
    "HTTP_CSRF_REJECTIONS",
    "HTTP_DEADLINE_EXCEEDED",
    "HTTP_DEPRECATED_REQUESTS",
    "HTTP_DEPRECATION_USAGE_DROPPED",
    "HTTP_DEPRECATION_USAGE_FLUSH_FAILURES",
    "HTTP_IDEMPOTENCY_REQUESTS",
    "HTTP_REQUEST_BODY_SIZE",
    "HTTP_REQUEST_DURATION",
    "HTTP_RESPONSE_BODY_SIZE",
    "HTTP_SUNSET_REQUESTS",
    "HTTP_TENANT_REQUEST_DURATION",
    "IDENTITY_DENY_LIST_CHECKS",
    "IDENTITY_MAIL_MESSAGES",
    "IDENTITY_OIDC_FETCHES",
    "IDENTITY_PASSWORD_HASH_DURATION",
    "IDENTITY_PASSWORD_HASH_REJECTED",
    "IDENTITY_PASSWORD_REHASHES",
    "IDENTITY_PURGED_ROWS",
    "IDENTITY_SECURITY_EVENTS",
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
    "TENANT_QUOTA_REJECTIONS",
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
    "db_client_connections_usage",
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

# --- HTTP server (OpenTelemetry semantic conventions) -------------------------------
# Labels: http_request_method (a known method or _OTHER), http_route (the route
# template, never the raw path; unmatched requests share one value),
# http_response_status_code.
_HTTP_BUCKETS: Final = (
    0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
)  # fmt: skip
_SIZE_BUCKETS: Final = (0, 100, 1_000, 10_000, 100_000, 1_000_000, 10_000_000)

HTTP_REQUEST_DURATION: Final = Histogram(
    "http_server_request_duration_seconds",
    "Duration of HTTP server requests.",
    ["http_request_method", "http_route", "http_response_status_code"],
    buckets=_HTTP_BUCKETS,
)
HTTP_ACTIVE_REQUESTS: Final = Gauge(
    "http_server_active_requests",
    "HTTP server requests in flight.",
    ["http_request_method"],
    multiprocess_mode="livesum",
)
HTTP_REQUEST_BODY_SIZE: Final = Histogram(
    "http_server_request_body_size_bytes",
    "Size of HTTP request bodies.",
    ["http_request_method", "http_route"],
    buckets=_SIZE_BUCKETS,
)
HTTP_RESPONSE_BODY_SIZE: Final = Histogram(
    "http_server_response_body_size_bytes",
    "Size of HTTP response bodies.",
    ["http_request_method", "http_route"],
    buckets=_SIZE_BUCKETS,
)
# Only when an operator turns on metrics.tenant_label: a family of its own, because
# a family's label names are fixed when it is created. No route label: tenants x
# routes x statuses x buckets would be the cardinality the limit is there to stop.
HTTP_TENANT_REQUEST_DURATION: Final = Histogram(
    "bastion_http_tenant_request_duration_seconds",
    "Duration of HTTP server requests by tenant (metrics.tenant_label; bounded per process).",
    ["tenant", "http_request_method", "http_response_status_code"],
    buckets=_HTTP_BUCKETS,
)

# --- Health ---------------------------------------------------------------------------
READY: Final = Gauge(
    "bastion_ready",
    "1 when the last readiness probe passed, 0 when it failed or shutdown began.",
    multiprocess_mode="liveall",
)
HEALTH_CHECK_UP: Final = Gauge(
    "bastion_health_check_up",
    "1 when the dependency's last readiness check passed, else 0.",
    ["check"],
    multiprocess_mode="liveall",
)

# --- Components of later issues: names fixed now, so dashboards and alerts hold -----
CACHE_REQUESTS: Final = Counter(
    "bastion_cache_requests_total",
    "Cache and store lookups by cache and result (hit or miss).",
    ["cache", "result"],
)
AUTH_ATTEMPTS: Final = Counter(
    "bastion_auth_attempts_total",
    "Authentication attempts by method (password, token, api_key, oidc, trusted) and outcome.",
    ["method", "outcome"],
)
AUTH_LOCKOUTS: Final = Counter(
    "bastion_auth_lockouts_total",
    "Accounts locked after repeated authentication failures.",
)
RATELIMIT_DECISIONS: Final = Counter(
    "bastion_ratelimit_decisions_total",
    "Rate-limit decisions by policy and decision (allowed, rejected, failed_open, failed_closed).",
    ["policy", "decision"],
)
RATELIMIT_STORE_ERRORS: Final = Counter(
    "bastion_ratelimit_store_errors_total",
    "Calls to the shared limit store that failed, by reason: timeout, connection,"
    " server (LOADING, BUSY, OOM...) or fast (not sent: the store failed moments ago).",
    ["reason"],
)
CIRCUIT_STATE: Final = Gauge(
    "bastion_circuit_state",
    "1 for a circuit's current state (closed, open, half_open), 0 for the others.",
    ["circuit", "state"],
    multiprocess_mode="liveall",
)
CIRCUIT_TRANSITIONS: Final = Counter(
    "bastion_circuit_transitions_total",
    "Circuit state changes, by circuit and the state entered.",
    ["circuit", "state"],
)
RETRIES: Final = Counter(
    "bastion_retries_total",
    "Calls to a dependency re-tried by the resilience pipeline, by dependency.",
    ["dependency"],
)
RESILIENCE_CALLS: Final = Counter(
    "bastion_resilience_calls_total",
    "Calls through a dependency's resilience pipeline, by outcome "
    "(success, failure, timeout, circuit_open, bulkhead_full).",
    ["dependency", "outcome"],
)
RESILIENCE_FALLBACKS: Final = Counter(
    "bastion_resilience_fallbacks_total",
    "Calls answered by their fallback instead of the dependency.",
    ["dependency"],
)
RETRY_BUDGET_EXHAUSTED: Final = Counter(
    "bastion_retry_budget_exhausted_total",
    "Retries not made because the dependency's retry budget was spent.",
    ["dependency"],
)
DEPENDENCY_DEGRADED: Final = Gauge(
    "bastion_dependency_degraded",
    "1 while a non-critical dependency is out and its feature runs on local behaviour.",
    ["dependency"],
    multiprocess_mode="max",
)
DEPENDENCY_OUTAGES: Final = Counter(
    "bastion_dependency_outages_total",
    "Outages of a non-critical dependency, counted once each, not per request.",
    ["dependency"],
)
HTTP_DEADLINE_EXCEEDED: Final = Counter(
    "bastion_http_request_deadline_exceeded_total",
    "Requests answered 504 REQUEST_TIMEOUT because their deadline passed, by route template.",
    ["http_route"],
)
OUTBOX_LAG: Final = Gauge(
    "bastion_outbox_lag_seconds",
    "Age of the oldest outbox message not yet published.",
    multiprocess_mode="max",
)
OUTBOX_PENDING: Final = Gauge(
    "bastion_outbox_pending_messages",
    "Outbox messages not yet published.",
    multiprocess_mode="max",
)

# --- Identity: passwords and security events (issue 7) ----------------------------
IDENTITY_PASSWORD_HASH_DURATION: Final = Histogram(
    "bastion_identity_password_hash_duration_seconds",
    "Time a password hash or verification held a hashing thread, by operation"
    " (hash, verify, dummy).",
    ["operation"],
    buckets=(0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5),
)
IDENTITY_PASSWORD_HASH_REJECTED: Final = Counter(
    "bastion_identity_password_hash_rejected_total",
    "Password hashes refused 503 because the hashing pool was busy, by reason"
    " (queue_full, timeout).",
    ["reason"],
)
IDENTITY_PASSWORD_REHASHES: Final = Counter(
    "bastion_identity_password_rehashes_total",
    "Passwords rehashed at login, by the scheme of the replaced hash (argon2id, bcrypt).",
    ["scheme"],
)
IDENTITY_SECURITY_EVENTS: Final = Counter(
    "bastion_identity_security_events_total",
    "Security events emitted, by kind and outcome.",
    ["kind", "outcome"],
)

# --- Identity: external OIDC issuers (issue 7) -------------------------------------
IDENTITY_OIDC_FETCHES: Final = Counter(
    "bastion_identity_oidc_fetches_total",
    "Fetches of an external OIDC issuer's documents, by provider, document (discovery,"
    " jwks) and outcome (ok, error).",
    ["provider", "document", "outcome"],
)

# --- Identity: e-mail (issue 7) ----------------------------------------------------
IDENTITY_MAIL_MESSAGES: Final = Counter(
    "bastion_identity_mail_messages_total",
    "E-mail messages handed to a sender, by purpose (verification, password_reset,"
    " invitation...) and outcome (sent, logged, rejected, failed).",
    ["purpose", "outcome"],
)

# --- Identity: access-token deny list (issue 7) ------------------------------------
IDENTITY_DENY_LIST_CHECKS: Final = Counter(
    "bastion_identity_deny_list_checks_total",
    "Access-token deny-list checks by result (allowed, revoked, failed_open,"
    " failed_closed: the store could not answer).",
    ["result"],
)

# --- Identity: purge of spent tokens (issue 7) ------------------------------------
IDENTITY_PURGED_ROWS: Final = Counter(
    "bastion_identity_purged_rows_total",
    "Rows deleted by the purge of spent tokens, by table (one_time_tokens,"
    " refresh_families, refresh_tokens).",
    ["table"],
)

# --- Tenancy: per-tenant quotas (issue 7) ----------------------------------------------
TENANT_QUOTA_REJECTIONS: Final = Counter(
    "bastion_tenant_quota_rejections_total",
    "Requests refused 429 QUOTA_EXCEEDED by a tenant quota, by quota (requests_per_day,"
    " api_calls_per_month, members); no tenant label: one series per tenant would not scale.",
    ["quota"],
)

# --- audit: the writer (issue 8) ---------------------------------------------------
AUDIT_EVENTS: Final = Counter(
    "bastion_audit_events_total",
    "Audit events committed to the log, by mode (sync, async).",
    ["mode"],
)
AUDIT_BUFFERED: Final = Gauge(
    "bastion_audit_buffered_events",
    "Audit events accepted (async mode) but not yet committed: what a crash would lose.",
    multiprocess_mode="livesum",
)
AUDIT_FLUSH_DURATION: Final = Histogram(
    "bastion_audit_flush_duration_seconds",
    "Time one group commit of the async writer took, retries of conflicts included.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
AUDIT_BATCH_SIZE: Final = Histogram(
    "bastion_audit_batch_size_events",
    "Events per group commit of the async writer.",
    buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000),
)
AUDIT_FLUSH_FAILURES: Final = Counter(
    "bastion_audit_flush_failures_total",
    "Group commits that failed and were retried (the batch is kept), by error type"
    " (unavailable: the database could not be reached; rejected: the batch was refused"
    " and split to isolate the offending event).",
    ["reason"],
)
AUDIT_DROPPED: Final = Counter(
    "bastion_audit_dropped_events_total",
    "Accepted audit events never committed, by reason (duplicate: its id is stored already;"
    " rejected: the database refused the event itself; shutdown: still buffered when the"
    " drain timed out).",
    ["reason"],
)
AUDIT_RECORD_WAITS: Final = Counter(
    "bastion_audit_record_waits_total",
    "record() calls that found the async buffer full and waited, by result (accepted,"
    " rejected: AuditUnavailable after audit.enqueue_timeout).",
    ["result"],
)
AUDIT_SUBJECT_DECRYPT_FAILURES: Final = Counter(
    "bastion_audit_subject_decrypt_failures_total",
    "Sealed personal fields that did not decrypt with their subject's key (tampered, or"
    " copied from another entry or column).",
)


# --- Audit: signed checkpoints (issue 8) -------------------------------------------
AUDIT_CHECKPOINTS: Final = Counter(
    "bastion_audit_checkpoints_total",
    "Signed checkpoints stored (a log head whose size had no checkpoint yet).",
)
AUDIT_CHECKPOINT_SINK_FAILURES: Final = Counter(
    "bastion_audit_checkpoint_sink_failures_total",
    "Checkpoints a sink failed to write, by sink (its class name); the checkpoint is"
    " stored all the same.",
    ["sink"],
)
AUDIT_CHECKPOINT_LAG: Final = Gauge(
    "bastion_audit_checkpoint_lag_seconds",
    "After the last scheduled run, how long the log waiting longest has grown past its"
    " latest checkpoint (0: every log signed); no log label: one series per tenant would"
    " not scale.",
    multiprocess_mode="max",
)
AUDIT_CHECKPOINT_REFUSALS: Final = Counter(
    "bastion_audit_checkpoint_refusals_total",
    "Checkpoints not signed because the log's head is not consistent with its latest"
    " signed checkpoint (history rewritten or rolled back, or leaves missing), by reason.",
    ["reason"],
)
AUDIT_CHECKPOINT_INVALID: Final = Counter(
    "bastion_audit_checkpoint_invalid_total",
    "Stored checkpoint rows skipped because their note does not verify with a trusted key"
    " or does not match its row (counted each time one is read).",
)

# --- Feature flags (issue 9) ---------------------------------------------------------
FLAGS_EVALUATIONS: Final = Counter(
    "bastion_flags_evaluations_total",
    "Flag evaluations by flag key (<unknown> for keys not in the set) and OpenFeature reason"
    " (TARGETING_MATCH, SPLIT, DEFAULT, DISABLED, ERROR). Counted in plain dicts on the hot"
    " path and added here at every poll (flags.poll_interval), so up to one interval behind.",
    ["flag", "reason"],
)
FLAGS_REVISION: Final = Gauge(
    "bastion_flags_revision",
    "Revision (last change id) of the flag set this process evaluates; across workers, the"
    " lowest: a worker that lags shows.",
    multiprocess_mode="livemin",
)
FLAGS_LOADED: Final = Gauge(
    "bastion_flags_loaded",
    "Flags in the set this process evaluates.",
    multiprocess_mode="livemax",
)
FLAGS_REFRESH: Final = Counter(
    "bastion_flags_refresh_total",
    "Checks of the flag set against the database, by trigger (start, change: a write on"
    " this instance, notify: another's notification, poll, schedule: a scheduled change"
    " fell due, admin) and outcome (ok, error: the last set is kept).",
    ["trigger", "outcome"],
)
FLAGS_LAST_REFRESH: Final = Gauge(
    "bastion_flags_last_refresh_timestamp_seconds",
    "Unix time this process last confirmed its flag set current; across workers, the oldest.",
    multiprocess_mode="livemin",
)
FLAGS_PROPAGATION: Final = Histogram(
    "bastion_flags_propagation_seconds",
    "From a change's notification being published to its flag set serving here"
    " (notification path; wall clocks of two hosts, so skew adds to it).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
)
FLAGS_NOTIFIER_UP: Final = Gauge(
    "bastion_flags_notifier_up",
    "1 while this process is subscribed to flag change notifications, 0 while it relies on"
    " polling alone (the transport is down); across workers, the lowest. Absent where no"
    " notifications are configured (no Redis, or flags.store_url=memory://).",
    ["transport"],
    multiprocess_mode="livemin",
)
FLAGS_INVALID_ROWS: Final = Gauge(
    "bastion_flags_invalid_rows",
    "Stored flags and segments skipped by the last load of the set because they no longer"
    " validate (edited by hand, or an incompatible model change; the log names the keys)."
    " Across workers, the highest.",
    multiprocess_mode="livemax",
)
FLAGS_REGEX_TIMEOUTS: Final = Counter(
    "bastion_flags_regex_timeouts_total",
    "Regular-expression constraints that hit flags.regex_timeout; that evaluation served the"
    " flag's default with reason ERROR. Added at every poll, like the evaluations.",
)

# Input guard.
GUARD_REJECTIONS: Final = Counter(
    "bastion_guard_rejections",
    "Requests the input guard refused before the app saw them, by reason.",
    ["reason"],
)

# API conventions: deprecation.
HTTP_DEPRECATED_REQUESTS: Final = Counter(
    "bastion_http_deprecated_requests_total",
    "Requests served by deprecated routes, by route template and method.",
    ["http_route", "http_request_method"],
)

HTTP_SUNSET_REQUESTS: Final = Counter(
    "bastion_http_sunset_requests_total",
    "Requests refused with 410 VERSION_SUNSET, by route template (or deprecated prefix)"
    " and method.",
    ["http_route", "http_request_method"],
)

HTTP_DEPRECATION_USAGE_FLUSH_FAILURES: Final = Counter(
    "bastion_http_deprecation_usage_flush_failures_total",
    "Flushes of deprecated-route usage to the shared store that failed (kept for the next).",
)

HTTP_DEPRECATION_USAGE_DROPPED: Final = Counter(
    "bastion_http_deprecation_usage_dropped_total",
    "Deprecated-route calls not counted per client: the in-process batch was full.",
)

# API conventions: idempotency keys.
HTTP_IDEMPOTENCY_REQUESTS: Final = Counter(
    "bastion_http_idempotency_requests_total",
    "Requests carrying an Idempotency-Key to an idempotent route, by outcome: executed "
    "(response stored), replayed, reused (422), in_progress (409), released (executed, "
    "not stored), store_error (503, or the response could not be stored).",
    ["outcome"],
)

# API conventions: CORS and CSRF.
HTTP_CORS_PREFLIGHTS: Final = Counter(
    "bastion_http_cors_preflights_total",
    "CORS preflights answered, by outcome (allowed, origin_refused, method_refused,"
    " headers_refused).",
    ["outcome"],
)

HTTP_CSRF_REJECTIONS: Final = Counter(
    "bastion_http_csrf_rejections_total",
    "Cookie-authenticated unsafe requests refused by the CSRF check, by reason"
    " (origin_missing, origin_mismatch, token_missing, token_mismatch).",
    ["reason"],
)

# Input guard: prompt-injection screening.
GUARD_PROMPT_SCREENINGS: Final = Counter(
    "bastion_guard_prompt_screenings_total",
    "Texts screened for prompt injection, by outcome (passed, refused, error).",
    ["outcome"],
)

GUARD_PROMPT_SCREENING_DURATION: Final = Histogram(
    "bastion_guard_prompt_screening_seconds",
    "Time to screen one text (or list of texts) for prompt injection.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5),
)

GUARD_PROMPT_HOOK_FAILURES: Final = Counter(
    "bastion_guard_prompt_hook_failures_total",
    "Calls to the operator's prompt-injection model that failed (error, timeout, bad_score);"
    " the built-in layers decided alone.",
    ["reason"],
)
