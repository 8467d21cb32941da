"""CORS from settings: listed origins only, preflights answered by bastion, Vary kept right."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from fastapi import FastAPI
from http_support import APP, PROBLEM, install_http
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from bastion.errors import ConfigurationError
from bastion.http._cors import CorsPolicy, normalize_origin, origin_of_url
from bastion.http._security import SecurityMiddleware
from bastion.settings import CorsSettings, load_settings
from bastion.testing import lifespan_client

OTHER = "https://evil.example.net"


def make_app(**cors: Any) -> tuple[FastAPI, list[str]]:
    """An app whose routes record that they ran; CORS configured from ``cors``."""
    app = FastAPI()
    calls: list[str] = []

    @app.get("/items")
    async def list_items() -> dict[str, bool]:
        calls.append("GET /items")
        return {"ok": True}

    @app.post("/items")
    async def create_item() -> dict[str, bool]:
        calls.append("POST /items")
        return {"ok": True}

    cors.setdefault("allow_origins", [APP])
    # The security layer as bastion.install wires it.
    install_http(app, {"cors": cors})
    return app, calls


async def request(app: FastAPI, method: str, path: str, **kwargs: Any):
    """One request against the started app."""
    async with lifespan_client(app) as client:
        return await client.request(method, path, **kwargs)


def preflight_headers(origin: str = APP, method: str = "POST", headers: str | None = None):
    """The headers of a browser's preflight."""
    found = {"Origin": origin, "Access-Control-Request-Method": method}
    if headers is not None:
        found["Access-Control-Request-Headers"] = headers
    return found


def preflights(outcome: str) -> float:
    """Preflights counted with ``outcome`` so far."""
    value = REGISTRY.get_sample_value("bastion_http_cors_preflights_total", {"outcome": outcome})
    return value or 0.0


def vary(response) -> set[str]:
    """The Vary header's members, case-folded, over every Vary line."""
    return {
        part.strip().lower()
        for line in response.headers.get_list("vary")
        for part in line.split(",")
        if part.strip()
    }


class TestActualRequests:
    async def test_listed_origin_is_allowed(self):
        """A listed origin gets its origin back, Vary: Origin and the exposed headers."""
        app, _ = make_app()
        response = await request(app, "GET", "/items", headers={"Origin": APP})
        assert 200 == response.status_code
        assert APP == response.headers["access-control-allow-origin"]
        assert "origin" in vary(response)
        assert "X-Request-Id" in response.headers["access-control-expose-headers"]
        assert "access-control-allow-credentials" not in response.headers

    async def test_credentials(self):
        """allow_credentials adds Access-Control-Allow-Credentials: true."""
        app, _ = make_app(allow_credentials=True)
        response = await request(app, "GET", "/items", headers={"Origin": APP})
        assert "true" == response.headers["access-control-allow-credentials"]
        assert "X-CSRF-Token" not in response.headers["access-control-expose-headers"]

    async def test_unlisted_origin_gets_no_cors_headers(self):
        """An unlisted origin is answered (the app runs) but never reflected; Vary still set."""
        app, calls = make_app(allow_credentials=True)
        response = await request(app, "GET", "/items", headers={"Origin": OTHER})
        assert 200 == response.status_code
        assert ["GET /items"] == calls
        assert "access-control-allow-origin" not in response.headers
        assert "access-control-allow-credentials" not in response.headers
        assert "origin" in vary(response)

    async def test_no_origin_still_varies(self):
        """Without Origin no CORS header, but Vary: Origin so a cache keeps answers apart."""
        app, _ = make_app()
        response = await request(app, "GET", "/items")
        assert "access-control-allow-origin" not in response.headers
        assert "origin" in vary(response)

    async def test_origin_case_and_default_port_are_normalised(self):
        """HTTPS://APP.example.com:443 is the listed https://app.example.com."""
        app, _ = make_app()
        sent = "HTTPS://APP.Example.com:443"
        response = await request(app, "GET", "/items", headers={"Origin": sent})
        assert sent == response.headers["access-control-allow-origin"]

    async def test_other_port_or_scheme_is_another_origin(self):
        """http:// or another port of the listed host is not the listed origin."""
        app, _ = make_app()
        for origin in ("http://app.example.com", "https://app.example.com:8443"):
            response = await request(app, "GET", "/items", headers={"Origin": origin})
            assert "access-control-allow-origin" not in response.headers, origin

    async def test_null_origin_only_when_listed(self):
        """Origin null is refused unless "null" is listed literally."""
        app, _ = make_app()
        refused = await request(app, "GET", "/items", headers={"Origin": "null"})
        assert "access-control-allow-origin" not in refused.headers
        listed, _ = make_app(allow_origins=["null"])
        allowed = await request(listed, "GET", "/items", headers={"Origin": "null"})
        assert "null" == allowed.headers["access-control-allow-origin"]

    async def test_error_answers_carry_cors_headers(self):
        """A 404 problem to a listed origin is readable by its script."""
        app, _ = make_app()
        response = await request(app, "GET", "/nowhere", headers={"Origin": APP})
        assert 404 == response.status_code
        assert APP == response.headers["access-control-allow-origin"]


