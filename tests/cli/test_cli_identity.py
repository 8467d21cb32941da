"""bastion tenants create and bastion users create, against a migrated SQLite or PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import secrets
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import insert, select
from sqlalchemy.ext.asyncio import create_async_engine
from typer.testing import CliRunner

from bastion.cli import _register, app
from bastion.identity._tables import memberships, one_time_tokens, users

APP = ("--app", "tests.lifecycle.drain_app:create_app")


@pytest.fixture
def cli_stdin():
    """Run `bastion ARGS...` in this process with ``text`` on standard input."""
    _register()
    runner = CliRunner()

    def invoke(text: str, *args: str):
        return runner.invoke(app, list(args), input=text)

    return invoke


@pytest.fixture
def migrated(cli, monkeypatch, database_url, repo_root):
    """The environment of a migrated database with cheap password hashing."""
    monkeypatch.setenv("BASTION_DATABASE__URL", database_url)
    monkeypatch.setenv("BASTION_IDENTITY__PASSWORDS__TIME_COST", "1")
    monkeypatch.setenv("BASTION_IDENTITY__PASSWORDS__MEMORY_COST", "8")
    monkeypatch.setenv("BASTION_LOGGING__ENABLED", "false")
    monkeypatch.syspath_prepend(str(repo_root))
    result = cli("migrate", "upgrade", *APP)
    assert 0 == result.exit_code, result.stderr
    return database_url


def _read(database_url, statement):
    async def read():
        engine = create_async_engine(database_url)
        try:
            async with engine.connect() as connection:
                return (await connection.execute(statement)).all()
        finally:
            await engine.dispose()

    return asyncio.run(read())


def _slug(name: str) -> str:
    return f"{name}-{secrets.token_hex(3)}"


class TestTenantsCreate:
    def test_a_tenant_is_created_and_printed(self, cli, migrated):
        """--json prints the new tenant; a taken slug exits 1 naming it."""
        slug = _slug("acme")
        result = cli("tenants", "create", "Acme Inc", "--slug", slug, "--json", *APP)
        assert 0 == result.exit_code, result.stderr
        assert {"slug": slug, "name": "Acme Inc"}.items() <= json.loads(result.stdout).items()
        again = cli("tenants", "create", "Other", "--slug", slug, *APP)
        assert 1 == again.exit_code
        assert "taken" in again.stderr

    def test_the_slug_defaults_to_the_name(self, cli, migrated):
        """Without --slug the slug is made of the name."""
        name = _slug("Blue Sky")
        result = cli("tenants", "create", name, "--json", *APP)
        assert name.lower().replace(" ", "-") == json.loads(result.stdout)["slug"]


class TestUsersCreate:
    def test_the_first_owner_is_created_verified_with_a_hashed_password(
        self, cli, cli_stdin, migrated
    ):
        """The password comes from stdin, is hashed, and the user is verified and owner."""
        slug = _slug("first")
        cli("tenants", "create", "First", "--slug", slug, *APP)
        email = f"{_slug('admin')}@example.org"
        password = "correct horse battery staple 42"
        runner_result = cli_stdin(
            f"{password}\n",
            "users",
            "create",
            "--email",
            email.upper(),
            "--password-stdin",
            "--tenant",
            slug,
            "--role",
            "owner",
            "--json",
            *APP,
        )
        assert 0 == runner_result.exit_code, runner_result.stderr
        created = json.loads(runner_result.stdout)
        assert "owner" == created["role"]
        (row,) = _read(migrated, select(users).where(users.c.email == email))
        assert row.email_verified_at is not None
        assert row.password_hash.startswith("$argon2id$")
        assert password not in runner_result.stdout + runner_result.stderr
        (member,) = _read(
            migrated, select(memberships.c.role).where(memberships.c.user_id == row.id)
        )
        assert "owner" == member.role

    def test_refusals_exit_1_with_a_reason(self, cli, cli_stdin, migrated):
        """A weak password, an unknown tenant or role, or a taken address exit 1."""
        slug = _slug("second")
        cli("tenants", "create", "Second", "--slug", slug, *APP)
        email = f"{_slug('x')}@example.org"
        good = "an acceptable passphrase 9"

        def create(password, *extra):
            return cli_stdin(
                f"{password}\n",
                "users",
                "create",
                "--email",
                email,
                "--password-stdin",
                *extra,
                *APP,
            )

        weak = create("password", "--tenant", slug)
        unknown_tenant = create(good, "--tenant", "no-such-tenant")
        unknown_role = create(good, "--tenant", slug, "--role", "emperor")
        assert (1, 1, 1) == (weak.exit_code, unknown_tenant.exit_code, unknown_role.exit_code)
        assert "too_short" in weak.stderr or "at least" in weak.stderr
        assert 0 == create(good, "--tenant", slug).exit_code
        taken = create(good, "--tenant", slug)
        assert 1 == taken.exit_code
        assert "exists" in taken.stderr

    def test_the_password_is_never_an_argument(self, cli, migrated):
        """Without --password-stdin the command refuses (exit 2)."""
        result = cli("users", "create", "--email", "a@example.org", "--tenant", "t", *APP)
        assert 2 == result.exit_code
        assert "--password-stdin" in result.stderr


class TestIdentityPurge:
    def test_the_counts_of_deleted_rows_are_printed(self, cli, migrated):
        """A single-use token expired past identity.purge_after is deleted and counted."""
        expired = datetime.now(UTC) - timedelta(days=30)
        _write(
            migrated,
            insert(one_time_tokens).values(
                id=uuid.uuid4(),
                purpose="password_reset",
                subject=str(uuid.uuid4()),
                token_hash=secrets.token_bytes(32),
                tenant_id=None,
                data={},
                created_at=expired,
                expires_at=expired,
                used_at=None,
            ),
        )
        result = cli("identity", "purge", "--json", *APP)
        assert 0 == result.exit_code, result.stderr
        # The session's database is shared: other tests may have left spent rows too.
        counts = json.loads(result.stdout)
        assert {"one_time_tokens", "refresh_families", "refresh_tokens"} == set(counts)
        assert 1 <= counts["one_time_tokens"]
        again = cli("identity", "purge", *APP)
        assert 0 == again.exit_code, again.stderr
        assert "one_time_tokens: 0, refresh_families: 0, refresh_tokens: 0" == again.stdout.strip()


def _write(database_url, statement):
    async def write():
        engine = create_async_engine(database_url)
        try:
            async with engine.begin() as connection:
                await connection.execute(statement)
        finally:
            await engine.dispose()

    asyncio.run(write())
