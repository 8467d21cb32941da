"""verify(): every entry re-hashed, every tree rebuilt, every checkpoint checked."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import json
import uuid
from typing import Any

import pytest
from audit_log_support import (
    add_checkpoints,
    build_log,
    make_entry,
    signed_checkpoint,
)
from sqlalchemy import delete, insert, select, text, update

from bastion.audit._checkpoint import DirectorySink
from bastion.audit._encoding import ENCODED_COLUMNS, encode_entry, entry_leaf_hash
from bastion.audit._merkle import CompactRange, root_of
from bastion.audit._note import NoteSigner
from bastion.audit._tables import checkpoints, entries, logs, pruned, segments
from bastion.audit._verify import _POSTGRES_ENCODING, Problem, verify

SIZE = 300
SIZES = [10, 100, 256, 300]


@pytest.fixture(scope="module")
def signer() -> NoteSigner:
    """The trusted checkpoint key."""
    return NoteSigner.generate("bastion")


@pytest.fixture
async def log(database, signer):
    """A 300-entry global log with checkpoints at 10, 100, 256 and 300."""
    rows = await build_log(database, "global", SIZE)
    await add_checkpoints(database, signer, "global", rows, SIZES)
    return rows


def kinds(report) -> list[tuple[str, int | None, int | None]]:
    """The report's problems as (kind, position, end)."""
    return [(problem.kind, problem.position, problem.end) for problem in report.problems]


async def run(database, signer, **options):
    """Verify with ``signer``'s public half trusted."""
    return await verify(database, verifiers=[signer.verifier()], **options)


async def edit(database, seq: int, **values) -> None:
    """UPDATE one entry of the global log behind the log's back."""
    async with database.engine.begin() as connection:
        await connection.execute(
            update(entries).where(entries.c.log_id == "global", entries.c.seq == seq).values(values)
        )


async def prune_recorded(
    database,
    signer,
    rows: list[dict[str, Any]],
    end: int,
    *,
    details: dict[str, Any] | None = None,
    checkpointed: bool = True,
    kept: frozenset[int] = frozenset(),
) -> uuid.UUID:
    """Prune positions [0, end) but ``kept`` as retention does: segment, pruned rows, prune entry.

    The entry is appended to the log (head moved on) and, when ``checkpointed``,
    a signed checkpoint covers it. ``details`` replaces what the entry records.
    """
    segment_id = uuid.uuid4()
    sha256 = hashlib.sha256(b"segment file").digest()
    gone = [r for r in rows[:end] if r["seq"] not in kept]
    recorded = {
        "log_id": "global",
        "segment_id": str(segment_id),
        "first_seq": 0,
        "last_seq": end - 1,
        "entry_count": len(gone),
        "tree_size": len(rows),
        "archive_sha256": sha256.hex(),
    }
    event = make_entry("global", len(rows), 99) | {
        "action": "audit.prune",
        "details": json.dumps(
            recorded if details is None else recorded | details,
            separators=(",", ":"),
            sort_keys=True,
        ),
    }
    event["leaf_hash"] = entry_leaf_hash([event[name] for name in ENCODED_COLUMNS])
    grown = [*rows, event]
    compact = CompactRange()
    compact.extend(row["leaf_hash"] for row in grown)
    async with database.engine.begin() as connection:
        await connection.execute(insert(entries), event)
        await connection.execute(
            update(logs).values(
                size=compact.size, root_hash=compact.root(), frontier=compact.to_bytes()
            )
        )
        await connection.execute(
            insert(segments).values(
                id=segment_id,
                log_id="global",
                entry_count=len(gone),
                first_seq=0,
                last_seq=end - 1,
                tree_size=len(rows),
                archive_name=f"global/{segment_id}.jsonl",
                archive_sha256=sha256,
                created_at=dt.datetime(2026, 2, 1, tzinfo=dt.UTC),
            )
        )
        await connection.execute(
            insert(pruned),
            [
                {
                    "log_id": "global",
                    "seq": r["seq"],
                    "leaf_hash": r["leaf_hash"],
                    "segment_id": segment_id,
                }
                for r in gone
            ],
        )
        await connection.execute(delete(entries).where(entries.c.seq.in_([r["seq"] for r in gone])))
    if checkpointed:
        await add_checkpoints(database, signer, "global", grown, [len(grown)])
    return segment_id


