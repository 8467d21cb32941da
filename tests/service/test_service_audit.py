"""Bastion Docs and the audit trail: writes, sensitive reads and security events are recorded."""

from __future__ import annotations

import hashlib
import json
import uuid

import httpx
import pytest
from sqlalchemy import event, select
from sqlalchemy.orm import Session

from bastion.audit._tables import entries
from bastion.testing import create_member, lifespan_client

CLIENT = ("203.0.113.77", 40000)


async def _recorded(app, **where) -> list:
    """The entries matching ``where`` (column = value), once the writer committed them."""
    await app.state.bastion.audit.log.flush()
    statement = select(entries)
    for column, value in where.items():
        statement = statement.where(entries.c[column] == value)
    async with app.state.bastion.database.session() as session:
        return list((await session.execute(statement.order_by(entries.c.seq))).all())


class TestWrites:
    """Every document write is one entry naming the document, its tenant and its author."""

    async def test_create_update_delete(self, app, client, workspace, create_document):
        """Create, change and delete record document.create, .update and .delete."""
        owner = workspace.owner
        created = await create_document(owner, "Quarterly plan")
        path = f"/v1/documents/{created['id']}"
        patched = await client.patch(
            path, json={"title": "Plan"}, headers=owner.headers | {"If-Match": '"v1"'}
        )
        deleted = await client.delete(path, headers=owner.headers | {"If-Match": '"v2"'})

        rows = await _recorded(app, resource_type="document", resource_id=created["id"])

        assert (200, 204) == (patched.status_code, deleted.status_code)
        assert ["document.create", "document.update", "document.delete"] == [
            row.action for row in rows
        ]
        assert {("user", str(owner.user_id), uuid.UUID(workspace.id), "success")} == {
            (row.actor_type, row.actor_id, row.tenant_id, row.outcome) for row in rows
        }
        assert {"fields": ["title"], "version": 2} == json.loads(rows[1].details)
        assert all("Quarterly" not in row.details for row in rows)

    async def test_sensitive_reads_only(self, app, client, workspace, create_document):
        """Reading a sensitive document records document.read; reading another records nothing."""
        owner = workspace.owner
        secret = await create_document(owner, "Salaries", sensitive=True)
        plain = await create_document(owner, "Menu")
        for document in (secret, plain):
            read = await client.get(f"/v1/documents/{document['id']}", headers=owner.headers)
            assert 200 == read.status_code

        reads = {
            document["id"]: await _recorded(app, action="document.read", resource_id=document["id"])
            for document in (secret, plain)
        }

        assert (True, 1, 0) == (
            secret["sensitive"],
            len(reads[secret["id"]]),
            len(reads[plain["id"]]),
        )


class TestSyncMode:
    """With audit.mode = "sync" the entry commits with the change, or neither does."""

    @pytest.fixture
    def app(self, database_url, service):
        """Bastion Docs with the audit trail in sync mode."""
        return service(database_url, audit={"mode": "sync"})

    async def test_failed_write_leaves_no_entry(self, app, client, workspace, create_document):
        """A change whose transaction fails at commit leaves neither the change nor its entry."""
        owner = workspace.owner
        created = await create_document(owner, "Draft")

        def refuse(session: Session) -> None:
            raise RuntimeError("commit refused by the test")

        event.listen(Session, "before_commit", refuse)
        try:
            failed = await client.patch(
                f"/v1/documents/{created['id']}",
                json={"title": "Final"},
                headers=owner.headers | {"If-Match": '"v1"'},
            )
        finally:
            event.remove(Session, "before_commit", refuse)
        document = await client.get(f"/v1/documents/{created['id']}", headers=owner.headers)
        rows = await _recorded(app, resource_id=created["id"])

        assert 500 == failed.status_code
        assert ("Draft", 1) == (document.json()["title"], document.json()["version"])
        assert ["document.create"] == [row.action for row in rows]


class TestSecurityEvents:
    """Identity's security events reach the audit trail, personal fields encrypted."""

    async def test_login_failure_with_encrypted_address(self, app, client):
        """A failed login is auth.login.failure under login:<pseudonym>; the IP is encrypted."""
        email = f"nobody-{uuid.uuid4().hex[:10]}@example.test"
        transport = httpx.ASGITransport(app=app, client=CLIENT)
        async with httpx.AsyncClient(transport=transport, base_url="http://testserver") as outside:
            answer = await outside.post(
                "/v1/auth/login",
                json={"email": email, "password": "not-the-password"},
                headers={"User-Agent": "audit-test/1"},
            )
        subject = f"login:{app.state.bastion.audit.pseudonyms.of_identifier(email)}"

        rows = await _recorded(app, action="auth.login.failure", subject=subject)
        opened = await app.state.bastion.audit.subject_keys.open_many(
            [(subject, "ip", rows[0].ip), (subject, "user_agent", rows[0].user_agent)]
        )

        assert (401, 1) == (answer.status_code, len(rows))
        assert ("anonymous", "failure") == (rows[0].actor_type, rows[0].outcome)
        assert CLIENT[0].encode() not in rows[0].ip
        assert [CLIENT[0], "audit-test/1"] == opened
        assert email not in repr(tuple(rows[0]))
        assert hashlib.sha256(email.encode()).hexdigest() not in repr(tuple(rows[0]))


class TestAuditOff:
    """The service runs without the audit trail too."""

    async def test_writes_work_without_audit(self, sqlite_url, service):
        """With audit.enabled off, documents are written and nothing is recorded."""
        app = service(sqlite_url, audit={"enabled": False})
        async with lifespan_client(app) as client:
            owner = await create_member(
                app, tenant_slug=f"t-{uuid.uuid4().hex[:10]}", email="o@example.test", role="owner"
            )
            created = await client.post(
                "/v1/documents", json={"title": "Off"}, headers=owner.headers
            )

        assert app.state.bastion.audit is None
        assert 201 == created.status_code
