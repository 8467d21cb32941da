"""Data: the shared engine and sessions, and bastion's own migration tree."""

from bastion.data._engine import Database
from bastion.data._migrations import MigrationTree, Migrator

__all__ = ["Database", "MigrationTree", "Migrator"]
