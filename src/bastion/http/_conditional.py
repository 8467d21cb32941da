"""Conditional requests: entity tags, ``If-Match`` and ``If-None-Match`` (RFC 9110, section 13).

Reads use ``If-None-Match`` to skip a body the client already has (304); writes
use ``If-Match`` so that two clients who read the same version cannot both
replace it (the lost update). The pieces:

- :func:`etag_for` makes a strong tag from a version column (``"v12"``,
  ``"doc-12"``); :func:`weak_etag_for_body` hashes a body when there is no
  version to use.
- :func:`parse_entity_tags` reads either header per the RFC 9110 grammar: ``*``
  or a comma-separated list of tags, weak (``W/"x"``) or strong (``"x"``), with
  optional whitespace and empty list elements. A comma is a valid character
  inside a tag, so the list is tokenised, never split on commas.
- :func:`not_modified` / :class:`NotModified` for reads, :func:`require_if_match`
  and :func:`expected_version` for writes; :data:`IfMatchVersion` and
  :data:`IfNoneMatch` are the FastAPI dependencies that declare the headers in
  the OpenAPI document.

Malformed headers never cause a 500. A malformed ``If-None-Match`` is ignored
(the full response is sent: a cache miss costs bytes, not correctness); a
malformed ``If-Match`` fails the precondition (412, with the current ``ETag`` so
the client can retry correctly): a write whose condition cannot be understood
is not applied unconditionally.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final

from fastapi import Depends, Header
from starlette.requests import Request
from starlette.responses import Response

from bastion._routes import depends_on, flattened_routes
from bastion.errors import (
    ErrorCode,
    PreconditionFailed,
    PreconditionRequired,
    problem_responses,
)

__all__ = [
    "EntityTag",
    "EntityTags",
    "IfMatchVersion",
    "IfNoneMatch",
    "MalformedEntityTag",
    "NotModified",
    "conditional_operations",
    "document_preconditions",
    "etag_for",
    "expected_version",
    "if_match_version",
    "if_match_version_of",
    "if_none_match",
    "not_modified",
    "parse_entity_tags",
    "precondition_responses",
    "require_if_match",
    "weak_etag_for_body",
]

# etagc = %x21 / %x23-7E / obs-text: any visible character but DQUOTE, and bytes
# 0x80-0xFF (which reach Python as latin-1 characters in ASGI header values).
_ETAGC: Final = r"[\x21\x23-\x7e\x80-\xff]"
_OPAQUE: Final = re.compile(f'"({_ETAGC}*)"')
_OWS: Final = " \t"
_VERSION_TAG: Final = re.compile(
    r'"(?:(?P<kind>[\x21\x23-\x7e]+)-|v)(?P<version>0|[1-9][0-9]{0,18})"'
)
_MAX_VERSION: Final = 2**63 - 1
_SAFE_METHODS: Final = frozenset({"GET", "HEAD"})


class MalformedEntityTag(ValueError):
    """A conditional header's value does not follow the RFC 9110 grammar."""


@dataclass(frozen=True, slots=True)
class EntityTag:
    """One entity tag.

    Attributes:
        opaque: the tag between its quotes (``v12`` of ``W/"v12"``).
        weak: whether it carried the ``W/`` prefix.
    """

    opaque: str
    weak: bool = False

    def __str__(self) -> str:
        return f'W/"{self.opaque}"' if self.weak else f'"{self.opaque}"'

    def strong_equals(self, other: EntityTag) -> bool:
        """RFC 9110 strong comparison: both strong and character for character equal."""
        return not self.weak and not other.weak and self.opaque == other.opaque

    def weak_equals(self, other: EntityTag) -> bool:
        """RFC 9110 weak comparison: the opaque tags are equal, weak or not."""
        return self.opaque == other.opaque

    @classmethod
    def parse(cls, value: str) -> EntityTag:
        """Parse one tag (``"x"`` or ``W/"x"``).

        Raises:
            MalformedEntityTag: not an entity tag.
        """
        tags = parse_entity_tags(value)
        if tags.any or len(tags.tags) != 1:
            raise MalformedEntityTag("expected exactly one entity tag")
        return tags.tags[0]


@dataclass(frozen=True, slots=True)
class EntityTags:
    """The parsed value of an ``If-Match`` or ``If-None-Match`` header.

    Attributes:
        any: the header was ``*``: any current representation matches.
        tags: the listed tags, in order (empty for ``*``).
    """

    any: bool
    tags: tuple[EntityTag, ...] = ()

    def strong_match(self, current: EntityTag | str | None) -> bool:
        """Whether ``current`` passes ``If-Match`` (strong comparison; ``*`` when it exists)."""
        if current is None:
            return False
        if self.any:
            return True
        tag = _as_tag(current)
        return any(tag.strong_equals(listed) for listed in self.tags)

    def weak_match(self, current: EntityTag | str | None) -> bool:
        """Whether ``current`` matches ``If-None-Match`` (weak comparison; ``*`` when it exists)."""
        if current is None:
            return False
        if self.any:
            return True
        tag = _as_tag(current)
        return any(tag.weak_equals(listed) for listed in self.tags)


