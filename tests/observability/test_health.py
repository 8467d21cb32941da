"""Liveness and readiness probes, dependency checks, restrictions, and a real outage."""

import asyncio
import contextlib
import glob
import hmac
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time

import pytest
from fastapi import FastAPI
from starlette.applications import Starlette

import bastion
from bastion.lifecycle import Lifecycle, Phase
from bastion.observability import HealthRegistry
from bastion.testing import lifespan_client

PROBLEM = "application/problem+json"


def make_app(framework=FastAPI, **overrides) -> Starlette:
    app = framework()
    settings = {"database": {"enabled": False}, "logging": {"enabled": False}, **overrides}
    bastion.install(app, **settings)
    return app


async def ok() -> None:
    return None


async def refused() -> None:
    raise ConnectionRefusedError("connection refused by 127.0.0.1:6399")


async def hangs() -> None:
    await asyncio.Event().wait()


def sleeper(seconds: float):
    async def check() -> None:
        await asyncio.sleep(seconds)

    return check


class TestLiveness:
    @pytest.mark.parametrize("framework", [FastAPI, Starlette])
    async def test_live_is_200(self, framework):
        """/health/live answers 200 while the process serves, on FastAPI and Starlette."""
        async with lifespan_client(make_app(framework)) as client:
            response = await client.get("/health/live")
        assert (200, "ok") == (response.status_code, response.json()["status"])
        assert "no-store" == response.headers["cache-control"]

    async def test_live_stays_200_when_a_dependency_fails(self):
        """A failing dependency makes the process unready, never dead."""
        app = make_app()
        app.state.bastion.health.register("cache", refused)
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/health/live")).status_code

    async def test_probes_are_not_in_the_openapi_document(self):
        """The probes are operational endpoints, not part of the API."""
        assert not any(path.startswith("/health") for path in make_app().openapi()["paths"])

    async def test_custom_prefix(self):
        """health.path_prefix moves both probes."""
        app = make_app(health={"path_prefix": "/_ops/"})
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/_ops/live")).status_code
            assert 200 == (await client.get("/_ops/ready")).status_code
            assert 404 == (await client.get("/health/live")).status_code

    async def test_disabled_health_mounts_nothing(self):
        """health.enabled=false leaves the paths to the app (here: 404)."""
        async with lifespan_client(make_app(health={"enabled": False})) as client:
            assert 404 == (await client.get("/health/live")).status_code


