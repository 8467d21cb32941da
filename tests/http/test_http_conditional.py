"""Conditional requests: ETags, If-Match and If-None-Match per RFC 9110, end to end in FastAPI."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
import sqlalchemy as sa
from fastapi import FastAPI, Request
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from starlette.datastructures import Headers

import bastion
from bastion.errors import NotFound, PreconditionFailed, PreconditionRequired
from bastion.http._conditional import (
    EntityTag,
    EntityTags,
    IfMatchVersion,
    IfNoneMatch,
    MalformedEntityTag,
    NotModified,
    document_preconditions,
    etag_for,
    expected_version,
    if_match_version_of,
    not_modified,
    parse_entity_tags,
    precondition_responses,
    require_if_match,
    weak_etag_for_body,
)

OFF: dict[str, Any] = {
    "database": {"enabled": False},
    "audit": {"enabled": False},
    "flags": {"enabled": False},
}


def request_with(method: str = "GET", **headers: str) -> Request:
    """A Starlette request carrying ``headers`` (underscores are dashes)."""
    raw = Headers({name.replace("_", "-"): value for name, value in headers.items()}).raw
    return Request({"type": "http", "method": method, "path": "/", "headers": raw})


class TestEtagFor:
    def test_version_tags(self):
        """A version column becomes a strong, quoted tag; a kind prefixes it."""
        assert '"v12"' == etag_for(12)
        assert '"doc-12"' == etag_for(12, kind="doc")
        assert '"vabc"' == etag_for("abc")

    @pytest.mark.parametrize("bad", [-1, 2**63, "", 'a"b', "a b", True])
    def test_rejects_unrepresentable_versions(self, bad):
        """A version a tag cannot carry (or a bool) is refused, not rendered broken."""
        with pytest.raises((ValueError, TypeError)):
            etag_for(bad)

    def test_weak_body_tag(self):
        """A body hash is a weak tag: stable for equal bodies, different for others."""
        tag = weak_etag_for_body(b"hello")
        assert tag.startswith('W/"')
        assert tag == weak_etag_for_body(b"hello")
        assert tag != weak_etag_for_body(b"hello!")
        assert EntityTag.parse(tag).weak


class TestParsing:
    @pytest.mark.parametrize(
        ("header", "expected"),
        [
            ('"xyzzy"', (EntityTag("xyzzy"),)),
            ('W/"xyzzy"', (EntityTag("xyzzy", weak=True),)),
            (
                '"xyzzy", "r2d2xxxx", "c3piozzzz"',
                (EntityTag("xyzzy"), EntityTag("r2d2xxxx"), EntityTag("c3piozzzz")),
            ),
            ('  "a" ,\t W/"b"  ', (EntityTag("a"), EntityTag("b", weak=True))),
            ('"a", , "b",', (EntityTag("a"), EntityTag("b"))),
            ('""', (EntityTag(""),)),
            ('"a,b"', (EntityTag("a,b"),)),
        ],
    )
    def test_lists(self, header, expected):
        """Lists, weak tags, whitespace, empty elements, commas in tags parse per RFC 9110."""
        assert EntityTags(any=False, tags=expected) == parse_entity_tags(header)

    def test_star(self):
        """``*`` alone means any current representation."""
        assert parse_entity_tags(" * ").any

    @pytest.mark.parametrize(
        "header", ["", " ", ",", "xyzzy", '"a" "b"', '"a', 'w/"a"', '*, "a"', '"a b"', '"a"x']
    )
    def test_malformed(self, header):
        """Unquoted tags, missing commas, ``*`` in a list, lowercase ``w/`` are malformed."""
        with pytest.raises(MalformedEntityTag):
            parse_entity_tags(header)


class TestComparison:
    # RFC 9110 section 8.8.3.2's table: ETag 1, ETag 2, strong, weak.
    @pytest.mark.parametrize(
        ("first", "second", "strong", "weak"),
        [
            ('W/"1"', 'W/"1"', False, True),
            ('W/"1"', 'W/"2"', False, False),
            ('W/"1"', '"1"', False, True),
            ('"1"', '"1"', True, True),
        ],
    )
    def test_rfc_table(self, first, second, strong, weak):
        """Strong and weak comparison follow RFC 9110's example table exactly."""
        one, two = EntityTag.parse(first), EntityTag.parse(second)
        assert strong == one.strong_equals(two) == two.strong_equals(one)
        assert weak == one.weak_equals(two) == two.weak_equals(one)

    def test_star_needs_a_current_representation(self):
        """``*`` matches any existing resource and nothing when there is none."""
        star = parse_entity_tags("*")
        assert star.strong_match('"v1"')
        assert not star.strong_match(None)
        assert not star.weak_match(None)


