"""Sorting whitelist, filters and offset pagination on real SQLite and PostgreSQL."""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any
from urllib.parse import parse_qsl, urlsplit

import pytest
from fastapi import Depends, FastAPI, Request, Response
from guard_support import OFF, empty_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel
from sqlalchemy import (
    Boolean,
    Column,
    DateTime,
    Integer,
    MetaData,
    String,
    Table,
    Uuid,
    func,
    select,
)
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

import bastion
from bastion.guard._query import (
    PAGE_MAX,
    SORT_FIELDS_MAX,
    Filter,
    FilterSet,
    Page,
    Pagination,
    SortSpec,
    filters,
    link_header,
    paginate,
    pagination,
    sorting,
)
from bastion.testing import count_queries, lifespan_client

metadata = MetaData()
items = Table(
    "guard_query_items",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("title", String(80), nullable=False),
    Column("score", Integer, nullable=False),
    Column("created_at", DateTime(timezone=True), nullable=False),
    Column("active", Boolean, nullable=False),
    Column("ref", Uuid, nullable=False),
    Column("note", String(80), nullable=True),
)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SORTABLE = {
    "title": items.c.title,
    "score": items.c.score,
    "created_at": items.c.created_at,
    "id": items.c.id,
}
SORT = sorting(SORTABLE, default="-created_at", tiebreak=items.c.id)
WHERE = filters(
    {
        "title": Filter(items.c.title, str, ("eq", "in", "contains"), max_length=40),
        "score": Filter(items.c.score, int, ("eq", "in", "gte", "lte")),
        "created_at": Filter(items.c.created_at, dt.datetime, ("gte", "lte")),
        "active": Filter(items.c.active, bool),
        "ref": Filter(items.c.ref, uuid.UUID, ("eq", "in")),
    }
)
GUARD = {"page_size_default": 5, "page_size_max": 20}


class ItemOut(BaseModel):
    id: int
    title: str
    score: int


def row(i: int, title: str = "a", score: int = 0, **values: Any) -> dict[str, Any]:
    base = {
        "id": i,
        "title": title,
        "score": score,
        "created_at": T0 + dt.timedelta(minutes=i % 7),
        "active": i % 2 == 0,
        "ref": uuid.UUID(int=i),
        "note": None,
    }
    base.update(values)
    return base


