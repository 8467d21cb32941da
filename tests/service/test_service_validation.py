"""Input limits: every refusal is a 422 problem naming the offending field."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROBLEM = "application/problem+json"


async def post_document(client, member, payload) -> tuple[int, str, list[tuple[str, str]]]:
    """POST raw JSON (or bytes) and return status, content type and (field, code) pairs."""
    content = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    response = await client.post(
        "/v1/documents",
        content=content,
        headers={**member.headers, "content-type": "application/json"},
    )
    errors = [(e["field"], e["code"]) for e in response.json().get("errors", [])]
    return response.status_code, response.headers["content-type"], errors


class TestDocumentLimits:
    @pytest.mark.parametrize(
        ("payload", "expected"),
        [
            pytest.param(
                {"title": "x" * 201}, [("body.title", "string_too_long")], id="long-title"
            ),
            pytest.param({"title": "   "}, [("body.title", "string_too_short")], id="blank-title"),
            pytest.param({"body": "no title"}, [("body.title", "missing")], id="no-title"),
            pytest.param({"title": 5}, [("body.title", "string_type")], id="title-not-string"),
            # NUL is refused by the request guard, before the body is parsed into fields.
            pytest.param({"title": "a\x00b"}, [("body", "nul_character")], id="nul-in-title"),
            pytest.param(
                {"title": "a", "body": "x\x00"}, [("body", "nul_character")], id="nul-in-body"
            ),
            pytest.param(
                {"title": "a\x07b"}, [("body.title", "control_character")], id="bell-in-title"
            ),
            pytest.param(
                {"title": "a", "tags": [f"t{n}" for n in range(21)]},
                [("body.tags", "too_long")],
                id="too-many-tags",
            ),
            pytest.param(
                {"title": "a", "tags": ["x" * 51]},
                [("body.tags.0", "string_too_long")],
                id="long-tag",
            ),
            pytest.param(
                {"title": "a", "tags": ["ok", "no spaces"]},
                [("body.tags.1", "slug_invalid")],
                id="tag-charset",
            ),
            pytest.param(
                {"title": "a", "tags": ["q3.report"]},
                [("body.tags.0", "slug_invalid")],
                id="tag-dot",
            ),
            pytest.param(
                {"title": "a", "tags": [""]}, [("body.tags.0", "slug_invalid")], id="empty-tag"
            ),
            pytest.param(
                {"title": "a", "owner": "me"}, [("body.owner", "extra_forbidden")], id="unknown"
            ),
        ],
    )
    async def test_refusals_name_the_field(self, client, new_workspace, payload, expected):
        """Each limit breach is a 422 application/problem+json naming field and reason."""
        ws = await new_workspace()
        assert (422, PROBLEM, expected) == await post_document(client, ws.owner, payload)

    async def test_exactly_at_the_limits_is_accepted(self, client, new_workspace):
        """A 200-character title and 20 tags of 50 characters are fine."""
        ws = await new_workspace()
        payload = {"title": "x" * 200, "tags": [f"{n:02d}" + "t" * 48 for n in range(20)]}
        assert (201, "application/json", []) == await post_document(client, ws.owner, payload)

    async def test_body_over_one_mebibyte_is_refused(self, client, new_workspace):
        """A body over 1 MiB of UTF-8 is refused, counting bytes, not characters."""
        ws = await new_workspace()
        # 349,526 three-byte characters: under the limit in characters, over it in bytes.
        payload = {"title": "big", "body": "\u20ac" * (1024 * 1024 // 3 + 1)}
        assert (422, PROBLEM, [("body.body", "string_too_long")]) == await post_document(
            client, ws.owner, payload
        )

    async def test_malformed_json_is_refused(self, client, new_workspace):
        """A body that is not JSON is 422 with a json_invalid error."""
        ws = await new_workspace()
        status, content_type, errors = await post_document(client, ws.owner, b'{"title": ')
        assert (422, PROBLEM, ["json_invalid"]) == (status, content_type, [e[1] for e in errors])

    async def test_lone_surrogate_is_refused(self, client, new_workspace):
        """A JSON escape of an unpaired surrogate (not storable as UTF-8) is a 422."""
        ws = await new_workspace()
        status, _, errors = await post_document(client, ws.owner, rb'{"title": "a\ud800"}')
        # The request guard refuses it while parsing, before any field is read.
        assert (422, ["body"]) == (status, [e[0] for e in errors])

    async def test_patch_has_the_same_limits(self, client, new_workspace, create_document):
        """PATCH refuses a long title and unknown fields like POST does."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        response = await client.patch(
            f"/v1/documents/{created['id']}",
            json={"title": "x" * 201, "version": 9},
            headers=ws.owner.headers | {"If-Match": '"v1"'},
        )
        assert (422, {"body.title", "body.version"}) == (
            response.status_code,
            {e["field"] for e in response.json()["errors"]},
        )

    @settings(
        max_examples=40,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        # Any code point, lone surrogates (which JSON can escape) included.
        title=st.text(alphabet=st.characters() | st.characters(categories=["Cs"]), max_size=210),
        tags=st.lists(st.text(max_size=55), max_size=22),
    )
    async def test_no_input_makes_a_server_error(self, client, workspace, title, tags):
        """Any title and tags are either stored (201) or refused (422), never a 500."""
        payload = json.dumps({"title": title, "tags": tags}).encode()
        status, _, _ = await post_document(client, workspace.owner, payload)
        assert status in {201, 422}
