"""Grafana dashboards: the source from which ``deploy/grafana/*.json`` is written.

Four hand-written JSON files of a few thousand lines each drift apart (grid
positions, datasource references, selectors); one small builder keeps every
panel on the same ``${datasource}`` and the same ``job``/``instance`` selector.
The JSON files are committed so an operator imports them without Python, and
``tests/deploy`` fails when they and this module disagree.

Run ``python deploy/grafana/build.py`` after editing a panel.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
SCHEMA_VERSION = 39
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Every query is scoped to the dashboard's job and instance variables.
SEL = 'job=~"$job", instance=~"$instance"'
RATE = "$__rate_interval"
WIDTH = 24


@dataclass(frozen=True, slots=True)
class Query:
    """One PromQL target of a panel."""

    expr: str
    legend: str = ""


@dataclass(frozen=True, slots=True)
class Panel:
    """A time series or stat panel, with its unit and optional value mappings."""

    title: str
    queries: tuple[Query, ...]
    unit: str = "short"
    kind: str = "timeseries"
    width: int = 12
    height: int = 8
    description: str = ""
    mappings: tuple[dict[str, Any], ...] = ()
    thresholds: tuple[tuple[float | None, str], ...] = ()
    stack: bool = False


@dataclass(frozen=True, slots=True)
class Row:
    """A collapsible row heading the panels below it."""

    title: str
    panels: tuple[Panel, ...] = field(default_factory=tuple)


def quantiles(metric: str, by: str, selector: str = SEL) -> tuple[Query, ...]:
    """p50, p95 and p99 of a histogram, one series per value of ``by``."""
    return tuple(
        Query(
            f"histogram_quantile({q}, sum by ({by}, le) "
            f"(rate({metric}_bucket{{{selector}}}[{RATE}])))",
            f"p{round(q * 100)} {{{{{by}}}}}",
        )
        for q in (0.5, 0.95, 0.99)
    )


def quantile(q: float, metric: str, by: str, selector: str = SEL) -> Query:
    """One quantile of a histogram, one series per value of ``by``."""
    return Query(
        f"histogram_quantile({q}, sum by ({by}, le) (rate({metric}_bucket{{{selector}}}[{RATE}])))",
        f"{{{{{by}}}}}",
    )


UP_DOWN = (
    {
        "type": "value",
        "options": {
            "0": {"text": "DOWN", "color": "red", "index": 0},
            "1": {"text": "UP", "color": "green", "index": 1},
        },
    },
)
READY_MAPPING = (
    {
        "type": "value",
        "options": {
            "0": {"text": "NOT READY", "color": "red", "index": 0},
            "1": {"text": "READY", "color": "green", "index": 1},
        },
    },
)
CIRCUIT_MAPPING = (
    {
        "type": "value",
        "options": {
            "0": {"text": "closed", "color": "green", "index": 0},
            "1": {"text": "half_open", "color": "orange", "index": 1},
            "2": {"text": "open", "color": "red", "index": 2},
        },
    },
)
RED_AT_ONE = ((None, "green"), (1, "red"))

HTTP_COUNT = "http_server_request_duration_seconds_count"

SERVICE = (
    Row(
        "Traffic by route (RED)",
        (
            Panel(
                "Request rate by route",
                (
                    Query(
                        f"sum by (http_route) (rate({HTTP_COUNT}{{{SEL}}}[{RATE}]))",
                        "{{http_route}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Error rate (5xx share)",
                (
                    Query(
                        f'sum(rate({HTTP_COUNT}{{{SEL}, http_response_status_code=~"5.."}}'
                        f"[{RATE}])) / sum(rate({HTTP_COUNT}{{{SEL}}}[{RATE}]))",
                        "all routes",
                    ),
                    Query(
                        "sum by (http_route) "
                        f'(rate({HTTP_COUNT}{{{SEL}, http_response_status_code=~"5.."}}[{RATE}]))'
                        f" / sum by (http_route) (rate({HTTP_COUNT}{{{SEL}}}[{RATE}]))",
                        "{{http_route}}",
                    ),
                ),
                unit="percentunit",
                description="Share of responses with a 5xx status. Alert: BastionHighErrorRate.",
            ),
            Panel(
                "Responses by status code",
                (
                    Query(
                        f"sum by (http_response_status_code) (rate({HTTP_COUNT}{{{SEL}}}[{RATE}]))",
                        "{{http_response_status_code}}",
                    ),
                ),
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Latency p99 by route",
                (quantile(0.99, "http_server_request_duration_seconds", "http_route"),),
                unit="s",
                description="Alert: BastionHighLatency (p99 over all routes above the SLO).",
            ),
            Panel(
                "Latency p95 by route",
                (quantile(0.95, "http_server_request_duration_seconds", "http_route"),),
                unit="s",
            ),
            Panel(
                "Latency p50 by route",
                (quantile(0.5, "http_server_request_duration_seconds", "http_route"),),
                unit="s",
            ),
        ),
    ),
    Row(
        "Saturation",
        (
            Panel(
                "Requests in flight",
                (
                    Query(
                        f"sum by (instance) (http_server_active_requests{{{SEL}}})",
                        "{{instance}}",
                    ),
                ),
            ),
            Panel(
                "Database pool utilisation",
                (
                    Query(
                        "sum by (instance, db_client_connection_pool_name) "
                        f'(db_client_connections_usage{{{SEL}, db_client_connection_state="used"}})'
                        " / sum by (instance, db_client_connection_pool_name) "
                        f"(db_client_connection_max{{{SEL}}})",
                        "{{instance}} {{db_client_connection_pool_name}}",
                    ),
                ),
                unit="percentunit",
                description="Used connections over the pool's maximum. See the Database dashboard.",
            ),
            Panel(
                "Request body size p95 by route",
                (quantile(0.95, "http_server_request_body_size_bytes", "http_route"),),
                unit="bytes",
            ),
            Panel(
                "Response body size p95 by route",
                (quantile(0.95, "http_server_response_body_size_bytes", "http_route"),),
                unit="bytes",
            ),
        ),
    ),
    Row(
        "Health",
        (
            Panel(
                "Readiness",
                (Query(f"min by (instance) (bastion_ready{{{SEL}}})", "{{instance}}"),),
                kind="stat",
                width=8,
                mappings=READY_MAPPING,
                description="0 while a critical check fails or during shutdown. "
                "Alert: BastionNotReady.",
            ),
            Panel(
                "Dependency checks",
                (
                    Query(
                        f"min by (instance, check) (bastion_health_check_up{{{SEL}}})",
                        "{{instance}} {{check}}",
                    ),
                ),
                kind="stat",
                width=8,
                mappings=UP_DOWN,
                description="Last readiness check of each dependency. Alert: BastionDatabaseDown.",
            ),
            Panel(
                "Scrape targets up",
                (Query(f"up{{{SEL}}}", "{{instance}}"),),
                kind="stat",
                width=8,
                mappings=UP_DOWN,
                description="Prometheus could scrape /metrics. Alert: BastionTargetDown.",
            ),
        ),
    ),
)

POOL = "db_client_connection_pool_name"

TENANT = "bastion_http_tenant_request_duration_seconds"
TENANTS = Row(
    "Tenants (only with metrics.tenant_label on)",
    (
        Panel(
            "Request rate by tenant (top 10)",
            (
                Query(
                    f"topk(10, sum by (tenant) (rate({TENANT}_count{{{SEL}}}[{RATE}])))",
                    "{{tenant}}",
                ),
            ),
            unit="reqps",
            description="Empty unless metrics.tenant_label is on; tenants past "
            "metrics.tenant_label_limit per process are counted as `other`.",
        ),
        Panel(
            "Latency p99 by tenant",
            (quantile(0.99, TENANT, "tenant"),),
            unit="s",
        ),
    ),
)
SERVICE = (*SERVICE, TENANTS)

FLAGS = Row(
    "Feature flags",
    (
        Panel(
            "Evaluations by reason",
            (
                Query(
                    f"sum by (reason) (rate(bastion_flags_evaluations_total{{{SEL}}}[{RATE}]))",
                    "{{reason}}",
                ),
            ),
            unit="ops",
            stack=True,
            description="Counted in process and added to the counter at every poll "
            "(flags.poll_interval), so up to one interval behind. ERROR: a key not in the set, "
            "a malformed flag or context. Alert: BastionFlagsEvaluationErrors.",
        ),
        Panel(
            "Evaluations by flag (top 10)",
            (
                Query(
                    "topk(10, sum by (flag) "
                    f"(rate(bastion_flags_evaluations_total{{{SEL}}}[{RATE}])))",
                    "{{flag}}",
                ),
            ),
            unit="ops",
            description="`<unknown>`: keys asked for that are not in the set.",
        ),
        Panel(
            "Set checks by trigger and outcome",
            (
                Query(
                    "sum by (trigger, outcome) "
                    f"(rate(bastion_flags_refresh_total{{{SEL}}}[{RATE}]))",
                    "{{trigger}} {{outcome}}",
                ),
            ),
            unit="ops",
            description="poll: every flags.poll_interval; notify: another instance's change; "
            "change: a write here; error: the database did not answer (the last set serves).",
        ),
        Panel(
            "Seconds since the set was confirmed current (stalest instance)",
            (
                Query(
                    "time() - min by (instance) "
                    f"(bastion_flags_last_refresh_timestamp_seconds{{{SEL}}} > 0)",
                    "{{instance}}",
                ),
            ),
            unit="s",
            description="Stays under flags.poll_interval while the database answers. "
            "Alert: BastionFlagsStale.",
        ),
        Panel(
            "Revision served and flags in the set",
            (
                Query(f"min by (instance) (bastion_flags_revision{{{SEL}}})", "{{instance}}"),
                Query(f"max(bastion_flags_loaded{{{SEL}}})", "flags"),
            ),
            description="Every instance serves the same revision within a second of a change; "
            "one lagging behind is missing notifications and polls.",
        ),
        Panel(
            "Propagation (publish to served, notification path)",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(bastion_flags_propagation_seconds_bucket{{{SEL}}}[{RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
            description="Measured on the receiving instance against the publisher's clock.",
        ),
        Panel(
            "Regex timeouts and invalid stored flags",
            (
                Query(
                    f"sum(rate(bastion_flags_regex_timeouts_total{{{SEL}}}[{RATE}]))",
                    "regex timeouts/s",
                ),
                Query(f"max(bastion_flags_invalid_rows{{{SEL}}})", "invalid rows"),
            ),
            description="Regex timeouts: a REGEX constraint ran past flags.regex_timeout and "
            "its evaluation served the default (ERROR). Invalid rows: stored flags or segments "
            "skipped at the last load because they no longer validate; the log names them.",
        ),
        Panel(
            "Change notifications subscribed",
            (
                Query(
                    f"min by (instance) (bastion_flags_notifier_up{{{SEL}}})",
                    "{{instance}}",
                ),
            ),
            kind="state-timeline",
            width=24,
            height=5,
            mappings=(
                {
                    "type": "value",
                    "options": {
                        "0": {"text": "POLLING ONLY", "color": "red", "index": 0},
                        "1": {"text": "SUBSCRIBED", "color": "green", "index": 1},
                    },
                },
            ),
            description="0: Redis is down for this instance; changes reach it by polling. "
            "Alert: BastionFlagsNotifierDown.",
        ),
    ),
)
SERVICE = (*SERVICE, FLAGS)

GUARD = Row(
    "Input guard",
    (
        Panel(
            "Requests refused by the guard, by reason",
            (
                Query(
                    f"sum by (reason) (rate(bastion_guard_rejections_total{{{SEL}}}[{RATE}]))",
                    "{{reason}}",
                ),
            ),
            unit="reqps",
            stack=True,
            description="Refused before the app ran: 413 body_too_large, 415 media_type, "
            "431 header_size/header_count, 414 query_size, 422 for the rest. A rise after a "
            "deploy is usually a client or a route class whose limits are too tight.",
        ),
        Panel(
            "Prompt-injection screenings by outcome",
            (
                Query(
                    "sum by (outcome) "
                    f"(rate(bastion_guard_prompt_screenings_total{{{SEL}}}[{RATE}]))",
                    "{{outcome}}",
                ),
            ),
            unit="ops",
            stack=True,
            description="refused: 422 PROMPT_INJECTION_DETECTED. error: the detector raised "
            "(a 500, never a silent pass).",
        ),
        Panel(
            "Prompt-injection screening time",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(bastion_guard_prompt_screening_seconds_bucket{{{SEL}}}[{RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.95, 0.99)
            ),
            unit="s",
            description="One screening of a text or a list of texts; new words cost more "
            "than words in the per-word cache.",
        ),
        Panel(
            "Operator model failures by reason",
            (
                Query(
                    "sum by (reason) "
                    f"(rate(bastion_guard_prompt_hook_failures_total{{{SEL}}}[{RATE}]))",
                    "{{reason}}",
                ),
            ),
            unit="ops",
            description="The hook set with use_model() failed (error, timeout, bad_score); "
            "the built-in layers decided alone.",
        ),
    ),
)

HTTP_CONVENTIONS = Row(
    "API conventions",
    (
        Panel(
            "Idempotency-Key requests by outcome",
            (
                Query(
                    "sum by (outcome) "
                    f"(rate(bastion_http_idempotency_requests_total{{{SEL}}}[{RATE}]))",
                    "{{outcome}}",
                ),
            ),
            unit="reqps",
            stack=True,
            description="store_error: 503 because the key store failed (fail closed), or a "
            "response that could not be stored. reused: 422 IDEMPOTENCY_KEY_REUSED. "
            "in_progress: 409 while another request holds the key.",
        ),
        Panel(
            "CSRF rejections by reason",
            (
                Query(
                    f"sum by (reason) (rate(bastion_http_csrf_rejections_total{{{SEL}}}[{RATE}]))",
                    "{{reason}}",
                ),
            ),
            unit="reqps",
            description="origin_mismatch: forgery attempts, or a front end on an origin "
            "missing from http.cors.allow_origins. token_missing after a deploy: a front end "
            "that stopped sending X-CSRF-Token.",
        ),
        Panel(
            "CORS preflights by outcome",
            (
                Query(
                    f"sum by (outcome) (rate(bastion_http_cors_preflights_total{{{SEL}}}[{RATE}]))",
                    "{{outcome}}",
                ),
            ),
            unit="reqps",
            stack=True,
        ),
        Panel(
            "Deprecated routes still called",
            (
                Query(
                    "sum by (http_route, http_request_method) "
                    f"(rate(bastion_http_deprecated_requests_total{{{SEL}}}[{RATE}]))",
                    "{{http_request_method}} {{http_route}}",
                ),
            ),
            unit="reqps",
            description="Who calls them: GET /admin/deprecations?days=7.",
        ),
        Panel(
            "Sunset routes called (410)",
            (
                Query(
                    "sum by (http_route, http_request_method) "
                    f"(rate(bastion_http_sunset_requests_total{{{SEL}}}[{RATE}]))",
                    "{{http_request_method}} {{http_route}}",
                ),
            ),
            unit="reqps",
            description="Clients still calling a retired version or route; http_route is the "
            "deprecated prefix for paths no route matches any more.",
        ),
        Panel(
            "Deprecation usage not recorded",
            (
                Query(
                    "sum(rate(bastion_http_deprecation_usage_flush_failures_total"
                    f"{{{SEL}}}[{RATE}]))",
                    "flush failures",
                ),
                Query(
                    f"sum(rate(bastion_http_deprecation_usage_dropped_total{{{SEL}}}[{RATE}]))",
                    "calls dropped",
                ),
            ),
            unit="ops",
            description="Flush failures: the shared store refused a batch (kept for the next). "
            "Dropped: calls not counted per client because the in-process batch was full.",
        ),
    ),
)
SERVICE = (*SERVICE, GUARD, HTTP_CONVENTIONS)

DATABASE = (
    Row(
        "Queries",
        (
            Panel(
                "Statements per second by operation",
                (
                    Query(
                        "sum by (db_operation_name) "
                        f"(rate(db_client_operation_duration_seconds_count{{{SEL}}}[{RATE}]))",
                        "{{db_operation_name}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Query latency p99 by operation",
                (quantile(0.99, "db_client_operation_duration_seconds", "db_operation_name"),),
                unit="s",
            ),
            Panel(
                "Query latency p95 by operation",
                (quantile(0.95, "db_client_operation_duration_seconds", "db_operation_name"),),
                unit="s",
            ),
            Panel(
                "Slow queries by operation",
                (
                    Query(
                        "sum by (db_operation_name) "
                        f"(rate(bastion_db_slow_queries_total{{{SEL}}}[{RATE}]))",
                        "{{db_operation_name}}",
                    ),
                ),
                unit="ops",
                description="Statements slower than database.slow_query_threshold; "
                "each is logged as `slow query` (bastion.data) with its statement template.",
            ),
        ),
    ),
    Row(
        "Connection pool",
        (
            Panel(
                "Connections: used, idle, max",
                (
                    Query(
                        f"sum by ({POOL}, db_client_connection_state) "
                        f"(db_client_connections_usage{{{SEL}}})",
                        "{{db_client_connection_pool_name}} {{db_client_connection_state}}",
                    ),
                    Query(
                        f"sum by ({POOL}) (db_client_connection_max{{{SEL}}})",
                        "{{db_client_connection_pool_name}} max",
                    ),
                ),
            ),
            Panel(
                "Pool utilisation (used / max)",
                (
                    Query(
                        f"sum by (instance, {POOL}) "
                        f'(db_client_connections_usage{{{SEL}, db_client_connection_state="used"}})'
                        f" / sum by (instance, {POOL}) (db_client_connection_max{{{SEL}}})",
                        "{{instance}} {{db_client_connection_pool_name}}",
                    ),
                ),
                unit="percentunit",
                description="Alert: BastionDatabasePoolNearExhaustion above 90%.",
            ),
            Panel(
                "Callers waiting for a connection",
                (
                    Query(
                        f"sum by (instance, {POOL}) "
                        f"(db_client_connection_pending_requests{{{SEL}}})",
                        "{{instance}} {{db_client_connection_pool_name}}",
                    ),
                ),
            ),
            Panel(
                "Connection wait time",
                quantiles("db_client_connection_wait_time_seconds", POOL),
                unit="s",
                description="Waits over database.pool_wait_warning log `database pool wait`.",
            ),
            Panel(
                "Connection timeouts",
                (
                    Query(
                        f"sum by ({POOL}) "
                        f"(rate(db_client_connection_timeouts_total{{{SEL}}}[{RATE}]))",
                        "{{db_client_connection_pool_name}}",
                    ),
                ),
                unit="ops",
                description="Callers that gave up after database.pool_timeout (HTTP 503); "
                "logged as `database pool exhausted`.",
            ),
            Panel(
                "Overflow connections",
                (
                    Query(
                        f"sum by ({POOL}) (bastion_db_connection_overflow{{{SEL}}})",
                        "{{db_client_connection_pool_name}}",
                    ),
                ),
                description="Connections beyond pool_size; negative until pool_size is reached.",
            ),
        ),
    ),
    Row(
        "Transactions and migrations",
        (
            Panel(
                "Transaction retries by reason",
                (
                    Query(
                        "sum by (reason) "
                        f"(rate(bastion_db_transaction_retries_total{{{SEL}}}[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
                unit="ops",
                description="Logged as `transaction retry` (bastion.data).",
            ),
            Panel(
                "Transactions failed after their last retry",
                (
                    Query(
                        "sum by (reason) "
                        f"(rate(bastion_db_transaction_failures_total{{{SEL}}}[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
                unit="ops",
                description="Logged as `transaction conflict` (bastion.data).",
            ),
            Panel(
                "Migrations applied in range",
                (
                    Query(
                        "sum by (tree, direction) "
                        f"(increase(bastion_migrations_applied_total{{{SEL}}}[$__range]))",
                        "{{tree}} {{direction}}",
                    ),
                ),
                kind="stat",
            ),
            Panel(
                "Database check",
                (
                    Query(
                        f'min by (instance) (bastion_health_check_up{{{SEL}, check="database"}})',
                        "{{instance}}",
                    ),
                ),
                kind="stat",
                mappings=UP_DOWN,
                description="Alert: BastionDatabaseDown.",
            ),
        ),
    ),
)

AUTH = (
    Row(
        "Authentication",
        (
            Panel(
                "Attempts by outcome",
                (
                    Query(
                        f"sum by (outcome) (rate(bastion_auth_attempts_total{{{SEL}}}[{RATE}]))",
                        "{{outcome}}",
                    ),
                ),
                unit="reqps",
                stack=True,
            ),
            Panel(
                "Failures by method",
                (
                    Query(
                        "sum by (method) "
                        f'(rate(bastion_auth_attempts_total{{{SEL}, outcome!="success"}}[{RATE}]))',
                        "{{method}}",
                    ),
                ),
                unit="reqps",
                description="Alert: BastionAuthFailureSpike.",
            ),
            Panel(
                "Failure share",
                (
                    Query(
                        f'sum(rate(bastion_auth_attempts_total{{{SEL}, outcome!="success"}}'
                        f"[{RATE}])) / sum(rate(bastion_auth_attempts_total{{{SEL}}}[{RATE}]))",
                        "failed / all",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Lockouts",
                (
                    Query(
                        f"sum(increase(bastion_auth_lockouts_total{{{SEL}}}[{RATE}]))",
                        "accounts locked",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Identity internals",
        (
            Panel(
                "Password hash p99 by operation",
                (
                    Query(
                        "histogram_quantile(0.99, sum by (le, operation) (rate("
                        f"bastion_identity_password_hash_duration_seconds_bucket{{{SEL}}}"
                        f"[{RATE}])))",
                        "{{operation}}",
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Password hashing refused (pool full) and rehashes",
                (
                    Query(
                        "sum by (reason) (rate("
                        f"bastion_identity_password_hash_rejected_total{{{SEL}}}[{RATE}]))",
                        "refused: {{reason}}",
                    ),
                    Query(
                        "sum by (scheme) (rate("
                        f"bastion_identity_password_rehashes_total{{{SEL}}}[{RATE}]))",
                        "rehashed from {{scheme}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Security events by kind",
                (
                    Query(
                        "sum by (kind, outcome) (rate("
                        f"bastion_identity_security_events_total{{{SEL}}}[{RATE}]))",
                        "{{kind}} {{outcome}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Token deny-list checks by result",
                (
                    Query(
                        "sum by (result) (rate("
                        f"bastion_identity_deny_list_checks_total{{{SEL}}}[{RATE}]))",
                        "{{result}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Spent tokens purged by table",
                (
                    Query(
                        "sum by (table) (increase("
                        f"bastion_identity_purged_rows_total{{{SEL}}}[{RATE}]))",
                        "{{table}}",
                    ),
                ),
            ),
            Panel(
                "OIDC document fetches by outcome",
                (
                    Query(
                        "sum by (provider, document, outcome) (increase("
                        f"bastion_identity_oidc_fetches_total{{{SEL}}}[{RATE}]))",
                        "{{provider}} {{document}} {{outcome}}",
                    ),
                ),
            ),
            Panel(
                "Mail by purpose and outcome",
                (
                    Query(
                        "sum by (purpose, outcome) (increase("
                        f"bastion_identity_mail_messages_total{{{SEL}}}[{RATE}]))",
                        "{{purpose}} {{outcome}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Rate limiting",
        (
            Panel(
                "Rejections by policy",
                (
                    Query(
                        "sum by (policy) "
                        f'(rate(bastion_ratelimit_decisions_total{{{SEL}, decision="rejected"}}'
                        f"[{RATE}]))",
                        "{{policy}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Rejected share by policy",
                (
                    Query(
                        "sum by (policy) "
                        f'(rate(bastion_ratelimit_decisions_total{{{SEL}, decision="rejected"}}'
                        f"[{RATE}])) / sum by (policy) "
                        f"(rate(bastion_ratelimit_decisions_total{{{SEL}}}[{RATE}]))",
                        "{{policy}}",
                    ),
                ),
                unit="percentunit",
            ),
            Panel(
                "Tenant quota rejections by quota",
                (
                    Query(
                        "sum by (quota) "
                        f"(rate(bastion_tenant_quota_rejections_total{{{SEL}}}[{RATE}]))",
                        "{{quota}}",
                    ),
                ),
                unit="reqps",
            ),
            Panel(
                "Limit store errors by reason",
                (
                    Query(
                        "sum by (reason) "
                        f"(rate(bastion_ratelimit_store_errors_total{{{SEL}}}[{RATE}]))",
                        "{{reason}}",
                    ),
                ),
                unit="ops",
            ),
        ),
    ),
)

AUDIT = Row(
    "Audit trail",
    (
        Panel(
            "Events committed by mode",
            (
                Query(
                    f"sum by (mode) (rate(bastion_audit_events_total{{{SEL}}}[{RATE}]))",
                    "{{mode}}",
                ),
            ),
            unit="ops",
            stack=True,
        ),
        Panel(
            "Buffered events (accepted, not committed)",
            (Query(f"sum(bastion_audit_buffered_events{{{SEL}}})", "buffered"),),
            description="What a crash would lose in async mode; at most audit.buffer_size per "
            "process. Alert: BastionAuditBufferFull.",
        ),
        Panel(
            "Group commit duration",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(bastion_audit_flush_duration_seconds_bucket{{{SEL}}}[{RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
            unit="s",
        ),
        Panel(
            "Events per group commit",
            tuple(
                Query(
                    f"histogram_quantile({q}, sum by (le) "
                    f"(rate(bastion_audit_batch_size_events_bucket{{{SEL}}}[{RATE}])))",
                    f"p{round(q * 100)}",
                )
                for q in (0.5, 0.99)
            ),
        ),
        Panel(
            "Writer failures, drops and full-buffer waits",
            (
                Query(
                    f"sum by (reason) (rate(bastion_audit_flush_failures_total{{{SEL}}}[{RATE}]))",
                    "commit failed: {{reason}}",
                ),
                Query(
                    f"sum by (reason) (rate(bastion_audit_dropped_events_total{{{SEL}}}[{RATE}]))",
                    "dropped: {{reason}}",
                ),
                Query(
                    f"sum by (result) (rate(bastion_audit_record_waits_total{{{SEL}}}[{RATE}]))",
                    "buffer full: {{result}}",
                ),
            ),
            unit="ops",
            description="Alerts: BastionAuditWriterFailing, BastionAuditBufferFull.",
        ),
        Panel(
            "Sealed fields that did not decrypt",
            (
                Query(
                    f"sum(rate(bastion_audit_subject_decrypt_failures_total{{{SEL}}}[{RATE}]))",
                    "decrypt failures",
                ),
            ),
            unit="ops",
            description="A ciphertext edited, or copied from another entry or column.",
        ),
        Panel(
            "Checkpoints signed and sink failures",
            (
                Query(
                    f"sum(rate(bastion_audit_checkpoints_total{{{SEL}}}[{RATE}]))",
                    "checkpoints",
                ),
                Query(
                    "sum by (sink) "
                    f"(rate(bastion_audit_checkpoint_sink_failures_total{{{SEL}}}[{RATE}]))",
                    "sink failed: {{sink}}",
                ),
            ),
            unit="ops",
            description="Alert: BastionAuditCheckpointSinkFailing.",
        ),
        Panel(
            "Checkpoints refused, and stored rows that do not verify",
            (
                Query(
                    "sum by (reason) "
                    f"(rate(bastion_audit_checkpoint_refusals_total{{{SEL}}}[{RATE}]))",
                    "refused: {{reason}}",
                ),
                Query(
                    f"sum(rate(bastion_audit_checkpoint_invalid_total{{{SEL}}}[{RATE}]))",
                    "invalid rows skipped",
                ),
            ),
            unit="ops",
            description="Any value is a sign of tampering: a head that does not extend the last "
            "signed checkpoint, or a checkpoint row no trusted key signed. Alerts: "
            "BastionAuditCheckpointRefused, BastionAuditCheckpointInvalid.",
        ),
        Panel(
            "Checkpoint lag (longest unsigned growth)",
            (Query(f"max(bastion_audit_checkpoint_lag_seconds{{{SEL}}})", "lag"),),
            unit="s",
            description="0: every log's head is signed. Alert: BastionAuditCheckpointStale.",
        ),
    ),
)
AUTH = (*AUTH, AUDIT)

DEPENDENCIES = (
    Row(
        "Circuit breakers",
        (
            Panel(
                "Circuit state",
                (
                    Query(
                        "2 * max by (circuit) "
                        f'(bastion_circuit_state{{{SEL}, state="open"}})'
                        " + max by (circuit) "
                        f'(bastion_circuit_state{{{SEL}, state="half_open"}})',
                        "{{circuit}}",
                    ),
                ),
                kind="state-timeline",
                width=24,
                mappings=CIRCUIT_MAPPING,
                description="Worst state over the selected instances. Alert: BastionCircuitOpen.",
            ),
            Panel(
                "Open circuits",
                (
                    Query(
                        "count(max by (circuit) "
                        f'(bastion_circuit_state{{{SEL}, state="open"}}) == 1) or vector(0)',
                        "open",
                    ),
                ),
                kind="stat",
                thresholds=RED_AT_ONE,
            ),
            Panel(
                "Transitions by state entered",
                (
                    Query(
                        "sum by (circuit, state) "
                        f"(increase(bastion_circuit_transitions_total{{{SEL}}}[{RATE}]))",
                        "{{circuit}} → {{state}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Retries and health",
        (
            Panel(
                "Retries by dependency",
                (
                    Query(
                        f"sum by (dependency) (rate(bastion_retries_total{{{SEL}}}[{RATE}]))",
                        "{{dependency}}",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Dependency checks",
                (
                    Query(
                        f"min by (check) (bastion_health_check_up{{{SEL}}})",
                        "{{check}}",
                    ),
                ),
                kind="state-timeline",
                mappings=UP_DOWN,
                description="`dependency unreachable` (bastion.request) logs each request "
                "that failed on one.",
            ),
        ),
    ),
    Row(
        "Resilience pipelines",
        (
            Panel(
                "Calls by dependency and outcome",
                (
                    Query(
                        "sum by (dependency, outcome) "
                        f"(rate(bastion_resilience_calls_total{{{SEL}}}[{RATE}]))",
                        "{{dependency}} {{outcome}}",
                    ),
                ),
                unit="ops",
                description="success, failure (after retries), timeout, circuit_open and "
                "bulkhead_full (rejected without a call).",
            ),
            Panel(
                "Fallbacks and spent retry budgets",
                (
                    Query(
                        "sum by (dependency) "
                        f"(rate(bastion_resilience_fallbacks_total{{{SEL}}}[{RATE}]))",
                        "{{dependency}} fallback",
                    ),
                    Query(
                        "sum by (dependency) "
                        f"(rate(bastion_retry_budget_exhausted_total{{{SEL}}}[{RATE}]))",
                        "{{dependency}} retry not made (budget)",
                    ),
                ),
                unit="ops",
            ),
            Panel(
                "Degraded dependencies",
                (
                    Query(
                        f"max by (dependency) (bastion_dependency_degraded{{{SEL}}})",
                        "{{dependency}}",
                    ),
                    Query(
                        "sum by (dependency) "
                        f"(increase(bastion_dependency_outages_total{{{SEL}}}[{RATE}]))",
                        "{{dependency}} outages",
                    ),
                ),
                description="1 while a non-critical dependency (Redis, say) is out and its "
                "feature runs on local state; outages are counted once each.",
            ),
            Panel(
                "Requests past their deadline (504)",
                (
                    Query(
                        "sum by (http_route) "
                        f"(rate(bastion_http_request_deadline_exceeded_total{{{SEL}}}[{RATE}]))",
                        "{{http_route}}",
                    ),
                ),
                unit="ops",
            ),
        ),
    ),
    Row(
        "Outbox",
        (
            Panel(
                "Outbox lag (oldest unpublished message)",
                (
                    Query(
                        f"max by (instance) (bastion_outbox_lag_seconds{{{SEL}}})", "{{instance}}"
                    ),
                ),
                unit="s",
            ),
            Panel(
                "Outbox messages pending",
                (
                    Query(
                        f"max by (instance) (bastion_outbox_pending_messages{{{SEL}}})",
                        "{{instance}}",
                    ),
                ),
            ),
        ),
    ),
    Row(
        "Caches and stores",
        (
            Panel(
                "Hit ratio by cache",
                (
                    Query(
                        "(sum by (cache) "
                        f'(rate(bastion_cache_requests_total{{{SEL}, result="hit"}}[{RATE}]))'
                        " or 0 * sum by (cache) "
                        f"(rate(bastion_cache_requests_total{{{SEL}}}[{RATE}])))"
                        " / sum by (cache) "
                        f"(rate(bastion_cache_requests_total{{{SEL}}}[{RATE}]))",
                        "{{cache}}",
                    ),
                ),
                unit="percentunit",
                description="Alert: BastionCacheHitRateLow.",
            ),
            Panel(
                "Lookups by cache and result",
                (
                    Query(
                        "sum by (cache, result) "
                        f"(rate(bastion_cache_requests_total{{{SEL}}}[{RATE}]))",
                        "{{cache}} {{result}}",
                    ),
                ),
                unit="ops",
            ),
        ),
    ),
)

DASHBOARDS: dict[str, tuple[str, str, tuple[Row, ...]]] = {
    "service-overview": ("bastion-service", "Bastion / Service overview", SERVICE),
    "database": ("bastion-database", "Bastion / Database", DATABASE),
    "authentication": ("bastion-auth", "Bastion / Authentication", AUTH),
    "dependencies": ("bastion-dependencies", "Bastion / Dependencies", DEPENDENCIES),
}


def _variables() -> list[dict[str, Any]]:
    def query_variable(name: str, query: str) -> dict[str, Any]:
        return {
            "name": name,
            "label": name,
            "type": "query",
            "datasource": DATASOURCE,
            "definition": query,
            "query": {"query": query, "refId": "PrometheusVariableQueryEditor-VariableQuery"},
            "refresh": 2,
            "includeAll": True,
            "multi": True,
            "allValue": ".*",
            "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
            "sort": 1,
        }

    return [
        {
            "name": "datasource",
            "label": "Data source",
            "type": "datasource",
            "query": "prometheus",
            "current": {},
            "refresh": 1,
        },
        query_variable("job", "label_values(bastion_ready, job)"),
        query_variable("instance", 'label_values(bastion_ready{job=~"$job"}, instance)'),
    ]


def _panel(panel: Panel, panel_id: int, x: int, y: int) -> dict[str, Any]:
    defaults: dict[str, Any] = {"unit": panel.unit}
    if panel.mappings:
        defaults["mappings"] = list(panel.mappings)
    if panel.thresholds:
        defaults["thresholds"] = {
            "mode": "absolute",
            "steps": [{"value": value, "color": color} for value, color in panel.thresholds],
        }
    if panel.kind == "timeseries":
        defaults["custom"] = {
            "drawStyle": "line",
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if panel.stack else "none", "group": "A"},
        }
    options: dict[str, Any] = {"legend": {"displayMode": "table", "placement": "bottom"}}
    if panel.kind == "stat":
        options = {"reduceOptions": {"calcs": ["lastNotNull"]}, "colorMode": "background"}
    return {
        "id": panel_id,
        "type": panel.kind,
        "title": panel.title,
        "description": panel.description,
        "datasource": DATASOURCE,
        "gridPos": {"x": x, "y": y, "w": panel.width, "h": panel.height},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options,
        "targets": [
            {
                "datasource": DATASOURCE,
                "refId": chr(ord("A") + index),
                "expr": query.expr,
                "legendFormat": query.legend,
                "range": True,
            }
            for index, query in enumerate(panel.queries)
        ],
    }


def dashboard(uid: str, title: str, rows: tuple[Row, ...]) -> dict[str, Any]:
    """The Grafana JSON model of one dashboard.

    Args:
        uid: Stable uid, so re-importing replaces rather than duplicates.
        title: Dashboard title.
        rows: Rows of panels, laid out left to right, top to bottom.

    Returns:
        The dashboard as Grafana's JSON model (schemaVersion 39).
    """
    panels: list[dict[str, Any]] = []
    y = 0
    panel_id = 1
    for row in rows:
        panels.append(
            {
                "id": panel_id,
                "type": "row",
                "title": row.title,
                "collapsed": False,
                "gridPos": {"x": 0, "y": y, "w": WIDTH, "h": 1},
                "panels": [],
            }
        )
        panel_id += 1
        y += 1
        x = 0
        row_height = 0
        for panel in row.panels:
            if x + panel.width > WIDTH:
                x, y, row_height = 0, y + row_height, 0
            panels.append(_panel(panel, panel_id, x, y))
            panel_id += 1
            x += panel.width
            row_height = max(row_height, panel.height)
        y += row_height
    return {
        "uid": uid,
        "title": title,
        "tags": ["bastion"],
        "timezone": "browser",
        "editable": True,
        "graphTooltip": 1,
        "schemaVersion": SCHEMA_VERSION,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": _variables()},
        "annotations": {"list": []},
        "links": [],
        "panels": panels,
    }


def render() -> dict[str, str]:
    """Every dashboard's file name and JSON text, as committed under ``deploy/grafana``.

    Returns:
        ``{"service-overview.json": "{...}", ...}``.
    """
    return {
        f"{name}.json": json.dumps(dashboard(*spec), indent=2, ensure_ascii=False) + "\n"
        for name, spec in DASHBOARDS.items()
    }


def main() -> None:
    """Write every dashboard's JSON file beside this module."""
    for name, text in render().items():
        (HERE / name).write_text(text, encoding="utf-8")


if __name__ == "__main__":
    main()