class TestPreflight:
    async def test_allowed_preflight_is_answered_here(self):
        """An allowed preflight: 204 with methods, headers, max-age; the route does not run."""
        app, calls = make_app(allow_credentials=True)
        before = preflights("allowed")
        response = await request(
            app,
            "OPTIONS",
            "/items",
            headers=preflight_headers(headers="content-type, idempotency-key"),
        )
        assert 204 == response.status_code
        assert b"" == response.content
        assert [] == calls
        assert APP == response.headers["access-control-allow-origin"]
        assert "true" == response.headers["access-control-allow-credentials"]
        assert "POST" in response.headers["access-control-allow-methods"]
        assert "Idempotency-Key" in response.headers["access-control-allow-headers"]
        assert "600" == response.headers["access-control-max-age"]
        assert {"origin", "access-control-request-method"} <= vary(response)
        assert "nosniff" == response.headers["x-content-type-options"]
        assert before + 1 == preflights("allowed")

    async def test_safelisted_headers_need_no_listing(self):
        """Accept and Accept-Language are always allowed in a preflight."""
        app, _ = make_app(allow_headers=["X-Custom"])
        response = await request(
            app, "OPTIONS", "/items", headers=preflight_headers(headers="accept, x-custom")
        )
        assert 204 == response.status_code

    @pytest.mark.parametrize(
        ("headers", "outcome", "detail"),
        [
            (preflight_headers(origin=OTHER), "origin_refused", "origin"),
            (preflight_headers(method="TRACE"), "method_refused", "method"),
            (preflight_headers(headers="x-unknown"), "headers_refused", "header"),
        ],
        ids=["origin", "method", "header"],
    )
    async def test_refused_preflight_is_a_403_problem(self, headers, outcome, detail):
        """A refused preflight: 403 FORBIDDEN problem, no CORS header, counted by reason."""
        app, calls = make_app(allow_credentials=True)
        before = preflights(outcome)
        response = await request(app, "OPTIONS", "/items", headers=headers)
        assert 403 == response.status_code
        assert PROBLEM == response.headers["content-type"]
        body = response.json()
        assert "FORBIDDEN" == body["code"]
        assert detail in body["detail"]
        assert OTHER not in response.text
        assert [] == calls
        for name in response.headers:
            assert not name.startswith("access-control-"), name
        assert "origin" in vary(response)
        assert before + 1 == preflights(outcome)

    async def test_options_without_request_method_is_not_a_preflight(self):
        """OPTIONS without Access-Control-Request-Method goes to the app as usual."""
        app, _ = make_app()
        response = await request(app, "OPTIONS", "/items", headers={"Origin": APP})
        assert 405 == response.status_code
        assert APP == response.headers["access-control-allow-origin"]

    async def test_any_method_and_header(self):
        """ "*" in methods and headers echoes what the preflight asked for."""
        app, _ = make_app(allow_methods=["*"], allow_headers=["*"], allow_credentials=True)
        response = await request(
            app, "OPTIONS", "/items", headers=preflight_headers(method="PURGE", headers="x-a, x-b")
        )
        assert 204 == response.status_code
        assert "PURGE" == response.headers["access-control-allow-methods"]
        assert "x-a, x-b" == response.headers["access-control-allow-headers"]

    async def test_refused_preflight_is_labelled_with_the_route(self):
        """A refused preflight is counted under the template of the route it asked about."""
        app, _ = make_app()
        key = {
            "http_request_method": "OPTIONS",
            "http_route": "/items",
            "http_response_status_code": "403",
        }
        before = REGISTRY.get_sample_value("http_server_request_duration_seconds_count", key) or 0
        await request(app, "OPTIONS", "/items", headers=preflight_headers(origin=OTHER))
        after = REGISTRY.get_sample_value("http_server_request_duration_seconds_count", key)
        assert before + 1 == after

    def test_undecodable_method_and_headers_are_refused(self):
        """Bytes that are not ASCII in the method or header list allow nothing."""
        policy = CorsPolicy(CorsSettings(allow_origins=[APP]))
        assert "method_refused" == policy.preflight(APP.encode(), b"P\xc3\xb6ST", None).outcome
        outcome = policy.preflight(APP.encode(), b"POST", b"x-\xff").outcome
        assert "headers_refused" == outcome


