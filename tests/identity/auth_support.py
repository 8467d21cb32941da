"""Apps and helpers shared by the account-route tests (tests/identity/test_auth_*.py).

Imported by name (``from auth_support import ...``): pytest puts this directory
on the path, as tests/cluster does with ``nginx_support``.
"""

from __future__ import annotations

import re
import secrets
from typing import Any

import httpx
from fastapi import FastAPI

import bastion
from bastion._stack import Bastion
from bastion.identity import generate_jwks
from bastion.identity._runtime import Identity

PASSWORD = "correct horse battery staple"
NEW_PASSWORD = "a different long passphrase"
"""A password the default policy accepts."""

# Generated once per test session: two apps of one test must share them to trust
# each other's tokens and hashes, as the instances of one deployment do.
SECRETS: dict[str, Any] = {
    "passwords": {"pepper": secrets.token_urlsafe(48), "time_cost": 1, "memory_cost": 8},
    "api_keys": {"secret": secrets.token_urlsafe(48)},
    "tokens": {"signing_keys": generate_jwks()},
}

_LINK_TOKEN = re.compile(r"token=([A-Za-z0-9_-]{43})")


def make_app(
    database_url: str,
    *,
    identity: dict[str, Any] | None = None,
    login: dict[str, Any] | None = None,
    **overrides: Any,
) -> tuple[FastAPI, Bastion]:
    """An app with bastion installed on ``database_url``: cheap Argon2, migrations on start.

    Args:
        database_url: the database (its tables come from bastion's migrations).
        identity: more ``identity`` settings, merged over the shared secrets.
        login: ``ratelimit.login`` settings (the default throttles an IP after 5
            failures, before the lockout a test may want to see).
        **overrides: other settings sections (``redis``, ``ratelimit``...).
    """
    section = {key: dict(value) for key, value in SECRETS.items()}
    for key, value in (identity or {}).items():
        if isinstance(value, dict) and key in section:
            section[key].update(value)
        else:
            section[key] = value
    ratelimit = overrides.pop("ratelimit", {})
    ratelimit.setdefault("default", "10000/second")
    ratelimit.setdefault("login", login or {"ip_limit": "1000 per 15 minutes"})
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    app = FastAPI()
    runtime = bastion.install(
        app,
        database={"url": database_url},
        migrations={"mode": "auto"},
        identity=section,
        ratelimit=ratelimit,
        **overrides,
    )
    return app, runtime


def unique_email(label: str = "user") -> str:
    """An address no other test uses (the PostgreSQL database is shared by the session)."""
    return f"{label}-{secrets.token_hex(5)}@example.com"


def unique_slug() -> str:
    """A tenant slug no other test uses."""
    return f"t-{secrets.token_hex(5)}"


def link_token(text: str) -> str:
    """The single-use token in a mail's link."""
    found = _LINK_TOKEN.search(text)
    assert found is not None, "no link with a token in the message"
    return found.group(1)


def bearer(token: str) -> dict[str, str]:
    """The ``Authorization`` header of an access token."""
    return {"Authorization": f"Bearer {token}"}


async def signup_verified(
    client: httpx.AsyncClient,
    identity: Identity,
    *,
    email: str | None = None,
    tenant: dict[str, str] | None = None,
) -> str:
    """Sign up through the routes, follow the mailed link, and return the address."""
    email = email or unique_email()
    body: dict[str, Any] = {"email": email, "password": PASSWORD}
    if tenant is not None:
        body["tenant"] = tenant
    response = await client.post("/v1/auth/signup", json=body)
    assert 202 == response.status_code, response.text
    mail = identity.mail.last(purpose="verification", to=email)  # type: ignore[attr-defined]
    verified = await client.post("/v1/auth/verify-email", json={"token": link_token(mail.text)})
    assert 200 == verified.status_code, verified.text
    return email


async def login(
    client: httpx.AsyncClient, email: str, password: str = PASSWORD, **extra: Any
) -> httpx.Response:
    """POST /v1/auth/login."""
    return await client.post("/v1/auth/login", json={"email": email, "password": password, **extra})
