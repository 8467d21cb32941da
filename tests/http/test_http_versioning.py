"""Versioning and deprecation: headers, 410 after sunset, precedence, usage per client, admin."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, date, datetime, timedelta
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import pytest
import redis.asyncio as redis_asyncio
from fastapi import FastAPI
from prometheus_client import REGISTRY
from starlette.middleware import Middleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

import bastion
from bastion._access import AccessPolicy
from bastion.errors import ConfigurationError, ServiceUnavailable
from bastion.http._deprecation_usage import DeprecatedCall, DeprecationUsage
from bastion.http._security import SecurityMiddleware
from bastion.http._versioning import (
    Deprecation,
    VersioningMiddleware,
    deprecated,
    deprecated_operations,
    deprecation_routes,
    document_deprecations,
)
from bastion.identity import Principal, bind_principal, unbind_principal
from bastion.settings import VersioningSettings

OFF: dict[str, Any] = {
    "database": {"enabled": False},
    "audit": {"enabled": False},
    "flags": {"enabled": False},
    "ratelimit": {"enabled": False},
}
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
MARKED_ON = datetime(2026, 3, 1, tzinfo=UTC)
MARKED_SUNSET = datetime(2026, 9, 1, tzinfo=UTC)


class Clock:
    """A wall clock the test moves."""

    def __init__(self, moment: datetime = NOW) -> None:
        self.now = moment.timestamp()

    def __call__(self) -> float:
        return self.now

    def move_to(self, moment: datetime) -> None:
        self.now = moment.timestamp()


class FakeIdentity:
    """Binds the principal named by ``X-Test-Caller: kind:subject[:tenant]``, as identity would."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw = dict(scope.get("headers", ())).get(b"x-test-caller")
        if scope["type"] != "http" or raw is None:
            await self.app(scope, receive, send)
            return
        kind, subject, *tenant = raw.decode().split(":")
        token = bind_principal(
            Principal(subject, kind=kind, tenant_id=tenant[0] if tenant else None)
        )
        try:
            await self.app(scope, receive, send)
        finally:
            unbind_principal(token)


def versioning(**deprecations: dict[str, Any]) -> VersioningSettings:
    return VersioningSettings.model_validate({"deprecations": deprecations})


def make_app(
    settings: VersioningSettings,
    *,
    usage: DeprecationUsage | None = None,
    clock: Clock | None = None,
    access: AccessPolicy | None = None,
) -> tuple[FastAPI, list[str]]:
    """A FastAPI app with bastion and the versioning middleware where the stack puts it."""
    app = FastAPI()
    calls: list[str] = []

    @app.get("/v1/items")
    async def list_items() -> dict[str, str]:
        calls.append("list")
        return {"v": "1"}

    @app.get("/v1/items/{item_id}")
    async def read_item(item_id: int) -> dict[str, int]:
        calls.append("read")
        return {"id": item_id}

    @app.post("/v1/items")
    async def create_item() -> dict[str, bool]:
        calls.append("create")
        return {"ok": True}

    @app.get("/v1/marked")
    @deprecated(on=MARKED_ON, sunset=MARKED_SUNSET, link="https://docs.example.com/v2/marked")
    async def marked() -> dict[str, bool]:
        calls.append("marked")
        return {"ok": True}

    @deprecated(on=date(2026, 4, 1))
    @app.get("/v1/admin/stats")
    async def stats() -> dict[str, bool]:
        calls.append("stats")
        return {"ok": True}

    @app.get("/v1/admin/other")
    async def other() -> dict[str, bool]:
        calls.append("other")
        return {"ok": True}

    @app.get("/v1/linked")
    async def linked() -> JSONResponse:
        calls.append("linked")
        return JSONResponse({}, headers={"link": '</v1/items?page=2>; rel="next"'})

    @app.get("/v2/items")
    async def list_items_v2() -> dict[str, str]:
        calls.append("v2")
        return {"v": "2"}

    # The wired layer reads the real clock; these tests move theirs. So bastion's own is
    # turned off (its admin route too) and the test's instance takes its place: inside
    # the security layer, outside identity, which the stand-in plays (identity needs the
    # database; tests/http/test_http_wiring.py drives the wired layer with the real one).
    runtime = bastion.install(app, http={"versioning": {"enabled": False}}, **OFF)
    assert runtime.deprecations is None
    layers = [entry.cls for entry in app.user_middleware]
    assert VersioningMiddleware not in layers
    if usage is not None and access is not None:
        app.router.routes.extend(deprecation_routes(access, usage))
    position = layers.index(SecurityMiddleware) + 1
    app.user_middleware[position:position] = [
        Middleware(VersioningMiddleware, settings=settings, usage=usage, clock=clock or Clock()),
        Middleware(FakeIdentity),
    ]
    return app, calls


