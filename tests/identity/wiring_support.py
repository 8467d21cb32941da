"""Apps with identity installed, for the middleware and wiring tests."""

from __future__ import annotations

import secrets
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import Depends, FastAPI

import bastion
from bastion import Bastion
from bastion.context import current_context
from bastion.identity import (
    Authenticated,
    CreatedApiKey,
    Identity,
    add_membership,
    create_tenant,
    create_user,
    generate_jwks,
    require,
)
from bastion.identity._tables import api_keys
from bastion.tenancy import TenantId

API_KEY_SECRET = secrets.token_urlsafe(48)
"""One server secret for every instance of a test (as a deployment shares it)."""


def identity_overrides(
    database_url: str,
    tmp_path: Path,
    *,
    jwks: str | None = None,
    redis: tuple[str, str] | None = None,
    **sections: Any,
) -> dict[str, Any]:
    """Settings overrides of an app with identity on ``database_url``.

    Args:
        database_url: the shared database.
        tmp_path: where development secrets go.
        jwks: the signing keys (share them between instances); a new key when omitted.
        redis: ``(url, key prefix)`` of the shared Redis; memory without.
        sections: more sections, merged over these.
    """
    identity: dict[str, Any] = {
        # Cheap hashes: the cost is not what these tests are about.
        "passwords": {"time_cost": 1, "memory_cost": 8},
        "tokens": {"signing_keys": jwks or generate_jwks("EdDSA")},
        "api_keys": {"secret": API_KEY_SECRET},
    }
    identity.update(sections.pop("identity", {}))
    overrides: dict[str, Any] = {
        "database": {"url": database_url},
        "migrations": {"mode": "auto"},
        "identity": identity,
        "secrets": {"development_directory": str(tmp_path / "dev-secrets")},
        "logging": {"enabled": False},
        "ratelimit": {"store_url": "memory://"},
    }
    if redis is not None:
        overrides["redis"] = {"url": redis[0], "key_prefix": redis[1]}
        overrides["ratelimit"] = {}
    overrides.update(sections)
    return overrides


def identity_app(**overrides: Any) -> tuple[FastAPI, Bastion]:
    """A FastAPI app with bastion and a few routes that show who called."""
    app = FastAPI()
    runtime = bastion.install(app, **overrides)

    @app.get("/public")
    async def public() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/me")
    async def me(principal: Authenticated) -> dict[str, Any]:
        context = current_context()
        assert context is not None
        return {
            "subject": principal.subject,
            "kind": principal.kind,
            "tenant_id": principal.tenant_id,
            "roles": sorted(principal.roles),
            "scopes": None if principal.scopes is None else sorted(principal.scopes),
            "session_id": principal.session_id,
            "token_id": principal.token_id,
            "context": [context.user_id, context.tenant_id, context.api_key_id],
        }

    @app.get("/tenant")
    async def tenant(tenant_id: TenantId) -> dict[str, str]:
        return {"tenant_id": str(tenant_id)}

    @app.get("/read", dependencies=[Depends(require("tenant:read"))])
    async def read() -> dict[str, bool]:
        return {"ok": True}

    @app.get("/manage", dependencies=[Depends(require("members:manage"))])
    async def manage() -> dict[str, bool]:
        return {"ok": True}

    return app, runtime


@asynccontextmanager
async def running(
    app: FastAPI, *, client: tuple[str, int] = ("127.0.0.1", 50000)
) -> AsyncIterator[httpx.AsyncClient]:
    """Run ``app``'s lifespan around a client whose requests come from ``client``."""
    transport = httpx.ASGITransport(app=app, client=client)
    async with AsyncExitStack() as stack:
        await stack.enter_async_context(app.router.lifespan_context(app))
        yield await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://testserver")
        )


def identity_of(runtime: Bastion) -> Identity:
    assert runtime.identity is not None
    return runtime.identity


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@dataclass(frozen=True)
class Member:
    """A user who belongs to a tenant."""

    user_id: uuid.UUID
    tenant_id: uuid.UUID
    role: str


async def make_member(identity: Identity, role: str) -> Member:
    """Create a tenant and a user holding ``role`` in it, through the directory."""
    tag = secrets.token_hex(4)
    async with identity.database.session() as session:
        tenant = await create_tenant(session, f"Tenant {tag}", f"t-{tag}")
        user = await create_user(session, f"user-{tag}@example.org", verified=True)
        await add_membership(session, tenant.id, user.id, role)
    return Member(user.id, tenant.id, role)


async def make_tenant(identity: Identity) -> uuid.UUID:
    tag = secrets.token_hex(4)
    async with identity.database.session() as session:
        tenant = await create_tenant(session, f"Tenant {tag}", f"t-{tag}")
    return tenant.id


async def store_api_key(identity: Identity, created: CreatedApiKey) -> None:
    """Insert a key's record as the API-key routes would."""
    record = created.record
    async with identity.database.session() as session:
        await session.execute(
            api_keys.insert().values(
                id=uuid.UUID(record.id),
                tenant_id=uuid.UUID(record.tenant),
                name=record.name,
                scopes=list(record.scopes),
                prefix=record.prefix,
                public_id=record.public_id,
                hash=record.hash,
                created_at=record.created_at,
                expires_at=record.expires_at,
            )
        )
