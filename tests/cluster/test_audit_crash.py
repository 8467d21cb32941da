"""kill -9 during a burst of audit events: the log still verifies, and what it lost is bounded.

A real ``bastion serve`` process on PostgreSQL records one event per request
while the test drives a concurrent burst and counts the acknowledged ones; the
process is killed with SIGKILL mid-burst and started again. Then
:func:`bastion.audit._verify.verify` re-derives every log from its entries and
checks every signed checkpoint, and the acknowledged ids missing from the table
are counted: in ``async`` mode at most ``audit.buffer_size`` (the events in the
buffer, accepted but not committed), in ``sync`` mode none.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from bastion.audit._checkpoint import signing_keys
from bastion.audit._tables import entries
from bastion.audit._verify import verify
from bastion.data import Database
from bastion.settings import DatabaseSettings, load_settings

APP = "tests.cluster.audit_app:app"
BUFFER_SIZE = 2000
KILL_AFTER = 3000
"""Acknowledged events before the kill: past the start of group commits, mid-burst."""
CONCURRENCY = 64

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def crash_database(postgres_url, scratch_postgres) -> Iterator[str]:
    """A PostgreSQL database of the test's own: verify reads every log in it."""
    with scratch_postgres(f"crash_{secrets.token_hex(3)}") as url:
        yield url


async def _burst(base_url: str, acknowledged: list[uuid.UUID], stop: asyncio.Event) -> None:
    """Post probes from CONCURRENCY clients until ``stop`` is set or the server is gone."""
    counter = iter(range(10**9))

    async def client_loop(client: httpx.AsyncClient) -> None:
        while not stop.is_set():
            try:
                answer = await client.post(f"{base_url}/probe/{next(counter)}")
            except httpx.TransportError:
                return
            if answer.status_code == 200:
                acknowledged.append(uuid.UUID(answer.json()["id"]))
                if len(acknowledged) >= KILL_AFTER:
                    stop.set()

    async with httpx.AsyncClient(timeout=10.0) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(CONCURRENCY)))


async def _crash(serve_cluster, env: dict[str, str]) -> list[uuid.UUID]:
    """Start the service, burst, kill -9 as soon as KILL_AFTER are acknowledged; restart it."""
    served = serve_cluster(APP, "--workers", "1", env=env)
    acknowledged: list[uuid.UUID] = []
    stop = asyncio.Event()
    burst = asyncio.create_task(_burst(served.url, acknowledged, stop))
    # Real time: the burst runs in another process; bounded by the burst's own pace.
    async with asyncio.timeout(120):
        await stop.wait()
    served.kill()
    with contextlib.suppress(httpx.TransportError):
        await burst
    # The next start-up is the recovery: it must come up on what the crash left.
    serve_cluster(APP, "--workers", "1", env=env).kill()
    return acknowledged


async def _lost_and_verified(url: str, secrets_dir: Path, acknowledged: list[uuid.UUID]):
    settings = load_settings(
        database={"url": url}, secrets={"development_directory": str(secrets_dir)}
    )
    _, verifiers = signing_keys(settings)
    database = Database(DatabaseSettings(url=url))
    try:
        report = await verify(database, verifiers=verifiers)
        async with database.session() as session:
            stored = set(
                await session.scalars(select(entries.c.id).where(entries.c.action == "crash.probe"))
            )
    finally:
        await database.aclose()
    return [entry for entry in acknowledged if entry not in stored], report


@pytest.mark.parametrize(
    ("mode", "flush_interval"),
    [("async", "0.005"), ("async", "0.5"), ("sync", "0.005")],
    ids=["async", "async-slow-flush", "sync"],
)
async def test_kill_during_burst(serve_cluster, crash_database, tmp_path, mode, flush_interval):
    """After kill -9 the log verifies; async loses at most buffer_size events, sync none.

    The slow flush keeps partial batches waiting half a second, so the kill finds
    accepted events in the buffer: the bound is exercised, not only stated.
    """
    secrets_dir = tmp_path / "secrets"
    env = {
        "BASTION_DATABASE__URL": crash_database,
        "BASTION_MIGRATIONS__MODE": "auto",
        "BASTION_SECRETS__DEVELOPMENT_DIRECTORY": str(secrets_dir),
        "BASTION_LOGGING__LEVEL": "WARNING",
        "BASTION_IDENTITY__ENABLED": "false",
        "BASTION_RATELIMIT__ENABLED": "false",
        "BASTION_AUDIT__MODE": mode,
        "BASTION_AUDIT__BUFFER_SIZE": str(BUFFER_SIZE),
        "BASTION_AUDIT__FLUSH_INTERVAL": flush_interval,
        # Checkpoints during the burst: verify checks the restarted log against them.
        "BASTION_AUDIT__CHECKPOINT_INTERVAL": "0.2",
    }

    acknowledged = await _crash(serve_cluster, env)
    lost, report = await _lost_and_verified(crash_database, secrets_dir, acknowledged)

    print(
        f"audit crash [{mode}, flush {flush_interval}s]: "
        f"acknowledged={len(acknowledged)} lost={len(lost)} "
        f"bound={BUFFER_SIZE if mode == 'async' else 0} entries={report.entries} "
        f"checkpoints={report.checkpoints}"
    )
    assert [] == report.problems
    assert report.checkpoints > 0
    assert len(lost) <= (BUFFER_SIZE if mode == "async" else 0)
