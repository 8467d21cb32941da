"""The assistant: questions about the caller's tenant's documents.

The answer comes from the configured LLM provider when it can give one, else
from keyword search, marked ``degraded``; a provider outage never fails the
request. Only the caller's tenant's documents are searched, sent to the
provider and listed as sources, and asking needs ``documents:read``: the
assistant reveals nothing its caller could not read.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request

from bastion.errors import ErrorCode, problem_responses
from bastion.identity import require
from bastion.tenancy import TenantId
from bastion_docs.assistant import Assistant, search
from bastion_docs.dependencies import DbSession
from bastion_docs.routes.documents import READ
from bastion_docs.schemas import AssistantAnswer, AssistantQuestion, DegradedAnswer

__all__ = ["router"]

router = APIRouter(prefix="/assistant", tags=["assistant"])


async def assistant(request: Request) -> Assistant:
    """Return the assistant ``create_app`` put on the app."""
    found: Assistant = request.app.state.assistant
    return found


@router.post(
    "/ask",
    summary="Ask about the tenant's documents",
    dependencies=[Depends(require(READ))],
    responses=problem_responses(ErrorCode.UNAUTHENTICATED, ErrorCode.FORBIDDEN),
)
async def ask(
    payload: AssistantQuestion,
    tenant: TenantId,
    session: DbSession,
    helper: Annotated[Assistant, Depends(assistant)],
) -> AssistantAnswer | DegradedAnswer:
    """Answer a question from the tenant's documents that match its keywords.

    The matching documents (title, tags and body, case-insensitive; at most
    ``max_documents``) are sent with the question to the LLM provider. When no
    provider is configured, its circuit is open, it does not answer in time or
    it fails, the answer is 200 with ``degraded: true``, a ``reason``, and each
    match's title and first sentence instead; the provider's errors are never
    shown.

    Raises:
        Forbidden: the caller lacks ``documents:read``.
    """
    matches = await search(session, tenant, payload.question, limit=helper.settings.max_documents)
    # The provider may take seconds: its call must not hold a pooled connection.
    await session.close()
    return await helper.answer(payload.question, matches)
