"""Idempotency-Key through an installed app, on every store: memory, Redis, SQLite, PostgreSQL."""

from __future__ import annotations

import asyncio
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import REGISTRY
from starlette.middleware import Middleware

import bastion
from bastion._stack import PRIORITY_HTTP
from bastion.errors import ConfigurationError
from bastion.http._idempotency import (
    IdempotencyMiddleware,
    check_idempotent_routes,
    document_idempotency,
    idempotent,
    idempotent_operations,
    record_key,
    start_idempotency,
    stop_idempotency,
)
from bastion.http._idempotency_store import (
    IdempotencyStore,
    IdempotencyStoreError,
    MemoryIdempotencyStore,
)
from bastion.identity import generate_jwks
from bastion.settings import load_settings

PROBLEM = "application/problem+json"
CLIENT = ("192.0.2.10", 5000)


@dataclass
class Probe:
    """What the app's endpoints did: executions per route, and a gate the slow one waits at."""

    executions: dict[str, int] = field(default_factory=dict)
    gate: asyncio.Event = field(default_factory=asyncio.Event)

    def ran(self, name: str) -> int:
        self.executions[name] = self.executions.get(name, 0) + 1
        return self.executions[name]


def make_app(probe: Probe, overrides: dict[str, Any]) -> FastAPI:
    """Routes for every flow: stored, required, failing, too large, slow, raising, unmarked."""
    app = FastAPI()

    @app.post("/payments", status_code=201)
    @idempotent()
    async def pay(request: Request) -> Response:
        n = probe.ran("pay")
        payload = await request.json()
        return JSONResponse(
            {"n": n, "amount": payload.get("amount")},
            status_code=201,
            headers={"Location": f"/payments/{n}", "X-Own": "kept", "Set-Cookie": "s=1"},
        )

    @app.post("/required")
    @idempotent(required=True)
    async def required() -> dict[str, int]:
        return {"n": probe.ran("required")}

    @app.post("/status/{code}")
    @idempotent()
    async def status(code: int) -> Response:
        n = probe.ran(f"status{code}")
        return JSONResponse({"n": n}, status_code=code)

    @app.post("/big")
    @idempotent()
    async def big() -> Response:
        probe.ran("big")
        return Response(b"x" * 4096, media_type="text/plain")

    @app.post("/stream")
    @idempotent()
    async def stream() -> StreamingResponse:
        probe.ran("stream")

        async def chunks() -> AsyncIterator[bytes]:
            for part in (b"a" * 10, b"b" * 10):
                yield part

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.post("/slow")
    @idempotent()
    async def slow() -> dict[str, int]:
        n = probe.ran("slow")
        await probe.gate.wait()
        return {"n": n}

    @app.post("/boom")
    @idempotent()
    async def boom() -> dict[str, int]:
        probe.ran("boom")
        raise RuntimeError("boom")

    @app.patch("/items/{item_id}")
    @idempotent(ttl=60)
    async def patch_item(item_id: int) -> dict[str, int]:
        return {"id": item_id, "n": probe.ran("patch")}

    @app.post("/plain")
    async def plain() -> dict[str, int]:
        return {"n": probe.ran("plain")}

    given = overrides.pop("_store", None)
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    overrides.setdefault("audit", {"enabled": False})
    overrides.setdefault("flags", {"enabled": False})
    overrides.setdefault("identity", {"enabled": False})
    overrides.setdefault("ratelimit", {"enabled": False})
    if given is None:
        # The layer as bastion.install wires it: its store, lifecycle and position.
        runtime = bastion.install(app, **overrides)
        app.state.store = runtime.idempotency
        return app
    # A store of the test's own (a broken one, a clock it moves): the wired layer is turned
    # off, and the test's instance takes its place, innermost, as _stack.py puts it.
    http = dict(overrides.pop("http", {}))
    idempotency = {**http.get("idempotency", {}), "enabled": False}
    runtime = bastion.install(app, http={**http, "idempotency": idempotency}, **overrides)
    assert runtime.idempotency is None
    runtime.lifecycle.on_startup(
        "idempotency",
        lambda: start_idempotency(given, runtime.settings, app.router.routes),
        priority=PRIORITY_HTTP,
    )
    runtime.lifecycle.on_shutdown(
        "stop idempotency", lambda: stop_idempotency(given), priority=PRIORITY_HTTP
    )
    assert not any(entry.cls is IdempotencyMiddleware for entry in app.user_middleware)
    settings = runtime.settings.http.idempotency.model_copy(update={"enabled": True})
    app.user_middleware.append(Middleware(IdempotencyMiddleware, settings=settings, store=given))
    app.state.store = given
    return app


