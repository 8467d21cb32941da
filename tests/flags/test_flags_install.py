"""install() with feature flags: the runtime, readiness, the seed file, the schedule, metrics."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import uuid

import pytest
from fastapi import FastAPI
from flags_store_support import audit_rows, eventually
from prometheus_client import REGISTRY
from sqlalchemy import update

import bastion
from bastion.audit import Actor
from bastion.data import Database
from bastion.errors import ConfigurationError
from bastion.flags._build import FlagsRuntime, flags_runtime
from bastion.flags._evaluation import EvaluationContext
from bastion.flags._model import Flag
from bastion.flags._tables import flags as flags_table
from bastion.settings import DatabaseSettings
from bastion.testing import lifespan_client

OPERATOR = Actor.system("test")

SEED = {
    "flags": [
        {"key": "seeded", "enabled": True, "rules": [{"segments": ["staff"]}]},
        {"key": "dark", "enabled": False},
    ],
    "segments": [
        {
            "name": "staff",
            "constraints": [
                {"context": "emailDomain", "operator": "IN", "values": ["example.com"]}
            ],
        }
    ],
}

UNLEASH_YAML = """\
version: 1
features:
  - name: from-unleash
    enabled: true
    strategies:
      - name: default
  - name: off-in-unleash
    enabled: false
    strategies: []
"""


def _app(tmp_path, **overrides) -> FastAPI:
    app = FastAPI()
    overrides.setdefault("logging", {"level": "WARNING"})
    overrides.setdefault("migrations", {"mode": "auto"})
    bastion.install(app, secrets={"development_directory": str(tmp_path / "secrets")}, **overrides)
    return app


def _key() -> str:
    # The PostgreSQL database is the session's, shared with other tests.
    return f"install-{uuid.uuid4().hex[:8]}"


class TestInstall:
    async def test_runtime_readiness_and_accessor(self, database_url, tmp_path):
        """The runtime is on app.state.bastion.flags, and readiness checks it loaded."""
        app = _app(tmp_path, database={"url": database_url})
        async with lifespan_client(app) as client:
            ready = await client.get("/health/ready")
            runtime = flags_runtime(app)

        assert isinstance(runtime, FlagsRuntime)
        assert runtime is app.state.bastion.flags
        assert runtime.store is not None
        checks = ready.json()["checks"]
        assert (200, "ok", True) == (
            ready.status_code,
            checks["flags"]["status"],
            checks["flags"]["critical"],
        )
        assert ("ok", False) == (
            checks["flags_freshness"]["status"],
            checks["flags_freshness"]["critical"],
        )

    async def test_a_write_is_served_and_counted(self, database_url, tmp_path):
        """A stored flag is served by the app; its evaluations reach the counter at a flush."""
        key = _key()
        app = _app(tmp_path, database={"url": database_url})
        async with lifespan_client(app):
            runtime = flags_runtime(app)
            await runtime.store.create(Flag(key=key, enabled=True), actor=OPERATOR)
            before = _evaluations(key)
            answers = [runtime.flags.is_enabled(key) for _ in range(3)]
            runtime.sync.flush_counts()

            assert [True] * 3 == answers
            assert before + 3 == _evaluations(key)
            assert runtime.flags.revision == REGISTRY.get_sample_value("bastion_flags_revision")

    async def test_off_means_no_runtime_and_no_routes(self, sqlite_url, tmp_path):
        """With flags.enabled off there is no runtime, no client route and no admin route."""
        app = _app(tmp_path, database={"url": sqlite_url}, flags={"enabled": False})
        async with lifespan_client(app) as client:
            client_route = await client.get("/api/features")
            admin_route = await client.get("/admin/features")

        assert app.state.bastion.flags is None
        assert (404, 404) == (client_route.status_code, admin_route.status_code)
        with pytest.raises(ConfigurationError, match=r"flags\.enabled"):
            flags_runtime(app)

    async def test_missing_tables_are_not_ready(self, sqlite_url, tmp_path):
        """Without the flag tables (migrations off) readiness fails on the flags check."""
        app = _app(tmp_path, database={"url": sqlite_url}, migrations={"mode": "off"})
        async with lifespan_client(app) as client:
            ready = await client.get("/health/ready")

        assert 503 == ready.status_code
        assert "not loaded" in ready.json()["checks"]["flags"]["error"]

    async def test_memory_store_url_means_polling_only(self, sqlite_url, redis_url, tmp_path):
        """``flags.store_url=memory://`` keeps notifications off even with a shared Redis."""
        app = _app(
            tmp_path,
            database={"url": sqlite_url},
            redis={"url": redis_url},
            flags={"store_url": "memory://"},
        )
        async with lifespan_client(app):
            assert flags_runtime(app).sync.notifier is None


