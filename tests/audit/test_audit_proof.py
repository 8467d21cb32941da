"""Merkle proof ranges, verification and perfect-subtree splits (RFC 9162)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bastion.audit._merkle import EMPTY_ROOT, hash_children, hash_leaf
from bastion.audit._proof import (
    ProofError,
    consistency_proof_ranges,
    inclusion_proof_ranges,
    perfect_subtrees,
    range_hash,
    verify_consistency,
    verify_inclusion,
)

RFC6962_LEAVES = [
    hash_leaf(bytes.fromhex(value))
    for value in (
        "",
        "00",
        "10",
        "2021",
        "3031",
        "40414243",
        "5051525354555657",
        "606162636465666768696a6b6c6d6e6f",
    )
]
# Roots of the first n leaves, from certificate-transparency's merkle_tree_test.
RFC6962_ROOTS = [
    "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d",
    "fac54203e7cc696cf0dfcb42c92a1d9dbaf70ad9e621f4bd8d98662f00e3c125",
    "aeb6bcfe274b70a14fb067a5e5578264db0fa9b51af5e0ba159158f329e06e77",
    "d37ee418976dd95753c1c73862b9398fa2a2cf9b4ff0fdfe8b30cd95209614b7",
    "4e3bbb1f7b478dcfe71fb631631519a3bca12c9aefca1612bfce4c13a86264d4",
    "76e67dadbcdf1e10e1b74ddc608abd2f98dfb16fbce75277b5232a127f2087ef",
    "ddb89be403809e325750d3d263cd78929c2942b7942a34b77e122c9594a74c8c",
    "5dc9da79a70659a9ad559cb701ded9a2ab9d823aad2f4960cfe370eff4604328",
]
MAX_SIZE = 300
LEAVES = [hash_leaf(index.to_bytes(4, "big")) for index in range(MAX_SIZE)]


def _inclusion(index: int, size: int) -> list[bytes]:
    return [range_hash(LEAVES[a:b]) for a, b in inclusion_proof_ranges(index, size)]


def _consistency(first: int, second: int) -> list[bytes]:
    return [range_hash(LEAVES[a:b]) for a, b in consistency_proof_ranges(first, second)]


def _turns(index: int, size: int) -> list[bool]:
    """Whether each proof hash is a left sibling: all a verifier derives from index and size."""
    return [end <= index for _, end in inclusion_proof_ranges(index, size)]


def _flip(value: bytes, bit: int) -> bytes:
    changed = bytearray(value)
    changed[bit // 8] ^= 1 << (bit % 8)
    return bytes(changed)


@st.composite
def leaf_in_tree(draw):
    size = draw(st.integers(1, MAX_SIZE))
    return draw(st.integers(0, size - 1)), size


@st.composite
def two_sizes(draw):
    second = draw(st.integers(1, MAX_SIZE))
    return draw(st.integers(1, second)), second


class TestRangeHash:
    @pytest.mark.parametrize("size", range(1, 9))
    def test_rfc6962_roots(self, size):
        """The roots of RFC 6962's reference tree match certificate-transparency's."""
        assert bytes.fromhex(RFC6962_ROOTS[size - 1]) == range_hash(RFC6962_LEAVES[:size])

    def test_empty(self):
        """The hash of no leaves is the empty tree's root."""
        assert EMPTY_ROOT == range_hash([])


class TestInclusionProofRanges:
    def test_example(self):
        """Leaf 5 of 8 is proven by its sibling, the pair to its right, then the left half."""
        assert [(4, 5), (6, 8), (0, 4)] == inclusion_proof_ranges(5, 8)

    def test_single_leaf(self):
        """A tree of one leaf needs no proof."""
        assert [] == inclusion_proof_ranges(0, 1)

    @pytest.mark.parametrize(("index", "size"), [(-1, 3), (3, 3), (0, 0)])
    def test_out_of_range(self, index, size):
        """An index outside the tree is refused."""
        with pytest.raises(ValueError, match="outside"):
            inclusion_proof_ranges(index, size)