OPAQUE = st.text(alphabet=st.sampled_from([chr(c) for c in (0x21, *range(0x23, 0x7F))]), max_size=6)
TAGS = st.lists(st.tuples(OPAQUE, st.booleans()), min_size=1, max_size=6)
OWS = st.sampled_from(["", " ", "\t", "  "])


class TestProperties:
    @given(
        tags=TAGS,
        current=OPAQUE,
        current_weak=st.booleans(),
        spaces=st.lists(OWS, min_size=14, max_size=14),
    )
    def test_if_match_equals_reference(self, tags, current, current_weak, spaces):
        """For any tag list, If-Match matching equals a reference RFC 9110 strong comparison."""
        parts = [f'{spaces[i % 14]}{"W/" if weak else ""}"{o}"' for i, (o, weak) in enumerate(tags)]
        header = ",".join(part + spaces[(i + 7) % 14] for i, part in enumerate(parts))
        parsed = parse_entity_tags(header)
        assert tuple(EntityTag(o, w) for o, w in tags) == parsed.tags
        current_tag = EntityTag(current, current_weak)
        reference = not current_weak and any(not w and o == current for o, w in tags)
        assert reference == parsed.strong_match(current_tag)
        assert any(o == current for o, _ in tags) == parsed.weak_match(current_tag)

    @given(version=st.integers(0, 2**63 - 1), kind=st.none() | st.sampled_from(["doc", "a-b"]))
    def test_expected_version_round_trips(self, version, kind):
        """Whatever etag_for makes, expected_version reads back as the same version."""
        request = request_with("PATCH", if_match=etag_for(version, kind=kind))
        assert version == expected_version(request, kind=kind)


class TestHelpers:
    def test_not_modified_is_weak_and_for_reads_only(self):
        """If-None-Match compares weakly and only on GET/HEAD; malformed is ignored."""
        assert not_modified(request_with(if_none_match='W/"v1"'), '"v1"')
        assert not_modified(request_with("HEAD", if_none_match='"x", "v1"'), '"v1"')
        assert not_modified(request_with(if_none_match="*"), '"v1"')
        assert not not_modified(request_with("PATCH", if_none_match='"v1"'), '"v1"')
        assert not not_modified(request_with(if_none_match='"v2"'), '"v1"')
        assert not not_modified(request_with(if_none_match="v1"), '"v1"')
        assert not not_modified(request_with(), '"v1"')
        assert not not_modified(request_with(if_none_match="*"), None)

    def test_not_modified_response(self):
        """NotModified is a 304 with the ETag, the repeated headers, and no body."""
        response = NotModified('"v3"', {"cache-control": "private"})
        assert 304 == response.status_code
        assert b"" == response.body
        assert '"v3"' == response.headers["etag"]
        assert "private" == response.headers["cache-control"]

    def test_require_if_match(self):
        """428 without the header, 412 with the current ETag when stale, weak or malformed."""
        with pytest.raises(PreconditionRequired) as required:
            require_if_match(request_with("PUT"), '"v2"')
        assert '"v2"' == required.value.headers["etag"]
        for header in ['"v1"', 'W/"v2"', "v2", '"v1", W/"v2"']:
            with pytest.raises(PreconditionFailed) as failed:
                require_if_match(request_with("PUT", if_match=header), '"v2"')
            assert '"v2"' == failed.value.headers["etag"]
        assert require_if_match(request_with("PUT", if_match='"v1", "v2"'), '"v2"').tags
        assert require_if_match(request_with("PUT", if_match="*"), '"v2"').any
        with pytest.raises(PreconditionFailed) as missing:
            require_if_match(request_with("PUT", if_match="*"), None)
        assert {} == missing.value.headers

    @pytest.mark.parametrize(
        "header",
        [
            '"v1", "v2"',
            'W/"v1"',
            "*",
            "v1",
            '"doc-1"',
            '"v01"',
            '"v"',
            '"v-1"',
            '"v1x"',
            '"v9' + "9" * 19 + '"',
        ],
    )
    def test_expected_version_refuses_what_it_cannot_read(self, header):
        """Lists, weak tags, ``*``, other kinds and non-canonical numbers are 412."""
        with pytest.raises(PreconditionFailed):
            expected_version(request_with("PATCH", if_match=header))

    def test_expected_version_needs_the_header(self):
        """Without If-Match a write is 428, never applied unconditionally."""
        with pytest.raises(PreconditionRequired):
            expected_version(request_with("PATCH"))
        assert 7 == expected_version(request_with("PATCH", if_match=' "doc-7" '), kind="doc")

    def test_precondition_responses(self):
        """The OpenAPI helper lists 412/428 for writes and 304 for reads."""
        assert {412, 428} == set(precondition_responses())
        assert {304} == set(precondition_responses(write=False, read=True))
        assert ["PRECONDITION_FAILED"] == precondition_responses()[412]["x-error-codes"]


