"""The rate-limit middleware in the installed stack: policies, headers, 429s, failures."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from fastapi import APIRouter, FastAPI
from prometheus_client import REGISTRY
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from support import free_port

import bastion
import bastion.errors
from bastion.ratelimit import MemoryStore, RateLimitMiddleware, RedisStore, rate_limit

PROBLEM = "application/problem+json"


def make_app(**overrides: Any) -> FastAPI:
    """A FastAPI app with routes for every way a route can be limited, bastion installed."""
    app = FastAPI()

    @app.get("/items/{item_id}")
    async def read_item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @app.get("/items/mine")
    async def mine() -> dict[str, str]:  # shadowed by /items/{item_id}, as in the router
        return {"id": "mine"}

    @app.post("/uploads")
    @rate_limit("2/minute", by=["ip", "route"])
    async def upload() -> dict[str, bool]:
        return {"ok": True}

    @rate_limit(policy="shared")
    @app.get("/shared/a")
    async def shared_a() -> dict[str, str]:
        return {"a": "a"}

    @app.get("/shared/b")
    @rate_limit(policy="shared")
    async def shared_b() -> dict[str, str]:
        return {"b": "b"}

    @app.get("/free")
    @rate_limit.exempt
    async def free() -> dict[str, bool]:
        return {"free": True}

    @app.get("/configured")
    async def configured() -> dict[str, bool]:
        return {"ok": True}

    overrides.setdefault("database", {"enabled": False})
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    section = overrides.setdefault("ratelimit", {})
    section.setdefault("default", "3/minute")
    section.setdefault("policies", {"shared": {"limits": "2/minute"}})
    bastion.install(app, **overrides)
    return app


@asynccontextmanager
async def started(
    app: Any, client: tuple[str, int] = ("192.0.2.10", 5000)
) -> AsyncIterator[httpx.AsyncClient]:
    """The started app, called from ``client`` (the socket peer)."""
    transport = httpx.ASGITransport(app=app, client=client)
    async with (
        httpx.AsyncClient(transport=transport, base_url="http://testserver") as c,
        app.router.lifespan_context(app),
    ):
        yield c


async def statuses(client: httpx.AsyncClient, path: str, n: int, **kwargs: Any) -> list[int]:
    method = kwargs.pop("method", "GET")
    return [(await client.request(method, path, **kwargs)).status_code for _ in range(n)]


def decisions(policy: str, decision: str) -> float:
    return (
        REGISTRY.get_sample_value(
            "bastion_ratelimit_decisions_total", {"policy": policy, "decision": decision}
        )
        or 0.0
    )


class TestDefaultPolicy:
    async def test_default_applies_per_client(self):
        """Every route not configured otherwise gets the default, counted per client."""
        async with started(make_app()) as client:
            assert [200, 200, 200, 429] == await statuses(client, "/items/1", 4)
        async with started(make_app(), client=("192.0.2.11", 1)) as other:
            assert 200 == (await other.get("/items/1")).status_code

    async def test_routes_share_the_default_bucket(self):
        """The default counts the client, not the route: 3 per minute across all routes."""
        async with started(make_app()) as client:
            assert [200, 200] == await statuses(client, "/items/1", 2)
            assert [200, 429] == await statuses(client, "/configured", 2)

    async def test_unmatched_paths_are_counted(self):
        """A 404 is limited by the default too: scanning paths is not free."""
        async with started(make_app()) as client:
            assert [404, 404, 404, 429] == await statuses(client, "/no/such/path", 4)

    async def test_no_default_and_no_route_policy_limits_nothing(self):
        """Without any policy the middleware passes every request on."""
        app = make_app(ratelimit={"default": None})
        async with started(app) as client:
            assert [200] * 10 == await statuses(client, "/items/1", 10)
            assert "x-ratelimit-limit" not in (await client.get("/items/1")).headers

    async def test_counted_in_the_decisions_metric(self):
        """Every decision is counted by policy and outcome."""
        allowed, rejected = decisions("default", "allowed"), decisions("default", "rejected")
        async with started(make_app()) as client:
            await statuses(client, "/items/1", 5)
        assert 3 == decisions("default", "allowed") - allowed
        assert 2 == decisions("default", "rejected") - rejected


class TestResponses:
    async def test_rejection_is_a_problem_with_retry_after_and_headers(self):
        """A 429 is problem+json RATE_LIMITED with the correlation id, Retry-After and headers."""
        async with started(make_app()) as client:
            await statuses(client, "/items/1", 3)
            response = await client.get("/items/1", headers={"X-Request-Id": "req-429"})
        assert 429 == response.status_code
        assert PROBLEM == response.headers["content-type"]
        body = response.json()
        assert "RATE_LIMITED" == body["code"]
        assert "req-429" == body["correlation_id"] == response.headers["x-request-id"]
        assert 429 == body["status"]
        # 3 per minute: one unit comes back every 20 s.
        assert 19 <= int(response.headers["retry-after"]) <= 20
        assert "3" == response.headers["x-ratelimit-limit"]
        assert "0" == response.headers["x-ratelimit-remaining"]
        assert 59 <= int(response.headers["x-ratelimit-reset"]) <= 60
        assert '"default";q=3;w=60' == response.headers["ratelimit-policy"]
        assert response.headers["ratelimit"].startswith('"default";r=0;t=')

    async def test_admitted_responses_carry_the_headers(self):
        """Admitted responses of a limited route count down in both header families."""
        async with started(make_app()) as client:
            first = await client.get("/items/1")
            second = await client.get("/items/1")
        assert "3" == first.headers["x-ratelimit-limit"]
        assert ["2", "1"] == [r.headers["x-ratelimit-remaining"] for r in (first, second)]
        assert first.headers["ratelimit"].startswith('"default";r=2;t=')
        assert '"default";q=3;w=60' == first.headers["ratelimit-policy"]
        assert {"id": 1} == first.json()

    async def test_rejections_are_labelled_with_their_route(self):
        """A 429 never reaches the router, yet metrics and logs still name its route."""
        labels = {
            "http_request_method": "GET",
            "http_route": "/items/{item_id}",
            "http_response_status_code": "429",
        }
        name = "http_server_request_duration_seconds_count"
        before = REGISTRY.get_sample_value(name, labels) or 0.0
        app = make_app(metrics={"enabled": True})
        async with started(app) as client:
            await statuses(client, "/items/1", 5)
        assert 2 == (REGISTRY.get_sample_value(name, labels) or 0.0) - before

    async def test_headers_can_be_switched_off(self):
        """ratelimit.headers=false sends none, but a 429 still has Retry-After."""
        app = make_app(ratelimit={"headers": False})
        async with started(app) as client:
            responses = [await client.get("/items/1") for _ in range(4)]
        assert all("x-ratelimit-limit" not in r.headers for r in responses)
        assert all("ratelimit" not in r.headers for r in responses)
        assert "retry-after" in responses[-1].headers

    async def test_several_limits_are_decided_together(self):
        """A policy with several limits: RateLimit-Policy lists each, RateLimit the tightest."""
        app = make_app(ratelimit={"default": "5/second;3/minute"})
        async with started(app) as client:
            response = await client.get("/items/1")
        assert (
            '"default-1s";q=5;w=1, "default-60s";q=3;w=60' == response.headers["ratelimit-policy"]
        )
        assert response.headers["ratelimit"].startswith('"default-60s";r=2;t=')


class TestRoutePolicies:
    async def test_a_configured_route_policy_replaces_the_default(self):
        """ratelimit.routes gives a route its own policy and its own counts."""
        app = make_app(
            ratelimit={
                "policies": {"shared": {"limits": "2/minute"}, "tight": {"limits": "1/minute"}},
                "routes": {"GET /configured": "tight"},
            }
        )
        async with started(app) as client:
            assert [200, 429] == await statuses(client, "/configured", 2)
            # The default's bucket was not touched.
            assert [200, 200, 200] == await statuses(client, "/items/1", 3)

    async def test_a_route_can_be_exempted_in_the_settings(self):
        """``exempt`` in ratelimit.routes: never limited, no headers."""
        app = make_app(ratelimit={"routes": {"/configured": "exempt"}})
        async with started(app) as client:
            responses = [await client.get("/configured") for _ in range(6)]
        assert [200] * 6 == [r.status_code for r in responses]
        assert "x-ratelimit-limit" not in responses[0].headers

    async def test_settings_win_over_the_decorator(self):
        """Operators can change a decorated route's policy without a release."""
        app = make_app(ratelimit={"routes": {"POST /uploads": "exempt"}})
        async with started(app) as client:
            assert [200] * 5 == await statuses(client, "/uploads", 5, method="POST")

    async def test_inline_decorator_limits(self):
        """@rate_limit('2/minute') gives the route its own limit instead of the default."""
        async with started(make_app()) as client:
            responses = [await client.post("/uploads") for _ in range(3)]
        assert [200, 200, 429] == [r.status_code for r in responses]
        assert '"upload";q=2;w=60' == responses[0].headers["ratelimit-policy"]

    async def test_decorator_naming_a_policy_shares_its_counts(self):
        """Two routes decorated with one policy share one allowance (above or below @app.get)."""
        async with started(make_app()) as client:
            assert 200 == (await client.get("/shared/a")).status_code
            assert 200 == (await client.get("/shared/b")).status_code
            assert 429 == (await client.get("/shared/a")).status_code

    async def test_exempt_decorator(self):
        """@rate_limit.exempt: the default does not apply."""
        async with started(make_app()) as client:
            assert [200] * 6 == await statuses(client, "/free", 6)

    async def test_a_shadowed_route_gets_the_policy_of_the_route_that_answers(self):
        """/items/mine is answered by /items/{item_id} (declared first), so by its policy."""
        app = make_app(ratelimit={"routes": {"/items/mine": "exempt"}})
        async with started(app) as client:
            # 422: item_id is not an int; the router picked /items/{item_id}, and so did we.
            assert [422, 422, 422, 429] == await statuses(client, "/items/mine", 4)

    async def test_routes_added_after_start_are_read(self):
        """A route added at run time is resolved from the next request on."""
        app = make_app(ratelimit={"policies": {"shared": {"limits": "2/minute"}}})

        async with started(app) as client:
            assert 200 == (await client.get("/free")).status_code

            @app.get("/late")
            @rate_limit.exempt
            async def late() -> dict[str, bool]:
                return {"late": True}

            assert [200] * 5 == await statuses(client, "/late", 5)

    async def test_a_route_naming_no_policy_fails_at_start(self):
        """@rate_limit(policy='nope') is refused when the app starts."""
        app = make_app()

        @app.get("/broken")
        @rate_limit(policy="nope")
        async def broken() -> None: ...

        with pytest.raises(Exception, match="names no policy 'nope'"):
            async with started(app):
                pass

    async def test_two_inline_limits_with_one_name_are_refused(self):
        """Inline policies are named after the endpoint; a clash must be named apart."""
        app = make_app()

        @app.post("/more-uploads")
        @rate_limit("5/minute")
        async def upload() -> None: ...

        with pytest.raises(Exception, match="the name 'upload' is taken"):
            async with started(app):
                pass

    async def test_routes_of_included_routers_with_a_prefix(self):
        """Policies reach routes of an included router by their full template."""
        app = make_app(
            ratelimit={
                "policies": {"shared": {"limits": "2/minute"}, "tight": {"limits": "1/minute"}},
                "routes": {"GET /v1/things/{thing_id}": "tight"},
            }
        )
        router = APIRouter()

        @router.get("/things/{thing_id}")
        async def thing(thing_id: str) -> dict[str, str]:
            return {"id": thing_id}

        @router.get("/open")
        @rate_limit.exempt
        async def open_route() -> dict[str, bool]:
            return {"open": True}

        app.include_router(router, prefix="/v1")
        async with started(app) as client:
            assert [200, 429] == await statuses(client, "/v1/things/a", 2)
            assert [200] * 5 == await statuses(client, "/v1/open", 5)
            response = await client.get("/items/1")
        assert "2" == response.headers["x-ratelimit-remaining"]

    async def test_a_route_named_default_without_a_default_fails_at_start(self):
        """ratelimit.routes may name the default policy only when there is one."""
        app = make_app(ratelimit={"default": None, "routes": {"/free": "default"}})
        with pytest.raises(Exception, match=r"ratelimit\.default is not set"):
            async with started(app):
                pass

    async def test_a_decorated_cost_counts_in_the_named_policy(self):
        """@rate_limit(policy=..., cost=N) takes N units from the policy's own buckets."""
        app = make_app()

        @app.post("/heavy")
        @rate_limit(policy="shared", cost=2)
        async def heavy() -> dict[str, bool]:
            return {"ok": True}

        async with started(app) as client:
            assert 200 == (await client.post("/heavy")).status_code
            assert 429 == (await client.get("/shared/a")).status_code

    async def test_routes_naming_no_route_are_logged(self, capsys):
        """A ratelimit.routes key that matches no route is a start-up warning."""
        app = make_app(ratelimit={"routes": {"GET /no/such/route": "exempt"}})
        async with started(app):
            pass
        assert "ratelimit.routes name no route of the app" in capsys.readouterr().out

    async def test_under_a_root_path(self):
        """Behind a path prefix (root_path), routes resolve as the router sees them."""
        app = make_app(ratelimit={"routes": {"/configured": "exempt"}})
        transport = httpx.ASGITransport(app=app, client=("192.0.2.10", 1), root_path="/api")
        async with (
            httpx.AsyncClient(transport=transport, base_url="http://t") as client,
            app.router.lifespan_context(app),
        ):
            assert [200] * 5 == await statuses(client, "/api/configured", 5)
            assert [200, 200, 200, 429] == await statuses(client, "/api/items/1", 4)


