"""Bastion Docs end to end: the app on SQLite and PostgreSQL, driven over HTTP.

Every app here starts through bastion's own start-up, so its tables come from
bastion's and the service's Alembic trees, never from ``metadata.create_all``.
The PostgreSQL database is shared by the whole session, so every test makes its
own tenants (random slugs) and users (random addresses) and only ever looks
inside them.

Members are made with :func:`bastion.testing.create_member` (rows written
directly, a token signed with the app's keys); the sign-up, login and
invitation flows themselves are driven over HTTP in ``test_service_accounts.py``.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from fastapi import FastAPI

from bastion.testing import TestMember, create_member, lifespan_client
from bastion_docs.app import create_app

FAST_PASSWORDS = {"time_cost": 1, "memory_cost": 8}
"""Argon2id at its cheapest: the suite hashes many passwords, and the cost is not its subject."""


@dataclass(frozen=True)
class Workspace:
    """A tenant made for one test, with its owner."""

    id: str
    slug: str
    owner: TestMember


def make_service(database_url: str, **overrides) -> FastAPI:
    """The app as tests run it: start-up migrations on, quiet logs, cheap password hashing."""
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    # The shipped default (20/second per client) would throttle the suite's bursts,
    # which all come from one address; the limiter's own tests set their limits.
    overrides.setdefault("ratelimit", {"default": "10000/second"})
    overrides.setdefault("identity", {"passwords": FAST_PASSWORDS})
    return create_app(database={"url": database_url}, migrations={"mode": "auto"}, **overrides)


@pytest.fixture(params=["sqlite", "postgres"])
def empty_database_url(request, tmp_path) -> Iterator[str]:
    """A database no migration has touched: a new SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"
        return
    request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
    # A plain fixture, not an async one: PostgreSQL is set up before the test's loop runs.
    with request.getfixturevalue("scratch_postgres")(secrets.token_hex(3)) as url:
        yield url


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
AddMember = Callable[[Workspace, str], Awaitable[TestMember]]


def unique_email(label: str) -> str:
    """An address no other test of the session uses (users are global)."""
    return f"{label}-{secrets.token_hex(5)}@example.test"


@pytest.fixture
def new_workspace(app: FastAPI, client: httpx.AsyncClient) -> NewWorkspace:
    """Create a tenant with a unique slug and return it with its owner."""

    async def create(name: str = "Acme") -> Workspace:
        slug = f"t-{secrets.token_hex(6)}"
        owner = await create_member(
            app, tenant_slug=slug, tenant_name=name, email=unique_email("owner"), role="owner"
        )
        return Workspace(str(owner.tenant_id), slug, owner)

    return create


@pytest.fixture
async def workspace(new_workspace: NewWorkspace) -> Workspace:
    """One tenant for the whole test (every hypothesis example shares it)."""
    return await new_workspace()


@pytest.fixture
def add_member(app: FastAPI, client: httpx.AsyncClient) -> AddMember:
    """Add a new user with the given role to a workspace."""

    async def add(workspace: Workspace, role: str) -> TestMember:
        return await create_member(
            app, tenant_slug=workspace.slug, email=unique_email(role), role=role
        )

    return add


@pytest.fixture
def create_document(client: httpx.AsyncClient):
    """POST a document as ``member`` and return its JSON (asserting 201)."""

    async def create(member: TestMember, title: str = "A title", **fields) -> dict:
        response = await client.post(
            "/v1/documents", json={"title": title, **fields}, headers=member.headers
        )
        assert 201 == response.status_code, response.text
        return response.json()

    return create
