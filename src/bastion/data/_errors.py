"""Errors of the data layer: a migration that cannot be read, planned or run."""

from __future__ import annotations

from bastion.errors import ConfigurationError

__all__ = ["MigrationError"]


class MigrationError(ConfigurationError):
    """A migration could not be read, planned or run; start-up stops with its message.

    Args:
        message: one line naming the tree, the revision and the cause.
        tree: the tree concerned, when there is one.
        revision: the revision that failed or was asked for, when known.
    """

    def __init__(
        self, message: str, *, tree: str | None = None, revision: str | None = None
    ) -> None:
        super().__init__(message)
        self.tree = tree
        self.revision = revision