class TestVerifyIntact:
    async def test_an_intact_log_verifies(self, database, signer, log):
        """No problems; every entry and checkpoint is counted."""
        report = await run(database, signer)
        assert [] == report.problems
        assert (1, SIZE, len(SIZES), True) == (
            report.logs,
            report.entries,
            report.checkpoints,
            report.ok,
        )

    async def test_progress_is_reported(self, database, signer, log):
        """The callback ends at (total, total)."""
        seen: list[tuple[int, int]] = []
        await run(database, signer, progress=lambda done, total: seen.append((done, total)))
        assert (SIZE, SIZE) == seen[-1]

    async def test_only_the_named_log_is_verified(self, database, signer, log):
        """log_id limits verification to one log; another, broken, is not looked at."""
        await build_log(database, "system", 5, seed=1)
        async with database.engine.begin() as connection:
            await connection.execute(delete(logs).where(logs.c.log_id == "system"))
        assert (True, 1) == ((r := await run(database, signer, log_id="global")).ok, r.logs)
        assert ["head_mismatch"] == [p.kind for p in (await run(database, signer)).problems]

    async def test_pruned_positions_use_their_kept_leaf(self, database, signer, log):
        """Entries pruned with a segment and a signed audit.prune record keep the tree whole."""
        await prune_recorded(database, signer, log, 20)
        assert [] == (await run(database, signer, origin_prefix="bastion")).problems


class TestPrunedMustBeRecorded:
    async def test_a_pruned_row_alone_does_not_hide_a_deletion(self, database, signer, log):
        """A pruned row with its true leaf but no segment and no prune entry is missing."""
        async with database.engine.begin() as connection:
            await connection.execute(
                insert(pruned).values(
                    log_id="global", seq=10, leaf_hash=log[10]["leaf_hash"], segment_id=uuid.uuid4()
                )
            )
            await connection.execute(delete(entries).where(entries.c.seq == 10))
        found = kinds(await run(database, signer))
        assert ("missing", 10, 11) in found
        assert ("root_mismatch", 10, 100) in found

    async def test_a_prune_entry_no_checkpoint_covers_is_not_trusted(self, database, signer, log):
        """The audit.prune entry counts only once a signed checkpoint includes it."""
        await prune_recorded(database, signer, log, 20, checkpointed=False)
        assert ("missing", 0, 20) in kinds(await run(database, signer))

    @pytest.mark.parametrize(
        "details",
        [
            {"last_seq": 9},
            {"log_id": "system"},
            {"archive_sha256": "00" * 32},
            {"segment_id": str(uuid.UUID(int=7))},
            {"entry_count": "20"},
        ],
    )
    async def test_the_prune_entry_must_name_the_segment(self, database, signer, log, details):
        """A prune entry whose segment, log, range or hash differs from the row proves nothing."""
        await prune_recorded(database, signer, log, 20, details=details)
        assert ("missing", 0, 20) in kinds(await run(database, signer))

    async def test_a_kept_entry_deleted_under_a_segment_is_missing(self, database, signer, log):
        """An entry the segment's range skipped, deleted and claimed for it, is not hidden."""
        segment_id = await prune_recorded(database, signer, log, 20, kept=frozenset({12}))
        assert [] == kinds(await run(database, signer))
        async with database.engine.begin() as connection:
            await connection.execute(
                insert(pruned).values(
                    log_id="global", seq=12, leaf_hash=log[12]["leaf_hash"], segment_id=segment_id
                )
            )
            await connection.execute(delete(entries).where(entries.c.seq == 12))
        assert ("missing", 0, 20) in kinds(await run(database, signer))

    async def test_positions_outside_the_segment_are_missing(self, database, signer, log):
        """A pruned row claiming a segment outside its range is missing, and so is the segment."""
        segment_id = await prune_recorded(database, signer, log, 20)
        async with database.engine.begin() as connection:
            await connection.execute(
                insert(pruned).values(
                    log_id="global", seq=30, leaf_hash=log[30]["leaf_hash"], segment_id=segment_id
                )
            )
            await connection.execute(delete(entries).where(entries.c.seq == 30))
        found = kinds(await run(database, signer))
        assert {("missing", 0, 20), ("missing", 30, 31)} <= set(found)


