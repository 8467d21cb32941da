"""The migration lock: one run at a time per database, across processes, PostgreSQL and SQLite."""

from __future__ import annotations

import asyncio
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path

import asyncpg
import pytest
from filelock import FileLock
from migration_support import (
    BASTION_APPLIED,
    BASTION_REVISIONS,
    WIDGETS,
    Revision,
    history_rows,
    version_rows,
)
from sqlalchemy.engine import make_url
from structlog.testing import capture_logs

from bastion.data import Database, MigrationError, MigrationTree, Migrator
from bastion.data._lock import ADVISORY_LOCK_KEY, _sqlite_file
from bastion.settings import DatabaseSettings

# Long enough that the processes which lost the race are still polling for the
# lock while the winner applies it.
SLOW: Revision = (
    "a2",
    "a1",
    "import time\n"
    "time.sleep(0.5)\n"
    'op.create_table("slow", sa.Column("id", sa.Integer, primary_key=True))',
    'op.drop_table("slow")',
    "Take a while.",
)
PROCESSES = 3
# Generous: once the gate opens, three runs one after the other on a busy CI machine.
PROCESS_DEADLINE = 60


def asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def hold_advisory_lock(url: str) -> asyncpg.Connection:
    """Another session holding the migration lock, as a running instance would."""
    connection = await asyncpg.connect(
        asyncpg_dsn(url), server_settings={"application_name": "other-instance"}
    )
    assert await connection.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY)
    return connection


async def lock_is_free(url: str) -> bool:
    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        free = await connection.fetchval("SELECT pg_try_advisory_lock($1)", ADVISORY_LOCK_KEY)
        await connection.execute("SELECT pg_advisory_unlock_all()")
        return bool(free)
    finally:
        await connection.close()


async def logged(logs: list[dict], event: str) -> None:
    """Wait until ``event`` was logged; real time, as the waiter polls the server: 10 s at most."""
    for _ in range(500):
        if any(entry["event"] == event for entry in logs):
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{event!r} was not logged within 10 s")


async def start(command: list[str], env: dict[str, str], stderr: Path):
    """Start a process whose stderr goes to a file the test can read while it runs."""
    with stderr.open("wb") as sink:  # the child keeps its own descriptor
        return await asyncio.create_subprocess_exec(
            *command, env=env, stdout=asyncio.subprocess.PIPE, stderr=sink
        )


async def all_logged(paths: list[Path], line: bytes) -> None:
    """Wait until every file holds ``line``: real processes, so real time, 60 s at most."""
    for _ in range(600):
        if all(line in path.read_bytes() for path in paths):
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"not every process logged {line!r} within 60 s")


@asynccontextmanager
async def holding_the_lock(db_url: str):
    """Hold the database's migration lock (advisory or file lock) while the block runs."""
    if db_url.startswith("sqlite"):
        holder = FileLock(lock_file(db_url))
        holder.acquire()
        lock_file(db_url).write_text("the test's starting gate\n")
        try:
            yield
        finally:
            holder.release()
        return
    connection = await hold_advisory_lock(db_url)
    try:
        yield
    finally:
        await connection.close()


def lock_file(db_url: str) -> Path:
    return Path(f"{make_url(db_url).database}.migrate.lock")


@pytest.fixture
def tree_dir(make_tree):
    return make_tree(WIDGETS)


def make_migrator(database, tree_dir, **options) -> Migrator:
    tree = MigrationTree.from_location("app", str(tree_dir), "app_version")
    return Migrator(database, [MigrationTree.bastion(), tree], **options)


class TestAdvisoryLock:
    @pytest.fixture
    async def pg_database(self, pg_db_url):
        db = Database(DatabaseSettings(url=pg_db_url))
        yield db
        await db.aclose()

    async def test_timeout_names_the_holder(self, pg_db_url, pg_database, tree_dir):
        """When another session keeps the lock, upgrade fails after lock_timeout naming it."""
        holder = await hold_advisory_lock(pg_db_url)
        holder_pid = holder.get_server_pid()
        migrator = make_migrator(pg_database, tree_dir, lock_timeout=0.3)
        try:
            with pytest.raises(MigrationError) as caught:
                await migrator.upgrade()
        finally:
            await holder.close()

        message = str(caught.value)
        assert "migrations.lock_timeout" in message
        assert f"pid {holder_pid}" in message
        assert "'other-instance'" in message
        assert [] == await version_rows(pg_database, "app_version")

    async def test_waiter_logs_then_proceeds_once_released(self, pg_db_url, pg_database, tree_dir):
        """A run that finds the lock taken logs who holds it, waits, and runs once it is free."""
        holder = await hold_advisory_lock(pg_db_url)
        migrator = make_migrator(pg_database, tree_dir, lock_timeout=30)
        with capture_logs() as logs:
            upgrade = asyncio.create_task(migrator.upgrade())
            try:
                await logged(logs, "waiting for the migration lock")
                assert not upgrade.done()
            finally:
                await holder.close()
            applied = await asyncio.wait_for(upgrade, 10)

        waiting = next(e for e in logs if e["event"] == "waiting for the migration lock")
        assert "'other-instance'" in waiting["holder"]
        assert [*BASTION_REVISIONS, "a1"] == [step.revision for step in applied]

    async def test_released_after_a_run_and_after_a_failure(self, pg_db_url, pg_database, tree_dir):
        """The lock is free again after a successful run and after a failing one."""
        migrator = make_migrator(pg_database, tree_dir)
        await migrator.upgrade()
        after_success = await lock_is_free(pg_db_url)

        with pytest.raises(MigrationError):
            await migrator.upgrade("zzz", tree="app")

        assert (True, True) == (after_success, await lock_is_free(pg_db_url))

    async def test_session_name_is_restored(self, pg_database, tree_dir):
        """The pooled connection gets its own application_name back after the run."""
        await make_migrator(pg_database, tree_dir).upgrade()

        async with pg_database.engine.connect() as connection:
            name = (await connection.exec_driver_sql("SHOW application_name")).scalar()

        assert "Migrator" not in name


