"""CSRF protection of cookie-authenticated unsafe requests, and the token cookie's life."""

from __future__ import annotations

import asyncio
import re
import secrets
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Response
from http_support import APP, PROBLEM, install_http
from prometheus_client import REGISTRY

import bastion
from bastion.http._csrf import parse_cookies
from bastion.http._security import SecurityMiddleware
from bastion.identity import generate_jwks
from bastion.settings import load_settings
from bastion.testing import lifespan_client

BASE = "https://api.example.com"
EVIL = "https://evil.example.net"


def make_app(**http: Any) -> tuple[FastAPI, list[str]]:
    """An app whose ``session`` cookie authenticates; routes record that they ran."""
    app = FastAPI()
    calls: list[str] = []

    @app.post("/login")
    async def login(response: Response) -> dict[str, bool]:
        calls.append("login")
        response.set_cookie(
            "session", secrets.token_hex(8), max_age=3600, secure=True, httponly=True
        )
        return {"ok": True}

    @app.post("/logout")
    async def logout(response: Response) -> dict[str, bool]:
        calls.append("logout")
        response.delete_cookie("session", secure=True, httponly=True)
        return {"ok": True}

    @app.post("/own-token")
    async def own_token(response: Response) -> dict[str, bool]:
        response.set_cookie("session", "s", secure=True)
        response.set_cookie("bastion_csrf", "mine", secure=True)
        return {"ok": True}

    @app.api_route("/items", methods=["GET", "POST", "PUT", "PATCH", "DELETE"])
    async def items() -> dict[str, bool]:
        calls.append("items")
        return {"ok": True}

    # No identity here: the wired layer learns the app's cookie from the settings.
    http.setdefault("csrf", {}).setdefault("protected_cookies", ["session"])
    install_http(app, http)
    return app, calls


def rejections(reason: str) -> float:
    """CSRF rejections counted with ``reason`` so far."""
    value = REGISTRY.get_sample_value("bastion_http_csrf_rejections_total", {"reason": reason})
    return value or 0.0


def cookies(token: str | None = "t0ken", session: str = "s1") -> str:  # noqa: S107 -- a test token
    """A Cookie header with the session and (unless None) the token cookie."""
    parts = [f"session={session}"]
    if token is not None:
        parts.append(f"bastion_csrf={token}")
    return "; ".join(parts)


async def post(app: FastAPI, headers: dict[str, str], path: str = "/items", method: str = "POST"):
    """One request against the started app, sent to BASE."""
    async with lifespan_client(app, base_url=BASE) as client:
        return await client.request(method, path, headers=headers)


def assert_refused(response: httpx.Response) -> None:
    """A 403 FORBIDDEN problem saying the CSRF check failed, without field errors."""
    assert 403 == response.status_code, response.text
    assert PROBLEM == response.headers["content-type"]
    body = response.json()
    assert "FORBIDDEN" == body["code"]
    assert "CSRF check failed" == body["detail"]
    assert "errors" not in body


