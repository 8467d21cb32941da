"""POST /v1/documents with Idempotency-Key: a retried creation never makes a second document."""

from __future__ import annotations

import asyncio
import secrets

import pytest


async def listed_titles(client, member) -> list[str]:
    page = (await client.get("/v1/documents", headers=member.headers)).json()
    return [item["title"] for item in page["items"]]


def keyed(member, key: str) -> dict[str, str]:
    return member.headers | {"Idempotency-Key": key}


class TestIdempotentCreate:
    async def test_retry_with_the_same_key_replays_the_first_response(self, client, workspace):
        """The same key and body again: the first 201 (same id, Location, ETag), marked replayed."""
        key = secrets.token_hex(16)
        payload = {"title": "Invoice 42", "tags": ["billing"]}
        first = await client.post(
            "/v1/documents", json=payload, headers=keyed(workspace.owner, key)
        )
        again = await client.post(
            "/v1/documents", json=payload, headers=keyed(workspace.owner, key)
        )
        assert (201, 201) == (first.status_code, again.status_code)
        assert first.json() == again.json()
        assert (first.headers["location"], first.headers["etag"], "true") == (
            again.headers["location"],
            again.headers["etag"],
            again.headers["idempotent-replayed"],
        )
        assert ["Invoice 42"] == await listed_titles(client, workspace.owner)

    async def test_same_key_with_another_body_is_refused(self, client, workspace):
        """The key with a different payload is 422 IDEMPOTENCY_KEY_REUSED; nothing is created."""
        key = secrets.token_hex(16)
        await client.post("/v1/documents", json={"title": "A"}, headers=keyed(workspace.owner, key))
        reused = await client.post(
            "/v1/documents", json={"title": "B"}, headers=keyed(workspace.owner, key)
        )
        assert (422, "IDEMPOTENCY_KEY_REUSED") == (reused.status_code, reused.json()["code"])
        assert ["A"] == await listed_titles(client, workspace.owner)

    async def test_without_a_key_each_post_creates(self, client, workspace):
        """The key is optional: two POSTs without one are two documents."""
        for _ in range(2):
            response = await client.post(
                "/v1/documents", json={"title": "Twice"}, headers=workspace.owner.headers
            )
            assert 201 == response.status_code
        assert ["Twice", "Twice"] == await listed_titles(client, workspace.owner)

    async def test_keys_are_per_tenant(self, client, new_workspace):
        """Two tenants using the same key each get their own document."""
        a, b = await new_workspace(), await new_workspace()
        key = secrets.token_hex(16)
        first = await client.post("/v1/documents", json={"title": "A"}, headers=keyed(a.owner, key))
        second = await client.post(
            "/v1/documents", json={"title": "A"}, headers=keyed(b.owner, key)
        )
        assert (201, 201) == (first.status_code, second.status_code)
        assert first.json()["id"] != second.json()["id"]
        assert "idempotent-replayed" not in second.headers

    @pytest.mark.parametrize("attempts", [4])
    async def test_concurrent_retries_execute_once(self, client, workspace, attempts):
        """Retries racing the first request: one document; the others replay it or get 409."""
        key = secrets.token_hex(16)
        responses = await asyncio.gather(
            *(
                client.post(
                    "/v1/documents", json={"title": "Raced"}, headers=keyed(workspace.owner, key)
                )
                for _ in range(attempts)
            )
        )
        statuses = [response.status_code for response in responses]
        created = {response.json()["id"] for response in responses if response.status_code == 201}
        assert set(statuses) <= {201, 409}
        assert 1 == len(created)
        assert ["Raced"] == await listed_titles(client, workspace.owner)
        conflicts = [response for response in responses if response.status_code == 409]
        assert all(response.json()["code"] == "CONFLICT" for response in conflicts)

    async def test_key_is_documented(self, client):
        """The operation takes an optional Idempotency-Key and lists 409 and the reuse 422."""
        operation = (await client.get("/api/openapi.json")).json()["paths"]["/v1/documents"]["post"]
        [header] = [p for p in operation["parameters"] if p["name"] == "Idempotency-Key"]
        assert (False, True) == (
            header["required"],
            "IDEMPOTENCY_KEY_REUSED" in operation["responses"]["422"]["x-error-codes"],
        )
        assert "CONFLICT" in operation["responses"]["409"]["x-error-codes"]
