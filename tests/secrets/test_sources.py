"""Secret sources: environment, a directory of files, ``*_FILE`` variables, OpenBao; precedence."""

from __future__ import annotations

import socket
import time

import pytest

from bastion.errors import ConfigurationError
from bastion.settings import Settings, load_settings

TOKEN = "BASTION_HEALTH__TOKEN"


def health_token(settings: Settings) -> str | None:
    token = settings.health.token
    return None if token is None else token.get_secret_value()


@pytest.fixture
def secrets_dir(tmp_path, monkeypatch):
    directory = tmp_path / "run-secrets"
    directory.mkdir()
    monkeypatch.setenv("BASTION_SECRETS__DIRECTORY", str(directory))
    return directory


class TestEnvironment:
    def test_environment_variable_sets_a_secret(self, monkeypatch):
        """A plain BASTION_* variable still sets a secret."""
        monkeypatch.setenv(TOKEN, "from-env")
        assert "from-env" == health_token(load_settings())


class TestDirectory:
    def test_file_named_like_the_variable_holds_its_value(self, secrets_dir):
        """A file named like the variable, in any case, is read with its final newline stripped."""
        (secrets_dir / TOKEN.lower()).write_text("from-dir\n")
        assert "from-dir" == health_token(load_settings())

    def test_nested_section_and_json_list_from_files(self, secrets_dir):
        """Deep settings are reached, and list settings take JSON like the environment."""
        (secrets_dir / "BASTION_IDENTITY__PASSWORDS__PEPPER").write_text("pep\r\n")
        (secrets_dir / "BASTION_HEALTH__ALLOWED_NETWORKS").write_text('["10.0.0.0/8"]')
        settings = load_settings()
        assert "pep" == settings.identity.passwords.pepper.get_secret_value()
        assert ["10.0.0.0/8"] == settings.health.allowed_networks

    def test_files_of_other_applications_are_ignored(self, secrets_dir):
        """/run/secrets is shared: names without the BASTION_ prefix are not ours."""
        (secrets_dir / "postgres_password").write_text("other")
        assert None is health_token(load_settings())

    def test_unknown_bastion_file_is_a_configuration_error(self, secrets_dir):
        """A misspelt BASTION_ file fails, naming the file, rather than being ignored."""
        (secrets_dir / "BASTION_HEALTH__TOKNE").write_text("x")
        with pytest.raises(ConfigurationError, match=r"BASTION_HEALTH__TOKNE.*no such setting"):
            load_settings()

    def test_missing_directory_is_a_configuration_error(self, tmp_path, monkeypatch):
        """A configured directory that does not exist stops start-up, naming the setting."""
        monkeypatch.setenv("BASTION_SECRETS__DIRECTORY", str(tmp_path / "absent"))
        with pytest.raises(ConfigurationError, match="BASTION_SECRETS__DIRECTORY"):
            load_settings()


class TestFileVariable:
    def test_file_variable_names_the_file_holding_the_value(self, tmp_path, monkeypatch):
        """BASTION_<VARIABLE>_FILE reads the value from the named file."""
        path = tmp_path / "token"
        path.write_text("from-file\n")
        monkeypatch.setenv(TOKEN + "_FILE", str(path))
        assert "from-file" == health_token(load_settings())

    def test_unreadable_file_names_variable_and_path_only(self, tmp_path, monkeypatch):
        """A missing file is one line naming the variable and the path."""
        monkeypatch.setenv(TOKEN + "_FILE", str(tmp_path / "absent"))
        with pytest.raises(ConfigurationError, match=f"cannot read {TOKEN} from .*absent"):
            load_settings()

    def test_openbao_token_can_come_from_a_file(self, tmp_path, monkeypatch):
        """The secrets section's own secrets take the file sources too."""
        path = tmp_path / "bao-token"
        path.write_text("tok\n")
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TOKEN_FILE", str(path))
        assert "tok" == load_settings().secrets.openbao_token.get_secret_value()