class TestRefused:
    async def test_without_token(self):
        """A cookie-authenticated POST without the header is refused and counted."""
        app, calls = make_app()
        before = rejections("token_missing")
        response = await post(app, {"Cookie": cookies(), "Origin": BASE})
        assert_refused(response)
        assert [] == calls
        assert before + 1 == rejections("token_missing")

    async def test_without_token_cookie(self):
        """A header without the token cookie proves nothing."""
        app, _ = make_app()
        response = await post(
            app, {"Cookie": cookies(token=None), "Origin": BASE, "X-CSRF-Token": "t0ken"}
        )
        assert_refused(response)

    async def test_wrong_token(self):
        """A header that differs from the cookie is refused."""
        app, calls = make_app()
        before = rejections("token_mismatch")
        response = await post(
            app, {"Cookie": cookies(), "Origin": BASE, "X-CSRF-Token": "t0ken-other"}
        )
        assert_refused(response)
        assert [] == calls
        assert before + 1 == rejections("token_mismatch")

    @pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE"])
    async def test_every_unsafe_method(self, method):
        """PUT, PATCH and DELETE are checked like POST."""
        app, _ = make_app()
        response = await post(app, {"Cookie": cookies(), "Origin": BASE}, method=method)
        assert_refused(response)

    async def test_cross_site_origin_even_with_token(self):
        """A page of another site is refused even when it somehow knows the token."""
        app, calls = make_app()
        before = rejections("origin_mismatch")
        response = await post(app, {"Cookie": cookies(), "Origin": EVIL, "X-CSRF-Token": "t0ken"})
        assert_refused(response)
        assert [] == calls
        assert before + 1 == rejections("origin_mismatch")

    async def test_sibling_subdomain_is_another_origin(self):
        """A sibling subdomain (same site, another origin) is refused unless listed."""
        app, _ = make_app()
        response = await post(app, {"Cookie": cookies(), "Origin": APP, "X-CSRF-Token": "t0ken"})
        assert_refused(response)

    async def test_null_origin(self):
        """Origin null (sandboxed frame, privacy redirect) is refused."""
        app, _ = make_app()
        response = await post(app, {"Cookie": cookies(), "Origin": "null", "X-CSRF-Token": "t0ken"})
        assert_refused(response)

    async def test_no_origin_and_no_referer(self):
        """Neither Origin nor Referer: refused (browsers send Origin on unsafe requests)."""
        app, _ = make_app()
        before = rejections("origin_missing")
        response = await post(app, {"Cookie": cookies(), "X-CSRF-Token": "t0ken"})
        assert_refused(response)
        assert before + 1 == rejections("origin_missing")

    async def test_cross_site_referer(self):
        """Without Origin, a Referer from another site is refused."""
        app, _ = make_app()
        response = await post(
            app, {"Cookie": cookies(), "Referer": f"{EVIL}/x", "X-CSRF-Token": "t0ken"}
        )
        assert_refused(response)

    async def test_refusal_keeps_security_and_cors_headers(self):
        """The 403 carries the security headers and, for a listed origin, CORS headers."""
        app, _ = make_app(cors={"allow_origins": [APP], "allow_credentials": True})
        response = await post(app, {"Cookie": cookies(), "Origin": APP})
        assert_refused(response)
        assert "nosniff" == response.headers["x-content-type-options"]
        assert APP == response.headers["access-control-allow-origin"]
        assert "no-store" == response.headers["cache-control"]


def requests_seen(method: str, route: str, status: str) -> float:
    """Requests the request middleware counted for this method, route template and status."""
    value = REGISTRY.get_sample_value(
        "http_server_request_duration_seconds_count",
        {"http_request_method": method, "http_route": route, "http_response_status_code": status},
    )
    return value or 0.0


class TestRefusalLabels:
    async def test_refusal_is_labelled_with_the_route_template(self):
        """The 403 is counted under the template of the route it was for, not the raw path."""
        app, _ = make_app()

        @app.post("/things/{thing_id}")
        async def thing(thing_id: int) -> dict[str, int]:
            return {"id": thing_id}

        before = requests_seen("POST", "/things/{thing_id}", "403")
        response = await post(app, {"Cookie": cookies(), "Origin": BASE}, path="/things/7")
        assert_refused(response)
        assert before + 1 == requests_seen("POST", "/things/{thing_id}", "403")