class TestFarPositions:
    async def test_a_pruned_row_far_away_is_unexpected_and_quick(self, database, signer, log):
        """A pruned row at 10**15 is reported, not walked to."""
        async with database.engine.begin() as connection:
            await connection.execute(
                insert(pruned).values(
                    log_id="global", seq=10**15, leaf_hash=bytes(32), segment_id=uuid.uuid4()
                )
            )
        report = await asyncio.wait_for(run(database, signer), 30)
        assert [("unexpected", 10**15, 10**15 + 1)] == kinds(report)

    async def test_an_entry_far_away_without_a_head_is_unexpected(self, database, signer, log):
        """With the head row gone, the log's own rows bound it: a far entry is reported."""
        async with database.engine.begin() as connection:
            await connection.execute(delete(logs))
            await connection.execute(insert(entries), make_entry("global", 10**15, 3))
        found = kinds(await asyncio.wait_for(run(database, signer), 30))
        assert ("unexpected", 10**15, 10**15 + 1) in found

    async def test_a_head_claiming_a_huge_size_is_quick(self, database, signer, log):
        """A head row of size 10**15 gives one missing range, at once."""
        async with database.engine.begin() as connection:
            await connection.execute(update(logs).values(size=10**15))
        found = kinds(await asyncio.wait_for(run(database, signer), 30))
        assert ("missing", SIZE, 10**15) in found

    async def test_long_gaps_are_hashed_as_placeholders(self, database, signer):
        """A gap hashes like that many zero leaves, so the next checkpoint is compared."""
        rows = await build_log(database, "global", 40)
        async with database.engine.begin() as connection:
            await connection.execute(delete(entries).where(entries.c.seq.between(3, 36)))
        placeholder = [*(r["leaf_hash"] for r in rows[:3]), *[bytes(32)] * 34]
        placeholder += [r["leaf_hash"] for r in rows[37:]]
        await add_checkpoints(
            database,
            signer,
            "global",
            [{"leaf_hash": leaf} for leaf in placeholder],
            [20, 40],
        )
        found = kinds(await run(database, signer))
        assert [("missing", 3, 37), ("head_mismatch", 40, 40)] == found


class TestMalformedRows:
    async def test_a_value_of_the_wrong_type_is_malformed(self, database, signer, log):
        """On SQLite a stored value that does not convert is a malformed problem, not a crash."""
        if database.kind.value != "sqlite":
            pytest.skip("PostgreSQL enforces the column types")
        async with database.engine.begin() as connection:
            await connection.execute(
                text("UPDATE bastion_audit_entries SET occurred_at = 'garbage' WHERE seq = 3")
            )
            await connection.execute(
                text("UPDATE bastion_audit_entries SET details = x'00ff' WHERE seq = 4")
            )
            await connection.execute(
                text("UPDATE bastion_audit_entries SET id = 'not a uuid' WHERE seq = 5")
            )
            await connection.execute(
                text("UPDATE bastion_audit_entries SET seq = 'far' WHERE seq = 299")
            )
        found = kinds(await run(database, signer))
        assert [
            ("malformed", None, None),
            ("malformed", 3, None),
            ("malformed", 4, None),
            ("malformed", 5, None),
        ] == [problem for problem in found if problem[0] == "malformed"]
        assert ("root_mismatch", 0, 10) in found

    async def test_null_and_negative_rows_are_reported(self, database, signer, log):
        """PostgreSQL: a NULL the encoding needs and a negative seq are reported, not a crash."""
        if database.kind.value != "postgres":
            pytest.skip("SQLite keeps NOT NULL; its wrong types are the test above")
        async with database.engine.begin() as connection:
            await connection.execute(
                text(
                    "ALTER TABLE bastion_audit_entries "
                    "DROP CONSTRAINT ck_bastion_audit_entries_seq_not_negative, "
                    "ALTER COLUMN occurred_at DROP NOT NULL"
                )
            )
            await connection.execute(
                text("UPDATE bastion_audit_entries SET occurred_at = NULL WHERE seq = 7")
            )
            await connection.execute(insert(entries), make_entry("global", 0, 4) | {"seq": -5})
        await edit(database, 8, action="user.delete")
        found = kinds(await run(database, signer))
        assert {("malformed", 7, None), ("modified", 8, None), ("unexpected", -5, None)} <= set(
            found
        )


class TestOrigin:
    async def test_a_checkpoint_of_another_deployment_is_forged(self, database, signer, log):
        """With the origin prefix, a trusted key's checkpoint for staging/global is rejected."""
        staging = signed_checkpoint(
            signer, "global", 50, root_of([r["leaf_hash"] for r in log[:50]]), origin="staging"
        )
        async with database.engine.begin() as connection:
            await connection.execute(
                insert(checkpoints),
                {
                    "id": uuid.uuid4(),
                    "log_id": "global",
                    "tree_size": 50,
                    "root_hash": staging.root_hash,
                    "created_at": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
                    "key_name": signer.name,
                    "note": staging.note,
                },
            )
        assert [] == kinds(await run(database, signer))
        assert [("checkpoint_forged", 50, None)] == kinds(
            await run(database, signer, origin_prefix="bastion")
        )


