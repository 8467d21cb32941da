"""Keyset pagination: tamper-evident cursors and complete walks on SQLite and PostgreSQL."""

from __future__ import annotations

import base64
import datetime as dt
import decimal
import uuid
from collections.abc import AsyncIterator
from typing import Annotated, Any

import orjson
import pytest
from fastapi import Depends, FastAPI, Request
from guard_support import OFF, empty_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict
from sqlalchemy import Column, DateTime, Integer, MetaData, String, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import registry

import bastion
from bastion.errors import InvalidInput
from bastion.guard._cursor import (
    CURSOR_MAX_CHARS,
    CursorPage,
    CursorQuery,
    cursor_paginate,
    cursor_query,
    decode_cursor,
    encode_cursor,
    keyset_condition,
)
from bastion.guard._query import SortSpec, sorting
from bastion.testing import lifespan_client

KEY = b"k" * 32
OTHER_KEY = b"o" * 32
metadata = MetaData()
events = Table(
    "guard_cursor_events",
    metadata,
    Column("id", Integer, primary_key=True, autoincrement=False),
    Column("kind", String(20), nullable=False),
    Column("size", Integer, nullable=False),
    Column("at", DateTime(timezone=True), nullable=False),
    Column("note", String(20), nullable=True),
)
T0 = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
SORT = sorting(
    {"kind": events.c.kind, "size": events.c.size, "at": events.c.at},
    default="-at",
    tiebreak=events.c.id,
)


class Event:
    """An ORM class mapped onto the table, to page through entities."""

    id: int
    kind: str


registry().map_imperatively(Event, events)


