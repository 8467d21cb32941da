"""Policies, keys, the decorator, and the route table that picks the router's route."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route, Router

from bastion._routes import RouteTable, route_entries
from bastion.context import RequestContext
from bastion.errors import ConfigurationError
from bastion.ratelimit import MemoryStore, RateLimiter, rate_limit
from bastion.ratelimit._policy import (
    Policy,
    RoutePlan,
    build_policy,
    check_policy_name,
    client_bucket,
)
from bastion.ratelimit._rules import build_rules
from bastion.settings import RateLimitPolicy, RateLimitSettings, load_settings


def limiter(**section) -> RateLimiter:
    return RateLimiter(RateLimitSettings(**section), store=MemoryStore())


def context(**fields) -> RequestContext:
    return RequestContext("req", "GET", "192.0.2.1", **fields)


class TestKeys:
    def policy(self, *by: str) -> Policy:
        return Policy("p", build_rules("1/second", "token_bucket", max_log_limit=10), by=by)

    def test_client_is_the_principal_when_known(self):
        """``client`` counts an authenticated caller by principal, wherever they call from."""
        key = self.policy("client").key
        assert "p|u:alice" == key(context(user_id="alice"), "192.0.2.1", "GET /x")
        assert "p|ip:192.0.2.1" == key(context(), "192.0.2.1", "GET /x")

    @pytest.mark.parametrize("by", [("client",), ("principal",), ("principal", "route")])
    def test_an_api_key_is_its_own_client(self, by):
        """A request with an API key is counted per key, not per address it calls from."""
        key = self.policy(*by).key
        first = key(context(api_key_id="key1", tenant_id="acme"), "192.0.2.1", "GET /x")
        moved = key(context(api_key_id="key1", tenant_id="acme"), "198.51.100.9", "GET /x")
        other = key(context(api_key_id="key2", tenant_id="acme"), "192.0.2.1", "GET /x")
        assert first == moved
        assert first != other
        assert first.startswith("p|k:key1")

    def test_missing_identity_parts_fall_back_to_the_ip(self):
        """Anonymous callers of a per-tenant policy never share one bucket."""
        key = self.policy("tenant", "api_key").key
        assert "p|ip:192.0.2.1|ip:192.0.2.1" == key(context(), "192.0.2.1", "GET /x")
        assert "p|t:acme|k:key1" == key(
            context(tenant_id="acme", api_key_id="key1"), "192.0.2.1", "GET /x"
        )

    def test_route_part_is_method_and_template(self):
        """``route`` counts each operation apart."""
        key = self.policy("ip", "route").key
        assert "p|ip:192.0.2.1|r:POST /v1/docs" == key(context(), "192.0.2.1", "POST /v1/docs")

    def test_principal_part(self):
        """``principal`` is the user when known."""
        key = self.policy("principal").key
        assert "p|u:bob" == key(context(user_id="bob"), "x", "r")

    def test_ip_ignores_the_principal(self):
        """``ip`` counts by address even for an authenticated caller."""
        key = self.policy("ip").key
        assert "p|ip:192.0.2.1" == key(context(user_id="bob"), "192.0.2.1", "r")

    def test_no_context_uses_the_ip(self):
        """Outside a request context (no request middleware), the address is what is known."""
        assert "p|ip:1.2.3.4|ip:1.2.3.4" == self.policy("tenant", "client").key(
            None, "1.2.3.4", "r"
        )

    def test_unknown_key_part_is_refused(self):
        """A typo in ``by`` fails at configuration."""
        with pytest.raises(ConfigurationError, match="'by' takes"):
            self.policy("user")


class TestNames:
    @pytest.mark.parametrize("name", ["", "-x", "a b", "x" * 65, "exempt", "default"])
    def test_bad_or_reserved_names(self, name):
        """Names go into keys and headers; two are reserved."""
        with pytest.raises(ConfigurationError, match="policy name"):
            check_policy_name(name)

    def test_the_default_policy_may_be_called_default(self):
        """Only the default policy is allowed its own name."""
        assert "default" == check_policy_name("default", default=True)

    def test_repr_names_the_limits(self):
        """A policy reads as its name, limits and key parts."""
        policy = Policy("p", build_rules("1/second;5/minute", "token_bucket", max_log_limit=10))
        assert "Policy('p', '1/second;5/minute', by=['client'])" == repr(policy)


class TestClientBucket:
    def test_ipv4_is_itself(self):
        """An IPv4 client is its address."""
        assert "192.0.2.1" == client_bucket("192.0.2.1")

    def test_ipv6_is_its_slash_64(self):
        """Every address of one /64 is one client."""
        assert "2001:db8:1:2::/64" == client_bucket("2001:db8:1:2:aaaa::1")
        assert client_bucket("2001:db8:1:2::1") == client_bucket("2001:db8:1:2:ffff::9")
        assert client_bucket("2001:db8:1:2::1") != client_bucket("2001:db8:1:3::1")

    def test_ipv4_mapped_is_ipv4(self):
        """A dual-stack socket's mapped address counts as the IPv4 client."""
        assert "192.0.2.1" == client_bucket("::ffff:192.0.2.1")

    def test_not_an_address_is_kept(self):
        """A test client's name is counted as it is."""
        assert "testclient" == client_bucket("testclient")
        assert "not:an:address" == client_bucket("not:an:address")


