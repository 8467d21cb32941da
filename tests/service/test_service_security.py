"""Attacks on the reference service, on SQLite and PostgreSQL: each gets its documented
error, leaves nothing written, and never reaches another tenant's data.

SQL injection in every query, sort, filter and path parameter; stored and reflected XSS
in every text field; CSRF on the cookie refresh flow; SSRF through fetched URLs (the
service fetches none, so bastion's ``FetchUrl``/``SafeTransport`` are attacked through a
tiny route of this module); oversized, deeply nested, malformed, invalid UTF-8 and NUL
bodies; oversized headers and query strings. Every response also passes the OpenAPI
contract checker (:mod:`contract_support`).
"""

from __future__ import annotations

import http.server
import secrets
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import ClassVar
from urllib.parse import quote

import httpx
import pytest
from contract_support import ContractRecorder, check_response
from fastapi import FastAPI
from pydantic import BaseModel
from sqlalchemy import func, select

import bastion
from bastion.guard import FetchUrl, SafeHtml, SafeTransport
from bastion.testing import create_member, lifespan_client
from bastion_docs.models import Document

PASSWORD = "quiet-lantern-harbour-58"
OVERSIZED = 5 * 1024 * 1024
"""Bytes of a body over any route's bound (document writes take up to about 3.1 MiB)."""

SQL_INJECTIONS = (
    "' OR '1'='1",
    "1 OR 1=1",
    "1; DROP TABLE documents; --",
    "title; DELETE FROM documents",
    "-created_at) UNION SELECT id, title FROM documents --",
    '" OR ""="',
    "1' AND SLEEP(0)--",
    "%' OR tenant_id IS NOT NULL OR '%'='",
)

XSS = (
    "<script>alert(1)</script>",
    '"><img src=x onerror=alert(1)>',
    "<svg/onload=alert(1)>",
    "javascript:alert(document.cookie)",
    '<a href="javascript:alert(1)">x</a>',
)

JSON_MEDIA = {"application/json", "application/problem+json"}


def unique_email(label: str) -> str:
    """An address no other test of the session uses (users are global)."""
    return f"{label}-{secrets.token_hex(5)}@example.test"


async def document_rows(app: FastAPI) -> int:
    """Documents in the whole database, every tenant's."""
    async with app.state.bastion.database.session() as session:
        return int(await session.scalar(select(func.count()).select_from(Document)) or 0)


def assert_json_not_html(response: httpx.Response) -> None:
    """The answer is JSON (or empty), never something a browser would render, and says so."""
    media = response.headers.get("content-type", "").split(";")[0].strip()
    if response.content:
        assert media in JSON_MEDIA, (response.status_code, media, response.text[:200])
    assert "nosniff" == response.headers.get("x-content-type-options"), response.headers


def assert_no_active_markup(html: str) -> None:
    """No element or attribute left that a browser would run (inert text may remain)."""
    lowered = html.lower()
    for marker in ("<script", "<svg", "<img", "onerror=", "onload=", 'href="javascript:'):
        assert marker not in lowered, html


@pytest.fixture
async def checked(client: httpx.AsyncClient) -> ContractRecorder:
    """Every response of the test client is checked against the OpenAPI document."""
    document = (await client.get("/api/openapi.json")).json()
    recorder = ContractRecorder(document)
    client.event_hooks["response"].append(recorder.hook)
    return recorder


@pytest.fixture
async def victim(new_workspace, create_document):
    """Another tenant with a document whose title an attacker would like to read."""
    other = await new_workspace("Victim")
    document = await create_document(other.owner, "VICTIM-SECRET", body="the crown jewels")
    return other, document


