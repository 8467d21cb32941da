"""The ``Guard`` runtime: screening of text bound for an LLM, refusals, audit and metrics."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Final, cast

import structlog
from fastapi import Depends, Request

from bastion.audit import AuditEvent, Outcome
from bastion.errors import ErrorCode, FieldError, InvalidInput
from bastion.guard._injection._detector import PromptInjectionDetector, Screening
from bastion.observability.metrics import (
    GUARD_PROMPT_SCREENING_DURATION as PROMPT_SCREENING_DURATION,
)
from bastion.observability.metrics import GUARD_PROMPT_SCREENINGS as PROMPT_SCREENINGS

if TYPE_CHECKING:
    from bastion.audit import AuditRuntime
    from bastion.settings import PromptInjectionSettings, Settings

__all__ = [
    "AUDIT_ACTIONS",
    "Guard",
    "PromptInjectionDetected",
    "Screen",
    "build_guard",
    "current_guard",
]

logger = structlog.get_logger("bastion.guard")

AUDIT_ACTION: Final = "guard.prompt_injection"
AUDIT_ACTIONS: Final = {
    AUDIT_ACTION: "A text bound for an LLM was refused as a likely prompt injection "
    "(field, score and categories; never the text).",
}


class PromptInjectionDetected(InvalidInput):
    """A text scored at or above the threshold (422 ``PROMPT_INJECTION_DETECTED``).

    The problem body carries ``categories`` (sorted family names) and one
    ``errors`` entry for the field; it never echoes the text.

    Attributes:
        field: where the text came from (``body.question``).
        screening: the verdict.
    """

    def __init__(self, field: str, screening: Screening) -> None:
        categories = sorted(screening.categories)
        super().__init__(
            "The text looks like an attempt to instruct the assistant; rephrase it.",
            errors=[
                FieldError(
                    field,
                    "prompt_injection",
                    "This text was refused by prompt-injection screening.",
                )
            ],
            code=ErrorCode.PROMPT_INJECTION_DETECTED,
        )
        self.extra["categories"] = categories
        self.field = field
        self.screening = screening


@dataclass(slots=True)
class Guard:
    """What screens text for an installed app (``app.state.bastion.guard``).

    Attributes:
        settings: ``guard.prompt_injection``.
        detector: the layered detector; ``detector.use_model(fn)`` adds an operator model.
        audit: where refusals are recorded, or ``None``.
    """

    settings: PromptInjectionSettings
    detector: PromptInjectionDetector
    audit: AuditRuntime | None = None

    async def screen(
        self,
        text: str | Sequence[str],
        *,
        field: str,
        threshold: float | None = None,
    ) -> Screening:
        """Screen ``text`` (or each text of a list) and refuse it at or above the threshold.

        Example:
            >>> @app.post("/v1/assistant/questions")
            ... async def ask(body: Question, guard: Screen) -> Answer:
            ...     await guard.screen(body.question, field="body.question", threshold=0.6)

        Args:
            text: one text, or several (document chunks); the highest score counts.
            field: where it came from, named in the refusal and the audit entry.
            threshold: this route's threshold; ``None``: ``guard.prompt_injection.threshold``.

        Returns:
            The screening (a zero one when screening is off).

        Raises:
            PromptInjectionDetected: the score reached the threshold.
        """
        if not self.settings.enabled:
            return Screening.zero()
        limit = self.settings.threshold if threshold is None else threshold
        texts = [text] if isinstance(text, str) else list(text)
        started = time.perf_counter()
        try:
            worst = Screening.zero()
            for item in texts:
                screening = await self.detector.screen(item)
                if screening.score > worst.score:
                    worst = screening
        except Exception:
            PROMPT_SCREENINGS.labels(outcome="error").inc()
            raise
        finally:
            PROMPT_SCREENING_DURATION.observe(time.perf_counter() - started)
        if worst.score < limit:
            PROMPT_SCREENINGS.labels(outcome="passed").inc()
            return worst
        PROMPT_SCREENINGS.labels(outcome="refused").inc()
        refusal = PromptInjectionDetected(field, worst)
        await self._record(field, worst)
        raise refusal

    async def _record(self, field: str, screening: Screening) -> None:
        if self.audit is None or not self.settings.audit:
            return
        event = AuditEvent(
            action=AUDIT_ACTION,
            outcome=Outcome.DENIED,
            details={
                "field": field,
                "score": round(screening.score, 3),
                "categories": sorted(screening.categories),
            },
        )
        try:
            await self.audit.log.record(event)
        except Exception:  # a refusal stands even when the trail is down
            logger.exception("prompt_injection_audit_failed", field=field)


def build_guard(settings: Settings, *, audit: AuditRuntime | None) -> Guard:
    """Assemble the screening runtime from ``settings`` (loads the model weights once).

    Registers ``guard.prompt_injection`` in the audit catalogue when ``audit`` is given.
    """
    section = settings.guard.prompt_injection
    detector = PromptInjectionDetector(
        model_path=section.model_path, window_chars=section.max_scan_chars
    )
    if audit is not None:
        audit.log.register_actions(AUDIT_ACTIONS)
    return Guard(settings=section, detector=detector, audit=audit)


def current_guard(request: Request) -> Guard:
    """The app's :class:`Guard` (FastAPI dependency behind :data:`Screen`).

    Raises:
        RuntimeError: bastion is not installed, or installed without the guard.
    """
    runtime = getattr(request.app.state, "bastion", None)
    guard = getattr(runtime, "guard", None)
    if guard is None:
        raise RuntimeError("bastion.guard is not installed on this app (runtime.guard is None)")
    return cast("Guard", guard)


Screen = Annotated[Guard, Depends(current_guard)]
"""A route parameter giving the app's :class:`Guard`: ``async def ask(guard: Screen)``."""
