"""`bastion config show`: the effective tree, secrets masked, invalid settings in one line."""

from __future__ import annotations

import json
import tomllib

from bastion.cli.config import render_toml

SECRET_URL = "postgresql+asyncpg://u:hunter2@h/db"
SHOWN_URL = "postgresql+asyncpg://u:***@h/db"


class TestConfigShow:
    def test_human_output_masks_only_the_password(self, cli, monkeypatch):
        """The database URL keeps its user, host and database; the password never shows."""
        monkeypatch.setenv("BASTION_DATABASE__URL", SECRET_URL)
        result = cli("config", "show")
        assert 0 == result.exit_code
        assert "hunter2" not in result.output
        assert f'url = "{SHOWN_URL}"' in result.stdout

    def test_json_output_masks_every_secret(self, cli, monkeypatch):
        """With --json, URLs lose their password and other secrets are masked whole."""
        monkeypatch.setenv("BASTION_DATABASE__URL", SECRET_URL + "?sslpassword=pw2")
        monkeypatch.setenv("BASTION_REDIS__URL", "redis://:redispw@cache:6379/0")
        monkeypatch.setenv("BASTION_HEALTH__TOKEN", "probe-token-123")
        result = cli("config", "show", "--json")
        tree = json.loads(result.stdout)

        assert 0 == result.exit_code
        assert SHOWN_URL + "?sslpassword=***" == tree["database"]["url"]
        assert "redis://***@cache:6379/0" == tree["redis"]["url"]
        assert "**********" == tree["health"]["token"]
        for secret in ("hunter2", "pw2", "redispw", "probe-token-123"):
            assert secret not in result.stdout

    def test_human_output_is_valid_toml_of_the_same_tree(self, cli):
        """The human form parses as TOML and says what the JSON says, unset values aside."""
        human = tomllib.loads(cli("config", "show").stdout)
        tree = json.loads(cli("config", "show", "--json").stdout)

        def without_unset(value):
            # TOML has no null: unset values are left out, at any depth (identity.tokens...).
            if isinstance(value, dict):
                return {k: without_unset(v) for k, v in value.items() if v is not None}
            return value

        assert without_unset(tree) == human

    def test_environment_overrides_are_shown(self, cli, monkeypatch):
        """A BASTION_ variable is reflected in the effective tree."""
        monkeypatch.setenv("BASTION_SERVER__WORKERS", "3")
        assert 3 == json.loads(cli("config", "show", "--json").stdout)["server"]["workers"]

    def test_invalid_setting_is_one_line_and_exit_2(self, cli, monkeypatch):
        """An invalid value stops with one line naming the variable, and no traceback."""
        monkeypatch.setenv("BASTION_SERVER__PORT", "not-a-port")
        result = cli("config", "show")
        assert 2 == result.exit_code
        assert "" == result.stdout
        assert [
            "bastion: invalid setting BASTION_SERVER__PORT: Input should be a valid integer, "
            "unable to parse string as an integer"
        ] == result.stderr.splitlines()


class TestRenderToml:
    def test_unset_values_become_comments_and_nested_tables_get_dotted_headers(self):
        """None is a comment; a nested mapping is a [parent.child] table."""
        rendered = render_toml({"top": True, "a": {"x": None, "b": {"y": [1, "z"]}}})
        assert 'top = true\n\n[a]\n# x is unset\n\n[a.b]\ny = [1, "z"]\n' == rendered