@pytest.fixture(params=["sqlite", "postgres"])
async def engine(request, sqlite_url: str, _module_postgres) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty ``guard_query_items`` table, on SQLite and on PostgreSQL."""
    async for engine in empty_engine(request, sqlite_url, _module_postgres, metadata):
        yield engine


async def fill(engine: AsyncEngine, rows: list[dict[str, Any]]) -> None:
    async with engine.begin() as connection:
        await connection.execute(items.delete())
        if rows:
            await connection.execute(items.insert(), rows)


async def count_rows(engine: AsyncEngine) -> int:
    async with engine.connect() as connection:
        return int(await connection.scalar(select(func.count()).select_from(items)) or 0)


def build_app(engine: AsyncEngine, guard: dict[str, Any] | None = None) -> FastAPI:
    app = FastAPI()
    bastion.install(app, guard=guard or GUARD, **OFF)

    @app.get("/v1/items")
    async def list_items(
        request: Request,
        response: Response,
        sort: Annotated[SortSpec, Depends(SORT)],
        where: Annotated[FilterSet, Depends(WHERE)],
        pages: Annotated[Pagination, Depends(pagination)],
    ) -> Page[ItemOut]:
        async with AsyncSession(engine) as session:
            page = await paginate(
                session,
                where.apply(select(items)),
                pages,
                request,
                order=sort,
                item=lambda r: ItemOut(id=r.id, title=r.title, score=r.score),
            )
        response.headers["Link"] = link_header(page.links)
        return page

    @app.get("/v1/groups/{group}/items")
    async def group_items(
        group: str, request: Request, pages: Annotated[Pagination, Depends(pagination)]
    ) -> Page[int]:
        async with AsyncSession(engine) as session:
            return await paginate(session, select(items.c.id).order_by(items.c.id), pages, request)

    return app


@pytest.fixture
async def client(engine: AsyncEngine) -> AsyncIterator[Any]:
    """A client of an app listing ``guard_query_items`` (page size 5 by default, 20 at most)."""
    async with lifespan_client(build_app(engine)) as client:
        yield client


def ids(body: dict[str, Any]) -> list[int]:
    return [item["id"] for item in body["items"]]


def expected_order(rows: list[dict[str, Any]], field: str, descending: bool) -> list[int]:
    # The tiebreak (id) follows the direction of the last field.
    ordered = sorted(rows, key=lambda r: (r[field], r["id"]), reverse=descending)
    return [r["id"] for r in ordered]


def assert_problem(response, field: str, code: str, top: str = "INVALID_INPUT") -> dict[str, Any]:
    assert 422 == response.status_code, response.text
    assert response.headers["content-type"].startswith("application/problem+json")
    body = response.json()
    assert top == body["code"]
    assert any(e["field"] == field and e["code"] == code for e in body["errors"]), body
    return body


class TestSorting:
    @pytest.mark.parametrize("field", ["title", "score", "created_at", "id"])
    @pytest.mark.parametrize("descending", [False, True])
    async def test_each_field_sorts_both_ways_with_the_tiebreak(
        self, client, engine, field, descending
    ):
        """Sorting by any allowed field, either way, gives that order with ties broken by id."""
        rows = [row(i, title="abc"[i % 3] * (1 + i % 2), score=i % 4) for i in range(1, 19)]
        await fill(engine, rows)
        sort = f"-{field}" if descending else field
        response = await client.get("/v1/items", params={"sort": sort, "page_size": 20})
        assert 200 == response.status_code, response.text
        assert expected_order(rows, field, descending) == ids(response.json())

    async def test_default_order_applies_without_sort(self, client, engine):
        """Without ``sort`` the list comes in the declared default order (newest first)."""
        rows = [row(i) for i in range(1, 15)]
        await fill(engine, rows)
        body = (await client.get("/v1/items", params={"page_size": 20})).json()
        assert expected_order(rows, "created_at", True) == ids(body)

    async def test_several_fields_and_plus_sign(self, client, engine):
        """``sort=+title,-score`` sorts by title ascending, then score descending, then id."""
        rows = [row(i, title="ab"[i % 2], score=i % 3) for i in range(1, 13)]
        await fill(engine, rows)
        response = await client.get("/v1/items", params={"sort": "+title,-score", "page_size": 20})
        ordered = sorted(rows, key=lambda r: (r["title"], -r["score"], -r["id"]))
        assert [r["id"] for r in ordered] == ids(response.json())

    def test_tiebreak_is_last_and_not_repeated(self):
        """The tiebreak ends every ordering once; sorting by it explicitly adds nothing."""
        parsed = SORT.parse("title,-score")
        assert ("title", "-score") == parsed.fields
        assert items.c.id is parsed.keys[-1].column
        assert parsed.keys[-1].descending
        by_id = SORT.parse("-id,title")
        assert 2 == len(by_id.keys)
        assert "-id,title" == by_id.value

    @pytest.mark.parametrize(
        "sort",
        [
            "",
            ",",
            "title,",
            ",title",
            "title,title",
            "title,-title",
            ",".join(["title", "score", "created_at", "id", "title", "score"]),
            "Title",
            "title desc",
            "title DESC",
            "title;drop table guard_query_items",
            "title; DROP TABLE guard_query_items --",
            "(select 1)",
            "1",
            "t\u0456tle",  # Cyrillic i lookalike
            "\uff54\uff49\uff54\uff4c\uff45",  # fullwidth "title"
            "title\u200b",  # zero-width space
            "-",
            "--title",
            "+-title",
            "note",
            "guard_query_items.title",
            "x" * 600,
        ],
    )
    async def test_invalid_sort_is_refused_and_names_allowed_fields(self, client, engine, sort):
        """An unknown, repeated, malformed or hostile sort is a 422 naming the allowed fields."""
        await fill(engine, [row(1), row(2)])
        response = await client.get("/v1/items", params={"sort": sort})
        body = assert_problem(response, "query.sort", "invalid_sort")
        message = body["errors"][0]["message"]
        assert "created_at, id, score, title" in message
        assert 2 == await count_rows(engine)

    def test_more_than_the_maximum_fields_is_refused(self):
        """At most five fields may be named."""
        sort = sorting(
            {name: Column(name, Integer, nullable=False) for name in "abcdef"},
            default="a",
            tiebreak=items.c.id,
        )
        sort.parse("a,b,c,d,e")
        with pytest.raises(Exception, match="not valid") as caught:
            sort.parse("a,b,c,d,e,f")
        assert f"At most {SORT_FIELDS_MAX}" in caught.value.errors[0].message

    def test_construction_refuses_unsafe_declarations(self):
        """Bad names, nullable columns and an invalid default are refused at import time."""
        with pytest.raises(ValueError, match="must match"):
            sorting({"Title": items.c.title}, default="Title", tiebreak=items.c.id)
        with pytest.raises(ValueError, match="nullable"):
            sorting({"note": items.c.note}, default="note", tiebreak=items.c.id)
        with pytest.raises(ValueError, match="invalid sort"):
            sorting({"title": items.c.title}, default="score", tiebreak=items.c.id)
        with pytest.raises(ValueError, match="tiebreak"):
            sorting({"title": items.c.title}, default="title", tiebreak=items.c.note)
        with pytest.raises(ValueError, match="at least one"):
            sorting({}, default="title", tiebreak=items.c.id)

    async def test_openapi_documents_fields_and_pattern(self, client):
        """The sort parameter's description lists the fields; its pattern matches the rule."""
        spec = (await client.get("/openapi.json")).json()
        parameters = spec["paths"]["/v1/items"]["get"]["parameters"]
        sort = next(p for p in parameters if p["name"] == "sort")
        assert "created_at, id, score, title" in sort["description"]
        pattern = re.compile(sort["schema"]["pattern"])
        assert pattern.match("-created_at,title")
        assert not pattern.match("title desc")
        assert not pattern.match("note")
        names = {p["name"] for p in parameters}
        assert {"filter[title]", "filter[title][contains]", "filter[score][gte]"} <= names
        assert {"page", "page_size"} <= names