@asynccontextmanager
async def serving(
    app: FastAPI, client: tuple[str, int] = ("127.0.0.1", 40000)
) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, client=client)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            yield http


def deprecation_instant(response: httpx.Response) -> datetime:
    value = response.headers["deprecation"]
    assert value.startswith("@")
    return datetime.fromtimestamp(int(value[1:]), UTC)


def sunset_instant(response: httpx.Response) -> datetime:
    value = response.headers["sunset"]
    assert value.endswith(" GMT")
    return parsedate_to_datetime(value)


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


V1 = {"deprecated_at": "2026-01-01T00:00:00", "sunset_at": "2026-12-31T00:00:00"}


class TestHeaders:
    async def test_exact_formats(self):
        """Deprecation is @unix-seconds, Sunset an IMF-fixdate in GMT, Link names the guide."""
        app, _ = make_app(versioning())
        async with serving(app) as http:
            response = await http.get("/v1/marked")
        assert 200 == response.status_code
        assert f"@{int(MARKED_ON.timestamp())}" == response.headers["deprecation"]
        assert "Tue, 01 Sep 2026 00:00:00 GMT" == response.headers["sunset"]
        assert MARKED_SUNSET == sunset_instant(response)
        assert (
            '<https://docs.example.com/v2/marked>; rel="deprecation"; type="text/html"'
            == response.headers["link"]
        )

    async def test_link_is_appended(self):
        """The app's own Link header is kept; the deprecation link is added to it."""
        settings = versioning(
            **{"GET /v1/linked": {"deprecated_at": "2026-01-01", "link": "https://x.test/g"}}
        )
        app, _ = make_app(settings)
        async with serving(app) as http:
            response = await http.get("/v1/linked")
        assert [
            '</v1/items?page=2>; rel="next", <https://x.test/g>; rel="deprecation"; '
            'type="text/html"'
        ] == response.headers.get_list("link")
        assert "sunset" not in response.headers

    async def test_future_deprecation_is_announced(self):
        """A deprecation date still ahead is sent all the same (RFC 9745 allows it)."""
        app, _ = make_app(versioning(**{"/v2/": {"deprecated_at": "2027-01-01T00:00:00"}}))
        async with serving(app) as http:
            response = await http.get("/v2/items")
        assert datetime(2027, 1, 1, tzinfo=UTC) == deprecation_instant(response)
        assert 200 == response.status_code

    async def test_untouched_routes(self):
        """Routes outside every deprecation get no header; with none configured, none at all."""
        app, _ = make_app(versioning(**{"/v1/": V1}))
        async with serving(app) as http:
            assert "deprecation" not in (await http.get("/v2/items")).headers
        bare = FastAPI()

        @bare.get("/v1/items")
        async def items() -> dict[str, str]:
            return {}

        middleware = VersioningMiddleware(bare, settings=versioning())
        assert not middleware.read_routes(bare.router.routes)
        bare.add_middleware(VersioningMiddleware, settings=versioning())
        async with serving(bare) as http:
            assert "deprecation" not in (await http.get("/v1/items")).headers

    async def test_disabled(self):
        """With versioning off, even a marked route answers without headers."""
        app, _ = make_app(VersioningSettings(enabled=False))
        async with serving(app) as http:
            assert "deprecation" not in (await http.get("/v1/marked")).headers

    async def test_head_follows_get(self):
        """A HEAD of a deprecated GET template carries the headers too."""
        app = FastAPI()

        @app.api_route("/v1/things", methods=["GET", "HEAD"])
        async def things() -> dict[str, str]:
            return {}

        app.add_middleware(
            VersioningMiddleware,
            settings=versioning(**{"GET /v1/things": {"deprecated_at": "2026-01-01"}}),
        )
        async with serving(app) as http:
            assert "deprecation" in (await http.head("/v1/things")).headers

    async def test_prefix_without_slash_and_root_path(self):
        """``/v1`` covers ``/v1/...``, not ``/v10``; a root path is stripped as the router does."""
        app, _ = make_app(versioning(**{"/v1": {"deprecated_at": "2026-01-01"}}))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, root_path="/api")
            async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
                assert "deprecation" in (await http.get("/api/v1/items")).headers
                missing = await http.get("/api/v10/items")
                assert 404 == missing.status_code
                assert "deprecation" not in missing.headers

    async def test_scope_without_app_passes_through(self):
        """A bare ASGI scope (no Starlette app to read routes from) is served untouched."""
        seen: list[str] = []

        async def inner(scope: Scope, receive: Receive, send: Send) -> None:
            seen.append(scope.get("path", scope["type"]))

        middleware = VersioningMiddleware(inner, settings=versioning(**{"/v1/": V1}))
        await middleware({"type": "http", "method": "GET", "path": "/v1/x"}, None, None)
        await middleware({"type": "lifespan"}, None, None)
        assert ["/v1/x", "lifespan"] == seen


