"""``bastion flags``: list, get, set, toggle, import, export and evaluate on a SQLite file."""

from __future__ import annotations

import json
import re
import secrets
import sqlite3
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bastion.cli import _register, app

APP = ("--app", "tests.lifecycle.drain_app:create_app")
REPO = Path(__file__).resolve().parents[2]

FLAG = {
    "enabled": True,
    "rules": [
        {
            "id": "acme",
            "constraints": [{"context": "tenantId", "operator": "IN", "values": ["acme"]}],
        }
    ],
}


@pytest.fixture
def cli():
    """Run `bastion ARGS...` in this process; stdout and stderr apart."""
    _register()
    runner = CliRunner()

    def invoke(*args: str, input: str | None = None):
        return runner.invoke(app, list(args), input=input)

    return invoke


@pytest.fixture
def migrated(cli, monkeypatch, sqlite_url, tmp_path):
    """A migrated SQLite file the drain app's settings point at."""
    monkeypatch.setenv("BASTION_DATABASE__URL", sqlite_url)
    monkeypatch.setenv("BASTION_LOGGING__ENABLED", "false")
    monkeypatch.setenv("BASTION_FLAGS__STORE_URL", "memory://")
    monkeypatch.syspath_prepend(str(REPO))
    monkeypatch.chdir(tmp_path)  # development secrets land under ./var
    result = cli("migrate", "upgrade", *APP)
    assert 0 == result.exit_code, result.stderr
    return sqlite_url


def key() -> str:
    return f"cli-{secrets.token_hex(3)}"


def flags(cli, *args: str, input: str | None = None):
    return cli("flags", *args, *APP, input=input)


class TestWrite:
    def test_set_creates_then_get_and_list_show_it(self, cli, migrated):
        """``set --data`` creates version 1 by the CLI; get prints it, list names it."""
        name = key()
        result = flags(cli, "set", name, "--data", json.dumps(FLAG))
        assert 0 == result.exit_code, result.stderr
        assert f"created {name} (version 1)" in result.stdout
        shown = json.loads(flags(cli, "get", name).stdout)
        assert (name, 1) == (shown["flag"]["key"], shown["version"])
        assert shown["updated_by"].startswith("system:cli")
        listed = json.loads(flags(cli, "list", "--json").stdout)
        assert [name] == [item["flag"]["key"] for item in listed]
        table = flags(cli, "list")
        assert 0 == table.exit_code, table.stderr
        assert name in table.stdout

    def test_set_replaces_unconditionally_and_says_so(self, cli, migrated):
        """Without --if-version an existing flag is replaced, with a warning on stderr."""
        name = key()
        flags(cli, "set", name, "--data", json.dumps(FLAG))
        result = flags(cli, "set", name, "--data", json.dumps({**FLAG, "description": "v2"}))
        assert 0 == result.exit_code, result.stderr
        assert "without a version check" in result.stderr
        assert "v2" == json.loads(flags(cli, "get", name).stdout)["flag"]["description"]

    def test_if_version_refuses_a_stale_write(self, cli, migrated):
        """--if-version N with the flag at another version exits 1 and changes nothing."""
        name = key()
        flags(cli, "set", name, "--data", json.dumps(FLAG))
        flags(cli, "toggle", name, "off")
        stale = flags(cli, "set", name, "--data", json.dumps(FLAG), "--if-version", "1")
        assert 1 == stale.exit_code
        assert "version 2" in stale.stderr
        current = flags(cli, "set", name, "--data", json.dumps(FLAG), "--if-version", "2")
        assert 0 == current.exit_code, current.stderr

    def test_set_from_a_yaml_file(self, cli, migrated, tmp_path):
        """--file reads YAML (the key may be left out: the argument names it)."""
        name = key()
        path = tmp_path / "flag.yaml"
        path.write_text("enabled: true\ndescription: from yaml\nclient_visible: true\n")
        result = flags(cli, "set", name, "--file", str(path))
        assert 0 == result.exit_code, result.stderr
        shown = json.loads(flags(cli, "get", name).stdout)["flag"]
        assert ("from yaml", True) == (shown["description"], shown["client_visible"])

    def test_toggle_switches_and_unknown_flag_exits_1(self, cli, migrated):
        """toggle on/off changes the kill switch; a missing flag is one line, exit 1."""
        name = key()
        flags(cli, "set", name, "--data", json.dumps(FLAG))
        off = flags(cli, "toggle", name, "off")
        assert (0, f"{name} is off (version 2)\n") == (off.exit_code, off.stdout)
        assert False is json.loads(flags(cli, "get", name).stdout)["flag"]["enabled"]
        missing = flags(cli, "toggle", key(), "on")
        assert 1 == missing.exit_code
        # After development start-up's warnings, one line says why.
        assert missing.stderr.strip().splitlines()[-1].startswith("bastion: No feature flag")
        assert 2 == flags(cli, "toggle", name, "maybe").exit_code

    def test_invalid_flag_exits_1_naming_the_field(self, cli, migrated):
        """A flag the model refuses is one line naming the field; nothing is stored."""
        name = key()
        result = flags(cli, "set", name, "--data", json.dumps({"type": "string"}))
        assert 1 == result.exit_code
        assert "invalid flag" in result.stderr
        assert 1 == flags(cli, "get", name).exit_code
        assert 2 == flags(cli, "set", name).exit_code  # neither --file nor --data


