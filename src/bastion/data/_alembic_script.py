"""What is on disk: a migration tree's scripts, resolved and read without a database.

The split follows alembic's own ``script/`` and ``runtime/``: this module knows
files (where a tree lives, its revisions, the plan between two revisions, the
checksum of a revision file); :mod:`bastion.data._alembic_runtime` knows
connections.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic.config import Config
from alembic.script import Script, ScriptDirectory

from bastion.errors import ConfigurationError

if TYPE_CHECKING:
    from alembic.runtime.migration import RevisionStep

__all__ = [
    "RevisionInfo",
    "alembic_config",
    "applied_revisions",
    "checksum",
    "downgrade_plan",
    "resolve_location",
    "revisions",
    "script_directory",
    "upgrade_plan",
]

# A Windows drive ("C:\\...") also contains a colon; it is a path, not a package.
_DRIVE = re.compile(r"^[A-Za-z]:[\\/]")


@dataclass(frozen=True, slots=True)
class RevisionInfo:
    """One revision of a tree, as its script file declares it.

    Attributes:
        id: the revision identifier.
        down_revision: the revisions it follows: empty for a base, two or more for a merge.
        message: the first paragraph of the script's docstring.
        is_head: whether no revision follows it.
    """

    id: str
    down_revision: tuple[str, ...]
    message: str
    is_head: bool


def resolve_location(name: str, location: str) -> Path:
    """Return the directory of a tree given as ``package:directory`` or a filesystem path.

    Raises:
        ConfigurationError: the package cannot be imported, or the directory does not
            exist on disk or has no ``env.py``.
    """
    if ":" in location and not _DRIVE.match(location):
        package, _, directory = location.partition(":")
        try:
            root = importlib.resources.files(package)
        except (ImportError, TypeError) as exc:
            raise ConfigurationError(
                f"migration tree {name!r}: cannot import package {package!r} of {location!r}: {exc}"
            ) from exc
        resource = root.joinpath(*[part for part in directory.split("/") if part])
        if not isinstance(resource, Path):
            # Alembic reads scripts with plain file I/O, so a zipped package cannot hold them.
            raise ConfigurationError(
                f"migration tree {name!r}: {location!r} is not a directory on disk"
            )
        path = resource
    else:
        path = Path(location).expanduser().resolve()
    if not (path / "env.py").is_file():
        raise ConfigurationError(
            f"migration tree {name!r}: {location!r} ({path}) is not an Alembic script "
            "directory (no env.py)"
        )
    return path


def alembic_config(directory: Path, version_table: str, **attributes: Any) -> Config:
    """Build the in-memory Alembic configuration of one tree.

    ``attributes`` reach ``env.py`` as ``config.attributes``; :func:`run_alembic_env`
    reads ``connection``, ``url``, ``version_table`` and ``transactional_ddl`` there.
    """
    config = Config(attributes={"version_table": version_table, **attributes})
    # ConfigParser interpolation would read a "%" in the path as a reference.
    config.set_main_option("script_location", str(directory).replace("%", "%%"))
    config.set_main_option("version_table", version_table)
    return config


def script_directory(config: Config) -> ScriptDirectory:
    """Return the scripts of the tree ``config`` names."""
    return ScriptDirectory.from_config(config)


def revisions(script: ScriptDirectory) -> list[RevisionInfo]:
    """Return every revision, oldest first (the order an upgrade applies them)."""
    found = [
        RevisionInfo(
            id=revision.revision,
            down_revision=_as_tuple(revision.down_revision),
            message=revision.doc,
            is_head=revision.is_head,
        )
        for revision in script.walk_revisions()
    ]
    found.reverse()
    return found


def upgrade_plan(
    script: ScriptDirectory, destination: str, current: Sequence[str]
) -> list[RevisionStep]:
    """Return the steps that take ``current`` up to ``destination``, in order."""
    # `_upgrade_revs` is what `alembic.command.upgrade` runs; its errors are
    # already CommandErrors worded for people.
    return script._upgrade_revs(destination, tuple(current))  # type: ignore[arg-type]  # typed str; takes heads, as in command.py


def downgrade_plan(
    script: ScriptDirectory, destination: str, current: Sequence[str]
) -> list[RevisionStep]:
    """Return the steps that take ``current`` down to ``destination``, in order."""
    return script._downgrade_revs(destination, tuple(current))  # type: ignore[arg-type]  # as in upgrade_plan


def applied_revisions(script: ScriptDirectory, heads: Sequence[str]) -> list[Script]:
    """Return the revisions a database at ``heads`` has applied, oldest first.

    Those are the heads and every ancestor of theirs (dependencies included).

    Raises:
        alembic.script.revision.ResolutionError: a head is not on disk.
    """
    found = [
        revision
        for revision in script.iterate_revisions(tuple(heads), "base")
        if isinstance(revision, Script)
    ]
    found.reverse()
    return found


def checksum(revision: Script) -> str:
    """Return the SHA-256 (hex) of a revision's file, line endings normalised to LF.

    A checkout with CRLF line endings (git on Windows) is the same revision, not
    an edit, so the bytes are hashed after replacing CRLF with LF.
    """
    content = Path(revision.path).read_bytes().replace(b"\r\n", b"\n")
    return hashlib.sha256(content).hexdigest()


def _as_tuple(value: str | Sequence[str] | None) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)
