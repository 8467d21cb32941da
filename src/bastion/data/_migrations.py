"""Placeholder: the migrations helper replaces this module; the interface is fixed."""

from __future__ import annotations

from dataclasses import dataclass

from bastion.data._engine import Database

BASTION_VERSION_TABLE = "bastion_alembic_version"


@dataclass(frozen=True, slots=True)
class MigrationTree:
    """An Alembic script directory and the version table it records into."""

    name: str
    script_location: str
    version_table: str

    @classmethod
    def bastion(cls) -> MigrationTree:
        """Bastion's own tree."""
        return cls("bastion", "bastion.data:migrations", BASTION_VERSION_TABLE)

    @classmethod
    def from_location(cls, name: str, location: str, version_table: str) -> MigrationTree:
        """A tree given as ``package:directory`` or a filesystem path."""
        return cls(name, location, version_table)


class Migrator:
    """Runs the configured trees (bastion's own first) against one database."""

    def __init__(self, database: Database, trees: list[MigrationTree]) -> None:
        self.database = database
        self.trees = trees

    async def upgrade(self, revision: str = "head") -> None:
        """Upgrade every tree."""
        return

    async def pending(self) -> dict[str, list[str]]:
        """Pending revisions per tree name."""
        return {}