class TestSeedFile:
    async def test_json_seed_is_imported_into_an_empty_store_once(self, sqlite_url, tmp_path):
        """The seed fills an empty store (as the seed's import); later starts keep the edits."""
        seed = tmp_path / "flags.json"
        seed.write_text(json.dumps(SEED))
        options = {"database": {"url": sqlite_url}, "flags": {"seed_file": str(seed)}}
        app = _app(tmp_path, **options)
        async with lifespan_client(app):
            runtime = flags_runtime(app)
            served = (
                runtime.flags.is_enabled("seeded", EvaluationContext(email="ana@example.com")),
                runtime.flags.is_enabled("seeded", EvaluationContext(email="x@other.org")),
            )
            await runtime.store.toggle("dark", True, expected_version=1, actor=OPERATOR)
            history = await runtime.store.history("seeded")
            await app.state.bastion.audit.log.flush()  # async mode: commit what was recorded
            rows = await audit_rows(runtime.store.database)
            imports = [row for row in rows if row[0] == "flag.import"]

        assert (True, False) == served
        assert [("import", "system:flags.seed")] == [(c.action, c.actor) for c in history]
        assert 1 == len(imports)

        again = _app(tmp_path, **options)
        async with lifespan_client(again):
            runtime = flags_runtime(again)
            assert runtime.flags.is_enabled("dark")
            assert 2 == (await runtime.store.get("dark")).version

    async def test_an_invalid_stored_row_stops_neither_start_nor_the_rest(
        self, sqlite_url, tmp_path
    ):
        """A stored flag that no longer validates is skipped: the app starts ready, serves the
        others, and the seed is not imported over the set."""
        seed = tmp_path / "flags.json"
        seed.write_text(json.dumps(SEED))
        options = {"database": {"url": sqlite_url}, "flags": {"seed_file": str(seed)}}
        async with lifespan_client(_app(tmp_path, **options)):
            pass
        database = Database(DatabaseSettings(url=sqlite_url))
        try:
            async with database.engine.begin() as connection:
                await connection.execute(
                    update(flags_table)
                    .where(flags_table.c.key == "dark")
                    .values(definition='{"key": "dark", "type": "no-such-type"}')
                )
        finally:
            await database.aclose()

        app = _app(tmp_path, **options)
        async with lifespan_client(app) as client:
            ready = await client.get("/health/ready")
            runtime = flags_runtime(app)
            history = await runtime.store.history("seeded")

        assert 200 == ready.status_code
        assert ["seeded"] == runtime.flags.flag_set.keys()
        assert 1 == len(history)  # imported by the first start only

    async def test_yaml_unleash_seed_without_database(self, tmp_path):
        """Without a database the seed (an Unleash export in YAML) is the whole, read-only set."""
        seed = tmp_path / "flags.yaml"
        seed.write_text(UNLEASH_YAML)
        app = _app(tmp_path, database={"enabled": False}, flags={"seed_file": str(seed)})
        async with lifespan_client(app) as client:
            runtime = flags_runtime(app)
            ready = await client.get("/health/ready")
            admin = await client.get("/admin/features")

            assert runtime.store is None
            assert runtime.flags.is_enabled("from-unleash")
            assert not runtime.flags.is_enabled("off-in-unleash")
        assert 200 == ready.status_code
        assert 404 == admin.status_code

    @pytest.mark.parametrize(
        ("name", "text", "message"),
        [
            ("broken.json", "{not json", "not valid JSON"),
            ("broken.yaml", "flags: [", "nor valid YAML"),
            (
                "invalid.json",
                json.dumps({"flags": [{"key": "x", "type": "colour"}]}),
                "flags.0.type",
            ),
            ("neither.json", json.dumps({"something": []}), "seed_file"),
        ],
    )
    def test_unfit_seed_stops_install(self, tmp_path, name, text, message):
        """A seed file that cannot be read as flags stops install() with the file named."""
        seed = tmp_path / name
        seed.write_text(text)

        with pytest.raises(ConfigurationError, match=message) as raised:
            _app(tmp_path, database={"enabled": False}, flags={"seed_file": str(seed)})
        assert str(seed) in str(raised.value)

    def test_missing_seed_stops_install(self, tmp_path):
        """A seed file that does not exist stops install()."""
        with pytest.raises(ConfigurationError, match="cannot be read"):
            _app(
                tmp_path,
                database={"enabled": False},
                flags={"seed_file": str(tmp_path / "absent.json")},
            )

    async def test_schedule_without_database_switches_on_time(self, tmp_path):
        """The schedule timer recompiles the seed's set when a scheduled change falls due."""
        at = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=0.4)
        seed = tmp_path / "flags.json"
        seed.write_text(
            json.dumps(
                {
                    "flags": [
                        {"key": "launch", "schedule": [{"at": at.isoformat(), "enabled": True}]}
                    ]
                }
            )
        )
        app = _app(tmp_path, database={"enabled": False}, flags={"seed_file": str(seed)})
        async with lifespan_client(app):
            flags = flags_runtime(app).flags
            assert not flags.is_enabled("launch")
            # Real time: the timer is what is tested; bounded a little past the due time.
            assert await eventually(lambda: flags.is_enabled("launch"), within=2.0)
            assert dt.datetime.now(dt.UTC) >= at
            await asyncio.sleep(0)


def _evaluations(key: str) -> float:
    total = 0.0
    for metric in REGISTRY.collect():
        if metric.name != "bastion_flags_evaluations":
            continue
        for sample in metric.samples:
            if sample.name.endswith("_total") and sample.labels.get("flag") == key:
                total += sample.value
    return total
