"""Merkle proofs: which subtrees an RFC 9162 proof is made of, and how a verifier checks one.

Proof *generation* is split in two. The functions here name the leaf ranges
``[start, end)`` whose Merkle tree hashes (MTH) make up a proof, in proof order;
a reader (an in-memory list, or the database tiles of ``_tree``) then hashes
each range. Verification follows RFC 9162 sections 2.1.3.2 and 2.1.4.2 step by
step, with every check the algorithm implies: index below size, exact proof
length, sizes in order, equal roots for equal sizes. Nothing here does I/O.
"""

from __future__ import annotations

import hmac
from collections.abc import Sequence

from bastion.audit._merkle import EMPTY_ROOT, HASH_SIZE, hash_children, root_of

__all__ = [
    "ProofError",
    "consistency_proof_ranges",
    "inclusion_proof_ranges",
    "perfect_subtrees",
    "range_hash",
    "verify_consistency",
    "verify_inclusion",
]


class ProofError(ValueError):
    """A Merkle proof does not prove what it claims; the message says which check failed."""


def _split(size: int) -> int:
    """The largest power of two strictly below ``size`` (RFC 6962's ``k``); ``size`` >= 2."""
    return 1 << ((size - 1).bit_length() - 1)


def inclusion_proof_ranges(index: int, size: int) -> list[tuple[int, int]]:
    """Return the leaf ranges whose hashes form the inclusion proof of leaf ``index``.

    This is ``PATH(index, D[0:size])`` of RFC 9162 section 2.1.3.1, each element
    given as the ``[start, end)`` range it is the MTH of, nearest the leaf first.

    Args:
        index: the leaf's position.
        size: leaves in the tree.

    Returns:
        One range per proof hash; empty for a tree of one leaf.

    Raises:
        ValueError: unless ``0 <= index < size``.

    Example:
        >>> inclusion_proof_ranges(5, 8)
        [(4, 5), (6, 8), (0, 4)]
    """
    if not 0 <= index < size:
        raise ValueError(f"leaf index {index} is outside a tree of {size} leaves")
    ranges: list[tuple[int, int]] = []
    start, end = 0, size
    while end - start > 1:
        middle = start + _split(end - start)
        if index < middle:
            ranges.append((middle, end))
            end = middle
        else:
            ranges.append((start, middle))
            start = middle
    ranges.reverse()
    return ranges


def consistency_proof_ranges(first: int, second: int) -> list[tuple[int, int]]:
    """Return the leaf ranges whose hashes form the consistency proof from ``first`` to ``second``.

    This is ``PROOF(first, D[0:second])`` of RFC 9162 section 2.1.4.1 (its
    ``SUBPROOF`` unrolled), each element given as its ``[start, end)`` range.

    Args:
        first: the older tree's size.
        second: the newer tree's size.

    Returns:
        One range per proof hash, in proof order; empty when the sizes are equal.

    Raises:
        ValueError: unless ``0 < first <= second``.

    Example:
        >>> consistency_proof_ranges(6, 8)
        [(4, 6), (6, 8), (0, 4)]
    """
    if not 0 < first <= second:
        raise ValueError(f"no consistency proof from size {first} to size {second}")
    head: list[tuple[int, int]] = []
    tail: list[tuple[int, int]] = []
    start, end, remaining, whole = 0, second, first, True
    while True:
        if remaining == end - start:
            # The old tree's own root is left out while it is the whole of it:
            # the verifier already holds it.
            if not whole:
                head.append((start, end))
            break
        middle = start + _split(end - start)
        if remaining <= middle - start:
            tail.append((middle, end))
            end = middle
        else:
            tail.append((start, middle))
            remaining -= middle - start
            start = middle
            whole = False
    tail.reverse()
    return head + tail


def perfect_subtrees(start: int, end: int) -> list[tuple[int, int]]:
    """Split ``[start, end)`` into the aligned perfect subtrees its MTH is built from.

    ``MTH(D[start:end])`` splits at the largest power of two below its length,
    so it is the fold from the right, with ``hash_children``, of the perfect
    subtrees whose sizes are the binary digits of ``end - start``, largest
    first. Those subtrees are *aligned* (a subtree of ``2**h`` leaves starts at
    a multiple of ``2**h``, as tiles do) exactly when ``start`` is a multiple of
    the largest power of two not above ``end - start``. Every range that
    :func:`inclusion_proof_ranges` and :func:`consistency_proof_ranges` return
    qualifies, and so does ``[0, n)`` for any ``n``; other ranges are refused.

    Args:
        start: the first leaf.
        end: one past the last leaf.

    Returns:
        ``[start, end)`` ranges of power-of-two lengths, left to right.

    Raises:
        ValueError: the range is empty, or its subtrees would not be aligned.

    Example:
        >>> perfect_subtrees(8, 14)
        [(8, 12), (12, 14)]
    """
    length = end - start
    if start < 0 or length <= 0:
        raise ValueError(f"[{start}, {end}) is not a non-empty range of leaves")
    largest = 1 << (length.bit_length() - 1)
    if start % largest:
        raise ValueError(
            f"[{start}, {end}) does not start at a multiple of {largest}: "
            "its subtrees would be unaligned"
        )
    subtrees: list[tuple[int, int]] = []
    for bit in range(length.bit_length() - 1, -1, -1):
        if length >> bit & 1:
            subtrees.append((start, start + (1 << bit)))
            start += 1 << bit
    return subtrees