class TestSunset:
    async def test_410_after_sunset_without_calling_the_app(self):
        """From the sunset instant, 410 VERSION_SUNSET with Sunset and Link; the app is not run."""
        clock = Clock()
        app, calls = make_app(versioning(), clock=clock)
        async with serving(app) as http:
            assert 200 == (await http.get("/v1/marked")).status_code
            before = sample(
                "bastion_http_sunset_requests_total",
                http_route="/v1/marked",
                http_request_method="GET",
            )
            clock.move_to(MARKED_SUNSET - timedelta(seconds=1))
            assert 200 == (await http.get("/v1/marked")).status_code
            clock.move_to(MARKED_SUNSET)
            response = await http.get("/v1/marked")
        assert ["marked", "marked"] == calls
        assert 410 == response.status_code
        assert "application/problem+json" == response.headers["content-type"]
        body = response.json()
        assert "VERSION_SUNSET" == body["code"]
        assert "2026-09-01T00:00:00Z" == body["sunset"]
        assert body["correlation_id"] == response.headers["x-request-id"]
        assert MARKED_SUNSET == sunset_instant(response)
        assert response.headers["link"].startswith("<https://docs.example.com/v2/marked>")
        assert MARKED_ON == deprecation_instant(response)
        after = sample(
            "bastion_http_sunset_requests_total",
            http_route="/v1/marked",
            http_request_method="GET",
        )
        assert 1 == after - before

    async def test_retired_prefix_covers_removed_routes(self):
        """After a version's sunset, paths under it that no route serves answer 410, not 404."""
        clock = Clock(datetime(2027, 1, 1, tzinfo=UTC))
        app, calls = make_app(versioning(**{"/v1/": V1}), clock=clock)
        async with serving(app) as http:
            gone = await http.get("/v1/never-existed")
            also = await http.delete("/v1/items")
            alive = await http.get("/v2/items")
        assert 410 == gone.status_code
        assert 410 == also.status_code
        assert "VERSION_SUNSET" == gone.json()["code"]
        assert 200 == alive.status_code
        assert ["v2"] == calls

    async def test_naive_settings_are_utc(self):
        """A naive datetime in the settings is read as UTC."""
        clock = Clock(datetime(2026, 12, 30, 23, 59, 59, tzinfo=UTC))
        app, _ = make_app(versioning(**{"/v1/": V1}), clock=clock)
        async with serving(app) as http:
            assert 200 == (await http.get("/v1/items")).status_code
            clock.move_to(datetime(2026, 12, 31, tzinfo=UTC))
            assert 410 == (await http.get("/v1/items")).status_code