class TestImportExport:
    def test_bastion_yaml_import_and_json_export(self, cli, migrated, tmp_path):
        """A bastion YAML document imports; the export lists the same flags and segments."""
        path = tmp_path / "flags.yaml"
        path.write_text(
            "flags:\n"
            "  - key: one\n    enabled: true\n    rules: [{segments: [staff]}]\n"
            "  - key: two\n"
            "segments:\n"
            "  - name: staff\n"
            "    constraints: [{context: roles, operator: IN, values: [admin]}]\n"
        )
        result = flags(cli, "import", str(path))
        assert 0 == result.exit_code, result.stderr
        assert "created 2" in result.stdout
        exported = json.loads(flags(cli, "export").stdout)
        assert ["one", "two"] == [flag["key"] for flag in exported["flags"]]
        assert ["staff"] == [segment["name"] for segment in exported["segments"]]

    def test_unleash_round_trip_and_replace(self, cli, migrated, tmp_path):
        """Exported as Unleash to a file and imported with --replace, the set is that file's."""
        flags(cli, "set", "kept", "--data", json.dumps(FLAG))
        output = tmp_path / "state.json"
        result = flags(cli, "export", "--format", "unleash", "--output", str(output))
        assert 0 == result.exit_code, result.stderr
        state = json.loads(output.read_text())
        assert ["kept"] == [feature["name"] for feature in state["features"]]
        flags(cli, "set", "extra", "--data", json.dumps(FLAG))
        replaced = flags(cli, "import", str(output), "--replace", "--json")
        assert 0 == replaced.exit_code, replaced.stderr
        assert 1 == json.loads(replaced.stdout)["deleted"]
        assert ["kept"] == [
            item["flag"]["key"] for item in json.loads(flags(cli, "list", "--json").stdout)
        ]

    def test_bad_files_exit_1(self, cli, migrated, tmp_path):
        """A file that is not JSON or YAML, or holds neither format, exits 1 with a reason."""
        garbage = tmp_path / "bad.json"
        garbage.write_text("{nope")
        neither = tmp_path / "neither.json"
        neither.write_text('{"something": []}')
        assert 1 == flags(cli, "import", str(garbage)).exit_code
        result = flags(cli, "import", str(neither))
        assert 1 == result.exit_code
        assert "flags" in result.stderr
        assert 1 == flags(cli, "import", str(tmp_path / "absent.json")).exit_code