class TestConsistencyProofRanges:
    def test_example(self):
        """From 6 to 8 the proof names [4, 6), [6, 8) and [0, 4)."""
        assert [(4, 6), (6, 8), (0, 4)] == consistency_proof_ranges(6, 8)

    def test_power_of_two_first(self):
        """A perfect first tree is left out: the verifier holds its root."""
        assert [(4, 8)] == consistency_proof_ranges(4, 8)

    def test_equal_sizes(self):
        """Equal sizes need no proof."""
        assert [] == consistency_proof_ranges(5, 5)

    @pytest.mark.parametrize(("first", "second"), [(0, 3), (4, 3), (-1, 2)])
    def test_out_of_order(self, first, second):
        """Sizes outside 0 < first <= second are refused."""
        with pytest.raises(ValueError, match="no consistency proof"):
            consistency_proof_ranges(first, second)


class TestVerifyInclusion:
    @settings(max_examples=300, deadline=None)
    @given(leaf_in_tree())
    def test_generated_proofs_verify(self, case):
        """A proof built from the ranges verifies against the tree's root."""
        index, size = case
        verify_inclusion(
            LEAVES[index], index, size, _inclusion(index, size), range_hash(LEAVES[:size])
        )

    @settings(max_examples=200, deadline=None)
    @given(leaf_in_tree(), st.data())
    def test_any_bit_flip_is_rejected(self, case, data):
        """Flipping one bit of the leaf, a proof hash or the root makes the proof fail."""
        index, size = case
        leaf, proof, root = LEAVES[index], _inclusion(index, size), range_hash(LEAVES[:size])
        target = data.draw(st.integers(0, len(proof) + 1))
        bit = data.draw(st.integers(0, 255))
        if target == 0:
            leaf = _flip(leaf, bit)
        elif target == 1:
            root = _flip(root, bit)
        else:
            proof[target - 2] = _flip(proof[target - 2], bit)
        with pytest.raises(ProofError):
            verify_inclusion(leaf, index, size, proof, root)

    @settings(max_examples=200, deadline=None)
    @given(leaf_in_tree(), st.integers(0, MAX_SIZE))
    def test_wrong_index_is_rejected(self, case, other):
        """The proof of one position does not prove another."""
        index, size = case
        proof, root = _inclusion(index, size), range_hash(LEAVES[:size])
        if other != index:
            with pytest.raises(ProofError):
                verify_inclusion(LEAVES[index], other, size, proof, root)

    @settings(max_examples=200, deadline=None)
    @given(leaf_in_tree(), st.integers(1, MAX_SIZE))
    def test_wrong_size_is_rejected(self, case, other):
        """A size whose proof takes other turns is rejected.

        A size whose proof has the same turns (leaf 0 of 65 and of 66) verifies
        against the same root: a proof binds the size only through the root,
        which is why a checkpoint signs size and root together.
        """
        index, size = case
        proof, root = _inclusion(index, size), range_hash(LEAVES[:size])
        if index < other and _turns(index, other) != _turns(index, size):
            with pytest.raises(ProofError):
                verify_inclusion(LEAVES[index], index, other, proof, root)

    def test_extra_hash_is_rejected(self):
        """A proof with a hash too many is rejected before any hashing."""
        proof = [*_inclusion(2, 5), EMPTY_ROOT]
        with pytest.raises(ProofError, match="has 3 hashes, not 4"):
            verify_inclusion(LEAVES[2], 2, 5, proof, range_hash(LEAVES[:5]))

    def test_short_hash_is_rejected(self):
        """A proof hash that is not 32 bytes is rejected."""
        proof = _inclusion(2, 5)
        proof[0] = proof[0][:31]
        with pytest.raises(ProofError, match="31 bytes"):
            verify_inclusion(LEAVES[2], 2, 5, proof, range_hash(LEAVES[:5]))