@pytest.fixture(params=["memory", "redis", "sqlite", "postgres"])
def backend(request, sqlite_url) -> dict[str, Any]:
    """Settings that make each store the one chosen."""
    if request.param == "memory":
        return {"database": {"enabled": False}}
    if request.param == "redis":
        return {
            "database": {"enabled": False},
            "redis": {
                "url": request.getfixturevalue("redis_url"),
                "key_prefix": request.getfixturevalue("redis_prefix"),
            },
        }
    if request.param == "sqlite":
        return {"database": {"url": sqlite_url}}
    return {
        "database": {"url": request.getfixturevalue("postgres_url")},
        "migrations": {"mode": "auto"},
    }


IDENTITY = {
    "passwords": {"pepper": secrets.token_urlsafe(48), "time_cost": 1, "memory_cost": 8},
    "api_keys": {"secret": secrets.token_urlsafe(48)},
    "tokens": {"signing_keys": generate_jwks()},
}


@pytest.fixture(params=["memory", "redis", "sqlite", "postgres"])
def identified(request, sqlite_url) -> dict[str, Any]:
    """Each store with the real identity component on (it needs the database): callers
    are told apart by the principal identity binds from their access token."""
    settings: dict[str, Any] = {"identity": IDENTITY, "database": {"url": sqlite_url}}
    if request.param == "memory":
        settings["http"] = {"idempotency": {"store_url": "memory://"}}
    elif request.param == "redis":
        settings["redis"] = {
            "url": request.getfixturevalue("redis_url"),
            "key_prefix": request.getfixturevalue("redis_prefix"),
        }
    elif request.param == "postgres":
        settings["database"] = {"url": request.getfixturevalue("postgres_url")}
        settings["migrations"] = {"mode": "auto"}
    return settings


def caller(client: httpx.AsyncClient, subject: str, tenant: str) -> dict[str, str]:
    """The Authorization header of an access token the app's identity issued."""
    identity = client.app.state.bastion.identity  # type: ignore[attr-defined]
    return {"Authorization": f"Bearer {identity.tokens.issue(subject, tenant, []).token}"}


@asynccontextmanager
async def started(
    backend: dict[str, Any], probe: Probe | None = None, **overrides: Any
) -> AsyncIterator[tuple[httpx.AsyncClient, Probe]]:
    probe = probe or Probe()
    app = make_app(probe, {**backend, **overrides})
    transport = httpx.ASGITransport(app=app, client=CLIENT)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
    ):
        client.app = app  # type: ignore[attr-defined]
        yield client, probe


def key() -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())}


def outcome(name: str) -> float:
    return (
        REGISTRY.get_sample_value("bastion_http_idempotency_requests_total", {"outcome": name})
        or 0.0
    )