class TestEvaluate:
    def test_evaluate_prints_value_reason_rule_and_steps(self, cli, migrated):
        """The answer for a context, the rule that matched and the explanation."""
        name = key()
        flags(cli, "set", name, "--data", json.dumps(FLAG))
        result = flags(cli, "evaluate", name, "--context", '{"tenant_id": "acme"}')
        assert 0 == result.exit_code, result.stderr
        lines = result.stdout.splitlines()
        assert "value: true" in lines
        assert 'reason: "TARGETING_MATCH"' in lines
        assert 'rule: "acme"' in lines
        assert "explanation:" in lines
        as_json = json.loads(
            flags(cli, "evaluate", name, "--context", '{"tenantId": "zeta"}', "--json").stdout
        )
        assert (False, "DEFAULT") == (
            as_json["evaluation"]["value"],
            as_json["evaluation"]["reason"],
        )

    def test_evaluate_refusals(self, cli, migrated):
        """An unknown flag or a malformed context exits 1."""
        name = key()
        flags(cli, "set", name, "--data", json.dumps(FLAG))
        assert 1 == flags(cli, "evaluate", key()).exit_code
        assert 1 == flags(cli, "evaluate", name, "--context", "[1]").exit_code
        assert 1 == flags(cli, "evaluate", name, "--context", '{"roles": 1}').exit_code


class TestConfiguration:
    def test_flags_off_exits_2(self, cli, migrated, monkeypatch):
        """With flags switched off the command says so and exits 2."""
        monkeypatch.setenv("BASTION_FLAGS__ENABLED", "false")
        result = flags(cli, "list")
        assert 2 == result.exit_code
        assert "flags" in result.stderr


class TestConsistency:
    def test_help_names_flags_and_shows_no_markup(self, cli):
        """``--app`` speaks of flags, and help never shows reStructuredText backticks."""
        _register()
        for verb in ("list", "get", "set", "toggle", "import", "export", "evaluate"):
            # Rich wraps and boxes the help: compare its words.
            shown = " ".join(re.sub("[│╭╮╰╯─]", " ", cli("flags", verb, "--help").stdout).split())
            assert "whose flags to use" in shown, verb
            assert "identity" not in shown, verb
            assert "``" not in shown, verb

    def test_json_prints_the_result_for_every_verb(self, cli, migrated):
        """``--json`` means "print the result as JSON" for set and toggle too; --data is input."""
        name = key()
        created = json.loads(flags(cli, "set", name, "--data", json.dumps(FLAG), "--json").stdout)
        toggled = json.loads(flags(cli, "toggle", name, "off", "--json").stdout)
        assert (1, True) == (created["version"], created["flag"]["enabled"])
        assert (2, False) == (toggled["version"], toggled["flag"]["enabled"])


class TestConditionalImport:
    def test_if_revision_refuses_an_import_over_newer_changes(self, cli, migrated, tmp_path):
        """``import --if-revision N`` exits 1 when the set moved since the export at N."""
        flags(cli, "set", key(), "--data", json.dumps(FLAG))
        output = tmp_path / "set.json"
        exported = flags(cli, "export", "--output", str(output))
        assert 0 == exported.exit_code, exported.stderr
        revision = exported.stderr.rsplit("revision ", 1)[1].rstrip(")\n")
        current = flags(cli, "import", str(output), "--if-revision", revision)
        assert 0 == current.exit_code, current.stderr
        flags(cli, "set", key(), "--data", json.dumps(FLAG))
        stale = flags(cli, "import", str(output), "--if-revision", revision)
        assert 1 == stale.exit_code

    def test_unleash_merge_keeps_bastion_fields(self, cli, migrated, tmp_path):
        """Merging an Unleash state leaves the tags and visibility bastion keeps of its own."""
        name = key()
        flags(
            cli,
            "set",
            name,
            "--data",
            json.dumps({**FLAG, "tags": ["checkout"], "client_visible": True}),
        )
        output = tmp_path / "state.json"
        assert 0 == flags(cli, "export", "--format", "unleash", "-o", str(output)).exit_code
        state = json.loads(output.read_text())
        state["features"][0]["enabled"] = False
        output.write_text(json.dumps(state))
        result = flags(cli, "import", str(output))
        assert 0 == result.exit_code, result.stderr
        stored = json.loads(flags(cli, "get", name).stdout)["flag"]
        assert (False, ["checkout"], True) == (
            stored["enabled"],
            stored["tags"],
            stored["client_visible"],
        )