class EventOut(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    kind: str


def spec(sort: str) -> SortSpec:
    return SORT.parse(sort)


def row(i: int, kind: str = "a", size: int = 0, minutes: int = 0) -> dict[str, Any]:
    return {"id": i, "kind": kind, "size": size, "at": T0 + dt.timedelta(minutes=minutes)}


@pytest.fixture(params=["sqlite", "postgres"])
async def engine(request, sqlite_url: str, _module_postgres) -> AsyncIterator[AsyncEngine]:
    """An engine on an empty ``guard_cursor_events`` table, on SQLite and on PostgreSQL."""
    async for engine in empty_engine(request, sqlite_url, _module_postgres, metadata):
        yield engine


async def fill(engine: AsyncEngine, rows: list[dict[str, Any]], *, clear: bool = True) -> None:
    async with engine.begin() as connection:
        if clear:
            await connection.execute(events.delete())
        if rows:
            await connection.execute(events.insert(), rows)


async def walk(engine: AsyncEngine, order: Any, limit: int, between: Any = None) -> list[int]:
    seen: list[int] = []
    cursor: str | None = None
    step = 0
    while True:
        async with AsyncSession(engine) as session:
            page = await cursor_paginate(
                session,
                select(events.c.id),
                order=order,
                limit=limit,
                cursor=cursor,
                key=KEY,
            )
        assert len(page.items) <= limit
        seen.extend(page.items)
        if page.next_cursor is None:
            return seen
        cursor = page.next_cursor
        step += 1
        if between is not None:
            await between(step)


def refused(call: Any) -> InvalidInput:
    with pytest.raises(InvalidInput) as caught:
        call()
    error = caught.value
    assert "INVALID_INPUT" == error.code.value
    assert [("query.cursor", "invalid_cursor")] == [(e.field, e.code) for e in error.errors]
    return error


class TestCursorToken:
    @pytest.mark.parametrize(
        "values",
        [
            [1, "x"],
            ["", -(2**62)],
            [True, False],
            [dt.datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=dt.UTC), 7],
            [dt.datetime(2026, 1, 2, 3, 4, 5, 678901), 7],
            [dt.date(2026, 2, 28), uuid.UUID(int=5)],
            [decimal.Decimal("12.3400"), 0.1],
            ["ünïcødé \u202e", "2026-01-01T00:00:00"],
        ],
    )
    def test_values_round_trip_with_their_types(self, values):
        """What goes into a cursor comes back equal and of the same type."""
        order = [(events.c.kind, False), (events.c.id, False)]
        back = decode_cursor(encode_cursor(values, key=KEY, order=order), key=KEY, order=order)
        assert values == back
        assert [type(v) for v in values] == [type(v) for v in back]

    def test_cursor_is_url_safe(self):
        """A cursor needs no escaping in a query string."""
        cursor = encode_cursor(["a b/c?d&e", 1], key=KEY, order=spec("kind"))
        assert set(cursor) <= set(
            "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_."
        )

    def test_tampering_is_detected(self):
        """Changing any character of a cursor makes it invalid."""
        order = spec("kind")
        cursor = encode_cursor(["a", 1], key=KEY, order=order)
        for index in range(len(cursor)):
            replacement = "A" if cursor[index] != "A" else "B"
            altered = cursor[:index] + replacement + cursor[index + 1 :]
            refused(lambda altered=altered: decode_cursor(altered, key=KEY, order=order))

    def test_forged_payload_without_the_key_is_refused(self):
        """A client that rewrites the values and recomputes nothing is refused."""
        order = spec("kind")
        cursor = encode_cursor(["a", 1], key=KEY, order=order)
        payload, _, mac = cursor.partition(".")
        document = orjson.loads(base64.urlsafe_b64decode(payload + "=="))
        document["k"] = ["z", 999]
        forged = base64.urlsafe_b64encode(orjson.dumps(document)).rstrip(b"=").decode() + "." + mac
        refused(lambda: decode_cursor(forged, key=KEY, order=order))

    def test_another_key_is_refused(self):
        """A cursor signed with another key (another deployment) is refused."""
        order = spec("kind")
        cursor = encode_cursor(["a", 1], key=OTHER_KEY, order=order)
        refused(lambda: decode_cursor(cursor, key=KEY, order=order))

    @pytest.mark.parametrize("other", ["-kind", "kind,size", "size", "at"])
    def test_another_ordering_is_refused(self, other):
        """A cursor made under one sort is refused under another, even with the same key."""
        cursor = encode_cursor(["a", 1], key=KEY, order=spec("kind"))
        error = refused(lambda: decode_cursor(cursor, key=KEY, order=spec(other)))
        assert "another ordering" in error.errors[0].message

    @pytest.mark.parametrize(
        "cursor",
        [
            "",
            ".",
            "abc",
            "a.b.c",
            "!!!.???",
            "eyJ2IjoxfQ.",
            "é.é",
            "a" * (CURSOR_MAX_CHARS + 1),
            "eyJ2Ijox fQ.AAAA",
        ],
    )
    def test_garbled_cursors_are_refused(self, cursor):
        """Anything that is not a cursor this application made is refused, never a 500."""
        refused(lambda: decode_cursor(cursor, key=KEY, order=spec("kind")))

    def test_short_key_and_null_values_are_programming_errors(self):
        """A key under 16 bytes, or a NULL sort value, is refused loudly on the server."""
        with pytest.raises(ValueError, match="16 bytes"):
            encode_cursor([1], key=b"short", order=spec("kind"))
        with pytest.raises(ValueError, match="NULL"):
            encode_cursor([None, 1], key=KEY, order=spec("kind"))
        with pytest.raises(ValueError, match="nullable"):
            encode_cursor([1], key=KEY, order=[(events.c.note, False)])

    @pytest.mark.parametrize(
        "payload",
        [
            b"not json",
            b"[1, 2]",
            b'{"v": 2, "o": "x", "k": []}',
            b'{"v": 1, "o": "FINGERPRINT", "k": "ab"}',
            b'{"v": 1, "o": "FINGERPRINT", "k": [["t", "not a date"], 1]}',
            b'{"v": 1, "o": "FINGERPRINT", "k": [["?", "x"], 1]}',
            b'{"v": 1, "o": "FINGERPRINT", "k": [["n", "1.2.3"], 1]}',
            b'{"v": 1, "o": "FINGERPRINT", "k": [null, 1]}',
            b'{"v": 1, "o": "FINGERPRINT", "k": [1]}',
        ],
    )
    def test_signed_but_malformed_payloads_are_refused(self, payload):
        """Even a correctly signed payload of the wrong shape is refused, not a 500."""
        from bastion.guard._cursor import _b64, _key_bytes, _mac, order_fingerprint

        order = spec("kind")
        payload = payload.replace(b"FINGERPRINT", order_fingerprint(order).encode())
        cursor = f"{_b64(payload)}.{_b64(_mac(_key_bytes(KEY), payload))}"
        refused(lambda: decode_cursor(cursor, key=KEY, order=order))

    def test_unsupported_values_and_orders_are_programming_errors(self):
        """Values a cursor cannot carry, and empty or mismatched orders, fail loudly."""
        with pytest.raises(TypeError, match="bytes"):
            encode_cursor([b"x", 1], key=KEY, order=spec("kind"))
        with pytest.raises(ValueError, match="at least one column"):
            encode_cursor([], key=KEY, order=[])
        with pytest.raises(ValueError, match="one value per sort column"):
            keyset_condition(spec("kind"), ["a"])


