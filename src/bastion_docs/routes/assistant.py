"""The assistant: questions about the caller's tenant's documents.

The answer comes from the configured LLM provider when it can give one, else
from keyword search, marked ``degraded``; a provider outage never fails the
request. Only the caller's tenant's documents are searched, sent to the
provider and listed as sources, and asking needs ``documents:read``: the
assistant reveals nothing its caller could not read. A match marked
``sensitive`` is text of it read on the caller's behalf (sent to the provider,
or quoted in a degraded answer), so each is recorded as ``document.read`` (with
``{"via": "assistant"}``) before the provider is asked, as reading it with
``GET /documents/{id}`` would be.

Prompt-injection screening (:mod:`bastion.guard`): the question is screened
first, and one that scores at or above ``guard.prompt_injection.threshold`` is
refused with 422 ``PROMPT_INJECTION_DETECTED`` and its categories (audited as
``guard.prompt_injection``, never with the text), before any document is
searched. Each matching document's title and excerpt, the text that would be
sent as context, is screened too: one that scores at or above the threshold is
left out of the provider's context and of the answer's ``sources``, counted in
``excluded_sources``, and recorded as ``assistant.source_excluded`` (its id,
score and categories). A degraded answer, which no LLM reads, is unaffected.

The feature flag ``assistant`` is the endpoint's kill switch: switched off
(``bastion flags toggle assistant off``, or ``/admin/features``), every
instance answers 503 within a second, before searching or calling the
provider. A missing flag, or flags switched off altogether, leaves it on.
"""

from __future__ import annotations

from typing import Annotated, Final

from fastapi import APIRouter, Depends, Request

from bastion.audit import AuditEvent, Resource, audit_read
from bastion.errors import ErrorCode, ServiceUnavailable, problem_responses
from bastion.flags import FlagContext
from bastion.guard import Guard
from bastion.identity import require
from bastion.tenancy import TenantId
from bastion_docs.assistant import Assistant, screen_matches, search
from bastion_docs.dependencies import Audit, DbSession
from bastion_docs.routes.documents import READ
from bastion_docs.schemas import AssistantAnswer, AssistantQuestion, DegradedAnswer

__all__ = ["ASSISTANT_FLAG", "AUDIT_ACTIONS", "router"]

ASSISTANT_FLAG: Final = "assistant"
"""The assistant's kill switch (``src/bastion_docs/flags.yaml`` seeds it, on)."""

AUDIT_ACTIONS: Final = {
    "assistant.source_excluded": "A matching document was left out of the assistant's "
    "LLM context by prompt-injection screening (score and categories, never its text).",
}
"""The actions this router records, registered in the app's audit catalogue."""

router = APIRouter(prefix="/assistant", tags=["assistant"])


async def assistant(request: Request) -> Assistant:
    """Return the assistant ``create_app`` put on the app."""
    found: Assistant = request.app.state.assistant
    return found


async def assistant_switched_on(request: Request, context: FlagContext) -> None:
    """Answer 503 when the ``assistant`` flag is off for the caller (its kill switch)."""
    runtime = request.app.state.bastion.flags
    if runtime is None:
        return
    # A missing flag is on: the switch exists to turn the assistant off, not to gate it.
    if not runtime.flags.get_boolean(ASSISTANT_FLAG, True, context):
        raise ServiceUnavailable("The assistant is switched off for now.")


@router.post(
    "/ask",
    summary="Ask about the tenant's documents",
    dependencies=[Depends(require(READ)), Depends(assistant_switched_on)],
    responses=problem_responses(
        ErrorCode.UNAUTHENTICATED,
        ErrorCode.FORBIDDEN,
        ErrorCode.SERVICE_UNAVAILABLE,
        ErrorCode.INVALID_INPUT,
        ErrorCode.INPUT_TOO_LONG,
        ErrorCode.PROMPT_INJECTION_DETECTED,
    ),
)
async def ask(
    payload: AssistantQuestion,
    *,
    tenant: TenantId,
    session: DbSession,
    helper: Annotated[Assistant, Depends(assistant)],
    audit: Audit,
    request: Request,
) -> AssistantAnswer | DegradedAnswer:
    """Answer a question from the tenant's documents that match its keywords.

    The matching documents (title, tags and body, case-insensitive; at most
    ``max_documents``) are sent with the question to the LLM provider. When no
    provider is configured, its circuit is open, it does not answer in time or
    it fails, the answer is 200 with ``degraded: true``, a ``reason``, and each
    match's title and first sentence instead; the provider's errors are never
    shown.

    Each match marked ``sensitive`` is recorded as ``document.read`` first. A
    match whose text looks like a prompt injection is not sent (see the module).

    Raises:
        PromptInjectionDetected: the question looks like a prompt injection (422
            ``PROMPT_INJECTION_DETECTED`` with ``categories``).
        Forbidden: the caller lacks ``documents:read``.
        AuditUnavailable: the audit trail cannot take the reads (503); no
            document was sent or quoted.
    """
    guard: Guard | None = request.app.state.bastion.guard
    if guard is not None:
        await guard.screen(payload.question, field="body.question")
    matches = await search(session, tenant, payload.question, limit=helper.settings.max_documents)
    # Only text bound for the provider is screened: with none configured, every
    # answer is a degraded one, read by the caller alone.
    excluded = await screen_matches(guard, matches) if helper.configured else []
    sensitive = [match for match in matches if match.sensitive]
    if audit is not None and (sensitive or excluded):
        for match in sensitive:
            await audit_read(
                request,
                Resource("document", str(match.id)),
                tenant_id=tenant,
                session=session,
                details={"via": "assistant"},
            )
        for match, screening in excluded:
            event = AuditEvent(
                action="assistant.source_excluded",
                tenant_id=tenant,
                resource=Resource("document", str(match.id)),
                details={
                    "score": round(screening.score, 3),
                    "categories": sorted(screening.categories),
                },
            )
            await audit.record(event, session=session)
        # With audit.mode = "sync" the entries are in this session's transaction,
        # committed before any of the documents' text leaves the service.
        await session.commit()
    # The provider may take seconds: its call must not hold a pooled connection.
    await session.close()
    return await helper.answer(
        payload.question, matches, excluded={match.id for match, _ in excluded}
    )