class TestFilters:
    async def test_equality_in_and_ranges(self, client, engine):
        """eq, in, gte and lte select exactly the matching rows, combined with AND."""
        await fill(engine, [row(i, title=f"t{i % 3}", score=i) for i in range(1, 13)])
        get = client.get
        body = (await get("/v1/items", params={"filter[title]": "t1", "sort": "id"})).json()
        assert [1, 4, 7, 10] == ids(body)
        params = {"filter[score][in]": "2,3,99", "sort": "id"}
        assert [2, 3] == ids((await get("/v1/items", params=params)).json())
        params = {"filter[score][gte]": "-2147483648", "filter[score][lte]": "2147483647"}
        assert 12 == (await get("/v1/items", params=params)).json()["total"]
        params = {"filter[score][gte]": "4", "filter[score][lte]": "6", "sort": "id"}
        assert [4, 5, 6] == ids((await get("/v1/items", params=params)).json())
        params = {"filter[title][in]": "t0,t2", "filter[score][gte]": "9", "sort": "id"}
        assert [9, 11, 12] == ids((await get("/v1/items", params=params)).json())

    async def test_typed_values(self, client, engine):
        """bool, UUID and date-time values are parsed by type (naive means UTC)."""
        await fill(engine, [row(i) for i in range(1, 8)])
        get = client.get
        body = (await get("/v1/items", params={"filter[active]": "true", "sort": "id"})).json()
        assert [2, 4, 6] == ids(body)
        params = {"filter[ref]": str(uuid.UUID(int=3))}
        assert [3] == ids((await get("/v1/items", params=params)).json())
        params = {"filter[ref][in]": f"{uuid.UUID(int=1)},{uuid.UUID(int=5)}", "sort": "id"}
        assert [1, 5] == ids((await get("/v1/items", params=params)).json())
        params = {"filter[created_at][gte]": "2026-01-01T00:05:00Z", "sort": "id"}
        assert [5, 6] == ids((await get("/v1/items", params=params)).json())
        params = {"filter[created_at][lte]": "2026-01-01T01:01:00+01:00", "sort": "id"}
        assert [1, 7] == ids((await get("/v1/items", params=params)).json())
        params = {"filter[created_at][lte]": "2026-01-01T00:01:00", "sort": "id"}
        assert [1, 7] == ids((await get("/v1/items", params=params)).json())

    async def test_contains_is_case_insensitive_and_escapes_wildcards(self, client, engine):
        """``contains`` matches text literally: %, _ and \\ are characters, not patterns."""
        titles = ["Report 100%", "report_final", "reportXfinal", "back\\slash", "plain"]
        await fill(engine, [row(i, title=t) for i, t in enumerate(titles, start=1)])

        async def matching(text: str) -> list[int]:
            params = {"filter[title][contains]": text, "sort": "id"}
            response = await client.get("/v1/items", params=params)
            assert 200 == response.status_code, response.text
            return ids(response.json())

        assert [1, 2, 3] == await matching("REPORT")
        assert [1] == await matching("%")
        assert [2] == await matching("_")
        assert [2] == await matching("t_f")
        assert [4] == await matching("\\")
        assert [4] == await matching("k\\s")
        assert [] == await matching("%%")

    @pytest.mark.parametrize(
        "value",
        [
            "' OR 1=1 --",
            "a'; DROP TABLE guard_query_items; --",
            "(select 1)",
            't1" OR ""="',
            "\uff541",
        ],
    )
    async def test_hostile_values_are_plain_data(self, client, engine, value):
        """Injection attempts in filter values match nothing and change nothing."""
        await fill(engine, [row(1, title="t1"), row(2, title="t2")])
        for key in ("filter[title]", "filter[title][contains]", "filter[title][in]"):
            response = await client.get("/v1/items", params={key: value})
            assert 200 == response.status_code, response.text
            assert [] == ids(response.json())
        assert 2 == await count_rows(engine)

    @pytest.mark.parametrize(
        ("params", "field", "code"),
        [
            ({"filter[nope]": "1"}, "query.filter[nope]", "unknown_filter"),
            ({"filter[Title]": "1"}, "query.filter[Title]", "unknown_filter"),
            ({"filter": "1"}, "query.filter", "unknown_filter"),
            ({"filter[title][x][y]": "1"}, "query.filter[title][x][y]", "unknown_filter"),
            ({"filter[title;drop]": "1"}, "query.filter[title;drop]", "unknown_filter"),
            ({"filter[score][contains]": "1"}, "query.filter[score][contains]", "unknown_operator"),
            ({"filter[active][gte]": "1"}, "query.filter[active][gte]", "unknown_operator"),
            ({"filter[score]": "1.5"}, "query.filter[score]", "int_parsing"),
            ({"filter[score]": "١٢"}, "query.filter[score]", "int_parsing"),
            ({"filter[score]": "1_000"}, "query.filter[score]", "int_parsing"),
            ({"filter[score]": str(2**63)}, "query.filter[score]", "int_parsing"),
            # An INTEGER column: PostgreSQL would refuse the parameter with a 500.
            ({"filter[score]": str(2**31)}, "query.filter[score]", "int_parsing"),
            ({"filter[score]": str(-(2**31) - 1)}, "query.filter[score]", "int_parsing"),
            ({"filter[score][in]": "1,x"}, "query.filter[score][in]", "int_parsing"),
            ({"filter[active]": "yes"}, "query.filter[active]", "bool_parsing"),
            ({"filter[ref]": "not-a-uuid"}, "query.filter[ref]", "uuid_parsing"),
            (
                {"filter[created_at][gte]": "yesterday"},
                "query.filter[created_at][gte]",
                "datetime_parsing",
            ),
            (
                {"filter[created_at][lte]": "0001-01-01T00:00:00+01:00"},
                "query.filter[created_at][lte]",
                "datetime_parsing",
            ),
            (
                {"filter[score][in]": ",".join(["1"] * 101)},
                "query.filter[score][in]",
                "too_many_values",
            ),
        ],
    )
    async def test_invalid_filters_are_refused(self, client, engine, params, field, code):
        """Unknown fields and operators, and values that do not parse, are a 422 per filter."""
        await fill(engine, [row(1)])
        response = await client.get("/v1/items", params=params)
        # A list too long is, like a string too long, INPUT_TOO_LONG with its limit.
        top = "INPUT_TOO_LONG" if code == "too_many_values" else "INVALID_INPUT"
        body = assert_problem(response, field, code, top)
        assert 1 == len(body["errors"])

    async def test_repeated_filter_is_refused(self, client):
        """A filter given twice is refused rather than one value silently winning."""
        response = await client.get("/v1/items?filter[title]=a&filter[title]=b")
        assert_problem(response, "query.filter[title]", "repeated_filter")

    async def test_too_long_value_reports_its_limit(self, client):
        """A string longer than the filter allows is INPUT_TOO_LONG with the limit."""
        response = await client.get("/v1/items", params={"filter[title]": "x" * 41})
        assert 422 == response.status_code
        body = response.json()
        assert "INPUT_TOO_LONG" == body["code"]
        assert [{"field": "query.filter[title]", "code": "string_too_long"}] == [
            {"field": e["field"], "code": e["code"]} for e in body["errors"]
        ]
        assert 40 == body["errors"][0]["limit"]

    async def test_every_problem_is_listed(self, client):
        """Several bad filters give one 422 listing each of them."""
        response = await client.get("/v1/items?filter[nope]=1&filter[score]=x&filter[active]=2")
        body = response.json()
        assert {"query.filter[nope]", "query.filter[score]", "query.filter[active]"} == {
            e["field"] for e in body["errors"]
        }

    def test_integer_bounds_follow_the_column_type(self):
        """SMALLINT, INTEGER and BIGINT columns accept exactly their own range."""
        from sqlalchemy import BigInteger, SmallInteger

        from bastion.errors import InvalidInput

        where = filters(
            {
                "small": Filter(Column("small", SmallInteger), int),
                "normal": Filter(Column("normal", Integer), int),
                "big": Filter(Column("big", BigInteger), int),
            }
        )
        for name, bits in (("small", 16), ("normal", 32), ("big", 64)):
            top = 2 ** (bits - 1)
            where.parse([(f"filter[{name}]", str(top - 1))])
            where.parse([(f"filter[{name}]", str(-top))])
            with pytest.raises(InvalidInput):
                where.parse([(f"filter[{name}]", str(top))])

    def test_naive_datetime_columns_get_naive_utc(self):
        """A column without a time zone is compared with the UTC wall time, offset removed."""
        column = Column("at", DateTime(timezone=False))
        where = filters({"at": Filter(column, dt.datetime, ("gte",))})
        clause = where.parse([("filter[at][gte]", "2026-01-01T02:00:00+02:00")]).clauses[0]
        assert dt.datetime(2026, 1, 1) == clause.right.value  # type: ignore[attr-defined]
        with pytest.raises(Exception, match="not valid"):
            where.parse([("filter[at][gte]", "2026-01-01T00:00:00" + "0" * 80)])

    def test_other_parameters_are_ignored(self):
        """Parameters outside ``filter[...]`` (page, sort) are not the filters' business."""
        assert FilterSet() == filters({}).parse([("page", "2"), ("sort", "x")])
        # Named like the syntax, yet a route's own parameters.
        assert FilterSet() == filters({}).parse([("filter_mode", "all"), ("filtered", "1")])

    def test_declarations_that_cannot_work_are_refused(self):
        """Operators that do not fit the type, and unknown types, fail at import time."""
        with pytest.raises(ValueError, match="contains"):
            filters({"score": Filter(items.c.score, int, ("contains",))})
        with pytest.raises(ValueError, match="ordered"):
            filters({"active": Filter(items.c.active, bool, ("gte",))})
        with pytest.raises(ValueError, match="type"):
            filters({"score": Filter(items.c.score, float, ("eq",))})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="operators"):
            filters({"score": Filter(items.c.score, int, ("like",))})  # type: ignore[arg-type]
        with pytest.raises(ValueError, match="must match"):
            filters({"Score": Filter(items.c.score, int)})


