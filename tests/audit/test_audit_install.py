"""install() with the audit trail: its lifecycle, security events, admin actions and accessors."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import httpx
import pytest
import structlog
from fastapi import FastAPI
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import bastion
from bastion.audit import AuditEvent, Outcome, Resource
from bastion.audit._build import (
    SCHEMA_RECHECK_INTERVAL,
    AuditSchema,
    CurrentAuditLog,
    audit_log,
    audit_read,
    record_migration_run,
)
from bastion.audit._guards import install_guards
from bastion.audit._tables import audit_metadata, checkpoints, entries
from bastion.audit._writer import AuditUnavailable
from bastion.context import current_context
from bastion.errors import ConfigurationError
from bastion.identity import SecurityEventKind, emit_security_event
from bastion.identity._events import _listeners
from bastion.ratelimit._login import identifier_hash
from bastion.testing import create_member, lifespan_client

CLIENT = ("203.0.113.50", 40000)


def _app(database_url: str, tmp_path, **overrides) -> FastAPI:
    app = FastAPI()
    overrides.setdefault("logging", {"level": "WARNING"})
    bastion.install(
        app,
        database={"url": database_url},
        migrations={"mode": "auto"},
        secrets={"development_directory": str(tmp_path / "secrets")},
        **overrides,
    )
    return app


async def _entry(app, entry_id: uuid.UUID):
    audit = app.state.bastion.audit
    await audit.log.flush()
    async with app.state.bastion.database.session() as session:
        return (await session.execute(select(entries).where(entries.c.id == entry_id))).one()


async def _entries(app, **where):
    audit = app.state.bastion.audit
    await audit.log.flush()
    statement = select(entries)
    for column, value in where.items():
        statement = statement.where(entries.c[column] == value)
    async with app.state.bastion.database.session() as session:
        return (await session.execute(statement.order_by(entries.c.seq))).all()


class TestInstall:
    """What install() builds for the audit trail, and when it does not."""

    async def test_runtime_and_readiness(self, database_url, tmp_path):
        """The runtime is at app.state.bastion.audit and readiness checks its writer."""
        app = _app(database_url, tmp_path)
        async with lifespan_client(app) as client:
            ready = await client.get("/health/ready")

        checks = ready.json()["checks"]
        assert app.state.bastion.audit is not None
        assert (200, "ok") == (ready.status_code, checks["audit"]["status"])
        assert ("ok", False) == (
            checks["audit_checkpoints"]["status"],
            checks["audit_checkpoints"]["critical"],
        )

    def test_off_without_database(self, tmp_path):
        """With the database off there is no audit trail, and no error."""
        app = FastAPI()
        bastion.install(app, database={"enabled": False}, logging={"level": "WARNING"})

        assert app.state.bastion.audit is None

    def test_off_when_disabled(self, sqlite_url, tmp_path):
        """``audit.enabled = false`` builds nothing, and the accessor says why."""
        app = _app(sqlite_url, tmp_path, audit={"enabled": False})

        assert app.state.bastion.audit is None
        with pytest.raises(ConfigurationError, match=r"audit\.enabled"):
            audit_log(app)

    def test_production_needs_the_encryption_key(self, sqlite_url):
        """In production a missing BASTION_AUDIT__ENCRYPTION_KEY stops start-up, naming it."""
        with pytest.raises(ConfigurationError, match="BASTION_AUDIT__ENCRYPTION_KEY"):
            bastion.install(
                FastAPI(),
                environment="production",
                database={"url": sqlite_url},
                identity={"enabled": False},
            )

    async def test_startup_migrations_are_recorded(self, sqlite_url, tmp_path):
        """Revisions applied at start-up are one admin.migration.apply entry by the system."""
        app = _app(sqlite_url, tmp_path)
        async with lifespan_client(app):
            recorded = await _entries(app, action="admin.migration.apply")

        assert 1 == len(recorded)
        assert ("system", "migrations", "success") == (
            recorded[0].actor_type,
            recorded[0].actor_id,
            recorded[0].outcome,
        )
        assert '"tool":"start-up (auto)"' in recorded[0].details


class TestMigrateCommand:
    """What ``bastion migrate`` applies is recorded without a serving process."""

    @pytest.mark.parametrize("mode", ["async", "sync"])
    async def test_run_outside_a_server_is_recorded(self, sqlite_url, tmp_path, mode):
        """record_migration_run starts the writer, records the run and commits it."""
        app = _app(sqlite_url, tmp_path, audit={"mode": mode})
        runtime = app.state.bastion
        applied = await runtime.migrator.upgrade()
        await record_migration_run(runtime.audit, applied, tool="bastion migrate upgrade")
        async with runtime.database.session() as session:
            rows = (
                await session.execute(
                    select(entries).where(entries.c.action == "admin.migration.apply")
                )
            ).all()
        await runtime.database.aclose()

        assert 1 == len(rows)
        assert '"tool":"bastion migrate upgrade"' in rows[0].details


class TestLifecycle:
    """The listener and the checkpoint schedule live exactly as long as the app."""

    async def test_security_events_recorded_while_running(self, database_url, tmp_path):
        """A security event emitted while the app runs becomes an entry; shutdown detaches it."""
        app = _app(database_url, tmp_path)
        async with lifespan_client(app):
            event = await emit_security_event(
                SecurityEventKind.LOGIN_FAILED, subject="ab" * 32, ip="198.51.100.4"
            )
            row = await _entry(app, uuid.UUID(event.id))
        pseudonym = app.state.bastion.audit.pseudonyms.of_hash("ab" * 32)

        assert ("auth.login.failure", "failure", f"login:{pseudonym}") == (
            row.action,
            row.outcome,
            row.subject,
        )
        assert b"198.51.100.4" not in row.ip
        assert [] == [x for x in _listeners if type(x).__name__ == "SecurityEventRecorder"]

    async def test_shutdown_signs_what_was_written(self, database_url, tmp_path):
        """With a schedule, shutdown drains the writer and checkpoints the log that grew."""
        app = _app(database_url, tmp_path, audit={"checkpoint_interval": 3600})
        async with lifespan_client(app):
            recorded = await audit_log(app).record(AuditEvent(action="audit.export"))
        async with app.state.bastion.database.session() as session:
            row = (await session.execute(select(entries).where(entries.c.id == recorded))).one()
            signed = await session.scalar(
                select(checkpoints.c.tree_size)
                .where(checkpoints.c.log_id == row.log_id)
                .order_by(checkpoints.c.tree_size.desc())
                .limit(1)
            )
        await app.state.bastion.database.aclose()

        assert signed is not None
        assert row.seq < signed


class TestScheduleCheck:
    """Readiness reports a checkpoint schedule that died."""

    async def test_fails_once_the_schedule_ended(self, sqlite_url, tmp_path):
        """A schedule task that ended (by failing) fails the non-critical check."""
        runtime = _app(sqlite_url, tmp_path).state.bastion

        async def crash() -> None:
            raise RuntimeError("database gone")

        ended = asyncio.create_task(crash())
        with contextlib.suppress(RuntimeError):
            await ended
        runtime.audit._schedule = ended
        try:
            with pytest.raises(RuntimeError, match="schedule stopped"):
                await runtime.audit.schedule_check()
        finally:
            runtime.audit._schedule = None
            await runtime.database.aclose()


class TestAdminActions:
    """Operators' actions through /admin are recorded."""

    async def test_unlock_is_recorded_under_the_pseudonym(self, sqlite_url, tmp_path):
        """POST /admin/ratelimit/unlock records admin.lockout.unlock under the keyed pseudonym."""
        identifier = "ann@example.test"
        app = _app(sqlite_url, tmp_path)
        async with lifespan_client(app) as client:
            response = await client.post("/admin/ratelimit/unlock", json={"identifier": identifier})
            recorded = await _entries(app, action="admin.lockout.unlock")
        pseudonym = app.state.bastion.audit.pseudonyms.of_identifier(identifier)

        assert 200 == response.status_code
        assert [("success", "login", pseudonym, f"login:{pseudonym}")] == [
            (row.outcome, row.resource_type, row.resource_id, row.subject) for row in recorded
        ]
        assert identifier not in repr(tuple(recorded[0]))
        assert identifier_hash(identifier) not in repr(tuple(recorded[0]))

    async def test_unrecordable_unlock_unlocks_nothing(self, sqlite_url, tmp_path):
        """When the unlock cannot be recorded the answer is 503 and the lockout stays."""
        identifier = "locked@example.test"
        app = _app(sqlite_url, tmp_path, ratelimit={"login": {"lockout_threshold": 1}})
        login = app.state.bastion.ratelimit.login
        async with lifespan_client(app) as client:
            await login.record_failure(identifier, "198.51.100.7")
            await app.state.bastion.audit.log.stop()  # records now raise AuditUnavailable
            response = await client.post("/admin/ratelimit/unlock", json={"identifier": identifier})
            still_locked = await login.unlock(identifier)

        assert 503 == response.status_code
        assert still_locked

    async def test_failed_unlock_is_recorded_as_failed(self, sqlite_url, tmp_path):
        """An unlock whose store is unreachable answers 503 and its failure follows the attempt."""
        # Nothing listens on port 1: the throttle's store is really down.
        app = _app(sqlite_url, tmp_path, ratelimit={"store_url": "redis://127.0.0.1:1/0"})
        async with lifespan_client(app) as client:
            response = await client.post(
                "/admin/ratelimit/unlock", json={"identifier": "ann@example.test"}
            )
            recorded = await _entries(app, action="admin.lockout.unlock")

        assert 503 == response.status_code
        assert [("success", "{}"), ("failure", '{"error":"LimitsUnavailable"}')] == [
            (row.outcome, row.details) for row in recorded
        ]

    async def test_refused_body_is_not_recorded(self, sqlite_url, tmp_path):
        """A body the endpoint refuses (422) unlocks nothing and records nothing."""
        app = _app(sqlite_url, tmp_path)
        async with lifespan_client(app) as client:
            response = await client.post("/admin/ratelimit/unlock", json={"identifier": " "})
            recorded = await _entries(app, action="admin.lockout.unlock")

        assert (422, []) == (response.status_code, recorded)

    def test_identity_binds_on_audit_routes_only(self, sqlite_url, tmp_path):
        """The identity middleware skips the operators' routes but not /admin/audit."""
        app = _app(sqlite_url, tmp_path)
        middleware = next(m for m in app.user_middleware if m.cls.__name__ == "IdentityMiddleware")
        skipped = middleware.kwargs["skip_prefixes"]

        assert not any("/admin/audit".startswith(prefix) for prefix in skipped)
        assert any("/admin/migrations".startswith(prefix) for prefix in skipped)