class TestReadiness:
    async def test_ready_reports_each_check(self):
        """200 with every check's status, criticality and latency."""
        app = make_app()
        app.state.bastion.health.register("search", ok)
        app.state.bastion.health.register("cache", ok, critical=False)
        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")
        body = response.json()
        assert (200, "ok", "ready") == (response.status_code, body["status"], body["phase"])
        assert {"search", "cache"} == set(body["checks"])
        assert {"status": "ok", "critical": True} == {
            k: v for k, v in body["checks"]["search"].items() if k != "latency_ms"
        }
        assert all(check["latency_ms"] >= 0 for check in body["checks"].values())

    async def test_failing_critical_check_is_503_naming_it(self):
        """A critical failure is 503 with that dependency's status and error."""
        app = make_app()
        app.state.bastion.health.register("search", ok)
        app.state.bastion.health.register("cache", refused)
        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")
        body = response.json()
        assert (503, "fail") == (response.status_code, body["status"])
        assert "ok" == body["checks"]["search"]["status"]
        cache = body["checks"]["cache"]
        assert ("fail", True) == (cache["status"], cache["critical"])
        assert "ConnectionRefusedError: connection refused by 127.0.0.1:6399" == cache["error"]

    async def test_non_critical_failure_keeps_200(self):
        """A non-critical failure is reported but the process stays ready."""
        app = make_app()
        app.state.bastion.health.register("recommendations", refused, critical=False)
        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")
        body = response.json()
        assert (200, "ok") == (response.status_code, body["status"])
        assert "fail" == body["checks"]["recommendations"]["status"]

    async def test_hanging_check_is_bounded_by_check_timeout(self):
        """A check that never answers fails after health.check_timeout, not later."""
        app = make_app(health={"check_timeout": 0.2})
        app.state.bastion.health.register("stuck", hangs)
        async with lifespan_client(app) as client:
            started = time.perf_counter()
            response = await client.get("/health/ready")
            elapsed = time.perf_counter() - started
        assert 503 == response.status_code
        assert "timed out after 0.2s" == response.json()["checks"]["stuck"]["error"]
        # Real time, bounded loosely: the point is "about 0.2 s", not "1 s or forever".
        assert elapsed < 1.5

    async def test_per_check_timeout_overrides_the_default(self):
        """A check registered with its own timeout uses it."""
        app = make_app(health={"check_timeout": 5})
        app.state.bastion.health.register("stuck", hangs, timeout=0.05)
        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")
        assert "timed out after 0.05s" == response.json()["checks"]["stuck"]["error"]

    async def test_checks_run_concurrently(self):
        """Two 0.3 s checks take about 0.3 s together, not 0.6 s."""
        registry = HealthRegistry(Lifecycle(), default_timeout=2)
        registry.register("a", sleeper(0.3))
        registry.register("b", sleeper(0.3))
        started = time.perf_counter()
        healthy, report = await registry.run()
        elapsed = time.perf_counter() - started
        assert (True, {"a", "b"}) == (healthy, set(report))
        # Real time, bounded loosely: sequential would be 0.6 s or more.
        assert elapsed < 0.55

    async def test_error_text_is_masked_and_bounded(self):
        """A check's error never shows a password and is cut to a readable length."""

        async def leaky() -> None:
            raise ConnectionError("redis://:Pa55w0rdXYZ@cache:6379/0 " + "x" * 500)

        registry = HealthRegistry(Lifecycle())
        registry.register("redis", leaky)
        _, report = await registry.run()
        error = report["redis"]["error"]
        assert "Pa55w0rdXYZ" not in error
        assert error.startswith("ConnectionError: redis://:***@cache:6379/0")
        assert len(error) <= 200

    async def test_exception_without_message_shows_its_type(self):
        """A check failing with a bare exception still says what failed."""

        async def bare() -> None:
            raise OSError

        registry = HealthRegistry(Lifecycle())
        registry.register("disk", bare)
        assert "OSError" == (await registry.run())[1]["disk"]["error"]

    async def test_register_replaces_a_check_of_the_same_name(self):
        """Registering a name twice keeps the last check."""
        registry = HealthRegistry(Lifecycle())
        registry.register("db", refused)
        registry.register("db", ok)
        assert ["db"] == [check.name for check in registry.checks]
        assert (await registry.run())[0]

    async def test_no_checks_is_ready(self):
        """With nothing registered, a started process is ready."""
        async with lifespan_client(make_app()) as client:
            response = await client.get("/health/ready")
        assert (200, {}) == (response.status_code, response.json()["checks"])

    async def test_drain_turns_readiness_503_at_once(self):
        """After begin_drain(), readiness is 503 even though every check passes."""
        app = make_app()
        app.state.bastion.health.register("search", ok)
        async with lifespan_client(app) as client:
            assert 200 == (await client.get("/health/ready")).status_code
            app.state.bastion.lifecycle.begin_drain()
            response = await client.get("/health/ready")
            live = await client.get("/health/live")
        assert (503, "draining") == (response.status_code, response.json()["status"])
        assert (200, "draining") == (live.status_code, live.json()["phase"])

    async def test_not_ready_before_start_up(self):
        """Before start-up has run, readiness is 503 with phase starting."""
        registry = HealthRegistry(Lifecycle())
        response = await registry.ready(_request())
        assert 503 == response.status_code
        assert Phase.STARTING == Lifecycle().phase


class TestBuiltInChecks:
    async def test_database_check(self, sqlite_url):
        """With the database enabled, readiness checks it."""
        app = make_app(database={"url": sqlite_url})
        async with lifespan_client(app) as client:
            body = (await client.get("/health/ready")).json()
        assert "ok" == body["checks"]["database"]["status"]

    @pytest.mark.redis
    async def test_redis_check(self, redis_url):
        """With redis.url set, readiness checks Redis."""
        app = make_app(redis={"url": redis_url})
        async with lifespan_client(app) as client:
            body = (await client.get("/health/ready")).json()
        assert "ok" == body["checks"]["redis"]["status"]

    async def test_unreachable_redis_is_named(self):
        """A Redis nobody listens on makes readiness 503 naming redis."""
        app = make_app(redis={"url": f"redis://127.0.0.1:{free_port()}/0", "socket_timeout": 0.5})
        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")
        assert 503 == response.status_code
        assert "fail" == response.json()["checks"]["redis"]["status"]


