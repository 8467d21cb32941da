"""The settings tree: sources and their precedence, sections, validation, secrets."""

import json
from datetime import timedelta

import pytest

from bastion.errors import ConfigurationError
from bastion.settings import Settings, load_settings

# ARCHITECTURE.md: "Sections follow the components", and every component has `enabled`.
COMPONENT_SECTIONS = [
    "http",
    "logging",
    "metrics",
    "tracing",
    "health",
    "resilience",
    "ratelimit",
    "identity",
    "tenancy",
    "audit",
    "flags",
    "guard",
    "database",
    "redis",
    "migrations",
    "events",
    "realtime",
    "jobs",
    "documents",
    "backup",
]

POSTGRES_URL = "postgresql+asyncpg://app:pg-pass-123@db.internal:5432/app"


@pytest.fixture
def config_file(tmp_path, monkeypatch):
    """Write a bastion.toml and point BASTION_CONFIG_FILE at it."""

    def write(text: str):
        path = tmp_path / "bastion.toml"
        path.write_text(text)
        monkeypatch.setenv("BASTION_CONFIG_FILE", str(path))
        return path

    return write


class TestSources:
    def test_defaults_run_on_one_machine(self):
        """With nothing configured, the database is SQLite under ./var/ and Redis is off."""
        settings = load_settings()
        assert "sqlite+aiosqlite:///./var/bastion.db" == settings.database.url.get_secret_value()
        assert settings.redis.url is None
        assert "development" == settings.environment

    def test_keyword_beats_environment_beats_file_beats_default(self, config_file, monkeypatch):
        """The same key given by every source takes the keyword argument's value."""
        config_file("[database]\npool_size = 7\nmax_overflow = 3\npool_timeout = 4.0\n")
        monkeypatch.setenv("BASTION_DATABASE__POOL_SIZE", "8")
        monkeypatch.setenv("BASTION_DATABASE__MAX_OVERFLOW", "6")
        settings = load_settings(database={"pool_size": 9})
        assert 9 == settings.database.pool_size
        assert 6 == settings.database.max_overflow
        assert 4.0 == settings.database.pool_timeout
        assert 1800.0 == settings.database.pool_recycle

    def test_environment_beats_file(self, config_file, monkeypatch):
        """An environment variable overrides the same key in bastion.toml."""
        config_file('environment = "production"\n[logging]\nlevel = "WARNING"\n')
        monkeypatch.setenv("BASTION_LOGGING__LEVEL", "ERROR")
        settings = load_settings()
        assert "ERROR" == settings.logging.level
        assert "production" == settings.environment

    def test_bastion_toml_in_the_working_directory_is_read(self, tmp_path, monkeypatch):
        """Without BASTION_CONFIG_FILE, ./bastion.toml is the file."""
        monkeypatch.delenv("BASTION_CONFIG_FILE")
        monkeypatch.chdir(tmp_path)
        (tmp_path / "bastion.toml").write_text("[health]\ncheck_timeout = 2.5\n")
        assert 2.5 == load_settings().health.check_timeout

    def test_missing_file_is_not_an_error(self, tmp_path, monkeypatch):
        """The file is optional: an absent one leaves the defaults."""
        monkeypatch.setenv("BASTION_CONFIG_FILE", str(tmp_path / "nothing-here.toml"))
        assert 1.0 == load_settings().health.check_timeout

    def test_nested_environment_variables(self, monkeypatch):
        """BASTION_<SECTION>__<KEY> sets a key of a section."""
        monkeypatch.setenv("BASTION_REDIS__URL", "redis://127.0.0.1:6379/3")
        monkeypatch.setenv("BASTION_HEALTH__ALLOWED_NETWORKS", json.dumps(["10.0.0.0/8"]))
        settings = load_settings()
        assert "redis://127.0.0.1:6379/3" == settings.redis.url.get_secret_value()
        assert ["10.0.0.0/8"] == settings.health.allowed_networks

    def test_keyword_sections_merge_with_other_sources(self, monkeypatch):
        """A keyword section overrides only the keys it names."""
        monkeypatch.setenv("BASTION_DATABASE__POOL_SIZE", "12")
        settings = load_settings(database={"echo": True})
        assert (True, 12) == (settings.database.echo, settings.database.pool_size)