class TestSettings:
    def test_policies_and_routes_from_the_environment(self, monkeypatch):
        """Policies and routes are JSON in the environment, like every dict setting."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "20/second;1000/hour")
        monkeypatch.setenv(
            "BASTION_RATELIMIT__POLICIES",
            '{"uploads": {"limits": "10/minute", "by": ["tenant"], "fail_open": false}}',
        )
        monkeypatch.setenv("BASTION_RATELIMIT__ROUTES", '{"POST /v1/documents": "uploads"}')
        section = load_settings().ratelimit
        assert "20/second;1000/hour" == section.default
        assert ["tenant"] == section.policies["uploads"].by
        assert {"POST /v1/documents": "uploads"} == section.routes

    @pytest.mark.parametrize("value", ["", "none", "off"])
    def test_an_empty_default_is_none(self, monkeypatch, value):
        """``BASTION_RATELIMIT__DEFAULT=`` switches the default off."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", value)
        assert load_settings().ratelimit.default is None

    def test_a_route_naming_no_policy_fails_at_load(self):
        """A typo in a route's policy is a load-time error naming the variable."""
        with pytest.raises(
            ConfigurationError, match=r"BASTION_RATELIMIT.*names no policy 'upload'"
        ):
            load_settings(ratelimit={"routes": {"/v1/x": "upload"}})

    def test_a_bad_route_key_fails_at_load(self):
        """A route key is a template or METHOD template."""
        with pytest.raises(ConfigurationError, match="not a route template"):
            load_settings(ratelimit={"routes": {"v1/x": "exempt"}})

    @pytest.mark.parametrize("name", ["default", "exempt", "a b", "-x"])
    def test_reserved_or_bad_policy_names_fail_at_load(self, name):
        """Policy names go into keys and headers; two are reserved."""
        with pytest.raises(ConfigurationError, match="policy name"):
            load_settings(ratelimit={"policies": {name: {"limits": "1/second"}}})

    def test_an_invalid_default_fails_at_load(self, monkeypatch):
        """An invalid limit expression is refused when the settings load, not per request."""
        monkeypatch.setenv("BASTION_RATELIMIT__DEFAULT", "lots")
        with pytest.raises(ConfigurationError, match="BASTION_RATELIMIT__DEFAULT"):
            load_settings()


