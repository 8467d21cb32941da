"""``bastion migrate`` through typer's CliRunner, against a small app with a host tree."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from migration_support import (
    BASTION_APPLIED,
    BASTION_REVISIONS,
    GADGETS,
    WIDGETS,
    Revision,
    execute,
    history_rows,
    table_names,
    version_rows,
    with_database,
)
from typer.testing import CliRunner

import bastion.cli.migrate  # noqa: F401 -- registers the command group
from bastion.cli import app

APP = "migrate_cli_app:create_app"
DROP_GADGETS: Revision = (
    "a3",
    "a2",
    'op.drop_table("gadgets")',
    'op.create_table("gadgets", sa.Column("id", sa.Integer, primary_key=True))',
    "Drop gadgets.",
)


def edit(path: Path) -> None:
    path.write_text(path.read_text() + "\n# edited after release\n")


@pytest.fixture
def tree_dir(make_tree):
    return make_tree(WIDGETS, GADGETS)


@pytest.fixture
def cli(db_url, tree_dir, monkeypatch):
    """Invoke ``bastion migrate ...`` for the test app on this test's database."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    monkeypatch.setenv("BASTION_DATABASE__URL", db_url)
    monkeypatch.setenv("BASTION_MIGRATIONS__APP_TREE", str(tree_dir))
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
        assert [*BASTION_APPLIED, ("app", "a1"), ("app", "a2")] == applied
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

        # Log lines share stderr (JSON objects here); the error is the one other line.
        errors = [line for line in result.stderr.splitlines() if not line.startswith("{")]
        assert 2 == result.exit_code
        assert ["bastion: revision 'zzz' is in no tree; name the tree (--tree)"] == errors


class TestUpgradeSafety:
    def test_records_history_with_the_command_as_tool(self, cli, db_url):
        """Revisions applied by the command are recorded with tool ``bastion migrate upgrade``."""
        cli("upgrade")

        rows = with_database(db_url, history_rows)
        assert {"bastion migrate upgrade"} == {row["tool"] for row in rows}

    def test_refuses_when_an_applied_revision_was_modified(self, cli, tree_dir):
        """upgrade exits 2 naming the edited revision and pointing at verify."""
        cli("upgrade", "a1")
        edit(tree_dir / "versions" / "a1.py")

        result = cli("upgrade")

        assert 2 == result.exit_code
        assert "app:a1" in result.stderr
        assert "bastion migrate verify" in result.stderr

    def test_destructive_revision_needs_the_flag(self, cli, make_tree, monkeypatch, db_url):
        """A revision dropping a table is refused without --allow-destructive, applied with it."""
        tree = make_tree(WIDGETS, GADGETS, DROP_GADGETS, name="dropping")
        monkeypatch.setenv("BASTION_MIGRATIONS__APP_TREE", str(tree))

        refused = cli("upgrade")
        allowed = cli("upgrade", "--allow-destructive")

        assert (2, 0) == (refused.exit_code, allowed.exit_code), allowed.output
        assert "gadgets" in refused.stderr
        assert ["a3"] == with_database(db_url, lambda db: version_rows(db, "app_version"))


