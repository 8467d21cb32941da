"""A small bastion app for shutdown tests: slow requests, slow uploads, ordered hooks.

``create_app`` builds a fresh app (in-process tests load it once per test);
``served_app.app`` is the same app at module level, as ``bastion serve`` users write it.
"""

from __future__ import annotations

import asyncio
import hashlib

import structlog
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bastion
from bastion.guard import limits

logger = structlog.get_logger("tests.drain_app")


async def slow(request: Request) -> JSONResponse:
    """Sleep ``seconds`` (a stand-in for real work), then echo ``n``."""
    seconds = float(request.query_params.get("seconds", "1"))
    logger.info("slow request started", n=request.query_params.get("n"))
    await asyncio.sleep(seconds)
    return JSONResponse({"n": request.query_params.get("n"), "slept": seconds})


@limits(content_types=["application/octet-stream"])
async def upload(request: Request) -> JSONResponse:
    """Read the whole body however slowly it arrives; answer its size and digest."""
    body = await request.body()
    return JSONResponse({"bytes": len(body), "sha256": hashlib.sha256(body).hexdigest()})


async def in_flight(request: Request) -> JSONResponse:
    """How many requests the lifecycle counts, this one included."""
    return JSONResponse({"in_flight": request.app.state.bastion.lifecycle.in_flight})


def create_app() -> Starlette:
    """The test app, with two shutdown hooks whose order the tests check."""
    app = Starlette(
        routes=[
            Route("/slow", slow),
            Route("/upload", upload, methods=["POST"]),
            Route("/in-flight", in_flight),
        ]
    )
    runtime = bastion.install(app)

    async def close_cache() -> None:
        logger.info("test cache closed")

    async def close_clients() -> None:
        logger.info("test clients closed")

    # Higher priorities close first: clients (50) before the cache (40), both
    # before the database pool bastion registered at priority 10.
    runtime.lifecycle.on_shutdown("close test cache", close_cache, priority=40)
    runtime.lifecycle.on_shutdown("close test clients", close_clients, priority=50)
    return app