class TestPrecedence:
    async def test_mark_then_template_then_longest_prefix(self):
        """The route's mark wins over a template entry, which wins over the longest prefix."""
        settings = versioning(
            **{
                "/v1/": {"deprecated_at": "2026-01-01"},
                "/v1/admin/": {"deprecated_at": "2026-02-01"},
                "GET /v1/items/{item_id}": {"deprecated_at": "2026-05-01"},
                "GET /v1/marked": {"deprecated_at": "2026-05-05"},
            }
        )
        app, _ = make_app(settings)
        async with serving(app) as http:
            marked = await http.get("/v1/marked")
            template = await http.get("/v1/items/3")
            longest = await http.get("/v1/admin/other")
            marked_under_prefix = await http.get("/v1/admin/stats")
            prefix = await http.get("/v1/items")
        assert MARKED_ON == deprecation_instant(marked)
        assert datetime(2026, 5, 1, tzinfo=UTC) == deprecation_instant(template)
        assert datetime(2026, 2, 1, tzinfo=UTC) == deprecation_instant(longest)
        assert datetime(2026, 4, 1, tzinfo=UTC) == deprecation_instant(marked_under_prefix)
        assert datetime(2026, 1, 1, tzinfo=UTC) == deprecation_instant(prefix)

    def test_template_key_is_per_method(self):
        """A ``METHOD /template`` entry deprecates that method only."""
        app, _ = make_app(versioning())
        settings = versioning(**{"POST /v1/items": {"deprecated_at": "2026-01-01"}})
        operations = deprecated_operations(app.router.routes, settings)
        assert ("POST", "/v1/items") in operations
        assert ("GET", "/v1/items") not in operations
        assert ("GET", "/v1/marked") in operations

    @pytest.mark.parametrize("key", ["GET", "GET v1/items", "GET /v1/items extra", "/"])
    def test_bad_keys_are_configuration_errors(self, key):
        """A key that is neither a prefix nor ``METHOD /template`` stops start-up."""
        if key == "/":
            # "/" is a valid prefix: every route.
            VersioningMiddleware(FastAPI(), settings=versioning(**{key: V1}))
            return
        with pytest.raises(ConfigurationError):
            VersioningMiddleware(FastAPI(), settings=versioning(**{key: V1}))

    def test_mark_validation(self):
        """A sunset before the deprecation, or a link unfit for a header, is refused."""
        with pytest.raises(ConfigurationError):
            deprecated(on=date(2026, 2, 1), sunset=date(2026, 1, 1))
        with pytest.raises(ConfigurationError):
            deprecated(on=date(2026, 2, 1), link="https://x.test/<a>")
        with pytest.raises(ConfigurationError):
            deprecated(on=date(2026, 2, 1), link="https://x.test/a b")
        naive = Deprecation.of(datetime(2026, 1, 1, 10, 30, 15, 999))
        assert datetime(2026, 1, 1, 10, 30, 15, tzinfo=UTC) == naive.deprecated_at

    async def test_openapi_marks_deprecated_operations(self):
        """The OpenAPI document flags deprecated operations and lists 410 where a sunset is set."""
        app, _ = make_app(versioning())
        settings = versioning(**{"/v2/": {"deprecated_at": "2026-01-01"}})
        schema = app.openapi()
        document_deprecations(schema, app.router.routes, settings)
        marked = schema["paths"]["/v1/marked"]["get"]
        assert marked["deprecated"] is True
        assert "410" in marked["responses"]
        assert "https://docs.example.com/v2/marked" in marked["description"]
        assert schema["paths"]["/v2/items"]["get"]["deprecated"] is True
        assert "410" not in schema["paths"]["/v2/items"]["get"]["responses"]
        assert "deprecated" not in schema["paths"]["/v1/items"]["get"]