class TestSqlInjection:
    """SQL in parameters is data or a 4xx: never executed, never another tenant's rows."""

    async def test_every_list_parameter(  # noqa: PLR0917 -- pytest fixtures
        self, app, client, checked, workspace, create_document, victim
    ):
        """Injection strings in every query, sort and filter parameter of the list answer a
        documented 4xx or a page of the caller's own documents, and write nothing."""
        mine = {(await create_document(workspace.owner, f"Mine {n}"))["id"] for n in range(2)}
        before = await document_rows(app)
        document = checked.document
        declared = [
            parameter["name"]
            for parameter in document["paths"]["/v1/documents"]["get"].get("parameters", [])
            if parameter["in"] == "query"
        ]
        names = {
            *declared,
            "sort",
            "page",
            "page_size",
            "cursor",
            "filter[tag]",
            "filter[sensitive]",
            "filter[title][contains]",
            "filter[created_at][gte]",
            "filter[tag][in]",
            "filter[tenant_id]",
        }
        for name in sorted(names):
            for payload in SQL_INJECTIONS:
                response = await client.get(
                    f"/v1/documents?{quote(name)}={quote(payload)}",
                    headers=workspace.owner.headers,
                )
                assert response.status_code in (200, 400, 422), (name, payload, response.text)
                assert "VICTIM-SECRET" not in response.text
                if response.status_code == 200:
                    assert {item["id"] for item in response.json()["items"]} <= mine
        assert before == await document_rows(app)
        assert (
            "VICTIM-SECRET"
            == (
                await client.get(
                    f"/v1/documents/{victim[1]['id']}", headers=victim[0].owner.headers
                )
            ).json()["title"]
        )

    async def test_every_path_parameter(self, app, client, checked, workspace, victim):
        """Injection strings in path ids answer 404 (or a documented 4xx) and change nothing."""
        before = await document_rows(app)
        owner = workspace.owner
        for payload in SQL_INJECTIONS:
            segment = quote(payload, safe="")
            for method, path in (
                ("GET", f"/v1/documents/{segment}"),
                ("PATCH", f"/v1/documents/{segment}"),
                ("DELETE", f"/v1/documents/{segment}"),
                ("GET", f"/v1/api-keys/{segment}"),
                ("DELETE", f"/v1/api-keys/{segment}"),
                ("GET", f"/v1/tenants/{segment}"),
                ("GET", f"/v1/tenants/{segment}/members"),
            ):
                response = await client.request(
                    method,
                    path,
                    json={"title": "pwned"} if method == "PATCH" else None,
                    headers={**owner.headers, "If-Match": '"v1"'},
                )
                assert response.status_code in (404, 422), (method, path, response.text)
        assert before == await document_rows(app)
        victim_doc = (
            await client.get(f"/v1/documents/{victim[1]['id']}", headers=victim[0].owner.headers)
        ).json()
        assert ("VICTIM-SECRET", 1) == (victim_doc["title"], victim_doc["version"])

    async def test_injection_in_fields_is_stored_as_text(self, client, checked, workspace):
        """SQL in a title or body is kept verbatim as text, and reads back unchanged."""
        for payload in SQL_INJECTIONS:
            created = await client.post(
                "/v1/documents",
                json={"title": payload, "body": payload},
                headers=workspace.owner.headers,
            )
            assert 201 == created.status_code, created.text
            assert (payload, payload) == (created.json()["title"], created.json()["body"])