class TestNul:
    @pytest.mark.parametrize(
        ("params", "field", "code"),
        [
            ({"sort": "title\x00"}, "query.sort", "invalid_sort"),
            ({"filter[title]": "a\x00b"}, "query.filter[title]", "invalid_value"),
        ],
    )
    async def test_nul_is_refused_by_the_guard_and_by_the_helpers(
        self, engine, params, field, code
    ):
        """A NUL in a sort or filter is a 422 and reaches no query: the installed request
        guard refuses the query string before the app runs, and with the guard off the
        sort and filter helpers still refuse the value themselves."""
        await fill(engine, [row(1)])
        async with lifespan_client(build_app(engine)) as client:
            guarded = await client.get("/v1/items", params=params)
        assert_problem(guarded, "query", "nul_character")
        async with lifespan_client(build_app(engine, {**GUARD, "enabled": False})) as client:
            unguarded = await client.get("/v1/items", params=params)
        assert_problem(unguarded, field, code)
        assert 1 == await count_rows(engine)


class TestPagination:
    async def test_first_last_and_beyond(self, client, engine):
        """Page 1, the last page and a page past the end carry the right items and links."""
        await fill(engine, [row(i) for i in range(1, 13)])
        params = {"sort": "id", "page_size": 5}
        first = (await client.get("/v1/items", params={**params, "page": 1})).json()
        assert [1, 2, 3, 4, 5] == ids(first)
        assert 12 == first["total"]
        assert first["links"]["prev"] is None
        assert "page=2" in first["links"]["next"]
        assert "page=3" in first["links"]["last"]
        last = (await client.get("/v1/items", params={**params, "page": 3})).json()
        assert [11, 12] == ids(last)
        assert last["links"]["next"] is None
        beyond = (await client.get("/v1/items", params={**params, "page": 9})).json()
        assert [] == beyond["items"]
        assert 12 == beyond["total"]
        assert beyond["links"]["next"] is None
        assert "page=3" in beyond["links"]["prev"]

    async def test_empty_list(self, client, engine):
        """An empty list has one (empty) page: last is page 1, no next or prev."""
        body = (await client.get("/v1/items")).json()
        assert (0, [], None, None) == (
            body["total"],
            body["items"],
            body["links"]["prev"],
            body["links"]["next"],
        )
        assert "page=1" in body["links"]["last"]

    async def test_page_size_bounds_come_from_settings(self, client, engine):
        """page_size defaults to guard.page_size_default and may reach guard.page_size_max."""
        await fill(engine, [row(i) for i in range(1, 30)])
        assert 5 == len((await client.get("/v1/items")).json()["items"])
        assert 1 == len((await client.get("/v1/items?page_size=1")).json()["items"])
        assert 20 == len((await client.get("/v1/items?page_size=20")).json()["items"])

    @pytest.mark.parametrize(
        ("query", "field", "code", "limit"),
        [
            ("page_size=21", "query.page_size", "less_than_equal", 20),
            ("page_size=0", "query.page_size", "greater_than_equal", 1),
            ("page_size=-1", "query.page_size", "greater_than_equal", 1),
            ("page=0", "query.page", "greater_than_equal", 1),
            (f"page={PAGE_MAX + 1}", "query.page", "less_than_equal", PAGE_MAX),
            ("page=" + "9" * 40, "query.page", "less_than_equal", PAGE_MAX),
        ],
    )
    async def test_out_of_bounds_is_refused_with_the_limit(self, client, query, field, code, limit):
        """A page or page size out of bounds is a 422 whose error carries the bound."""
        body = assert_problem(await client.get(f"/v1/items?{query}"), field, code)
        assert limit == body["errors"][0]["limit"]

    @pytest.mark.parametrize("query", ["page=x", "page_size=1.5", "page=", "page_size=%00"])
    async def test_non_numbers_are_refused(self, client, query):
        """A page or page size that is not an integer is a 422 in the problem envelope."""
        response = await client.get(f"/v1/items?{query}")
        assert 422 == response.status_code
        assert "INVALID_INPUT" == response.json()["code"]

    async def test_defaults_without_bastion_settings(self, engine):
        """Outside a bastion app the defaults are 50 per page and 1000 at most."""
        app = FastAPI()

        @app.get("/plain")
        async def plain(pages: Annotated[Pagination, Depends(pagination)]) -> list[int]:
            return [pages.page, pages.page_size]

        async with lifespan_client(app) as client:
            assert [1, 50] == (await client.get("/plain")).json()
            assert [2, 1000] == (await client.get("/plain?page=2&page_size=1000")).json()

    async def test_page_query_is_skipped_past_the_end(self, engine):
        """Past the end only the COUNT runs: no query for rows that cannot exist."""
        await fill(engine, [row(i) for i in range(1, 4)])
        scope = {"type": "http", "path": "/x", "query_string": b"", "headers": [], "app": None}
        request = Request(scope)
        async with AsyncSession(engine) as session:
            with count_queries(engine) as queries:
                page = await paginate(
                    session, select(items).order_by(items.c.id), Pagination(2, 3), request
                )
            assert 1 == queries.count
            assert [] == page.items
            with count_queries(engine) as queries:
                page = await paginate(
                    session, select(items.c.id).order_by(items.c.id), Pagination(1, 2), request
                )
            assert 2 == queries.count
            assert [1, 2] == page.items


