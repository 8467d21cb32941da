"""Uniform URIs: every route of the app is lowercase and hyphenated, and the API's are plural nouns.

The routes are read from the app itself, so a new route is checked the moment it
exists. The exceptions are listed here, each with its reason: they are the
API's documented vocabulary, and a new one must be added on purpose.
"""

from __future__ import annotations

import re

import pytest

from bastion._routes import route_entries

SEGMENT = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
"""A literal path segment: lowercase letters and digits, words joined by single hyphens."""
PARAMETER = re.compile(r"\{[a-z]+(?:_[a-z]+)*\}")
"""A path parameter: its name is code (snake case), not part of any URI."""

FILES: frozenset[str] = frozenset({"openapi.json", "jwks.json", ".well-known"})
"""Names fixed by standards or tools: the OpenAPI document, RFC 8615 and RFC 7517 paths."""

OPERATIONAL = ("/health/", "/api/", "/docs/", "/.well-known/", "/metrics", "/admin/")
"""Operational endpoints (probes, the API's documentation, JWKS, metrics, the operators'
console): lowercase and hyphenated like the rest, but not resources of the API."""

SINGLETONS: frozenset[str] = frozenset({"me", "usage", "assistant", "password"})
"""Sub-resources that exist once per parent, so have no collection to be plural:
the caller (``/auth/me``), a tenant's usage, the tenant's assistant, an account's password."""

ACTIONS: frozenset[str] = frozenset(
    {
        "auth",
        "signup",
        "verify-email",
        "login",
        "refresh",
        "logout",
        "logout-all",
        "change",
        "reset",
        "reset-request",
        "accept",
        "ask",
    }
)
"""Operations that create or change no addressable resource, named as verbs under a
controller: the account flows of ``/v1/auth``, accepting an invitation, and asking the
assistant (``POST /v1/assistant/ask``: a question is answered, not stored)."""

VERSION = re.compile(r"v[1-9][0-9]*")


@pytest.fixture
def templates(service, sqlite_url) -> set[str]:
    """Every route template of the app (bastion's routes and the service's)."""
    app = service(sqlite_url)
    return {entry.template for entry in route_entries(app.router.routes) if entry.template}


def literal_segments(template: str) -> list[str]:
    return [part for part in template.strip("/").split("/") if not part.startswith("{")]


class TestUniformUris:
    def test_every_segment_is_lowercase_and_hyphenated(self, templates):
        """No capitals, underscores or camelCase in any path; parameters are {snake_case}."""
        offending = sorted(
            template
            for template in templates
            for part in template.strip("/").split("/")
            if not (SEGMENT.fullmatch(part) or PARAMETER.fullmatch(part) or part in FILES)
        )
        assert [] == offending

    def test_api_resources_are_plural_nouns(self, templates):
        """Under /v1, every segment names a collection (plural) unless it is a listed exception."""
        offending = sorted(
            (template, part)
            for template in templates
            if not template.startswith(OPERATIONAL) and template not in {"/metrics"}
            for part in literal_segments(template)
            if not VERSION.fullmatch(part)
            and not part.endswith("s")
            and part not in SINGLETONS | ACTIONS
        )
        assert [] == offending

    def test_every_item_lives_in_a_plural_collection(self, templates):
        """A segment followed by an id parameter is a collection: /documents/{document_id}."""
        offending = sorted(
            template
            for template in templates
            for before, after in zip(
                template.strip("/").split("/"), template.strip("/").split("/")[1:], strict=False
            )
            if after.startswith("{") and not before.startswith("{") and not before.endswith("s")
        )
        assert [] == offending

    def test_the_api_is_versioned_in_the_path(self, templates):
        """Every API route starts with a major version (/v1); only operational routes do not."""
        unversioned = sorted(
            template
            for template in templates
            if not template.startswith(OPERATIONAL)
            and template != "/metrics"
            and not VERSION.fullmatch(template.strip("/").split("/")[0])
        )
        assert [] == unversioned

    def test_exceptions_are_in_use(self, templates):
        """Every listed exception names a segment some route has: stale entries are removed."""
        used = {part for template in templates for part in literal_segments(template)}
        assert set() == (SINGLETONS | ACTIONS) - used