class TestVerifyFindsTampering:
    async def test_an_edited_field_is_modified_at_its_position(self, database, signer, log):
        """Changing a column without its leaf hash names the exact position."""
        await edit(database, 150, action="auth.logout")
        report = await run(database, signer)
        assert ("modified", 150, None) in kinds(report)
        assert ("root_mismatch", 100, 256) in kinds(report)

    async def test_a_recomputed_leaf_is_caught_by_the_checkpoints(self, database, signer, log):
        """With leaf_hash recomputed, the first checkpoint after the edit bounds its position."""
        row = dict(log[42], outcome="success" if log[42]["outcome"] != "success" else "denied")
        await edit(
            database,
            42,
            outcome=row["outcome"],
            leaf_hash=entry_leaf_hash([row[name] for name in ENCODED_COLUMNS]),
        )
        report = await run(database, signer)
        assert not report.ok
        assert ("root_mismatch", 10, 100) in kinds(report)
        assert all(p.kind != "modified" for p in report.problems)

    async def test_a_deleted_entry_is_missing(self, database, signer, log):
        """A gap in seq is reported at the gap."""
        async with database.engine.begin() as connection:
            await connection.execute(delete(entries).where(entries.c.seq == 77))
        assert ("missing", 77, 78) in kinds(await run(database, signer))

    async def test_a_truncated_tail_is_missing(self, database, signer, log):
        """Entries cut from the end are missing up to the head."""
        async with database.engine.begin() as connection:
            await connection.execute(delete(entries).where(entries.c.seq >= 280))
        assert ("missing", 280, 300) in kinds(await run(database, signer))

    async def test_an_entry_past_the_head_is_unexpected(self, database, signer, log):
        """An entry appended behind the writer's back lies beyond the head."""
        async with database.engine.begin() as connection:
            await connection.execute(insert(entries), make_entry("global", 300, 9))
        assert [("unexpected", 300, 301)] == kinds(await run(database, signer))

    async def test_swapped_entries_are_reordered(self, database, signer, log):
        """Two entries swapping contents (leaf hashes left in place) are told as reordered."""
        first, second = log[5], log[6]
        contents = [name for name in ENCODED_COLUMNS if name not in {"log_id", "seq"}]
        await edit(database, 5, id=uuid.uuid4())
        await edit(database, 6, **{name: first[name] for name in contents})
        await edit(database, 5, **{name: second[name] for name in contents})
        found = kinds(await run(database, signer))
        assert {("reordered", 5, None), ("reordered", 6, None)} <= set(found)
        assert "modified" not in {kind for kind, _, _ in found}

    async def test_a_rewritten_head_is_a_head_mismatch(self, database, signer, log):
        """The head row's root must be the rebuilt tree's."""
        async with database.engine.begin() as connection:
            await connection.execute(update(logs).values(root_hash=bytes(32)))
        assert [("head_mismatch", 300, 300)] == kinds(await run(database, signer))

    async def test_an_untrusted_checkpoint_is_forged(self, database, signer, log):
        """A checkpoint signed by another key is reported at its size and not used."""
        other = NoteSigner.generate("bastion")
        await add_checkpoints(database, other, "global", log, [50])
        assert [("checkpoint_forged", 50, None)] == kinds(await run(database, signer))


class TestCheckpointTimes:
    async def test_a_larger_tree_signed_earlier_is_reported(self, database, signer):
        """A checkpoint signed well before a smaller tree's means the key signed out of order."""
        rows = await build_log(database, "global", 100)
        noon = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
        await add_checkpoints(
            database,
            signer,
            "global",
            rows,
            [10, 50, 100],
            times=[noon, noon + dt.timedelta(hours=1), noon - dt.timedelta(days=1)],
        )
        assert [("checkpoint_time", 100, None)] == kinds(await run(database, signer))

    async def test_a_small_clock_step_back_is_tolerated(self, database, signer):
        """A signer whose clock stepped back a minute is not reported."""
        rows = await build_log(database, "global", 100)
        noon = dt.datetime(2026, 6, 1, 12, tzinfo=dt.UTC)
        await add_checkpoints(
            database,
            signer,
            "global",
            rows,
            [50, 100],
            times=[noon, noon - dt.timedelta(minutes=1)],
        )
        assert [] == kinds(await run(database, signer))

    async def test_a_checkpoint_signed_in_the_future_is_reported(self, database, signer):
        """A signed time a day ahead of the verifier's clock is reported at its size."""
        rows = await build_log(database, "global", 100)
        tomorrow = dt.datetime.now(dt.UTC).replace(microsecond=0) + dt.timedelta(days=1)
        await add_checkpoints(database, signer, "global", rows, [100], times=[tomorrow])
        assert [("checkpoint_time", 100, None)] == kinds(await run(database, signer))


