"""Errors of the flag store.

Each is a leaf of bastion's error tree::

    BastionError
    ├── InvalidInput
    │   └── InvalidFlag             INVALID_INPUT (422): a flag cites an unknown segment...
    ├── NotFound
    │   ├── FlagNotFound            NOT_FOUND (404)
    │   └── SegmentNotFound         NOT_FOUND (404)
    ├── Conflict
    │   ├── FlagExists              CONFLICT (409): create of a key that is taken
    │   └── SegmentInUse            CONFLICT (409): delete of a segment a flag cites
    ├── PreconditionFailed
    │   └── FlagVersionMismatch     PRECONDITION_FAILED (412), with ``current_version``
    └── StoredFlagInvalid           INTERNAL (500): a stored row no longer validates
"""

from __future__ import annotations

from collections.abc import Iterable

from bastion.errors import (
    BastionError,
    Conflict,
    FieldError,
    InvalidInput,
    NotFound,
    PreconditionFailed,
)

__all__ = [
    "FlagExists",
    "FlagNotFound",
    "FlagVersionMismatch",
    "InvalidFlag",
    "SegmentInUse",
    "SegmentNotFound",
    "StoredFlagInvalid",
]

_NAMED = 10
"""Flags a SegmentInUse message names (all are in its ``flags`` member)."""


class FlagNotFound(NotFound):
    """No flag has this key."""

    def __init__(self, key: str) -> None:
        super().__init__(f"No feature flag {key!r}.")
        self.key = key


class SegmentNotFound(NotFound):
    """No segment has this name."""

    def __init__(self, name: str) -> None:
        super().__init__(f"No segment {name!r}.")
        self.name = name


class FlagExists(Conflict):
    """A flag with this key exists already (create only creates)."""

    def __init__(self, key: str) -> None:
        super().__init__(f"A feature flag {key!r} exists already; update it instead.")
        self.key = key


class SegmentInUse(Conflict):
    """The segment is cited by flags; it cannot be deleted while they do."""

    def __init__(self, name: str, flags: Iterable[str]) -> None:
        self.flags = sorted(flags)
        shown = ", ".join(self.flags[:_NAMED]) + (" ..." if len(self.flags) > _NAMED else "")
        super().__init__(
            f"Segment {name!r} is used by {len(self.flags)} flag(s): {shown}.",
            extra={"flags": self.flags},
        )
        self.name = name


class FlagVersionMismatch(PreconditionFailed):
    """The flag (or segment, or the whole set) changed since the version the writer read.

    Attributes:
        key: the flag key or segment name (``None`` for the whole set).
        current_version: the version stored now (the set's revision for the whole
            set), for the client to re-read.
        current_etag: the ETag stored now, when the writer gave one to compare.
    """

    def __init__(
        self, key: str | None, current_version: int, *, current_etag: str | None = None
    ) -> None:
        extra: dict[str, object] = {"current_version": current_version}
        if current_etag is not None:
            extra["current_etag"] = current_etag
        what = "The flag set" if key is None else repr(key)
        super().__init__(
            f"{what} is at version {current_version}: re-read it and apply the change again.",
            extra=extra,
        )
        self.key = key
        self.current_version = current_version
        self.current_etag = current_etag


class InvalidFlag(InvalidInput):
    """A flag (or segment, or import) is well-formed but inconsistent with the stored set."""

    def __init__(self, detail: str, *, field: str = "body", code: str = "invalid") -> None:
        super().__init__(detail, errors=[FieldError(field, code, detail)])


class StoredFlagInvalid(BastionError):
    """A stored flag or segment no longer validates (edited by hand, or a model change).

    A server fault, not the caller's: reading such a row answers 500. Loading the
    whole set skips it instead (logged and counted), so one row cannot stop the rest.
    """

    def __init__(self, what: str, key: str) -> None:
        super().__init__(f"The stored {what} {key!r} no longer validates; see the server log.")
        self.key = key