def parse_entity_tags(value: str) -> EntityTags:
    """Parse an ``If-Match`` / ``If-None-Match`` value: ``*`` or ``#entity-tag``.

    Empty list elements (``"a", , "b"``) are skipped, as RFC 9110 section 5.6.1
    asks of recipients; ``*`` must stand alone.

    Raises:
        MalformedEntityTag: the value does not follow the grammar (an unquoted tag,
            a stray character, ``*`` inside a list, nothing at all).
    """
    stripped = value.strip(_OWS)
    if stripped == "*":
        return EntityTags(any=True)
    tags: list[EntityTag] = []
    position, end = 0, len(value)
    while True:
        position = _skip(value, position, f"{_OWS},")
        if position >= end:
            break
        weak = value.startswith("W/", position)
        if weak:
            position += 2
        match = _OPAQUE.match(value, position)
        if match is None:
            raise MalformedEntityTag("an entity tag is a quoted string, optionally after W/")
        tags.append(EntityTag(match.group(1), weak))
        position = _skip(value, match.end(), _OWS)
        if position < end and value[position] != ",":
            raise MalformedEntityTag("entity tags in a list are separated by commas")
    if not tags:
        raise MalformedEntityTag("the header lists no entity tag")
    return EntityTags(any=False, tags=tuple(tags))


def _skip(value: str, position: int, characters: str) -> int:
    end = len(value)
    while position < end and value[position] in characters:
        position += 1
    return position


def _as_tag(value: EntityTag | str) -> EntityTag:
    return value if isinstance(value, EntityTag) else EntityTag.parse(value)


def etag_for(version: int | str, *, kind: str | None = None) -> str:
    """Return the strong ETag of a resource at ``version`` (a version column).

    Example:
        >>> etag_for(12)
        '"v12"'
        >>> etag_for(12, kind="doc")
        '"doc-12"'

    Args:
        version: the row's version: a non-negative integer, or a string of visible
            ASCII characters without ``"`` (a revision id).
        kind: a prefix naming the resource type, so tags of different resources
            never compare equal.

    Raises:
        ValueError: a negative version, or a character an entity tag cannot hold.
    """
    if isinstance(version, bool):
        raise TypeError("a version is an int or a str, not a bool")
    if isinstance(version, int):
        if not 0 <= version <= _MAX_VERSION:
            raise ValueError("a version is an integer from 0 to 2**63 - 1")
        text = str(version)
    else:
        text = version
        if not text or not _visible(text):
            raise ValueError("a string version is visible ASCII without '\"'")
    if kind is None:
        return f'"v{text}"'
    if not kind or not _visible(kind):
        raise ValueError("an ETag kind is visible ASCII without '\"'")
    return f'"{kind}-{text}"'


_VISIBLE: Final = re.compile(r"[\x21\x23-\x7e]+")


def _visible(text: str) -> bool:
    """Visible ASCII without DQUOTE: what an entity tag holds and every client can echo."""
    return _VISIBLE.fullmatch(text) is not None


def weak_etag_for_body(body: bytes) -> str:
    """Return a weak ETag from a hash of ``body``, for responses without a version.

    Weak (``W/"..."``) because equal bodies say nothing about equal metadata, and
    because it must never satisfy ``If-Match``: only a version makes writes safe.
    """
    return f'W/"{hashlib.blake2b(body, digest_size=16).hexdigest()}"'


def _header(request: Request, name: str) -> str | None:
    return request.headers.get(name)


def not_modified(request: Request, etag: str | None) -> bool:
    """Whether a ``GET`` or ``HEAD`` may be answered 304: ``If-None-Match`` matches ``etag``.

    Weak comparison (RFC 9110 section 13.1.2). Any other method, an absent or
    malformed header, or no current representation (``etag`` is ``None``): ``False``.

    Example:
        >>> if not_modified(request, etag):
        ...     return NotModified(etag)
    """
    if etag is None or request.method not in _SAFE_METHODS:
        return False
    raw = _header(request, "if-none-match")
    if raw is None:
        return False
    try:
        return parse_entity_tags(raw).weak_match(etag)
    except MalformedEntityTag:
        return False


class NotModified(Response):
    """A ``304 Not Modified`` with the current ``ETag`` and no body.

    Args:
        etag: the representation's current entity tag.
        headers: other headers the 200 would have carried that RFC 9110 section
            15.4.5 asks to repeat (``Cache-Control``, ``Vary``, ``Expires``...).
    """

    def __init__(self, etag: str, headers: Mapping[str, str] | None = None) -> None:
        super().__init__(status_code=304, headers={**(headers or {}), "etag": etag})


