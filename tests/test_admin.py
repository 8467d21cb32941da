"""``GET /admin/migrations``: the migration state for operators, behind the admin guard."""

from __future__ import annotations

import pytest

import bastion
from bastion.testing import lifespan_client


def make_app(database_url: str, **overrides):
    overrides.setdefault("logging", {"level": "WARNING", "format": "json"})
    overrides.setdefault("migrations", {"mode": "auto"})
    overrides.setdefault("database", {"url": database_url})
    return bastion.create_app(**overrides)


class TestMigrationsEndpoint:
    async def test_reports_trees_and_history(self, database_url):
        """A loopback caller sees each tree at its head, nothing pending, and the history."""
        async with lifespan_client(make_app(database_url)) as client:
            response = await client.get("/admin/migrations")
        assert 200 == response.status_code
        assert "application/json" == response.headers["content-type"]
        body = response.json()
        assert body["up_to_date"] is True
        (tree,) = body["trees"]
        assert "bastion" == tree["name"]
        assert tree["heads"] == tree["current"]
        assert [] == tree["pending"]
        # The PostgreSQL database is shared by the session: other tests' trees appear too.
        ours = [entry for entry in body["history"] if entry["tree"] == "bastion"]
        assert {"upgrade"} <= {entry["direction"] for entry in ours}
        assert all(entry["checksum"] for entry in ours)

    async def test_names_an_edited_applied_revision(self, tmp_path):
        """An applied revision whose file changed is listed under ``modified``."""
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
        app = make_app(
            f"sqlite+aiosqlite:///{tmp_path}/app.db",
            migrations={"mode": "auto", "app_tree": str(tree)},
        )
        async with lifespan_client(app) as client:
            assert [] == (await client.get("/admin/migrations")).json()["modified"]
            revision.write_text(revision.read_text() + "# edited after release\n")
            body = (await client.get("/admin/migrations")).json()
        assert ["app:a1"] == body["modified"]

    async def test_lists_pending_revisions(self, sqlite_url):
        """With start-up migrations off, the endpoint names the revisions still pending."""
        app = make_app(sqlite_url, migrations={"mode": "off"})
        async with lifespan_client(app) as client:
            body = (await client.get("/admin/migrations")).json()
        assert body["up_to_date"] is False
        assert ["0001", "0002", "0003", "0004", "0005"] == [
            rev[:4] for rev in body["trees"][0]["pending"]
        ]
        assert [] == body["history"]

    async def test_limit_bounds_the_history(self, sqlite_url):
        """``?limit=1`` returns only the newest history entry."""
        async with lifespan_client(make_app(sqlite_url)) as client:
            body = (await client.get("/admin/migrations", params={"limit": "1"})).json()
        assert 1 == len(body["history"])

    @pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1", "1e3", "\uff15"])
    async def test_bad_limit_is_a_validation_problem(self, sqlite_url, limit):
        """A limit outside 1-1000 is a 422 problem naming ``query.limit``."""
        async with lifespan_client(make_app(sqlite_url)) as client:
            response = await client.get("/admin/migrations", params={"limit": limit})
        assert 422 == response.status_code
        assert "application/problem+json" == response.headers["content-type"]
        assert ["query.limit"] == [error["field"] for error in response.json()["errors"]]

    async def test_absent_when_migrations_are_off(self, sqlite_url):
        """With the migrations component disabled there is no endpoint."""
        app = make_app(sqlite_url, migrations={"enabled": False})
        async with lifespan_client(app) as client:
            response = await client.get("/admin/migrations")
        assert 404 == response.status_code

    async def test_unreadable_database_is_a_503_problem(self):
        """A database that cannot be read gives a retryable 503 problem, not a 500."""
        unreachable = "postgresql+asyncpg://nobody@127.0.0.1:1/none"
        app = make_app(
            unreachable,
            migrations={"mode": "off"},
            database={"url": unreachable, "connect_timeout": 1},
        )
        async with lifespan_client(app) as client:
            response = await client.get("/admin/migrations")
        assert 503 == response.status_code
        assert "SERVICE_UNAVAILABLE" == response.json()["code"]
        assert "127.0.0.1" not in response.text


class TestAdminAccess:
    async def test_caller_outside_the_allowed_networks_is_forbidden(self, sqlite_url):
        """A peer outside ``http.admin_allowed_networks`` gets a 403 problem."""
        app = make_app(sqlite_url, http={"admin_allowed_networks": ["10.0.0.0/8"]})
        async with lifespan_client(app) as client:
            response = await client.get("/admin/migrations")
        assert 403 == response.status_code
        assert "FORBIDDEN" == response.json()["code"]

    @pytest.mark.parametrize(
        "authorization", [None, "Bearer wrong-token", "Basic c2VjcmV0", "Bearer "]
    )
    async def test_token_is_required_when_set(self, sqlite_url, authorization):
        """With ``http.admin_token`` set, a missing or wrong token is a 401 asking for Bearer."""
        app = make_app(sqlite_url, http={"admin_token": "s3cret-admin-token"})
        headers = {"Authorization": authorization} if authorization else {}
        async with lifespan_client(app) as client:
            response = await client.get("/admin/migrations", headers=headers)
        assert 401 == response.status_code
        assert "UNAUTHENTICATED" == response.json()["code"]
        assert response.headers["www-authenticate"].startswith("Bearer")
        assert "s3cret-admin-token" not in response.text

    async def test_right_token_is_admitted(self, sqlite_url):
        """The configured token, any case of the scheme, is admitted."""
        app = make_app(sqlite_url, http={"admin_token": "s3cret-admin-token"})
        async with lifespan_client(app) as client:
            response = await client.get(
                "/admin/migrations", headers={"Authorization": "bearer s3cret-admin-token"}
            )
        assert 200 == response.status_code
