"""Conditional requests on documents: ETags, 304, and If-Match on every change.

A document's ETag is its version. Reads answer 304 to a matching
``If-None-Match``; PATCH and DELETE need ``If-Match`` (428 without) and apply
only to the version it names (412 with the current ETag otherwise), checked in
the same statement that writes, so two clients who read one version cannot both
replace it.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

PROBLEM = "application/problem+json"


# RFC 9110: If-Match = "*" / #entity-tag; entity-tag = [ "W/" ] DQUOTE *etagc DQUOTE.
_TAG = r'(?:W/)?"[\x21\x23-\x7e]*"'
_LIST = re.compile(rf"[ ,]*{_TAG}(?: *,[ ,]*{_TAG})*[ ,]*")


def names_current(value: str) -> bool:
    """Whether an If-Match value is well formed and names "v1" strongly (or is *)."""
    if value.strip(" ") == "*":
        return True
    if _LIST.fullmatch(value) is None:
        return False
    return any(not weak and opaque == "v1" for weak, opaque in re.findall(r'(W/)?"([^"]*)"', value))


def at(etag: str) -> dict[str, str]:
    return {"If-Match": etag}


@pytest.fixture
async def document(client, workspace, create_document) -> dict:
    """A document of the workspace at version 1."""
    return await create_document(workspace.owner, "Plan", body="First draft")


def url_of(document: dict) -> str:
    return f"/v1/documents/{document['id']}"


class TestETags:
    async def test_every_representation_carries_its_version_as_strong_etag(self, client, workspace):
        """POST, GET and PATCH answer ETag "v<version>" of the document they return."""
        headers = workspace.owner.headers
        created = await client.post("/v1/documents", json={"title": "T"}, headers=headers)
        read = await client.get(created.headers["location"], headers=headers)
        patched = await client.patch(
            created.headers["location"], json={"body": "b"}, headers=headers | at('"v1"')
        )
        assert ['"v1"', '"v1"', '"v2"'] == [
            response.headers["etag"] for response in (created, read, patched)
        ]
        assert 2 == patched.json()["version"]

    async def test_matching_if_none_match_is_not_modified(self, client, workspace, document):
        """The current ETag in If-None-Match gives 304 with the ETag and no body."""
        response = await client.get(
            url_of(document), headers=workspace.owner.headers | {"If-None-Match": '"v1"'}
        )
        assert (304, b"", '"v1"') == (
            response.status_code,
            response.content,
            response.headers["etag"],
        )

    @pytest.mark.parametrize(
        "tags", ['"v2"', 'W/"v2"', '"v2", "v9"', "not-a-tag"], ids=["old", "weak", "list", "bad"]
    )
    async def test_stale_or_malformed_if_none_match_reads_in_full(
        self, client, workspace, document, tags
    ):
        """Another version, or a header that does not parse, gets the full 200."""
        response = await client.get(
            url_of(document), headers=workspace.owner.headers | {"If-None-Match": tags}
        )
        assert (200, "Plan") == (response.status_code, response.json()["title"])

    async def test_weak_form_and_star_match_for_reads(self, client, workspace, document):
        """If-None-Match compares weakly: W/"v1" and * both give 304."""
        statuses = [
            (
                await client.get(
                    url_of(document), headers=workspace.owner.headers | {"If-None-Match": tags}
                )
            ).status_code
            for tags in ('W/"v1"', "*", '"v7", "v1"')
        ]
        assert [304, 304, 304] == statuses


class TestPreconditions:
    @pytest.mark.parametrize("method", ["PATCH", "DELETE"])
    async def test_change_without_if_match_is_precondition_required(
        self, client, workspace, document, method
    ):
        """A change without If-Match is 428 PRECONDITION_REQUIRED and changes nothing."""
        response = await client.request(
            method, url_of(document), json={"title": "X"}, headers=workspace.owner.headers
        )
        assert (428, PROBLEM, "PRECONDITION_REQUIRED") == (
            response.status_code,
            response.headers["content-type"],
            response.json()["code"],
        )
        read = await client.get(url_of(document), headers=workspace.owner.headers)
        assert ("Plan", 1) == (read.json()["title"], read.json()["version"])

    @pytest.mark.parametrize("method", ["PATCH", "DELETE"])
    @pytest.mark.parametrize(
        "if_match", ['"v2"', 'W/"v1"', '"doc-1"', "v1", '"v99999999999"'], ids=str
    )
    async def test_stale_weak_or_malformed_if_match_fails(
        self, client, workspace, document, method, if_match
    ):
        """Anything but the current strong ETag is 412 with the current ETag; nothing changes."""
        response = await client.request(
            method,
            url_of(document),
            json={"title": "X"},
            headers=workspace.owner.headers | at(if_match),
        )
        assert (412, "PRECONDITION_FAILED", '"v1"') == (
            response.status_code,
            response.json()["code"],
            response.headers["etag"],
        )
        read = await client.get(url_of(document), headers=workspace.owner.headers)
        assert ("Plan", 1) == (read.json()["title"], read.json()["version"])

    async def test_retry_with_the_etag_of_the_refusal_applies(self, client, workspace, document):
        """A client that lost the race re-reads via the 412's ETag and applies its change."""
        headers = workspace.owner.headers
        await client.patch(url_of(document), json={"body": "theirs"}, headers=headers | at('"v1"'))
        refused = await client.patch(
            url_of(document), json={"title": "Mine"}, headers=headers | at('"v1"')
        )
        retried = await client.patch(
            url_of(document), json={"title": "Mine"}, headers=headers | at(refused.headers["etag"])
        )
        assert (412, 200) == (refused.status_code, retried.status_code)
        assert ("Mine", "theirs", 3) == tuple(
            retried.json()[k] for k in ("title", "body", "version")
        )

    async def test_list_of_etags_matches_any_of_them(self, client, workspace, document):
        """If-Match may list several ETags; the change applies when one is current."""
        response = await client.patch(
            url_of(document),
            json={"title": "Listed"},
            headers=workspace.owner.headers | at('"v5", "v1"'),
        )
        assert (200, '"v2"') == (response.status_code, response.headers["etag"])

    @pytest.mark.parametrize("method", ["PATCH", "DELETE"])
    async def test_star_means_any_current_version(self, client, workspace, document, method):
        """If-Match: * (RFC 9110) applies to whatever version exists, and 404s when none does."""
        headers = workspace.owner.headers | at("*")
        await client.patch(url_of(document), json={"body": "moved on"}, headers=headers)
        applied = await client.request(
            method, url_of(document), json={"title": "S"}, headers=headers
        )
        missing = await client.request(
            method, f"/v1/documents/{uuid.uuid4()}", json={"title": "S"}, headers=headers
        )
        assert (200 if method == "PATCH" else 204, 404) == (
            applied.status_code,
            missing.status_code,
        )

    async def test_unknown_document_is_not_found_before_precondition(self, client, workspace):
        """A missing document is 404 whatever If-Match says: 412 would claim it exists."""
        statuses = {
            (
                await client.request(
                    method,
                    f"/v1/documents/{uuid.uuid4()}",
                    json={"title": "x"},
                    headers=workspace.owner.headers | at(tag),
                )
            ).status_code
            for method in ("PATCH", "DELETE")
            for tag in ('"v1"', '"v7"', "garbage")
        }
        assert {404} == statuses

    async def test_delete_with_current_etag_then_gone(self, client, workspace, document):
        """DELETE with the current ETag is 204; the same request again is 404."""
        headers = workspace.owner.headers | at('"v1"')
        first = await client.delete(url_of(document), headers=headers)
        second = await client.delete(url_of(document), headers=headers)
        assert (204, 404) == (first.status_code, second.status_code)


