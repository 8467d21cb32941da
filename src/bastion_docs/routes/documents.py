"""Documents of the caller's tenant: create, read, list, change, delete.

Reading and listing need the permission ``documents:read``; creating, changing
and deleting need ``documents:write`` (roles grant them, see
:data:`bastion_docs.app.SERVICE_ROLES`; an API key needs them among its scopes).
Every statement goes through :func:`bastion.tenancy.scoped` with the caller's
tenant (:data:`bastion.tenancy.TenantId`, from the credential, never from the
request). A document of another tenant is answered exactly like one that does
not exist (404 ``NOT_FOUND``), so ids cannot be probed for existence across
tenants; a malformed id is a 404 as well, for the same reason and because no
document can live at such a path.

Every write is recorded in the audit trail (``document.create``, ``.update``,
``.delete``) through the write's own session, so with ``audit.mode = "sync"`` the
entry and the change commit together or not at all; reading a document marked
``sensitive`` is recorded as ``document.read``. Entries name the document, never
its title or body: those are the tenant's data, not facts about the action.

Conditional requests (:mod:`bastion.http`): a document's ``ETag`` is its version
(``"v3"``). ``GET`` answers 304 to a matching ``If-None-Match``; ``PATCH`` and
``DELETE`` require ``If-Match`` (428 without it) and apply only when the version
still matches, checked inside the ``UPDATE``/``DELETE`` itself, so of two
concurrent writes from the same version exactly one succeeds and the other is
412 with the current ``ETag``. ``If-Match: *`` (RFC 9110: "any current
version") is accepted: it is still an explicit conditional request, for
clients that mean to overwrite whatever is there. ``POST`` honours
``Idempotency-Key``: a retried creation returns the first response instead of
creating a second document.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Final, NoReturn

from fastapi import APIRouter, Depends, Header, Path, Request, Response
from pydantic import TypeAdapter, ValidationError
from sqlalchemy import ColumnElement, String, cast, delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import load_only

from bastion.audit import AuditEvent, Resource
from bastion.errors import (
    ErrorCode,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    PreconditionFailed,
    PreconditionRequired,
    problem_responses,
)
from bastion.guard import (
    QUERY_ERROR_CODES,
    Filter,
    FilterSet,
    Pagination,
    SortSpec,
    filters,
    limits,
    link_header,
    paginate,
    pagination,
    sorting,
)
from bastion.http import (
    EntityTags,
    IfNoneMatch,
    MalformedEntityTag,
    NotModified,
    etag_for,
    idempotent,
    parse_entity_tags,
    precondition_responses,
)
from bastion.identity import Principal, require
from bastion.tenancy import TenantId, scoped
from bastion_docs.dependencies import Audit, DbSession
from bastion_docs.ids import uuid7
from bastion_docs.models import Document, utc_now
from bastion_docs.schemas import (
    BODY_MAX_BYTES,
    TAG_MAX,
    DocumentCreate,
    DocumentOut,
    DocumentPage,
    DocumentPatch,
    DocumentSummary,
    Tag,
)

__all__ = [
    "AUDIT_ACTIONS",
    "DOCUMENT_REQUEST_MAX",
    "READ",
    "SORT_DEFAULT",
    "SORT_FIELDS",
    "WRITE",
    "document_etag",
    "router",
]

DOCUMENT_REQUEST_MAX: Final = 3 * BODY_MAX_BYTES + 64 * 1024
"""Largest request body of a document write, in bytes: a body of 1 MiB of UTF-8 may
take three times that as JSON (``\\u00e9`` is six bytes for two), and the bound on
the text itself is checked in bytes after decoding (422 ``INPUT_TOO_LONG``)."""
SORT_FIELDS: Final = ("title", "created_at", "updated_at", "version")
"""The fields a list may be sorted by (``sort=title,-updated_at``); ties end with the id."""
SORT_DEFAULT: Final = "-created_at"
"""The list's order when the request names none: newest first."""

READ: Final = "documents:read"
"""Permission to read and list the tenant's documents (and ask the assistant about them)."""
WRITE: Final = "documents:write"
"""Permission to create, change and delete the tenant's documents."""

