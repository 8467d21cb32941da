"""``bastion migrate`` through typer's CliRunner, against a small app with a host tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from migration_support import GADGETS, WIDGETS, table_names, version_rows, with_database
from typer.testing import CliRunner

import bastion.cli.migrate  # noqa: F401 -- registers the command group
from bastion.cli import app

APP = "migrate_cli_app:create_app"


@pytest.fixture
def cli(db_url, make_tree, monkeypatch):
    """Invoke ``bastion migrate ...`` for the test app on this test's database."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("BASTION_DATABASE__URL", db_url)
    monkeypatch.setenv("BASTION_MIGRATIONS__APP_TREE", str(make_tree(WIDGETS, GADGETS)))
    monkeypatch.setenv("BASTION_MIGRATIONS__APP_VERSION_TABLE", "app_version")
    monkeypatch.setenv("BASTION_MIGRATIONS__MODE", "check")
    monkeypatch.setenv("BASTION_LOGGING__FORMAT", "json")
    runner = CliRunner()

    def invoke(*args: str):
        return runner.invoke(app, ["migrate", *args, "--app", APP])

    return invoke


class TestStatus:
    def test_exits_1_and_names_pending_revisions(self, cli):
        """With revisions pending, status lists them and exits 1."""
        result = cli("status")

        assert 1 == result.exit_code
        assert "0001_baseline" in result.stdout
        assert "a1, a2" in result.stdout

    def test_exits_0_when_up_to_date(self, cli):
        """After an upgrade, status exits 0."""
        cli("upgrade")

        result = cli("status")

        assert 0 == result.exit_code, result.output
        assert "Up to date." in result.stdout

    def test_json(self, cli):
        """--json prints every tree's state as one JSON document."""
        result = cli("status", "--json")

        payload = json.loads(result.stdout)
        assert 1 == result.exit_code
        assert False is payload["up_to_date"]
        assert ["bastion", "app"] == [tree["name"] for tree in payload["trees"]]
        assert ["a1", "a2"] == payload["trees"][1]["pending"]

    def test_app_defaults_to_server_app(self, cli, monkeypatch):
        """Without --app, the app named by server.app is used."""
        monkeypatch.setenv("BASTION_SERVER__APP", APP)

        result = CliRunner().invoke(app, ["migrate", "status", "--json"])

        assert ["bastion", "app"] == [tree["name"] for tree in json.loads(result.stdout)["trees"]]


class TestUpgrade:
    def test_applies_both_trees(self, cli, db_url):
        """upgrade applies bastion's tree, then the app's, and reports each revision."""
        result = cli("upgrade", "--json")

        applied = [
            (step["tree"], step["revision"]) for step in json.loads(result.stdout)["applied"]
        ]
        assert 0 == result.exit_code, result.output
        assert [("bastion", "0001_baseline"), ("app", "a1"), ("app", "a2")] == applied
        assert ["a2"] == with_database(db_url, lambda db: version_rows(db, "app_version"))

    def test_table_output(self, cli):
        """Without --json the applied revisions are a table."""
        result = cli("upgrade", "a1")

        assert 0 == result.exit_code, result.output
        assert "a1" in result.stdout
        assert "a2" not in result.stdout

    def test_nothing_to_apply(self, cli):
        """A second upgrade says there was nothing to apply."""
        cli("upgrade")

        result = cli("upgrade")

        assert 0 == result.exit_code, result.output
        assert "Nothing to apply" in result.stdout

    def test_logs_go_to_stderr(self, cli):
        """Standard output carries only the command's output; logs are on stderr."""
        result = cli("upgrade", "--json")

        assert "migration applied" in result.stderr
        assert "migration applied" not in result.stdout

    def test_sql_prints_sql_and_touches_nothing(self, cli, db_url):
        """--sql prints the statements and creates no table."""
        result = cli("upgrade", "--sql")

        assert 0 == result.exit_code, result.output
        assert "CREATE TABLE widgets" in result.stdout
        assert [] == with_database(db_url, table_names)

    def test_unknown_revision_exits_2_with_one_line(self, cli):
        """A MigrationError is one line on stderr and exit status 2."""
        result = cli("upgrade", "zzz")

        assert 2 == result.exit_code
        assert ["bastion: revision 'zzz' is in no tree; name the tree (--tree)"] == (
            result.stderr.splitlines()
        )


class TestDowngrade:
    def test_reverts_one_tree(self, cli, db_url):
        """downgrade TREE REVISION reverts that tree only."""
        cli("upgrade")

        result = cli("downgrade", "app", "a1", "--json")

        reverted = [step["revision"] for step in json.loads(result.stdout)["applied"]]
        assert 0 == result.exit_code, result.output
        assert ["a2"] == reverted
        assert ["a1"] == with_database(db_url, lambda db: version_rows(db, "app_version"))

    def test_sql_touches_nothing(self, cli, db_url):
        """downgrade --sql prints the DROP and leaves the table in place."""
        cli("upgrade")

        result = cli("downgrade", "app", "base", "--sql")

        assert 0 == result.exit_code, result.output
        assert "DROP TABLE gadgets" in result.stdout
        assert ["a2"] == with_database(db_url, lambda db: version_rows(db, "app_version"))

    def test_unknown_tree_exits_2(self, cli):
        """An unknown tree is named on stderr with exit status 2."""
        result = cli("downgrade", "nope", "base")

        assert 2 == result.exit_code
        assert "no migration tree named 'nope'" in result.stderr


class TestHistory:
    def test_lists_every_tree(self, cli):
        """history lists each tree's revisions, oldest first."""
        result = cli("history", "--json")

        revisions = [(row["tree"], row["id"]) for row in json.loads(result.stdout)["revisions"]]
        assert 0 == result.exit_code, result.output
        assert [("bastion", "0001_baseline"), ("app", "a1"), ("app", "a2")] == revisions

    def test_one_tree_as_a_table(self, cli):
        """history TREE prints that tree's revisions with their messages."""
        result = cli("history", "app")

        assert 0 == result.exit_code, result.output
        assert "Create gadgets." in result.stdout
        assert "0001_baseline" not in result.stdout


class TestAppLoading:
    def test_app_without_bastion_exits_2(self, cli):
        """An app with no bastion installed is a one-line error, exit status 2."""
        result = CliRunner().invoke(
            app, ["migrate", "status", "--app", "migrate_cli_app:create_bare_app"]
        )

        assert 2 == result.exit_code
        assert "has no bastion installed" in result.stderr