class TestAccessors:
    """How an app reaches its audit trail."""

    async def test_dependency_and_request_context(self, database_url, tmp_path):
        """A route records through CurrentAuditLog; ip and user agent come from the request."""
        app = _app(database_url, tmp_path)
        audit_log(app).register_actions({"invoice.send": "An invoice was sent."})

        @app.post("/invoices")
        async def send(log: CurrentAuditLog) -> dict:
            context = current_context()
            recorded = await log.record(
                AuditEvent(action="invoice.send", resource=Resource("invoice", "7"))
            )
            return {"id": str(recorded), "user_agent": context.user_agent}

        transport = httpx.ASGITransport(app=app, client=CLIENT)
        async with (
            lifespan_client(app),
            httpx.AsyncClient(transport=transport, base_url="http://testserver") as client,
        ):
            response = await client.post("/invoices", headers={"User-Agent": "probe/1.0"})
            row = await _entry(app, uuid.UUID(response.json()["id"]))
            opened = await app.state.bastion.audit.subject_keys.open_many(
                [(row.subject, "ip", row.ip), (row.subject, "user_agent", row.user_agent)]
            )

        assert "probe/1.0" == response.json()["user_agent"]
        assert ("invoice", "7", Outcome.SUCCESS.value) == (
            row.resource_type,
            row.resource_id,
            row.outcome,
        )
        assert [CLIENT[0], "probe/1.0"] == opened
        assert b"probe/1.0" not in row.user_agent

    @pytest.mark.parametrize("tracing", [True, False], ids=["traced", "untraced"])
    async def test_user_agent_in_the_context(self, sqlite_url, tmp_path, tracing):
        """The request middleware puts User-Agent in the context, traced or not."""
        app = _app(sqlite_url, tmp_path, tracing={"enabled": tracing})

        async def agent(request: Request) -> JSONResponse:
            return JSONResponse({"user_agent": current_context().user_agent})

        app.router.routes.append(Route("/agent", agent))
        async with lifespan_client(app) as client:
            sent = await client.get("/agent", headers={"User-Agent": "Probe/2 (x)"})
            absent = await client.get("/agent", headers={"User-Agent": ""})

        assert ["Probe/2 (x)", ""] == [sent.json()["user_agent"], absent.json()["user_agent"]]

    async def test_sensitive_reads_follow_the_setting(self, sqlite_url, tmp_path):
        """audit_read records ``<type>.read`` when audit.sensitive_reads is on, nothing when off."""
        recorded = {}
        for enabled in (True, False):
            app = _app(sqlite_url, tmp_path, audit={"sensitive_reads": enabled})
            app.state.bastion.audit.log.register_actions({"payslip.read": "A payslip was read."})

            async def read(request: Request) -> JSONResponse:
                entry = await audit_read(request, Resource("payslip", "42"))
                return JSONResponse({"id": None if entry is None else str(entry)})

            app.router.routes.append(Route("/payslips/42", read))
            async with lifespan_client(app) as client:
                recorded[enabled] = (await client.get("/payslips/42")).json()["id"]
                if recorded[enabled] is not None:
                    row = await _entry(app, uuid.UUID(recorded[enabled]))

        assert recorded[False] is None
        assert ("payslip.read", "payslip", "42") == (
            row.action,
            row.resource_type,
            row.resource_id,
        )