AUDIT_ACTIONS: Final = {
    "document.create": "A document was created.",
    "document.update": "A document's title, body, tags or sensitivity changed.",
    "document.delete": "A document was deleted.",
    "document.read": "A document marked sensitive was read.",
}
"""The actions this router records, registered in the app's audit catalogue."""

router = APIRouter(prefix="/documents", tags=["documents"])

DocumentId = Annotated[
    str,
    Path(
        description="The document's id (a UUID). Any value that is not the id of a "
        "document of the caller's tenant, malformed ones included, is a 404."
    ),
]

_SUMMARY_COLUMNS: Final = load_only(
    Document.id,
    Document.title,
    Document.tags,
    Document.created_by,
    Document.created_by_api_key,
    Document.created_at,
    Document.updated_at,
    Document.version,
    Document.sensitive,
)


# Route-level dependencies run before the parameters' own, so a caller without the
# permission is refused before the tenant is resolved or the body validated.
_READER: Final = [Depends(require(READ))]
_WRITER: Final = [Depends(require(WRITE))]
Writer = Annotated[Principal, Depends(require(WRITE))]


def _author(principal: Principal) -> dict[str, uuid.UUID | None]:
    # A user or an API key of the tenant is recorded. A trusted internal service has
    # no row to point at, and neither has a user of an external OIDC issuer (its
    # subject is the issuer's, even when it looks like a UUID, and may equal a local
    # user's id): their documents have no recorded author, both alike.
    if principal.issuer is not None:
        return {"created_by": None, "created_by_api_key": None}
    try:
        subject = uuid.UUID(principal.subject)
    except ValueError:
        return {"created_by": None, "created_by_api_key": None}
    if principal.kind == "user":
        return {"created_by": subject, "created_by_api_key": None}
    if principal.kind == "api_key":
        return {"created_by": None, "created_by_api_key": subject}
    return {"created_by": None, "created_by_api_key": None}


async def _record(
    audit: Audit,
    session: DbSession,
    action: str,
    document_id: uuid.UUID,
    tenant: uuid.UUID,
    **details: Any,
) -> None:
    if audit is not None:
        event = AuditEvent(
            action=action,
            tenant_id=tenant,
            resource=Resource("document", str(document_id)),
            details=details,
        )
        await audit.record(event, session=session)


def _document_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        raise NotFound("No such document.") from None


def document_etag(version: int) -> str:
    """Return the strong ``ETag`` of a document at ``version`` (``"v3"``)."""
    return etag_for(version)


# The versions a PostgreSQL INTEGER column can hold; a tag naming another cannot match.
_VERSION_MAX: Final = 2**31 - 1
_VERSION_TAG: Final = re.compile(r"v(0|[1-9][0-9]{0,9})")
_IF_MATCH_DOC: Final = (
    "Required on changes: the ETag of the version this change replaces, as read "
    '(`"v3"`), or `*` for whichever version is current. Without it 428 '
    "PRECONDITION_REQUIRED; when the document changed since, 412 PRECONDITION_FAILED "
    "with the current ETag."
)


@dataclass(frozen=True, slots=True)
class Precondition:
    """A write's ``If-Match``: any current version (``*``), or the versions it lists.

    Attributes:
        any: the header was ``*``.
        versions: the versions named by the strong ``"v<n>"`` tags; weak tags,
            tags of another form and a malformed header name none, so they match
            no document (412 when it exists).
    """

    any: bool
    versions: frozenset[int] = frozenset()

    def condition(self) -> ColumnElement[bool] | None:
        """The ``WHERE`` condition on the version column; ``None`` for ``*``."""
        if self.any:
            return None
        return Document.version.in_(sorted(self.versions))


def _versions(tags: EntityTags) -> frozenset[int]:
    found = set()
    for tag in tags.tags:
        matched = None if tag.weak else _VERSION_TAG.fullmatch(tag.opaque)
        if matched is not None and int(matched.group(1)) <= _VERSION_MAX:
            found.add(int(matched.group(1)))
    return frozenset(found)