class TestAllowed:
    async def test_same_origin_with_token(self):
        """Same origin and the header equal to the cookie: the route runs."""
        app, calls = make_app()
        response = await post(app, {"Cookie": cookies(), "Origin": BASE, "X-CSRF-Token": "t0ken"})
        assert 200 == response.status_code, response.text
        assert ["items"] == calls

    async def test_same_origin_referer_with_token(self):
        """Without Origin, a same-origin Referer will do."""
        app, _ = make_app()
        response = await post(
            app, {"Cookie": cookies(), "Referer": f"{BASE}/page", "X-CSRF-Token": "t0ken"}
        )
        assert 200 == response.status_code, response.text

    async def test_listed_cors_origin_with_token(self):
        """A page on a listed CORS origin passes the origin check."""
        app, _ = make_app(cors={"allow_origins": [APP], "allow_credentials": True})
        response = await post(app, {"Cookie": cookies(), "Origin": APP, "X-CSRF-Token": "t0ken"})
        assert 200 == response.status_code, response.text

    async def test_wildcard_is_no_trusted_origin(self):
        """allow_origins * does not let every site pass the CSRF origin check."""
        app, _ = make_app(cors={"allow_origins": ["*"]})
        response = await post(app, {"Cookie": cookies(), "Origin": EVIL, "X-CSRF-Token": "t0ken"})
        assert_refused(response)

    async def test_tls_terminated_before_the_app(self):
        """An https page of this host passes when TLS ended at a proxy (request seen as http)."""
        app, _ = make_app()
        async with lifespan_client(app, base_url="http://api.example.com") as client:
            response = await client.post(
                "/items",
                headers={"Cookie": cookies(), "Origin": BASE, "X-CSRF-Token": "t0ken"},
            )
        assert 200 == response.status_code, response.text

    async def test_bearer_requests_are_not_checked(self):
        """A request with Authorization is not cookie-authenticated: no token needed."""
        app, calls = make_app()
        response = await post(app, {"Cookie": cookies(), "Authorization": "Bearer x"})
        assert 200 == response.status_code
        assert ["items"] == calls

    async def test_safe_methods_are_not_checked(self):
        """GET with the cookie and no token passes."""
        app, _ = make_app()
        response = await post(app, {"Cookie": cookies(token=None)}, method="GET")
        assert 200 == response.status_code

    async def test_other_cookies_are_not_checked(self):
        """A POST with cookies that authenticate nothing passes."""
        app, _ = make_app()
        response = await post(app, {"Cookie": "theme=dark; xsession=1"})
        assert 200 == response.status_code

    async def test_csrf_off(self):
        """csrf.enabled off: cookie-authenticated POSTs are not checked."""
        app, _ = make_app(csrf={"enabled": False})
        response = await post(app, {"Cookie": cookies()})
        assert 200 == response.status_code

    async def test_configured_cookies_override(self, sqlite_url):
        """csrf.protected_cookies replaces the cookies given by the wiring (identity's
        refresh cookie)."""
        app, _ = identity_app(sqlite_url)
        assert_refused(await post(app, {"Cookie": "bastion_refresh=r", "Origin": BASE}))
        app, _ = identity_app(sqlite_url, csrf={"protected_cookies": ["sid"]})
        assert 200 == (await post(app, {"Cookie": "bastion_refresh=r", "Origin": BASE})).status_code
        assert_refused(await post(app, {"Cookie": "sid=1", "Origin": BASE}))

    async def test_custom_names(self):
        """csrf.cookie and csrf.header name the token's cookie and header."""
        app, _ = make_app(csrf={"cookie": "xsrf", "header": "X-XSRF"})
        response = await post(
            app, {"Cookie": "session=s; xsrf=abc", "Origin": BASE, "X-XSRF": "abc"}
        )
        assert 200 == response.status_code


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """Set-Cookie lines of a response, by cookie name."""
    return {line.split("=", 1)[0]: line for line in response.headers.get_list("set-cookie")}


