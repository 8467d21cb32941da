"""Bastion Docs' feature flags: the seeded set, the assistant's kill switch, the editor rollout.

Each test starts the service on a database of its own (``empty_database_url``):
the seed file is imported only into a database that holds no flag, and the
session's shared PostgreSQL database gets flags from other tests.
"""

from __future__ import annotations

import secrets
import uuid

import pytest

from bastion.testing import FakeLLMProvider, create_member, lifespan_client, member_token
from bastion_docs.app import FLAGS_SEED

ASK = "/v1/assistant/ask"


@pytest.fixture
def llm():
    """A fake provider that answers every question."""
    with FakeLLMProvider(reply="An answer.") as provider:
        yield provider


@pytest.fixture
def app(service, empty_database_url, llm):
    """Bastion Docs on a fresh database, flag notifications in process only."""
    return service(
        empty_database_url,
        llm={"url": llm.url, "api": "openai", "model": "test-model"},
        flags={"store_url": "memory://"},
    )


async def member(app, role: str, slug: str | None = None):
    return await create_member(
        app,
        tenant_slug=slug or f"t-{secrets.token_hex(5)}",
        email=f"{role}-{secrets.token_hex(5)}@example.test",
        role=role,
    )


class TestSeed:
    async def test_the_seed_file_is_imported_on_first_start(self, app):
        """An empty database gets the service's flags; a second start leaves changes alone."""
        async with lifespan_client(app) as client:
            listed = (await client.get("/admin/features")).json()["flags"]
        assert {"assistant", "new-editor"} == {item["flag"]["key"] for item in listed}
        assert FLAGS_SEED.is_file()


class TestAssistantKillSwitch:
    async def test_switched_off_the_assistant_is_503_then_back(self, app):
        """Off, the endpoint answers 503 SERVICE_UNAVAILABLE at once; on again, it answers."""
        async with lifespan_client(app) as client:
            viewer = await member(app, "viewer")
            question = {"question": "When is the report due?"}
            before = await client.post(ASK, json=question, headers=viewer.headers)
            read = await client.get("/admin/features/assistant")
            off = await client.post(
                "/admin/features/assistant/toggle",
                json={"enabled": False},
                headers={"if-match": read.headers["etag"]},
            )
            assert 200 == off.status_code, off.text
            during = await client.post(ASK, json=question, headers=viewer.headers)
            unauthenticated = await client.post(ASK, json=question)
            await client.post(
                "/admin/features/assistant/toggle",
                json={"enabled": True},
                headers={"if-match": off.headers["etag"]},
            )
            after = await client.post(ASK, json=question, headers=viewer.headers)
        assert 200 == before.status_code, before.text
        assert (503, "SERVICE_UNAVAILABLE") == (during.status_code, during.json()["code"])
        assert 401 == unauthenticated.status_code
        assert 200 == after.status_code

    async def test_a_missing_switch_leaves_the_assistant_on(self, app):
        """Deleting the flag does not switch the assistant off: the switch only turns it off."""
        async with lifespan_client(app) as client:
            viewer = await member(app, "viewer")
            read = await client.get("/admin/features/assistant")
            deleted = await client.delete(
                "/admin/features/assistant", headers={"if-match": read.headers["etag"]}
            )
            assert 204 == deleted.status_code
            answer = await client.post(ASK, json={"question": "Anything?"}, headers=viewer.headers)
        assert 200 == answer.status_code

    async def test_openapi_lists_503(self, app):
        """The assistant operation documents SERVICE_UNAVAILABLE among its codes."""
        async with lifespan_client(app) as client:
            schema = (await client.get("/api/openapi.json")).json()
        responses = schema["paths"][ASK]["post"]["responses"]
        assert "SERVICE_UNAVAILABLE" in responses["503"]["x-error-codes"]


class TestEditorRollout:
    async def test_staff_get_the_editor_and_the_rollout_is_sticky(self, app):
        """Owners always get new-editor; a viewer gets the same answer on every request."""
        async with lifespan_client(app) as client:
            owner = await member(app, "owner")
            # Tokens of 64 viewers (no rows needed: the route asks for no permission).
            viewers = [
                {
                    "authorization": "Bearer "
                    + member_token(app, uuid.uuid4(), owner.tenant_id, "viewer")
                }
                for _ in range(64)
            ]
            as_owner = (await client.get("/api/features", headers=owner.headers)).json()
            first = [
                (await client.get("/api/features", headers=v)).json()["flags"]["new-editor"]
                for v in viewers
            ]
            second = [
                (await client.get("/api/features", headers=v)).json()["flags"]["new-editor"]
                for v in viewers
            ]
            anonymous = (await client.get("/api/features")).json()
        assert {"new-editor"} == set(as_owner["flags"])
        assert True is as_owner["flags"]["new-editor"]["enabled"]
        assert first == second
        assert False is anonymous["flags"]["new-editor"]["enabled"]
        # 25% of 64 random users: none or all would be a broken rollout (p < 1e-7).
        assert 0 < sum(answer["enabled"] for answer in first) < len(first)
