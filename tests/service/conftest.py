"""Bastion Docs end to end: the app on SQLite and PostgreSQL, driven over HTTP.

Every app here starts through bastion's own start-up, so its tables come from
the service's Alembic tree, never from ``metadata.create_all``. The PostgreSQL
database is shared by the whole session, so every test makes its own tenants
(random slugs) and only ever looks inside them.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from bastion.testing import lifespan_client
from bastion_docs.app import create_app


@dataclass(frozen=True)
class Member:
    """A user of a test tenant and the headers that act as them."""

    id: str
    tenant_id: str
    role: str

    @property
    def headers(self) -> dict[str, str]:
        return {"X-Debug-User": self.id}


@dataclass(frozen=True)
class Workspace:
    """A tenant made for one test, with its owner."""

    tenant: dict
    owner: Member

    @property
    def id(self) -> str:
        return self.tenant["id"]


def make_service(database_url: str, **overrides) -> FastAPI:
    """The app as tests run it: start-up migrations on, quiet logs."""
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    # The shipped default (20/second per client) would throttle the suite's bursts,
    # which all come from one address; the limiter's own tests set their limits.
    overrides.setdefault("ratelimit", {"default": "10000/second"})
    return create_app(database={"url": database_url}, migrations={"mode": "auto"}, **overrides)


@pytest.fixture
def service() -> Callable[..., FastAPI]:
    """Build a Bastion Docs app for a database URL (not started)."""
    return make_service


@pytest.fixture
def app(database_url: str) -> FastAPI:
    """Bastion Docs on the parametrized database, not yet started."""
    return make_service(database_url)


@pytest.fixture
async def client(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """An in-process client of the started app."""
    async with lifespan_client(app) as c:
        yield c


NewWorkspace = Callable[..., Awaitable[Workspace]]
AddMember = Callable[[Workspace, str], Awaitable[Member]]


@pytest.fixture
def new_workspace(client: httpx.AsyncClient) -> NewWorkspace:
    """Create a tenant with a unique slug and return it with its owner."""

    async def create(name: str = "Acme") -> Workspace:
        slug = f"t-{secrets.token_hex(6)}"
        response = await client.post(
            "/v1/tenants",
            json={"name": name, "slug": slug, "owner_email": f"owner@{slug}.example"},
        )
        assert 201 == response.status_code, response.text
        body = response.json()
        owner = Member(body["owner"]["id"], body["tenant"]["id"], "owner")
        return Workspace(body["tenant"], owner)

    return create


@pytest.fixture
async def workspace(new_workspace: NewWorkspace) -> Workspace:
    """One tenant for the whole test (every hypothesis example shares it)."""
    return await new_workspace()


@pytest.fixture
def add_member(client: httpx.AsyncClient) -> AddMember:
    """Have a workspace's owner add a user with the given role."""

    async def add(workspace: Workspace, role: str) -> Member:
        response = await client.post(
            "/v1/users",
            json={"email": f"{role}-{secrets.token_hex(4)}@example.com", "role": role},
            headers=workspace.owner.headers,
        )
        assert 201 == response.status_code, response.text
        return Member(response.json()["id"], workspace.id, role)

    return add


@pytest.fixture
def create_document(client: httpx.AsyncClient):
    """POST a document as ``member`` and return its JSON (asserting 201)."""

    async def create(member: Member, title: str = "A title", **fields) -> dict:
        response = await client.post(
            "/v1/documents", json={"title": title, **fields}, headers=member.headers
        )
        assert 201 == response.status_code, response.text
        return response.json()

    return create
