"""Building audit logs row by row for the tree, verify and tamper tests (no writer needed)."""

from __future__ import annotations

import datetime as dt
import json
import random
import uuid
from typing import Any

from sqlalchemy import insert

from bastion.audit._checkpoint import Checkpoint, checkpoint_body
from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._merkle import CompactRange, root_of
from bastion.audit._note import NoteSigner
from bastion.audit._tables import checkpoints, entries, logs, nodes
from bastion.data import Database

COLUMNS = (*ENCODED_COLUMNS, "leaf_hash")
EPOCH = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


def make_entry(log_id: str, seq: int, rng: random.Random | int) -> dict[str, Any]:
    """A plausible entry at ``seq`` with its leaf hash computed from its columns."""
    if isinstance(rng, int):
        rng = random.Random(rng)  # noqa: S311 -- reproducible test data, not secrets
    row: dict[str, Any] = {
        "log_id": log_id,
        "seq": seq,
        "id": uuid.UUID(int=rng.getrandbits(128), version=4),
        "occurred_at": EPOCH + dt.timedelta(microseconds=rng.randrange(10**12)),
        "action": rng.choice(["auth.login", "document.read", "user.create"]),
        "outcome": rng.choice(["success", "failure", "denied"]),
        "actor_type": "user",
        "actor_id": str(rng.randrange(1000)),
        "tenant_id": rng.choice([None, uuid.UUID(int=rng.getrandbits(128), version=4)]),
        "resource_type": rng.choice([None, "document"]),
        "resource_id": rng.choice([None, str(rng.randrange(100))]),
        "request_id": f"req-{seq}",
        "trace_id": None,
        "subject": f"user:{rng.randrange(1000)}",
        "email": rng.randbytes(20),
        "ip": rng.choice([None, rng.randbytes(12)]),
        "user_agent": None,
        "details": json.dumps({"n": seq}, separators=(",", ":"), sort_keys=True),
    }
    row["leaf_hash"] = entry_leaf_hash([row[name] for name in ENCODED_COLUMNS])
    return row


async def build_log(
    database: Database, log_id: str, size: int, *, seed: int = 0, tiles: bool = True
) -> list[dict[str, Any]]:
    """Insert ``size`` entries, their level-8k tiles and the head; return the entries."""
    rng = random.Random(seed)  # noqa: S311 -- reproducible test data, not secrets
    rows = [make_entry(log_id, seq, rng) for seq in range(size)]
    compact = CompactRange()
    tile_rows = [
        {"log_id": log_id, "level": node.level, "index": node.index, "hash": node.hash}
        for node in compact.extend(row["leaf_hash"] for row in rows)
        if node.level % 8 == 0
    ]
    async with database.engine.begin() as connection:
        if rows:
            await connection.execute(insert(entries), rows)
        if tiles and tile_rows:
            await connection.execute(insert(nodes), tile_rows)
        await connection.execute(
            insert(logs),
            {
                "log_id": log_id,
                "size": compact.size,
                "root_hash": compact.root(),
                "frontier": compact.to_bytes(),
                "updated_at": EPOCH,
            },
        )
    return rows


def signed_checkpoint(
    signer: NoteSigner,
    log_id: str,
    size: int,
    root: bytes,
    *,
    origin: str = "bastion",
    at: dt.datetime = EPOCH,
) -> Checkpoint:
    """A checkpoint of ``log_id`` at ``size`` signed by ``signer`` (at ``at``)."""
    body = checkpoint_body(f"{origin}/{log_id}", size, root, at)
    return Checkpoint(f"{origin}/{log_id}", size, root, at, signer.sign(body), signer.name)


async def add_checkpoints(
    database: Database,
    signer: NoteSigner,
    log_id: str,
    rows: list[dict[str, Any]],
    sizes: list[int],
    *,
    times: list[dt.datetime] | None = None,
) -> list[Checkpoint]:
    """Store signed checkpoints of the log made of ``rows`` at each of ``sizes`` (and ``times``)."""
    made = [
        signed_checkpoint(
            signer, log_id, size, root_of([row["leaf_hash"] for row in rows[:size]]), at=at
        )
        for size, at in zip(sizes, times or [EPOCH] * len(sizes), strict=True)
    ]
    if not made:
        return made
    async with database.engine.begin() as connection:
        await connection.execute(
            insert(checkpoints),
            [
                {
                    "id": uuid.uuid4(),
                    "log_id": log_id,
                    "tree_size": checkpoint.size,
                    "root_hash": checkpoint.root_hash,
                    "created_at": EPOCH,
                    "key_name": signer.name,
                    "note": checkpoint.note,
                }
                for checkpoint in made
            ],
        )
    return made