def audit_details(database_url: str, action: str, key: str) -> list[dict]:
    """The details of the audit entries of ``action`` on flag ``key``, oldest first."""
    path = database_url.removeprefix("sqlite+aiosqlite:///")
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT actor_type, actor_id, details FROM bastion_audit_entries"
            " WHERE action = ? AND resource_id = ? ORDER BY seq",
            (action, key),
        ).fetchall()
    return [{"actor": f"{kind}:{ident}", **json.loads(details)} for kind, ident, details in rows]


class TestOperator:
    def test_operator_is_recorded_as_claimed_on_every_write(self, cli, migrated, tmp_path):
        """``--operator`` names the operator in the audit details and the change's who."""
        name = key()
        created = flags(cli, "set", name, "--data", json.dumps(FLAG), "--operator", "alice")
        assert 0 == created.exit_code, created.stderr
        toggled = flags(cli, "toggle", name, "off", "--operator", " bob ")
        assert 0 == toggled.exit_code, toggled.stderr
        path = tmp_path / "flags.yaml"
        path.write_text(f"flags:\n  - key: {name}\n    enabled: true\n")
        imported = flags(cli, "import", str(path), "--operator", "carol")
        assert 0 == imported.exit_code, imported.stderr

        assert (
            "system:cli (claimed: carol)"
            == json.loads(flags(cli, "get", name).stdout)["updated_by"]
        )
        assert [
            ("flag.create", "system:cli", "alice"),
            ("flag.toggle", "system:cli", "bob"),
            ("flag.update", "system:cli", "carol"),
        ] == [
            (action, row["actor"], row["operator"])
            for action in ("flag.create", "flag.toggle", "flag.update")
            for row in audit_details(migrated, action, name)
        ]

    def test_default_is_the_os_user(self, cli, migrated, monkeypatch):
        """Without --operator the OS user's name is recorded, as claimed."""
        monkeypatch.setenv("LOGNAME", "dana")
        name = key()
        assert 0 == flags(cli, "set", name, "--data", json.dumps(FLAG)).exit_code
        shown = json.loads(flags(cli, "get", name).stdout)
        assert "system:cli (claimed: dana)" == shown["updated_by"]
        assert ["dana"] == [row["operator"] for row in audit_details(migrated, "flag.create", name)]

    def test_unprintable_os_user_is_left_out(self, cli, migrated, monkeypatch):
        """An OS user name that is no name is not recorded; the write still happens."""
        for variable in ("LOGNAME", "USER", "LNAME", "USERNAME"):
            monkeypatch.setenv(variable, "two\nlines")
        name = key()
        assert 0 == flags(cli, "set", name, "--data", json.dumps(FLAG)).exit_code
        assert "system:cli" == json.loads(flags(cli, "get", name).stdout)["updated_by"]
        assert [{"actor": "system:cli", "version": 1}] == audit_details(
            migrated, "flag.create", name
        )

    def test_bad_operator_exits_2_and_writes_nothing(self, cli, migrated):
        """An --operator that is empty, multi-line or too long is refused before any write."""
        name = key()
        for bad in ("", "a\nb", "x" * 129):
            result = flags(cli, "set", name, "--data", json.dumps(FLAG), "--operator", bad)
            assert 2 == result.exit_code, bad
            assert "--operator" in result.stderr
        assert 1 == flags(cli, "get", name).exit_code
