"""A bastion app for the flag cluster tests: one route answering a flag's value, and its pid.

Everything comes from the environment (database, Redis, poll interval), so every
instance of a test is the same deployment.
"""

from __future__ import annotations

import os

from fastapi import FastAPI

import bastion

app = FastAPI()
runtime = bastion.install(app)
assert runtime.flags is not None
flags = runtime.flags.flags


@app.get("/flag/{key}")
async def flag(key: str) -> dict[str, object]:
    """Whether ``key`` is on here, at which revision, in which process."""
    return {"enabled": flags.is_enabled(key), "revision": flags.revision, "pid": os.getpid()}