class TestExemptions:
    async def test_operational_endpoints_are_never_limited(self):
        """The health probes and /metrics pass whatever the default."""
        app = make_app(ratelimit={"default": "1/minute"}, metrics={"enabled": True})
        async with started(app) as client:
            assert [200] * 5 == await statuses(client, "/health/live", 5)
            assert [200] * 5 == await statuses(client, "/metrics", 5)

    async def test_exempt_networks(self):
        """Callers from ratelimit.exempt_networks are never limited."""
        app = make_app(ratelimit={"exempt_networks": ["10.0.0.0/8"]})
        async with started(app, client=("10.1.2.3", 1)) as client:
            assert [200] * 6 == await statuses(client, "/items/1", 6)


class TestClientAddress:
    async def test_rotating_a_spoofed_header_from_an_untrusted_peer_does_not_escape(self):
        """A client sending a new X-Forwarded-For each time is still one client."""
        app = make_app(http={"trusted_proxies": ["10.0.0.0/8"]})
        async with started(app, client=("203.0.113.5", 1)) as client:
            codes = [
                (
                    await client.get("/items/1", headers={"X-Forwarded-For": f"198.51.100.{i}"})
                ).status_code
                for i in range(6)
            ]
        assert [200, 200, 200, 429, 429, 429] == codes

    async def test_through_a_trusted_proxy_each_client_has_its_own_allowance(self):
        """Behind a trusted proxy, the client it forwarded is counted, not the proxy."""
        app = make_app(http={"trusted_proxies": ["10.0.0.0/8"]})
        async with started(app, client=("10.0.0.2", 1)) as proxy:
            for client_ip in ("198.51.100.1", "198.51.100.2"):
                headers = {"X-Forwarded-For": f"6.6.6.6, {client_ip}"}
                assert [200, 200, 200, 429] == await statuses(proxy, "/items/1", 4, headers=headers)

    async def test_a_client_behind_the_proxy_cannot_spoof_the_left_of_the_header(self):
        """What the client itself put in X-Forwarded-For is left of the proxy's hop: ignored."""
        app = make_app(http={"trusted_proxies": ["10.0.0.0/8"]})
        async with started(app, client=("10.0.0.2", 1)) as proxy:
            codes = [
                (
                    await proxy.get(
                        "/items/1", headers={"X-Forwarded-For": f"1.1.1.{i}, 198.51.100.9"}
                    )
                ).status_code
                for i in range(4)
            ]
        assert [200, 200, 200, 429] == codes

    async def test_ipv6_clients_are_counted_per_slash_64(self):
        """Hopping addresses inside one /64 does not give a client more."""
        app = make_app(http={"trusted_proxies": ["10.0.0.0/8"]})
        async with started(app, client=("10.0.0.2", 1)) as proxy:
            codes = [
                (
                    await proxy.get("/items/1", headers={"X-Forwarded-For": f"2001:db8:1:2::{i}"})
                ).status_code
                for i in range(1, 5)
            ]
            other = await proxy.get("/items/1", headers={"X-Forwarded-For": "2001:db8:1:3::1"})
        assert [200, 200, 200, 429] == codes
        assert 200 == other.status_code


