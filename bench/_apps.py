"""The variants the benchmarks serve: the same small JSON endpoint, bare, with bastion, or not.

``GET /items/{item_id}`` returns a three-member JSON object. The bare apps are
what a team has before adding bastion; the bastion ones are the same apps after
``bastion.install(app)`` at its defaults (the environment picks the database
path and the log format, nothing else), or with its metrics, JSON access log
and tracing exported over OTLP/HTTP at 10% or 100% sampling; the assembly is
bare FastAPI with the usual PyPI packages for the same features.

The variants that export spans read the receiver's base URL from the
``BENCH_OTLP_ENDPOINT`` environment variable (``http://127.0.0.1:PORT``).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

PATH = "/items/42"


def _starlette() -> Starlette:
    async def read_item(request: Request) -> JSONResponse:
        item_id: int = request.path_params["item_id"]
        return JSONResponse({"id": item_id, "name": "widget", "price": 9.5})

    return Starlette(routes=[Route("/items/{item_id:int}", read_item)])


def _fastapi() -> FastAPI:
    app = FastAPI()

    # response_model=None: the plain dict path, with no response validation, in
    # both the bare and the bastion variant.
    @app.get("/items/{item_id}", response_model=None)
    async def read_item(item_id: int) -> dict[str, Any]:
        return {"id": item_id, "name": "widget", "price": 9.5}

    return app


def bare_starlette() -> Starlette:
    """Starlette alone."""
    return _starlette()


def bare_fastapi() -> FastAPI:
    """FastAPI alone."""
    return _fastapi()


def bastion_starlette() -> Starlette:
    """Starlette with ``bastion.install`` at its defaults."""
    import bastion  # noqa: PLC0415 -- the bare variants must not import bastion at all

    app = _starlette()
    bastion.install(app)
    return app


def bastion_fastapi() -> FastAPI:
    """FastAPI with ``bastion.install`` at its defaults."""
    import bastion  # noqa: PLC0415 -- the bare variants must not import bastion at all

    app = _fastapi()
    bastion.install(app)
    return app


def _otlp_endpoint() -> str:
    try:
        return os.environ["BENCH_OTLP_ENDPOINT"]
    except KeyError:
        raise RuntimeError(
            "BENCH_OTLP_ENDPOINT is not set: start this variant through http_overhead.py, "
            "which runs an OTLP receiver for it"
        ) from None


def _bastion_observed(sample_ratio: float) -> FastAPI:
    import bastion  # noqa: PLC0415 -- the bare variants must not import bastion at all

    app = _fastapi()
    bastion.install(
        app,
        metrics={"enabled": True},
        logging={"format": "json"},
        tracing={
            "enabled": True,
            "sample_ratio": sample_ratio,
            "exporter": "otlp-http",
            "endpoint": _otlp_endpoint(),
        },
    )
    return app


def bastion_observed_10() -> FastAPI:
    """FastAPI with bastion's metrics, JSON access log and OTLP/HTTP tracing at 10% sampling."""
    return _bastion_observed(0.1)


def bastion_observed_100() -> FastAPI:
    """The same with every request traced."""
    return _bastion_observed(1.0)


def assembly_fastapi() -> FastAPI:
    """FastAPI with the usual PyPI assembly for request ids, metrics, traces and access logs.

    asgi-correlation-id's middleware, prometheus-fastapi-instrumentator
    (``instrument`` and ``expose``), opentelemetry-instrumentation-fastapi with
    an SDK ``TracerProvider`` (always sampled) and a ``BatchSpanProcessor``
    exporting over OTLP/HTTP, and an ``@app.middleware("http")`` that logs one
    JSON line per request with structlog, each set up as its documentation shows.
    """
    # Imported here: the other variants must not import the assembly's packages.
    import structlog  # noqa: PLC0415
    from asgi_correlation_id import CorrelationIdMiddleware, correlation_id  # noqa: PLC0415
    from fastapi import Response  # noqa: PLC0415
    from opentelemetry import trace  # noqa: PLC0415
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (  # noqa: PLC0415
        OTLPSpanExporter,
    )
    from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor  # noqa: PLC0415
    from opentelemetry.sdk.resources import Resource  # noqa: PLC0415
    from opentelemetry.sdk.trace import TracerProvider  # noqa: PLC0415
    from opentelemetry.sdk.trace.export import BatchSpanProcessor  # noqa: PLC0415
    from prometheus_fastapi_instrumentator import Instrumentator  # noqa: PLC0415

    # structlog's documented JSON set-up for production, writing to stdout (which
    # the benchmark redirects to a file, as for bastion).
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.JSONRenderer(),
        ],
        logger_factory=structlog.PrintLoggerFactory(sys.stdout),
        cache_logger_on_first_use=True,
    )
    access_logger = structlog.get_logger("api.access")

    provider = TracerProvider(resource=Resource.create({"service.name": "assembly"}))
    provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=f"{_otlp_endpoint()}/v1/traces"))
    )
    trace.set_tracer_provider(provider)

    app = _fastapi()

    @app.middleware("http")
    async def log_requests(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=correlation_id.get())
        start = time.perf_counter()
        response = await call_next(request)
        access_logger.info(
            "request",
            method=request.method,
            path=request.url.path,
            status=response.status_code,
            duration_ms=round((time.perf_counter() - start) * 1000, 3),
            client=request.client.host if request.client else None,
        )
        return response

    # Added last, so it is outermost: the id is set before the logging middleware runs.
    app.add_middleware(CorrelationIdMiddleware)
    Instrumentator().instrument(app).expose(app)
    FastAPIInstrumentor.instrument_app(app, tracer_provider=provider)
    return app


# name -> (factory, the bare variant it is compared with, or None for a baseline)
VARIANTS: dict[str, tuple[Callable[[], Any], str | None]] = {
    "starlette": (bare_starlette, None),
    "fastapi": (bare_fastapi, None),
    "starlette+bastion": (bastion_starlette, "starlette"),
    "fastapi+bastion": (bastion_fastapi, "fastapi"),
    "fastapi+bastion-obs10": (bastion_observed_10, "fastapi"),
    "fastapi+bastion-obs100": (bastion_observed_100, "fastapi"),
    "fastapi+assembly": (assembly_fastapi, "fastapi"),
}

# Variants that export spans, each to its own OTLP receiver (BENCH_OTLP_ENDPOINT).
EXPORTING = frozenset({"fastapi+bastion-obs10", "fastapi+bastion-obs100", "fastapi+assembly"})

# Variants that serve a Prometheus scrape, and a metric name it must contain: a
# variant whose scrape lacks it is not measuring what its name says.
SCRAPED = {
    "fastapi+bastion-obs10": ("/metrics", "http_server_request_duration_seconds"),
    "fastapi+bastion-obs100": ("/metrics", "http_server_request_duration_seconds"),
    "fastapi+assembly": ("/metrics", "http_request_duration_seconds"),
}

# The share of requests each exporting variant samples, to check the spans received.
SAMPLE_RATIO = {
    "fastapi+bastion-obs10": 0.1,
    "fastapi+bastion-obs100": 1.0,
    "fastapi+assembly": 1.0,
}
