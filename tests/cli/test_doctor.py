"""`bastion doctor`: reachability of real backends, risky combinations, exit status."""

from __future__ import annotations

import json
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
from fastapi import FastAPI
from sqlalchemy import text

import bastion
from bastion._doctor import (
    Finding,
    Report,
    Status,
    check_audit_guards,
    check_combinations,
    check_migrations,
    check_tcp,
)
from bastion.data import VerificationReport
from bastion.settings import Settings

CLOSED_PORT_PG = "postgresql+asyncpg://postgres@127.0.0.1:1/nowhere"


def closed_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def listener() -> Iterator[int]:
    """A TCP port that accepts connections (and nothing else)."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server.getsockname()[1]


def findings(result) -> dict[str, dict]:
    return {finding["check"]: finding for finding in json.loads(result.stdout)["findings"]}


class TestReachability:
    @pytest.mark.postgres
    def test_reachable_postgres_is_ok(self, cli, monkeypatch, postgres_url):
        """A real PostgreSQL answers SELECT 1: the database check is ok and the exit is 0."""
        monkeypatch.setenv("BASTION_DATABASE__URL", postgres_url)
        result = cli("doctor", "--no-app", "--json")
        database = findings(result)["database"]
        assert (0, "ok") == (result.exit_code, database["status"])
        assert database["detail"].startswith("postgres at postgresql+asyncpg://")

    def test_unreachable_database_fails(self, cli, monkeypatch):
        """A database on a closed port is a failure, and the exit status is 1."""
        monkeypatch.setenv("BASTION_DATABASE__URL", CLOSED_PORT_PG)
        result = cli("doctor", "--no-app", "--json", "--timeout", "1")
        database = findings(result)["database"]
        assert (1, "failure") == (result.exit_code, database["status"])
        assert "unreachable" in database["detail"]
        assert "BASTION_DATABASE__URL" in database["fix"]
        assert json.loads(result.stdout)["ok"] is False

    def test_unreachable_database_fails_in_the_table_too(self, cli, monkeypatch):
        """The human table shows the failure and a count, and the exit status is 1."""
        monkeypatch.setenv("BASTION_DATABASE__URL", CLOSED_PORT_PG)
        result = cli("doctor", "--no-app", "--timeout", "1")
        assert 1 == result.exit_code
        assert "failure" in result.stdout
        assert "1 failure, 0 warnings" in result.stdout

    def test_missing_sqlite_file_is_a_note_and_is_not_created(self, cli, monkeypatch, tmp_path):
        """A SQLite file that does not exist yet is a note; the doctor does not create it."""
        database = tmp_path / "later" / "app.db"
        monkeypatch.setenv("BASTION_DATABASE__URL", f"sqlite+aiosqlite:///{database}")
        result = cli("doctor", "--no-app", "--json")
        assert (0, "note") == (result.exit_code, findings(result)["database"]["status"])
        assert not database.parent.exists()

    @pytest.mark.redis
    def test_reachable_redis_is_ok(self, cli, monkeypatch, redis_url, sqlite_url):
        """A real Redis answers PING: the redis check is ok."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_REDIS__URL", redis_url)
        result = cli("doctor", "--no-app", "--json")
        assert (0, "ok") == (result.exit_code, findings(result)["redis"]["status"])

    def test_unreachable_redis_fails(self, cli, monkeypatch, sqlite_url):
        """A Redis on a closed port is a failure."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_REDIS__URL", f"redis://127.0.0.1:{closed_port()}/0")
        result = cli("doctor", "--no-app", "--json", "--timeout", "1")
        assert (1, "failure") == (result.exit_code, findings(result)["redis"]["status"])

    def test_broker_is_checked_by_tcp(self, cli, monkeypatch, sqlite_url, listener):
        """A broker URL is reachable when its host accepts a TCP connection."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_EVENTS__BROKER_URL", f"nats://127.0.0.1:{listener}")
        result = cli("doctor", "--no-app", "--json")
        assert (0, "ok") == (result.exit_code, findings(result)["broker"]["status"])

    async def test_broker_list_is_reachable_when_any_server_is(self, listener):
        """In a comma-separated server list, one answering server is enough."""
        url = f"nats://127.0.0.1:{closed_port()},127.0.0.1:{listener}"
        assert Status.OK == (await check_tcp("broker", url, timeout=1)).status

    async def test_unreachable_broker_fails(self):
        """A broker on a closed port is a failure."""
        url = f"amqp://guest:guest@127.0.0.1:{closed_port()}/"
        finding = await check_tcp("broker", url, timeout=1)
        assert Status.FAILURE == finding.status
        assert "guest:guest" not in finding.detail

    def test_store_with_its_own_url_is_checked(self, cli, monkeypatch, sqlite_url):
        """A component store pointing at its own Redis is checked on its own."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_RATELIMIT__STORE_URL", f"redis://127.0.0.1:{closed_port()}")
        result = cli("doctor", "--no-app", "--json", "--timeout", "1")
        assert (1, "failure") == (result.exit_code, findings(result)["store: ratelimit"]["status"])


class TestRiskyCombinations:
    def test_workers_with_memory_backends_warn_but_exit_0(self, cli, monkeypatch, sqlite_url):
        """Workers on memory:// state warn, naming components and BASTION_REDIS__URL; exit 0."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_SERVER__WORKERS", "2")
        result = cli("doctor", "--no-app", "--json")
        shared = findings(result)["workers: shared state"]
        assert (0, "warning") == (result.exit_code, shared["status"])
        assert shared["detail"].startswith("http, resilience, ratelimit, identity, realtime, jobs")
        assert "BASTION_REDIS__URL" in shared["fix"]
        assert "warning" == findings(result)["workers: database"]["status"]

    def test_workers_without_redis_note_slower_flag_changes(self, cli, monkeypatch, sqlite_url):
        """Flags converge by polling without Redis: a note naming the interval, not a warning."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_SERVER__WORKERS", "2")
        monkeypatch.setenv("BASTION_FLAGS__POLL_INTERVAL", "3")
        result = cli("doctor", "--no-app", "--json")
        flags = findings(result)["workers: flag changes"]
        assert ("note", True) == (flags["status"], "(3 s)" in flags["detail"])

    def test_strict_fails_on_warnings(self, cli, monkeypatch, sqlite_url):
        """With --strict, a warning makes the exit status 1."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_SERVER__WORKERS", "2")
        assert 1 == cli("doctor", "--no-app", "--strict").exit_code

    @pytest.mark.redis
    def test_workers_with_redis_have_no_shared_state_warning(
        self, cli, monkeypatch, redis_url, sqlite_url
    ):
        """Once BASTION_REDIS__URL is set, no component keeps per-process state."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        monkeypatch.setenv("BASTION_REDIS__URL", redis_url)
        monkeypatch.setenv("BASTION_SERVER__WORKERS", "4")
        assert "workers: shared state" not in findings(cli("doctor", "--no-app", "--json"))

    def test_production_risks(self):
        """Production on SQLite, debug logs, SQL echo, migrations off warn; open probes note."""
        settings = Settings(
            environment="production",
            logging={"level": "DEBUG"},
            database={"echo": True},
            migrations={"mode": "off"},
        )
        statuses = {f.check: f.status for f in check_combinations(settings)}
        assert {
            "production: database": Status.WARNING,
            "production: database.echo": Status.WARNING,
            "production: logging": Status.WARNING,
            "production: migrations": Status.WARNING,
            "production: health probes": Status.NOTE,
            "production: shared state": Status.NOTE,
        } == statuses

    def test_safe_production_settings_have_no_risk(self, postgres_url):
        """PostgreSQL, Redis, check-mode migrations and guarded probes: nothing to report."""
        settings = Settings(
            environment="production",
            database={"url": postgres_url},
            redis={"url": "redis://cache:6379/0"},
            health={"token": "probe-token"},
        )
        assert [Finding("configuration", Status.OK, "no risky combination found")] == (
            check_combinations(settings)
        )


class TestApp:
    def test_app_loads_and_migrations_are_asked(self, cli, monkeypatch, sqlite_url, repo_root):
        """With --app the doctor loads the app and asks its migrator what is pending."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        Path(sqlite_url.removeprefix("sqlite+aiosqlite:///")).touch()
        result = cli(
            "doctor",
            "--json",
            "--app",
            "tests.lifecycle.drain_app:create_app",
            "--app-dir",
            str(repo_root),
        )
        checks = findings(result)
        assert (0, "ok") == (result.exit_code, checks["app"]["status"])
        # A new, empty database: every revision of bastion's tree is pending, and
        # SQLite's default mode (auto) applies them at start-up.
        assert "note" == checks["migrations"]["status"]
        assert "pending (bastion:" in checks["migrations"]["detail"]
        assert checks["migrations"]["detail"].endswith("start-up applies them (mode=auto)")

    def test_app_that_does_not_load_fails(self, cli, monkeypatch, sqlite_url):
        """An app that cannot be imported is a failure naming it."""
        monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
        result = cli("doctor", "--json", "--app", "no_such_module_anywhere:app")
        app = findings(result)["app"]
        assert (1, "failure") == (result.exit_code, app["status"])
        assert "no_such_module_anywhere" in app["detail"]

    def test_invalid_setting_is_one_line_and_exit_2(self, cli, monkeypatch):
        """An invalid value stops the doctor with one line naming the variable."""
        monkeypatch.setenv("BASTION_SERVER__WORKERS", "0")
        result = cli("doctor", "--no-app")
        assert 2 == result.exit_code
        assert [
            "bastion: invalid setting BASTION_SERVER__WORKERS: "
            "Input should be greater than or equal to 1"
        ] == result.stderr.splitlines()


