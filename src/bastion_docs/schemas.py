"""Request and response bodies of the Bastion Docs API, with their limits.

Request models are strict (no coercion: ``"title": 5`` is an error, not
``"5"``) and forbid unknown fields, so a typo in a field name is a 422 rather
than a silently ignored change. Free text refuses control characters: they
have no place in a title, and PostgreSQL cannot store NUL at all, which would
otherwise surface as a 500 from the driver. (Lone UTF-16 surrogates, valid as
JSON escapes but not as UTF-8, are already refused by pydantic.)
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
)
from pydantic_core import PydanticCustomError

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
]

BODY_MAX_BYTES: Final = 1024 * 1024
"""Largest document body, in bytes of UTF-8 (what the database stores)."""
TAGS_MAX: Final = 20
TAG_MAX: Final = 50
TAG_PATTERN: Final = r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$"
QUESTION_MAX: Final = 2000
"""Longest question to the assistant, in characters after surrounding whitespace is stripped."""

# Tab, line feed and carriage return are the only control characters a body may hold;
# a one-line field holds none.
_CONTROL_IN_LINE: Final = re.compile(r"[\x00-\x1f\x7f]")
_CONTROL_IN_TEXT: Final = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def _single_line(value: str) -> str:
    if _CONTROL_IN_LINE.search(value):
        raise PydanticCustomError("control_character", "Text must not contain control characters.")
    return value


def _multi_line(value: str) -> str:
    if _CONTROL_IN_TEXT.search(value):
        raise PydanticCustomError(
            "control_character", "Text may contain tabs and line breaks but no other controls."
        )
    if len(value.encode("utf-8")) > BODY_MAX_BYTES:
        raise PydanticCustomError(
            "string_too_long",
            "Text must be at most {max_bytes} bytes of UTF-8.",
            {"max_bytes": BODY_MAX_BYTES},
        )
    return value


def _question(value: str) -> str:
    if _CONTROL_IN_TEXT.search(value):
        raise PydanticCustomError(
            "control_character", "Text may contain tabs and line breaks but no other controls."
        )
    return value


def _unique_tags(value: list[str]) -> list[str]:
    # Tags are a set of case-insensitive labels; order of first appearance is kept.
    return list(dict.fromkeys(tag.lower() for tag in value))


Title = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=DOCUMENT_TITLE_MAX),
    AfterValidator(_single_line),
]
Body = Annotated[
    # A character bound first, so a huge body fails before it is encoded to be measured.
    str,
    StringConstraints(max_length=BODY_MAX_BYTES),
    AfterValidator(_multi_line),
]
Tag = Annotated[str, StringConstraints(min_length=1, max_length=TAG_MAX, pattern=TAG_PATTERN)]
Tags = Annotated[list[Tag], Field(max_length=TAGS_MAX), AfterValidator(_unique_tags)]
Question = Annotated[
    str,
    StringConstraints(strip_whitespace=True, min_length=1, max_length=QUESTION_MAX),
    AfterValidator(_question),
]
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


class PageLinks(BaseModel):
    """Links to pages of the same list, as paths relative to the API's origin."""

    self: str
    first: str
    prev: str | None = Field(description="``null`` on the first page.")
    next: str | None = Field(description="``null`` on the last page.")
    last: str


class DocumentPage(BaseModel):
    """One page of the tenant's documents, newest first."""

    items: list[DocumentSummary]
    page: int
    page_size: int
    total: int = Field(description="Documents in the whole list, not on this page.")
    links: PageLinks


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