class TestSections:
    @pytest.mark.parametrize("section", COMPONENT_SECTIONS)
    def test_every_component_section_has_enabled(self, section):
        """Each component section exists and is on by default."""
        assert getattr(Settings(), section).enabled is True

    @pytest.mark.parametrize("section", COMPONENT_SECTIONS)
    def test_every_component_can_be_switched_off_from_the_environment(self, section, monkeypatch):
        """BASTION_<SECTION>__ENABLED=false switches the component off."""
        monkeypatch.setenv(f"BASTION_{section.upper()}__ENABLED", "false")
        assert getattr(load_settings(), section).enabled is False

    @pytest.mark.parametrize(
        "field",
        [
            ("health", "check_timeout"),
            ("server", "drain_delay"),
            ("server", "shutdown_timeout"),
            ("database", "pool_timeout"),
            ("database", "pool_recycle"),
            ("database", "connect_timeout"),
            ("redis", "socket_timeout"),
        ],
    )
    def test_durations_accept_timedelta_and_seconds(self, field):
        """A duration is seconds, and a timedelta is converted to seconds."""
        section, key = field
        from_delta = load_settings(**{section: {key: timedelta(milliseconds=1500)}})
        from_float = load_settings(**{section: {key: 1.5}})
        assert 1.5 == getattr(getattr(from_delta, section), key)
        assert 1.5 == getattr(getattr(from_float, section), key)

    def test_log_level_is_case_insensitive(self, monkeypatch):
        """BASTION_LOGGING__LEVEL=debug is DEBUG."""
        monkeypatch.setenv("BASTION_LOGGING__LEVEL", "debug")
        assert "DEBUG" == load_settings().logging.level


class TestMigrationMode:
    def test_auto_on_sqlite(self):
        """With the SQLite default, migrations run at start-up."""
        assert "auto" == load_settings().migration_mode

    def test_check_on_postgres(self):
        """On PostgreSQL, start-up only checks; upgrading is an explicit step."""
        assert "check" == load_settings(database={"url": POSTGRES_URL}).migration_mode

    @pytest.mark.parametrize("mode", ["auto", "check", "off"])
    def test_explicit_mode_wins(self, mode):
        """migrations.mode, when set, is used on any database."""
        settings = load_settings(database={"url": POSTGRES_URL}, migrations={"mode": mode})
        assert mode == settings.migration_mode