class TestAnyHeader:
    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        value=st.one_of(
            st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40),
            st.lists(
                st.builds(
                    lambda weak, tag: f'{"W/" if weak else ""}"{tag}"',
                    st.booleans(),
                    st.sampled_from(["v1", "v2", "v0", "v-1", "doc-1", "v01", "v2147483648", ""]),
                ),
                min_size=1,
                max_size=4,
            ).map(", ".join),
        )
    )
    async def test_any_if_match_is_applied_or_refused_never_a_server_error(
        self, client, workspace, create_document, value
    ):
        """Whatever If-Match holds, a PATCH is 200 (the header names v1 or is *) or 412."""
        document = await create_document(workspace.owner, "Plan")
        response = await client.patch(
            url_of(document), json={"title": "New"}, headers=workspace.owner.headers | at(value)
        )
        assert (200 if names_current(value) else 412) == response.status_code, response.text


class TestNoLostUpdate:
    async def test_concurrent_patches_from_one_version_apply_once(
        self, client, workspace, document
    ):
        """Eight patches sent at once with the same If-Match: exactly one 200, the rest 412."""
        headers = workspace.owner.headers | at('"v1"')
        responses = await asyncio.gather(
            *(
                client.patch(url_of(document), json={"title": f"Writer {n}"}, headers=headers)
                for n in range(8)
            )
        )
        statuses = sorted(response.status_code for response in responses)
        [winner] = [response for response in responses if response.status_code == 200]
        read = await client.get(url_of(document), headers=workspace.owner.headers)
        assert [200] + [412] * 7 == statuses
        assert (winner.json()["title"], 2) == (read.json()["title"], read.json()["version"])

    async def test_concurrent_patch_and_delete_from_one_version(self, client, workspace, document):
        """A patch and a delete racing from one version: exactly one of them applies."""
        headers = workspace.owner.headers | at('"v1"')
        patched, deleted = await asyncio.gather(
            client.patch(url_of(document), json={"title": "Late"}, headers=headers),
            client.delete(url_of(document), headers=headers),
        )
        outcomes = {(patched.status_code, deleted.status_code)}
        # Delete first: the patch finds nothing (404). Patch first: the delete is stale (412).
        assert outcomes <= {(404, 204), (200, 412)}


class TestOpenApi:
    async def test_preconditions_are_documented(self, client):
        """PATCH and DELETE require If-Match and list 412/428; GET takes If-None-Match and 304."""
        document = (await client.get("/api/openapi.json")).json()
        item = document["paths"]["/v1/documents/{document_id}"]
        for method in ("patch", "delete"):
            [if_match] = [p for p in item[method]["parameters"] if p["name"] == "If-Match"]
            assert (True, {"412", "428"}) == (
                if_match["required"],
                {"412", "428"} & set(item[method]["responses"]),
            )
        assert "304" in item["get"]["responses"]
        assert any(p["name"] == "If-None-Match" for p in item["get"]["parameters"])