class TestRestrictions:
    @pytest.mark.parametrize(
        ("networks", "status"),
        [(["10.0.0.0/8"], 403), (["127.0.0.0/8"], 200), (["10.0.0.0/8", "127.0.0.1/32"], 200)],
    )
    async def test_allowed_networks(self, networks, status):
        """Only callers inside health.allowed_networks may read the probes.

        The in-process test client connects from 127.0.0.1.
        """
        app = make_app(health={"allowed_networks": networks})
        async with lifespan_client(app) as client:
            live = await client.get("/health/live")
            ready = await client.get("/health/ready")
        assert (status, status) == (live.status_code, ready.status_code)

    def test_caller_without_an_ip_address_is_refused(self):
        """With an allow-list, a peer that is not an IP address (a socket path) is refused."""
        from starlette.requests import Request

        registry = HealthRegistry(Lifecycle(), allowed_networks=["0.0.0.0/0"])
        scope = {"type": "http", "headers": [], "client": ("unix-socket", 0)}
        assert not registry.allowed(Request(scope))

    async def test_refusal_is_a_problem(self):
        """A refused probe is a FORBIDDEN problem, like every other error."""
        app = make_app(health={"allowed_networks": ["10.0.0.0/8"]})
        async with lifespan_client(app) as client:
            response = await client.get("/health/ready")
        body = response.json()
        assert (PROBLEM, "FORBIDDEN") == (response.headers["content-type"], body["code"])
        assert response.headers["x-request-id"] == body["correlation_id"]

    @pytest.mark.parametrize(
        ("authorization", "status"),
        [
            (None, 403),
            ("Bearer wrong-token", 403),
            ("Bearer probe-token-1", 200),
            ("bearer probe-token-1", 200),
            ("Basic probe-token-1", 403),
            ("probe-token-1", 403),
            ("Bearer probe-token-1x", 403),
        ],
    )
    async def test_token(self, authorization, status):
        """With health.token set, probes need Authorization: Bearer <token>."""
        app = make_app(health={"token": "probe-token-1"})
        headers = {"Authorization": authorization} if authorization else {}
        async with lifespan_client(app) as client:
            live = await client.get("/health/live", headers=headers)
            ready = await client.get("/health/ready", headers=headers)
        assert (status, status) == (live.status_code, ready.status_code)

    async def test_token_is_compared_in_constant_time(self, monkeypatch):
        """The token comparison goes through hmac.compare_digest."""
        calls = []
        real = hmac.compare_digest

        def spy(a, b):
            calls.append((a, b))
            return real(a, b)

        monkeypatch.setattr(hmac, "compare_digest", spy)
        app = make_app(health={"token": "probe-token-1"})
        async with lifespan_client(app) as client:
            await client.get("/health/live", headers={"Authorization": "Bearer guess"})
        assert [(b"guess", b"probe-token-1")] == calls


def _request():
    from starlette.requests import Request

    return Request({"type": "http", "method": "GET", "path": "/health/ready", "headers": []})


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# --- Acceptance: a real PostgreSQL goes away and comes back --------------------------------