class TestReplay:
    async def test_a_retry_gets_the_stored_response(self, backend):
        """The same key and request: the app runs once; the retry gets the same status,
        body and headers, marked Idempotent-Replayed."""
        async with started(backend) as (client, probe):
            headers = key()
            first = await client.post("/payments", json={"amount": 5}, headers=headers)
            second = await client.post("/payments", json={"amount": 5}, headers=headers)
        assert 201 == first.status_code == second.status_code
        assert first.content == second.content
        assert "/payments/1" == second.headers["location"]
        assert "kept" == second.headers["x-own"]
        assert "application/json" == second.headers["content-type"]
        assert "true" == second.headers["idempotent-replayed"]
        assert "idempotent-replayed" not in first.headers
        assert 1 == probe.executions["pay"]

    async def test_set_cookie_is_never_replayed(self, backend):
        """A replay carries no Set-Cookie: a session cookie is the first answer's alone."""
        async with started(backend) as (client, _):
            headers = key()
            first = await client.post("/payments", json={"amount": 5}, headers=headers)
            second = await client.post("/payments", json={"amount": 5}, headers=headers)
        assert "set-cookie" in first.headers
        assert "set-cookie" not in second.headers

    async def test_quoted_and_bare_keys_are_the_same_key(self, backend):
        """The draft's sf-string form and the bare form name one key."""
        async with started(backend) as (client, probe):
            await client.post("/payments", json={}, headers={"Idempotency-Key": "abc-123"})
            replay = await client.post(
                "/payments", json={}, headers={"Idempotency-Key": '"abc-123"'}
            )
        assert "true" == replay.headers["idempotent-replayed"]
        assert 1 == probe.executions["pay"]

    async def test_patch_routes_take_keys_too(self, backend):
        """PATCH is keyed like POST; each path is its own request."""
        async with started(backend) as (client, probe):
            headers = key()
            await client.patch("/items/1", headers=headers)
            replay = await client.patch("/items/1", headers=headers)
        assert {"id": 1, "n": 1} == replay.json()
        assert 1 == probe.executions["patch"]

    async def test_a_streamed_response_is_stored_whole(self, backend):
        """A body sent in chunks is replayed whole."""
        async with started(backend) as (client, probe):
            headers = key()
            first = await client.post("/stream", headers=headers)
            second = await client.post("/stream", headers=headers)
        assert b"a" * 10 + b"b" * 10 == first.content == second.content
        assert 1 == probe.executions["stream"]

    async def test_without_a_key_every_request_executes(self, backend):
        """No header on an optional route: nothing is stored, every request runs."""
        async with started(backend) as (client, probe):
            await client.post("/payments", json={})
            await client.post("/payments", json={})
        assert 2 == probe.executions["pay"]

    async def test_unmarked_routes_ignore_the_header(self, backend):
        """A route without @idempotent runs every time, whatever key it gets."""
        async with started(backend) as (client, probe):
            headers = key()
            await client.post("/plain", headers=headers)
            second = await client.post("/plain", headers=headers)
        assert 2 == probe.executions["plain"]
        assert "idempotent-replayed" not in second.headers


class TestReuse:
    async def test_a_different_body_is_refused(self, backend):
        """The same key with another body is 422 IDEMPOTENCY_KEY_REUSED; nothing runs."""
        async with started(backend) as (client, probe):
            headers = key()
            await client.post("/payments", json={"amount": 5}, headers=headers)
            reused = await client.post("/payments", json={"amount": 6}, headers=headers)
        assert 422 == reused.status_code
        assert PROBLEM == reused.headers["content-type"]
        assert "IDEMPOTENCY_KEY_REUSED" == reused.json()["code"]
        assert 1 == probe.executions["pay"]

    async def test_a_different_query_is_refused(self, backend):
        """The query string is part of the request the key names."""
        async with started(backend) as (client, _):
            headers = key()
            await client.post("/payments?x=1", json={}, headers=headers)
            reused = await client.post("/payments?x=2", json={}, headers=headers)
        assert "IDEMPOTENCY_KEY_REUSED" == reused.json()["code"]

    async def test_a_different_route_is_a_different_key(self, backend):
        """One key on two routes names two records: each executes once."""
        async with started(backend) as (client, probe):
            headers = key()
            await client.patch("/items/1", headers=headers)
            other = await client.post("/payments", json={}, headers=headers)
        assert 201 == other.status_code
        assert 1 == probe.executions["pay"] == probe.executions["patch"]