class TestDowngrade:
    def test_dropping_downgrade_needs_the_flag(self, cli, db_url):
        """A downgrade that drops a table is refused without --allow-destructive."""
        cli("upgrade")

        result = cli("downgrade", "app", "a1")

        assert 2 == result.exit_code
        assert ["a2"] == with_database(db_url, lambda db: version_rows(db, "app_version"))

    def test_records_a_downgrade_row(self, cli, db_url):
        """A downgrade by the command adds a downgrade history row with its tool."""
        cli("upgrade")

        cli("downgrade", "app", "a1", "--allow-destructive")

        last = with_database(db_url, history_rows)[-1]
        assert ("a2", "downgrade", "bastion migrate downgrade") == (
            last["revision"],
            last["direction"],
            last["tool"],
        )

    def test_relative_target_needs_no_separator(self, cli, db_url):
        """``downgrade app -1`` reverts one revision: -1 is a target, not an option."""
        cli("upgrade")

        result = cli("downgrade", "app", "-1", "--allow-destructive")

        assert 0 == result.exit_code, result.output
        assert ["a1"] == with_database(db_url, lambda db: version_rows(db, "app_version"))

    def test_reverts_one_tree(self, cli, db_url):
        """downgrade TREE REVISION reverts that tree only."""
        cli("upgrade")

        result = cli("downgrade", "app", "a1", "--json", "--allow-destructive")

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
        assert [*BASTION_APPLIED, ("app", "a1"), ("app", "a2")] == revisions

    def test_json_says_when_by_whom_and_whether_the_file_matches(self, cli, tree_dir):
        """Each revision carries its checksum state and the run that applied it, if any."""
        cli("upgrade", "a1")
        edit(tree_dir / "versions" / "a1.py")

        result = cli("history", "app", "--json")

        rows = {row["id"]: row for row in json.loads(result.stdout)["revisions"]}
        assert ("modified", "pending") == (rows["a1"]["state"], rows["a2"]["state"])
        applied = rows["a1"]["applied"]
        assert ("upgrade", "bastion migrate upgrade") == (applied["direction"], applied["tool"])
        assert "pid" in applied["applied_by"]
        assert applied["applied_at"].endswith("+00:00")
        assert None is rows["a2"]["applied"]

    def test_table_shows_applied_revisions(self, cli):
        """The table shows who applied a revision, with which tool, and its checksum state."""
        cli("upgrade")

        result = cli("history", "app")

        line = next(line for line in result.stdout.splitlines() if " a1 " in line)
        assert "bastion migrate upgrade" in line
        assert " ok " in line

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


class TestVerify:
    def test_exits_0_when_nothing_was_modified(self, cli):
        """verify exits 0 and lists each applied revision as ok."""
        cli("upgrade")

        result = cli("verify")

        assert 0 == result.exit_code, result.output
        assert "No applied revision was modified." in result.stdout

    def test_exits_1_naming_the_modified_revision(self, cli, tree_dir):
        """An edited applied revision makes verify exit 1 and name it."""
        cli("upgrade")
        edit(tree_dir / "versions" / "a1.py")

        result = cli("verify")

        assert 1 == result.exit_code
        assert "Modified since applied: app:a1." in result.stdout

    def test_json(self, cli, tree_dir):
        """--json gives ok and every applied revision with both checksums."""
        cli("upgrade")
        edit(tree_dir / "versions" / "a2.py")

        result = cli("verify", "--json")

        payload = json.loads(result.stdout)
        states = {row["revision"]: row["state"] for row in payload["revisions"]}
        assert (1, False) == (result.exit_code, payload["ok"])
        assert {**dict.fromkeys(BASTION_REVISIONS, "ok"), "a1": "ok", "a2": "modified"} == states

    def test_accept_clears_the_modification_and_records_it(self, cli, tree_dir, db_url):
        """--accept REV records an accept row; verify then exits 0 and upgrade runs again."""
        cli("upgrade", "a1")
        edit(tree_dir / "versions" / "a1.py")

        result = cli("verify", "--accept", "a1")

        assert 0 == result.exit_code, result.output
        assert "Accepted the current checksum of app:a1." in result.stdout
        last = with_database(db_url, history_rows)[-1]
        assert ("a1", "accept", "bastion migrate verify --accept") == (
            last["revision"],
            last["direction"],
            last["tool"],
        )
        assert 0 == cli("upgrade").exit_code

    def test_accept_with_tree_prefix_and_repeated(self, cli, tree_dir):
        """--accept takes TREE:REV and can be repeated."""
        cli("upgrade")
        edit(tree_dir / "versions" / "a1.py")
        edit(tree_dir / "versions" / "a2.py")

        result = cli("verify", "--accept", "app:a1", "--accept", "a2", "--json")

        accepted = [row["revision"] for row in json.loads(result.stdout)["accepted"]]
        assert (0, ["a1", "a2"]) == (result.exit_code, accepted)

    def test_unrecorded_revisions_do_not_fail(self, cli, db_url):
        """Revisions applied with no history row are listed, and verify still exits 0."""
        cli("upgrade")
        with_database(db_url, lambda db: execute(db, "DELETE FROM bastion_migration_history"))

        result = cli("verify")

        assert 0 == result.exit_code, result.output
        assert (
            f"{len(BASTION_REVISIONS) + 2} revision(s) applied with no history row" in result.stdout
        )

    def test_accept_of_a_revision_in_no_tree_exits_2(self, cli):
        """An --accept naming no known revision is a one-line error, exit status 2."""
        cli("upgrade")

        result = cli("verify", "--accept", "zzz")

        assert 2 == result.exit_code
        assert "'zzz' is in no tree" in result.stderr