class TestUsageMemory:
    async def test_counts_per_client_after_flush(self):
        """N calls are N in the report once flushed, per client and tenant; anonymous apart."""
        usage = DeprecationUsage(clock=Clock())
        app, _ = make_app(versioning(**{"/v1/": V1}), usage=usage, clock=Clock())
        before = sample(
            "bastion_http_deprecated_requests_total",
            http_route="/v1/items/{item_id}",
            http_request_method="GET",
        )
        async with serving(app) as http:
            for _ in range(5):
                await http.get("/v1/items/1", headers={"x-test-caller": "api_key:k1:t1"})
            for _ in range(2):
                await http.get("/v1/items/2", headers={"x-test-caller": "user:u1:t2"})
            await http.get("/v1/items/3")
            await http.get("/v2/items", headers={"x-test-caller": "user:u1:t2"})
            assert 8 == usage.pending
            report = await usage.report(days=7)
        assert 0 == usage.pending
        last = datetime.fromtimestamp(int(NOW.timestamp()), UTC)
        assert [
            DeprecatedCall("/v1/items/{item_id}", "GET", "api_key:k1", "t1", 5, last),
            DeprecatedCall("/v1/items/{item_id}", "GET", "user:u1", "t2", 2, last),
            DeprecatedCall("/v1/items/{item_id}", "GET", "anonymous", None, 1, last),
        ] == report
        after = sample(
            "bastion_http_deprecated_requests_total",
            http_route="/v1/items/{item_id}",
            http_request_method="GET",
        )
        assert 8 == after - before

    async def test_days_window_and_retention(self):
        """The report covers the last ``days`` days; days past retention are dropped."""
        clock = Clock()
        usage = DeprecationUsage(clock=clock, retention_days=3)
        usage.record("GET", "/v1/a", client="user:u", tenant=None)
        await usage.flush()
        clock.move_to(NOW + timedelta(days=2))
        usage.record("GET", "/v1/a", client="user:u", tenant=None)
        assert [2] == [call.count for call in await usage.report(days=3)]
        assert [1] == [call.count for call in await usage.report(days=1)]
        clock.move_to(NOW + timedelta(days=5))
        usage.record("GET", "/v1/b", client="user:u", tenant=None)
        assert ["/v1/b"] == [call.route for call in await usage.report(days=3)]

    async def test_batch_is_bounded(self):
        """Past ``max_pending`` distinct entries, new callers are dropped, and counted as such."""
        usage = DeprecationUsage(clock=Clock(), max_pending=2)
        before = sample("bastion_http_deprecation_usage_dropped_total")
        for client in ("a", "b", "c", "a"):
            usage.record("GET", "/v1/a", client=client, tenant=None)
        assert 3 == usage.pending
        assert 1 == sample("bastion_http_deprecation_usage_dropped_total") - before

    async def test_stop_flushes(self):
        """Shutdown writes what the last interval counted."""
        usage = DeprecationUsage(clock=Clock(), flush_interval=3600)
        await usage.start()
        usage.record("GET", "/v1/a", client="user:u", tenant=None)
        await usage.stop()
        assert 0 == usage.pending
        assert [1] == [call.count for call in await usage.report()]

    async def test_background_flush(self):
        """Started, the usage writes its batch every interval without being asked."""
        usage = DeprecationUsage(clock=Clock(), flush_interval=0.01)
        await usage.start()
        try:
            usage.record("GET", "/v1/a", client="user:u", tenant=None)
            # Real time, bounded: the loop sleeps on the event loop's clock.
            for _ in range(500):
                if usage.pending == 0:
                    break
                await asyncio.sleep(0.01)
            assert 0 == usage.pending
        finally:
            await usage.stop()
        with pytest.raises(ValueError, match="days"):
            await usage.report(days=0)


