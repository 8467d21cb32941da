"""Documents of the caller's tenant: create, read, list, change, delete.

Every statement here filters on the caller's ``tenant_id``. A document of
another tenant is answered exactly like one that does not exist (404
``NOT_FOUND``), so ids cannot be probed for existence across tenants; a
malformed id is a 404 as well, for the same reason and because no document can
live at such a path.
"""

from __future__ import annotations

import math
import uuid
from typing import Annotated, Final
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Path, Query, Request, Response
from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import load_only

from bastion.errors import (
    ErrorCode,
    FieldError,
    Forbidden,
    InvalidInput,
    NotFound,
    problem_responses,
)
from bastion_docs.dependencies import DbSession
from bastion_docs.identity import Caller, CurrentCaller
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

__all__ = ["PAGE_MAX", "PAGE_SIZE_DEFAULT", "PAGE_SIZE_MAX", "router"]

PAGE_SIZE_DEFAULT: Final = 20
PAGE_SIZE_MAX: Final = 100
# Offsets past this are refused: SQLite's OFFSET is a signed 64-bit integer, and no
# one pages this deep through a UI (a cursor-based list is the tool for that).
PAGE_MAX: Final = 100_000

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
    Document.created_at,
    Document.updated_at,
    Document.version,
)


async def writer(caller: CurrentCaller) -> Caller:
    """Let the caller through only if their role may change documents.

    Raises:
        Forbidden: the caller is a viewer.
    """
    if not caller.role.can_write:
        raise Forbidden("Viewers can read documents but not change them.")
    return caller


Writer = Annotated[Caller, Depends(writer)]


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
    caller: Writer,
    session: DbSession,
    request: Request,
    response: Response,
) -> DocumentOut:
    """Create a document in the caller's tenant, at version 1.

    The ``Location`` header holds the new document's path.

    Raises:
        Forbidden: the caller is a viewer.
    """
    now = utc_now()
    document = Document(
        id=uuid7(),
        tenant_id=caller.tenant_id,
        title=payload.title,
        body=payload.body,
        tags=payload.tags,
        created_by=caller.user_id,
        created_at=now,
        updated_at=now,
        version=1,
    )
    session.add(document)
    await session.commit()
    response.headers["Location"] = f"{request.url.path.rstrip('/')}/{document.id}"
    return DocumentOut.model_validate(document)


@router.get(
    "/{document_id}",
    summary="Read a document",
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.NOT_FOUND),
)
async def read_document(
    document_id: DocumentId, caller: CurrentCaller, session: DbSession
) -> DocumentOut:
    """Return one document of the caller's tenant.

    Raises:
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    document = await session.scalar(
        select(Document).where(Document.id == key, Document.tenant_id == caller.tenant_id)
    )
    if document is None:
        raise NotFound("No such document.")
    return DocumentOut.model_validate(document)


@router.get(
    "",
    summary="List documents, newest first",
    responses=problem_responses(ErrorCode.UNAUTHENTICATED),
)
async def list_documents(
    caller: CurrentCaller,
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
    """
    in_tenant = Document.tenant_id == caller.tenant_id
    total = await session.scalar(select(func.count()).select_from(Document).where(in_tenant)) or 0
    offset = (page - 1) * page_size
    documents = (
        []
        if offset >= total
        else (
            await session.scalars(
                select(Document)
                .options(_SUMMARY_COLUMNS)
                .where(in_tenant)
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
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND
    ),
)
async def update_document(
    document_id: DocumentId, payload: DocumentPatch, caller: Writer, session: DbSession
) -> DocumentOut:
    """Change some of a document's title, body and tags.

    Fields left out keep their value. Every accepted change increments
    ``version`` and sets ``updated_at``.

    Raises:
        InvalidInput: the patch names no field.
        Forbidden: the caller is a viewer.
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    changes = payload.changes()
    if not changes:
        raise InvalidInput(
            "A patch must change at least one of title, body and tags.",
            errors=[FieldError("body", "empty_patch", "Send at least one field to change.")],
        )
    # One UPDATE ... RETURNING: the version is incremented by the database, so two
    # concurrent patches both count and neither reads a stale version.
    statement = (
        update(Document)
        .where(Document.id == key, Document.tenant_id == caller.tenant_id)
        .values(**changes, version=Document.version + 1, updated_at=utc_now())
        .returning(Document)
        .execution_options(synchronize_session=False)
    )
    document = (await session.scalars(statement)).one_or_none()
    if document is None:
        raise NotFound("No such document.")
    await session.commit()
    return DocumentOut.model_validate(document)


@router.delete(
    "/{document_id}",
    status_code=204,
    summary="Delete a document",
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN, ErrorCode.NOT_FOUND
    ),
)
async def delete_document(document_id: DocumentId, caller: Writer, session: DbSession) -> None:
    """Delete a document for good.

    Raises:
        Forbidden: the caller is a viewer.
        NotFound: no document of the caller's tenant has this id.
    """
    key = _document_id(document_id)
    deleted = await session.scalar(
        delete(Document)
        .where(Document.id == key, Document.tenant_id == caller.tenant_id)
        .returning(Document.id)
    )
    if deleted is None:
        raise NotFound("No such document.")
    await session.commit()
