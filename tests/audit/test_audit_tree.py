"""TreeReader: range hashes and proofs read from the stored leaves and tiles."""

from __future__ import annotations

import hashlib
import uuid

import pytest
from audit_log_support import build_log
from sqlalchemy import insert

from bastion.audit._merkle import EMPTY_ROOT, hash_children
from bastion.audit._proof import range_hash, verify_consistency, verify_inclusion
from bastion.audit._tables import nodes, pruned
from bastion.audit._tree import TreeIncompleteError, TreeReader

SIZES = [1, 2, 3, 5, 8, 255, 256, 257, 511, 513, 700]


@pytest.fixture
async def log(database):
    """A 700-entry log with its tiles, and its leaf hashes in order."""
    rows = await build_log(database, "global", 700)
    return [row["leaf_hash"] for row in rows]


class TestRangeHash:
    async def test_every_range_matches_the_in_memory_tree(self, database, log):
        """MTH of stored ranges equals the in-memory RFC 6962 hash, across tile edges."""
        ranges = [(0, size) for size in SIZES] + [(256, 512), (300, 301), (256, 700), (0, 0 + 1)]
        async with database.engine.connect() as connection:
            reader = TreeReader(connection, "global")
            actual = await reader.range_hashes(ranges)
            assert EMPTY_ROOT == await reader.root(0)
        assert [range_hash(log[start:end]) for start, end in ranges] == actual

    async def test_missing_tiles_are_rebuilt_from_leaves(self, database):
        """Without any stored tile the hashes are still right (rebuilt from the leaves)."""
        rows = await build_log(database, "global", 600, tiles=False)
        async with database.engine.connect() as connection:
            actual = await TreeReader(connection, "global").range_hash(0, 600)
        assert range_hash([row["leaf_hash"] for row in rows]) == actual

    async def test_tiles_are_trusted_over_leaves(self, database, log):
        """A stored level-8 tile is used as is: a proof reads it instead of its 256 leaves."""
        fake = hashlib.sha256(b"tile").digest()
        async with database.engine.begin() as connection:
            await connection.execute(nodes.delete().where(nodes.c.level == 8, nodes.c.index == 1))
            await connection.execute(
                insert(nodes), {"log_id": "global", "level": 8, "index": 1, "hash": fake}
            )
            actual = await TreeReader(connection, "global").range_hash(0, 512)
        assert hash_children(range_hash(log[:256]), fake) == actual

    async def test_level_16_tiles_are_read(self, database):
        """Ranges above 65536 leaves use the level-16 tiles, then level 8, then leaves."""
        top = [hashlib.sha256(bytes([i])).digest() for i in range(3)]
        async with database.engine.begin() as connection:
            await connection.execute(
                insert(nodes),
                [
                    {"log_id": "big", "level": 16, "index": 0, "hash": top[0]},
                    {"log_id": "big", "level": 16, "index": 1, "hash": top[1]},
                    {"log_id": "big", "level": 8, "index": 512, "hash": top[2]},
                ],
            )
            reader = TreeReader(connection, "big")
            whole = await reader.range_hash(0, 1 << 17)
            ragged = await reader.range_hash(0, (1 << 17) + 256)
        assert hash_children(top[0], top[1]) == whole
        assert hash_children(whole, top[2]) == ragged

    async def test_pruned_leaves_are_read_from_the_pruned_table(self, database, log):
        """A position whose entry was pruned uses the leaf hash kept in bastion_audit_pruned."""
        async with database.engine.begin() as connection:
            await connection.execute(nodes.delete().where(nodes.c.log_id == "global"))
            await connection.exec_driver_sql("DELETE FROM bastion_audit_entries WHERE seq < 10")
            await connection.execute(
                insert(pruned),
                [
                    {"log_id": "global", "seq": seq, "leaf_hash": log[seq], "segment_id": _SEGMENT}
                    for seq in range(10)
                ],
            )
            actual = await TreeReader(connection, "global").range_hash(0, 300)
        assert range_hash(log[:300]) == actual

    async def test_a_missing_leaf_is_an_error(self, database, log):
        """A leaf that is neither stored nor pruned raises TreeIncompleteError naming it."""
        async with database.engine.connect() as connection:
            with pytest.raises(TreeIncompleteError, match="position 700"):
                await TreeReader(connection, "global").range_hash(0, 701)

    async def test_an_empty_range_is_refused(self, database, log):
        """[5, 5) has no hash."""
        async with database.engine.connect() as connection:
            with pytest.raises(ValueError, match="not a leaf range"):
                await TreeReader(connection, "global").range_hash(5, 5)


class TestProofs:
    async def test_inclusion_proofs_verify(self, database, log):
        """Inclusion proofs of leaves across the tree verify against the in-memory root."""
        async with database.engine.connect() as connection:
            reader = TreeReader(connection, "global")
            for size in SIZES:
                for index in {0, size // 2, size - 1}:
                    proof = await reader.inclusion_proof(index, size)
                    verify_inclusion(log[index], index, size, proof, range_hash(log[:size]))

    async def test_consistency_proofs_verify(self, database, log):
        """Consistency proofs between sizes verify against both in-memory roots."""
        async with database.engine.connect() as connection:
            reader = TreeReader(connection, "global")
            for first, second in [(1, 700), (255, 257), (256, 512), (300, 700), (700, 700)]:
                proof = await reader.consistency_proof(first, second)
                verify_consistency(
                    first, second, range_hash(log[:first]), range_hash(log[:second]), proof
                )


_SEGMENT = uuid.UUID(int=1)
