"""An in-process HTTP client that runs the app's lifespan around the test."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import httpx
    from starlette.types import ASGIApp


@asynccontextmanager
async def lifespan_client(
    app: ASGIApp, *, base_url: str = "http://testserver", **client_options: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """Start ``app`` (start-up hooks, migrations), yield a client, then shut it down.

    Example:
        >>> async with lifespan_client(app) as client:
        ...     assert (await client.get("/health/live")).status_code == 200

    Args:
        app: a Starlette or FastAPI app, usually with bastion installed.
        base_url: the origin requests appear to go to.
        client_options: passed to ``httpx.AsyncClient``.
    """
    import httpx  # noqa: PLC0415 -- a test-only dependency

    router = getattr(app, "router", None)
    lifespan = getattr(router, "lifespan_context", None)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url=base_url, **client_options) as c:
        if lifespan is None:
            yield c
            return
        async with lifespan(app):
            yield c
