"""A bastion app for the idempotency cluster tests: one keyed route counting its executions.

Everything comes from the environment: the store is Redis when
``BASTION_REDIS__URL`` is set, else the database (PostgreSQL). Executions are
counted in a Redis of the test's choosing (``IDEMPOTENCY_TEST_COUNTER_URL``),
per idempotency key, so a test can tell how many times the app really ran
whichever instance ran it.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import redis.asyncio as redis_asyncio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bastion
from bastion.http import idempotent

COUNTER_URL = os.environ["IDEMPOTENCY_TEST_COUNTER_URL"]
COUNTER_PREFIX = os.environ["IDEMPOTENCY_TEST_COUNTER_PREFIX"]
# Long enough that the concurrent copies of a request arrive while it runs (409s),
# short enough for a test.
WORK_SECONDS = float(os.environ.get("IDEMPOTENCY_TEST_WORK_SECONDS", "0.3"))

_counter: Any = None


@idempotent(required=True)
async def charge(request: Request) -> JSONResponse:
    """Count this execution under the request's key, work a while, answer which one it was."""
    global _counter  # noqa: PLW0603 -- one client per process, made on its loop
    if _counter is None:
        _counter = redis_asyncio.from_url(COUNTER_URL)
    body = await request.json()
    execution = await _counter.incr(COUNTER_PREFIX + request.headers["idempotency-key"])
    await asyncio.sleep(WORK_SECONDS)
    return JSONResponse(
        {"execution": execution, "amount": body["amount"], "pid": os.getpid()},
        status_code=201,
        headers={"Location": f"/charges/{execution}"},
    )


app = Starlette(routes=[Route("/charges", charge, methods=["POST"])])
# bastion.install wires the store (Redis or the database, from the environment), its
# start-up and shutdown, and the middleware innermost, where the principal is known.
runtime = bastion.install(app)
if runtime.idempotency is None:  # pragma: no cover -- the environment turned it off
    raise RuntimeError("idempotency_app needs http.idempotency enabled")