async def if_match(
    if_match: Annotated[str | None, Header(alias="If-Match", description=_IF_MATCH_DOC)] = None,
) -> Precondition:
    """Read ``If-Match`` (FastAPI dependency); 428 ``PRECONDITION_REQUIRED`` when absent.

    Declared optional, so that a missing header is 428 rather than a validation
    422; ``create_app`` marks it required in the OpenAPI document.
    """
    if if_match is None:
        raise PreconditionRequired(
            "Changing a document needs If-Match with the ETag it was read with "
            "(or * for any version), so a concurrent change is not silently overwritten."
        )
    try:
        tags = parse_entity_tags(if_match)
    except MalformedEntityTag:
        # Matches nothing: the write answers 412 with the current ETag, or 404.
        return Precondition(any=False)
    if tags.any:
        return Precondition(any=True)
    return Precondition(any=False, versions=_versions(tags))


IfMatch = Annotated[Precondition, Depends(if_match)]
"""Route parameter type: the write's parsed ``If-Match`` (428 when absent)."""


async def _refuse_write(session: DbSession, tenant: uuid.UUID, key: uuid.UUID) -> NoReturn:
    """After a conditional write changed nothing: 404 if the document is gone, else 412."""
    current = await session.scalar(
        scoped(select(Document.version), Document, tenant).where(Document.id == key)
    )
    if current is None:
        raise NotFound("No such document.")
    raise PreconditionFailed(
        "The document changed since the ETag sent in If-Match: read it again "
        "and apply the change to the current version.",
        headers={"ETag": document_etag(current)},
    )


# Each a NOT NULL column of the same name (bastion's sorting refuses nullable ones).
_SORTABLE: Final = {name: getattr(Document, name) for name in SORT_FIELDS}
DocumentSort = Annotated[
    SortSpec, Depends(sorting(_SORTABLE, default=SORT_DEFAULT, tiebreak=Document.id))
]
# The tags as JSON text, on SQLite and PostgreSQL alike: ``["a", "b"]``.
_TAGS_TEXT: Final = cast(Document.tags, String)
_FILTERS: Final = filters(
    {
        "tag": Filter(
            _TAGS_TEXT,
            str,
            ("eq",),
            max_length=TAG_MAX,
            description="Only documents carrying this tag: its",
        ),
        "sensitive": Filter(
            Document.sensitive, bool, description="Only documents whose sensitive flag"
        ),
        "title": Filter(Document.title, str, ("contains",)),
        "created_at": Filter(Document.created_at, datetime, ("gte", "lte")),
        "updated_at": Filter(Document.updated_at, datetime, ("gte", "lte")),
    }
)


async def document_filters(
    request: Request, where: Annotated[FilterSet, Depends(_FILTERS)]
) -> FilterSet:
    """The list's ``filter[...]`` parameters (FastAPI dependency), validated by bastion.

    ``filter[tag]`` is membership in the document's tag list: the tag, quoted as
    JSON, inside the list's JSON text, a bound parameter with LIKE's wildcards
    escaped (tags are lower-case slugs, so their JSON form has no escapes). A
    value that is no valid tag is 422, as it would be in a document.

    Raises:
        InvalidInput: an unknown filter or operator, or a value that does not parse.
    """
    clauses = []
    for clause, (name, _operator) in zip(where.clauses, where.applied, strict=True):
        if name == "tag":
            tag = _tag_value(request.query_params["filter[tag]"])
            clauses.append(_TAGS_TEXT.contains(json.dumps(tag), autoescape=True))
        else:
            clauses.append(clause)
    return FilterSet(tuple(clauses), where.applied)


_TAG: Final[TypeAdapter[str]] = TypeAdapter(Tag)