class TestXss:
    """Markup in any text field comes back as JSON data, never as a page a browser renders."""

    async def test_stored_payloads_come_back_as_json(self, client, checked, workspace):
        """XSS payloads stored in document, tenant and API-key text fields are served as JSON
        with nosniff; HTML-bearing fields come back sanitised."""
        owner = workspace.owner
        create_schema = checked.document["components"]["schemas"]["DocumentCreate"]
        for payload in XSS:
            created = await client.post(
                "/v1/documents",
                json={"title": payload, "body": payload},
                headers=owner.headers,
            )
            assert 201 == created.status_code, created.text
            assert_json_not_html(created)
            read = await client.get(created.headers["location"], headers=owner.headers)
            assert_json_not_html(read)
            assert payload == read.json()["title"]
            listed = await client.get("/v1/documents", headers=owner.headers)
            assert_json_not_html(listed)
            tagged = await client.post(
                "/v1/documents", json={"title": "t", "tags": [payload]}, headers=owner.headers
            )
            assert 422 == tagged.status_code  # tags are slugs: markup is no tag
            assert_json_not_html(tagged)
            renamed = await client.patch(
                f"/v1/tenants/{owner.tenant_id}", json={"name": payload}, headers=owner.headers
            )
            assert renamed.status_code in (200, 422), renamed.text
            assert_json_not_html(renamed)
            key = await client.post(
                "/v1/api-keys",
                json={"name": payload, "scopes": ["documents:read"]},
                headers=owner.headers,
            )
            assert key.status_code in (201, 422), key.text
            assert_json_not_html(key)
        if "format" in create_schema.get("properties", {}):
            html = await client.post(
                "/v1/documents",
                json={"title": "Page", "format": "html", "body": "<p>ok</p>" + "".join(XSS)},
                headers=owner.headers,
            )
            assert 201 == html.status_code, html.text
            body = (await client.get(html.headers["location"], headers=owner.headers)).json()[
                "body"
            ]
            assert_no_active_markup(body)
            assert "<p>ok</p>" in body

    async def test_reflected_payloads_are_never_html(self, client, checked, workspace):
        """Markup in a rejected parameter or path is answered as a problem (JSON, nosniff)."""
        for payload in XSS:
            for response in (
                await client.get(
                    f"/v1/documents?sort={quote(payload)}", headers=workspace.owner.headers
                ),
                await client.get(
                    f"/v1/documents/{quote(payload, safe='')}", headers=workspace.owner.headers
                ),
                await client.post("/v1/auth/login", json={"email": payload, "password": "x"}),
            ):
                assert response.status_code >= 400
                assert_json_not_html(response)

    async def test_html_fields_are_sanitised(self):
        """bastion's SafeHtml keeps allowed markup and drops scripts, handlers and js: URLs."""

        class Page(BaseModel):
            html: SafeHtml(10_000)  # type: ignore[valid-type]

        cleaned = Page(html="<p>ok</p>" + "".join(XSS)).html
        assert_no_active_markup(cleaned)
        assert "<p>ok</p>" in cleaned


class TestCsrf:
    """The refresh cookie cannot be ridden by another site."""

    @pytest.fixture
    async def browser(self, app) -> AsyncIterator[tuple[httpx.AsyncClient, str]]:
        """A client on https (the cookies are Secure) logged in with cookie delivery."""
        async with lifespan_client(app, base_url="https://testserver") as client:
            slug = f"t-{secrets.token_hex(6)}"
            member = await create_member(
                app,
                tenant_slug=slug,
                email=unique_email("csrf"),
                role="member",
                password=PASSWORD,
            )
            logged_in = await client.post(
                "/v1/auth/login",
                json={
                    "email": member.email,
                    "password": PASSWORD,
                    "refresh_token_delivery": "cookie",
                },
            )
            assert 200 == logged_in.status_code, logged_in.text
            token = client.cookies.get("bastion_csrf")
            assert token, logged_in.headers.get_list("set-cookie")
            assert client.cookies.get("bastion_refresh")
            yield client, token

    async def test_cross_site_origin_is_refused(self, browser):
        """A refresh from another site's page, even with the token, is 403."""
        client, token = browser
        response = await client.post(
            "/v1/auth/refresh",
            headers={"Origin": "https://evil.example", "X-CSRF-Token": token},
        )
        assert (403, "FORBIDDEN") == (response.status_code, response.json()["code"])

    async def test_missing_or_wrong_token_is_refused(self, browser):
        """A same-site refresh without the double-submit token, or with another, is 403."""
        client, token = browser
        for headers in (
            {"Origin": "https://testserver"},
            {"Origin": "https://testserver", "X-CSRF-Token": token[::-1]},
        ):
            response = await client.post("/v1/auth/refresh", headers=headers)
            assert 403 == response.status_code, (headers, response.text)

    async def test_same_site_with_token_is_accepted(self, browser):
        """The page's own refresh, same origin with the token, gets new tokens."""
        client, token = browser
        response = await client.post(
            "/v1/auth/refresh", headers={"Origin": "https://testserver", "X-CSRF-Token": token}
        )
        assert 200 == response.status_code, response.text
        assert response.json()["access_token"]


