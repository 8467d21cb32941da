"""Observability: structured logs, the request middleware, error rendering and health."""

from bastion.observability._handlers import install_exception_handlers, problem_response
from bastion.observability._health import HealthCheck, HealthRegistry
from bastion.observability._logging import AccessLogger, LogMasker, configure_logging
from bastion.observability._middleware import RequestMiddleware

__all__ = [
    "AccessLogger",
    "HealthCheck",
    "HealthRegistry",
    "LogMasker",
    "RequestMiddleware",
    "configure_logging",
    "install_exception_handlers",
    "problem_response",
]