class TestKeysetCondition:
    def test_one_direction_is_a_row_value_comparison(self):
        """When every key goes one way, the WHERE is one (a, b) > (x, y) comparison."""
        for dialect in (sqlite.dialect(), postgresql.dialect()):
            ascending = str(keyset_condition(spec("kind"), ["a", 1]).compile(dialect=dialect))
            assert "(guard_cursor_events.kind, guard_cursor_events.id) >" in ascending
            descending = str(keyset_condition(spec("-kind"), ["a", 1]).compile(dialect=dialect))
            assert "(guard_cursor_events.kind, guard_cursor_events.id) <" in descending

    def test_mixed_directions_expand(self):
        """Mixed directions give the expanded OR of equalities and one comparison."""
        text = str(keyset_condition(spec("kind,-size"), ["a", 1, 2]))
        assert " OR " in text
        assert "guard_cursor_events.size <" in text
        assert "guard_cursor_events.kind >" in text

    def test_values_are_bound_parameters(self):
        """Cursor values reach SQL as parameters, never as text."""
        hostile = "a'); DROP TABLE guard_cursor_events; --"
        for order in (spec("kind"), spec("kind,-size")):
            compiled = keyset_condition(order, [hostile, 1, 2][: len(order.keys)]).compile()
            assert "DROP" not in str(compiled)
            assert hostile in compiled.params.values()


