"""Observability: logs, the request middleware, errors, health, metrics and traces.

The metric objects themselves are in :mod:`bastion.observability.metrics`.
"""

from bastion.observability._client_spans import TracingTransport, instrument_httpx, instrument_redis
from bastion.observability._handlers import (
    install_exception_handlers,
    problem_response,
    send_problem,
)
from bastion.observability._health import HealthCheck, HealthRegistry
from bastion.observability._http_metrics import HttpMetrics
from bastion.observability._logging import AccessLogger, LogMasker, configure_logging
from bastion.observability._middleware import RequestMiddleware
from bastion.observability._prometheus import MetricsEndpoint
from bastion.observability._propagation import (
    consumer_span,
    extract_context,
    inject_headers,
    producer_span,
)
from bastion.observability._tracing import Tracing, build_tracing

__all__ = [
    "AccessLogger",
    "HealthCheck",
    "HealthRegistry",
    "HttpMetrics",
    "LogMasker",
    "MetricsEndpoint",
    "RequestMiddleware",
    "Tracing",
    "TracingTransport",
    "build_tracing",
    "configure_logging",
    "consumer_span",
    "extract_context",
    "inject_headers",
    "install_exception_handlers",
    "instrument_httpx",
    "instrument_redis",
    "problem_response",
    "producer_span",
    "send_problem",
]
