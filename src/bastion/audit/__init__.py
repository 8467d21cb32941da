"""Audit trail: an append-only, tamper-evident log with Merkle proofs and signed checkpoints."""

from bastion.audit._build import (
    AuditRuntime,
    CurrentAuditLog,
    audit_log,
    audit_read,
    audit_runtime,
)
from bastion.audit._bundle import (
    BUNDLE_FORMAT,
    entry_from_json,
    entry_to_json,
    proof_bundle,
    verify_bundle,
)
from bastion.audit._catalogue import BASTION_ACTIONS, ActionCatalogue
from bastion.audit._checkpoint import (
    Checkpoint,
    Checkpointer,
    CheckpointError,
    CheckpointRefused,
    CheckpointSink,
    DirectorySink,
    parse_checkpoint,
    signing_keys,
)
from bastion.audit._encoding import ENCODED_COLUMNS, encode_entry, entry_leaf_hash
from bastion.audit._event import Actor, ActorType, AuditEvent, Outcome, Resource
from bastion.audit._guards import GUARD_SQLSTATE, MAINTENANCE_ROLE, check_guards, install_guards
from bastion.audit._listeners import SECURITY_ACTIONS
from bastion.audit._merkle import CompactRange, hash_children, hash_leaf, root_of
from bastion.audit._note import NoteError, NoteSigner, NoteVerifier, generate_signing_key
from bastion.audit._proof import ProofError, verify_consistency, verify_inclusion
from bastion.audit._pseudonym import LoginPseudonyms
from bastion.audit._retention import (
    SEGMENT_FORMAT,
    PruneRefused,
    PruneReport,
    SegmentRecord,
    SegmentReport,
    prune,
    verify_segment,
)
from bastion.audit._routes import AUDIT_READ_PERMISSION, AuditRoutes
from bastion.audit._subjects import SubjectKeys, subject_for_login, subject_for_user
from bastion.audit._tables import audit_metadata
from bastion.audit._tree import TreeIncompleteError, TreeReader
from bastion.audit._verify import Problem, VerifyReport, verify
from bastion.audit._writer import AuditLog, AuditUnavailable

__all__ = [
    "AUDIT_READ_PERMISSION",
    "BASTION_ACTIONS",
    "BUNDLE_FORMAT",
    "ENCODED_COLUMNS",
    "GUARD_SQLSTATE",
    "MAINTENANCE_ROLE",
    "SECURITY_ACTIONS",
    "SEGMENT_FORMAT",
    "ActionCatalogue",
    "Actor",
    "ActorType",
    "AuditEvent",
    "AuditLog",
    "AuditRoutes",
    "AuditRuntime",
    "AuditUnavailable",
    "Checkpoint",
    "CheckpointError",
    "CheckpointRefused",
    "CheckpointSink",
    "Checkpointer",
    "CompactRange",
    "CurrentAuditLog",
    "DirectorySink",
    "LoginPseudonyms",
    "NoteError",
    "NoteSigner",
    "NoteVerifier",
    "Outcome",
    "Problem",
    "ProofError",
    "PruneRefused",
    "PruneReport",
    "Resource",
    "SegmentRecord",
    "SegmentReport",
    "SubjectKeys",
    "TreeIncompleteError",
    "TreeReader",
    "VerifyReport",
    "audit_log",
    "audit_metadata",
    "audit_read",
    "audit_runtime",
    "check_guards",
    "encode_entry",
    "entry_from_json",
    "entry_leaf_hash",
    "entry_to_json",
    "generate_signing_key",
    "hash_children",
    "hash_leaf",
    "install_guards",
    "parse_checkpoint",
    "proof_bundle",
    "prune",
    "root_of",
    "signing_keys",
    "subject_for_login",
    "subject_for_user",
    "verify",
    "verify_bundle",
    "verify_consistency",
    "verify_inclusion",
    "verify_segment",
]