class TestWalk:
    @settings(
        max_examples=30,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        values=st.lists(
            st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 2), st.integers(0, 3)),
            max_size=40,
        ),
        limit=st.integers(1, 6),
        sort=st.sampled_from(
            ["kind", "-kind", "kind,size", "-kind,-size", "kind,-size", "-size,at", "-at"]
        ),
    )
    async def test_walk_yields_every_row_once_in_order(self, engine, values, limit, sort):
        """Following next_cursor yields every row exactly once, in the declared order."""
        rows = [row(i, k, s, m) for i, (k, s, m) in enumerate(values, start=1)]
        await fill(engine, rows)
        order = spec(sort)
        seen = await walk(engine, order, limit)
        async with AsyncSession(engine) as session:
            expected = list(await session.scalars(select(events.c.id).order_by(*order.order_by)))
        assert expected == seen

    @settings(
        max_examples=25,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(
        values=st.lists(
            st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 2)), min_size=1, max_size=30
        ),
        inserted=st.lists(
            st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), st.integers(0, 2)), max_size=4),
            max_size=8,
        ),
        limit=st.integers(1, 5),
        sort=st.sampled_from(["kind", "-kind,size", "size,-kind"]),
    )
    async def test_inserts_between_pages_never_repeat_or_skip(
        self, engine, values, inserted, limit, sort
    ):
        """Rows inserted while walking never make an original row repeat or go missing."""
        rows = [row(i, k, s) for i, (k, s) in enumerate(values, start=1)]
        await fill(engine, rows)
        next_id = len(rows) + 1

        async def insert(step: int) -> None:
            nonlocal next_id
            if step - 1 < len(inserted):
                batch = []
                for kind, size in inserted[step - 1]:
                    batch.append(row(next_id, kind, size))
                    next_id += 1
                await fill(engine, batch, clear=False)

        order = spec(sort)
        seen = await walk(engine, order, limit, between=insert)
        assert len(seen) == len(set(seen))
        assert {r["id"] for r in rows} <= set(seen)
        # What was seen is in the declared order, newly inserted rows included.
        async with AsyncSession(engine) as session:
            everything = list(await session.scalars(select(events.c.id).order_by(*order.order_by)))
        position = {id_: index for index, id_ in enumerate(everything)}
        assert sorted(seen, key=position.__getitem__) == seen

    async def test_entities_rows_and_explicit_orders(self, engine):
        """Entities, multi-column rows and (column, descending) pairs page alike."""
        await fill(engine, [row(i, "ab"[i % 2], i % 3) for i in range(1, 8)])
        order = [(events.c.size, True), (events.c.id, False)]
        async with AsyncSession(engine) as session:
            first = await cursor_paginate(
                session,
                select(Event),
                order=order,
                limit=3,
                cursor=None,
                key=KEY,
                item=EventOut.model_validate,
            )
            assert [2, 5, 1] == [item.id for item in first.items]
            second = await cursor_paginate(
                session,
                select(events.c.id, events.c.kind),
                order=order,
                limit=10,
                cursor=first.next_cursor,
                key=KEY,
            )
        assert [(4, "a"), (7, "b"), (3, "b"), (6, "a")] == second.items
        assert second.next_cursor is None

    async def test_limit_must_be_positive(self, engine):
        """A limit below 1 is a programming error, not an empty page."""
        async with AsyncSession(engine) as session:
            with pytest.raises(ValueError, match="limit"):
                await cursor_paginate(
                    session, select(events.c.id), order=spec("kind"), limit=0, cursor=None, key=KEY
                )

    async def test_empty_and_exact_pages(self, engine):
        """An empty list has no next cursor; a list that fills the last page exactly has none."""
        async with AsyncSession(engine) as session:
            page = await cursor_paginate(
                session, select(events.c.id), order=spec("kind"), limit=2, cursor=None, key=KEY
            )
            assert ([], None) == (page.items, page.next_cursor)
        await fill(engine, [row(1), row(2)])
        async with AsyncSession(engine) as session:
            page = await cursor_paginate(
                session, select(events.c.id), order=spec("kind"), limit=2, cursor=None, key=KEY
            )
        assert ([1, 2], None) == (page.items, page.next_cursor)

    async def test_filters_are_kept(self, engine):
        """The statement's own WHERE holds on every page."""
        await fill(engine, [row(i, "ab"[i % 2]) for i in range(1, 11)])
        seen: list[int] = []
        cursor = None
        while True:
            async with AsyncSession(engine) as session:
                page = await cursor_paginate(
                    session,
                    select(events.c.id).where(events.c.kind == "a"),
                    order=spec("-kind"),
                    limit=2,
                    cursor=cursor,
                    key=KEY,
                )
            seen.extend(page.items)
            if (cursor := page.next_cursor) is None:
                break
        assert [10, 8, 6, 4, 2] == seen