class TestBuildPolicy:
    def test_inherits_algorithm_and_failure_rule(self):
        """A policy that names neither takes ratelimit.algorithm and ratelimit.fail_open."""
        policy = build_policy(
            "p",
            RateLimitPolicy(limits="5/second"),
            algorithm="sliding_window",
            fail_open=False,
            max_log_limit=1000,
            headers=True,
        )
        assert "sliding_window" == policy.rules[0].algorithm
        assert policy.fail_open is False

    def test_a_large_sliding_log_is_refused_with_the_policy_named(self):
        """A 70,000-per-day exact log is refused at configuration."""
        with pytest.raises(ConfigurationError, match=r"policy 'big'.*max_log_limit"):
            build_policy(
                "big",
                RateLimitPolicy(limits="70000/day", algorithm="sliding_log"),
                algorithm="token_bucket",
                fail_open=True,
                max_log_limit=1000,
                headers=True,
            )

    def test_a_cost_above_the_burst_is_refused(self):
        """A cost no burst can hold would be rejected for ever: refused at configuration."""
        with pytest.raises(ConfigurationError, match=r"policy 'p'.*can never pass"):
            build_policy(
                "p",
                RateLimitPolicy(limits="2/second", cost=3),
                algorithm="token_bucket",
                fail_open=True,
                max_log_limit=1000,
                headers=True,
            )

    def test_the_limiter_refuses_a_bad_policy_at_install(self):
        """Building the limiter (at install) refuses what a store could not run."""
        with pytest.raises(ConfigurationError, match="max_log_limit"):
            limiter(default="5000/hour", algorithm="sliding_log")


class TestDecorator:
    def test_marks_and_returns_the_endpoint(self):
        """The decorator returns the same function (FastAPI reads its signature)."""

        async def upload(): ...

        assert upload is rate_limit("10/minute")(upload)

    def test_limits_or_policy_not_both(self):
        """One of an inline limit or a named policy."""
        with pytest.raises(ConfigurationError, match="not both"):
            rate_limit("1/second", policy="p")
        with pytest.raises(ConfigurationError, match="not both"):
            rate_limit()

    def test_invalid_inline_limits_fail_at_decoration(self):
        """A bad expression fails at import, not at the first request."""
        with pytest.raises(ConfigurationError, match="not a limit"):
            rate_limit("many per day")

    def test_bad_key_part_or_cost(self):
        """``by`` and ``cost`` are checked at decoration."""
        with pytest.raises(ConfigurationError, match="by="):
            rate_limit("1/second", by=["user"])  # type: ignore[list-item]
        with pytest.raises(ConfigurationError, match="cost"):
            rate_limit("1/second", cost=0)

    def test_policy_takes_no_inline_settings(self):
        """A named policy's settings come from the settings."""
        with pytest.raises(ConfigurationError, match="takes its settings from the policy"):
            rate_limit(policy="p", algorithm="sliding_log")

    def test_undecoratable(self):
        """Something that cannot carry the mark is refused."""
        with pytest.raises(TypeError, match="endpoint functions"):
            rate_limit.exempt(42)


# -- the route table against Starlette's own router -------------------------------------

NAMES: dict[int, str] = {}


def endpoint(name: str):
    """An endpoint that answers its own name, so the router's pick can be read."""

    async def answer(request: Request) -> PlainTextResponse:
        return PlainTextResponse(name)

    NAMES[id(answer)] = name
    return answer


ROUTES = [
    Route("/users/{id}", endpoint("/users/{id}"), methods=["GET"]),
    Route("/users/me", endpoint("/users/me"), methods=["GET", "POST"]),
    Route("/items", endpoint("/items"), methods=["GET"]),
    Route("/items", endpoint("/items#post"), methods=["POST"]),
    Route("/items/{id:int}", endpoint("/items/{id}"), methods=["GET", "DELETE"]),
    Route("/items/{name}", endpoint("/items/{name}")),
    Route("/files/{path:path}", endpoint("/files/{path}"), methods=["GET"]),
    Mount(
        "/org/{org}",
        routes=[
            Route("/docs", endpoint("/org/{org}/docs"), methods=["GET"]),
            Route("/docs/{doc}", endpoint("/org/{org}/docs/{doc}"), methods=["GET", "PUT"]),
        ],
    ),
    Route("/org/{org}/late", endpoint("/org/{org}/late")),
    Route("/", endpoint("/")),
]

