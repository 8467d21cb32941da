"""Documents end to end: create, read, list with pages, change, delete."""

from __future__ import annotations

import uuid
from datetime import datetime

PROBLEM = "application/problem+json"
IF_V1 = {"If-Match": '"v1"'}


def parse_time(value: str) -> datetime:
    return datetime.fromisoformat(value)


class TestCreateDocument:
    async def test_created_document_is_returned_with_location(
        self, client, new_workspace, create_document
    ):
        """POST answers 201, the document at version 1, and a Location that reads it back."""
        ws = await new_workspace()
        response = await client.post(
            "/v1/documents",
            json={"title": "Plan", "body": "Line one\n\tLine two", "tags": ["q3", "ops"]},
            headers=ws.owner.headers,
        )
        created = response.json()
        assert 201 == response.status_code
        assert f"/v1/documents/{created['id']}" == response.headers["location"]
        assert ("Plan", "Line one\n\tLine two", ["q3", "ops"], 1) == (
            created["title"],
            created["body"],
            created["tags"],
            created["version"],
        )
        assert (str(ws.owner.user_id), None) == (
            created["created_by"],
            created["created_by_api_key"],
        )
        assert created["created_at"] == created["updated_at"]
        read = await client.get(response.headers["location"], headers=ws.owner.headers)
        assert created == read.json()

    async def test_ids_are_uuid7_and_timestamps_utc(self, client, new_workspace, create_document):
        """Ids are version 7 UUIDs; timestamps carry an explicit UTC offset."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        assert 7 == uuid.UUID(created["id"]).version
        assert 0 == parse_time(created["created_at"]).utcoffset().total_seconds()

    async def test_body_and_tags_default_to_empty(self, client, new_workspace, create_document):
        """Only the title is required."""
        ws = await new_workspace()
        created = await create_document(ws.owner, "Just a title")
        assert ("", []) == (created["body"], created["tags"])

    async def test_title_is_trimmed_and_tags_normalised(
        self, client, new_workspace, create_document
    ):
        """Surrounding spaces leave the title; tags are lower-cased and de-duplicated."""
        ws = await new_workspace()
        created = await create_document(ws.owner, "  Spaced  ", tags=["Ops", "ops", "Q3"])
        assert ("Spaced", ["ops", "q3"]) == (created["title"], created["tags"])


class TestReadDocument:
    async def test_unknown_id_is_not_found(self, client, new_workspace):
        """A well-formed id that names no document is 404 NOT_FOUND."""
        ws = await new_workspace()
        response = await client.get(f"/v1/documents/{uuid.uuid4()}", headers=ws.owner.headers)
        assert (404, PROBLEM, "NOT_FOUND") == (
            response.status_code,
            response.headers["content-type"],
            response.json()["code"],
        )

    async def test_malformed_id_is_not_found(self, client, new_workspace):
        """A malformed id is 404 too: no document can live at that path."""
        ws = await new_workspace()
        response = await client.get("/v1/documents/not-a-uuid", headers=ws.owner.headers)
        assert (404, "NOT_FOUND") == (response.status_code, response.json()["code"])


class TestUpdateDocument:
    async def test_patch_changes_only_given_fields_and_bumps_version(
        self, client, new_workspace, create_document
    ):
        """Fields left out keep their value; version and updated_at move on."""
        ws = await new_workspace()
        created = await create_document(ws.owner, "Old", body="Body", tags=["a"])
        response = await client.patch(
            f"/v1/documents/{created['id']}",
            json={"title": "New"},
            headers=ws.owner.headers | {"If-Match": '"v1"'},
        )
        patched = response.json()
        assert 200 == response.status_code
        assert ("New", "Body", ["a"], 2) == (
            patched["title"],
            patched["body"],
            patched["tags"],
            patched["version"],
        )
        assert created["created_at"] == patched["created_at"]
        assert parse_time(patched["updated_at"]) >= parse_time(created["updated_at"])

    async def test_every_patch_increments_version(self, client, new_workspace, create_document):
        """Versions count accepted changes: 1, 2, 3, 4."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        versions = [created["version"]]
        etag = '"v1"'
        for patch in ({"body": "x"}, {"tags": ["t"]}, {"title": "T", "body": "y", "tags": []}):
            response = await client.patch(
                f"/v1/documents/{created['id']}",
                json=patch,
                headers=ws.owner.headers | {"If-Match": etag},
            )
            versions.append(response.json()["version"])
            etag = response.headers["etag"]
        assert [1, 2, 3, 4] == versions
        read = await client.get(f"/v1/documents/{created['id']}", headers=ws.owner.headers)
        assert ("T", "y", [], 4) == tuple(
            read.json()[k] for k in ("title", "body", "tags", "version")
        )

    async def test_empty_patch_is_invalid(self, client, new_workspace, create_document):
        """A patch with no field is 422 INVALID_INPUT and changes nothing."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        response = await client.patch(
            f"/v1/documents/{created['id']}", json={}, headers=ws.owner.headers | IF_V1
        )
        body = response.json()
        assert (422, PROBLEM, "INVALID_INPUT") == (
            response.status_code,
            response.headers["content-type"],
            body["code"],
        )
        assert [("body", "empty_patch")] == [(e["field"], e["code"]) for e in body["errors"]]
        read = await client.get(f"/v1/documents/{created['id']}", headers=ws.owner.headers)
        assert 1 == read.json()["version"]

    async def test_null_field_is_invalid(self, client, new_workspace, create_document):
        """An explicit null is refused (omit a field to keep it), naming the field."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        response = await client.patch(
            f"/v1/documents/{created['id']}", json={"tags": None}, headers=ws.owner.headers | IF_V1
        )
        assert (422, ["body.tags"]) == (
            response.status_code,
            [e["field"] for e in response.json()["errors"]],
        )

    async def test_unknown_document_is_not_found(self, client, new_workspace):
        """Patching an id that names no document is 404, whatever ETag is sent."""
        ws = await new_workspace()
        response = await client.patch(
            f"/v1/documents/{uuid.uuid4()}", json={"title": "x"}, headers=ws.owner.headers | IF_V1
        )
        assert (404, "NOT_FOUND") == (response.status_code, response.json()["code"])