class TestWildcard:
    async def test_wildcard_without_credentials(self):
        """allow_origins ["*"] answers every real origin with *, without Vary."""
        app, _ = make_app(allow_origins=["*"])
        response = await request(app, "GET", "/items", headers={"Origin": OTHER})
        assert "*" == response.headers["access-control-allow-origin"]
        assert "access-control-allow-credentials" not in response.headers
        assert "origin" not in vary(response)
        refused_null = await request(app, "GET", "/items", headers={"Origin": "null"})
        assert "access-control-allow-origin" not in refused_null.headers

    async def test_wildcard_preflight(self):
        """A preflight under the wildcard is answered with *."""
        app, _ = make_app(allow_origins=["*"])
        response = await request(app, "OPTIONS", "/items", headers=preflight_headers(OTHER))
        assert 204 == response.status_code
        assert "*" == response.headers["access-control-allow-origin"]

    def test_wildcard_with_credentials_is_refused(self):
        """Settings refuse * together with credentials."""
        with pytest.raises(ConfigurationError, match="allow_origins"):
            load_settings(http={"cors": {"allow_origins": ["*"], "allow_credentials": True}})


class TestOff:
    async def test_no_origins_no_cors(self):
        """With no origin listed, a preflight reaches the app (405) and nothing is added."""
        app, _ = make_app(allow_origins=[])
        response = await request(app, "OPTIONS", "/items", headers=preflight_headers())
        assert 405 == response.status_code
        assert "access-control-allow-origin" not in response.headers
        assert "vary" not in response.headers

    def test_malformed_configured_origin(self):
        """A listed origin with a path is a configuration error naming it."""
        with pytest.raises(ConfigurationError, match=r"app\.example\.com/x"):
            CorsPolicy(CorsSettings(allow_origins=["https://app.example.com/x"]))


class TestNormalisation:
    @pytest.mark.parametrize(
        ("text", "expected"),
        [
            ("https://App.Example.com", "https://app.example.com"),
            ("http://a.test:80", "http://a.test"),
            ("http://a.test:0080", "http://a.test"),
            ("https://a.test:8443", "https://a.test:8443"),
            ("https://[2001:DB8::1]:443", "https://[2001:db8::1]"),
            ("null", "null"),
            ("https://a.test/", None),
            ("https://user@a.test", None),
            ("https://a.test:99999", None),
            ("https://a.test?x", None),
            ("a.test", None),
            ("https://a.test\r\nX: y", None),
        ],
    )
    def test_normalize_origin(self, text, expected):
        """Origins normalise case and default ports; anything else is not an origin."""
        assert expected == normalize_origin(text)

    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("https://App.example.com/page?q=1", "https://app.example.com"),
            ("http://[::1]:8000/x", "http://[::1]:8000"),
            ("/relative", None),
            ("https://a.test:notaport/", None),
        ],
    )
    def test_origin_of_url(self, url, expected):
        """A Referer's origin is its scheme, host and port."""
        assert expected == origin_of_url(url)


LISTED = ["https://app.example.com", "http://localhost:3000", "https://[2001:db8::1]"]
_hosts = st.sampled_from(
    ["app.example.com", "APP.EXAMPLE.COM", "localhost", "evil.com", "app.example.com.evil.com"]
) | st.from_regex(r"[A-Za-z0-9.\-]{1,20}", fullmatch=True)
_origins = st.one_of(
    st.builds(
        lambda scheme, host, port: f"{scheme}://{host}{port}",
        st.sampled_from(["http", "https", "HTTPS", "ws", "ftp"]),
        _hosts,
        st.sampled_from(["", ":443", ":80", ":3000", ":8443", ":0443"]),
    ),
    st.sampled_from(["null", "*", "", "https://app.example.com/", "https://app.example.com@x"]),
    st.text(max_size=40),
)


def _raw_app(middleware_settings):
    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    return SecurityMiddleware(app, settings=middleware_settings)


def _headers_of(middleware, origin: bytes, *, preflight: bool) -> dict[bytes, bytes]:
    sent: list[dict] = []

    async def receive():
        return {"type": "http.request", "body": b""}

    async def send(message):
        sent.append(message)

    headers = [(b"host", b"api.example.com"), (b"origin", origin)]
    if preflight:
        headers.append((b"access-control-request-method", b"GET"))
    scope = {
        "type": "http",
        "method": "OPTIONS" if preflight else "GET",
        "path": "/x",
        "scheme": "https",
        "headers": headers,
    }
    asyncio.run(middleware(scope, receive, send))
    return dict(sent[0]["headers"])


class TestNeverReflected:
    @settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow], deadline=None)
    @given(origin=_origins, credentials=st.booleans(), preflight=st.booleans())
    def test_an_unlisted_origin_is_never_reflected(self, origin, credentials, preflight):
        """Whatever Origin arrives, Access-Control-Allow-Origin is absent or a listed origin."""
        config = load_settings(
            http={"cors": {"allow_origins": LISTED, "allow_credentials": credentials}}
        )
        middleware = _raw_app(config.http)
        raw = origin.encode("utf-8")
        headers = _headers_of(middleware, raw, preflight=preflight)
        allowed = headers.get(b"access-control-allow-origin")
        if allowed is not None:
            assert raw == allowed
            assert normalize_origin(origin) in {normalize_origin(o) for o in LISTED}
        else:
            assert normalize_origin(origin) not in {normalize_origin(o) for o in LISTED}
