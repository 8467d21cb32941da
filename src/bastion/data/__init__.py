"""Data: the shared engine and pool, transactions that retry, and migrations."""

from bastion.data._alembic_env import run_alembic_env
from bastion.data._destructive import DestructiveChange, DestructiveChangeRefused
from bastion.data._engine import Database
from bastion.data._errors import MigrationError
from bastion.data._history import HistoryRecord
from bastion.data._lint import LintFinding, lint_tree
from bastion.data._migrations import (
    AppliedRevision,
    MigrationTree,
    Migrator,
    RevisionCheck,
    RevisionInfo,
    TreeStatus,
    VerificationReport,
)
from bastion.data._transaction import (
    RetryPolicy,
    TransactionConflict,
    run_transaction,
    transaction,
    use_database,
)

__all__ = [
    "AppliedRevision",
    "Database",
    "DestructiveChange",
    "DestructiveChangeRefused",
    "HistoryRecord",
    "LintFinding",
    "MigrationError",
    "MigrationTree",
    "Migrator",
    "RetryPolicy",
    "RevisionCheck",
    "RevisionInfo",
    "TransactionConflict",
    "TreeStatus",
    "VerificationReport",
    "lint_tree",
    "run_alembic_env",
    "run_transaction",
    "transaction",
    "use_database",
]
