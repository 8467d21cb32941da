"""GET /v1/documents: whitelisted sorting, typed filters, pages whose links keep both.

Sort fields and filter names are looked up in the service's whitelist; values
are parsed and bound, never written into SQL, so anything that looks like SQL is
a 422 (or, for free text searched literally, simply no match) and changes nothing.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

LIST = "/v1/documents"


async def listing(client, member, **params) -> dict:
    response = await client.get(LIST, params=params, headers=member.headers)
    assert 200 == response.status_code, response.text
    return response.json()


async def titles(client, member, **params) -> list[str]:
    return [item["title"] for item in (await listing(client, member, **params))["items"]]


@pytest.fixture
async def shelf(client, workspace, create_document) -> list[dict]:
    """Four documents, created in order, with tags and one sensitive."""
    made = []
    for title, tags, sensitive in (
        ("Charlie plan", ["ops"], False),
        ("alpha notes", ["ops", "q3"], True),
        ("Bravo report", ["ops-team"], False),
        ("delta plan", ["q3"], False),
    ):
        made.append(await create_document(workspace.owner, title, tags=tags, sensitive=sensitive))
    return made


class TestSorting:
    async def test_default_is_newest_first(self, client, workspace, shelf):
        """Without sort, the newest document comes first (-created_at, ties by id)."""
        assert [d["title"] for d in reversed(shelf)] == await titles(client, workspace.owner)

    async def test_sort_by_whitelisted_fields(self, client, workspace, shelf):
        """sort=title orders by title; a '-' reverses; several fields combine."""
        by_title = await titles(client, workspace.owner, sort="title")
        assert sorted(by_title) == by_title
        assert list(reversed(by_title)) == await titles(client, workspace.owner, sort="-title")
        await client.patch(
            f"{LIST}/{shelf[0]['id']}",
            json={"body": "edited"},
            headers=workspace.owner.headers | {"If-Match": '"v1"'},
        )
        assert "Charlie plan" == (await titles(client, workspace.owner, sort="-version,title"))[0]
        assert "Charlie plan" == (await titles(client, workspace.owner, sort="-updated_at"))[0]

    @pytest.mark.parametrize(
        "sort",
        [
            "body",
            "tenant_id",
            "title;DROP TABLE documents",
            "title desc",
            "(select 1)",
            "title,title",
            "-",
            "title' OR '1'='1",
            "created_at,title,version,updated_at,-created_at,id",
        ],
    )
    async def test_anything_else_is_invalid_input_and_harmless(
        self, client, workspace, shelf, sort
    ):
        """A field not in the whitelist is 422 INVALID_INPUT naming the allowed ones."""
        response = await client.get(LIST, params={"sort": sort}, headers=workspace.owner.headers)
        body = response.json()
        assert (422, "INVALID_INPUT", "query.sort") == (
            response.status_code,
            body["code"],
            body["errors"][0]["field"],
        )
        message = body["errors"][0]["message"]
        assert all(name in message for name in ("title", "created_at", "updated_at", "version"))
        assert 4 == (await listing(client, workspace.owner))["total"]


class TestFilters:
    async def test_tag_filter_is_exact_membership(self, client, workspace, shelf):
        """filter[tag]=ops finds documents tagged ops, not ops-team; case-insensitive."""
        expected = {"Charlie plan", "alpha notes"}
        assert expected == set(await titles(client, workspace.owner, **{"filter[tag]": "ops"}))
        assert expected == set(await titles(client, workspace.owner, **{"filter[tag]": "OPS"}))
        assert ["Bravo report"] == await titles(
            client, workspace.owner, **{"filter[tag]": "ops-team"}
        )

    async def test_other_filters(self, client, workspace, shelf):
        """sensitive, title contains (ignoring case) and created_at bounds narrow the list."""
        member = workspace.owner
        assert ["alpha notes"] == await titles(client, member, **{"filter[sensitive]": "true"})
        assert {"Charlie plan", "delta plan"} == set(
            await titles(client, member, **{"filter[title][contains]": "PLAN"})
        )
        since = shelf[2]["created_at"]
        assert {"Bravo report", "delta plan"} == set(
            await titles(client, member, **{"filter[created_at][gte]": since})
        )
        combined = {"filter[tag]": "q3", "filter[title][contains]": "plan"}
        assert ["delta plan"] == await titles(client, member, **combined)

    @pytest.mark.parametrize(
        ("params", "field"),
        [
            ({"filter[tag]": "' OR 1=1 --"}, "query.filter[tag]"),
            ({"filter[tag]": "ops%"}, "query.filter[tag]"),
            ({"filter[sensitive]": "1 OR 1=1"}, "query.filter[sensitive]"),
            ({"filter[tenant_id]": "x"}, "query.filter[tenant_id]"),
            ({"filter[title]": "x"}, "query.filter[title]"),
            ({"filter[created_at][gte]": "yesterday; DELETE FROM documents"}, None),
            ({"filter[body][contains]": "x"}, "query.filter[body][contains]"),
        ],
    )
    async def test_invalid_filters_are_refused_and_harmless(
        self, client, workspace, shelf, params, field
    ):
        """An unknown filter or operator, or a value that does not parse, is 422."""
        response = await client.get(LIST, params=params, headers=workspace.owner.headers)
        body = response.json()
        assert (422, "INVALID_INPUT") == (response.status_code, body["code"])
        if field is not None:
            assert field == body["errors"][0]["field"]
        assert 4 == (await listing(client, workspace.owner))["total"]

    async def test_text_search_takes_sql_and_wildcards_literally(self, client, workspace, shelf):
        """filter[title][contains] with quotes, % or _ matches them as text: here, nothing."""
        for value in ("' OR '1'='1", "%", "_", "plan' --"):
            page = await listing(client, workspace.owner, **{"filter[title][contains]": value})
            assert (0, []) == (page["total"], page["items"])

    async def test_filters_never_reach_another_tenant(
        self, client, workspace, shelf, new_workspace, create_document
    ):
        """Another tenant's documents with the same tag are never listed."""
        other = await new_workspace()
        await create_document(other.owner, "Their plan", tags=["ops"])
        found = await titles(client, workspace.owner, **{"filter[tag]": "ops"})
        assert "Their plan" not in found
        assert ["Their plan"] == await titles(client, other.owner, **{"filter[tag]": "ops"})