class TestDeleteDocument:
    async def test_deleted_document_is_gone(self, client, new_workspace, create_document):
        """DELETE answers 204 with no body; the document then reads and deletes as 404."""
        ws = await new_workspace()
        created = await create_document(ws.owner)
        url = f"/v1/documents/{created['id']}"
        deleted = await client.delete(url, headers=ws.owner.headers | IF_V1)
        assert (204, b"") == (deleted.status_code, deleted.content)
        assert 404 == (await client.get(url, headers=ws.owner.headers)).status_code
        assert 404 == (await client.delete(url, headers=ws.owner.headers | IF_V1)).status_code
        listed = await client.get("/v1/documents", headers=ws.owner.headers)
        assert (0, []) == (listed.json()["total"], listed.json()["items"])


class TestListDocuments:
    async def test_pages_cover_every_document_newest_first(
        self, client, new_workspace, create_document
    ):
        """Pages of 2 over 5 documents: totals, links and order are consistent."""
        ws = await new_workspace()
        ids = [(await create_document(ws.owner, f"Doc {n}"))["id"] for n in range(5)]
        base = "/v1/documents?page={}&page_size=2"
        pages = []
        for number in (1, 2, 3):
            response = await client.get(base.format(number), headers=ws.owner.headers)
            assert 200 == response.status_code
            pages.append(response.json())
        assert [5, 5, 5] == [p["total"] for p in pages]
        assert [2, 2, 1] == [len(p["items"]) for p in pages]
        assert list(reversed(ids)) == [item["id"] for p in pages for item in p["items"]]
        assert {
            "self": base.format(1),
            "first": base.format(1),
            "prev": None,
            "next": base.format(2),
            "last": base.format(3),
        } == pages[0]["links"]
        assert (base.format(1), base.format(3)) == (
            pages[1]["links"]["prev"],
            pages[1]["links"]["next"],
        )
        assert (base.format(2), None) == (pages[2]["links"]["prev"], pages[2]["links"]["next"])

    async def test_links_are_followable(self, client, new_workspace, create_document):
        """Following ``next`` from the first page visits every document once."""
        ws = await new_workspace()
        ids = {(await create_document(ws.owner, f"Doc {n}"))["id"] for n in range(7)}
        seen, url = [], "/v1/documents?page_size=3"
        while url is not None:
            page = (await client.get(url, headers=ws.owner.headers)).json()
            seen.extend(item["id"] for item in page["items"])
            url = page["links"]["next"]
        assert (ids, 7) == (set(seen), len(seen))

    async def test_items_are_summaries_without_body(self, client, new_workspace, create_document):
        """List items carry everything but the body."""
        ws = await new_workspace()
        created = await create_document(ws.owner, body="long text")
        item = (await client.get("/v1/documents", headers=ws.owner.headers)).json()["items"][0]
        assert {k: v for k, v in created.items() if k != "body"} == item

    async def test_defaults_and_empty_list(self, client, new_workspace):
        """Without parameters: page 1 of 50; an empty list has one (empty) page."""
        ws = await new_workspace()
        page = (await client.get("/v1/documents", headers=ws.owner.headers)).json()
        only = "/v1/documents?page=1&page_size=50"
        assert {
            "items": [],
            "page": 1,
            "page_size": 50,
            "total": 0,
            "links": {"self": only, "first": only, "prev": None, "next": None, "last": only},
        } == page

    async def test_page_past_the_end_is_empty(self, client, new_workspace, create_document):
        """A page after the last is empty, and its ``prev`` leads to the last page."""
        ws = await new_workspace()
        for n in range(3):
            await create_document(ws.owner, f"Doc {n}")
        page = (
            await client.get("/v1/documents?page=9&page_size=2", headers=ws.owner.headers)
        ).json()
        assert ([], 3) == (page["items"], page["total"])
        assert ("/v1/documents?page=2&page_size=2", None) == (
            page["links"]["prev"],
            page["links"]["next"],
        )

    async def test_page_size_bounds(self, client, new_workspace):
        """page_size must be 1 to 1000 and page at least 1, else 422 naming the parameter."""
        ws = await new_workspace()
        fields = []
        for query in ("page_size=0", "page_size=1001", "page=0", "page=x"):
            response = await client.get(f"/v1/documents?{query}", headers=ws.owner.headers)
            assert 422 == response.status_code
            fields.append(response.json()["errors"][0]["field"])
        assert ["query.page_size", "query.page_size", "query.page", "query.page"] == fields