class TestTokenCookie:
    async def test_issued_beside_the_protected_cookie(self):
        """Setting the session sets a readable, Secure, Strict token cookie of the same lifetime."""
        app, _ = make_app()
        async with lifespan_client(app, base_url=BASE) as client:
            response = await client.post("/login")
        lines = set_cookies(response)
        token_line = lines["bastion_csrf"]
        attributes = [part.strip().lower() for part in token_line.split(";")]
        assert "httponly" not in attributes
        assert {"secure", "samesite=strict", "path=/", "max-age=3600"} <= set(attributes)
        token = token_line.split(";")[0].split("=", 1)[1]
        assert re.fullmatch(r"[A-Za-z0-9_-]{43}", token)
        assert token == response.headers["x-csrf-token"]

    async def test_fresh_token_at_each_login(self):
        """Each login without a proven token gets a new one."""
        app, _ = make_app()
        async with lifespan_client(app, base_url=BASE) as client:
            first = set_cookies(await client.post("/login"))["bastion_csrf"]
            client.cookies.clear()
            second = set_cookies(await client.post("/login"))["bastion_csrf"]
        assert first != second

    async def test_proven_token_is_kept(self):
        """A checked request that renews the session keeps its token: pages in flight work."""
        app, _ = make_app()
        async with lifespan_client(app, base_url=BASE) as client:
            await client.post("/login")
            token = client.cookies["bastion_csrf"]
            renewed = await client.post("/login", headers={"Origin": BASE, "X-CSRF-Token": token})
        assert 200 == renewed.status_code, renewed.text
        assert token == renewed.headers["x-csrf-token"]

    async def test_cleared_with_the_protected_cookie(self):
        """Deleting the session deletes the token cookie."""
        app, _ = make_app()
        async with lifespan_client(app, base_url=BASE) as client:
            await client.post("/login")
            token = client.cookies["bastion_csrf"]
            response = await client.post("/logout", headers={"Origin": BASE, "X-CSRF-Token": token})
            assert 200 == response.status_code, response.text
            assert "max-age=0" in set_cookies(response)["bastion_csrf"].lower()
            assert "bastion_csrf" not in client.cookies
            assert "session" not in client.cookies

    async def test_app_managed_token_is_left_alone(self):
        """A response that sets the token cookie itself gets no second one."""
        app, _ = make_app()
        async with lifespan_client(app, base_url=BASE) as client:
            response = await client.post("/own-token")
        assert ["bastion_csrf=mine; Path=/; SameSite=lax; Secure"] == [
            line for line in response.headers.get_list("set-cookie") if "bastion_csrf" in line
        ]

    async def test_listed_origin_learns_the_token(self):
        """A credentialed request from a listed origin is told the token it cannot read."""
        app, _ = make_app(cors={"allow_origins": [APP], "allow_credentials": True})
        async with lifespan_client(app, base_url=BASE) as client:
            response = await client.get("/items", headers={"Origin": APP, "Cookie": cookies()})
            unlisted = await client.get("/items", headers={"Origin": EVIL, "Cookie": cookies()})
        assert "t0ken" == response.headers["x-csrf-token"]
        assert "X-CSRF-Token" in response.headers["access-control-expose-headers"]
        assert "x-csrf-token" not in unlisted.headers

    async def test_session_cookie_gives_a_session_token(self):
        """A protected cookie without a lifetime gets a token cookie without one; Expires is
        mirrored."""
        app, _ = make_app()

        @app.post("/session-only")
        async def session_only(response: Response) -> dict[str, bool]:
            response.set_cookie("session", "s", secure=True)
            return {"ok": True}

        @app.post("/expiring")
        async def expiring(response: Response) -> dict[str, bool]:
            response.set_cookie(
                "session", "s", secure=True, expires="Wed, 01 Jan 2031 00:00:00 GMT"
            )
            return {"ok": True}

        async with lifespan_client(app, base_url=BASE) as client:
            plain = set_cookies(await client.post("/session-only"))["bastion_csrf"].lower()
            client.cookies.clear()
            dated = set_cookies(await client.post("/expiring"))["bastion_csrf"].lower()
        assert "max-age" not in plain
        assert "expires" not in plain
        assert "expires=wed, 01 jan 2031 00:00:00 gmt" in dated

    def test_parse_cookies(self):
        """The first cookie of a name wins, quotes are removed, junk is skipped."""
        parsed = parse_cookies(b'a=1; b="two"; junk; a=3; =x')
        assert {"a": "1", "b": "two"} == parsed


# -- End to end with identity's refresh cookie ----------------------------------------

PASSWORD = "correct horse battery staple"
IDENTITY = {
    "passwords": {"pepper": secrets.token_urlsafe(48), "time_cost": 1, "memory_cost": 8},
    "api_keys": {"secret": secrets.token_urlsafe(48)},
    "tokens": {"signing_keys": generate_jwks()},
}
_LINK_TOKEN = re.compile(r"token=([A-Za-z0-9_-]{43})")


def identity_app(database_url: str, **http: Any) -> tuple[FastAPI, Any]:
    """An app with identity on ``database_url``; bastion wires the security layer, which
    protects identity's refresh cookie."""
    app = FastAPI()

    @app.post("/items")
    async def items() -> dict[str, bool]:
        return {"ok": True}

    config = load_settings(
        http=http,
        database={"url": database_url},
        migrations={"mode": "auto"},
        identity=IDENTITY,
        audit={"enabled": False},
        flags={"enabled": False},
        ratelimit={"default": "10000/second", "login": {"ip_limit": "1000 per 15 minutes"}},
        logging={"level": "WARNING", "format": "json"},
    )
    runtime = bastion.install(app, settings=config)
    return app, runtime


