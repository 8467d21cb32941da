"""Shared fixtures: real services, the database matrix, and a clean environment.

Services are this machine's own (PostgreSQL 5432, Redis 6379); the
``BASTION_TEST_*_URL`` variables override them. Each session gets its own
PostgreSQL database and Redis key prefix, removed at the end.

Outside CI a test whose service is unreachable is skipped and the run ends with
one line counting those skips by service; with ``CI=true`` it fails instead.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import secrets
import shutil
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

# The process's global tracer provider is the tests' own, recording every span,
# set before any app is built: bastion claims the global provider only when none
# is set, so no test depends on which app the suite happened to build first
# (an app without an exporter records no new trace of its own).
trace.set_tracer_provider(TracerProvider())

POSTGRES_ADMIN_URL = os.environ.get(
    "BASTION_TEST_POSTGRES_URL", "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
)
REDIS_URL = os.environ.get("BASTION_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
IN_CI = os.environ.get("CI", "").lower() in {"1", "true", "yes"}

_unreachable_skips: collections.Counter[str] = collections.Counter()
_service_errors: dict[str, str] = {}


def _service_unavailable(service: str, reason: str) -> None:
    """Fail in CI, skip (and count) elsewhere."""
    if IN_CI:
        pytest.fail(f"{service} is required in CI but unreachable: {reason}", pytrace=False)
    _unreachable_skips[service] += 1
    pytest.skip(f"{service} unreachable: {reason}")


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _unreachable_skips:
        counts = ", ".join(f"{name}={n}" for name, n in sorted(_unreachable_skips.items()))
        terminalreporter.write_line(f"skipped because a service was unreachable: {counts}")


def _asyncpg_dsn(url: str) -> str:
    return url.replace("postgresql+asyncpg://", "postgresql://", 1)


async def _pg_admin(statement: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(_asyncpg_dsn(POSTGRES_ADMIN_URL), timeout=3)
    try:
        await conn.execute(statement)
    finally:
        await conn.close()


@contextlib.contextmanager
def _scratch_postgres(suffix: str) -> Iterator[str]:
    name = f"bastion_test_{os.getpid()}_{suffix}"
    asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def scratch_postgres() -> Callable[[str], contextlib.AbstractContextManager[str]]:
    """Make a PostgreSQL database of a test's own: ``with scratch_postgres("x") as url``.

    For tests that need tables no migration made, or counts no other test disturbs.
    Use it from a plain (not async) fixture: it runs its own event loop.
    """
    return _scratch_postgres


@pytest.fixture(scope="module")
def _module_postgres(request, _postgres_session_url, scratch_postgres) -> Iterator[str | None]:
    """A PostgreSQL database of the test module's own, for tables made by ``create_all``.

    Not the session's database: there, the tables come from bastion's migrations
    (which would find tables made by ``create_all`` and refuse to run), and other
    tests' rows would disturb counts. ``None`` when PostgreSQL is unreachable (the
    test's ``postgres_url`` then fails in CI and skips elsewhere).
    """
    if _postgres_session_url is None:
        yield None
        return
    with scratch_postgres(request.module.__name__.rpartition(".")[2]) as url:
        yield url


@pytest.fixture
def service_unavailable() -> Callable[[str, str], None]:
    """Report a service a test needs as unreachable: fails in CI, skips and counts elsewhere.

    A fixture rather than an import: several directories have a conftest.py, so
    ``from conftest import ...`` would get whichever was imported last.
    """
    return _service_unavailable


@pytest.fixture(scope="session")
def _postgres_session_url() -> Iterator[str | None]:
    name = f"bastion_test_{os.getpid()}_{secrets.token_hex(3)}"
    try:
        asyncio.run(_pg_admin(f'CREATE DATABASE "{name}"'))
    except Exception as exc:  # noqa: BLE001 -- any failure means the service is unusable
        _service_errors["postgres"] = f"{type(exc).__name__}: {exc}"
        yield None
        return
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    yield f"{base}/{name}"
    asyncio.run(_pg_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(scope="session")
def _postgres_session_admin(
    _postgres_session_url: str | None,
) -> Iterator[tuple[Callable[[Any], Any], Any] | None]:
    """One connection to the session's database, for fixtures' chores.

    Its loop runs in a thread of its own: some fixtures are set up while a test's
    loop is running in the main thread, where no other loop may run.
    """
    if _postgres_session_url is None:
        yield None
        return
    import asyncpg

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="postgres-admin", daemon=True)
    thread.start()

    def run(coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, loop).result(timeout=30)

    connection = run(asyncpg.connect(_asyncpg_dsn(_postgres_session_url), timeout=3))
    run(connection.execute("SET lock_timeout = '2s'"))
    yield run, connection
    run(connection.close())
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)
    loop.close()


# Every test's app has an audit.encryption_key of its own (a fresh development secret),
# and the month's anonymous subject (anonymous:YYYY-MM) is the same for every test: a
# subject key left by an earlier test does not unwrap under the next test's key, and the
# audit writer retries such a batch until the test times out.
_FORGET_SUBJECT_KEYS = """
DO $$ BEGIN
  IF to_regclass('bastion_audit_subject_keys') IS NOT NULL THEN
    DELETE FROM bastion_audit_subject_keys;
  END IF;