class PrivatePostgres:
    """A throw-away PostgreSQL cluster on a free port, run as the postgres user.

    initdb and pg_ctl refuse to run as root, so as root every command goes through
    runuser; the data lives in a fresh directory under /tmp that postgres owns.
    """

    def __init__(self, bindir: str) -> None:
        self.bindir = bindir
        self.root = tempfile.mkdtemp(prefix="bastion-pg-")
        self.data = os.path.join(self.root, "data")
        self.port = free_port()
        self.prefix: list[str] = []
        if os.geteuid() == 0:
            account = pwd.getpwnam("postgres")
            os.chown(self.root, account.pw_uid, account.pw_gid)
            self.prefix = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> str:
        return f"postgresql+asyncpg://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.prefix, os.path.join(self.bindir, tool), *args],
            check=True,
            capture_output=True,
            timeout=60,
        )

    def init(self) -> None:
        self._run("initdb", "-D", self.data, "-A", "trust", "-U", "postgres", "--no-sync")

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off"
        log = os.path.join(self.root, "server.log")
        self._run("pg_ctl", "-D", self.data, "-l", log, "-o", options, "-w", "-t", "30", "start")

    def stop(self, mode: str = "fast") -> None:
        self._run("pg_ctl", "-D", self.data, "-m", mode, "-w", "-t", "30", "stop")

    def destroy(self) -> None:
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            self.stop("immediate")
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def private_postgres(service_unavailable):
    """A PostgreSQL server this test may stop and start; removed afterwards."""
    bindirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    if not bindirs or (os.geteuid() == 0 and shutil.which("runuser") is None):
        service_unavailable("postgres", "initdb/pg_ctl (Debian package postgresql) not installed")
    server = PrivatePostgres(bindirs[-1])
    try:
        server.init()
        server.start()
    except subprocess.SubprocessError as exc:
        server.destroy()
        detail = getattr(exc, "stderr", b"") or b""
        service_unavailable("postgres", f"cannot start a private server: {detail.decode()[-300:]}")
    yield server
    server.destroy()


@pytest.mark.slow
class TestDatabaseOutage:
    async def test_ready_follows_the_database_without_a_restart(self, private_postgres):
        """Readiness is 503 naming the database while it is down, and 200 once it is back."""
        app = make_app(
            database={"url": private_postgres.url, "connect_timeout": 1},
            migrations={"enabled": False},
            health={"check_timeout": 2},
            # No migrations, no audit, flag or idempotency tables: readiness would (rightly)
            # say so, and the failing queries would keep the database's circuit open.
            audit={"enabled": False},
            flags={"enabled": False},
            http={"idempotency": {"enabled": False}},
        )
        async with lifespan_client(app) as client:
            before = await client.get("/health/ready")
            assert (200, "ok") == (
                before.status_code,
                before.json()["checks"]["database"]["status"],
            )

            await asyncio.to_thread(private_postgres.stop)
            during = await client.get("/health/ready")
            body = during.json()
            assert (503, "fail") == (during.status_code, body["status"])
            assert "fail" == body["checks"]["database"]["status"]
            assert body["checks"]["database"]["error"]

            await asyncio.to_thread(private_postgres.start)
            # Bounded wait for the pool to reconnect: it should on the first probe.
            deadline = time.monotonic() + 15
            after = await client.get("/health/ready")
            while after.status_code != 200 and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
                after = await client.get("/health/ready")
            assert (200, "ok") == (after.status_code, after.json()["checks"]["database"]["status"])


class TestProbeMethods:
    async def test_probes_answer_get_and_head_and_refuse_other_methods(self, sqlite_url):
        """GET/HEAD on a probe answer 200; POST is a 405 problem with Allow, never a 500."""
        from fastapi import FastAPI

        import bastion
        from bastion.testing import lifespan_client

        app = FastAPI()
        bastion.install(app, database={"url": sqlite_url})
        async with lifespan_client(app) as client:
            get = await client.get("/health/live")
            head = await client.head("/health/ready")
            post = await client.post("/health/live")
        assert (200, 200) == (get.status_code, head.status_code)
        assert 405 == post.status_code
        assert "application/problem+json" == post.headers["content-type"]
        assert "METHOD_NOT_ALLOWED" == post.json()["code"]
        assert "GET" in post.headers["allow"]

    async def test_catch_all_route_cannot_shadow_the_probes(self, sqlite_url):
        """An app's catch-all route does not take over /health/live."""
        from fastapi import FastAPI

        import bastion
        from bastion.testing import lifespan_client

        app = FastAPI()

        @app.get("/{path:path}")
        async def spa(path: str) -> dict[str, str]:
            return {"page": path}

        bastion.install(app, database={"url": sqlite_url})
        async with lifespan_client(app) as client:
            response = await client.get("/health/live")
        assert "ok" == response.json()["status"]
