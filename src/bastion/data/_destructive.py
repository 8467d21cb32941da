"""Destructive changes: drops, renames and narrowed types, refused unless consented to.

STUB written by the lead to fix the interface; the destructive-detection work
fills it in. :func:`bastion.data._alembic_runtime.run_online` enters
:meth:`DestructiveGuard.watching` around the whole run on the migrating
connection and calls :meth:`DestructiveGuard.begin_step` as each revision
starts, before any of its operations run.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from bastion.data._errors import MigrationError

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep
    from sqlalchemy.engine import Connection

__all__ = ["DestructiveChange", "DestructiveChangeRefused", "DestructiveGuard"]


@dataclass(frozen=True, slots=True)
class DestructiveChange:
    """One operation of a revision that loses data or breaks readers of the old schema.

    Attributes:
        kind: ``drop_table``, ``drop_column``, ``rename_table``, ``rename_column``,
            ``narrow_type`` (or another kind the detector documents).
        target: what it destroys: ``table`` or ``table.column``.
        detail: one line for people, e.g. ``VARCHAR(200) -> VARCHAR(50)``.
    """

    kind: str
    target: str
    detail: str


class DestructiveChangeRefused(MigrationError):
    """A revision would destroy data and nobody consented; nothing of it was applied.

    Attributes:
        changes: what it would have destroyed and was not declared.
    """

    def __init__(
        self,
        message: str,
        *,
        tree: str,
        revision: str,
        changes: tuple[DestructiveChange, ...],
    ) -> None:
        super().__init__(message, tree=tree, revision=revision)
        self.changes = changes


class DestructiveGuard:
    """Watches the operations of a migration run and refuses undeclared destruction.

    Args:
        tree: the tree being migrated, for messages.
        direction: ``upgrade`` or ``downgrade``.
        allow: consent for the whole run (``--allow-destructive``).
    """

    def __init__(
        self, *, tree: str, direction: Literal["upgrade", "downgrade"], allow: bool
    ) -> None:
        self.tree = tree
        self.direction = direction
        self.allow = allow

    @contextmanager
    def watching(self, connection: Connection) -> Iterator[None]:
        """Intercept the run's operations while the block runs."""
        yield

    def begin_step(self, step: RevisionStep) -> None:
        """Note that ``step``'s revision starts; its own declaration now applies."""
