"""The Merkle tree hashing of RFC 6962 (and RFC 9162): leaves, nodes and the compact range.

A leaf's hash is ``SHA-256(0x00 || data)``, an inner node's
``SHA-256(0x01 || left || right)``; the tree over ``n`` leaves splits at the
largest power of two below ``n``. :class:`CompactRange` is the right edge of a
tree: the roots of the perfect subtrees that the binary digits of its size
name, largest first. It is all an appender needs to fold in new leaves and
compute the new root, and it is what the log's head row stores.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Final

__all__ = [
    "EMPTY_ROOT",
    "HASH_SIZE",
    "TILE_LEVELS",
    "CompactRange",
    "CompletedNode",
    "hash_children",
    "hash_leaf",
    "root_of",
]

HASH_SIZE: Final = 32
EMPTY_ROOT: Final = hashlib.sha256(b"").digest()
"""The root of the empty tree: SHA-256 of nothing (RFC 6962 section 2.1)."""
TILE_LEVELS: Final = 8
"""Levels between stored subtree hashes: completed nodes whose level is a multiple are kept (tiles
of 256 leaves)."""

_LEAF_PREFIX: Final = b"\x00"
_NODE_PREFIX: Final = b"\x01"
_sha256 = hashlib.sha256


def hash_leaf(data: bytes) -> bytes:
    """Return the RFC 6962 hash of a leaf whose encoding is ``data``."""
    return _sha256(_LEAF_PREFIX + data).digest()


def hash_children(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 hash of an inner node from its children's hashes."""
    return _sha256(_NODE_PREFIX + left + right).digest()


@dataclass(frozen=True, slots=True)
class CompletedNode:
    """A perfect subtree an append completed: ``2**level`` leaves from ``index * 2**level``."""

    level: int
    index: int
    hash: bytes


@dataclass(slots=True)
class CompactRange:
    """The right edge of a Merkle tree: enough to append leaves and compute the root.

    Attributes:
        size: leaves in the tree.
        hashes: roots of the perfect subtrees that make up ``[0, size)``, largest
            (leftmost) first; one per set bit of ``size``.
    """

    size: int = 0
    hashes: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.size < 0 or self.size.bit_count() != len(self.hashes):
            raise ValueError("a compact range holds one hash per set bit of its size")
        if any(len(value) != HASH_SIZE for value in self.hashes):
            raise ValueError(f"every hash is {HASH_SIZE} bytes")

    @classmethod
    def from_bytes(cls, size: int, packed: bytes) -> CompactRange:
        """Rebuild a range from :meth:`to_bytes`'s form (the head row's ``frontier``)."""
        if len(packed) % HASH_SIZE:
            raise ValueError(f"a packed compact range is a multiple of {HASH_SIZE} bytes")
        hashes = [packed[at : at + HASH_SIZE] for at in range(0, len(packed), HASH_SIZE)]
        return cls(size, hashes)

    def to_bytes(self) -> bytes:
        """The hashes, concatenated largest first (the size is stored beside them)."""
        return b"".join(self.hashes)

    def copy(self) -> CompactRange:
        """Return an independent copy (appends to it leave this one alone)."""
        return CompactRange(self.size, list(self.hashes))

    def append(self, leaf: bytes) -> list[CompletedNode]:
        """Add the leaf hash ``leaf`` at position ``size``.

        Returns:
            The perfect subtrees of two or more leaves this append completed,
            smallest first (the appender stores some of them as tiles).
        """
        completed: list[CompletedNode] = []
        node = leaf
        index = self.size
        level = 0
        hashes = self.hashes
        # Each trailing set bit of the old size is a subtree of the same height
        # that the new one completes.
        while index & 1:
            node = hash_children(hashes.pop(), node)
            index >>= 1
            level += 1
            completed.append(CompletedNode(level, index, node))
        hashes.append(node)
        self.size += 1
        return completed

    def extend(self, leaves: Iterable[bytes]) -> list[CompletedNode]:
        """Append every leaf hash in order; return the subtrees completed on the way."""
        completed: list[CompletedNode] = []
        for leaf in leaves:
            completed.extend(self.append(leaf))
        return completed

    def root(self) -> bytes:
        """Return the tree's root hash (:data:`EMPTY_ROOT` for an empty tree)."""
        if not self.hashes:
            return EMPTY_ROOT
        hashes = self.hashes
        node = hashes[-1]
        for left in reversed(hashes[:-1]):
            node = hash_children(left, node)
        return node

    def subtree_sizes(self) -> list[int]:
        """Leaves under each hash of :attr:`hashes`, in the same order."""
        size = self.size
        return [1 << bit for bit in range(size.bit_length() - 1, -1, -1) if size >> bit & 1]


def root_of(leaves: Sequence[bytes]) -> bytes:
    """Return the root of the tree over the leaf hashes ``leaves`` (MTH of RFC 6962)."""
    compact = CompactRange()
    for leaf in leaves:
        compact.append(leaf)
    return compact.root()