class TestRefreshCookieFlow:
    async def test_login_refresh_logout_with_the_header(self, database_url):
        """Cookie delivery end to end: login sets the token, refresh needs it, logout clears."""
        app, runtime = identity_app(database_url)
        email = f"csrf-{secrets.token_hex(5)}@example.com"
        async with lifespan_client(app, base_url=BASE) as client:
            signup = await client.post(
                "/v1/auth/signup", json={"email": email, "password": PASSWORD}
            )
            assert 202 == signup.status_code, signup.text
            mail = runtime.identity.mail.last(purpose="verification", to=email)
            link = _LINK_TOKEN.search(mail.text)
            assert link is not None
            verified = await client.post("/v1/auth/verify-email", json={"token": link.group(1)})
            assert 200 == verified.status_code, verified.text

            login = await client.post(
                "/v1/auth/login",
                json={"email": email, "password": PASSWORD, "refresh_token_delivery": "cookie"},
                headers={"Origin": BASE},
            )
            assert 200 == login.status_code, login.text
            assert "no-store" == login.headers["cache-control"]
            token = client.cookies["bastion_csrf"]
            assert token == login.headers["x-csrf-token"]
            refresh_cookie = client.cookies["bastion_refresh"]

            refused = await client.post("/v1/auth/refresh", headers={"Origin": BASE})
            assert_refused(refused)
            assert refresh_cookie == client.cookies["bastion_refresh"]
            forged = await client.post(
                "/v1/auth/refresh", headers={"Origin": EVIL, "X-CSRF-Token": token}
            )
            assert_refused(forged)

            refreshed = await client.post(
                "/v1/auth/refresh", headers={"Origin": BASE, "X-CSRF-Token": token}
            )
            assert 200 == refreshed.status_code, refreshed.text
            assert "access_token" in refreshed.json()
            assert refresh_cookie != client.cookies["bastion_refresh"]
            assert token == client.cookies["bastion_csrf"]

            logged_out = await client.post(
                "/v1/auth/logout", headers={"Origin": BASE, "X-CSRF-Token": token}
            )
            assert 204 == logged_out.status_code, logged_out.text
            assert "bastion_refresh" not in client.cookies
            assert "bastion_csrf" not in client.cookies

    async def test_bearer_logout_needs_no_token(self, sqlite_url):
        """A logout with the access token in Authorization is not a cookie request."""
        app, _ = identity_app(sqlite_url)
        async with lifespan_client(app, base_url=BASE) as client:
            response = await client.post(
                "/v1/auth/logout",
                headers={"Authorization": "Bearer not-a-token", "Cookie": "bastion_refresh=x"},
            )
        assert 204 == response.status_code, response.text


class TestRawScopes:
    def run(self, scope_headers, *, server=("api.example.com", 443)):
        """Drive the bare middleware with one POST; return (status, whether the app ran)."""
        ran: list[bool] = []

        async def app(scope, receive, send):
            ran.append(True)
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b""})

        config = load_settings(logging={"level": "WARNING", "format": "json"})
        middleware = SecurityMiddleware(app, settings=config.http, protected_cookies=["session"])
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/x",
            "scheme": "https",
            "server": server,
            "headers": scope_headers,
        }
        asyncio.run(middleware(scope, receive, send))
        return sent[0]["status"], bool(ran)

    def test_cookies_split_over_fields(self):
        """HTTP/2 may send the cookies in several fields: the token is found in any of them."""
        status, ran = self.run(
            [
                (b"host", b"api.example.com"),
                (b"origin", b"https://api.example.com"),
                (b"cookie", b"session=s"),
                (b"cookie", b"bastion_csrf=tok"),
                (b"x-csrf-token", b"tok"),
            ]
        )
        assert (200, True) == (status, ran)

    def test_without_host_the_server_address_is_the_origin(self):
        """Without a Host header the request's origin is the server's address."""
        headers = [
            (b"origin", b"https://api.example.com"),
            (b"cookie", b"session=s; bastion_csrf=tok"),
            (b"x-csrf-token", b"tok"),
        ]
        assert (200, True) == self.run(headers)
        assert (403, False) == self.run(headers, server=None)
