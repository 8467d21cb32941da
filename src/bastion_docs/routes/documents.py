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
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Any, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import load_only

from bastion.audit import AuditEvent, Resource
from bastion.errors import (
    ErrorCode,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    problem_responses,
)
from bastion.identity import Principal, require
from bastion.tenancy import TenantId, scoped
from bastion_docs.dependencies import Audit, DbSession
from bastion_docs.ids import uuid7
from bastion_docs.models import Document, utc_now
from bastion_docs.schemas import (
    DocumentCreate,
    DocumentOut,
    DocumentPage,
    DocumentPatch,
    DocumentSummary,
    PageLinks,
)

__all__ = [
    "AUDIT_ACTIONS",
    "PAGE_MAX",
    "PAGE_SIZE_DEFAULT",
    "PAGE_SIZE_MAX",
    "READ",
    "WRITE",
    "router",
]

PAGE_SIZE_DEFAULT: Final = 20
PAGE_SIZE_MAX: Final = 100
# Offsets past this are refused: SQLite's OFFSET is a signed 64-bit integer, and no
# one pages this deep through a UI (a cursor-based list is the tool for that).
PAGE_MAX: Final = 100_000

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

_NEWEST_FIRST: Final = (Document.created_at.desc(), Document.id.desc())
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


@router.post(
    "",
    status_code=201,
    summary="Create a document",
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN),
)
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

    The ``Location`` header holds the new document's path. The author is the
    calling user (``created_by``) or API key (``created_by_api_key``).

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
    return DocumentOut.model_validate(document)


@router.get(
    "/{document_id}",
    summary="Read a document",
    dependencies=_READER,
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND
    ),
)
async def read_document(
    document_id: DocumentId, tenant: TenantId, session: DbSession, audit: Audit
) -> DocumentOut:
    """Return one document of the caller's tenant.

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
    return DocumentOut.model_validate(document)


@router.get(
    "",
    summary="List documents, newest first",
    dependencies=_READER,
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN),
)
async def list_documents(
    tenant: TenantId,
    session: DbSession,
    request: Request,
    page: Annotated[int, Query(ge=1, le=PAGE_MAX, description="1-based page number.")] = 1,
    page_size: Annotated[
        int, Query(ge=1, le=PAGE_SIZE_MAX, description="Documents per page.")
    ] = PAGE_SIZE_DEFAULT,
) -> DocumentPage:
    """Return one page of the caller's tenant's documents, newest first.

    Documents created in the same instant are ordered by id, so pages never
    overlap or skip while the list is unchanged. Items carry no body; read a
    document for it. A page past the last is empty, not an error.

    Raises:
        Forbidden: the caller lacks ``documents:read``.
    """
    counted = scoped(select(func.count()).select_from(Document), Document, tenant)
    total = await session.scalar(counted) or 0
    offset = (page - 1) * page_size
    documents = (
        []
        if offset >= total
        else (
            await session.scalars(
                scoped(select(Document), Document, tenant)
                .options(_SUMMARY_COLUMNS)
                .order_by(*_NEWEST_FIRST)
                .offset(offset)
                .limit(page_size)
            )
        ).all()
    )
    return DocumentPage(
        items=[DocumentSummary.model_validate(document) for document in documents],
        page=page,
        page_size=page_size,
        total=total,
        links=_page_links(request.url.path, page, page_size, total),
    )


def _page_links(path: str, page: int, page_size: int, total: int) -> PageLinks:
    # Paths, not absolute URLs: an absolute URL would have to trust the Host
    # header, which a proxy may not have rewritten.
    def link(number: int) -> str:
        return f"{path}?{urlencode({'page': number, 'page_size': page_size})}"

    last = max(1, math.ceil(total / page_size))
    return PageLinks(
        self=link(page),
        first=link(1),
        # From beyond the end, "previous" leads back to the last real page.
        prev=link(min(page - 1, last)) if page > 1 else None,
        next=link(page + 1) if page < last else None,
        last=link(last),
    )


@router.patch(
    "/{document_id}",
    summary="Change a document",
    dependencies=_WRITER,
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND
    ),
)
async def update_document(
    document_id: DocumentId,
    payload: DocumentPatch,
    tenant: TenantId,
    session: DbSession,
    audit: Audit,
) -> DocumentOut:
    """Change some of a document's title, body and tags.

    Fields left out keep their value. Every accepted change increments
    ``version`` and sets ``updated_at``.

    Raises:
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
    # One UPDATE ... RETURNING: the version is incremented by the database, so two
    # concurrent patches both count and neither reads a stale version.
    statement = (
        scoped(update(Document), Document, tenant)
        .where(Document.id == key)
        .values(**changes, version=Document.version + 1, updated_at=utc_now())
        .returning(Document)
        .execution_options(synchronize_session=False)
    )
    document = (await session.scalars(statement)).one_or_none()
    if document is None:
        raise NotFound("No such document.")
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
    return DocumentOut.model_validate(document)


@router.delete(
    "/{document_id}",
    status_code=204,
    summary="Delete a document",
    dependencies=_WRITER,
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND
    ),
)
async def delete_document(
    document_id: DocumentId, tenant: TenantId, session: DbSession, audit: Audit
) -> None:
    """Delete a document for good.

    Raises:
        Forbidden: the caller lacks ``documents:write``.
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    deleted = await session.scalar(
        scoped(delete(Document), Document, tenant).where(Document.id == key).returning(Document.id)
    )
    if deleted is None:
        raise NotFound("No such document.")
    await _record(audit, session, "document.delete", key, tenant)
    await session.commit()
