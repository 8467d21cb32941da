"""A bastion app that answers with the pid of the worker that served the request."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bastion


async def pid(request: Request) -> JSONResponse:
    """The serving worker's pid, so a test can tell the workers apart."""
    return JSONResponse({"pid": os.getpid()})


app = Starlette(routes=[Route("/pid", pid)])
bastion.install(app, database={"enabled": False})