SEGMENTS = ["users", "me", "items", "42", "x", "files", "a", "org", "acme", "docs", "late", ""]
UNMATCHED = RoutePlan(None, "unmatched")
TABLE = RouteTable(
    list(route_entries(ROUTES)),
    lambda entry, method: RoutePlan(None, NAMES[id(entry.endpoint)]),
    UNMATCHED,
)
ROUTER = Router(routes=ROUTES)


async def router_pick(method: str, path: str) -> str | None:
    """What Starlette's router does: the endpoint that answers, or None for a 404 or 405.

    Driven with a raw ASGI scope: an HTTP client would normalise the very paths
    (``//users``, a final newline) whose routing is in question.
    """
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": b"",
        "headers": [],
    }
    sent: list[dict] = []

    async def receive() -> dict:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: dict) -> None:
        sent.append(message)

    await ROUTER(scope, receive, send)
    if sent[0]["status"] != 200:
        return None
    return b"".join(m.get("body", b"") for m in sent[1:]).decode()


def table_pick(method: str, path: str) -> str | None:
    """What the table resolves: the endpoint's name, or None when unmatched."""
    found = TABLE.resolve(method, path)
    return None if found is UNMATCHED else found.route


class TestRouteEntries:
    def test_a_mounted_app_is_one_route(self):
        """A mount of an app with no routes (static files) is one route under its prefix."""

        async def files(scope, receive, send): ...

        entries = list(route_entries([Mount("/static", app=files)]))
        assert [("/static/{path}", None)] == [(e.template, e.methods) for e in entries]

    def test_static_routes_only(self):
        """Without parametrised routes there is no alternation; other paths are unmatched."""
        table = RouteTable(
            list(route_entries([Route("/a", endpoint("/a"))])),
            lambda entry, method: RoutePlan(None, "a"),
            UNMATCHED,
        )
        assert "a" == table.resolve("GET", "/a").route
        assert table.resolve("GET", "/b") is UNMATCHED


class TestRouteTable:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/users/me"),  # a parametrised route declared before the static one wins
            ("POST", "/users/me"),  # ...but not for a method it does not take
            ("GET", "/items"),
            ("POST", "/items"),
            ("PUT", "/items"),  # 405 in the router: unmatched here
            ("GET", "/items/42"),  # the int convertor
            ("DELETE", "/items/42"),
            ("PATCH", "/items/42"),  # /items/{name} takes every method
            ("GET", "/items/abc"),
            ("GET", "/files/a/b/c.txt"),
            ("GET", "/org/acme/docs"),
            ("PUT", "/org/acme/docs/7"),
            ("GET", "/org/acme/late"),  # the mount took it: its 404, not the later route
            ("GET", "/"),
            ("GET", "/nowhere/at/all"),
            ("GET", "/items\n"),  # the router's $ matches before a final newline
        ],
    )
    async def test_picks_the_routers_route(self, method, path):
        """The table resolves every request to the route the router would call."""
        assert await router_pick(method, path) == table_pick(method, path)

    @settings(max_examples=60, deadline=None)
    @given(
        method=st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH"]),
        parts=st.lists(st.sampled_from(SEGMENTS), min_size=1, max_size=4),
    )
    def test_agrees_with_the_router_on_any_path(self, method, parts):
        """For any path built from the routes' own segments, the table and the router agree."""
        path = "/" + "/".join(parts)
        assert asyncio.run(router_pick(method, path)) == table_pick(method, path)
