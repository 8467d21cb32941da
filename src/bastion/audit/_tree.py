"""Reading a log's Merkle tree from the database: range hashes and proofs.

Leaves come from ``bastion_audit_entries.leaf_hash`` (or, once pruned, from
``bastion_audit_pruned``); perfect subtrees at every eighth level come from
``bastion_audit_nodes``. A range's hash is planned first (the RFC 6962 split
down to aligned perfect subtrees, each of those down to the nearest stored
level below it) and then fetched in one query per table per round, so a proof
reads O(256 log n) hashes, never the whole log. A stored tile that is missing
is rebuilt from the level below in another round.

What it reads is not trusted: a proof is only as good as the signed checkpoint
its client checks it against (:func:`bastion.audit._proof.verify_inclusion`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import and_, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bastion.audit._merkle import EMPTY_ROOT, TILE_LEVELS, hash_children
from bastion.audit._proof import consistency_proof_ranges, inclusion_proof_ranges
from bastion.audit._tables import entries, nodes, pruned

__all__ = ["TILE_LEVELS", "TreeIncompleteError", "TreeReader"]


class TreeIncompleteError(LookupError):
    """A leaf the tree needs is neither in the entries nor among the pruned leaves."""


@dataclass(frozen=True, slots=True)
class _Node:
    """The perfect subtree of ``2**level`` leaves starting at leaf ``index * 2**level``."""

    level: int
    index: int


@dataclass(frozen=True, slots=True)
class _Split:
    left: _Plan
    right: _Plan


_Plan = _Node | _Split


def _split_point(size: int) -> int:
    """The largest power of two strictly below ``size`` (RFC 6962's ``k``)."""
    return 1 << ((size - 1).bit_length() - 1)


def _plan(start: int, end: int) -> _Plan:
    """The RFC 6962 shape of ``MTH(D[start:end])`` down to aligned perfect subtrees."""
    size = end - start
    if size & (size - 1) == 0 and start % size == 0:
        level = size.bit_length() - 1
        return _Node(level, start >> level)
    k = _split_point(size)
    return _Split(_plan(start, start + k), _plan(start + k, end))


def _leaves_of(plan: _Plan) -> Iterable[_Node]:
    if isinstance(plan, _Node):
        yield plan
    else:
        yield from _leaves_of(plan.left)
        yield from _leaves_of(plan.right)


def _fold(plan: _Plan, known: dict[_Node, bytes]) -> bytes:
    if isinstance(plan, _Node):
        return known[plan]
    return hash_children(_fold(plan.left, known), _fold(plan.right, known))


class TreeReader:
    """A log's tree as stored: range hashes and RFC 9162 proofs, read in a few queries.

    Args:
        connection: an open session or connection; the reads join its transaction
            (a proof and the checkpoint it is for can then come from one snapshot).
        log_id: the log to read.

    Example:
        >>> async with database.session() as session:  # doctest: +SKIP
        ...     proof = await TreeReader(session, "global").inclusion_proof(41, 1000)
    """

    def __init__(self, connection: AsyncSession | AsyncConnection, log_id: str) -> None:
        self._connection = connection
        self._log_id = log_id

    async def range_hash(self, start: int, end: int) -> bytes:
        """Return ``MTH(D[start:end])``, the RFC 6962 hash of the leaves ``start`` to ``end - 1``.

        Raises:
            ValueError: the range is empty or negative.
            TreeIncompleteError: a leaf of the range is not stored.
        """
        return (await self.range_hashes([(start, end)]))[0]

    async def range_hashes(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Return the hash of each ``[start, end)`` range, fetched together.

        Raises:
            ValueError: a range is empty or negative.
            TreeIncompleteError: a leaf of a range is not stored.
        """
        for start, end in ranges:
            if not 0 <= start < end:
                raise ValueError(f"not a leaf range: [{start}, {end})")
        plans = [_plan(start, end) for start, end in ranges]
        wanted = {node for plan in plans for node in _leaves_of(plan)}
        known = await self._node_hashes(wanted)
        return [_fold(plan, known) for plan in plans]

    async def root(self, size: int) -> bytes:
        """Return the root of the tree's first ``size`` leaves (``EMPTY_ROOT`` for 0)."""
        return EMPTY_ROOT if size == 0 else await self.range_hash(0, size)

    async def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return the RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size`` leaves.

        Raises:
            ValueError: ``index`` is not in ``[0, size)``.
            TreeIncompleteError: a leaf the proof needs is not stored.
        """
        return await self.range_hashes(inclusion_proof_ranges(index, size))

    async def consistency_proof(self, first: int, second: int) -> list[bytes]:
        """Return the RFC 9162 proof that the tree of ``second`` leaves extends that of ``first``.

        Raises:
            ValueError: not ``0 < first <= second``.
            TreeIncompleteError: a leaf the proof needs is not stored.
        """
        return await self.range_hashes(consistency_proof_ranges(first, second))

    async def _node_hashes(self, wanted: set[_Node]) -> dict[_Node, bytes]:
        """Hashes of the perfect subtrees ``wanted``: stored tiles, else rebuilt from below."""
        known: dict[_Node, bytes] = {}
        fetch: dict[int, set[int]] = {}
        for node in wanted:
            # A node at a tile level is read as is; any other from its descendants
            # at the tile level below it (at most 2**7 of them).
            base = node.level - node.level % TILE_LEVELS
            first = node.index << (node.level - base)
            fetch.setdefault(base, set()).update(range(first, first + (1 << (node.level - base))))
        while fetch:
            found = await self._fetch(fetch)
            known.update(found)
            absent = [
                _Node(level, index)
                for level, indices in fetch.items()
                for index in indices
                if _Node(level, index) not in found
            ]
            leaves = [node.index for node in absent if node.level == 0]
            if leaves:
                raise TreeIncompleteError(
                    f"log {self._log_id!r} has no leaf at position {min(leaves)}"
                )
            # A tile the appender did not store is rebuilt from the tile level below.
            fetch = {}
            for node in absent:
                first = node.index << TILE_LEVELS
                fetch.setdefault(node.level - TILE_LEVELS, set()).update(
                    range(first, first + (1 << TILE_LEVELS))
                )
        return {node: self._compose(node, known) for node in wanted}

    @staticmethod
    def _compose(node: _Node, known: dict[_Node, bytes]) -> bytes:
        """Hash ``node`` from the highest known descendants (a perfect subtree folds pairwise)."""
        if node in known:
            return known[node]
        base = node.level - (node.level % TILE_LEVELS or TILE_LEVELS)
        width = node.level - base
        first = node.index << width
        layer = [
            TreeReader._compose(_Node(base, i), known) for i in range(first, first + (1 << width))
        ]
        while len(layer) > 1:
            layer = [hash_children(layer[i], layer[i + 1]) for i in range(0, len(layer), 2)]
        known[node] = layer[0]
        return layer[0]

    async def _fetch(self, wanted: dict[int, set[int]]) -> dict[_Node, bytes]:
        """One query per table for every wanted leaf (level 0) and stored tile."""
        found: dict[_Node, bytes] = {}
        leaves = wanted.get(0)
        if leaves:
            for table in (entries, pruned):
                seq_ranges = _runs(sorted(leaves))
                statement = select(table.c.seq, table.c.leaf_hash).where(
                    table.c.log_id == self._log_id,
                    or_(*(table.c.seq.between(low, high) for low, high in seq_ranges)),
                )
                for seq, leaf in await self._connection.execute(statement):
                    found[_Node(0, seq)] = leaf
        tiles = [(level, _runs(sorted(indices))) for level, indices in wanted.items() if level]
        if tiles:
            statement = select(nodes.c.level, nodes.c.index, nodes.c.hash).where(
                nodes.c.log_id == self._log_id,
                or_(
                    *(
                        and_(nodes.c.level == level, nodes.c.index.between(low, high))
                        for level, runs in tiles
                        for low, high in runs
                    )
                ),
            )
            for row in await self._connection.execute(statement):
                found[_Node(row[0], row[1])] = row[2]
        return found


def _runs(values: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted integers as inclusive ``(low, high)`` runs of consecutive values."""
    runs: list[tuple[int, int]] = []
    for value in values:
        if runs and runs[-1][1] + 1 == value:
            runs[-1] = (runs[-1][0], value)
        else:
            runs.append((value, value))
    return runs