class TestVerifyConsistency:
    @settings(max_examples=300, deadline=None)
    @given(two_sizes())
    def test_generated_proofs_verify(self, case):
        """A proof built from the ranges verifies between the two roots."""
        first, second = case
        verify_consistency(
            first,
            second,
            range_hash(LEAVES[:first]),
            range_hash(LEAVES[:second]),
            _consistency(first, second),
        )

    @settings(max_examples=200, deadline=None)
    @given(two_sizes().filter(lambda case: case[0] < case[1]), st.data())
    def test_any_bit_flip_is_rejected(self, case, data):
        """Flipping one bit of either root or any proof hash makes the proof fail."""
        first, second = case
        roots = [range_hash(LEAVES[:first]), range_hash(LEAVES[:second])]
        proof = _consistency(first, second)
        target = data.draw(st.integers(0, len(proof) + 1))
        bit = data.draw(st.integers(0, 255))
        if target < 2:
            roots[target] = _flip(roots[target], bit)
        else:
            proof[target - 2] = _flip(proof[target - 2], bit)
        with pytest.raises(ProofError):
            verify_consistency(first, second, roots[0], roots[1], proof)

    @settings(max_examples=200, deadline=None)
    @given(two_sizes().filter(lambda case: case[0] < case[1]), st.integers(1, MAX_SIZE))
    def test_wrong_first_size_is_rejected(self, case, other):
        """The proof between two sizes does not prove another first size."""
        first, second = case
        roots = range_hash(LEAVES[:first]), range_hash(LEAVES[:second])
        if other != first:
            with pytest.raises(ProofError):
                verify_consistency(other, second, *roots, _consistency(first, second))

    def test_equal_sizes_need_equal_roots(self):
        """Equal sizes verify with an empty proof and equal roots only."""
        root = range_hash(LEAVES[:5])
        verify_consistency(5, 5, root, root, [])
        with pytest.raises(ProofError, match="differs"):
            verify_consistency(5, 5, root, range_hash(LEAVES[:4]), [])
        with pytest.raises(ProofError, match="is empty"):
            verify_consistency(5, 5, root, root, [root])

    def test_empty_first_tree(self):
        """Every tree extends the empty tree, whose root must be the empty root."""
        verify_consistency(0, 5, EMPTY_ROOT, range_hash(LEAVES[:5]), [])
        with pytest.raises(ProofError):
            verify_consistency(0, 5, range_hash(LEAVES[:1]), range_hash(LEAVES[:5]), [])

    def test_shrinking_tree_is_rejected(self):
        """A second size below the first is refused."""
        with pytest.raises(ProofError, match="no consistency proof"):
            verify_consistency(6, 4, range_hash(LEAVES[:6]), range_hash(LEAVES[:4]), [])


class TestPerfectSubtrees:
    def test_example(self):
        """Six leaves from 8 split into four then two."""
        assert [(8, 12), (12, 14)] == perfect_subtrees(8, 14)

    def test_unaligned_is_refused(self):
        """A range whose largest subtree would not start on its own size is refused."""
        with pytest.raises(ValueError, match="unaligned"):
            perfect_subtrees(2, 8)

    def test_empty_is_refused(self):
        """An empty range is refused."""
        with pytest.raises(ValueError, match="non-empty"):
            perfect_subtrees(4, 4)

    @settings(max_examples=200, deadline=None)
    @given(leaf_in_tree(), two_sizes())
    def test_every_proof_range_folds_to_its_hash(self, inclusion, consistency):
        """Every proof range splits into aligned perfect subtrees whose right fold is its hash."""
        ranges = [
            *inclusion_proof_ranges(*inclusion),
            *consistency_proof_ranges(*consistency),
            (0, inclusion[1]),
        ]
        for start, end in ranges:
            subtrees = perfect_subtrees(start, end)
            assert all(a % (b - a) == 0 and (b - a).bit_count() == 1 for a, b in subtrees)
            assert (start, end) == (subtrees[0][0], subtrees[-1][1])
            hashes = [range_hash(LEAVES[a:b]) for a, b in subtrees]
            folded = hashes[-1]
            for left in reversed(hashes[:-1]):
                folded = hash_children(left, folded)
            assert range_hash(LEAVES[start:end]) == folded
