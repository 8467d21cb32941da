"""The four variants both benchmarks serve: the same small JSON endpoint, bare or with bastion.

``GET /items/{item_id}`` returns a three-member JSON object. The bare apps are
what a team has before adding bastion; the bastion ones are the same apps after
``bastion.install(app)`` at its defaults (the environment picks the database
path and the log format, nothing else).
"""

from __future__ import annotations

from collections.abc import Callable
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


# name -> (factory, the bare variant it is compared with, or None for a baseline)
VARIANTS: dict[str, tuple[Callable[[], Any], str | None]] = {
    "starlette": (bare_starlette, None),
    "fastapi": (bare_fastapi, None),
    "starlette+bastion": (bastion_starlette, "starlette"),
    "fastapi+bastion": (bastion_fastapi, "fastapi"),
}
