"""Conformance of the Merkle proofs with the transparency-dev test vectors (RFC 6962 / 9162)."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from bastion.audit._merkle import hash_leaf
from bastion.audit._proof import (
    ProofError,
    consistency_proof_ranges,
    inclusion_proof_ranges,
    range_hash,
    verify_consistency,
    verify_inclusion,
)

# The copy kept in the repository, and the workspace's own directory (where reviewers
# add cases) when there is one: ../shared next to the checkout, or BASTION_MERKLE_VECTORS.
VENDORED = Path(__file__).parent / "vectors" / "merkle"
WORKSPACE = Path(
    os.environ.get(
        "BASTION_MERKLE_VECTORS",
        Path(__file__).resolve().parents[3] / "shared" / "conformance" / "merkle",
    )
)

# The leaves of RFC 6962's reference tree, from which the vectors' proofs come.
RFC6962_LEAVES = [
    bytes.fromhex(value)
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
LEAF_HASHES = [hash_leaf(leaf) for leaf in RFC6962_LEAVES]


def _files(kind: str) -> list[Path]:
    sources = [VENDORED] if WORKSPACE.resolve() == VENDORED.resolve() else [VENDORED, WORKSPACE]
    return sorted(path for source in sources for path in source.glob(f"{kind}/*/*.json"))


def _decode(values: list[str] | None) -> list[bytes]:
    return [base64.b64decode(value) for value in values or []]


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _id(path: Path) -> str:
    source = "repo" if path.is_relative_to(VENDORED) else "workspace"
    return f"{source}/{path.parent.name}/{path.stem}"


class TestVectorsPresent:
    def test_vendored_vectors_are_there(self):
        """The repository's copy holds every inclusion and consistency case."""
        assert (49, 43) == (
            len(list(VENDORED.glob("inclusion/*/*.json"))),
            len(list(VENDORED.glob("consistency/*/*.json"))),
        )


class TestInclusionVectors:
    @pytest.mark.parametrize("path", _files("inclusion"), ids=_id)
    def test_vector(self, path):
        """A valid vector verifies and every wantErr vector is rejected."""
        vector = _load(path)
        arguments = (
            base64.b64decode(vector["leafHash"]),
            vector["leafIdx"],
            vector["treeSize"],
            _decode(vector["proof"]),
            base64.b64decode(vector["root"]),
        )
        if vector["wantErr"]:
            with pytest.raises(ProofError):
                verify_inclusion(*arguments)
        else:
            verify_inclusion(*arguments)

    @pytest.mark.parametrize(
        "path", [p for p in _files("inclusion") if p.stem == "happy-path"], ids=_id
    )
    def test_generated_proof_matches_vector(self, path):
        """The proof built from the ranges over RFC 6962's tree equals the vector's proof."""
        vector = _load(path)
        size = vector["treeSize"]
        leaves = LEAF_HASHES[:size]
        ranges = inclusion_proof_ranges(vector["leafIdx"], size)
        assert _decode(vector["proof"]) == [range_hash(leaves[a:b]) for a, b in ranges]
        assert base64.b64decode(vector["root"]) == range_hash(leaves)


class TestConsistencyVectors:
    @pytest.mark.parametrize("path", _files("consistency"), ids=_id)
    def test_vector(self, path):
        """A valid vector verifies and every wantErr vector is rejected."""
        vector = _load(path)
        arguments = (
            vector["size1"],
            vector["size2"],
            base64.b64decode(vector["root1"]),
            base64.b64decode(vector["root2"]),
            _decode(vector["proof"]),
        )
        if vector["wantErr"]:
            with pytest.raises(ProofError):
                verify_consistency(*arguments)
        else:
            verify_consistency(*arguments)

    @pytest.mark.parametrize(
        "path", [p for p in _files("consistency") if p.stem == "happy-path"], ids=_id
    )
    def test_generated_proof_matches_vector(self, path):
        """The proof built from the ranges over RFC 6962's tree equals the vector's proof."""
        vector = _load(path)
        first, second = vector["size1"], vector["size2"]
        leaves = LEAF_HASHES[:second]
        ranges = consistency_proof_ranges(first, second)
        assert _decode(vector["proof"]) == [range_hash(leaves[a:b]) for a, b in ranges]
        assert base64.b64decode(vector["root1"]) == range_hash(leaves[:first])