def _tag_value(raw: str) -> str:
    # Validated as a stored tag is: a value no document can carry is a client's mistake
    # (often a wrong parameter), better named than answered with an empty list.
    try:
        return _TAG.validate_python(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        raise InvalidInput(
            "The filter parameters are not valid.",
            errors=[FieldError("query.filter[tag]", error["type"], error["msg"])],
        ) from None


DocumentFilters = Annotated[FilterSet, Depends(document_filters)]
Pages = Annotated[Pagination, Depends(pagination)]


@router.post(
    "",
    status_code=201,
    summary="Create a document",
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.FORBIDDEN,
        ErrorCode.INVALID_INPUT,
        ErrorCode.INPUT_TOO_LONG,
    ),
)
@idempotent()
@limits(body=DOCUMENT_REQUEST_MAX)
async def create_document(
    payload: DocumentCreate,
    *,
    caller: Writer,
    tenant: TenantId,
    session: DbSession,
    audit: Audit,
    request: Request,
    response: Response,
) -> DocumentOut:
    """Create a document in the caller's tenant, at version 1.

    The ``Location`` header holds the new document's path and ``ETag`` its
    version. The author is the calling user (``created_by``) or API key
    (``created_by_api_key``). With an ``Idempotency-Key``, a retry of the same
    request returns this response again (``Idempotent-Replayed: true``) rather
    than creating a second document.

    Raises:
        Forbidden: the caller lacks ``documents:write``, or its credential names a
            tenant that does not exist here.
    """
    now = utc_now()
    document = Document(
        id=uuid7(),
        tenant_id=tenant,
        title=payload.title,
        body=payload.body,
        tags=payload.tags,
        **_author(caller),
        created_at=now,
        updated_at=now,
        version=1,
        sensitive=payload.sensitive,
    )
    session.add(document)
    try:
        # Flushed before it is recorded: a row the database refuses is never audited
        # as created, whichever the audit mode.
        await session.flush()
        await _record(
            audit, session, "document.create", document.id, tenant, sensitive=payload.sensitive
        )
        await session.commit()
    except IntegrityError as exc:
        # The tenant (an external issuer's claim, a trusted caller's header) or the
        # author is no row here: the credential names nothing this service knows.
        raise Forbidden("This credential's tenant is not a tenant of this service.") from exc
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{document.id}"
    response.headers["ETag"] = document_etag(document.version)
    return DocumentOut.model_validate(document)


