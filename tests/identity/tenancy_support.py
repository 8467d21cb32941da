"""An app with identity on a real database, and shortcuts to make its users and tenants."""

from __future__ import annotations

import dataclasses
import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx

import bastion
from bastion.identity._directory import (
    TenantRecord,
    UserRecord,
    add_membership,
    create_tenant,
    create_user,
)

LOW_COST = {"passwords": {"time_cost": 1, "memory_cost": 8}}


class Service:
    """The app under test, its HTTP client and its identity component."""

    def __init__(self, app: Any, client: httpx.AsyncClient) -> None:
        self.app = app
        self.client = client
        self.identity = app.state.bastion.identity

    async def user(self, email: str | None = None) -> UserRecord:
        async with self.identity.database.session() as session:
            return await create_user(
                session, email or f"u-{secrets.token_hex(4)}@example.org", verified=True
            )

    async def tenant(
        self, owner: UserRecord | None = None, *, settings: dict | None = None
    ) -> TenantRecord:
        slug = f"t-{secrets.token_hex(4)}"
        async with self.identity.database.session() as session:
            record = await create_tenant(session, slug.upper(), slug, settings=settings)
            if owner is not None:
                await add_membership(session, record.id, owner.id, "owner")
        return record

    async def join(self, tenant: TenantRecord, user: UserRecord, role: str) -> None:
        async with self.identity.database.session() as session:
            await add_membership(session, tenant.id, user.id, role)

    def headers(self, user: UserRecord, tenant: TenantRecord | uuid.UUID | None) -> dict[str, str]:
        tid = "" if tenant is None else str(getattr(tenant, "id", tenant))
        token = self.identity.tokens.issue(str(user.id), tid, []).token
        return {"Authorization": f"Bearer {token}"}

    async def key(self, user: UserRecord, tenant: TenantRecord, scopes: list[str]) -> dict:
        """Make an API key as ``user`` over HTTP; return its creation answer."""
        response = await self.client.post(
            "/v1/api-keys",
            json={"name": "k", "scopes": scopes},
            headers=self.headers(user, tenant),
        )
        assert response.status_code == 201, response.text
        return response.json()


def bearer(secret: str) -> dict[str, str]:
    """The Authorization header of an access token or an API key."""
    return {"Authorization": f"Bearer {secret}"}


def oidc_settings(issuer_url: str) -> dict[str, Any]:
    """An ``identity.oidc`` entry trusting ``issuer_url``: tenant from ``tenant``, roles mapped."""
    return {
        "oidc": {
            "external": {
                "issuer": issuer_url,
                "audience": "bastion",
                "tenant_claim": "tenant",
                "roles_claim": "roles",
            }
        }
    }


@asynccontextmanager
async def running(database_url: str, **overrides: Any) -> AsyncIterator[Service]:
    """Start an app with identity on ``database_url`` (migrated), rate limits in memory."""
    settings: dict[str, Any] = {
        "database": {"url": database_url},
        "migrations": {"mode": "auto"},
        "identity": LOW_COST,
        "ratelimit": {"store_url": "memory://"},
    }
    for section, value in overrides.items():
        settings[section] = {**settings.get(section, {}), **value}
    app = bastion.create_app(**settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            yield Service(app, client)


def unprefixed_subjects(service: Service) -> None:
    """Make the configured issuers keep ``sub`` as sent, as a hand-built ``ClaimMapping`` does.

    Settings-built issuers prefix subjects with their name; an application's own
    ``OidcProvider`` has no prefix by default, so its subjects can be UUIDs.
    """
    for provider in service.identity.oidc.values():
        provider.mapping = dataclasses.replace(provider.mapping, subject_prefix="")