def unused_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


class TestUsageRedis:
    async def test_counts_are_shared_and_batched(self, redis_url, redis_prefix):
        """Requests write nothing to Redis; one flush writes N; another instance reads it."""
        client = redis_asyncio.from_url(redis_url)
        try:
            usage = DeprecationUsage(redis=client, key_prefix=redis_prefix)
            app, _ = make_app(versioning(**{"/v1/": V1}), usage=usage)
            async with serving(app) as http:
                for _ in range(25):
                    response = await http.post(
                        "/v1/items", headers={"x-test-caller": "api_key:k9:t9"}
                    )
                    assert 200 == response.status_code
                assert [] == await client.keys(f"{redis_prefix}*")
                assert await usage.flush()
            other = DeprecationUsage(redis=client, key_prefix=redis_prefix)
            usage.record("POST", "/v1/items", client="api_key:k9", tenant="t9")
            await usage.flush()
            [call] = await other.report(days=1)
            assert ("/v1/items", "POST", "api_key:k9", "t9", 26) == (
                call.route,
                call.method,
                call.client,
                call.tenant,
                call.count,
            )
            assert abs(call.last_seen.timestamp() - time.time()) < 3600
            keys = await client.keys(f"{redis_prefix}*")
            assert 2 == len(keys)
            for key in keys:
                # Kept ``retention_days`` after the day ends, not forever.
                ttl = await client.ttl(key)
                assert 30 * 86_400 < ttl <= 31 * 86_400
        finally:
            await client.aclose()

    async def test_stop_during_a_flush_loses_nothing(self, redis_url, redis_prefix):
        """Stopping while the background task is writing to Redis loses no call."""
        client = redis_asyncio.from_url(redis_url)
        try:
            usage = DeprecationUsage(redis=client, key_prefix=redis_prefix, flush_interval=0.001)
            for index in range(50):
                usage.record("GET", "/v1/a", client=f"user:{index % 7}", tenant=None)
            await usage.start()
            # Real time, bounded: wait for the loop's first write to be in flight.
            deadline = time.monotonic() + 5
            for _ in range(10_000_000):
                if usage._flushing.locked() or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0)
            assert usage._flushing.locked()
            await usage.stop()
            assert 0 == usage.pending
            assert 50 == sum(call.count for call in await usage.report(days=1))
        finally:
            await client.aclose()

    async def test_redis_down_never_fails_requests(self):
        """With Redis unreachable, requests answer 200, the flush fails, the batch is kept."""
        client = redis_asyncio.from_url(
            f"redis://127.0.0.1:{unused_port()}/0",
            socket_timeout=0.5,
            socket_connect_timeout=0.5,
        )
        try:
            usage = DeprecationUsage(redis=client, key_prefix="down:")
            app, _ = make_app(versioning(**{"/v1/": V1}), usage=usage)
            before = sample("bastion_http_deprecation_usage_flush_failures_total")
            async with serving(app) as http:
                for _ in range(3):
                    assert 200 == (await http.get("/v1/items")).status_code
                assert not await usage.flush()
                assert 3 == usage.pending
                assert 200 == (await http.get("/v1/items")).status_code
            assert 4 == usage.pending
            assert 1 == sample("bastion_http_deprecation_usage_flush_failures_total") - before
        finally:
            await client.aclose()

    async def test_calls_during_a_failed_flush_are_kept(self):
        """Calls counted while a flush fails are merged with the batch it puts back."""
        client = redis_asyncio.from_url(
            f"redis://127.0.0.1:{unused_port()}/0", socket_connect_timeout=0.5
        )
        try:
            usage = DeprecationUsage(redis=client, key_prefix="down:", max_pending=2)
            usage.record("GET", "/v1/a", client="user:a", tenant=None)
            flushing = asyncio.create_task(usage.flush())
            await asyncio.sleep(0)
            usage.record("GET", "/v1/a", client="user:a", tenant=None)
            usage.record("GET", "/v1/a", client="user:b", tenant=None)
            assert not await flushing
            usage.record("GET", "/v1/a", client="user:c", tenant=None)
            assert 3 == usage.pending
            with pytest.raises(ServiceUnavailable):
                await usage.report()
        finally:
            await client.aclose()

    async def test_unreadable_store_is_503(self):
        """The admin route answers 503 when the shared store cannot be read."""
        client = redis_asyncio.from_url(
            f"redis://127.0.0.1:{unused_port()}/0", socket_connect_timeout=0.5
        )
        try:
            usage = DeprecationUsage(redis=client, key_prefix="down:")
            app, _ = make_app(versioning(), usage=usage, access=AccessPolicy())
            async with serving(app) as http:
                response = await http.get("/admin/deprecations")
            assert 503 == response.status_code
            assert "SERVICE_UNAVAILABLE" == response.json()["code"]
        finally:
            await client.aclose()

    async def test_foreign_fields_are_ignored(self, redis_url, redis_prefix):
        """A field bastion did not write in the day's hash is skipped, not a 500."""
        client = redis_asyncio.from_url(redis_url)
        try:
            usage = DeprecationUsage(redis=client, key_prefix=redis_prefix)
            usage.record("GET", "/v1/a", client="user:u", tenant="t")
            await usage.flush()
            [key] = [k for k in await client.keys(f"{redis_prefix}*") if not k.endswith(b":seen")]
            await client.hset(key, mapping={"not json": 3, '["too", "short"]': 4})
            assert [("/v1/a", 1)] == [(c.route, c.count) for c in await usage.report()]
        finally:
            await client.aclose()