class TestMigrations:
    async def test_migrator_that_cannot_tell_is_a_warning(self):
        """A migrator whose pending() raises is a warning, not a crash."""

        class Unfinished:
            async def verify(self):
                raise NotImplementedError("not there yet")

        runtime = SimpleNamespace(migrator=Unfinished(), settings=Settings())
        finding = await check_migrations(runtime)
        assert (
            Status.WARNING,
            "cannot tell what is pending: NotImplementedError: not there yet",
        ) == (
            finding.status,
            finding.detail,
        )

    @pytest.mark.parametrize(
        ("mode", "expected"),
        [("auto", Status.NOTE), ("check", Status.FAILURE), ("off", Status.WARNING)],
    )
    async def test_pending_migrations_by_mode(self, mode, expected):
        """Pending revisions: a note under auto, a failure under check, a warning under off."""

        class Behind:
            async def verify(self):
                return VerificationReport(checks=())

            async def pending(self):
                return {"bastion": ["0002_tables"], "app": []}

        runtime = SimpleNamespace(migrator=Behind(), settings=Settings(migrations={"mode": mode}))
        finding = await check_migrations(runtime)
        assert expected == finding.status
        assert "1 pending (bastion:0002_tables)" in finding.detail

    async def test_edited_applied_revision_is_a_failure(self, tmp_path):
        """An applied revision edited since it ran is a failure naming it, with the fix."""
        tree = tmp_path / "tree"
        (tree / "versions").mkdir(parents=True)
        (tree / "env.py").write_text(
            "from bastion.data import run_alembic_env\n\nrun_alembic_env()\n"
        )
        revision = tree / "versions" / "a1.py"
        revision.write_text(
            'revision = "a1"\ndown_revision = None\n\n\ndef upgrade():\n    pass\n\n\n'
            "def downgrade():\n    pass\n"
        )
        app = FastAPI()
        runtime = bastion.install(
            app,
            database={"url": f"sqlite+aiosqlite:///{tmp_path}/app.db"},
            migrations={"app_tree": str(tree)},
            logging={"enabled": False},
        )
        try:
            await runtime.migrator.upgrade()
            revision.write_text(revision.read_text() + "# edited\n")
            finding = await check_migrations(runtime)
        finally:
            await runtime.database.aclose()
        assert Status.FAILURE == finding.status
        assert "app:a1" in finding.detail
        assert "bastion migrate verify --accept" in finding.fix


