"""The assistant and the audit trail: every sensitive document it uses is a recorded read."""

from __future__ import annotations

import json
import uuid

import pytest
from sqlalchemy import select

from bastion.audit._tables import entries
from bastion.testing import FakeLLMProvider

ASK = "/v1/assistant/ask"
QUESTION = "When are the quarterly salaries reviewed?"


async def _reads(app, workspace) -> dict[str, list]:
    """The workspace's ``document.read`` entries by document id, once committed."""
    await app.state.bastion.audit.log.flush()
    statement = select(entries).where(
        entries.c.action == "document.read", entries.c.tenant_id == uuid.UUID(workspace.id)
    )
    async with app.state.bastion.database.session() as session:
        rows = (await session.execute(statement.order_by(entries.c.seq))).all()
    found: dict[str, list] = {}
    for row in rows:
        found.setdefault(row.resource_id, []).append(row)
    return found


@pytest.fixture
async def documents(workspace, create_document):
    """A sensitive and a plain document of the workspace, both matching QUESTION."""
    owner = workspace.owner
    secret = await create_document(
        owner, "Quarterly salaries", body="Salaries are reviewed in March.", sensitive=True
    )
    plain = await create_document(owner, "Quarterly menu", body="Salads on Fridays.")
    return secret, plain


class TestProviderAnswer:
    """With a provider, the sensitive matches sent to it are recorded as read."""

    @pytest.fixture
    def llm(self):
        """A fake provider that answers."""
        with FakeLLMProvider(reply="In March.") as provider:
            yield provider

    @pytest.fixture
    def app(self, service, database_url, llm):
        """Bastion Docs asking the fake provider."""
        return service(database_url, llm={"url": llm.url, "model": "test-model"})

    async def test_sensitive_match_sent_to_the_provider_is_a_read(
        self, app, client, workspace, documents, llm
    ):
        """The sensitive document sent to the provider is one document.read via the assistant."""
        secret, plain = documents

        response = await client.post(
            ASK, json={"question": QUESTION}, headers=workspace.owner.headers
        )
        reads = await _reads(app, workspace)

        assert 200 == response.status_code, response.text
        assert response.json()["degraded"] is False
        assert secret["id"] in json.dumps(llm.requests)
        (read,) = reads[secret["id"]]
        assert plain["id"] not in reads
        assert {"via": "assistant"} == json.loads(read.details)
        assert ("user", str(workspace.owner.user_id)) == (read.actor_type, read.actor_id)
        assert uuid.UUID(workspace.id) == read.tenant_id


class TestDegradedAnswer:
    """Without a provider, the sensitive matches quoted in the summary are recorded as read."""

    async def test_sensitive_match_quoted_is_a_read(self, app, client, workspace, documents):
        """The degraded answer quotes the sensitive document, and that read is recorded."""
        secret, plain = documents

        response = await client.post(
            ASK, json={"question": QUESTION}, headers=workspace.owner.headers
        )
        reads = await _reads(app, workspace)

        assert 200 == response.status_code, response.text
        assert response.json()["degraded"] is True
        assert "Salaries are reviewed in March." in response.json()["answer"]
        assert 1 == len(reads[secret["id"]])
        assert plain["id"] not in reads

    async def test_plain_matches_record_nothing(self, app, client, workspace, documents):
        """A question matching only documents not marked sensitive records no read."""
        response = await client.post(
            ASK, json={"question": "salads"}, headers=workspace.owner.headers
        )

        assert 200 == response.status_code
        assert {} == await _reads(app, workspace)


class TestSensitiveReadsOff:
    """``audit.sensitive_reads`` off: the assistant records no reads either."""

    @pytest.fixture
    def app(self, service, database_url):
        """Bastion Docs not recording sensitive reads."""
        return service(database_url, audit={"sensitive_reads": False})

    async def test_nothing_recorded(self, app, client, workspace, documents):
        """A sensitive match is used, and no document.read is recorded."""
        response = await client.post(
            ASK, json={"question": QUESTION}, headers=workspace.owner.headers
        )

        assert 200 == response.status_code
        assert {} == await _reads(app, workspace)