class TestMissingTables:
    """Audit tables that were never migrated fail readiness once, clearly, not every tick."""

    async def test_readiness_names_the_fix_and_the_schedule_waits(self, tmp_path):
        """Readiness fails with the fix; no checkpoint run or final checkpoint fails in the logs."""
        app = FastAPI()
        bastion.install(
            app,
            database={"url": f"sqlite+aiosqlite:///{tmp_path / 'empty.db'}"},
            migrations={"mode": "off"},
            identity={"enabled": False},
            audit={"checkpoint_interval": 0.01},
            secrets={"development_directory": str(tmp_path / "secrets")},
            logging={"level": "WARNING"},
        )
        with structlog.testing.capture_logs() as logs:
            async with lifespan_client(app) as client:
                ready = await client.get("/health/ready")
                # Ten schedule intervals: each would have been a failed run before.
                await asyncio.sleep(0.1)

        check = ready.json()["checks"]["audit"]
        events = [line["event"] for line in logs]
        assert (503, "fail") == (ready.status_code, check["status"])
        assert "run `bastion migrate upgrade`" in check["error"]
        assert 1 == sum("audit tables missing" in event for event in events)
        assert not [event for event in events if "checkpoint" in event]


class TestAuditSchema:
    """What readiness knows of the tables and guards, looked at rarely."""

    async def test_tables_looked_at_again_only_when_out_of_date(self, database):
        """Missing tables fail until a look 5 s later finds them; a look is not made per call."""
        now = [0.0]
        schema = AuditSchema(database, clock=lambda: now[0])
        async with database.engine.begin() as connection:
            await connection.run_sync(audit_metadata.drop_all)

        with pytest.raises(AuditUnavailable, match="bastion migrate upgrade"):
            await schema.tables_check()
        async with database.engine.begin() as connection:
            await connection.run_sync(audit_metadata.create_all)
        with pytest.raises(AuditUnavailable):
            await schema.tables_check()  # the last look is still current
        now[0] += 5
        await schema.tables_check()

    async def test_guards_reported_until_installed(self, database):
        """Tables made by create_all lack the guards until installed and looked at again."""
        now = [0.0]
        schema = AuditSchema(database, clock=lambda: now[0])

        with pytest.raises(RuntimeError, match="append-only guards"):
            await schema.guards_check()
        async with database.engine.begin() as connection:
            await install_guards(connection)
        now[0] += SCHEMA_RECHECK_INTERVAL - 1
        with pytest.raises(RuntimeError):
            await schema.guards_check()
        now[0] += 1
        await schema.guards_check()

    async def test_readiness_has_a_guards_check(self, database_url, tmp_path):
        """Migrated tables have their guards: the non-critical audit_guards check is ok."""
        app = _app(database_url, tmp_path)
        async with lifespan_client(app) as client:
            ready = await client.get("/health/ready")

        assert {"status": "ok", "critical": False} == {
            key: ready.json()["checks"]["audit_guards"][key] for key in ("status", "critical")
        }