def _audited(url: str, tmp_path) -> bastion.Bastion:
    return bastion.install(
        FastAPI(),
        database={"url": url},
        migrations={"mode": "off"},
        secrets={"development_directory": str(tmp_path / "secrets")},
        logging={"enabled": False},
    )


# How each dialect's guard is switched off, and the words the finding uses for it.
_WEAKEN = {
    "sqlite": ("DROP TRIGGER bastion_audit_entries_no_update", "is missing"),
    "postgres": (
        "ALTER TABLE bastion_audit_entries DISABLE TRIGGER bastion_audit_append_only",
        "is disabled",
    ),
}


@pytest.fixture(params=["sqlite", "postgres"])
def guarded_url(request, tmp_path, scratch_postgres) -> Iterator[tuple[str, str]]:
    """``(dialect, url)`` of an empty database no other test uses."""
    if request.param == "sqlite":
        yield "sqlite", f"sqlite+aiosqlite:///{tmp_path / 'app.db'}"
        return
    request.getfixturevalue("postgres_url")  # fails in CI, skips elsewhere, when down
    with scratch_postgres(f"doctor_guards_{secrets.token_hex(4)}") as url:
        yield "postgres", url


class TestAuditGuards:
    async def test_no_finding_without_an_audit_trail(self):
        """An app without the audit trail has no audit guards finding."""
        assert await check_audit_guards(SimpleNamespace(audit=None)) is None

    async def test_guards_in_place_then_weakened(self, guarded_url, tmp_path):
        """Migrated tables' guards are ok; a dropped or disabled trigger is a warning naming it."""
        dialect, url = guarded_url
        runtime = _audited(url, tmp_path)
        try:
            await runtime.migrator.upgrade()
            intact = await check_audit_guards(runtime)
            statement, words = _WEAKEN[dialect]
            async with runtime.database.engine.begin() as connection:
                await connection.execute(text(statement))
            weakened = await check_audit_guards(runtime)
        finally:
            await runtime.database.aclose()

        assert Status.OK == intact.status
        assert Status.WARNING == weakened.status
        assert words in weakened.detail
        assert "bastion_audit_entries" in weakened.detail

    async def test_missing_tables_are_a_note_with_the_fix(self, tmp_path):
        """Audit tables that were never migrated are not checked; the fix is to migrate."""
        runtime = _audited(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", tmp_path)
        try:
            finding = await check_audit_guards(runtime)
        finally:
            await runtime.database.aclose()

        assert (Status.NOTE, "run `bastion migrate upgrade`") == (finding.status, finding.fix)

    async def test_unreachable_database_is_not_asked(self, tmp_path):
        """With the database finding failed, the guards are a note, not a second failure."""
        runtime = _audited(f"sqlite+aiosqlite:///{tmp_path / 'app.db'}", tmp_path)
        down = Finding("database", Status.FAILURE, "down")
        try:
            finding = await check_audit_guards(runtime, down)
        finally:
            await runtime.database.aclose()

        assert Status.NOTE == finding.status


class TestReport:
    def test_exit_code(self):
        """Failures fail; warnings fail only when strict."""
        warning = Report((Finding("x", Status.WARNING, "risky"),))
        failure = Report((Finding("y", Status.FAILURE, "down"),))
        assert (0, 1, 1, 1) == (
            warning.exit_code(),
            warning.exit_code(strict=True),
            failure.exit_code(),
            failure.exit_code(strict=True),
        )
