"""Proof bundles: one entry, its inclusion proof and a signed checkpoint, checkable offline.

A bundle is a JSON object anyone holding the log's verifier key can check
without the database or bastion's code beyond this module: re-encode the
entry, hash it as a leaf, walk the inclusion proof to a root, and check that
the checkpoint, signed by a trusted key, commits to that root at that size::

    {
      "format": "bastion-audit-proof/1",
      "entry": {"log_id": "global", "seq": 41, "id": "…", "occurred_at": "…+00:00", …},
      "log_id": "global",
      "leaf_index": 41,
      "tree_size": 1000,
      "inclusion_proof": ["<base64 hash>", …],
      "checkpoint": "<the signed note>"
    }

Entry values are JSON-typed as :func:`entry_to_json` says; the conversion round
trips exactly, so the leaf hash of the JSON is the leaf hash of the row.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from bastion.audit._checkpoint import Checkpoint, CheckpointError, parse_checkpoint
from bastion.audit._encoding import ENCODED_COLUMNS, entry_leaf_hash
from bastion.audit._note import NoteVerifier
from bastion.audit._proof import ProofError, verify_inclusion
from bastion.audit._tables import entries
from bastion.audit._tree import TreeReader
from bastion.errors import Conflict, NotFound

__all__ = [
    "BUNDLE_FORMAT",
    "entry_from_json",
    "entry_to_json",
    "proof_bundle",
    "verify_bundle",
]

BUNDLE_FORMAT: Final = "bastion-audit-proof/1"
"""The ``format`` member of every bundle; a new layout gets a new version."""

_UUID_COLUMNS: Final = frozenset({"id", "tenant_id"})
_BYTES_COLUMNS: Final = frozenset({"email", "ip", "user_agent"})
_REQUIRED: Final = frozenset(
    {"log_id", "seq", "id", "occurred_at", "action", "outcome", "actor_type", "details"}
)


def _json_value(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _UUID_COLUMNS:
        return str(value)
    if name in _BYTES_COLUMNS:
        return base64.b64encode(value).decode()
    if name == "occurred_at":
        return value.astimezone(dt.UTC).isoformat(timespec="microseconds")
    return value


def entry_to_json(row: Sequence[Any] | Mapping[str, Any]) -> dict[str, Any]:
    """Return an entry as JSON-ready values, keyed by column.

    UUIDs become their text, personal fields (ciphertext) base64, ``occurred_at``
    ISO 8601 with microseconds and ``+00:00``; the rest is as stored.

    Args:
        row: the entry as values in :data:`ENCODED_COLUMNS` order, or a mapping by
            column name (a SQLAlchemy row's ``_mapping``).

    Returns:
        One member per column of :data:`ENCODED_COLUMNS`.
    """
    if isinstance(row, Mapping):
        values = [row[name] for name in ENCODED_COLUMNS]
    else:
        values = list(row[: len(ENCODED_COLUMNS)])
    return {
        name: _json_value(name, value) for name, value in zip(ENCODED_COLUMNS, values, strict=True)
    }


def _parse_value(name: str, value: Any) -> Any:
    if value is None:
        if name in _REQUIRED:
            raise ValueError(f"entry.{name} is required")
        return None
    if name == "seq":
        if type(value) is not int or value < 0:
            raise ValueError("entry.seq is a non-negative integer")
        return value
    if not isinstance(value, str):
        raise ValueError(f"entry.{name} is a string")  # noqa: TRY004 -- bad input, one error type
    if name in _UUID_COLUMNS:
        return uuid.UUID(value)
    if name in _BYTES_COLUMNS:
        return base64.b64decode(value, validate=True)
    if name == "occurred_at":
        instant = dt.datetime.fromisoformat(value)
        if instant.tzinfo is None:
            raise ValueError("entry.occurred_at has no UTC offset")
        return instant
    return value


def entry_from_json(obj: Mapping[str, Any]) -> tuple[Any, ...]:
    """Return the entry :func:`entry_to_json` made, as values in :data:`ENCODED_COLUMNS` order.

    Raises:
        ValueError: a column is missing, of the wrong type or malformed.
    """
    if not isinstance(obj, Mapping):
        raise ValueError("the entry is a JSON object")  # noqa: TRY004 -- bad input, one error type
    values: list[Any] = []
    for name in ENCODED_COLUMNS:
        if name not in obj:
            raise ValueError(f"entry.{name} is missing")
        try:
            values.append(_parse_value(name, obj[name]))
        except (binascii.Error, TypeError) as exc:
            raise ValueError(f"entry.{name} is malformed") from exc
    return tuple(values)


async def proof_bundle(
    session: AsyncSession | AsyncConnection, *, entry_id: uuid.UUID, checkpoint: Checkpoint
) -> dict[str, Any]:
    """Return the proof bundle of one entry against a checkpoint of its log.

    Args:
        session: where to read the entry and the tree from.
        entry_id: the entry's id.
        checkpoint: a checkpoint of the entry's log at least as large as its
            position (:meth:`Checkpointer.at_least` makes one when needed).

    Returns:
        The JSON-ready bundle (the module docstring shows its members).

    Raises:
        NotFound: no entry has this id (or it was pruned: its segment file holds its proof).
        Conflict: the checkpoint does not cover the entry (it is newer).
        ValueError: the checkpoint is of another log.
    """
    columns = [entries.c[name] for name in ENCODED_COLUMNS]
    row = (await session.execute(select(*columns).where(entries.c.id == entry_id))).first()
    if row is None:
        raise NotFound("No audit entry has this id.")
    log_id, seq = row.log_id, row.seq
    if not checkpoint.origin.endswith("/" + log_id):
        raise ValueError(f"the checkpoint is of {checkpoint.origin}, not of log {log_id}")
    if seq >= checkpoint.size:
        raise Conflict(
            f"The entry is at position {seq}; the checkpoint covers {checkpoint.size} entries."
        )
    proof = await TreeReader(session, log_id).inclusion_proof(seq, checkpoint.size)
    return {
        "format": BUNDLE_FORMAT,
        "entry": entry_to_json(row),
        "log_id": log_id,
        "leaf_index": seq,
        "tree_size": checkpoint.size,
        "inclusion_proof": [base64.b64encode(value).decode() for value in proof],
        "checkpoint": checkpoint.note,
    }


def _member(bundle: Mapping[str, Any], name: str, kind: type) -> Any:
    value = bundle.get(name)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProofError(f"the bundle's {name!r} is missing or not a {kind.__name__}")
    return value


def verify_bundle(bundle: Mapping[str, Any], verifiers: Sequence[NoteVerifier]) -> Checkpoint:
    """Check a proof bundle offline: the entry is in the log the signed checkpoint commits to.

    Args:
        bundle: the parsed JSON of :func:`proof_bundle`.
        verifiers: the trusted checkpoint keys.

    Returns:
        The checkpoint, once everything checked out.

    Raises:
        ProofError: the bundle is malformed, or its entry, position or proof do
            not lead to the checkpoint's root.
        CheckpointError: the checkpoint is not signed by a trusted key, or is malformed.

    Example:
        >>> verify_bundle(json.loads(text), [NoteVerifier.from_text(key)])  # doctest: +SKIP
    """
    if not isinstance(bundle, Mapping) or bundle.get("format") != BUNDLE_FORMAT:
        raise ProofError(f"not a {BUNDLE_FORMAT} bundle")
    log_id = _member(bundle, "log_id", str)
    index = _member(bundle, "leaf_index", int)
    size = _member(bundle, "tree_size", int)
    note = _member(bundle, "checkpoint", str)
    encoded_proof = _member(bundle, "inclusion_proof", list)
    try:
        entry = entry_from_json(bundle.get("entry"))  # type: ignore[arg-type]  # checked inside
        proof = [base64.b64decode(value, validate=True) for value in encoded_proof]
    except (ValueError, TypeError) as exc:
        raise ProofError(f"malformed bundle: {exc}") from exc
    checkpoint = parse_checkpoint(note, verifiers)
    if entry[0] != log_id or entry[1] != index:
        raise ProofError("the entry's log and position are not the bundle's")
    if not checkpoint.origin.endswith("/" + log_id):
        raise CheckpointError(f"the checkpoint is of {checkpoint.origin}, not of log {log_id}")
    if checkpoint.size != size:
        raise ProofError(
            f"the bundle claims a tree of {size} entries, its checkpoint {checkpoint.size}"
        )
    verify_inclusion(entry_leaf_hash(entry), index, size, proof, checkpoint.root_hash)
    return checkpoint
