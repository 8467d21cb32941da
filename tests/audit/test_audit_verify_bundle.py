"""Proof bundles: made from the database, checked offline with only a verifier key."""

from __future__ import annotations

import copy
import datetime as dt
import json
import uuid

import pytest
from audit_log_support import build_log, make_entry, signed_checkpoint

from bastion.audit._bundle import (
    BUNDLE_FORMAT,
    entry_from_json,
    entry_to_json,
    proof_bundle,
    verify_bundle,
)
from bastion.audit._checkpoint import CheckpointError
from bastion.audit._encoding import ENCODED_COLUMNS, encode_entry
from bastion.audit._merkle import root_of
from bastion.audit._note import NoteSigner
from bastion.audit._proof import ProofError
from bastion.errors import Conflict, NotFound

SIGNER = NoteSigner.generate("bastion")
TRUSTED = [SIGNER.verifier()]


@pytest.fixture
async def made(database):
    """A 300-entry log, a checkpoint at 290 and the bundle of entry 137 against it."""
    rows = await build_log(database, "global", 300)
    checkpoint = signed_checkpoint(
        SIGNER, "global", 290, root_of([row["leaf_hash"] for row in rows[:290]])
    )
    async with database.session() as session:
        bundle = await proof_bundle(session, entry_id=rows[137]["id"], checkpoint=checkpoint)
    return rows, checkpoint, json.loads(json.dumps(bundle))


class TestEntryJson:
    def test_round_trip_is_exact(self):
        """JSON and back gives the same values and the same encoding, to the microsecond."""
        row = make_entry("tenant/x", 5, 3)
        row.update(
            occurred_at=dt.datetime(1969, 12, 31, 23, 59, 59, 999999, tzinfo=dt.UTC),
            actor_id="Zoë ✓",
            tenant_id=None,
            user_agent=b"\x00\xff",
        )
        values = tuple(row[name] for name in ENCODED_COLUMNS)
        text = json.dumps(entry_to_json(values))
        back = entry_from_json(json.loads(text))
        assert values == back
        assert encode_entry(values) == encode_entry(back)
        assert "1969-12-31T23:59:59.999999+00:00" == json.loads(text)["occurred_at"]

    def test_a_mapping_is_accepted(self):
        """A row given by column name converts like one in column order."""
        row = make_entry("global", 0, 1)
        assert entry_to_json([row[name] for name in ENCODED_COLUMNS]) == entry_to_json(row)

    @pytest.mark.parametrize(
        ("change", "message"),
        [
            ({"seq": "1"}, "seq"),
            ({"id": None}, "id is required"),
            ({"email": "%%%"}, "email is malformed"),
            ({"occurred_at": "2026-01-01T00:00:00"}, "no UTC offset"),
            ({"action": 5}, "action is a string"),
        ],
    )
    def test_malformed_entries_are_refused(self, change, message):
        """Wrong types, missing values, bad base64 and naive times raise ValueError."""
        obj = entry_to_json(make_entry("global", 0, 1)) | change
        with pytest.raises(ValueError, match=message):
            entry_from_json(obj)


class TestProofBundle:
    async def test_a_bundle_verifies_offline(self, made):
        """The bundle names its entry, position and size, and verify_bundle accepts it."""
        rows, checkpoint, bundle = made
        assert (BUNDLE_FORMAT, "global", 137, 290) == (
            bundle["format"],
            bundle["log_id"],
            bundle["leaf_index"],
            bundle["tree_size"],
        )
        assert str(rows[137]["id"]) == bundle["entry"]["id"]
        assert checkpoint.size == verify_bundle(bundle, TRUSTED).size

    async def test_an_unknown_entry_is_not_found(self, database, made):
        """No entry with the id: NotFound."""
        _, checkpoint, _ = made
        async with database.session() as session:
            with pytest.raises(NotFound):
                await proof_bundle(session, entry_id=uuid.uuid4(), checkpoint=checkpoint)

    async def test_an_entry_newer_than_the_checkpoint_conflicts(self, database, made):
        """A checkpoint that does not cover the entry: Conflict."""
        rows, checkpoint, _ = made
        async with database.session() as session:
            with pytest.raises(Conflict, match="position 295"):
                await proof_bundle(session, entry_id=rows[295]["id"], checkpoint=checkpoint)


class TestVerifyBundle:
    @pytest.mark.parametrize(
        "tamper",
        [
            lambda b: b["entry"].update(action="auth.logout"),
            lambda b: b["entry"].update(occurred_at="2026-01-01T00:00:00.000001+00:00"),
            lambda b: b.update(leaf_index=136),
            lambda b: b.update(tree_size=291),
            lambda b: b["inclusion_proof"].reverse(),
            lambda b: b["inclusion_proof"].pop(),
            lambda b: b.update(format="other/1"),
            lambda b: b.update(inclusion_proof="AAAA"),
            lambda b: b["entry"].pop("details"),
        ],
        ids=[
            "field",
            "time",
            "index",
            "size",
            "order",
            "short",
            "format",
            "proof-type",
            "missing-column",
        ],
    )
    async def test_any_change_is_a_proof_error(self, made, tamper):
        """A changed entry, position, size or proof fails with ProofError."""
        _, _, bundle = made
        changed = copy.deepcopy(bundle)
        tamper(changed)
        with pytest.raises(ProofError):
            verify_bundle(changed, TRUSTED)

    async def test_an_untrusted_checkpoint_is_refused(self, made):
        """A bundle whose checkpoint no trusted key signed fails with CheckpointError."""
        _, _, bundle = made
        with pytest.raises(CheckpointError):
            verify_bundle(bundle, [NoteSigner.generate("bastion").verifier()])