class TestLinks:
    async def test_other_parameters_are_kept_and_encoded(self, client, engine):
        """Links keep sort and filters (encoded) and replace only page and page_size."""
        await fill(engine, [row(i, title="a&b=c d/é") for i in range(1, 8)])
        params = [
            ("sort", "-score,title"),
            ("filter[title]", "a&b=c d/é"),
            ("page", "2"),
            ("page_size", "3"),
        ]
        response = await client.get("/v1/items", params=params)
        body = response.json()
        assert [4, 5, 6] == sorted(ids(body))
        for rel in ("self", "first", "prev", "next", "last"):
            link = body["links"][rel]
            parts = urlsplit(link)
            assert "/v1/items" == parts.path
            query = parse_qsl(parts.query, keep_blank_values=True)
            assert [("sort", "-score,title"), ("filter[title]", "a&b=c d/é")] == query[:2]
            assert ["page", "page_size"] == [key for key, _ in query[2:]]
            assert ("page_size", "3") == query[3]
            assert " " not in link
            assert "é" not in link
        pages = {
            rel: dict(parse_qsl(urlsplit(body["links"][rel]).query))["page"]
            for rel in body["links"]
        }
        assert {"self": "2", "first": "1", "prev": "1", "next": "3", "last": "3"} == pages
        # Following a link gives the page it names, with the same filter.
        followed = (await client.get(body["links"]["next"])).json()
        assert [7] == ids(followed)

    async def test_path_is_encoded(self, client, engine):
        """The path of a link is percent-encoded again, so it can be followed as is."""
        await fill(engine, [row(1), row(2)])
        response = await client.get("/v1/groups/a%20b%3Fc/items", params={"page_size": 1})
        body = response.json()
        assert body["links"]["next"].startswith("/v1/groups/a%20b%3Fc/items?")
        followed = await client.get(body["links"]["next"])
        assert [2] == followed.json()["items"]

    async def test_link_header_matches_links(self, client, engine):
        """The ``Link`` header (RFC 8288) carries the same links as the body."""
        await fill(engine, [row(i) for i in range(1, 8)])
        response = await client.get("/v1/items?page=2&page_size=3&sort=id")
        links = response.json()["links"]
        header = response.headers["link"]
        found = {rel: url for url, rel in re.findall(r'<([^>]*)>; rel="([a-z]+)"', header)}
        assert links == found

    def test_link_header_skips_missing_links(self):
        """Links that do not exist (no prev on page 1) are left out of the header."""
        from bastion.guard._query import PageLinks

        links = PageLinks(
            self="/a?page=1", first="/a?page=1", prev=None, next=None, last="/a?page=1"
        )
        assert '</a?page=1>; rel="self", </a?page=1>; rel="first", </a?page=1>; rel="last"' == (
            link_header(links)
        )


class TestWalkProperty:
    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        values=st.lists(
            st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 2)), max_size=40
        ),
        page_size=st.integers(1, 7),
        sort=st.sampled_from(["title", "-title", "score,-title", "-score,title", "-created_at"]),
    )
    async def test_walking_next_links_yields_every_row_once_in_order(
        self, client, engine, values, page_size, sort
    ):
        """Following ``next`` from page 1 yields every row exactly once, in the declared order."""
        rows = [row(i, title=t, score=s) for i, (t, s) in enumerate(values, start=1)]
        await fill(engine, rows)
        seen: list[int] = []
        link: str | None = f"/v1/items?sort={sort}&page_size={page_size}"
        while link is not None:
            body = (await client.get(link)).json()
            seen.extend(ids(body))
            assert len(rows) == body["total"]
            link = body["links"]["next"]
        async with AsyncSession(engine) as session:
            spec = SORT.parse(sort)
            expected = list(await session.scalars(select(items.c.id).order_by(*spec.order_by)))
        assert expected == seen
        assert sorted(r["id"] for r in rows) == sorted(seen)