def require_if_match(request: Request, current_etag: str | None) -> EntityTags:
    """Check a write's ``If-Match`` against the resource's current ETag.

    ``*`` passes when the resource exists (``current_etag`` is not ``None``); a
    list passes when one of its tags equals the current one by strong
    comparison, so a weak tag never passes.

    Args:
        request: the write.
        current_etag: the resource's ETag now; ``None`` when it does not exist.

    Returns:
        The parsed header.

    Raises:
        PreconditionRequired: no ``If-Match`` (428), with the current ``ETag`` when known.
        PreconditionFailed: no listed tag matches, or the header is malformed (412),
            with the current ``ETag`` when known.
    """
    raw = _header(request, "if-match")
    headers = {"etag": current_etag} if current_etag is not None else None
    if raw is None:
        raise PreconditionRequired(
            "This change needs If-Match with the ETag of the version it replaces: "
            "read it first, so a concurrent change is not silently overwritten.",
            headers=headers,
        )
    try:
        tags = parse_entity_tags(raw)
    except MalformedEntityTag as exc:
        raise PreconditionFailed(
            f"If-Match is malformed ({exc}): send the ETag exactly as it was received.",
            headers=headers,
        ) from None
    if not tags.strong_match(current_etag):
        raise PreconditionFailed(
            "The resource changed since the ETag sent in If-Match: "
            "re-read it and apply the change again.",
            headers=headers,
        )
    return tags


def expected_version(request: Request, *, kind: str | None = None) -> int:
    """The version a write's ``If-Match`` names, for ``UPDATE ... WHERE version = :expected``.

    The header must hold exactly one strong tag of the form :func:`etag_for`
    makes for ``kind``. Comparing inside the ``UPDATE`` (and answering 412 when
    it changed no row) leaves no window between reading and writing, unlike
    reading the row first and comparing in Python.

    Example:
        >>> version = expected_version(request, kind="doc")
        >>> result = await session.execute(
        ...     update(Doc)
        ...     .where(Doc.id == id, Doc.version == version)
        ...     .values(title=title, version=version + 1)
        ... )
        >>> if result.rowcount == 0:
        ...     raise PreconditionFailed(headers={"etag": etag_for(current, kind="doc")})

    Raises:
        PreconditionRequired: no ``If-Match`` (428).
        PreconditionFailed: a malformed header, ``*``, a weak tag, a list of several
            tags, or a tag of another form or kind (412): the endpoint cannot know
            which version the client read.
    """
    raw = _header(request, "if-match")
    if raw is None:
        raise PreconditionRequired(
            "This change needs If-Match with the ETag of the version it replaces: "
            "read it first, so a concurrent change is not silently overwritten."
        )
    return _version_of(raw, kind)


def _version_of(raw: str, kind: str | None) -> int:
    expected_form = '"v<version>"' if kind is None else f'"{kind}-<version>"'
    failure = PreconditionFailed(
        f"If-Match must hold exactly one ETag of the form {expected_form}, "
        "as the resource was read with."
    )
    match = _VERSION_TAG.fullmatch(raw.strip(_OWS))
    if match is None or match.group("kind") != kind:
        raise failure
    version = int(match.group("version"))
    if version > _MAX_VERSION:
        raise failure
    return version


# The header descriptions shown in the OpenAPI document.
_IF_MATCH_DOC: Final = (
    "The ETag of the version this change replaces, as read. Required: without it "
    "428 PRECONDITION_REQUIRED; when the resource changed since, 412 PRECONDITION_FAILED "
    "with the current ETag."
)
_IF_NONE_MATCH_DOC: Final = (
    "ETags the client holds; when one matches the current representation, the answer "
    "is 304 Not Modified without a body."
)


_IF_MATCH_MARK: Final = "__bastion_if_match__"


def _if_match_dependency(kind: str | None) -> Callable[..., int]:
    def if_match_version(
        request: Request,
        if_match: Annotated[str | None, Header(alias="If-Match", description=_IF_MATCH_DOC)] = None,
    ) -> int:
        # Declared optional so a missing header is 428, not FastAPI's 422; the
        # OpenAPI document marks it required (document_preconditions).
        if if_match is None:
            return expected_version(request, kind=kind)
        return _version_of(if_match, kind)

    setattr(if_match_version, _IF_MATCH_MARK, True)
    return if_match_version


if_match_version: Final = _if_match_dependency(None)
"""FastAPI dependency: the version ``If-Match: "v<n>"`` names (see :func:`expected_version`)."""

_KINDS: dict[str, Any] = {}