def build_app(engine: AsyncEngine) -> FastAPI:
    app = FastAPI()
    bastion.install(app, guard={"page_size_default": 3, "page_size_max": 10}, **OFF)

    @app.get("/v1/events")
    async def list_events(
        request: Request,
        sort: Annotated[SortSpec, Depends(SORT)],
        query: Annotated[CursorQuery, Depends(cursor_query)],
    ) -> CursorPage[EventOut]:
        async with AsyncSession(engine) as session:
            return await cursor_paginate(
                session,
                select(Event),
                order=sort,
                limit=query.limit,
                cursor=query.cursor,
                key=KEY,
                request=request,
                item=EventOut.model_validate,
            )

    return app


class TestHttp:
    async def test_following_next_links_walks_the_list(self, engine):
        """``links.next`` keeps the sort and the limit and leads to the next page."""
        await fill(engine, [row(i, "abc"[i % 3], minutes=i % 4) for i in range(1, 12)])
        async with lifespan_client(build_app(engine)) as client:
            link: str | None = "/v1/events?sort=kind,-at&limit=4"
            seen = []
            while link is not None:
                response = await client.get(link)
                assert 200 == response.status_code, response.text
                body = response.json()
                assert body["links"]["self"].startswith("/v1/events?sort=kind%2C-at&limit=4")
                seen.extend(item["id"] for item in body["items"])
                link = body["links"]["next"]
                if link is not None:
                    assert link.startswith("/v1/events?sort=kind%2C-at&limit=4&cursor=")
        async with AsyncSession(engine) as session:
            order = spec("kind,-at").order_by
            assert list(await session.scalars(select(events.c.id).order_by(*order))) == seen

    async def test_invalid_cursor_is_a_problem(self, engine):
        """A tampered or foreign cursor is a 422 INVALID_INPUT naming query.cursor."""
        await fill(engine, [row(i) for i in range(1, 6)])
        async with lifespan_client(build_app(engine)) as client:
            first = (await client.get("/v1/events?sort=kind&limit=2")).json()
            cursor = first["next_cursor"]
            for params in (
                {"sort": "kind", "cursor": cursor[:-2] + ("AA" if cursor[-2:] != "AA" else "BB")},
                {"sort": "-kind", "cursor": cursor},
                {"sort": "kind", "cursor": "garbage"},
                {"sort": "kind", "cursor": "x" * (CURSOR_MAX_CHARS + 1)},
            ):
                response = await client.get("/v1/events", params=params)
                assert 422 == response.status_code, response.text
                body = response.json()
                assert "INVALID_INPUT" == body["code"]
                assert [{"field": "query.cursor", "code": "invalid_cursor"}] == [
                    {"field": e["field"], "code": e["code"]} for e in body["errors"]
                ]

    @pytest.mark.parametrize(
        ("limit", "code", "bound"), [(11, "less_than_equal", 10), (0, "greater_than_equal", 1)]
    )
    async def test_limit_bounds(self, engine, limit, code, bound):
        """``limit`` is bounded by guard.page_size_max, with the bound in the error."""
        async with lifespan_client(build_app(engine)) as client:
            response = await client.get(f"/v1/events?limit={limit}")
            assert 422 == response.status_code
            assert [("query.limit", code, bound)] == [
                (e["field"], e["code"], e["limit"]) for e in response.json()["errors"]
            ]

    async def test_default_limit_comes_from_settings(self, engine):
        """Without ``limit`` a page holds guard.page_size_default items."""
        await fill(engine, [row(i) for i in range(1, 9)])
        async with lifespan_client(build_app(engine)) as client:
            body = (await client.get("/v1/events")).json()
        assert 3 == len(body["items"])
        assert body["next_cursor"] is not None

    async def test_table_is_intact_after_hostile_cursors(self, engine):
        """Hostile cursor strings change nothing in the database."""
        await fill(engine, [row(i) for i in range(1, 4)])
        async with lifespan_client(build_app(engine)) as client:
            for cursor in ("'; DROP TABLE guard_cursor_events; --", "(select 1)", "a.b"):
                response = await client.get("/v1/events", params={"cursor": cursor})
                assert 422 == response.status_code
        async with engine.connect() as connection:
            assert 3 == await connection.scalar(select(func.count()).select_from(events))