class TestOpenBao:
    def write(self, openbao, path, **data):
        openbao.client().secrets.kv.v2.create_or_update_secret(
            path=path, secret=data, mount_point="secret"
        )

    def use(self, monkeypatch, openbao, path):
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_URL", openbao.url)
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TOKEN", openbao.token)
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_PATH", path)

    def test_keys_of_the_kv_path_are_variables(self, openbao, monkeypatch):
        """Each key of the KV v2 secret sets the setting its variable names."""
        self.write(openbao, "keys", BASTION_HEALTH__TOKEN="from-bao", BASTION_SERVER__PORT="9001")
        self.use(monkeypatch, openbao, "keys")
        settings = load_settings()
        assert "from-bao" == health_token(settings)
        assert 9001 == settings.server.port

    def test_unknown_key_is_a_configuration_error(self, openbao, monkeypatch):
        """A key naming no setting fails, naming the key."""
        self.write(openbao, "unknown", BASTION_NOPE="x")
        self.use(monkeypatch, openbao, "unknown")
        with pytest.raises(ConfigurationError, match=r"BASTION_NOPE.*no such setting"):
            load_settings()

    def test_missing_path_is_a_configuration_error(self, openbao, monkeypatch):
        """A path with no secret fails naming mount and path."""
        self.use(monkeypatch, openbao, "never-written")
        with pytest.raises(ConfigurationError, match="no secret at secret/never-written"):
            load_settings()

    def test_wrong_token_is_refused_without_showing_it(self, openbao, monkeypatch):
        """A bad token is one line naming the URL and the token variable, not the token."""
        self.use(monkeypatch, openbao, "keys")
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TOKEN", "wrong-token-value")
        with pytest.raises(ConfigurationError) as caught:
            load_settings()
        assert openbao.url in str(caught.value)
        assert "BASTION_SECRETS__OPENBAO_TOKEN" in str(caught.value)
        assert "wrong-token-value" not in str(caught.value)

    def test_unreachable_server_names_the_url_not_the_token(self, monkeypatch):
        """Nothing listening: a ConfigurationError naming the URL, quickly, no token."""
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_URL", "http://127.0.0.1:9")
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TOKEN", "tok-123456")
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TIMEOUT", "1")
        with pytest.raises(ConfigurationError, match=r"http://127\.0\.0\.1:9 is unreachable") as e:
            load_settings()
        assert "tok-123456" not in str(e.value)


class TestPrecedence:
    def test_rising_precedence_env_directory_file_openbao_arguments(
        self, openbao, secrets_dir, tmp_path, monkeypatch
    ):
        """Environment < directory < *_FILE < OpenBao < keyword arguments, one source at a time."""
        monkeypatch.setenv(TOKEN, "env")
        assert "env" == health_token(load_settings())

        (secrets_dir / TOKEN).write_text("dir")
        assert "dir" == health_token(load_settings())

        path = tmp_path / "token"
        path.write_text("file")
        monkeypatch.setenv(TOKEN + "_FILE", str(path))
        assert "file" == health_token(load_settings())

        openbao.client().secrets.kv.v2.create_or_update_secret(
            path="precedence", secret={TOKEN: "bao"}, mount_point="secret"
        )
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_URL", openbao.url)
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TOKEN", openbao.token)
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_PATH", "precedence")
        assert "bao" == health_token(load_settings())

        assert "kwarg" == health_token(load_settings(health={"token": "kwarg"}))

    def test_other_settings_of_a_section_survive_a_file_source(self, secrets_dir, monkeypatch):
        """A file sets one key; the section's other keys still come from the environment."""
        monkeypatch.setenv("BASTION_HEALTH__PATH_PREFIX", "/probes")
        (secrets_dir / TOKEN).write_text("dir")
        settings = load_settings()
        assert ("/probes", "dir") == (settings.health.path_prefix, health_token(settings))


class TestSourceErrors:
    def test_openbao_that_never_answers_is_bounded_by_the_timeout(self, monkeypatch):
        """A server that accepts and stays silent fails after openbao_timeout, naming the URL."""
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen()  # never accepted: the connection opens, no answer comes
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            monkeypatch.setenv("BASTION_SECRETS__OPENBAO_URL", url)
            monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TIMEOUT", "0.3")
            started = time.monotonic()
            with pytest.raises(ConfigurationError, match=r"did not answer within 0\.3s"):
                load_settings()
            assert time.monotonic() - started < 5

    def test_invalid_secrets_setting_names_its_variable(self, monkeypatch):
        """A bad secrets.* value is one line naming the variable."""
        monkeypatch.setenv("BASTION_SECRETS__OPENBAO_TIMEOUT", "0")
        with pytest.raises(ConfigurationError, match="BASTION_SECRETS__OPENBAO_TIMEOUT"):
            load_settings()

    def test_list_setting_from_a_file_must_be_json(self, secrets_dir):
        """A list setting in a file that is not JSON fails naming the variable."""
        (secrets_dir / "BASTION_HEALTH__ALLOWED_NETWORKS").write_text("10.0.0.0/8")
        with pytest.raises(ConfigurationError, match="BASTION_HEALTH__ALLOWED_NETWORKS"):
            load_settings()

    def test_secrets_section_as_keyword_model(self, tmp_path):
        """secrets given to Settings as a model still configures the directory source."""
        from bastion.settings import SecretsSettings

        (tmp_path / TOKEN).write_text("kw-dir")
        settings = Settings(secrets=SecretsSettings(directory=str(tmp_path)))
        assert "kw-dir" == health_token(settings)