class TestInvalidSettings:
    @pytest.mark.parametrize(
        ("variable", "value"),
        [
            ("BASTION_DATABASE__POOL_SIZE", "many"),
            ("BASTION_DATABASE__POOL_SIZE", "0"),
            ("BASTION_ENVIRONMENT", "staging"),
            ("BASTION_LOGGING__FORMAT", "xml"),
            ("BASTION_HEALTH__CHECK_TIMEOUT", "-1"),
            ("BASTION_HEALTH__NO_SUCH_KEY", "1"),
            ("BASTION_RATELIMIT__STORE_URL", "localhost"),
            ("BASTION_HEALTH__ALLOWED_NETWORKS", '["not-a-network"]'),
            ("BASTION_HEALTH__ALLOWED_NETWORKS", "10.0.0.0/8"),
        ],
    )
    def test_one_line_names_the_variable(self, variable, value, monkeypatch):
        """An invalid environment value fails with one line naming the variable."""
        monkeypatch.setenv(variable, value)
        with pytest.raises(ConfigurationError) as caught:
            load_settings()
        message = str(caught.value)
        assert "\n" not in message
        assert message.startswith(f"invalid setting {variable}: ")

    def test_invalid_keyword_names_the_variable(self):
        """A keyword argument is reported under the variable that would set it."""
        with pytest.raises(ConfigurationError, match=r"^invalid setting BASTION_SERVER__PORT: "):
            load_settings(server={"port": 70000})

    @pytest.mark.parametrize("name", ["uuid", "urn", "Okta", "has space"])
    def test_oidc_provider_names_that_could_pass_for_a_user_id_are_refused(self, name):
        """A provider name prefixes its subjects; "uuid:" or "urn:" would parse as a UUID."""
        provider = {"issuer": "https://idp.example", "audience": "api"}
        with pytest.raises(ConfigurationError, match="reserved"):
            load_settings(identity={"oidc": {name: provider}})

    def test_malformed_section_json_names_the_section(self, monkeypatch):
        """A whole section given as broken JSON names that section's variable."""
        monkeypatch.setenv("BASTION_HEALTH", "{not json")
        with pytest.raises(ConfigurationError, match=r"^invalid setting BASTION_HEALTH: "):
            load_settings()

    def test_malformed_file_names_the_file(self, config_file):
        """A bastion.toml that is not TOML fails with one line naming the file."""
        path = config_file("[database\npool_size = 1\n")
        with pytest.raises(ConfigurationError) as caught:
            load_settings()
        assert str(caught.value).startswith(f"invalid configuration file {path}: ")
        assert "\n" not in str(caught.value)

    def test_invalid_value_in_file_names_the_variable(self, config_file):
        """A bad value in bastion.toml is reported under its canonical variable name."""
        config_file("[database]\npool_size = 'lots'\n")
        with pytest.raises(
            ConfigurationError, match=r"^invalid setting BASTION_DATABASE__POOL_SIZE"
        ):
            load_settings()

    @pytest.mark.parametrize("url", ["redis://:hunter2@cache:6379/0", "not a url", "memory://"])
    def test_database_url_must_be_sql_and_is_not_echoed(self, url):
        """database.url must name SQLite or PostgreSQL; the message never quotes the URL."""
        with pytest.raises(ConfigurationError) as caught:
            load_settings(database={"url": url})
        assert str(caught.value).startswith("invalid setting BASTION_DATABASE__URL: ")
        assert url not in str(caught.value)
        assert "hunter2" not in str(caught.value)

    def test_invalid_input_is_not_echoed(self, monkeypatch):
        """The message names the variable and the problem, not the rejected value."""
        monkeypatch.setenv("BASTION_DATABASE__POOL_SIZE", "hunter2-not-a-number")
        with pytest.raises(ConfigurationError) as caught:
            load_settings()
        assert "hunter2" not in str(caught.value)


class TestSecrets:
    @pytest.fixture
    def settings(self):
        return load_settings(
            database={"url": POSTGRES_URL},
            redis={"url": "redis://:redis-pass-456@cache:6379/0"},
            health={"token": "probe-token-789"},
            events={"broker_url": "amqp://guest:amqp-pass-012@mq:5672/"},
            ratelimit={"store_url": "redis://:store-pass-345@limits:6379/1"},
        )

    SECRETS = (
        "pg-pass-123",
        "redis-pass-456",
        "probe-token-789",
        "amqp-pass-012",
        "store-pass-345",
    )

    def test_repr_and_str_hide_secrets(self, settings):
        """No secret appears in repr() or str() of the tree or of a section."""
        shown = repr(settings) + str(settings) + repr(settings.database) + repr(settings.ratelimit)
        assert [] == [secret for secret in self.SECRETS if secret in shown]

    def test_redacted_tree_hides_secrets(self, settings):
        """The tree `bastion config show` prints contains no secret."""
        shown = json.dumps(settings.redacted())
        assert [] == [secret for secret in self.SECRETS if secret in shown]

    def test_redacted_store_url_keeps_its_location(self, settings):
        """A store URL is shown with only its password masked."""
        assert "redis://***@limits:6379/1" == settings.redacted()["ratelimit"]["store_url"]

    def test_secrets_are_still_usable(self, settings):
        """Masking is for display only: the value is there for the code that needs it."""
        assert POSTGRES_URL == settings.database.url.get_secret_value()