class TestScope:
    async def test_tenants_never_see_each_others_responses(self, identified):
        """Two tenants choosing the same key: both execute, neither gets the other's answer."""
        async with started(identified) as (client, probe):
            same = key()
            a = await client.post(
                "/payments", json={"amount": 1}, headers={**same, **caller(client, "u1", "t-a")}
            )
            b = await client.post(
                "/payments", json={"amount": 1}, headers={**same, **caller(client, "u1", "t-b")}
            )
        assert 201 == a.status_code == b.status_code
        assert "idempotent-replayed" not in b.headers
        assert a.json() != b.json()
        assert 2 == probe.executions["pay"]

    async def test_principals_of_one_tenant_are_independent(self, identified):
        """Two users of one tenant with the same key and body: two executions."""
        async with started(identified) as (client, probe):
            same = key()
            for subject in ("u1", "u2"):
                response = await client.post(
                    "/payments", json={}, headers={**same, **caller(client, subject, "t")}
                )
                assert 201 == response.status_code
                assert "idempotent-replayed" not in response.headers
        assert 2 == probe.executions["pay"]

    async def test_anonymous_callers_are_told_apart_by_address(self, backend):
        """Without a principal the client address scopes the key."""
        probe = Probe()
        same = key()
        async with started(backend, probe) as (client, _):
            await client.post("/payments", json={}, headers=same)
            app = client.app  # type: ignore[attr-defined]
            transport = httpx.ASGITransport(app=app, client=("192.0.2.99", 1))
            async with httpx.AsyncClient(transport=transport, base_url="http://t") as other:
                response = await other.post("/payments", json={}, headers=same)
        assert "idempotent-replayed" not in response.headers
        assert 2 == probe.executions["pay"]

    async def test_a_principal_replays_its_own_response(self, identified):
        """The same principal retrying, even with a fresh access token, gets its replay."""
        async with started(identified) as (client, probe):
            same = key()
            await client.post("/payments", json={}, headers={**same, **caller(client, "u1", "t")})
            replay = await client.post(
                "/payments", json={}, headers={**same, **caller(client, "u1", "t")}
            )
        assert "true" == replay.headers["idempotent-replayed"]
        assert 1 == probe.executions["pay"]