class _Recorder(http.server.BaseHTTPRequestHandler):
    hits: ClassVar[list[str]] = []

    def do_GET(self) -> None:
        type(self).hits.append(self.path)
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"internal")

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def internal_server() -> Iterator[tuple[int, list[str]]]:
    """An HTTP server on the loopback address, standing for an internal service."""
    _Recorder.hits = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], _Recorder.hits
    finally:
        server.shutdown()
        server.server_close()


class TestSsrf:
    """The service fetches no URL a client gives it (its only outbound call is the LLM
    provider of its settings), so bastion's fetch guard is attacked through a tiny route
    that does what such an endpoint would: validate with FetchUrl, fetch with SafeTransport."""

    @pytest.fixture
    async def previews(self) -> AsyncIterator[httpx.AsyncClient]:
        app = FastAPI()

        class Preview(BaseModel):
            url: FetchUrl()  # type: ignore[valid-type]

        @app.post("/v1/previews")
        async def preview(body: Preview) -> dict[str, int]:
            async with httpx.AsyncClient(transport=SafeTransport(), trust_env=False) as client:
                fetched = await client.get(body.url)
            return {"status": fetched.status_code}

        bastion.install(
            app,
            database={"enabled": False},
            audit={"enabled": False},
            flags={"enabled": False},
            logging={"level": "WARNING"},
        )
        async with lifespan_client(app) as client:
            yield client

    async def test_private_and_loopback_targets_are_refused(self, previews, internal_server):
        """Loopback, private, link-local and metadata addresses, in any spelling, are 422 and
        the internal server is never contacted."""
        port, hits = internal_server
        for url in (
            f"http://127.0.0.1:{port}/admin",
            f"http://localhost:{port}/admin",
            f"http://[::1]:{port}/",
            f"http://2130706433:{port}/",
            f"http://0x7f.1:{port}/",
            "http://169.254.169.254/latest/meta-data/",
            "http://10.0.0.1/",
            "http://192.168.1.1/",
            f"http://[::ffff:127.0.0.1]:{port}/",
            "file:///etc/passwd",
            "gopher://127.0.0.1:6379/_FLUSHALL",
        ):
            response = await previews.post("/v1/previews", json={"url": url})
            assert 422 == response.status_code, (url, response.text)
            assert "application/problem+json" == response.headers["content-type"]
        assert [] == hits