class TestStoreDown:
    """A Redis nobody listens on: a port just freed."""

    async def test_fails_open_by_default(self):
        """With Redis unreachable, requests are admitted, without per-limit headers, and counted."""
        before = decisions("default", "failed_open")
        app = make_app(
            ratelimit={"store_url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.2}
        )
        async with started(app) as client:
            responses = [await client.get("/items/1") for _ in range(5)]
        assert [200] * 5 == [r.status_code for r in responses]
        assert "x-ratelimit-remaining" not in responses[0].headers
        assert 5 == decisions("default", "failed_open") - before

    async def test_fails_closed_per_policy(self):
        """A fail-closed policy answers 503 problem+json with Retry-After; others stay open."""
        app = make_app(
            ratelimit={
                "store_url": f"redis://127.0.0.1:{free_port()}/0",
                "timeout": 0.2,
                "policies": {
                    "shared": {"limits": "2/minute"},
                    "strict": {"limits": "5/minute", "fail_open": False},
                },
                "routes": {"/configured": "strict"},
            }
        )
        async with started(app) as client:
            closed = await client.get("/configured", headers={"X-Request-Id": "req-503"})
            opened = await client.get("/items/1")
        assert 503 == closed.status_code
        assert PROBLEM == closed.headers["content-type"]
        assert "SERVICE_UNAVAILABLE" == closed.json()["code"]
        assert "req-503" == closed.json()["correlation_id"]
        assert "1" == closed.headers["retry-after"]
        assert 200 == opened.status_code

    async def test_the_outage_is_logged_once(self, capsys):
        """Many failed decisions make one 'running degraded' line, not one per request."""
        app = make_app(
            ratelimit={"store_url": f"redis://127.0.0.1:{free_port()}/0", "timeout": 0.2}
        )
        async with started(app) as client:
            await statuses(client, "/items/1", 5)
        lines = [
            line for line in capsys.readouterr().out.splitlines() if "running degraded" in line
        ]
        assert 1 == len(lines)
        assert "rate limits" in lines[0]


@pytest.mark.redis
class TestRedisStore:
    async def test_instances_share_one_allowance(self, redis_url, redis_prefix):
        """Two apps on one Redis (two instances) count one client once."""
        first = make_app(redis={"url": redis_url, "key_prefix": redis_prefix})
        second = make_app(redis={"url": redis_url, "key_prefix": redis_prefix})
        async with started(first) as a, started(second) as b:
            codes = [(await (a if i % 2 else b).get("/items/1")).status_code for i in range(5)]
            remaining = (await a.get("/free")).status_code
        assert [200, 200, 200, 429, 429] == codes
        assert 200 == remaining

    async def test_the_runtime_uses_a_redis_store(self, redis_url, redis_prefix):
        """With redis.url set, decisions are made in Redis under the key prefix."""
        app = make_app(redis={"url": redis_url, "key_prefix": redis_prefix})
        assert isinstance(app.state.bastion.ratelimit.store, RedisStore)
        async with started(app) as client:
            response = await client.get("/items/1")
        assert "2" == response.headers["x-ratelimit-remaining"]


class TestRuntime:
    async def test_memory_store_without_redis(self):
        """Without redis.url or store_url, limits live in this process."""
        app = make_app()
        assert isinstance(app.state.bastion.ratelimit.store, MemoryStore)

    async def test_switched_off_adds_no_middleware(self):
        """ratelimit.enabled=false: no limiter, no middleware."""
        app = make_app(ratelimit={"enabled": False})
        assert app.state.bastion.ratelimit is None
        assert all(m.cls is not RateLimitMiddleware for m in app.user_middleware)

    async def test_hit_for_something_other_than_a_request(self):
        """hit() counts any key against a named policy and raises RateLimited past it."""
        app = make_app()
        limiter = app.state.bastion.ratelimit
        async with started(app):
            verdict = await limiter.hit("shared", "export:acme")
            assert verdict.allowed
            assert (1,) == verdict.remaining
            await limiter.hit("shared", "export:acme")
            with pytest.raises(bastion.BastionError) as caught:
                await limiter.hit("shared", "export:acme")
            assert 429 == caught.value.status
            assert "Retry-After" in caught.value.headers
            with pytest.raises(KeyError):
                await limiter.hit("nope", "x")

    def test_memory_store_under_several_workers_is_a_finding(self):
        """bastion doctor and the start-up warning name the rate limits on memory://."""
        from bastion._doctor import check_workers
        from bastion.settings import load_settings

        findings = check_workers(load_settings(server={"workers": 4}))
        assert any("ratelimit" in f.detail and f.fix for f in findings)
        with_redis = load_settings(server={"workers": 4}, redis={"url": "redis://r:6379/0"})
        assert not any("ratelimit" in f.detail for f in check_workers(with_redis))

    async def test_hit_applies_the_failure_rule(self):
        """With the store down, hit() admits (fail open) or raises 503 (fail closed)."""
        app = make_app(
            ratelimit={
                "store_url": f"redis://127.0.0.1:{free_port()}/0",
                "timeout": 0.2,
                "policies": {
                    "shared": {"limits": "2/minute"},
                    "strict": {"limits": "2/minute", "fail_open": False},
                },
            }
        )
        limiter = app.state.bastion.ratelimit
        async with started(app):
            assert (await limiter.hit("default", "job:1")).allowed
            with pytest.raises(bastion.BastionError) as caught:
                await limiter.hit("strict", "job:1")
        assert 503 == caught.value.status

    def test_store_url_memory_and_unsupported(self):
        """ratelimit.store_url may say memory:// explicitly; a SQL URL is refused."""
        app = make_app(redis={"url": "redis://127.0.0.1:1/0"}, ratelimit={"store_url": "memory://"})
        assert isinstance(app.state.bastion.ratelimit.store, MemoryStore)
        with pytest.raises(bastion.errors.ConfigurationError, match="memory:// or a Redis URL"):
            make_app(ratelimit={"store_url": "postgresql+asyncpg://db/x"})

    async def test_quotas_and_login_are_on_the_runtime(self):
        """The runtime holds quota counters and login throttling on the same store."""
        runtime = make_app().state.bastion
        assert runtime.ratelimit.quotas is not None
        assert runtime.ratelimit.login is not None

    async def test_openapi_lists_429_on_limited_operations(self):
        """Every limited operation documents 429 RATE_LIMITED; exempt ones do not."""
        app = make_app()
        paths = app.openapi()["paths"]
        assert "429" in paths["/items/{item_id}"]["get"]["responses"]
        assert "429" in paths["/uploads"]["post"]["responses"]
        assert "429" not in paths["/free"]["get"]["responses"]
        assert ["RATE_LIMITED"] == paths["/uploads"]["post"]["responses"]["429"]["x-error-codes"]

    async def test_works_on_a_plain_starlette_app_without_lifespan(self):
        """A Starlette app served without the lifespan reads its routes on the first request."""

        async def hello(request: Request) -> JSONResponse:
            return JSONResponse({"hello": True})

        app = Starlette(routes=[Route("/hello", hello)])
        bastion.install(app, database={"enabled": False}, ratelimit={"default": "1/minute"})
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            assert [200, 429] == await statuses(client, "/hello", 2)


class TestAdminUnlock:
    async def test_unlock_lifts_a_lockout(self):
        """POST /admin/ratelimit/unlock with the identifier lifts its lockout."""
        app = make_app(ratelimit={"login": {"lockout_threshold": 1}})
        login = app.state.bastion.ratelimit.login
        async with started(app, client=("127.0.0.1", 1)) as client:
            await login.record_failure("Alice@example.com", "198.51.100.1")
            with pytest.raises(bastion.BastionError):
                await login.check("alice@example.com", "198.51.100.2")
            response = await client.post(
                "/admin/ratelimit/unlock", json={"identifier": "alice@example.com"}
            )
            assert 200 == response.status_code
            assert {"unlocked": True} == response.json()
            await login.check("alice@example.com", "198.51.100.2")
            again = await client.post(
                "/admin/ratelimit/unlock", json={"identifier": "alice@example.com"}
            )
            assert {"unlocked": False} == again.json()

    async def test_unlock_is_guarded_like_the_other_admin_routes(self):
        """Outside the admin networks the route answers 403."""
        async with started(make_app(), client=("198.51.100.1", 1)) as client:
            response = await client.post("/admin/ratelimit/unlock", json={"identifier": "x"})
        assert 403 == response.status_code

    @pytest.mark.parametrize("body", [b'{"id": "x"}', b"not json", b'{"identifier": "  "}'])
    async def test_unlock_validates_its_body(self, body):
        """A missing, blank or unreadable identifier is a 422 problem."""
        async with started(make_app(), client=("127.0.0.1", 1)) as client:
            response = await client.post(
                "/admin/ratelimit/unlock",
                content=body,
                headers={"content-type": "application/json"},
            )
        assert 422 == response.status_code
        assert "INVALID_INPUT" == response.json()["code"]