def if_match_version_of(kind: str) -> Any:
    """The :data:`IfMatchVersion` parameter type for tags of ``kind`` (``"doc-12"``).

    Example:
        >>> DocVersion = if_match_version_of("doc")
        >>> @app.patch("/v1/documents/{id}")
        ... async def update(id: str, version: DocVersion) -> ...: ...

    Raises:
        ValueError: ``kind`` cannot be part of an entity tag.
    """
    etag_for(0, kind=kind)  # validates the kind
    annotated = _KINDS.get(kind)
    if annotated is None:
        annotated = Annotated[int, Depends(_if_match_dependency(kind))]
        _KINDS[kind] = annotated
    return annotated


def if_none_match(
    if_none_match: Annotated[
        str | None, Header(alias="If-None-Match", description=_IF_NONE_MATCH_DOC)
    ] = None,
) -> EntityTags | None:
    """FastAPI dependency: the parsed ``If-None-Match``; ``None`` when absent or malformed."""
    if if_none_match is None:
        return None
    try:
        return parse_entity_tags(if_none_match)
    except MalformedEntityTag:
        return None


IfMatchVersion = Annotated[int, Depends(if_match_version)]
"""An endpoint parameter: the version of ``If-Match: "v<n>"``; 428 when absent, 412 when
malformed. For tags of another ``kind``, use :func:`if_match_version_of`."""

IfNoneMatch = Annotated[EntityTags | None, Depends(if_none_match)]
"""An endpoint parameter: the client's ``If-None-Match`` (``None`` when absent or malformed);
``tags.weak_match(etag)`` says whether to answer :class:`NotModified`."""

_NOT_MODIFIED_RESPONSE: Final[dict[str, Any]] = {
    "description": "Not modified: the client's copy (If-None-Match) is current. No body.",
    "headers": {"ETag": {"description": "The current entity tag.", "schema": {"type": "string"}}},
}


def precondition_responses(
    *, write: bool = True, read: bool = False
) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for conditional endpoints.

    Args:
        write: add 412 ``PRECONDITION_FAILED`` and 428 ``PRECONDITION_REQUIRED``.
        read: add 304 Not Modified.
    """
    responses: dict[int | str, dict[str, Any]] = {}
    if read:
        responses[304] = dict(_NOT_MODIFIED_RESPONSE)
    if write:
        responses.update(
            problem_responses(ErrorCode.PRECONDITION_FAILED, ErrorCode.PRECONDITION_REQUIRED)
        )
    return responses


def _marked(call: Any) -> bool:
    return bool(getattr(call, _IF_MATCH_MARK, False))


def conditional_operations(
    routes: Iterable[Any],
) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
    """Return the operations using the conditional dependencies.

    Returns:
        ``(METHOD, template)`` of those using :data:`IfMatchVersion`, and of those
        using :data:`IfNoneMatch`.
    """
    writes: set[tuple[str, str]] = set()
    reads: set[tuple[str, str]] = set()
    for route in flattened_routes(routes):
        methods = getattr(route, "methods", None)
        path = getattr(route, "path", None)
        dependant = getattr(route, "dependant", None)
        if not methods or not isinstance(path, str) or dependant is None:
            continue
        if depends_on(dependant, _marked):
            writes.update((method, path) for method in methods)
        if depends_on(dependant, lambda call: call is if_none_match):
            reads.update((method, path) for method in methods)
    return writes, reads


def document_preconditions(schema: dict[str, Any], routes: Iterable[Any]) -> None:
    """Complete an OpenAPI document for the routes using the conditional dependencies.

    On operations with :data:`IfMatchVersion`, the ``If-Match`` header parameter
    becomes required and 412/428 are listed; on those with :data:`IfNoneMatch`, 304.
    The dependency itself declares the header optional, so that a missing header
    is answered 428 ``PRECONDITION_REQUIRED`` rather than FastAPI's validation 422.
    """
    writes, reads = conditional_operations(routes)
    for template, path in schema.get("paths", {}).items():
        for method, operation in path.items():
            if not isinstance(operation, dict):
                continue
            key = (method.upper(), template)
            responses = operation.setdefault("responses", {})
            if key in writes:
                for parameter in operation.get("parameters", ()):
                    if parameter.get("in") == "header" and parameter.get("name") == "If-Match":
                        parameter["required"] = True
                        schema_of = parameter.get("schema")
                        if isinstance(schema_of, dict) and "anyOf" in schema_of:
                            # Required now: the ``null`` of the optional declaration is gone.
                            parameter["schema"] = {"type": "string", "title": "If-Match"}
                for status, response in precondition_responses(write=True).items():
                    responses.setdefault(str(status), response)
            if key in reads:
                responses.setdefault("304", dict(_NOT_MODIFIED_RESPONSE))
