"""Any one tampering with a log, drawn by hypothesis, is found by verify() at its position."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from audit_log_support import add_checkpoints, build_log, make_entry, signed_checkpoint
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy import delete, insert, update

from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._merkle import root_of
from bastion.audit._note import NoteSigner
from bastion.audit._tables import audit_metadata, checkpoints, entries
from bastion.audit._verify import verify
from bastion.data import Database
from bastion.settings import DatabaseSettings

SIGNER = NoteSigner.generate("bastion")
STRANGER = NoteSigner.generate("bastion")
CONTENT = [name for name in ENCODED_COLUMNS if name not in {"log_id", "seq"}]


@dataclass(frozen=True)
class Tamper:
    """One tampering: what it does and the positions verify must name."""

    kind: str
    seq: int = 0
    other: int = 0
    column: str = ""
    rehash: bool = False


def _changed(name: str, value: Any) -> Any:
    """A different value of the same column type."""
    if name in {"id", "tenant_id"}:
        return uuid.uuid4()
    if name == "occurred_at":
        return value + dt.timedelta(microseconds=1)
    if name in {"email", "ip", "user_agent"}:
        return (value or b"") + b"x"
    if name == "details":
        return '{"tampered":true}'
    return (value or "")[:8] + "x"


@st.composite
def scenarios(draw) -> tuple[int, list[int], Tamper]:
    """A log size, its checkpoint sizes and one tampering of it."""
    size = draw(st.integers(2, 40))
    sizes = sorted(draw(st.sets(st.integers(1, size), max_size=3)))
    seq = draw(st.integers(0, size - 1))
    kind = draw(st.sampled_from(["edit", "delete", "insert", "swap", "truncate", "checkpoint"]))
    if kind == "edit":
        column = draw(st.sampled_from([*ENCODED_COLUMNS]))
        return size, sizes, Tamper(kind, seq, column=column, rehash=draw(st.booleans()))
    if kind == "swap":
        other = draw(st.integers(0, size - 1).filter(lambda value: value != seq))
        return size, sizes, Tamper(kind, seq, other, rehash=draw(st.booleans()))
    if kind == "checkpoint":
        sizes = sizes or [size]
        at = draw(st.sampled_from(sizes))
        how = draw(st.sampled_from(["stranger", "root", "column"]))
        return size, sizes, Tamper(kind, at, column=how)
    return size, sizes, Tamper(kind, seq)


async def _apply(database: Database, rows: list[dict[str, Any]], tamper: Tamper) -> list[int]:
    """Tamper with the log behind its back; return the positions verify must report."""
    where = (entries.c.log_id == "global", entries.c.seq == tamper.seq)
    async with database.engine.begin() as connection:
        if tamper.kind == "edit":
            row = dict(rows[tamper.seq])
            name = tamper.column
            row[name] = len(rows) + 50 if name == "seq" else _changed(name, row[name])
            if name == "log_id":
                row[name] = "system"
            values = {name: row[name]}
            if tamper.rehash:
                values["leaf_hash"] = entry_leaf_hash([row[column] for column in ENCODED_COLUMNS])
            await connection.execute(update(entries).where(*where).values(values))
        elif tamper.kind == "delete":
            await connection.execute(delete(entries).where(*where))
        elif tamper.kind == "insert":
            await connection.execute(insert(entries), make_entry("global", len(rows), tamper.seq))
            return [len(rows)]
        elif tamper.kind == "swap":
            first, second = rows[tamper.seq], rows[tamper.other]
            moved = [*CONTENT, "leaf_hash"] if tamper.rehash else CONTENT
            other = (entries.c.log_id == "global", entries.c.seq == tamper.other)
            await connection.execute(update(entries).where(*where).values(id=uuid.uuid4()))
            await connection.execute(
                update(entries).where(*other).values({name: first[name] for name in moved})
            )
            await connection.execute(
                update(entries).where(*where).values({name: second[name] for name in moved})
            )
            return [tamper.seq, tamper.other]
        elif tamper.kind == "truncate":
            await connection.execute(
                delete(entries).where(entries.c.log_id == "global", entries.c.seq >= tamper.seq)
            )
        else:
            size = tamper.seq
            real = signed_checkpoint(SIGNER, "global", size, root_of(_leaves(rows, size)))
            if tamper.column == "column":
                values = {"root_hash": bytes(32)}
            elif tamper.column == "stranger":
                forged = signed_checkpoint(STRANGER, "global", size, real.root_hash)
                values = {"note": forged.note}
            else:
                # Another root under the original signature, which no longer verifies.
                body, _, signatures = real.note.partition("\n\n")
                origin, tree_size, _root, stamp = body.split("\n")[:4]
                altered = "\n".join(
                    [origin, tree_size, base64.b64encode(bytes(32)).decode(), stamp]
                )
                values = {"note": f"{altered}\n\n{signatures}", "root_hash": bytes(32)}
            await connection.execute(
                update(checkpoints).where(checkpoints.c.tree_size == size).values(values)
            )
    return [tamper.seq]


def _leaves(rows: list[dict[str, Any]], size: int) -> list[bytes]:
    return [row["leaf_hash"] for row in rows[:size]]


async def _scenario(url: str, size: int, sizes: list[int], tamper: Tamper) -> tuple[Any, list[int]]:
    database = Database(DatabaseSettings(url=url))
    try:
        async with database.engine.begin() as connection:
            await connection.run_sync(audit_metadata.drop_all)
            await connection.run_sync(audit_metadata.create_all)
        rows = await build_log(database, "global", size, seed=size)
        await add_checkpoints(database, SIGNER, "global", rows, sizes)
        targets = await _apply(database, rows, tamper)
        report = await verify(database, verifiers=[SIGNER.verifier()])
    finally:
        await database.aclose()
    return report, targets


def _check(report, targets: list[int], tamper: Tamper) -> None:
    assert not report.ok, tamper
    covered = {
        position
        for problem in report.problems
        if problem.log_id == "global"
        for position in problem.positions()
    }
    assert set(targets) <= covered, (tamper, report.problems)


class TestTamperIsFound:
    @settings(
        max_examples=50,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(scenario=scenarios())
    def test_one_tampering_is_found_at_its_position(self, tmp_path, scenario):
        """Edits, deletions, insertions, swaps, truncations and forged checkpoints are named."""
        size, sizes, tamper = scenario
        url = f"sqlite+aiosqlite:///{tmp_path / f'{uuid.uuid4().hex}.db'}"
        report, targets = asyncio.run(_scenario(url, size, sizes, tamper))
        _check(report, targets, tamper)

    @pytest.mark.parametrize(
        "tamper",
        [
            Tamper("edit", 7, column="actor_id", rehash=True),
            Tamper("swap", 3, 9, rehash=True),
            Tamper("truncate", 15),
            Tamper("checkpoint", 10, column="stranger"),
        ],
        ids=["rehashed-edit", "swap", "truncate", "forged-checkpoint"],
    )
    async def test_postgres_smoke(self, database, tamper):
        """The same tamperings are found on PostgreSQL (and SQLite) through the database fixture."""
        rows = await build_log(database, "global", 20)
        await add_checkpoints(database, SIGNER, "global", rows, [10, 20])
        targets = await _apply(database, rows, tamper)
        _check(await verify(database, verifiers=[SIGNER.verifier()]), targets, tamper)