class TestAdminRoute:
    async def test_report_sorted_by_count(self):
        """GET /admin/deprecations lists who calls what, largest count first."""
        usage = DeprecationUsage(clock=Clock())
        access = AccessPolicy(["127.0.0.1/32"])
        app, _ = make_app(versioning(**{"/v1/": V1}), usage=usage, access=access)
        async with serving(app) as http:
            await http.get("/v1/items", headers={"x-test-caller": "user:u1:t1"})
            for _ in range(3):
                await http.get("/v1/marked", headers={"x-test-caller": "api_key:k2:t1"})
            response = await http.get("/admin/deprecations", params={"days": "2"})
            bad = await http.get("/admin/deprecations", params={"days": "31"})
        assert 200 == response.status_code
        assert "no-store" == response.headers["cache-control"]
        body = response.json()
        assert 2 == body["days"]
        assert "memory" == body["store"]
        assert [
            {
                "route": "/v1/marked",
                "method": "GET",
                "client": "api_key:k2",
                "tenant": "t1",
                "count": 3,
                "last_seen": "2026-06-01T12:00:00Z",
            },
            {
                "route": "/v1/items",
                "method": "GET",
                "client": "user:u1",
                "tenant": "t1",
                "count": 1,
                "last_seen": "2026-06-01T12:00:00Z",
            },
        ] == body["deprecations"]
        assert 422 == bad.status_code
        assert "query.days" == bad.json()["errors"][0]["field"]

    async def test_access_policy(self):
        """The route takes the admin policy: other networks 403, a missing token 401."""
        usage = DeprecationUsage(clock=Clock())
        networks = AccessPolicy(["127.0.0.1/32"])
        app, _ = make_app(versioning(), usage=usage, access=networks)
        async with serving(app, client=("10.1.2.3", 5000)) as http:
            assert 403 == (await http.get("/admin/deprecations")).status_code
        tokened = AccessPolicy([], token="s3cret-admin-token")
        app, _ = make_app(versioning(), usage=DeprecationUsage(), access=tokened)
        async with serving(app) as http:
            assert 401 == (await http.get("/admin/deprecations")).status_code
            allowed = await http.get(
                "/admin/deprecations", headers={"authorization": "Bearer s3cret-admin-token"}
            )
            assert 200 == allowed.status_code
            assert [] == allowed.json()["deprecations"]