def range_hash(leaves: Sequence[bytes]) -> bytes:
    """Return ``MTH`` of the leaf hashes ``leaves`` (:data:`EMPTY_ROOT` for none)."""
    return root_of(leaves)


def _check_hash(value: bytes, what: str) -> None:
    if len(value) != HASH_SIZE:
        raise ProofError(f"{what} is {len(value)} bytes, not {HASH_SIZE}")


def _same(left: bytes, right: bytes) -> bool:
    return hmac.compare_digest(left, right)


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> None:
    """Check that ``leaf_hash`` is leaf ``index`` of the tree of ``size`` leaves with ``root``.

    The algorithm of RFC 9162 section 2.1.3.2.

    Args:
        leaf_hash: the leaf's hash (``hash_leaf`` of its encoding).
        index: its claimed position.
        size: the tree's size.
        proof: the inclusion proof, nearest the leaf first.
        root: the tree's root hash, from a checkpoint the caller trusts.

    Raises:
        ProofError: the index is not below the size, the proof has the wrong
            length or a malformed hash, or the computed root differs.
    """
    if not 0 <= index < size:
        raise ProofError(f"leaf index {index} is outside a tree of {size} leaves")
    _check_hash(leaf_hash, "the leaf hash")
    _check_hash(root, "the root hash")
    expected = len(inclusion_proof_ranges(index, size))
    if len(proof) != expected:
        raise ProofError(
            f"an inclusion proof in a tree of {size} leaves has {expected} hashes, not {len(proof)}"
        )
    node, last = index, size - 1
    computed = leaf_hash
    for position, sibling in enumerate(proof):
        _check_hash(sibling, f"proof hash {position}")
        if node & 1 or node == last:
            computed = hash_children(sibling, computed)
            # A right-edge node with no sibling at this level moves up unchanged.
            while not node & 1 and node:
                node >>= 1
                last >>= 1
        else:
            computed = hash_children(computed, sibling)
        node >>= 1
        last >>= 1
    if last != 0 or not _same(computed, root):
        raise ProofError("the inclusion proof does not lead to the root")


def verify_consistency(
    first: int, second: int, first_root: bytes, second_root: bytes, proof: Sequence[bytes]
) -> None:
    """Check that the tree of ``second`` leaves extends the tree of ``first`` leaves.

    The algorithm of RFC 9162 section 2.1.4.2. Equal sizes need an empty proof
    and equal roots. Size 0 (which the RFC leaves out) needs an empty proof and
    the empty tree's root: every tree extends the empty one.

    Args:
        first: the older tree's size.
        second: the newer tree's size.
        first_root: the older tree's root hash.
        second_root: the newer tree's root hash.
        proof: the consistency proof.

    Raises:
        ProofError: the sizes are out of order, the proof has the wrong length
            or a malformed hash, or either computed root differs.
    """
    if not 0 <= first <= second:
        raise ProofError(f"no consistency proof from size {first} to size {second}")
    _check_hash(first_root, "the first root hash")
    _check_hash(second_root, "the second root hash")
    if first in (0, second):
        if proof:
            raise ProofError(f"a consistency proof from size {first} to {second} is empty")
        expected_root = EMPTY_ROOT if first == 0 else second_root
        if not _same(first_root, expected_root):
            raise ProofError("the first root differs from the tree it claims to be")
        return
    expected = len(consistency_proof_ranges(first, second))
    if len(proof) != expected:
        raise ProofError(
            f"a consistency proof from size {first} to {second} has {expected} hashes, "
            f"not {len(proof)}"
        )
    for position, value in enumerate(proof):
        _check_hash(value, f"proof hash {position}")
    path = list(proof)
    # A perfect first tree is a node of the second one; its root starts the path.
    if first & (first - 1) == 0:
        path.insert(0, first_root)
    first_computed, second_computed = _consistency_roots(first, second, path)
    if not _same(first_computed, first_root):
        raise ProofError("the consistency proof does not lead to the first root")
    if not _same(second_computed, second_root):
        raise ProofError("the consistency proof does not lead to the second root")


def _consistency_roots(first: int, second: int, path: Sequence[bytes]) -> tuple[bytes, bytes]:
    """Fold ``path`` into both trees' roots (RFC 9162 section 2.1.4.2, steps 3 to 6)."""
    node, last = first - 1, second - 1
    while node & 1:
        node >>= 1
        last >>= 1
    first_computed = second_computed = path[0]
    for value in path[1:]:
        if last == 0:
            raise ProofError("the consistency proof is longer than the tree is high")
        if node & 1 or node == last:
            first_computed = hash_children(value, first_computed)
            second_computed = hash_children(value, second_computed)
            while not node & 1 and node:
                node >>= 1
                last >>= 1
        else:
            second_computed = hash_children(second_computed, value)
        node >>= 1
        last >>= 1
    if last != 0:
        raise ProofError("the consistency proof is shorter than the tree is high")
    return first_computed, second_computed
