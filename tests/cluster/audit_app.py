"""A bastion app for the audit crash test: one route that records an event and answers its id.

Everything comes from the environment (database, audit mode, secrets), so a restart
is the same deployment.
"""

from __future__ import annotations

from fastapi import FastAPI

import bastion
from bastion.audit import AuditEvent, Resource

app = FastAPI()
runtime = bastion.install(app)
assert runtime.audit is not None
log = runtime.audit.log
log.register_actions({"crash.probe": "One request of the audit crash test."})


@app.post("/probe/{number}")
async def probe(number: int) -> dict[str, str]:
    """Record one event; answering means ``record()`` accepted it (async) or committed it (sync)."""
    entry = await log.record(
        AuditEvent(action="crash.probe", resource=Resource("probe", str(number)))
    )
    return {"id": str(entry)}
