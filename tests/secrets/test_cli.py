"""`bastion secrets check`: one line per problem, exit codes 0/1/2, never a value."""

from __future__ import annotations

import base64
import json
import secrets
from collections.abc import Callable

import pytest
from click.testing import Result
from typer.testing import CliRunner

from bastion.cli import _register, app

PEPPER = "BASTION_IDENTITY__PASSWORDS__PEPPER"


@pytest.fixture
def cli() -> Callable[..., Result]:
    """Run `bastion ARGS...` in this process; stdout and stderr kept apart."""
    _register()
    runner = CliRunner()
    return lambda *args: runner.invoke(app, list(args))


class TestSecretsCheck:
    def test_clean_development_configuration_exits_zero(self, cli):
        """Nothing set in development: nothing to fix (the pepper is generated at start-up)."""
        result = cli("secrets", "check")
        assert 0 == result.exit_code
        assert "ok" in result.stdout

    def test_weak_key_exits_one_naming_the_variable_not_the_value(self, cli, monkeypatch):
        """A weak pepper is one line naming the variable; the value never shows."""
        monkeypatch.setenv(PEPPER, "Tr0ub4dor&3")
        result = cli("secrets", "check")
        assert 1 == result.exit_code
        assert 1 == len(result.stdout.splitlines())
        assert PEPPER in result.stdout
        assert "Tr0ub4dor&3" not in result.output

    def test_weak_hs256_signing_key_exits_one(self, cli, monkeypatch):
        """An HS256 key of 128 random bits is refused: HS256 needs 256; the key never shows."""
        k = base64.urlsafe_b64encode(secrets.token_bytes(16)).rstrip(b"=").decode()
        jwks = json.dumps({"keys": [{"kty": "oct", "kid": "hs", "alg": "HS256", "k": k}]})
        monkeypatch.setenv("BASTION_IDENTITY__TOKENS__SIGNING_KEYS", jwks)
        result = cli("secrets", "check")
        assert 1 == result.exit_code
        [line] = result.stdout.splitlines()
        assert "weak: BASTION_IDENTITY__TOKENS__SIGNING_KEYS" in line
        assert k not in result.output

    def test_production_missing_secrets_one_line_each(self, cli, monkeypatch):
        """In production each missing required secret is an error line."""
        monkeypatch.setenv("BASTION_ENVIRONMENT", "production")
        result = cli("secrets", "check")
        lines = result.stdout.splitlines()
        assert 1 == result.exit_code
        assert 4 == len(lines)
        assert all(line.startswith("error missing: BASTION_") for line in lines)
        assert "error missing: BASTION_AUDIT__ENCRYPTION_KEY" in {
            " ".join(line.split()[:3]) for line in lines
        }

    def test_json_output(self, cli, monkeypatch):
        """--json lists problems with variable, problem, message and fatal; no value."""
        monkeypatch.setenv("BASTION_ENVIRONMENT", "production")
        monkeypatch.setenv(PEPPER, "changeme")
        monkeypatch.setenv("BASTION_IDENTITY__TOKENS__SIGNING_KEYS", "not-json-keys")
        result = cli("secrets", "check", "--json")
        document = json.loads(result.stdout)
        assert 1 == result.exit_code
        assert {"environment", "ok", "problems"} == set(document)
        assert [
            (PEPPER, "placeholder", True),
            ("BASTION_IDENTITY__TOKENS__SIGNING_KEYS", "invalid", True),
            ("BASTION_IDENTITY__API_KEYS__SECRET", "missing", True),
            ("BASTION_AUDIT__ENCRYPTION_KEY", "missing", True),
        ] == [(p["variable"], p["problem"], p["fatal"]) for p in document["problems"]]
        assert "changeme" not in result.stdout.replace("placeholder", "")
        assert "not-json-keys" not in result.stdout

    def test_strong_production_secrets_exit_zero(self, cli, monkeypatch, tmp_path):
        """Strong secrets from a file source pass in production."""
        path = tmp_path / "pepper"
        path.write_text(secrets.token_urlsafe(48) + "\n")
        monkeypatch.setenv("BASTION_ENVIRONMENT", "production")
        monkeypatch.setenv(PEPPER + "_FILE", str(path))
        monkeypatch.setenv("BASTION_IDENTITY__ENABLED", "false")
        monkeypatch.setenv("BASTION_AUDIT__ENCRYPTION_KEY", secrets.token_urlsafe(48))
        assert 0 == cli("secrets", "check").exit_code

    def test_unloadable_configuration_exits_two(self, cli, monkeypatch):
        """An unreachable OpenBao is exit 2 with one line on stderr naming the URL, no token."""
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TOKEN", "tok-abcdef")
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TIMEOUT", "1")
        result = cli("secrets", "check")
        assert 2 == result.exit_code
        assert "http://127.0.0.1:9" in result.stderr
        assert "tok-abcdef" not in result.output
