"""The Prometheus scrape endpoint, ``GET /metrics``, in one process or across workers.

A scrape answers in the Prometheus text format, or in OpenMetrics when the
``Accept`` header asks for ``application/openmetrics-text`` (prometheus_client's
``choose_encoder``, so both formats stay exactly what its parser and promtool
expect). When this process writes its metrics to a multiprocess directory, the
scrape merges every worker's files with ``MultiProcessCollector``, so one scrape
of any worker sees the whole instance.
"""

from __future__ import annotations

import gzip
import os
from typing import Final

import structlog
from prometheus_client import REGISTRY, CollectorRegistry, values
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bastion._access import AccessPolicy
from bastion.observability._health import operational_route
from bastion.settings import MetricsSettings

__all__ = ["MULTIPROCESS_ENV", "MetricsEndpoint", "multiprocess_directory"]

logger = structlog.get_logger("bastion.metrics")

MULTIPROCESS_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
"""Where prometheus_client writes each process's metrics; read when it is imported."""

# Below this size gzip costs more time than the bytes it saves on a local network.
_GZIP_MIN_BYTES: Final = 1024


def multiprocess_directory() -> str | None:
    """Return the directory this process writes its metrics to, or ``None``.

    prometheus_client picks in-memory or file-backed values once, when it is
    imported, from ``PROMETHEUS_MULTIPROC_DIR``; a directory named later (by
    ``metrics.multiprocess_dir``) cannot change what this process already
    writes, so the truth is what the library chose.
    """
    if not getattr(values.ValueClass, "_multiprocess", False):
        return None
    return os.environ.get(MULTIPROCESS_ENV) or os.environ.get(MULTIPROCESS_ENV.lower())


class MetricsEndpoint:
    """``GET /metrics``: the scrape, guarded by an allow-list of networks and a token.

    Args:
        settings: the ``metrics`` section (path, allowed networks, token).
        registry: what a single-process scrape collects; prometheus_client's
            default registry unless given. Ignored in multiprocess mode, where
            the scrape reads every worker's files instead.

    Example:
        >>> endpoint = MetricsEndpoint(settings.metrics)
        >>> app.router.routes.extend(endpoint.routes())
    """

    def __init__(self, settings: MetricsSettings, *, registry: Collector = REGISTRY) -> None:
        self.path = settings.path
        token = settings.token.get_secret_value() if settings.token else None
        self._access = AccessPolicy(settings.allowed_networks, token)
        directory = multiprocess_directory()
        self.multiprocess_dir = directory
        if directory is not None:
            # A registry of its own: the default one would add this process's
            # values a second time to what the files already hold.
            merged = CollectorRegistry()
            MultiProcessCollector(merged, path=directory)  # type: ignore[no-untyped-call]  # untyped in prometheus_client
            self._registry: Collector = merged
        else:
            self._registry = registry
            if settings.multiprocess_dir:
                logger.info(
                    "metrics.multiprocess_dir is set but this process keeps its metrics in "
                    "memory (PROMETHEUS_MULTIPROC_DIR was not set when it started); "
                    "scrapes report this process only",
                    multiprocess_dir=settings.multiprocess_dir,
                )

    def routes(self) -> list[Route]:
        """Return the route to append to the app's router."""
        return [operational_route(self.path, self.scrape)]

    async def scrape(self, request: Request) -> Response:
        """Answer one scrape.

        Raises:
            Forbidden: the caller is outside ``metrics.allowed_networks``.
            Unauthenticated: ``metrics.token`` is set and the caller's bearer
                token is missing or wrong.
        """
        self._access.require(request, subject="the metrics", realm="bastion-metrics")
        encoder, content_type = choose_encoder(request.headers.get("accept", ""))
        # Off the event loop: collecting reads every family (and, across workers,
        # every worker's files); a large registry takes milliseconds that
        # requests in flight should not wait for.
        body = await run_in_threadpool(encoder, self._registry)
        headers = {"cache-control": "no-store"}
        if len(body) >= _GZIP_MIN_BYTES and "gzip" in request.headers.get("accept-encoding", ""):
            body = gzip.compress(body, compresslevel=1)
            headers["content-encoding"] = "gzip"
        headers["vary"] = "Accept, Accept-Encoding"
        return Response(body, media_type=content_type, headers=headers)