class TestRelease:
    @pytest.mark.parametrize("code", [500, 503, 408, 409, 425, 429])
    async def test_retryable_answers_are_not_stored(self, backend, code):
        """5xx and "try again" statuses release the key: the retry executes again."""
        async with started(backend) as (client, probe):
            headers = key()
            await client.post(f"/status/{code}", headers=headers)
            second = await client.post(f"/status/{code}", headers=headers)
        assert code == second.status_code
        assert 2 == probe.executions[f"status{code}"]

    @pytest.mark.parametrize("code", [200, 400, 404, 422])
    async def test_final_answers_are_stored(self, backend, code):
        """Success and client errors are the request's outcome: replayed."""
        async with started(backend) as (client, probe):
            headers = key()
            await client.post(f"/status/{code}", headers=headers)
            second = await client.post(f"/status/{code}", headers=headers)
        assert code == second.status_code
        assert "true" == second.headers["idempotent-replayed"]
        assert 1 == probe.executions[f"status{code}"]

    async def test_a_body_over_the_limit_is_not_stored(self, backend):
        """A response larger than max_response_size reaches the client whole but is not kept:
        the retry executes again."""
        async with started(backend, http={"idempotency": {"max_response_size": 1024}}) as (
            client,
            probe,
        ):
            headers = key()
            first = await client.post("/big", headers=headers)
            second = await client.post("/big", headers=headers)
        assert 4096 == len(first.content) == len(second.content)
        assert "idempotent-replayed" not in second.headers
        assert 2 == probe.executions["big"]

    async def test_an_exception_releases_the_key(self, backend):
        """An endpoint that raises (500) leaves the key free for the retry."""
        async with started(backend) as (client, probe):
            headers = key()
            first = await client.post("/boom", headers=headers)
            second = await client.post("/boom", headers=headers)
        assert 500 == first.status_code == second.status_code
        assert 2 == probe.executions["boom"]

    async def test_a_cancelled_request_releases_the_key(self, backend):
        """A request cancelled mid-execution (client gone, shutdown) frees its key."""
        probe = Probe()
        async with started(backend, probe) as (client, _):
            headers = key()
            task = asyncio.create_task(client.post("/slow", headers=headers))
            await until(lambda: probe.executions.get("slow") == 1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            probe.gate.set()
            again = await client.post("/slow", headers=headers)
        assert 200 == again.status_code
        assert "idempotent-replayed" not in again.headers
        assert 2 == probe.executions["slow"]


async def until(condition, *, rounds: int = 1000) -> None:
    """Yield to the loop until ``condition()``; bounded (the stores do real I/O)."""
    for _ in range(rounds):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition never held")


class TestConcurrency:
    async def test_concurrent_requests_execute_once(self, backend):
        """N requests at once with one key: one execution; the others 409 (in progress)
        with Retry-After; after it finishes, retries replay."""
        probe = Probe()
        async with started(backend, probe) as (client, _):
            headers = key()
            tasks = [asyncio.create_task(client.post("/slow", headers=headers)) for _ in range(8)]
            await until(lambda: sum(task.done() for task in tasks) == 7)
            probe.gate.set()
            responses = await asyncio.gather(*tasks)
            replay = await client.post("/slow", headers=headers)
        assert 1 == probe.executions["slow"]
        statuses = sorted(response.status_code for response in responses)
        assert [200] + [409] * 7 == statuses
        conflict = next(r for r in responses if r.status_code == 409)
        assert "CONFLICT" == conflict.json()["code"]
        assert "1" == conflict.headers["retry-after"]
        assert "true" == replay.headers["idempotent-replayed"]

    async def test_concurrent_requests_without_a_gate_never_execute_twice(self, backend):
        """Whatever the interleaving, one key executes once: the rest are 409s or replays."""
        async with started(backend) as (client, probe):
            headers = key()
            responses = await asyncio.gather(
                *(client.post("/payments", json={"amount": 1}, headers=headers) for _ in range(10))
            )
        assert 1 == probe.executions["pay"]
        for response in responses:
            assert response.status_code in (201, 409)
            if response.status_code == 201 and "idempotent-replayed" in response.headers:
                assert {"n": 1, "amount": 1} == response.json()


class TestKeyValidation:
    @pytest.mark.parametrize(
        "value",
        ['""', '"abc', '"a\\b"', '"abc";p=1', "a b", "ключ", "x" * 256, '"' + "x" * 256 + '"'],
    )
    async def test_invalid_keys_are_422(self, value):
        """A key that is empty, too long, not printable ASCII or malformed is refused,
        naming the header; nothing runs."""
        async with started({"database": {"enabled": False}}) as (client, probe):
            response = await client.post(
                "/payments", json={}, headers={"Idempotency-Key": value.encode()}
            )
        assert 422 == response.status_code
        body = response.json()
        assert "INVALID_INPUT" == body["code"]
        assert "header.Idempotency-Key" == body["errors"][0]["field"]
        assert "pay" not in probe.executions

    async def test_two_keys_are_refused(self):
        """Two Idempotency-Key headers are ambiguous: 422."""
        async with started({"database": {"enabled": False}}) as (client, _):
            response = await client.post(
                "/payments",
                json={},
                headers=[("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
            )
        assert 422 == response.status_code

    async def test_a_missing_key_on_a_required_route_is_422(self):
        """@idempotent(required=True): no header is 422 INVALID_INPUT (the draft says 400;
        bastion answers every input problem with 422)."""
        async with started({"database": {"enabled": False}}) as (client, probe):
            response = await client.post("/required")
            keyed = await client.post("/required", headers=key())
        assert 422 == response.status_code
        assert "missing" == response.json()["errors"][0]["code"]
        assert 200 == keyed.status_code
        assert 1 == probe.executions["required"]

    async def test_max_key_length_is_configurable(self):
        """http.idempotency.max_key_length bounds the key; the limit is in the error."""
        async with started(
            {"database": {"enabled": False}}, http={"idempotency": {"max_key_length": 16}}
        ) as (client, _):
            response = await client.post(
                "/payments", json={}, headers={"Idempotency-Key": "k" * 17}
            )
        assert 16 == response.json()["errors"][0]["limit"]


class TestTakeover:
    async def test_a_crashed_holder_is_taken_over_after_the_lock(self):
        """A key held by a request that never finished: 409 until the lock expires, then
        a retry executes and its response is replayed."""
        now = [0.0]
        store = MemoryIdempotencyStore(clock=lambda: now[0])
        async with started({"database": {"enabled": False}, "_store": store}) as (client, probe):
            headers = key()
            from bastion.http._idempotency import fingerprint

            body = b'{"amount":1}'
            crashed = record_key(
                tenant=None,
                caller=f"ip:{CLIENT[0]}",
                method="POST",
                template="/payments",
                key=headers["Idempotency-Key"],
            )
            signature = fingerprint("POST", b"/payments", b"", b"application/json", [body])
            await store.acquire(crashed, signature, "0" * 32, lock_timeout=60)
            send = {"content": body, "headers": {**headers, "content-type": "application/json"}}
            held = await client.post("/payments", **send)
            now[0] = 61.0
            taken = await client.post("/payments", **send)
            replay = await client.post("/payments", **send)
        assert 409 == held.status_code
        assert 201 == taken.status_code
        assert "true" == replay.headers["idempotent-replayed"]
        assert 1 == probe.executions["pay"]


class BrokenStore:
    """A store whose every call fails, as Redis or the database down would."""

    kind = "redis"

    def __init__(self, *, acquire: bool = True) -> None:
        self.inner = MemoryIdempotencyStore()
        self.fail_acquire = acquire

    async def acquire(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail_acquire:
            raise IdempotencyStoreError("redis: ConnectionError")
        return await self.inner.acquire(*args, **kwargs)

    async def complete(self, *args: Any, **kwargs: Any) -> bool:
        raise IdempotencyStoreError("redis: ConnectionError")

    async def release(self, *args: Any, **kwargs: Any) -> bool:
        raise IdempotencyStoreError("redis: ConnectionError")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ping(self) -> None: ...


class TestStoreFailure:
    async def test_a_store_down_fails_closed_with_503(self):
        """The store cannot be asked: 503 with Retry-After, the app does not run (running
        without the guarantee could charge twice); counted as store_error."""
        before = outcome("store_error")
        store: IdempotencyStore = BrokenStore()  # type: ignore[assignment]
        async with started({"database": {"enabled": False}, "_store": store}) as (client, probe):
            response = await client.post("/payments", json={}, headers=key())
            unkeyed = await client.post("/payments", json={})
        assert 503 == response.status_code
        assert "SERVICE_UNAVAILABLE" == response.json()["code"]
        assert "1" == response.headers["retry-after"]
        assert 1 == probe.executions["pay"]  # the request without a key only
        assert 201 == unkeyed.status_code
        assert 1 == outcome("store_error") - before

    async def test_a_failed_completion_still_answers(self):
        """The store fails after the app ran: the client still gets its answer."""
        store: IdempotencyStore = BrokenStore(acquire=False)  # type: ignore[assignment]
        async with started({"database": {"enabled": False}, "_store": store}) as (client, _):
            response = await client.post("/payments", json={}, headers=key())
            failed = await client.post("/status/500", headers=key())
        assert 201 == response.status_code
        assert 500 == failed.status_code


class TestMetrics:
    async def test_outcomes_are_counted(self):
        """Each keyed request counts one outcome: executed, replayed, reused, released."""
        names = ("executed", "replayed", "reused", "released")
        before = {name: outcome(name) for name in names}
        async with started({"database": {"enabled": False}}) as (client, _):
            headers = key()
            await client.post("/payments", json={"amount": 1}, headers=headers)
            await client.post("/payments", json={"amount": 1}, headers=headers)
            await client.post("/payments", json={"amount": 2}, headers=headers)
            await client.post("/status/500", headers=key())
        assert dict.fromkeys(names, 1.0) == {name: outcome(name) - before[name] for name in names}


class TestRoutes:
    def test_marks_on_other_methods_are_refused(self):
        """@idempotent on a GET or PUT route is a configuration error."""
        app = FastAPI()

        @app.put("/things")
        @idempotent()
        async def put_thing() -> None: ...

        with pytest.raises(ConfigurationError, match="only POST and PATCH"):
            check_idempotent_routes(app.router.routes)

    def test_marked_routes_are_counted(self):
        """The start-up check says how many routes are marked."""
        app = FastAPI()

        @app.post("/a")
        @idempotent()
        async def a() -> None: ...

        @app.post("/b")
        async def b() -> None: ...

        assert 1 == check_idempotent_routes(app.router.routes)

    def test_ttl_must_be_positive(self):
        """@idempotent(ttl=0) is refused at decoration."""
        with pytest.raises(ConfigurationError, match="ttl"):
            idempotent(ttl=0)

    async def test_disabled_passes_everything(self):
        """http.idempotency.enabled off: keys are ignored, every request runs."""
        async with started(
            {"database": {"enabled": False}}, http={"idempotency": {"enabled": False}}
        ) as (client, probe):
            headers = key()
            await client.post("/payments", json={}, headers=headers)
            await client.post("/payments", json={}, headers=headers)
            missing = await client.post("/required")
        assert 2 == probe.executions["pay"]
        assert 200 == missing.status_code


class TestNoMarks:
    async def test_an_app_without_marks_passes_keyed_requests(self):
        """No @idempotent route anywhere: keyed requests run as if the layer were absent."""
        app = FastAPI()
        runs = []

        @app.post("/a")
        async def a() -> None:
            runs.append(1)

        runtime = bastion.install(app, database={"enabled": False}, logging={"level": "WARNING"})
        assert runtime.idempotency is not None
        transport = httpx.ASGITransport(app=app, client=CLIENT)
        async with (
            app.router.lifespan_context(app),
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
        ):
            headers = key()
            await client.post("/a", headers=headers)
            await client.post("/a", headers=headers)
            await client.get("/a", headers=headers)
        assert 2 == len(runs)


class TestWiring:
    async def test_memory_with_several_workers_warns(self):
        """A memory store under server.workers > 1 is a start-up warning naming the fix."""
        app = FastAPI()

        @app.post("/a")
        @idempotent()
        async def a() -> None: ...

        settings = load_settings(database={"enabled": False}, server={"workers": 2})
        store = MemoryIdempotencyStore()
        with structlog.testing.capture_logs() as logs:
            await start_idempotency(store, settings, app.router.routes)
        warnings = [log for log in logs if log["log_level"] == "warning"]
        assert 1 == len(warnings)
        assert "BASTION_REDIS__URL" in warnings[0]["event"]

    async def test_start_refuses_bad_marks(self):
        """Start-up stops on a mark that cannot apply, before any request."""
        app = FastAPI()

        @app.get("/a")
        @idempotent()
        async def a() -> None: ...

        with pytest.raises(ConfigurationError):
            await start_idempotency(
                MemoryIdempotencyStore(),
                load_settings(database={"enabled": False}),
                app.router.routes,
            )

    def test_operations_and_their_documentation(self):
        """The OpenAPI of a keyed operation names the header and the 409, 422 and 503 codes,
        keeping the codes the operation already listed."""
        app = FastAPI()

        @app.post("/a")
        @idempotent(required=True)
        async def a() -> None: ...

        @app.post("/b")
        async def b() -> None: ...

        operations = idempotent_operations(app.router.routes)
        assert [("POST", "/a")] == list(operations)
        operation = {"responses": {"422": {"x-error-codes": ["INPUT_TOO_LONG"]}}}
        document_idempotency(operation, operations["POST", "/a"])
        document_idempotency(operation, operations["POST", "/a"])
        assert [True] == [p["required"] for p in operation["parameters"]]
        assert {"409", "422", "503"} <= set(operation["responses"])
        assert [
            "IDEMPOTENCY_KEY_REUSED",
            "INPUT_TOO_LONG",
            "INVALID_INPUT",
        ] == operation["responses"]["422"]["x-error-codes"]