class TestSyncMode:
    """In sync mode identity's security events are committed entries when the call returns."""

    async def test_login_failure_and_role_change(self, database_url, tmp_path):
        """A failed login and a role change each leave an entry, with nothing to flush."""
        app = _app(database_url, tmp_path, audit={"mode": "sync"})
        slug = f"sync-{uuid.uuid4().hex[:10]}"
        async with lifespan_client(app) as client:
            owner = await create_member(
                app, tenant_slug=slug, email=f"o-{slug}@example.test", role="owner"
            )
            member = await create_member(
                app, tenant_slug=slug, email=f"m-{slug}@example.test", role="viewer"
            )
            failed = await client.post(
                "/v1/auth/login",
                json={"email": f"nobody-{slug}@example.test", "password": "not-the-password"},
            )
            changed = await client.patch(
                f"/v1/tenants/{owner.tenant_id}/members/{member.user_id}",
                json={"role": "member"},
                headers={"Authorization": f"Bearer {owner.token}"},
            )
            async with app.state.bastion.database.session() as session:
                rows = (
                    await session.execute(
                        select(entries.c.action, entries.c.resource_id).where(
                            entries.c.action.in_(["auth.login.failure", "member.role_change"])
                        )
                    )
                ).all()
        pseudonym = app.state.bastion.audit.pseudonyms.of_identifier(f"nobody-{slug}@example.test")

        assert (401, 200) == (failed.status_code, changed.status_code)
        assert ("auth.login.failure", pseudonym) in rows
        assert ("member.role_change", str(member.user_id)) in rows