class TestFileLock:
    @pytest.fixture
    async def sqlite_database(self, sqlite_url):
        db = Database(DatabaseSettings(url=sqlite_url))
        yield db
        await db.aclose()

    async def test_timeout_names_the_holder(self, sqlite_url, sqlite_database, tree_dir):
        """On SQLite a held <file>.migrate.lock makes upgrade fail after lock_timeout naming it."""
        path = lock_file(sqlite_url)
        holder = FileLock(path)
        holder.acquire()
        path.write_text("deploy job: ops@build pid 42\n")
        migrator = make_migrator(sqlite_database, tree_dir, lock_timeout=0.3)
        try:
            with pytest.raises(MigrationError, match="deploy job: ops@build pid 42"):
                await migrator.upgrade()
        finally:
            holder.release()

        assert [] == await version_rows(sqlite_database, "app_version")

    async def test_lock_file_is_free_after_the_run(self, sqlite_url, sqlite_database, tree_dir):
        """The run locks <database file>.migrate.lock and leaves it free and empty."""
        await make_migrator(sqlite_database, tree_dir).upgrade()

        path = lock_file(sqlite_url)
        after = FileLock(path)
        after.acquire(blocking=False)  # raises filelock.Timeout if still held
        after.release()
        assert "" == path.read_text()

    async def test_in_memory_database_needs_no_lock_file(self, tmp_path, tree_dir, monkeypatch):
        """An in-memory SQLite database is migrated without any lock file."""
        monkeypatch.chdir(tmp_path)
        db = Database(DatabaseSettings(url="sqlite+aiosqlite:///:memory:"))
        try:
            applied = await make_migrator(db, tree_dir).upgrade()
        finally:
            await db.aclose()

        assert [*BASTION_REVISIONS, "a1"] == [step.revision for step in applied]
        assert [] == list(tmp_path.glob("*.lock"))


class TestLockFileLocation:
    @pytest.mark.parametrize(
        ("url", "expected"),
        [
            ("sqlite+aiosqlite:///:memory:", None),
            ("sqlite+aiosqlite://", None),
            ("sqlite+aiosqlite:///file::memory:?uri=true&cache=shared", None),
            ("sqlite+aiosqlite:///file:mem1?mode=memory&uri=true", None),
            ("sqlite+aiosqlite:////srv/app.db", Path("/srv/app.db")),
            ("sqlite+aiosqlite:///file:/srv/app.db?uri=true", Path("/srv/app.db")),
        ],
    )
    def test_file_or_memory(self, url, expected):
        """The lock sits beside a database file; in-memory databases, plain or URI, need none."""
        assert expected == _sqlite_file(make_url(url))


class TestConcurrentProcesses:
    @pytest.mark.slow
    async def test_processes_started_together_apply_each_revision_once(
        self, db_url, make_tree, tmp_path
    ):
        """Several `bastion migrate upgrade` processes at once: all exit 0, each revision once."""
        tree = make_tree(WIDGETS, SLOW, name="slow_tree")
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), *sys.path]),
            "BASTION_DATABASE__URL": db_url,
            "BASTION_MIGRATIONS__APP_TREE": str(tree),
            "BASTION_MIGRATIONS__APP_VERSION_TABLE": "app_version",
            "BASTION_MIGRATIONS__MODE": "off",
            "BASTION_LOGGING__FORMAT": "json",
            "BASTION_CONFIG_FILE": str(tmp_path / "absent.toml"),
        }
        command = [sys.executable, "-c", "from bastion.cli import main; main()"]
        command += ["migrate", "upgrade", "--app", "migrate_cli_app:create_app"]
        errors = [tmp_path / f"process-{index}.err" for index in range(PROCESSES)]

        # A starting gate: interpreters take seconds to start on a busy machine, so
        # without it the first could finish before the last arrives. Released once
        # every process waits; they then race for the lock within one poll interval.
        async with holding_the_lock(db_url):
            processes = [await start(command, env, path) for path in errors]
            await all_logged(errors, b"waiting for the migration lock")
        outputs = [
            (await asyncio.wait_for(process.communicate(), PROCESS_DEADLINE))[0]
            for process in processes
        ]

        stderr = [path.read_bytes() for path in errors]
        assert [0] * PROCESSES == [process.returncode for process in processes], stderr
        db = Database(DatabaseSettings(url=db_url))
        try:
            rows = await history_rows(db)
            recorded = await version_rows(db, "app_version")
        finally:
            await db.aclose()
        applied = sorted((row["tree"], row["revision"], row["direction"]) for row in rows)
        expected = [("app", "a1"), ("app", "a2"), *BASTION_APPLIED]
        assert [(*step, "upgrade") for step in expected] == applied
        assert {"bastion migrate upgrade"} == {row["tool"] for row in rows}
        assert ["a2"] == recorded
        assert PROCESSES - 1 == sum(b"Nothing to apply" in out for out in outputs)
