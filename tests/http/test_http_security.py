"""Security headers added by SecurityMiddleware in an app with bastion installed."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.responses import HTMLResponse, JSONResponse
from http_support import install_http

from bastion.http._security import SecurityMiddleware
from bastion.settings import load_settings
from bastion.testing import lifespan_client

DEFAULT_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def make_app(**http: Any) -> FastAPI:
    """An app with JSON, HTML and self-governed routes; the security layer is bastion's own."""
    app = FastAPI(docs_url="/api/docs", swagger_ui_oauth2_redirect_url="/api/docs/oauth2-redirect")

    @app.get("/json")
    async def json_route() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/page", response_class=HTMLResponse)
    async def page() -> str:
        return "<p>hello</p>"

    @app.get("/own")
    async def own() -> HTMLResponse:
        return HTMLResponse(
            "<p>own</p>",
            headers={
                "X-Frame-Options": "SAMEORIGIN",
                "Content-Security-Policy": "default-src 'self'",
                "Cache-Control": "private, max-age=60",
                "Referrer-Policy": "same-origin",
                "Strict-Transport-Security": "max-age=60",
            },
        )

    @app.get("/cacheable")
    async def cacheable() -> JSONResponse:
        return JSONResponse({"ok": True}, headers={"Cache-Control": "private, no-cache"})

    # The app's own session cookie authenticates (no identity here): the wired layer
    # learns it from http.csrf.protected_cookies.
    http.setdefault("csrf", {}).setdefault("protected_cookies", ["session"])
    install_http(app, http)
    return app


async def get(app: FastAPI, path: str, *, base_url: str = "http://testserver", **kwargs: Any):
    """One GET against the started app."""
    async with lifespan_client(app, base_url=base_url) as client:
        return await client.get(path, **kwargs)


class TestDefaults:
    async def test_every_response_gets_the_basic_headers(self):
        """nosniff, X-Frame-Options DENY and Referrer-Policy no-referrer are on a JSON answer."""
        response = await get(make_app(), "/json")
        assert 200 == response.status_code
        assert "nosniff" == response.headers["x-content-type-options"]
        assert "DENY" == response.headers["x-frame-options"]
        assert "no-referrer" == response.headers["referrer-policy"]

    async def test_error_responses_get_them_too(self):
        """A 404 problem carries the same headers: errors are pages too."""
        response = await get(make_app(), "/missing")
        assert 404 == response.status_code
        assert "nosniff" == response.headers["x-content-type-options"]
        assert "DENY" == response.headers["x-frame-options"]

    async def test_no_csp_on_json(self):
        """A JSON answer has no Content-Security-Policy: it only matters to documents."""
        response = await get(make_app(), "/json")
        assert "content-security-policy" not in response.headers

    async def test_no_store_only_for_anonymous_requests_is_absent(self):
        """An anonymous request's answer gets no Cache-Control from the layer."""
        response = await get(make_app(), "/json")
        assert "cache-control" not in response.headers


class TestHsts:
    async def test_hsts_on_https(self):
        """A request that arrived over TLS gets Strict-Transport-Security."""
        response = await get(make_app(), "/json", base_url="https://testserver")
        assert (
            "max-age=31536000; includeSubDomains" == response.headers["strict-transport-security"]
        )

    async def test_no_hsts_on_plain_http(self):
        """Over plain HTTP no HSTS is sent: browsers ignore it and it would misstate the setup."""
        response = await get(make_app(), "/json")
        assert "strict-transport-security" not in response.headers

    async def test_preload_and_no_subdomains(self):
        """hsts_preload adds preload; hsts_include_subdomains off drops includeSubDomains."""
        app = make_app(security_headers={"hsts_preload": True, "hsts_include_subdomains": False})
        response = await get(app, "/json", base_url="https://testserver")
        assert "max-age=31536000; preload" == response.headers["strict-transport-security"]

    async def test_zero_max_age_sends_none(self):
        """hsts_max_age 0 turns HSTS off even over TLS."""
        app = make_app(security_headers={"hsts_max_age": 0})
        response = await get(app, "/json", base_url="https://testserver")
        assert "strict-transport-security" not in response.headers