class TestPages:
    async def test_links_keep_sort_and_filters(self, client, workspace, shelf):
        """Following next visits every match once, in order; each link keeps sort and filter."""
        params = {"sort": "title", "filter[title][contains]": "a", "page_size": "1"}
        first = await listing(client, workspace.owner, **params)
        seen, url = [], LIST + "?" + "&".join(f"{k}={v}" for k, v in params.items())
        while url is not None:
            response = await client.get(url, headers=workspace.owner.headers)
            page = response.json()
            assert response.headers["link"].count('rel="') >= 3
            seen.extend(item["title"] for item in page["items"])
            url = page["links"]["next"]
            if url is not None:
                query = dict(parse_qsl(urlsplit(url).query))
                assert {"sort": "title", "filter[title][contains]": "a"}.items() <= query.items()
        assert first["total"] == len(seen)
        assert sorted(seen) == seen

    async def test_page_size_up_to_one_thousand(self, client, workspace, shelf):
        """page_size 1000 is accepted; the default is 50."""
        assert (1000, 50) == (
            (await listing(client, workspace.owner, page_size=1000))["page_size"],
            (await listing(client, workspace.owner))["page_size"],
        )


class TestSortInvariant:
    @settings(
        max_examples=25,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
    )
    @given(
        fields=st.lists(
            st.sampled_from(["title", "created_at", "updated_at", "version"]),
            min_size=1,
            max_size=4,
            unique=True,
        ),
        descending=st.lists(st.booleans(), min_size=4, max_size=4),
        page_size=st.integers(1, 5),
    )
    async def test_pages_partition_the_list_in_any_order(
        self, client, workspace, shelf, *, fields, descending, page_size
    ):
        """For any whitelisted ordering and page size, pages hold every document exactly once."""
        sort = ",".join(
            f"-{name}" if down else name for name, down in zip(fields, descending, strict=False)
        )
        seen: list[str] = []
        page_number = 1
        while True:
            page = await listing(
                client, workspace.owner, sort=sort, page=page_number, page_size=page_size
            )
            seen.extend(item["id"] for item in page["items"])
            if page["links"]["next"] is None:
                break
            page_number += 1
        assert sorted(d["id"] for d in shelf) == sorted(seen)