class TestMalformedRequests:
    """Broken bodies, headers and query strings get their documented error, nothing written."""

    async def test_bodies_are_refused_before_anything_is_written(
        self, app, client, checked, workspace, create_document
    ):
        """Oversized, deeply nested, malformed, invalid UTF-8 and NUL-bearing bodies on create
        and change answer 413/415/422 with their code, and no row is added or changed."""
        owner = workspace.owner
        existing = await create_document(owner, "Untouched")
        path = f"/v1/documents/{existing['id']}"
        etag = (await client.get(path, headers=owner.headers)).headers["etag"]
        json_type = {"Content-Type": "application/json"}
        cases = (
            (b'{"title": "big", "body": "' + b"x" * OVERSIZED + b'"}', json_type, 413),
            (b'{"title": "big", "body": "' + b"x" * (1024 * 1024 + 1) + b'"}', json_type, 422),
            (b'{"title": ' + b"[" * 100 + b"]" * 100 + b"}", json_type, 422),
            (b'{"title": "x", "tags": [' + b",".join([b'"a"'] * 20_000) + b"]}", json_type, 422),
            (b'{"title": "unterminated', json_type, 422),
            (b'{"title": "x",}', json_type, 422),
            (b'{"title": "\xff\xfe bad utf-8"}', json_type, 422),
            (b'{"title": "nul \x00 byte"}', json_type, 422),
            (b'{"title": "escaped nul \\u0000"}', json_type, 422),
            (b'{"title": "lone surrogate \\ud800"}', json_type, 422),
            (b'{"title": NaN}', json_type, 422),
            (b"<title>x</title>", {"Content-Type": "application/xml"}, 415),
            (b'{"title": "x"}', {"Content-Type": "text/plain"}, 415),
        )
        before = await document_rows(app)
        for body, headers, status in cases:
            created = await client.post(
                "/v1/documents", content=body, headers={**owner.headers, **headers}
            )
            assert status == created.status_code, (body[:60], created.text)
            changed = await client.patch(
                path, content=body, headers={**owner.headers, **headers, "If-Match": etag}
            )
            assert status == changed.status_code, (body[:60], changed.text)
            assert_json_not_html(created)
        # The route's body is a model: the guard lists the JSON types only.
        form = await client.post(
            "/v1/documents",
            content=b"title=x",
            headers={**owner.headers, "Content-Type": "application/x-www-form-urlencoded"},
        )
        assert 415 == form.status_code, form.text
        assert before == await document_rows(app)
        after = (await client.get(path, headers=owner.headers)).json()
        assert ("Untouched", 1) == (after["title"], after["version"])

    async def test_oversized_headers_and_query_strings(self, app, client, checked, workspace):
        """Headers over their size or count answer 431, a query string over its size 414;
        neither writes."""
        owner = workspace.owner
        before = await document_rows(app)
        responses = [
            await client.post(
                "/v1/documents",
                json={"title": "x"},
                headers={**owner.headers, "X-Padding": "p" * 17_000},
            ),
            await client.post(
                "/v1/documents",
                json={"title": "x"},
                headers={**owner.headers, **{f"X-H{n}": "v" for n in range(120)}},
            ),
            await client.post(
                "/v1/documents?pad=" + "a" * 9_000, json={"title": "x"}, headers=owner.headers
            ),
            await client.get("/v1/documents?filter[tag]=" + "a" * 9_000, headers=owner.headers),
        ]
        assert [431, 431, 414, 414] == [r.status_code for r in responses]
        assert ["HEADERS_TOO_LARGE", "HEADERS_TOO_LARGE", "URI_TOO_LONG", "URI_TOO_LONG"] == [
            r.json()["code"] for r in responses
        ]
        assert before == await document_rows(app)

    async def test_invalid_utf8_and_nul_in_the_path_and_query(self, client, checked, workspace):
        """Percent-encoded invalid UTF-8 or NUL in the query or path is a 4xx problem."""
        owner = workspace.owner
        for target in (
            "/v1/documents?filter[tag]=%FF%FE",
            "/v1/documents?filter[tag]=a%00b",
            "/v1/documents?sort=%00title",
            f"/v1/documents/{uuid.uuid4()}%00",
        ):
            response = await client.get(target, headers=owner.headers)
            assert response.status_code in (404, 422), (target, response.text)
            assert_json_not_html(response)

    async def test_the_checker_sees_these_answers_documented(self, client, workspace):
        """The guard's answers are ones the document lists (checked without the recorder)."""
        document = (await client.get("/api/openapi.json")).json()
        response = await client.post(
            "/v1/documents",
            content=b'{"title": ' + b"[" * 100 + b"]" * 100 + b"}",
            headers={**workspace.owner.headers, "Content-Type": "application/json"},
        )
        check_response(document, response)