class TestContentSecurityPolicy:
    async def test_html_gets_the_strict_policy(self):
        """An HTML answer gets content_security_policy."""
        response = await get(make_app(), "/page")
        assert DEFAULT_CSP == response.headers["content-security-policy"]

    async def test_docs_get_the_docs_policy(self):
        """Swagger UI at /api/docs gets docs_content_security_policy, which lets it load."""
        app = make_app()
        response = await get(app, "/api/docs")
        assert 200 == response.status_code
        expected = load_settings().http.security_headers.docs_content_security_policy
        assert expected == response.headers["content-security-policy"]
        assert "cdn.jsdelivr.net" in response.headers["content-security-policy"]

    async def test_pages_below_a_docs_path_get_the_docs_policy(self):
        """Swagger UI's OAuth2 redirect page, below /api/docs, gets the docs policy too."""
        response = await get(make_app(), "/api/docs/oauth2-redirect")
        assert 200 == response.status_code
        assert "script-src 'self' 'unsafe-inline'" in response.headers["content-security-policy"]

    async def test_configured_policy(self):
        """A configured policy replaces the default; None sends none."""
        custom = await get(make_app(security_headers={"content_security_policy": "x"}), "/page")
        assert "x" == custom.headers["content-security-policy"]
        none = await get(make_app(security_headers={"content_security_policy": None}), "/page")
        assert "content-security-policy" not in none.headers


class TestAppWins:
    async def test_app_set_headers_are_kept(self):
        """Headers the app set itself are neither replaced nor doubled."""
        response = await get(make_app(), "/own", base_url="https://testserver")
        assert ["SAMEORIGIN"] == response.headers.get_list("x-frame-options")
        assert ["default-src 'self'"] == response.headers.get_list("content-security-policy")
        assert ["same-origin"] == response.headers.get_list("referrer-policy")
        assert ["max-age=60"] == response.headers.get_list("strict-transport-security")
        assert "nosniff" == response.headers["x-content-type-options"]

    async def test_app_cache_control_is_kept_on_credentialed_requests(self):
        """A route that chose its Cache-Control keeps it even for a credentialed caller."""
        response = await get(make_app(), "/own", headers={"Authorization": "Bearer x"})
        assert ["private, max-age=60"] == response.headers.get_list("cache-control")


class TestCredentialedNoStore:
    @pytest.mark.parametrize(
        "headers",
        [
            {"Authorization": "Bearer abc"},
            {"X-API-Key": "bk_abc"},
            {"Cookie": "theme=dark; session=abc"},
        ],
        ids=["bearer", "api-key", "protected-cookie"],
    )
    async def test_credentialed_answers_are_not_stored(self, headers):
        """An answer to a request with a credential gets Cache-Control: no-store."""
        response = await get(make_app(), "/json", headers=headers)
        assert "no-store" == response.headers["cache-control"]

    async def test_other_cookies_are_not_credentials(self):
        """A cookie that authenticates nothing leaves caching to the app."""
        response = await get(make_app(), "/json", headers={"Cookie": "theme=dark"})
        assert "cache-control" not in response.headers

    async def test_revalidation_can_be_chosen(self):
        """A route that sets Cache-Control: private, no-cache keeps browser revalidation."""
        response = await get(make_app(), "/cacheable", headers={"Authorization": "Bearer x"})
        assert "private, no-cache" == response.headers["cache-control"]


class TestSwitches:
    async def test_each_header_can_be_left_out(self):
        """content_type_options off, frame_options None and referrer_policy None send none."""
        app = make_app(
            security_headers={
                "content_type_options": False,
                "frame_options": None,
                "referrer_policy": None,
            }
        )
        response = await get(app, "/json")
        for name in ("x-content-type-options", "x-frame-options", "referrer-policy"):
            assert name not in response.headers

    async def test_frame_options_sameorigin(self):
        """frame_options SAMEORIGIN is sent as configured."""
        response = await get(make_app(security_headers={"frame_options": "SAMEORIGIN"}), "/json")
        assert "SAMEORIGIN" == response.headers["x-frame-options"]

    async def test_security_headers_off(self):
        """security_headers.enabled off: no header at all, not even no-store."""
        app = make_app(security_headers={"enabled": False})
        response = await get(
            app, "/page", base_url="https://testserver", headers={"Authorization": "Bearer x"}
        )
        for name in (
            "x-content-type-options",
            "x-frame-options",
            "referrer-policy",
            "strict-transport-security",
            "content-security-policy",
            "cache-control",
        ):
            assert name not in response.headers

    async def test_http_conventions_off(self):
        """http.enabled off makes the whole layer a pass-through."""
        app = make_app(enabled=False, cors={"allow_origins": ["https://app.example.com"]})
        response = await get(app, "/page", headers={"Origin": "https://app.example.com"})
        assert "x-content-type-options" not in response.headers
        assert "access-control-allow-origin" not in response.headers


class TestOtherScopes:
    async def test_non_http_scopes_pass_through(self):
        """Lifespan and websocket scopes go to the app untouched."""
        seen: list[str] = []

        async def app(scope, receive, send):
            seen.append(scope["type"])

        middleware = SecurityMiddleware(app, settings=load_settings().http)
        await middleware({"type": "lifespan"}, None, None)
        await middleware({"type": "websocket", "headers": []}, None, None)
        assert ["lifespan", "websocket"] == seen
