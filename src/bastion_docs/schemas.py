"""Request and response bodies of the Bastion Docs API, with their limits.

Request models are strict (no coercion: ``"title": 5`` is an error, not
``"5"``) and forbid unknown fields, so a typo in a field name is a 422 rather
than a silently ignored change. Free text uses bastion's constrained types
(:mod:`bastion.guard`): control characters and NUL are refused (PostgreSQL
cannot store NUL at all), bidirectional overrides and zero-width characters are
removed, text is NFC-normalised, and a value over its bound is a 422
``INPUT_TOO_LONG`` naming the ``limit``. Lone UTF-16 surrogates, valid as JSON
escapes but not as UTF-8, are refused by the request guard and by the types.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
)
from pydantic_core import PydanticCustomError

from bastion.guard import Page, PageLinks, Slug, TextRule
from bastion_docs.models import DOCUMENT_TITLE_MAX

__all__ = [
    "BODY_MAX_BYTES",
    "QUESTION_MAX",
    "TAGS_MAX",
    "TAG_MAX",
    "AssistantAnswer",
    "AssistantQuestion",
    "AssistantSource",
    "DegradedAnswer",
    "DegradedReason",
    "DocumentCreate",
    "DocumentOut",
    "DocumentPage",
    "DocumentPatch",
    "DocumentSummary",
    "PageLinks",
    "ProviderApi",
    "Tag",
]

BODY_MAX_BYTES: Final = 1024 * 1024
"""Largest document body, in bytes of UTF-8 (what the database stores)."""
TAGS_MAX: Final = 20
TAG_MAX: Final = 50
QUESTION_MAX: Final = 2000
"""Longest question to the assistant, in characters after surrounding whitespace is stripped."""


def _lower(value: Any) -> Any:
    # Tags are case-insensitive labels: "Ops" is stored as "ops" before the slug rule runs.
    return value.lower() if isinstance(value, str) else value


def _unique_tags(value: list[str]) -> list[str]:
    # Tags are a set of labels; order of first appearance is kept.
    return list(dict.fromkeys(value))


Title = Annotated[str, TextRule(DOCUMENT_TITLE_MAX, min_length=1)]
"""One line of at most 200 characters, stripped, NFC, without controls or bidi overrides."""
Body = Annotated[
    str, TextRule(BODY_MAX_BYTES, multiline=True, strip=False, max_bytes=BODY_MAX_BYTES)
]
"""Text with line breaks and tabs, at most 1 MiB of UTF-8; surrounding whitespace is kept."""
if TYPE_CHECKING:
    Tag = str
else:
    # A type factory call: checkers see the plain string it validates.
    Tag = Annotated[Slug(TAG_MAX), BeforeValidator(_lower)]
Tags = Annotated[list[Tag], Field(max_length=TAGS_MAX), AfterValidator(_unique_tags)]
Question = Annotated[str, TextRule(QUESTION_MAX, min_length=1, multiline=True)]
ProviderApi = Literal["openai", "ollama"]
"""The API an LLM provider speaks: OpenAI's chat completions (and compatibles) or Ollama's."""
DegradedReason = Literal["circuit_open", "timeout", "provider_error", "busy", "not_configured"]
"""Why the assistant answered from keyword search instead of the LLM provider."""


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class _Response(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class DocumentCreate(_Request):
    """A new document."""

    title: Title
    body: Body = ""
    tags: Tags = Field(default_factory=list)
    sensitive: bool = Field(
        default=False, description="Record every read of it in the audit trail."
    )


class DocumentPatch(_Request):
    """Fields to change; those left out keep their value. At least one is required."""

    title: Title | None = None
    body: Body | None = None
    tags: Tags | None = None
    sensitive: bool | None = None

    @field_validator("title", "body", "tags", "sensitive", mode="after")
    @classmethod
    def _not_null(cls, value: object) -> object:
        # Absent means "unchanged"; an explicit null would mean "erase", which no
        # document field allows. Runs only for fields the client sent.
        if value is None:
            raise PydanticCustomError("null_not_allowed", "Omit the field to leave it unchanged.")
        return value

    def changes(self) -> dict[str, Any]:
        """Return the fields the client sent, by name."""
        return {name: getattr(self, name) for name in self.model_fields_set}


class DocumentSummary(_Response):
    """A document without its body, as lists show it."""

    id: uuid.UUID
    title: str
    tags: list[str]
    created_by: uuid.UUID | None = Field(
        description="The user who created it; ``null`` when an API key did (see "
        "``created_by_api_key``) or the account was deleted."
    )
    created_by_api_key: uuid.UUID | None = Field(
        description="The API key that created it, when one did."
    )
    created_at: datetime
    updated_at: datetime
    version: int = Field(description="1 on creation, incremented by every accepted change.")
    sensitive: bool = Field(description="Whether every read of it is recorded in the audit trail.")


class DocumentOut(DocumentSummary):
    """A document."""

    body: str


class DocumentPage(Page[DocumentSummary]):
    """One page of the tenant's documents, in the order asked for (newest first by default)."""


class AssistantQuestion(_Request):
    """A question to the assistant about the caller's tenant's documents."""

    question: Question


class AssistantSource(BaseModel):
    """A document the answer draws on (a keyword match of the question)."""

    id: uuid.UUID
    title: str


class AssistantAnswer(BaseModel):
    """The LLM provider's answer, with the documents it was given."""

    answer: str
    sources: list[AssistantSource] = Field(
        description="Keyword matches of the question, best first."
    )
    degraded: Literal[False] = False
    provider: ProviderApi = Field(description="The API of the provider that answered.")
    excluded_sources: int = Field(
        default=0,
        ge=0,
        description="Matching documents left out of the provider's context because their "
        "text looks like a prompt injection; they are neither sent nor listed in ``sources``.",
    )


class DegradedAnswer(BaseModel):
    """An answer from keyword search alone: the provider could not be asked or did not answer."""

    answer: str = Field(
        description="Each matching document's title and first sentence, one per line, "
        'or "No matching documents."'
    )
    sources: list[AssistantSource] = Field(
        description="Keyword matches of the question, best first."
    )
    degraded: Literal[True] = True
    reason: DegradedReason = Field(
        description="``circuit_open``: the provider failed recently and is not being called; "
        "``timeout``: it did not answer in time; ``provider_error``: it failed or answered "
        "nonsense; ``busy``: too many questions are waiting for it; ``not_configured``: "
        "the service has no provider."
    )
