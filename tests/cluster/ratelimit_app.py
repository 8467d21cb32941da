"""A bastion app for the rate-limit cluster tests: one limited route naming its process.

Its limits come from the environment (``BASTION_RATELIMIT__DEFAULT``, and
``BASTION_RATELIMIT__ROUTES`` for a policy of its own on ``/open``), so the same
module serves every policy a test wants. No database: the limiter needs only Redis.
"""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bastion


async def hit(request: Request) -> JSONResponse:
    """The serving process's pid, so a test can tell which instance admitted a request."""
    return JSONResponse({"pid": os.getpid()})


app = Starlette(routes=[Route("/hit", hit), Route("/open", hit)])
bastion.install(app, database={"enabled": False})
