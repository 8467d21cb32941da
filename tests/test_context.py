"""The request context and the X-Request-Id rule."""

import asyncio
import re
import string
import uuid

import pytest
from fastapi import FastAPI
from hypothesis import example, given, settings
from hypothesis import strategies as st

import bastion
from bastion.context import (
    RequestContext,
    bind,
    current_context,
    is_valid_request_id,
    new_request_id,
    unbind,
)
from bastion.lifecycle import Lifecycle
from bastion.observability import RequestMiddleware
from bastion.testing import lifespan_client

KEPT_ALPHABET = string.ascii_letters + string.digits + "._:-"
GENERATED = re.compile(r"[0-9a-f]{32}")

valid_ids = st.text(alphabet=KEPT_ALPHABET, min_size=1, max_size=128)
too_long_ids = st.text(alphabet=KEPT_ALPHABET, min_size=129, max_size=400)
# At least one character outside the kept alphabet, anywhere in the value.
foreign_ids = st.tuples(
    st.text(alphabet=KEPT_ALPHABET, max_size=60),
    st.characters(blacklist_characters=KEPT_ALPHABET, blacklist_categories=("Cs",)),
    st.text(max_size=60),
).map("".join)


def run_middleware(raw_request_id: bytes | None):
    """Send one request through RequestMiddleware; return (response headers, seen context)."""
    seen: list[RequestContext | None] = []

    async def app(scope, receive, send):
        seen.append(current_context())
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    middleware = RequestMiddleware(app, lifecycle=Lifecycle(), access_log=None)
    headers = [] if raw_request_id is None else [(b"x-request-id", raw_request_id)]
    scope = {
        "type": "http",
        "method": "GET",
        "path": "/",
        "headers": headers,
        "client": ("127.0.0.1", 5000),
    }
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    response_headers = dict(sent[0]["headers"])
    return response_headers, seen[0]


class TestRequestIdRule:
    @given(valid_ids)
    @example("0b1e6bb2-8f33-4c4a-9d6c-0d8e4b2a7f10")  # a UUID
    @example("01HZX3K6Q8V9W2B4C5D6E7F8G9")  # a ULID
    @example("7f2a1c3e5b9d4f6a8c0e2b4d6f8a1c3e")  # nginx's $request_id
    @example("a")
    @example("Z" * 128)
    @settings(max_examples=200, deadline=None)
    def test_valid_id_is_kept_verbatim_and_echoed(self, request_id):
        """1 to 128 characters of [A-Za-z0-9._:-] are kept as sent and echoed back."""
        headers, context = run_middleware(request_id.encode())
        assert request_id == headers[b"x-request-id"].decode()
        assert request_id == context.request_id

    @given(st.one_of(st.just(""), too_long_ids, foreign_ids))
    @example("x" * 129)
    @example("has space")
    @example("ünïcödé")
    @example("abc\r\nSet-Cookie: session=stolen")
    @example("abc\nX-Admin: 1")
    @example("abc\x00def")
    @example("id;drop")
    @example("abc/def")
    @settings(max_examples=200, deadline=None)
    def test_anything_else_is_replaced(self, raw):
        """An empty, too long or foreign-character id is replaced by a generated one."""
        headers, context = run_middleware(raw.encode("utf-8", "surrogatepass"))
        echoed = headers[b"x-request-id"].decode()
        assert echoed != raw
        assert GENERATED.fullmatch(echoed)
        assert echoed == context.request_id

    def test_missing_id_is_generated(self):
        """A request without X-Request-Id gets a generated one."""
        headers, context = run_middleware(None)
        assert GENERATED.fullmatch(headers[b"x-request-id"].decode())
        assert headers[b"x-request-id"].decode() == context.request_id

    @given(valid_ids)
    def test_validator_accepts_the_alphabet(self, request_id):
        """is_valid_request_id accepts every id of the kept alphabet and length."""
        assert is_valid_request_id(request_id.encode())

    @pytest.mark.parametrize("raw", [b"", b"a" * 129, b"a b", b"a\r\nb", "é".encode(), b"a\n"])
    def test_validator_rejects(self, raw):
        """is_valid_request_id rejects anything else, trailing newlines included."""
        assert not is_valid_request_id(raw)


class TestNewRequestId:
    def test_generated_ids_are_unique_and_valid(self):
        """Generated ids are 32 hex digits, valid by the kept rule, and do not repeat."""
        ids = [new_request_id() for _ in range(2000)]
        assert len(ids) == len(set(ids))
        assert all(GENERATED.fullmatch(i) and is_valid_request_id(i.encode()) for i in ids)


class TestCurrentContext:
    def test_none_outside_a_request(self):
        """Outside a request there is no context."""
        assert current_context() is None

    def test_bind_and_unbind_restore_the_previous_context(self):
        """unbind restores whatever was current before bind."""
        outer = bind(RequestContext("outer"))
        inner = bind(RequestContext("inner"))
        assert "inner" == current_context().request_id
        unbind(inner)
        assert "outer" == current_context().request_id
        unbind(outer)
        assert current_context() is None

    async def test_available_in_handlers_and_isolated_between_requests(self):
        """Each concurrent request sees its own context, with method, client and request id."""
        app = FastAPI()
        bastion.install(app, database={"enabled": False}, logging={"access_log": False})

        @app.get("/whoami")
        async def whoami():
            context = current_context()
            await asyncio.sleep(0.01)  # let the other requests interleave
            assert context is current_context()
            return {
                "request_id": context.request_id,
                "method": context.method,
                "client_ip": context.client_ip,
            }

        async with lifespan_client(app) as client:
            ids = [str(uuid.uuid4()) for _ in range(20)]
            responses = await asyncio.gather(
                *(client.get("/whoami", headers={"X-Request-Id": i}) for i in ids)
            )
        assert [{"request_id": i, "method": "GET", "client_ip": "127.0.0.1"} for i in ids] == [
            r.json() for r in responses
        ]

    async def test_route_template_is_recorded(self):
        """After routing, the context carries the route template, not the raw path."""
        app = FastAPI()
        runtime = bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        contexts = []

        @app.get("/v1/documents/{document_id}")
        async def read(document_id: str):
            contexts.append(current_context())
            return {}

        async with lifespan_client(app) as client:
            await client.get("/v1/documents/42")
        assert runtime is app.state.bastion
        assert "/v1/documents/{document_id}" == contexts[0].route


class TestOverHttp:
    @pytest.mark.parametrize(
        "request_id",
        [str(uuid.uuid4()), "01HZX3K6Q8V9W2B4C5D6E7F8G9", "a.b:c-d_e", "Q" * 128],
    )
    async def test_kept_id_is_the_correlation_id(self, request_id):
        """A kept id is echoed and is the correlation_id of an error body."""
        app = FastAPI()
        bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        async with lifespan_client(app) as client:
            response = await client.get("/nope", headers={"X-Request-Id": request_id})
        assert (request_id, request_id) == (
            response.headers["x-request-id"],
            response.json()["correlation_id"],
        )

    @pytest.mark.parametrize("request_id", ["", "R" * 129, "two words", "semi;colon"])
    async def test_replaced_id_is_the_correlation_id(self, request_id):
        """A replaced id is what is echoed and what the error body quotes."""
        app = FastAPI()
        bastion.install(app, database={"enabled": False}, logging={"enabled": False})
        async with lifespan_client(app) as client:
            response = await client.get("/nope", headers={"X-Request-Id": request_id})
        echoed = response.headers["x-request-id"]
        assert GENERATED.fullmatch(echoed)
        assert echoed == response.json()["correlation_id"]
