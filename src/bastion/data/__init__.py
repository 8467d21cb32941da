"""Data: the shared engine and sessions, and the migration trees (bastion's own and the app's)."""

from bastion.data._alembic_env import run_alembic_env
from bastion.data._destructive import DestructiveChange, DestructiveChangeRefused
from bastion.data._engine import Database
from bastion.data._errors import MigrationError
from bastion.data._migrations import (
    AppliedRevision,
    MigrationTree,
    Migrator,
    RevisionInfo,
    TreeStatus,
)

__all__ = [
    "AppliedRevision",
    "Database",
    "DestructiveChange",
    "DestructiveChangeRefused",
    "MigrationError",
    "MigrationTree",
    "Migrator",
    "RevisionInfo",
    "TreeStatus",
    "run_alembic_env",
]