# Module level: the annotations are strings FastAPI resolves in the module's namespace.
DocVersion = if_match_version_of("doc")


class TestKindedDependency:
    async def test_if_match_version_of_kind(self):
        """A route taking ``if_match_version_of("doc")`` reads "doc-N" tags and nothing else."""
        app = FastAPI()
        assert DocVersion is if_match_version_of("doc")

        @app.patch("/v1/docs/{doc_id}")
        async def update(doc_id: int, version: DocVersion) -> dict[str, int]:
            return {"version": version}

        bastion.install(app, **OFF)
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
                ok = await client.patch("/v1/docs/1", headers={"If-Match": '"doc-4"'})
                plain = await client.patch("/v1/docs/1", headers={"If-Match": '"v4"'})
                missing = await client.patch("/v1/docs/1")
        assert {"version": 4} == ok.json()
        assert 412 == plain.status_code
        assert 428 == missing.status_code
        schema = app.openapi()
        document_preconditions(schema, app.router.routes)
        operation = schema["paths"]["/v1/docs/{doc_id}"]["patch"]
        assert [True] == [p["required"] for p in operation["parameters"] if p["name"] == "If-Match"]
        with pytest.raises(ValueError, match="kind"):
            if_match_version_of('bad"kind')


@asynccontextmanager
async def documents_service(url: str) -> AsyncIterator[tuple[httpx.AsyncClient, AsyncEngine]]:
    """A FastAPI documents API with bastion installed, its rows in an SQLite table."""
    engine = create_async_engine(url)
    metadata = sa.MetaData()
    docs = sa.Table(
        "docs",
        metadata,
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.String, nullable=False),
        sa.Column("version", sa.Integer, nullable=False),
    )
    async with engine.begin() as connection:
        await connection.run_sync(metadata.create_all)
        await connection.execute(docs.insert().values(id=1, title="first", version=1))

    app = FastAPI()

    async def current(doc_id: int) -> Any:
        async with engine.connect() as connection:
            row = (await connection.execute(sa.select(docs).where(docs.c.id == doc_id))).first()
        if row is None:
            raise NotFound("No such document.")
        return row

    @app.get("/v1/docs/{doc_id}", responses=precondition_responses(write=False, read=True))
    async def read(doc_id: int, cached: IfNoneMatch) -> Any:
        row = await current(doc_id)
        etag = etag_for(row.version)
        if cached is not None and cached.weak_match(etag):
            return NotModified(etag)
        return {"title": row.title, "version": row.version}

    @app.patch("/v1/docs/{doc_id}")
    async def update(doc_id: int, version: IfMatchVersion, body: dict[str, str]) -> Any:
        async with engine.begin() as connection:
            # The comparison is in the UPDATE: no read-then-write window.
            result = await connection.execute(
                docs.update()
                .where(docs.c.id == doc_id, docs.c.version == version)
                .values(title=body["title"], version=docs.c.version + 1)
            )
        if result.rowcount == 0:
            row = await current(doc_id)
            raise PreconditionFailed(
                "The document changed since you read it.",
                headers={"etag": etag_for(row.version)},
            )
        return {"version": version + 1}

    @app.middleware("http")
    async def add_etag(request: Request, call_next: Any) -> Any:
        response = await call_next(request)
        if request.method == "GET" and response.status_code == 200:
            doc_id = int(request.url.path.rsplit("/", 1)[1])
            response.headers["etag"] = etag_for((await current(doc_id)).version)
        return response

    bastion.install(app, **OFF)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield client, engine
    await engine.dispose()