END $$
"""


@pytest.fixture
def postgres_url(
    _postgres_session_url: str | None,
    _postgres_session_admin: tuple[Callable[[Any], Any], Any] | None,
) -> str:
    """URL of this session's own PostgreSQL database (asyncpg driver).

    The audit subject keys earlier tests left are forgotten first (see above).
    """
    if _postgres_session_url is None or _postgres_session_admin is None:
        _service_unavailable("postgres", _service_errors.get("postgres", "unknown"))
    assert _postgres_session_url is not None
    assert _postgres_session_admin is not None
    run, connection = _postgres_session_admin
    run(connection.execute(_FORGET_SUBJECT_KEYS))
    return _postgres_session_url


@pytest.fixture(scope="session")
def _redis_session() -> Iterator[tuple[str, str] | None]:
    import redis

    prefix = f"bastion-test:{os.getpid()}:{secrets.token_hex(3)}:"
    client = redis.Redis.from_url(REDIS_URL, socket_timeout=2, socket_connect_timeout=2)
    try:
        client.ping()
    except Exception as exc:  # noqa: BLE001 -- any failure means the service is unusable
        _service_errors["redis"] = f"{type(exc).__name__}: {exc}"
        yield None
        return
    yield REDIS_URL, prefix
    for key in client.scan_iter(match=prefix + "*", count=1000):
        client.delete(key)
    client.close()


@pytest.fixture
def redis_url(_redis_session: tuple[str, str] | None) -> str:
    """URL of the test Redis; use :func:`redis_prefix` for every key you write."""
    if _redis_session is None:
        _service_unavailable("redis", _service_errors.get("redis", "unknown"))
    assert _redis_session is not None
    return _redis_session[0]


@pytest.fixture
def redis_prefix(_redis_session: tuple[str, str] | None) -> str:
    """A key prefix owned by this test session; keys under it are deleted at the end."""
    if _redis_session is None:
        _service_unavailable("redis", _service_errors.get("redis", "unknown"))
    assert _redis_session is not None
    return _redis_session[1] + secrets.token_hex(3) + ":"


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A fresh SQLite database file for this test."""
    return f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Runs the test once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'bastion.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


@pytest.fixture(autouse=True)
def _clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Each test starts with no BASTION_* variables, no bastion.toml, fresh logging."""
    for name in list(os.environ):
        if name.startswith("BASTION_") and not name.startswith("BASTION_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("BASTION_CONFIG_FILE", str(tmp_path / "absent-bastion.toml"))
    yield
    structlog.reset_defaults()
    root = logging.getLogger()
    for handler in list(root.handlers):
        if type(handler).__name__ == "_SinkHandler":
            root.removeHandler(handler)
    logging.getLogger("uvicorn.access").disabled = False


@pytest.fixture(scope="session")
def promtool() -> str:
    """Path of Prometheus's promtool (Debian package ``prometheus``; ``.ci/run`` installs it)."""
    path = shutil.which("promtool")
    if path is None:
        _service_unavailable("promtool", "not on PATH (apt-get install prometheus)")
    assert path is not None
    return path