@router.get(
    "/{document_id}",
    summary="Read a document",
    dependencies=_READER,
    response_model=DocumentOut,
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND
    ),
)
async def read_document(
    document_id: DocumentId,
    *,
    tenant: TenantId,
    session: DbSession,
    audit: Audit,
    response: Response,
    known: IfNoneMatch,
) -> DocumentOut | Response:
    """Return one document of the caller's tenant, with its version as ``ETag``.

    With ``If-None-Match`` naming the current ETag, the answer is 304 without a
    body. Reading a document marked ``sensitive`` is recorded either way.

    Raises:
        Forbidden: the caller lacks ``documents:read``.
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    document = await session.scalar(
        scoped(select(Document), Document, tenant).where(Document.id == key)
    )
    if document is None:
        raise NotFound("No such document.")
    if document.sensitive and audit is not None and audit.settings.sensitive_reads:
        await _record(audit, session, "document.read", key, tenant)
        # With audit.mode = "sync" the entry is in this session's transaction.
        await session.commit()
    etag = document_etag(document.version)
    if known is not None and known.weak_match(etag):
        return NotModified(etag)
    response.headers["ETag"] = etag
    return DocumentOut.model_validate(document)


@router.get(
    "",
    summary="List documents, newest first by default",
    dependencies=_READER,
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, *QUERY_ERROR_CODES),
)
async def list_documents(
    *,
    tenant: TenantId,
    session: DbSession,
    request: Request,
    response: Response,
    sort: DocumentSort,
    where: DocumentFilters,
    pages: Pages,
) -> DocumentPage:
    """Return one page of the caller's tenant's documents.

    ``sort`` orders by up to five of ``title``, ``created_at``, ``updated_at`` and
    ``version`` (``-`` for descending; default ``-created_at``); ties are broken
    by id, so pages never overlap or skip while the list is unchanged.
    ``filter[tag]``, ``filter[sensitive]``, ``filter[title][contains]`` and
    ``filter[created_at|updated_at][gte|lte]`` narrow the list. ``page`` starts at
    1; ``page_size`` is 1 to 1000 (50 by default). Items carry no body; read a
    document for it. A page past the last is empty, not an error. The ``links``
    (also in the ``Link`` header) keep the sort and filters.

    Raises:
        Forbidden: the caller lacks ``documents:read``.
        InvalidInput: a sort field or filter not listed, or a value that does not
            parse (422, naming what is allowed).
    """
    statement = where.apply(scoped(select(Document), Document, tenant).options(_SUMMARY_COLUMNS))
    page = await paginate(
        session, statement, pages, request, order=sort, item=DocumentSummary.model_validate
    )
    response.headers["Link"] = link_header(page.links)
    return DocumentPage(
        items=page.items,
        page=page.page,
        page_size=page.page_size,
        total=page.total,
        links=page.links,
    )


@router.patch(
    "/{document_id}",
    summary="Change a document",
    dependencies=_WRITER,
    responses={
        **problem_responses(
            ErrorCode.UNAUTHENTICATED,
            ErrorCode.FORBIDDEN,
            ErrorCode.NOT_FOUND,
            ErrorCode.INVALID_INPUT,
            ErrorCode.INPUT_TOO_LONG,
        ),
        **precondition_responses(write=True),
    },
)
@limits(body=DOCUMENT_REQUEST_MAX)
async def update_document(
    document_id: DocumentId,
    payload: DocumentPatch,
    *,
    tenant: TenantId,
    session: DbSession,
    audit: Audit,
    precondition: IfMatch,
    response: Response,
) -> DocumentOut:
    """Change some of a document's title, body, tags and sensitivity.

    Send the ``ETag`` the document was read with in ``If-Match``. Fields left out
    keep their value. Every accepted change increments ``version`` and sets
    ``updated_at``; the response carries the new ``ETag``.

    Raises:
        PreconditionRequired: no ``If-Match`` (428).
        PreconditionFailed: the document's version is no longer the one in
            ``If-Match`` (412, with the current ``ETag``).
        InvalidInput: the patch names no field.
        Forbidden: the caller lacks ``documents:write``.
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    changes = payload.changes()
    if not changes:
        raise InvalidInput(
            "A patch must change at least one of title, body, tags and sensitive.",
            errors=[FieldError("body", "empty_patch", "Send at least one field to change.")],
        )
    # One UPDATE ... WHERE version = :expected RETURNING: the check and the write are
    # one statement, so of two patches from the same version exactly one applies
    # (PostgreSQL re-checks the condition on the row the first one left).
    statement = scoped(update(Document), Document, tenant).where(Document.id == key)
    condition = precondition.condition()
    if condition is not None:
        statement = statement.where(condition)
    document = (
        await session.scalars(
            statement.values(**changes, version=Document.version + 1, updated_at=utc_now())
            .returning(Document)
            .execution_options(synchronize_session=False)
        )
    ).one_or_none()
    if document is None:
        await _refuse_write(session, tenant, key)
    await _record(
        audit,
        session,
        "document.update",
        key,
        tenant,
        fields=sorted(changes),
        version=document.version,
    )
    await session.commit()
    response.headers["ETag"] = document_etag(document.version)
    return DocumentOut.model_validate(document)


@router.delete(
    "/{document_id}",
    status_code=204,
    summary="Delete a document",
    dependencies=_WRITER,
    responses={
        **problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND),
        **precondition_responses(write=True),
    },
)
async def delete_document(
    document_id: DocumentId,
    tenant: TenantId,
    session: DbSession,
    audit: Audit,
    precondition: IfMatch,
) -> None:
    """Delete a document for good, if it is still at the version in ``If-Match``.

    Raises:
        PreconditionRequired: no ``If-Match`` (428).
        PreconditionFailed: the document changed since (412, with the current ``ETag``).
        Forbidden: the caller lacks ``documents:write``.
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    statement = scoped(delete(Document), Document, tenant).where(Document.id == key)
    condition = precondition.condition()
    if condition is not None:
        statement = statement.where(condition)
    deleted = await session.scalar(statement.returning(Document.id))
    if deleted is None:
        await _refuse_write(session, tenant, key)
    await _record(audit, session, "document.delete", key, tenant)
    await session.commit()