class TestEndToEnd:
    async def test_read_with_etag_and_304(self, sqlite_url):
        """A GET gives an ETag; sending it back in If-None-Match gives an empty 304."""
        async with documents_service(sqlite_url) as (client, _):
            first = await client.get("/v1/docs/1")
            assert 200 == first.status_code
            assert '"v1"' == first.headers["etag"]
            again = await client.get("/v1/docs/1", headers={"If-None-Match": first.headers["etag"]})
            assert 304 == again.status_code
            assert b"" == again.content
            assert '"v1"' == again.headers["etag"]
            malformed = await client.get("/v1/docs/1", headers={"If-None-Match": "v1"})
            assert 200 == malformed.status_code

    async def test_write_without_if_match_is_428(self, sqlite_url):
        """A PATCH without If-Match is refused 428 PRECONDITION_REQUIRED, as a problem."""
        async with documents_service(sqlite_url) as (client, _):
            response = await client.patch("/v1/docs/1", json={"title": "x"})
            assert 428 == response.status_code
            assert "application/problem+json" == response.headers["content-type"]
            assert "PRECONDITION_REQUIRED" == response.json()["code"]

    @pytest.mark.parametrize("header", ["v1", 'W/"v1"', '"v1", "v2"', "*", '"v'])
    async def test_unreadable_if_match_is_412(self, sqlite_url, header):
        """A malformed, weak, listed or wildcard If-Match is 412, never a 500 nor an update."""
        async with documents_service(sqlite_url) as (client, _):
            response = await client.patch(
                "/v1/docs/1", json={"title": "x"}, headers={"If-Match": header}
            )
            assert 412 == response.status_code
            assert "PRECONDITION_FAILED" == response.json()["code"]
            assert "first" == (await client.get("/v1/docs/1")).json()["title"]

    async def test_lost_update_is_prevented(self, sqlite_url):
        """Two clients read v1 and both PATCH: one wins, the other gets 412 with the ETag."""
        async with documents_service(sqlite_url) as (client, engine):
            etag = (await client.get("/v1/docs/1")).headers["etag"]
            responses = await asyncio.gather(
                *(
                    client.patch(
                        "/v1/docs/1", json={"title": f"by {who}"}, headers={"If-Match": etag}
                    )
                    for who in ("alice", "bob")
                )
            )
            assert [200, 412] == sorted(r.status_code for r in responses)
            loser = next(r for r in responses if r.status_code == 412)
            assert '"v2"' == loser.headers["etag"]
            assert "PRECONDITION_FAILED" == loser.json()["code"]
            async with engine.connect() as connection:
                version = (await connection.execute(sa.text("SELECT version FROM docs"))).scalar()
            assert 2 == version
            retried = await client.patch(
                "/v1/docs/1", json={"title": "retry"}, headers={"If-Match": loser.headers["etag"]}
            )
            assert {"version": 3} == retried.json()

    async def test_openapi_declares_the_headers(self, sqlite_url):
        """The write declares If-Match required, 412 and 428; the read If-None-Match and 304."""
        async with documents_service(sqlite_url) as (client, _):
            app = client._transport.app  # type: ignore[attr-defined]
            schema = app.openapi()
            document_preconditions(schema, app.router.routes)
            patch = schema["paths"]["/v1/docs/{doc_id}"]["patch"]
            if_match = next(p for p in patch["parameters"] if p["name"] == "If-Match")
            assert if_match["in"] == "header"
            assert if_match["required"] is True
            assert {"412", "428"} <= set(patch["responses"])
            get = schema["paths"]["/v1/docs/{doc_id}"]["get"]
            assert "304" in get["responses"]
            assert any(p["name"] == "If-None-Match" for p in get["parameters"])
