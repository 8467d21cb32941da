"""Input guard: everything a request brings is checked before it is processed.

- Request guards (:class:`GuardMiddleware`, wired by :func:`bastion.install`):
  body size per route class, media types, JSON depth and value count, invalid
  UTF-8 and NUL bytes, header and query-string size; a route adjusts its own
  with :func:`limits`.
- Field types for pydantic models: bounded, normalised text (:func:`Text`,
  :func:`SingleLine`), :func:`Slug`, :func:`Identifier`, :data:`Email`,
  :func:`Url`, URLs the server fetches (:func:`FetchUrl`, :class:`SafeTransport`,
  against SSRF), and HTML sanitised against an allow-list (:func:`SafeHtml`).
- Lists: whitelisted sorting (:func:`sorting`), typed filters (:func:`filters`),
  pagination with links (:func:`paginate`) and signed keyset cursors
  (:func:`cursor_paginate`).
- Prompt-injection screening of text bound for an LLM (:class:`Guard`,
  ``app.state.bastion.guard.screen(...)``, or the :data:`Screen` dependency).

Example:
    >>> from bastion.guard import SingleLine, Screen
    >>> class Question(BaseModel):
    ...     text: SingleLine(2000)
    >>> @app.post("/v1/assistant/ask")
    ... async def ask(question: Question, guard: Screen) -> Answer:
    ...     await guard.screen(question.text, field="text")
"""

from bastion.guard._cursor import (
    CURSOR_MAX_CHARS,
    CursorLinks,
    CursorPage,
    CursorQuery,
    cursor_paginate,
    cursor_query,
    decode_cursor,
    encode_cursor,
    keyset_condition,
)
from bastion.guard._fields import Email, Identifier, SingleLine, Slug, Text, TextRule
from bastion.guard._html import SafeHtml, sanitize_html
from bastion.guard._injection import LinearModel, ModelHook, PromptInjectionDetector, Screening
from bastion.guard._marks import limits
from bastion.guard._middleware import GuardMiddleware, GuardRoutes
from bastion.guard._query import (
    FILTER_IN_MAX,
    PAGE_MAX,
    QUERY_ERROR_CODES,
    SORT_FIELDS_MAX,
    Filter,
    FilterParameters,
    FilterSet,
    Page,
    PageLinks,
    Pagination,
    SortKey,
    SortParameter,
    SortSpec,
    filters,
    link_header,
    paginate,
    pagination,
    sorting,
)
from bastion.guard._screen import (
    Guard,
    PromptInjectionDetected,
    Screen,
    build_guard,
    current_guard,
)
from bastion.guard._urls import (
    FetchPolicy,
    FetchUrl,
    SafeTransport,
    UnsafeUrl,
    Url,
    check_fetch_url,
    fetch_url_type,
    is_public_address,
    resolve_public,
)

__all__ = [
    "CURSOR_MAX_CHARS",
    "FILTER_IN_MAX",
    "PAGE_MAX",
    "QUERY_ERROR_CODES",
    "SORT_FIELDS_MAX",
    "CursorLinks",
    "CursorPage",
    "CursorQuery",
    "Email",
    "FetchPolicy",
    "FetchUrl",
    "Filter",
    "FilterParameters",
    "FilterSet",
    "Guard",
    "GuardMiddleware",
    "GuardRoutes",
    "Identifier",
    "LinearModel",
    "ModelHook",
    "Page",
    "PageLinks",
    "Pagination",
    "PromptInjectionDetected",
    "PromptInjectionDetector",
    "SafeHtml",
    "SafeTransport",
    "Screen",
    "Screening",
    "SingleLine",
    "Slug",
    "SortKey",
    "SortParameter",
    "SortSpec",
    "Text",
    "TextRule",
    "UnsafeUrl",
    "Url",
    "build_guard",
    "check_fetch_url",
    "current_guard",
    "cursor_paginate",
    "cursor_query",
    "decode_cursor",
    "encode_cursor",
    "fetch_url_type",
    "filters",
    "is_public_address",
    "keyset_condition",
    "limits",
    "link_header",
    "paginate",
    "pagination",
    "resolve_public",
    "sanitize_html",
    "sorting",
]
