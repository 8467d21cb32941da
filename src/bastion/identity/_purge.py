"""The purge of spent tokens: used or expired single-use tokens, dead refresh families.

Single-use tokens are kept while they may still be presented and refresh
families while they live (a live family's used tokens are how reuse is
detected); after that they only grow the tables. :func:`purge_expired` deletes

- single-use tokens used, or expired, more than ``keep`` ago;
- refresh families revoked, or expired, more than ``keep`` ago, with their tokens.

API keys are never purged: a revoked key stays for audit.

Deletes run in batches of at most ``batch`` rows, one short transaction each,
so a large backlog never holds locks for long. Every delete re-checks its
condition, and a spent row never becomes live again: instances purging at the
same moment delete each row once between them, and the later ones find nothing.
:func:`run_purges` is the periodic loop :func:`~bastion.identity._build.start_identity`
starts (``identity.purge_interval``, with jitter so instances spread out).
"""

from __future__ import annotations

import asyncio
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Final, TypeVar

import structlog
from sqlalchemy import delete, or_, select

from bastion.data.types import utc_now
from bastion.identity._tables import one_time_tokens, refresh_families, refresh_tokens
from bastion.observability._metrics import IDENTITY_PURGED_ROWS

if TYPE_CHECKING:
    from sqlalchemy.ext.asyncio import AsyncSession

    from bastion.data import Database

__all__ = ["DEFAULT_PURGE_BATCH", "DEFAULT_PURGE_KEEP", "purge_expired", "run_purges"]

DEFAULT_PURGE_KEEP: Final = 7 * 86_400.0
DEFAULT_PURGE_BATCH: Final = 1_000

logger = structlog.get_logger("bastion.identity")

_T = TypeVar("_T")


async def purge_expired(
    database: Database,
    *,
    now: datetime | None = None,
    keep: float | timedelta = DEFAULT_PURGE_KEEP,
    batch: int = DEFAULT_PURGE_BATCH,
) -> dict[str, int]:
    """Delete spent single-use tokens and dead refresh families, in bounded batches.

    The grace ``keep`` leaves a just-used or just-expired row in place for a
    while: who used which link, and when, stays readable, and an older unused
    link of a racing issue is still refused as superseded.

    Example:
        >>> await purge_expired(database, keep=timedelta(days=7))
        {'one_time_tokens': 12, 'refresh_families': 3, 'refresh_tokens': 41}

    Args:
        database: the database holding the identity tables.
        now: the current time (UTC); default the clock.
        keep: seconds a spent row is kept after it was used, revoked or expired.
        batch: the most rows one statement deletes.

    Returns:
        Rows deleted, by table (``one_time_tokens``, ``refresh_families``,
        ``refresh_tokens``).

    Raises:
        ValueError: ``keep`` is negative or ``batch`` is less than 1.
    """
    grace = keep if isinstance(keep, timedelta) else timedelta(seconds=keep)
    if grace < timedelta(0):
        raise ValueError(f"keep must be 0 or more, not {keep!r}")
    if batch < 1:
        raise ValueError(f"batch must be 1 or more, not {batch!r}")
    cutoff = (now or utc_now()) - grace
    counts = {"one_time_tokens": 0, "refresh_families": 0, "refresh_tokens": 0}
    while True:
        deleted = await _in_transaction(database, _delete_one_time, cutoff, batch)
        _count(counts, "one_time_tokens", deleted)
        if deleted < batch:
            break
    while True:
        families, tokens = await _in_transaction(database, _delete_families, cutoff, batch)
        _count(counts, "refresh_families", families)
        _count(counts, "refresh_tokens", tokens)
        if families < batch:
            break
    return counts


async def run_purges(
    database: Database,
    *,
    interval: float,
    keep: float,
    batch: int = DEFAULT_PURGE_BATCH,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    jitter: Callable[[], float] = random.random,
) -> None:
    """Purge every ``interval`` seconds (jittered) until cancelled; never raises otherwise.

    The first purge waits a random part of ``interval`` and each later wait is
    ``interval`` give or take a quarter, so instances started together do not
    purge together. A failure is logged and the next interval tries again.

    Args:
        database: the database holding the identity tables.
        interval: seconds between purges; more than 0.
        keep: as :func:`purge_expired`.
        batch: as :func:`purge_expired`.
        sleep: waits (tests pass a fake).
        jitter: a number in ``[0, 1)``.
    """
    wait = interval * jitter()
    while True:
        await sleep(wait)
        try:
            counts = await purge_expired(database, keep=keep, batch=batch)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 -- a database outage must not end the loop
            # The type only: a driver's message may quote the statement's parameters.
            logger.warning("identity purge failed", error=type(exc).__name__)
        else:
            if any(counts.values()):
                logger.info("identity purge", **counts)
        wait = interval * (0.75 + 0.5 * jitter())


def _count(counts: dict[str, int], table: str, deleted: int) -> None:
    counts[table] += deleted
    if deleted:
        IDENTITY_PURGED_ROWS.labels(table=table).inc(deleted)


async def _in_transaction(
    database: Database,
    fn: Callable[[AsyncSession, datetime, int], Awaitable[_T]],
    cutoff: datetime,
    batch: int,
) -> _T:
    async with database.session() as session:
        return await fn(session, cutoff, batch)


async def _delete_one_time(session: AsyncSession, cutoff: datetime, batch: int) -> int:
    table = one_time_tokens
    spent = or_(table.c.used_at < cutoff, table.c.expires_at < cutoff)
    # DELETE has no LIMIT on PostgreSQL: bound it by a limited sub-select instead.
    ids = select(table.c.id).where(spent).limit(batch).scalar_subquery()
    rows = await session.execute(
        delete(table).where(table.c.id.in_(ids), spent).returning(table.c.id)
    )
    return len(rows.all())


async def _delete_families(session: AsyncSession, cutoff: datetime, batch: int) -> tuple[int, int]:
    table = refresh_families
    dead = or_(table.c.revoked_at < cutoff, table.c.expires_at < cutoff)
    ids: list[uuid.UUID] = list(
        (await session.scalars(select(table.c.id).where(dead).limit(batch))).all()
    )
    if not ids:
        return 0, 0
    # The foreign key cascades too, but deleting the tokens first counts them, and
    # does not rely on SQLite's foreign_keys pragma.
    tokens = await session.execute(
        delete(refresh_tokens)
        .where(refresh_tokens.c.family_id.in_(ids))
        .returning(refresh_tokens.c.id)
    )
    families = await session.execute(
        delete(table).where(table.c.id.in_(ids), dead).returning(table.c.id)
    )
    return len(families.all()), len(tokens.all())