class TestCheckpointDirectory:
    async def test_exported_checkpoints_must_be_in_the_database(
        self, database, signer, log, tmp_path
    ):
        """A checkpoint file the database lost is checkpoint_missing; an agreeing one is fine."""
        sink = DirectorySink(tmp_path)
        root = root_of([r["leaf_hash"] for r in log[:200]])
        await sink.write(signed_checkpoint(signer, "global", 200, root), "global")
        await sink.write(
            signed_checkpoint(signer, "global", 100, root_of([r["leaf_hash"] for r in log[:100]])),
            "global",
        )
        report = await run(database, signer, checkpoint_directory=tmp_path)
        assert [("checkpoint_missing", 200, None)] == kinds(report)
        assert len(SIZES) + 2 == report.checkpoints

    async def test_a_differing_export_is_a_mismatch(self, database, signer, log, tmp_path):
        """An exported checkpoint at a stored size but with another root is reported."""
        await DirectorySink(tmp_path).write(
            signed_checkpoint(signer, "global", 100, bytes(32)), "global"
        )
        found = kinds(await run(database, signer, checkpoint_directory=tmp_path))
        assert ("checkpoint_mismatch", 100, None) in found
        assert ("root_mismatch", 10, 100) in found

    async def test_a_forged_export_is_reported(self, database, signer, log, tmp_path):
        """A file not signed by a trusted key is checkpoint_forged."""
        other = NoteSigner.generate("bastion")
        await DirectorySink(tmp_path).write(
            signed_checkpoint(other, "global", 100, bytes(32)), "global"
        )
        found = kinds(await run(database, signer, checkpoint_directory=tmp_path))
        assert [("checkpoint_forged", 100, None)] == found


class TestProblem:
    def test_positions_cover_the_range(self):
        """A problem's positions are [position, end), or just position."""
        assert range(3, 7) == Problem("global", "missing", 3, "", 7).positions()
        assert range(3, 4) == Problem("global", "modified", 3, "").positions()
        assert range(0) == Problem("global", "head_mismatch", None, "").positions()


class TestPostgresEncoding:
    async def test_the_server_encoding_is_encode_entry(self, database):
        """PostgreSQL's encoding of edge values (NULLs, Unicode, empty, pre-1970) is byte-exact."""
        if database.kind.value != "postgres":
            pytest.skip("the server-side encoding is PostgreSQL's")
        edge = make_entry("tenant/x", 1, 5) | {
            "occurred_at": dt.datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=dt.UTC),
            "actor_id": "Zoë ✓ 🙂",
            "tenant_id": None,
            "resource_type": "",
            "resource_id": None,
            "email": b"",
            "ip": None,
            "user_agent": b"\x00\xff",
            "details": '{"a":"\\u00e9"}',
        }
        rows = [make_entry("tenant/x", 0, 4), edge]
        async with database.engine.begin() as connection:
            await connection.execute(insert(entries), rows)
            found = (
                (await connection.execute(select(_POSTGRES_ENCODING).order_by(entries.c.seq)))
                .scalars()
                .all()
            )
        assert [encode_entry([row[name] for name in ENCODED_COLUMNS]) for row in rows] == found

    async def test_chunks_and_far_gaps(self, database, signer, monkeypatch):
        """Small chunks: every chunk boundary, and a gap wider than a chunk, are handled."""
        monkeypatch.setattr("bastion.audit._verify._CHUNK", 8)
        rows = await build_log(database, "global", 60)
        await add_checkpoints(database, signer, "global", rows, [60])
        async with database.engine.begin() as connection:
            await connection.execute(delete(entries).where(entries.c.seq.between(20, 45)))
        found = kinds(await run(database, signer))
        assert ("missing", 20, 46) in found
        assert ("root_mismatch", 0, 60) in found
